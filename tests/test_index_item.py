"""index_item: an item's chip rows as an Arrow table. Pure (no database)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pystac
import pytest
import rasterio
import shapely

from stacchip_db.errors import StacchipError
from stacchip_db.grid import chip_grid
from stacchip_db.index import CHIP_SCHEMA, index_item, item_datetime
from stacchip_db.synthetic import item_from_arrays, synthesize_item
from tests.conftest import FIXTURES
from tests.footprints import outside_mask

S2 = "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"
LANDSAT = "landsat-c2l2-sr-LC09_L2SR_086107_20240311_20240312_02_T2_SR.json"
NAIP = "naip_m_4207009_ne_19_060_20211024.json"


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def rows(table: pa.Table) -> list[tuple]:
    """(x, y, cloud, nodata) per row."""
    columns = ["chip_index_x", "chip_index_y", "cloud_fraction", "nodata_fraction"]
    return list(zip(*(table[c].to_pylist() for c in columns), strict=True))


@pytest.fixture
def pattern_item(tmp_path: Path) -> dict:
    """3 x 2 chips of 4 px on a 10 m grid, SCL at 20 m (2 x 2 SCL pixels per chip)."""
    scl = np.array(
        [
            [9, 4, 0, 0, 4, 4],
            [4, 4, 0, 1, 3, 8],
            [0, 0, 4, 4, 0, 0],
            [4, 10, 4, 2, 0, 0],
        ],
        dtype=np.uint8,
    )
    return item_from_arrays("pattern", tmp_path, {"scl": (scl, 2)}, shape=(8, 12))


def test_known_pattern_rows_ordering_and_max_nodata(pattern_item: dict):
    table = index_item(pattern_item, chip_size=4)
    assert table.schema == CHIP_SCHEMA
    # (1, 0) is 3/4 nodata and (2, 1) all nodata: dropped (> 0.5); (0, 1) is exactly 0.5: kept.
    assert rows(table) == [
        (0, 0, 0.25, 0.0),
        (2, 0, 0.5, 0.0),
        (0, 1, 0.25, 0.5),
        (1, 1, 0.0, 0.0),
    ]
    everything = index_item(pattern_item, chip_size=4, max_nodata=1.0)
    assert [r[:2] for r in rows(everything)] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert rows(everything)[1] == (1, 0, 0.25, 0.75)
    assert rows(everything)[5] == (2, 1, 0.0, 1.0)
    nothing_missing = index_item(pattern_item, chip_size=4, max_nodata=0.0)
    assert [r[:2] for r in rows(nothing_missing)] == [(0, 0), (2, 0), (1, 1)]


def test_geometry_is_the_chip_footprint_as_wkb(pattern_item: dict):
    table = index_item(pattern_item, chip_size=4, max_nodata=1.0)
    geometries = shapely.from_wkb(table["geometry"].to_pylist())
    grid = chip_grid(pattern_item, chip_size=4)
    assert shapely.equals_exact(geometries, grid.footprints(), tolerance=0).all()
    assert (shapely.get_type_id(geometries) == 3).all()  # Polygon
    assert table.schema.field("geometry").metadata == {b"encoding": b"WKB", b"crs": b"EPSG:4326"}


def test_synthetic_sentinel2_scene(tmp_path: Path):
    item = synthesize_item(load(S2), tmp_path, ["scl", "red"], scale=10)
    table = index_item(item, chip_size=64)
    all_chips = index_item(item, chip_size=64, max_nodata=1.0)
    assert all_chips.num_rows == 17 * 17
    nodata = np.asarray(all_chips["nodata_fraction"])
    assert table.num_rows == int((nodata <= 0.5).sum()) < 17 * 17
    assert np.asarray(table["nodata_fraction"]).max() <= 0.5
    # rows stay ordered by y then x after filtering
    keys = np.asarray(table["chip_index_y"]) * 17 + np.asarray(table["chip_index_x"])
    assert (np.diff(keys) > 0).all()
    # chip (16, 0) sits in the clear top-right corner, chip (0, 16) in the nodata wedge
    assert rows(all_chips)[16] == (16, 0, 0.0, 0.0)
    assert rows(all_chips)[16 * 17] == (0, 16, 0.0, 1.0)


def test_pystac_item_and_proj_code_give_the_same_index(tmp_path: Path):
    data = synthesize_item(load(S2), tmp_path, ["scl"], scale=10)
    assert "proj:epsg" in data["properties"]
    from_dict = index_item(data, chip_size=64)
    with pytest.warns(UserWarning, match="Could not parse bucket"):  # pystac storage migration
        item = pystac.Item.from_dict(data)
    assert item.properties.get("proj:code") == "EPSG:32720"
    assert index_item(item, chip_size=64).equals(from_dict)


def test_landsat_polar_stereographic(tmp_path: Path):
    item = synthesize_item(load(LANDSAT), tmp_path, ["qa_pixel"], scale=10)  # 827 x 833 px
    table = index_item(item, chip_size=64, max_nodata=1.0)
    assert table.num_rows == 12 * 13
    with rasterio.open(item["assets"]["qa_pixel"]["href"]) as src:
        qa = src.read(1)[: 12 * 64, : 13 * 64]
        outside = outside_mask(item, src.transform, qa.shape)  # the scene is turned on its grid
    nodata = ((qa & 1) != 0) | outside
    cloud = ((qa & 0b11010) != 0) & ~outside
    assert outside.mean() > 0.2  # a real part of the grid lies outside the scene

    def per_chip(mask: np.ndarray) -> np.ndarray:
        blocks = mask.reshape(12, 64, 13, 64)
        return blocks.mean(axis=(1, 3), dtype=np.float64).astype(np.float32)

    for column, mask in (("nodata_fraction", nodata), ("cloud_fraction", cloud)):
        np.testing.assert_array_equal(np.asarray(table[column]).reshape(12, 13), per_chip(mask))
    lon, lat = shapely.get_coordinates(shapely.from_wkb(table["geometry"][0].as_py())).T
    assert (lat < -60).all() and (lon > 100).all()


def test_naip_without_quality_band_keeps_every_chip():
    table = index_item(load(NAIP), chip_size=512)  # `none` rule: the href is never opened
    assert table.num_rows == 24 * 18  # floor(12666 / 512) x floor(9704 / 512)
    assert not np.asarray(table["cloud_fraction"]).any()
    assert not np.asarray(table["nodata_fraction"]).any()


def test_synthetic_naip_item_is_a_consistent_cog_item(tmp_path: Path):
    item = synthesize_item(load(NAIP), tmp_path, ["asset"], scale=10, seed=7)
    assert item["properties"]["proj:shape"] == [1266, 970]
    assert item["properties"]["proj:transform"][:6] == [6.0, 0.0, 341338.2, 0.0, -6.0, 4749053.4]
    with rasterio.open(item["assets"]["asset"]["href"]) as src:
        assert (src.count, src.height, src.width) == (4, 1266, 970)
        assert src.crs.to_epsg() == 26919 and src.block_shapes[0] == (512, 512)
        assert src.overviews(1)
        assert tuple(src.transform)[:6] == tuple(item["properties"]["proj:transform"][:6])
        pixels = src.read()
    again = synthesize_item(load(NAIP), tmp_path / "again", ["asset"], scale=10, seed=7)
    with rasterio.open(again["assets"]["asset"]["href"]) as src:
        np.testing.assert_array_equal(src.read(), pixels)  # same seed, same pixels
    table = index_item(item, chip_size=64)
    assert table.num_rows == 19 * 15  # floor(1266 / 64) x floor(970 / 64)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_max_nodata_must_be_a_fraction(pattern_item: dict, value: float):
    with pytest.raises(StacchipError, match="not a fraction between 0 and 1"):
        index_item(pattern_item, chip_size=4, max_nodata=value)


def test_item_datetime():
    assert item_datetime(load(S2)) == datetime(2024, 3, 11, 14, 11, 54, 463000, tzinfo=UTC)
    composite = {"id": "c", "properties": {"datetime": None, "start_datetime": "2024-01-01"}}
    assert item_datetime(composite) == datetime(2024, 1, 1)
    with pytest.raises(StacchipError, match="item x: neither datetime nor start_datetime"):
        item_datetime({"id": "x", "properties": {"datetime": None}})
