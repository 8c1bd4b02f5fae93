"""`stacchip-db ingest landsat` on the loopback STAC API, sources in a requester-pays bucket."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import psycopg
import pytest
from conftest import run_cli
from sensor_catalog import (
    L1,
    L2,
    LANDSAT_CLOUDY_QUARTER,
    LANDSAT_EMPTY_QUARTER,
    box_around,
    expected_landsat_choice,
)
from test_batch import run_entrypoint

from stacchip_db.demo import write_sample_source
from stacchip_db.processors.landsat import L1_ASSETS, L2_ASSETS, choose_years

FULL_JOB = 1  # Level-1 2019, Level-2 2022: eight quarters with scenes
SKIPPING_JOB = 5  # Level-2 2020: Q1 empty, Q3 only above 75 % cloud
CHIP = 64  # the synthetic scenes are 275 x 277 px


@pytest.fixture
def samples(sensor_api, tmp_path: Path) -> str:
    rows = [(box_around(sensor_api.landsat_centre, 0.05), {"name": f"s{i}"}) for i in range(8)]
    return str(write_sample_source(tmp_path / "samples.geojson", rows))


def expected(sensor_api, index: int) -> list[tuple[str, str, str]]:
    """(collection, label, id) the rules must pick."""
    chosen = []
    for collection, year in zip((L1, L2), choose_years(index), strict=True):
        for quarter in range(1, 5):
            item_id = expected_landsat_choice(
                sensor_api.items["landsat"], collection, year, quarter
            )
            if item_id:
                chosen.append((collection, f"{year} Q{quarter}", item_id))
    return chosen


def ingest(database_url, sensor_api, samples, target, index, *extra):
    args = ["ingest", "landsat", "--index", str(index), "--sample-source", samples]
    args += ["--target", target, "--stac-api", sensor_api.url, "--chip-size", str(CHIP)]
    return run_cli([*args, "--json", *extra], database_url=database_url)


def test_years_are_distinct_and_seeded():
    for index in range(50):
        first, second = choose_years(index)
        assert first != second and {first, second} <= set(range(2018, 2024))
        assert choose_years(index) == (first, second)


def test_plan_follows_the_rules(database_url, sensor_api, samples, tmp_path):
    result = ingest(database_url, sensor_api, samples, str(tmp_path / "t"), FULL_JOB, "--dry-run")
    assert result.exit_code == 0, result.output
    scenes = json.loads(result.stdout)["scenes"]
    assert [(s["collection"], s["label"], s["id"]) for s in scenes] == expected(
        sensor_api, FULL_JOB
    )
    assert len(scenes) == 8
    # The traps: 16.8 % (text sort), a clearer LANDSAT_7, a clearer scene off the centroid.
    assert all(2.0 <= s["cloud_cover"] < 10 for s in scenes)
    assert not any("LE07" in s["id"] or "_086108_" in s["id"] for s in scenes)
    l1_year, l2_year = choose_years(FULL_JOB)
    assert {s["label"][:4] for s in scenes if s["collection"] == L1} == {str(l1_year)}
    assert {s["label"][:4] for s in scenes if s["collection"] == L2} == {str(l2_year)}


def test_cloudy_and_empty_quarters_are_skipped(database_url, sensor_api, samples, tmp_path):
    result = ingest(
        database_url, sensor_api, samples, str(tmp_path / "t"), SKIPPING_JOB, "--dry-run"
    )
    assert result.exit_code == 0, result.output
    scenes = json.loads(result.stdout)["scenes"]
    labels = [(s["collection"], s["label"]) for s in scenes]
    assert choose_years(SKIPPING_JOB)[1] == 2020
    assert (L2, "{} Q{}".format(*LANDSAT_CLOUDY_QUARTER)) not in labels
    assert (L2, "{} Q{}".format(*LANDSAT_EMPTY_QUARTER)) not in labels
    assert len(scenes) == 6
    assert "% cloud > 75.0 %, skipped" in result.stderr and "no scene, skipped" in result.stderr


def test_ingest_copies_from_alternate_s3_and_indexes(database_url, sensor_api, samples, tmp_path):
    target = tmp_path / "target"
    result = ingest(database_url, sensor_api, samples, str(target), FULL_JOB)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    chosen = expected(sensor_api, FULL_JOB)
    assert "landsat job 1: succeeded, 8/8 scenes stored" in result.stderr
    for collection, _, item_id in chosen:
        folder = target / collection / item_id
        item = json.loads((folder / "stac_item.json").read_text())
        keys = L1_ASSETS if collection == L1 else L2_ASSETS
        assert sorted(item["assets"]) == sorted(keys)
        for asset in item["assets"].values():
            assert Path(asset["href"]).parent == folder and Path(asset["href"]).stat().st_size
    # The 15 m pan band stays beside the 30 m grid the chips use (the item's proj:shape).
    l1_id = next(i for c, _, i in chosen if c == L1)
    l1_item = json.loads((target / L1 / l1_id / "stac_item.json").read_text())
    assert (
        l1_item["assets"]["pan"]["proj:transform"][0] * 2
        == l1_item["properties"]["proj:transform"][0]
    )
    assert all(s["copied_objects"] == len(L1_ASSETS if s["collection"] == L1 else L2_ASSETS)
               for s in summary["scenes"])  # fmt: skip

    with psycopg.connect(database_url) as conn:
        items = sorted(r[0] for r in conn.execute("SELECT id FROM pgstac.items"))
        chips = conn.execute(
            "SELECT item_id, count(*), max(nodata_fraction), max(cloud_fraction), "
            "min(chip_size), max(chip_size) FROM stacchip.chips GROUP BY item_id"
        ).fetchall()
        job = conn.execute("SELECT processor, job_index, status FROM stacchip.jobs").fetchall()
    assert items == sorted(i for _, _, i in chosen)
    assert {row[0] for row in chips} == set(items)
    for _, count, max_nodata, max_cloud, low, high in chips:
        # max_nodata 0: a chip with any fill pixel is not stored; the cloud blob is.
        assert max_nodata == 0.0 and max_cloud > 0.0 and low == high == CHIP
        assert 0 < count < (275 // CHIP) * (277 // CHIP)
    assert job == [("landsat", FULL_JOB, "succeeded")]


def test_batch_entrypoint(database_url, sensor_api, s3_server, samples):
    bucket = s3_server.new_bucket("landsat-batch")
    result = run_entrypoint(
        "landsat",
        {
            "AWS_BATCH_JOB_ARRAY_INDEX": str(SKIPPING_JOB),
            "STACCHIP_SAMPLE_SOURCE": samples,
            "STACCHIP_BUCKET": bucket,
            "STACCHIP_DATABASE_URL": database_url,
            "STACCHIP_STAC_API": sensor_api.url,
        },
    )
    # Default 256 px chips: one chip per 275 x 277 px synthetic scene, dropped by max_nodata 0
    # (the nodata wedge); the scenes are stored all the same.
    assert result.returncode == 0, result.stderr
    assert "landsat job 5: succeeded, 6/6 scenes stored" in result.stderr
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]
    assert sum(o["Key"].endswith("stac_item.json") for o in listed) == 6
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM pgstac.items").fetchone()[0] == 6
        assert conn.execute("SELECT status FROM stacchip.jobs").fetchall() == [("succeeded",)]
