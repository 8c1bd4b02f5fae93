"""`stacchip-db ingest sentinel-1` on the loopback STAC API: spatial filter, re-encoded COGs."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import numpy as np
import psycopg
import pytest
import rasterio
from conftest import run_cli
from sensor_catalog import S1, S1_EMPTY_QUARTER, S1_SHAPE, box_around, quarter_of
from test_batch import run_entrypoint

from stacchip_db.processors.sentinel1 import choose_quarter
from stacchip_db.synthetic import scene_masks

JOB = 1  # 2019 Q1
EMPTY_JOB = 3  # 2019 Q2: only a scene away from the sample
CHIP = 64  # the synthetic scene is 320 x 320 px


@pytest.fixture
def samples(sensor_api, tmp_path: Path) -> str:
    from stacchip_db.demo import write_sample_source

    rows = [(box_around(sensor_api.s1_centre, 0.01), {"name": "33TWL"}) for _ in range(8)]
    return str(write_sample_source(tmp_path / "mgrs.geojson", rows))


def ingest(database_url, sensor_api, samples, target, index, *extra):
    args = ["ingest", "sentinel-1", "--index", str(index), "--sample-source", samples]
    args += ["--target", target, "--stac-api", sensor_api.url, "--chip-size", str(CHIP)]
    return run_cli([*args, "--json", *extra], database_url=database_url)


def test_year_and_quarter_are_seeded():
    assert choose_quarter(JOB) == (2019, 1) and choose_quarter(EMPTY_JOB) == S1_EMPTY_QUARTER
    assert {choose_quarter(i)[0] for i in range(100)} == set(range(2018, 2024))
    assert {choose_quarter(i)[1] for i in range(100)} == {1, 2, 3, 4}


def test_only_a_scene_intersecting_the_sample_is_chosen(
    database_url, sensor_api, samples, tmp_path
):
    result = ingest(database_url, sensor_api, samples, str(tmp_path), JOB, "--dry-run")
    assert result.exit_code == 0, result.output
    [scene] = json.loads(result.stdout)["scenes"]
    assert scene["label"] == "2019 Q1"
    # The newer scene of that quarter lies elsewhere: without the spatial filter it comes first.
    same_quarter = [i for i in sensor_api.items[S1] if quarter_of(i) == (2019, 1)]
    newest = max(same_quarter, key=lambda i: i["properties"]["datetime"])
    assert newest["id"].endswith("_0999_rtc") and scene["id"] != newest["id"]
    assert scene["id"].endswith("_0001_rtc")

    empty = ingest(database_url, sensor_api, samples, str(tmp_path), EMPTY_JOB, "--dry-run")
    assert empty.exit_code == 0, empty.output
    assert json.loads(empty.stdout)["scenes"] == []
    assert "no scene intersects the sample, skipped" in empty.stderr


def test_ingest_reencodes_vv_vh_and_masks_nodata(database_url, sensor_api, samples, tmp_path):
    target = tmp_path / "target"
    result = ingest(database_url, sensor_api, samples, str(target), JOB)
    assert result.exit_code == 0, result.output
    [scene] = json.loads(result.stdout)["scenes"]
    folder = target / S1 / scene["id"]
    item = json.loads((folder / "stac_item.json").read_text())
    assert sorted(item["assets"]) == ["vh", "vv"]
    source = next(i for i in sensor_api.items[S1] if i["id"] == scene["id"])
    for key, asset in item["assets"].items():
        path = Path(asset["href"])
        assert path.parent == folder and path.name == f"iw-{key}.rtc.tiff"
        with rasterio.open(path) as copy, rasterio.open(source["assets"][key]["href"]) as src:
            assert copy.compression.name == "deflate" and src.compression is None
            assert copy.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            assert copy.nodata == -32768
            assert np.array_equal(copy.read(1), src.read(1))  # lossless
        assert path.stat().st_size < Path(source["assets"][key]["href"]).stat().st_size
        assert asset["raster:bands"][0]["nodata"] == -32768

    # Nodata fractions: the wedge of -32768 pixels, chip by chip, exactly.
    wedge = scene_masks(S1_SHAPE)["nodata"]
    ny, nx = S1_SHAPE[0] // CHIP, S1_SHAPE[1] // CHIP
    per_chip = wedge.reshape(ny, CHIP, nx, CHIP).mean(axis=(1, 3))
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT chip_index_x, chip_index_y, nodata_fraction, cloud_fraction "
            "FROM stacchip.chips WHERE item_id = %s",
            (scene["id"],),
        ).fetchall()
        job = conn.execute("SELECT status, scenes FROM stacchip.jobs").fetchone()
        stored = conn.execute("SELECT count(*) FROM pgstac.items WHERE id = %s", (scene["id"],))
        assert stored.fetchone()[0] == 1
    kept = {(x, y) for y in range(ny) for x in range(nx) if per_chip[y, x] <= 0.5}
    assert {(x, y) for x, y, _, _ in rows} == kept
    for x, y, nodata, cloud in rows:
        assert nodata == pytest.approx(per_chip[y, x], abs=1e-6) and cloud == 0.0
    assert any(n > 0 for _, _, n, _ in rows)
    assert job[0] == "succeeded" and job[1][0]["copied_objects"] == 2

    again = ingest(database_url, sensor_api, samples, str(target), JOB)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["scenes"][0]["skipped_objects"] == 2


def test_batch_entrypoint_reads_the_mgrs_source(database_url, sensor_api, s3_server, samples):
    bucket = s3_server.new_bucket("s1-batch")
    result = run_entrypoint(
        "sentinel-1",
        {
            "AWS_BATCH_JOB_ARRAY_INDEX": str(JOB),
            "STACCHIP_SAMPLE_SOURCE": samples,
            "STACCHIP_BUCKET": bucket,
            "STACCHIP_DATABASE_URL": database_url,
            "STACCHIP_STAC_API": sensor_api.url,
        },
    )
    assert result.returncode == 0, result.stderr
    assert "sentinel-1 job 1: succeeded, 1/1 scenes stored" in result.stderr
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    [item_key] = [k for k in keys if k.endswith("stac_item.json")]
    prefix = item_key.rsplit("/", 1)[0]
    assert {f"{prefix}/iw-vv.rtc.tiff", f"{prefix}/iw-vh.rtc.tiff"} <= keys
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM stacchip.chips").fetchone()[0] > 0
