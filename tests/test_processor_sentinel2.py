"""`stacchip-db ingest sentinel-2` against a real STAC API and S3 server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import boto3
import psycopg
import pytest
from conftest import error_line, run_cli

from stacchip_db.demo import (
    EMPTY_QUARTER,
    SKIPPED_QUARTER,
    s2_sample_rows,
    write_sample_source,
)
from stacchip_db.processors.sentinel2 import choose_years
from tests.stac_server import expected_s2_choice

S2 = "sentinel-2-l2a"
FULL_JOB = 1  # years 2019 and 2022: eight quarters with scenes
SKIPPING_JOB = 12  # years 2020 and 2021: 2020 Q3 too cloudy, 2021 Q4 empty
BROKEN_JOB = 4  # years 2019 and 2020: the broken collection's scenes are in 2019 Q1, Q2


@pytest.fixture
def samples(tmp_path: Path) -> str:
    return str(write_sample_source(tmp_path / "mgrs.geojson", s2_sample_rows(16)))


def expected_scenes(stac_api, index: int, collection: str = S2) -> list[tuple[str, str]]:
    """(label, id) of the scenes the rules pick, computed from the catalog's items."""
    chosen = []
    for year in choose_years(index):
        for quarter in range(1, 5):
            item_id = expected_s2_choice(stac_api.items[collection], year, quarter)
            if item_id:
                chosen.append((f"{year} Q{quarter}", item_id))
    return chosen


def ingest(database_url: str, stac_api, samples: str, target: str, index: int, *extra: str):
    args = [
        "ingest",
        "sentinel-2",
        "--index",
        str(index),
        "--sample-source",
        samples,
        "--target",
        target,
        "--stac-api",
        stac_api.url,
        "--json",
        *extra,
    ]
    return run_cli(args, database_url=database_url)


def db_rows(database_url: str) -> dict[str, object]:
    with psycopg.connect(database_url) as conn:
        return {
            "items": sorted(r[0] for r in conn.execute("SELECT id FROM pgstac.items")),
            "chips": conn.execute("SELECT count(*) FROM stacchip.chips").fetchone()[0],
            "distinct_chips": conn.execute(
                "SELECT count(DISTINCT (collection, item_id, chip_size, chip_index_x, "
                "chip_index_y)) FROM stacchip.chips"
            ).fetchone()[0],
            "chip_items": sorted(
                r[0] for r in conn.execute("SELECT DISTINCT item_id FROM stacchip.chips")
            ),
            "jobs": conn.execute(
                "SELECT processor, job_index, status, attempts, error, scenes, timings "
                "FROM stacchip.jobs ORDER BY job_index"
            ).fetchall(),
        }


def test_dry_run_prints_the_plan_and_writes_nothing(database_url, stac_api, samples, tmp_path):
    target = tmp_path / "target"
    result = ingest(database_url, stac_api, samples, str(target), FULL_JOB, "--dry-run")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    chosen = [(s["label"], s["id"]) for s in summary["scenes"]]
    assert chosen == expected_scenes(stac_api, FULL_JOB)
    assert len(chosen) == 8
    # The rules' traps: a clearer scene of another tile, a clearer one with 35 % nodata, and a
    # 16.8 % scene that a text sort would put before the 2-8 % winner.
    clouds = [s["cloud_cover"] for s in summary["scenes"]]
    assert all(2.0 <= c < 10 for c in clouds), clouds
    assert all("T20HNJ" in item_id for _, item_id in chosen)
    assert not target.exists()
    assert db_rows(database_url)["jobs"] == []

    text = run_cli(
        [
            "ingest",
            "sentinel-2",
            "--index",
            str(FULL_JOB),
            "--sample-source",
            samples,
            "--target",
            str(target),
            "--stac-api",
            stac_api.url,
            "--dry-run",
        ],
        database_url=database_url,
    )
    assert text.exit_code == 0, text.output
    assert "name=20HNJ" in text.stdout and "2019 Q1" in text.stdout and "cloud" in text.stdout


def test_ingest_copies_rewrites_indexes_stores_and_records(
    database_url, stac_api, samples, tmp_path
):
    target = tmp_path / "target"
    result = ingest(database_url, stac_api, samples, str(target), FULL_JOB)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    expected = expected_scenes(stac_api, FULL_JOB)
    assert [(s["label"], s["id"]) for s in summary["scenes"]] == expected
    assert "sentinel-2 job 1: succeeded, 8/8 scenes stored" in result.stderr

    for _, item_id in expected:
        folder = target / S2 / item_id
        item = json.loads((folder / "stac_item.json").read_text())
        assert sorted(item["assets"]) == sorted(
            [
                "blue",
                "green",
                "red",
                "nir",
                "nir08",
                "rededge1",
                "rededge2",
                "rededge3",
                "scl",
                "swir16",
                "swir22",
            ]
        )
        for asset in item["assets"].values():
            assert Path(asset["href"]).parent == folder
            assert Path(asset["href"]).stat().st_size > 0
        assert not list(folder.glob("*.partial"))  # storage.write_atomically's folders

    rows = db_rows(database_url)
    assert rows["items"] == sorted(i for _, i in expected)
    assert rows["chip_items"] == sorted(i for _, i in expected)
    assert rows["chips"] == rows["distinct_chips"] == sum(s["chips"] for s in summary["scenes"])
    assert rows["chips"] > 0
    [(processor, index, status, attempts, error, scenes, timings)] = rows["jobs"]
    assert (processor, index, status, attempts, error) == (
        "sentinel-2",
        FULL_JOB,
        "succeeded",
        1,
        None,
    )
    assert [s["id"] for s in scenes] == [i for _, i in expected]
    assert set(timings) == {"search", "copy", "index", "store"}
    assert all(v > 0 for v in timings.values())

    # Re-running ends with the same rows and objects: copies skipped, rows replaced.
    again = ingest(database_url, stac_api, samples, str(target), FULL_JOB)
    assert again.exit_code == 0, again.output
    second = json.loads(again.stdout)
    assert all(s["copied_objects"] == 0 and s["skipped_objects"] == 11 for s in second["scenes"])
    rows_again = db_rows(database_url)
    assert rows_again["items"] == rows["items"] and rows_again["chips"] == rows["chips"]
    assert rows_again["jobs"][0][3] == 2  # attempts


def test_quarters_without_a_usable_scene_are_skipped(database_url, stac_api, samples, tmp_path):
    result = ingest(database_url, stac_api, samples, str(tmp_path / "t"), SKIPPING_JOB, "--dry-run")
    assert result.exit_code == 0, result.output
    labels = [s["label"] for s in json.loads(result.stdout)["scenes"]]
    assert "{} Q{}".format(*SKIPPED_QUARTER) not in labels
    assert "{} Q{}".format(*EMPTY_QUARTER) not in labels
    assert len(labels) == 6
    assert "no scene, skipped" in result.stderr
    assert "% cloud > 75.0 %, skipped" in result.stderr

    lenient = ingest(
        database_url,
        stac_api,
        samples,
        str(tmp_path / "t"),
        SKIPPING_JOB,
        "--dry-run",
        "--max-cloud-cover",
        "85",
    )
    labels = [s["label"] for s in json.loads(lenient.stdout)["scenes"]]
    assert "{} Q{}".format(*SKIPPED_QUARTER) in labels


def test_s3_target_and_sample_source(database_url, stac_api, s3_server, tmp_path):
    bucket = s3_server.new_bucket("target")
    source = write_sample_source(tmp_path / "mgrs.geojson", s2_sample_rows(4))
    s3 = boto3.client("s3")
    s3.upload_file(str(source), bucket, "samples/mgrs.geojson")
    result = ingest(
        database_url, stac_api, f"s3://{bucket}/samples/mgrs.geojson", f"s3://{bucket}/chips", 2
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert len(summary["scenes"]) == 8
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="chips/")["Contents"]}
    for scene in summary["scenes"]:
        prefix = f"chips/{S2}/{scene['id']}/"
        assert sum(k.startswith(prefix) for k in keys) == 12  # 11 assets + stac_item.json
        item = json.loads(
            s3.get_object(Bucket=bucket, Key=prefix + "stac_item.json")["Body"].read()
        )
        assert item["assets"]["scl"]["href"].startswith(f"s3://{bucket}/{prefix}")
    assert db_rows(database_url)["chips"] == sum(s["chips"] for s in summary["scenes"]) > 0


def test_stac_api_errors_are_retried(database_url, stac_api, samples, tmp_path):
    stac_api.faults.fail_next(2, status=500)
    stac_api.faults.fail_next(1, status=429)
    result = ingest(database_url, stac_api, samples, str(tmp_path / "t"), FULL_JOB, "--dry-run")
    assert result.exit_code == 0, result.output
    statuses = [status for _, path, status in stac_api.faults.requests if path == "/search"]
    assert statuses[:4] == [500, 500, 429, None]
    assert [s["id"] for s in json.loads(result.stdout)["scenes"]] == [
        i for _, i in expected_scenes(stac_api, FULL_JOB)
    ]


def test_stac_api_down_is_one_line(database_url, samples, tmp_path):
    from stacchip_db.demo import free_port

    result = run_cli(
        [
            "ingest",
            "sentinel-2",
            "--index",
            "1",
            "--sample-source",
            samples,
            "--target",
            str(tmp_path),
            "--stac-api",
            f"http://127.0.0.1:{free_port()}",
            "--dry-run",
        ],
        database_url=database_url,
    )
    line = error_line(result)
    assert "unreachable after retries" in line and "--stac-api" in line


def test_missing_source_object_fails_the_job_and_leaves_that_scene_out(
    database_url, stac_api, samples, tmp_path
):
    result = ingest(
        database_url,
        stac_api,
        samples,
        str(tmp_path / "t"),
        BROKEN_JOB,
        "--collection",
        "sentinel-2-broken",
    )
    line = error_line(result)
    assert "gone.tif does not exist" in line and "job 4 failed" in line
    assert "1 of 2 scenes failed" in line
    good, bad = (i["id"] for i in stac_api.items["sentinel-2-broken"])
    rows = db_rows(database_url)
    assert rows["items"] == [good] and rows["chip_items"] == [good]
    [(_, _, status, _, error, scenes, _)] = rows["jobs"]
    assert status == "failed" and "gone.tif does not exist" in error
    assert [(s["id"], s["status"]) for s in scenes] == [(good, "stored"), (bad, "failed")]
    assert f"item {bad}" in scenes[1]["error"] and "gone.tif" in scenes[1]["error"]
    assert not (tmp_path / "t" / "sentinel-2-broken" / bad / "stac_item.json").exists()


def test_sample_index_out_of_range(database_url, stac_api, samples, tmp_path):
    line = error_line(ingest(database_url, stac_api, samples, str(tmp_path), 16, "--dry-run"))
    assert "job index 16 is out of range" in line and "16 rows" in line and "--index" in line


@pytest.mark.parametrize("content", [None, "this is not a layer"])
def test_unreadable_sample_source(database_url, stac_api, tmp_path, content):
    source = tmp_path / "mgrs.geojson"
    if content is not None:
        source.write_text(content)
    line = error_line(ingest(database_url, stac_api, str(source), str(tmp_path), 0, "--dry-run"))
    assert f"cannot read sample source {source}" in line


def test_sample_source_without_the_tile_column(database_url, stac_api, tmp_path):
    source = write_sample_source(tmp_path / "s.geojson", [(s2_sample_rows(1)[0][0], {"x": 1})])
    line = error_line(ingest(database_url, stac_api, str(source), str(tmp_path), 0, "--dry-run"))
    assert "no 'name' value in row 0" in line


def _env(database_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["STACCHIP_DATABASE_URL"] = database_url
    env.pop("STACCHIP_HOME", None)
    return env


def test_crash_between_copy_and_store_then_rerun(database_url, stac_api, samples, tmp_path):
    target = tmp_path / "target"
    # The process dies (no exception handling, no cleanup) when it first tries to store.
    crash = textwrap.dedent(
        """
        import os, sys
        import stacchip_db.processors.base as base
        base.store_item = lambda *a, **k: os._exit(9)
        from stacchip_db.cli import main
        main(sys.argv[1:], prog_name="stacchip-db")
        """
    )
    args = [
        "ingest",
        "sentinel-2",
        "--index",
        str(FULL_JOB),
        "--sample-source",
        samples,
        "--target",
        str(target),
        "--stac-api",
        stac_api.url,
    ]
    died = subprocess.run(
        [sys.executable, "-c", crash, *args],
        env=_env(database_url),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert died.returncode == 9, died.stderr
    rows = db_rows(database_url)
    assert rows["items"] == [] and rows["chips"] == 0
    assert [(j[2], j[3]) for j in rows["jobs"]] == [("running", 1)]
    first = expected_scenes(stac_api, FULL_JOB)[0][1]
    assert len(list((target / S2 / first).glob("*.tif"))) == 11

    result = ingest(database_url, stac_api, samples, str(target), FULL_JOB)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["scenes"][0]["skipped_objects"] == 11
    rows = db_rows(database_url)
    assert len(rows["items"]) == 8 and rows["chips"] == rows["distinct_chips"] > 0
    assert [(j[2], j[3]) for j in rows["jobs"]] == [("succeeded", 2)]


def test_concurrent_jobs_over_overlapping_scenes(database_url, stac_api, samples, tmp_path):
    indexes = [1, 3, 6, 10]  # 1 and 3 pick the same years; all four share 2022
    target = tmp_path / "target"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stacchip_db.cli",
                "ingest",
                "sentinel-2",
                "--index",
                str(i),
                "--sample-source",
                samples,
                "--target",
                str(target),
                "--stac-api",
                stac_api.url,
                "--json",
            ],
            env=_env(database_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in indexes
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    expected = {i for index in indexes for _, i in expected_scenes(stac_api, index)}
    rows = db_rows(database_url)
    assert set(rows["items"]) == expected and len(rows["items"]) == len(expected)
    assert rows["chips"] == rows["distinct_chips"]
    per_item = {}
    for out, _ in outputs:
        for scene in json.loads(out)["scenes"]:
            per_item[scene["id"]] = scene["chips"]
    assert rows["chips"] == sum(per_item.values())
    assert sorted((j[1], j[2]) for j in rows["jobs"]) == [(i, "succeeded") for i in indexes]
