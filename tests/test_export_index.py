"""`stacchip-db export-index`: the original stacchip's GeoParquet layout, read with geopandas."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely

from stacchip_db.db import connect
from stacchip_db.db.store import store_item
from stacchip_db.export import export_index, index_path
from stacchip_db.index import index_item
from stacchip_db.paths import UnsafeName
from stacchip_db.synthetic import synthesize_item
from tests.conftest import error_line, run_cli

S2 = "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"
NAIP_200 = "naip-planetary-computer-200.ndjson"


def test_export_round_trip_with_geopandas(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    item = json.loads((fixtures_dir / S2).read_text())
    item = synthesize_item(item, tmp_path / "cogs", ["scl"], scale=10)
    chips = index_item(item, chip_size=64)
    with connect(database_url) as conn:
        store_item(conn, item, chips, chip_size=64)
        store_item(conn, item, index_item(item, chip_size=128), chip_size=128)  # not exported
    out = tmp_path / "export"
    result = run_cli(["export-index", "--chip-size", "64", str(out)], database_url=database_url)
    assert result.exit_code == 0, result.output
    assert f"exported {chips.num_rows:,} chips of 1 item to" in result.stdout
    assert result.output.count("exported") == 1, result.output  # the summary once, not twice
    path = out / item["collection"] / item["id"] / f"index_{item['id']}.parquet"
    assert sorted(p.relative_to(out) for p in out.rglob("*.parquet")) == [path.relative_to(out)]

    frame = gpd.read_parquet(path)
    assert list(frame.columns) == [
        "chipid", "date", "chip_index_x", "chip_index_y", "cloud_cover_percentage",
        "nodata_percentage", "geometry",
    ]
    assert frame.crs.to_epsg() == 4326
    expected = chips.to_pydict()
    assert frame["chip_index_x"].tolist() == expected["chip_index_x"]
    assert frame["chip_index_y"].tolist() == expected["chip_index_y"]
    assert frame["chipid"].tolist() == [
        f"{item['id']}-{x}-{y}"
        for x, y in zip(expected["chip_index_x"], expected["chip_index_y"], strict=True)
    ]
    np.testing.assert_array_equal(
        frame["cloud_cover_percentage"].to_numpy(),
        np.array(expected["cloud_fraction"], np.float32),
    )
    np.testing.assert_array_equal(
        frame["nodata_percentage"].to_numpy(), np.array(expected["nodata_fraction"], np.float32)
    )
    assert shapely.equals(
        frame.geometry.values, shapely.from_wkb(expected["geometry"])
    ).all()
    assert set(frame["date"]) == {date(2024, 3, 11)}

    # The original's column types: uint16 indices, float32 fractions, a date, string ids.
    schema = pq.read_schema(path)
    assert str(schema.field("chip_index_x").type) == "uint16"
    assert str(schema.field("cloud_cover_percentage").type) == "float"
    assert str(schema.field("date").type) == "date32[day]"
    assert str(schema.field("chipid").type) == "string"
    geo = json.loads(schema.metadata[b"geo"])
    assert geo["columns"]["geometry"]["encoding"] == "WKB"


def test_export_filters_by_collection(
    database_url: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    lines = (fixtures_dir / NAIP_200).read_text().splitlines()[:3]
    items = [json.loads(line) for line in lines]
    items[2]["collection"] = "other"
    with connect(database_url) as conn:
        for item in items:
            store_item(conn, item, index_item(item, quality="none", chip_size=1024), chip_size=1024)
        result = export_index(conn, tmp_path / "a", collections=["naip"], chip_size=1024)
    assert result.files == 2
    assert sorted(p.name for p in (tmp_path / "a" / "naip").iterdir()) == sorted(
        i["id"] for i in items[:2]
    )
    assert not (tmp_path / "a" / "other").exists()
    cli = run_cli(
        ["export-index", "--collection", "other", "--chip-size", "1024", str(tmp_path / "b")],
        database_url=database_url,
    )
    assert cli.exit_code == 0, cli.output
    frame = gpd.read_parquet(index_path(tmp_path / "b", "other", items[2]["id"]))
    assert len(frame) == index_item(items[2], quality="none", chip_size=1024).num_rows


def test_unsafe_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeName, match=r"item id '\.\./x'"):
        index_path(tmp_path, "naip", "../x")


def test_export_into_a_file_is_one_line(database_url: str, fixtures_dir: Path,
                                        tmp_path: Path) -> None:
    item = json.loads((fixtures_dir / NAIP_200).read_text().splitlines()[0])
    with connect(database_url) as conn:
        store_item(conn, item, index_item(item, quality="none", chip_size=2048), chip_size=2048)
    blocker = tmp_path / "naip"
    blocker.write_text("a file where a folder should go")
    result = run_cli(["export-index", "--chip-size", "2048", str(tmp_path)],
                     database_url=database_url)
    assert "cannot write" in error_line(result)
