"""`stacchip-db ingest naip` against a real STAC API on loopback."""

from __future__ import annotations

import json
import random
from pathlib import Path

import psycopg
import pytest
from conftest import run_cli

from stacchip_db.demo import naip_sample_geometry, write_sample_source


@pytest.fixture
def naip_samples(stac_api, tmp_path: Path) -> str:
    here = naip_sample_geometry(stac_api.bases["naip"])
    nowhere = {"type": "Point", "coordinates": [10.0, 50.0]}  # no NAIP in Europe
    rows = [(here, {"state": "al"}), (here, {"state": "al"}), (nowhere, {"state": "-"})]
    return str(write_sample_source(tmp_path / "naip.geojson", rows))


def expected_naip(stac_api, index: int) -> list[tuple[str, str]]:
    items = sorted(stac_api.items["naip"], key=lambda i: i["properties"]["naip:year"])[::-1]
    latest, others = items[0], items[1:]
    return [("latest", latest["id"]), ("random", random.Random(index).choice(others)["id"])]


def ingest(database_url, stac_api, samples, target, index, *extra):
    args = [
        "ingest",
        "naip",
        "--index",
        str(index),
        "--sample-source",
        samples,
        "--target",
        str(target),
        "--stac-api",
        stac_api.url,
        "--json",
        *extra,
    ]
    return run_cli(args, database_url=database_url)


def test_plan_is_the_latest_and_a_seeded_random_other(
    database_url, stac_api, naip_samples, tmp_path
):
    for index in (0, 1):
        result = ingest(database_url, stac_api, naip_samples, tmp_path, index, "--dry-run")
        assert result.exit_code == 0, result.output
        scenes = json.loads(result.stdout)["scenes"]
        assert [(s["label"], s["id"]) for s in scenes] == expected_naip(stac_api, index)
        assert "_2023" in scenes[0]["id"]
    only = ingest(database_url, stac_api, naip_samples, tmp_path, 0, "--dry-run", "--latest-only")
    assert [s["label"] for s in json.loads(only.stdout)["scenes"]] == ["latest"]


def test_ingest_copies_the_image_and_stores_chips(database_url, stac_api, naip_samples, tmp_path):
    target = tmp_path / "target"
    result = ingest(database_url, stac_api, naip_samples, target, 0)
    assert result.exit_code == 0, result.output
    expected = expected_naip(stac_api, 0)
    summary = json.loads(result.stdout)
    assert [(s["label"], s["id"]) for s in summary["scenes"]] == expected
    for _, item_id in expected:
        item = json.loads((target / "naip" / item_id / "stac_item.json").read_text())
        assert list(item["assets"]) == ["image"]  # rendered_preview, thumbnail… dropped
        href = Path(item["assets"]["image"]["href"])
        assert href.parent == target / "naip" / item_id and href.stat().st_size > 0
    with psycopg.connect(database_url) as conn:
        items = sorted(r[0] for r in conn.execute("SELECT id FROM pgstac.items"))
        chips = conn.execute(
            "SELECT item_id, count(*), max(cloud_fraction), max(nodata_fraction) "
            "FROM stacchip.chips GROUP BY item_id ORDER BY item_id"
        ).fetchall()
        job = conn.execute("SELECT processor, status FROM stacchip.jobs").fetchall()
    assert items == sorted(i for _, i in expected)
    # No quality band: every chip is clear and full (nothing dropped for nodata).
    assert [(c[0], c[2], c[3]) for c in chips] == [(i, 0.0, 0.0) for i in items]
    assert [c[1] for c in chips] == [
        s["chips"] for s in sorted(summary["scenes"], key=lambda s: s["id"])
    ]
    assert job == [("naip", "succeeded")]


def test_no_image_at_the_location_is_an_empty_successful_job(
    database_url, stac_api, naip_samples, tmp_path
):
    result = ingest(database_url, stac_api, naip_samples, tmp_path / "t", 2)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["scenes"] == []
    assert "no NAIP image" in result.stderr
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT status, scenes FROM stacchip.jobs").fetchall() == [
            ("succeeded", [])
        ]


def test_signing_touches_only_the_hrefs_a_job_reads(
    database_url, stac_api, naip_samples, tmp_path, sas_token_server
):
    # The served items keep Planetary Computer's thumbnail href (an Azure blob) while their
    # image is a local COG: hrefs are signed where they are read, and the job reads only the
    # image, so signing on asks the token API nothing (tests/test_signing.py reads blobs).
    hrefs = [a["href"] for i in stac_api.items["naip"] for a in i["assets"].values()]
    assert any(".blob.core.windows.net/" in href for href in hrefs)
    signed = ingest(database_url, stac_api, naip_samples, tmp_path / "t", 0, "--sign")
    assert signed.exit_code == 0, signed.output
    assert json.loads(signed.stdout)["status"] == "succeeded"
    assert sas_token_server.requests == []
