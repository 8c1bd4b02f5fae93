"""`stacchip-db ingest modis` on the loopback STAC API: one item a month, EPSG:3857 COGs."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import numpy as np
import psycopg
import rasterio
from conftest import error_line, run_cli
from sensor_catalog import MODIS, MODIS_MONTHS, MODIS_QC_NODATA, MODIS_TILE
from test_batch import run_entrypoint

from stacchip_db.processors.modis import SIN_GRID_TILES, tile_for

JOB = SIN_GRID_TILES.index(MODIS_TILE)
CHIP = 64
ASSETS = [f"sur_refl_b0{i}" for i in range(1, 8)] + ["sur_refl_qc_500m"]


def ingest(database_url, sensor_api, target, index, *extra):
    args = ["ingest", "modis", "--index", str(index), "--target", target]
    args += ["--stac-api", sensor_api.url, "--chip-size", str(CHIP), "--json", *extra]
    return run_cli(args, database_url=database_url)


def test_tile_list_is_the_originals():
    assert len(SIN_GRID_TILES) == 233 and len(set(SIN_GRID_TILES)) == 233
    assert SIN_GRID_TILES[0] == (2, 12) and SIN_GRID_TILES[-1] == (14, 22)
    assert tile_for(JOB) == (5, 18)


def test_one_item_per_month_of_the_jobs_tile(database_url, sensor_api, tmp_path):
    result = ingest(database_url, sensor_api, str(tmp_path), JOB, "--dry-run")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [s["label"] for s in summary["scenes"]] == [f"{y}-{m:02d}" for y, m in MODIS_MONTHS]
    assert all(".h18v05." in s["id"] for s in summary["scenes"])  # not the h19v05 neighbour
    assert "no item, skipped" in result.stderr


def test_ingest_reprojects_to_web_mercator(database_url, sensor_api, tmp_path):
    target = tmp_path / "target"
    result = ingest(database_url, sensor_api, str(target), JOB)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert f"modis job {JOB}: succeeded, 3/3 scenes stored" in result.stderr
    for scene in summary["scenes"]:
        source = next(i for i in sensor_api.items[MODIS] if i["id"] == scene["id"])
        item = json.loads((target / MODIS / scene["id"] / "stac_item.json").read_text())
        props = item["properties"]
        assert sorted(item["assets"]) == sorted(ASSETS)
        assert props["datetime"] == source["properties"]["end_datetime"]
        assert props["proj:code"] == "EPSG:3857" and "proj:wkt2" not in props
        with rasterio.open(item["assets"]["sur_refl_qc_500m"]["href"]) as qc:
            assert qc.crs.to_epsg() == 3857 and qc.compression.name == "deflate"
            assert props["proj:shape"] == [qc.height, qc.width]
            assert props["proj:transform"] == list(qc.transform)[:6]
            codes = qc.read(1)
        # Nearest neighbour keeps the QC codes; the sinusoidal tile's slanted edge is fill.
        assert set(np.unique(codes)) <= {0, 0b01, 0b11, MODIS_QC_NODATA}
        assert (codes == MODIS_QC_NODATA).any() and (codes == 0b01).any()
        with rasterio.open(item["assets"]["sur_refl_b01"]["href"]) as band:
            assert band.crs.to_epsg() == 3857 and band.transform == qc.transform
            assert band.dtypes[0] == "int16"

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT item_id, datetime, max(cloud_fraction), max(nodata_fraction), count(*) "
            "FROM stacchip.chips GROUP BY item_id, datetime ORDER BY item_id"
        ).fetchall()
        source = conn.execute("SELECT sample_source, status FROM stacchip.jobs").fetchall()
    assert [r[0] for r in rows] == sorted(s["id"] for s in summary["scenes"])
    for item_id, when, cloud, nodata, count in rows:
        end = next(i for i in sensor_api.items[MODIS] if i["id"] == item_id)
        assert when.isoformat().replace("+00:00", "Z") == end["properties"]["end_datetime"]
        assert 0 < cloud <= 1 and 0 < nodata <= 0.5 and count > 1
    assert source == [(f"{MODIS} tile h18v05", "succeeded")]


def test_index_past_the_tile_list_is_one_line(database_url, sensor_api, tmp_path):
    line = error_line(ingest(database_url, sensor_api, str(tmp_path), 233, "--dry-run"))
    assert "job index 233 is out of range" in line and "233 sinusoidal tiles" in line


def test_batch_entrypoint_needs_no_sample_source(database_url, sensor_api, s3_server):
    bucket = s3_server.new_bucket("modis-batch")
    result = run_entrypoint(
        "modis",
        {
            "AWS_BATCH_JOB_ARRAY_INDEX": str(JOB),
            "STACCHIP_BUCKET": bucket,
            "STACCHIP_DATABASE_URL": database_url,
            "STACCHIP_STAC_API": sensor_api.url,
        },
    )
    assert result.returncode == 0, result.stderr
    assert f"modis job {JOB}: succeeded, 3/3 scenes stored" in result.stderr
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert sum(k.endswith("stac_item.json") for k in keys) == 3
    assert sum(Path(k).name in {f"{a}.tif" for a in ASSETS} for k in keys) == 3 * len(ASSETS)
