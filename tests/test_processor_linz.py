"""`stacchip-db ingest linz`: tiles listed in an S3 bucket (loopback), resampled to 0.3 m."""

from __future__ import annotations

import json
import random

import boto3
import numpy as np
import psycopg
import pytest
import rasterio
from affine import Affine
from conftest import error_line, run_cli
from test_batch import run_entrypoint

from stacchip_db.processors.linz import NZ_PREFIXES, choose_tiles, sample_size
from stacchip_db.synthetic import scene_masks

TILES = 12  # half is 6, at least 10: 10 of 12 are taken
SHAPE = (140, 130)  # px at 0.6 m -> 280 x 260 px at 0.3 m
CHIP = 64
NZTM = "EPSG:2193"


def tile_pixels(number: int) -> np.ndarray:
    """RGBA uint8: band 1 is 0 in the wedge of `scene_masks` (the nodata the rule counts)."""
    rng = np.random.default_rng(number)
    data = rng.integers(20, 250, size=(4, *SHAPE), dtype=np.uint8)
    data[3] = 255
    data[0][scene_masks(SHAPE)["nodata"]] = 0
    return data


@pytest.fixture
def linz_bucket(s3_server, tmp_path):
    """A bucket laid out like nz-imagery: tiffs with their item JSON beside them."""
    bucket = s3_server.new_bucket("nz-imagery")
    s3 = boto3.client("s3")
    prefix = NZ_PREFIXES[0]
    for number in range(TILES):
        name = f"BA32_1000_{number:04d}"
        left, top = 1750000.0 + number * 100, 5920000.0
        path = tmp_path / f"{name}.tiff"
        with rasterio.open(
            path, "w", driver="GTiff", width=SHAPE[1], height=SHAPE[0], count=4, dtype="uint8",
            crs=NZTM, transform=Affine(0.6, 0, left, 0, -0.6, top), photometric="RGB",
            alpha="YES",
        ) as dst:  # fmt: skip
            dst.write(tile_pixels(number))
        s3.upload_file(str(path), bucket, f"{prefix}{name}.tiff")
        item = {
            "type": "Feature",
            "stac_version": "1.0.0",
            "id": name,
            "collection": "01HQRJ4N9DJBJP9FGZMTFHE6XN",
            "geometry": None,
            "properties": {
                "datetime": None,
                "start_datetime": f"2022-0{1 + number % 9}-15T11:00:00Z",
                "end_datetime": "2022-12-20T11:00:00Z",
            },
            "links": [{"rel": "collection", "href": "./collection.json"}],
            "assets": {
                "visual": {
                    "href": f"./{name}.tiff",
                    "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                }
            },
        }
        s3.put_object(Bucket=bucket, Key=f"{prefix}{name}.json", Body=json.dumps(item))
    s3.put_object(Bucket=bucket, Key=f"{prefix}collection.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key=f"{NZ_PREFIXES[1]}other.tiff", Body=b"not ours")
    return bucket


def ingest(database_url, bucket, target, index, *extra):
    args = ["ingest", "linz", "--index", str(index), "--target", target]
    args += ["--stac-api", f"s3://{bucket}", "--chip-size", str(CHIP), "--json", *extra]
    return run_cli(args, database_url=database_url)


def test_sample_size_rules():
    assert [sample_size(n) for n in (0, 4, 12, 30, 5000)] == [0, 4, 10, 15, 2000]
    keys = [f"k{i:02d}" for i in range(30)]
    assert choose_tiles(keys) == choose_tiles(list(reversed(keys)))
    assert choose_tiles(keys) == random.Random(42).sample(sorted(keys), 15)


def test_ingest_resamples_drops_alpha_and_indexes(database_url, linz_bucket, tmp_path):
    target = tmp_path / "target"
    result = ingest(database_url, linz_bucket, str(target), 0)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert f"linz job 0: succeeded, 10/{sample_size(TILES)} scenes stored" in result.stderr
    keys = sorted(f"s3://{linz_bucket}/{NZ_PREFIXES[0]}BA32_1000_{n:04d}.tiff" for n in range(12))
    chosen = [k.rsplit("/", 1)[1].removesuffix(".tiff") for k in choose_tiles(keys)]
    assert [s["id"] for s in summary["scenes"]] == chosen

    for scene in summary["scenes"]:
        folder = target / "linz" / scene["id"]
        item = json.loads((folder / "stac_item.json").read_text())
        number = int(scene["id"][-4:])
        assert item["properties"]["datetime"] == f"2022-0{1 + number % 9}-15T11:00:00Z"
        assert item["collection"] == "linz" and list(item["assets"]) == ["visual"]
        assert item["properties"]["proj:shape"] == [2 * SHAPE[0], 2 * SHAPE[1]]
        assert item["properties"]["proj:transform"][0] == pytest.approx(0.3)
        with rasterio.open(item["assets"]["visual"]["href"]) as tile:
            assert tile.count == 3 and tile.res == pytest.approx((0.3, 0.3))
            assert tile.compression.name == "deflate"
            assert tile.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT item_id, max(nodata_fraction), max(cloud_fraction), count(*) "
            "FROM stacchip.chips GROUP BY item_id"
        ).fetchall()
        items = conn.execute("SELECT count(*) FROM pgstac.items").fetchone()[0]
        job = conn.execute("SELECT sample_source, status FROM stacchip.jobs").fetchall()
    assert items == 10 and len(rows) == 10
    for _, nodata, cloud, count in rows:
        # 4 x 4 chips of 64 px; the wedge's bottom-left chips are mostly 0 and dropped.
        assert 0 < nodata <= 0.5 and cloud == 0 and 0 < count < 16
    assert job == [(f"s3://{linz_bucket}/{NZ_PREFIXES[0]}", "succeeded")]

    again = ingest(database_url, linz_bucket, str(target), 0)
    assert again.exit_code == 0, again.output
    assert all(s["skipped_objects"] == 1 for s in json.loads(again.stdout)["scenes"])


def test_prefix_option_and_range(database_url, linz_bucket, tmp_path):
    result = ingest(
        database_url, linz_bucket, str(tmp_path), 1, "--prefix", "x/", "--prefix",
        NZ_PREFIXES[0], "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["scenes"]) == 10
    line = error_line(ingest(database_url, linz_bucket, str(tmp_path), 39, "--dry-run"))
    assert "job index 39 is out of range: there are 39 LINZ prefixes" in line


def test_batch_entrypoint_needs_no_sample_source(database_url, linz_bucket, s3_server):
    bucket = s3_server.new_bucket("linz-batch")
    result = run_entrypoint(
        "linz",
        {
            "AWS_BATCH_JOB_ARRAY_INDEX": "0",
            "STACCHIP_BUCKET": bucket,
            "STACCHIP_DATABASE_URL": database_url,
            "STACCHIP_STAC_API": f"s3://{linz_bucket}",
        },
    )
    assert result.returncode == 0, result.stderr
    assert "linz job 0: succeeded, 10/10 scenes stored" in result.stderr
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert sum(k.startswith("linz/") and k.endswith(".tiff") for k in keys) == 10
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM pgstac.items").fetchone()[0] == 10
