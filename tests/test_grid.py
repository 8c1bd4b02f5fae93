"""Chip grid: shape/transform/CRS lookup, footprints, windows, errors. Pure (no database)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pyproj
import pystac
import pytest
import shapely
from affine import Affine
from rasterio.windows import Window

from stacchip_db.errors import StacchipError
from stacchip_db.grid import (
    CRS_KEYS,
    AssetGridError,
    ChipSizeError,
    CRSUnitError,
    GridError,
    NoCRSError,
    NoGeoreferenceError,
    asset_transform,
    chip_grid,
    item_crs,
)
from tests.conftest import FIXTURES

S2 = "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"
LANDSAT = "landsat-c2l2-sr-LC09_L2SR_086107_20240311_20240312_02_T2_SR.json"
NAIP = "naip_m_4207009_ne_19_060_20211024.json"
SMALL = "stacchip_test_item.json"


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def without_crs(item: dict) -> dict:
    item = copy.deepcopy(item)
    for fields in [item["properties"], *item["assets"].values()]:
        for key in CRS_KEYS:
            fields.pop(key, None)
    return item


def project(geometry: shapely.Geometry, transformer: pyproj.Transformer) -> shapely.Geometry:
    return shapely.transform(geometry, transformer.transform, interleaved=False)


def reference_footprints(item: dict, chip_size: int, epsg_or_crs: object) -> np.ndarray:
    """Footprints the slow, obvious way: per chip, its box through its own transformer."""
    grid = chip_grid(item, chip_size=chip_size)
    transform = Affine(*item["properties"].get("proj:transform", [0] * 6)[:6])
    if transform.is_degenerate:
        transform = grid.transform
    to_wgs84 = pyproj.Transformer.from_crs(epsg_or_crs, "EPSG:4326", always_xy=True)
    polygons = []
    for y in range(grid.y_size):
        for x in range(grid.x_size):
            left, top = transform @ (x * chip_size, y * chip_size)
            right, bottom = transform @ ((x + 1) * chip_size, (y + 1) * chip_size)
            native = shapely.box(left, bottom, right, top)
            polygons.append(project(native, to_wgs84))
    return np.array(polygons, dtype=object)


def test_sentinel2_grid_comes_from_the_finest_asset():
    grid = chip_grid(load(S2))
    assert grid.shape == (10980, 10980)
    assert tuple(grid.transform)[:6] == (10, 0, 499980, 0, -10, 6400000)
    assert grid.crs.to_epsg() == 32720
    assert (grid.x_size, grid.y_size, grid.size) == (42, 42, 1764)


def test_item_level_shape_and_transform_win():
    grid = chip_grid(load(LANDSAT))
    assert grid.shape == (8271, 8331)
    assert grid.crs.to_epsg() == 3031
    assert (grid.x_size, grid.y_size) == (32, 32)  # floor(8331/256), floor(8271/256)
    naip = chip_grid(load(NAIP))
    assert naip.shape == (12666, 9704)
    assert (naip.x_size, naip.y_size) == (37, 49)


def test_explicit_shape_replaces_the_metadata_shape():
    grid = chip_grid(load(SMALL), shape=(600, 700), chip_size=100)
    assert (grid.x_size, grid.y_size) == (7, 6)


@pytest.mark.filterwarnings("ignore:Could not parse bucket")  # pystac's storage migration
def test_pystac_item_with_migrated_proj_code_gives_the_same_grid():
    data = load(S2)
    item = pystac.Item.from_dict(copy.deepcopy(data))
    assert "proj:epsg" not in item.properties  # pystac >= 1.12 migrates it ...
    assert item.properties["proj:code"] == "EPSG:32720"  # ... to proj:code
    from_pystac, from_dict = chip_grid(item), chip_grid(data)
    assert from_pystac == from_dict


@pytest.mark.parametrize("key", CRS_KEYS)
def test_crs_from_each_projection_field(key: str):
    naip = load(NAIP)
    item = without_crs(naip)
    item["properties"][key] = {
        "proj:code": "EPSG:26919",
        "proj:epsg": 26919,
        "proj:wkt2": naip["properties"]["proj:wkt2"],
        "proj:projjson": naip["properties"]["proj:projjson"],
    }[key]
    crs = item_crs(item)
    assert crs.equals(pyproj.CRS.from_epsg(26919), ignore_axis_order=True)


def test_crs_found_on_an_asset_only():
    item = without_crs(load(S2))
    item["assets"]["scl"]["proj:code"] = "EPSG:32720"
    assert chip_grid(item).crs.to_epsg() == 32720


def test_chip_indices_are_ordered_by_y_then_x():
    grid = chip_grid(load(SMALL), chip_size=256)  # 800 x 1000 px -> 3 x 3 chips
    xs, ys = grid.indices()
    assert xs.dtype == np.int32 and ys.dtype == np.int32
    assert list(zip(xs.tolist(), ys.tolist(), strict=True)) == [
        (0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "chip_size", "epsg"), [(SMALL, 256, 26919), (NAIP, 1024, 26919), (LANDSAT, 512, 3031)]
)
def test_footprints_match_an_independent_per_chip_transform(name, chip_size, epsg):
    item = load(name)
    grid = chip_grid(item, chip_size=chip_size)
    ours = grid.footprints()
    expected = reference_footprints(item, chip_size, f"EPSG:{epsg}")
    assert len(ours) == grid.size == len(expected)
    assert shapely.equals_exact(ours, expected, tolerance=1e-9).all()  # same vertex order too
    assert shapely.is_ccw(shapely.get_exterior_ring(ours)).all()
    assert shapely.from_wkb(grid.footprints_wkb()).tolist() == ours.tolist()


def test_sentinel2_footprints_use_the_10m_grid_from_the_finest_asset():
    item = load(S2)
    grid = chip_grid(item)
    first, last = grid.footprints(np.array([0, grid.size - 1]))
    to_wgs84 = pyproj.Transformer.from_crs("EPSG:32720", "EPSG:4326", always_xy=True)
    # chip (0, 0): x 499980..502540, y 6397440..6400000 (256 px of 10 m)
    expected = project(shapely.box(499980, 6397440, 502540, 6400000), to_wgs84)
    assert shapely.equals_exact(first, expected, tolerance=1e-9)
    # chip (41, 41) ends at pixel 10752: x 607500, y 6292480
    expected = project(shapely.box(604940, 6292480, 607500, 6295040), to_wgs84)
    assert shapely.equals_exact(last, expected, tolerance=1e-9)


def test_windows_for_10m_20m_and_60m_assets():
    item = load(S2)
    grid = chip_grid(item)
    assert grid.window(3, 2) == Window(768, 512, 256, 256)
    scl = asset_transform(item, "scl")
    assert grid.alignment(scl) == (2, 2, 0, 0)
    assert grid.window(3, 2, scl) == Window(384, 256, 128, 128)
    assert grid.grid_window(scl) == Window(0, 0, 5376, 5376)
    coastal = asset_transform(item, "coastal")  # 60 m: 256 / 6 is not whole
    window = grid.window(3, 2, coastal)
    assert window.col_off == pytest.approx(768 / 6) and window.width == pytest.approx(256 / 6)


@pytest.mark.parametrize(
    ("transform", "why"),
    [
        ((20, 0, 499985, 0, -20, 6400000), "origin off the pixel lattice"),
        ((15, 0, 499980, 0, -15, 6400000), "factor 1.5"),
        ((5, 0, 499980, 0, -5, 6400000), "finer than the grid"),
        ((20, 1, 499980, 0, -20, 6400000), "rotated"),
    ],
)
def test_window_rejects_assets_that_are_not_integer_multiples(transform, why):
    grid = chip_grid(load(S2))
    with pytest.raises(AssetGridError, match="S2A_T20HNJ_20240311T140636_L2A: asset 'odd'"):
        grid.window(0, 0, Affine(*transform), asset="asset 'odd'")


def test_window_outside_the_grid_is_an_error():
    grid = chip_grid(load(SMALL))
    with pytest.raises(ChipSizeError, match="outside the 3 x 3 chip grid"):
        grid.window(3, 0)


def test_no_crs_is_an_error_naming_the_item():
    with pytest.raises(NoCRSError, match=r"item S2A_T20HNJ_20240311T140636_L2A: no CRS.*proj:code"):
        chip_grid(without_crs(load(S2)))


@pytest.mark.parametrize("crs", ["EPSG:4326", "EPSG:2263"])  # degrees; US survey feet
def test_crs_not_in_metres_is_an_error(crs: str):
    item = without_crs(load(SMALL))
    item["properties"]["proj:code"] = crs
    with pytest.raises(CRSUnitError, match=r"m_4207009_ne_19_060_20211024.*metres"):
        chip_grid(item)


def test_unparseable_crs_is_an_error():
    item = without_crs(load(SMALL))
    item["properties"]["proj:code"] = "EPSG:not-a-code"
    with pytest.raises(NoCRSError, match="not a CRS pyproj understands"):
        chip_grid(item)


@pytest.mark.parametrize("key", ["proj:shape", "proj:transform"])
def test_missing_shape_or_transform_is_an_error(key: str):
    item = load(LANDSAT)
    del item["properties"][key]
    with pytest.raises(NoGeoreferenceError, match=f"LC09_L2SR_086107.*no {key}"):
        chip_grid(item)


def test_missing_shape_can_be_supplied():
    item = load(LANDSAT)
    del item["properties"]["proj:shape"]
    assert chip_grid(item, shape=(8271, 8331)).shape == (8271, 8331)


def test_chip_larger_than_the_scene_is_an_error():
    with pytest.raises(ChipSizeError, match=r"chip size 801 px is larger .*800 x 1000.*800"):
        chip_grid(load(SMALL), chip_size=801)


@pytest.mark.parametrize("size", [0, -256, 2.5, True])
def test_chip_size_must_be_a_positive_integer(size):
    with pytest.raises(ChipSizeError, match="not a positive whole number"):
        chip_grid(load(SMALL), chip_size=size)


def test_errors_are_one_family():
    for error in (NoCRSError, CRSUnitError, NoGeoreferenceError, AssetGridError, ChipSizeError):
        assert issubclass(error, GridError) and issubclass(error, StacchipError)


@pytest.mark.parametrize(
    ("name", "chip_size", "flip"),
    [
        (SMALL, 256, None),
        (NAIP, 512, None),
        (LANDSAT, 512, None),
        (S2, 256, None),
        (NAIP, 1024, "south-up"),  # clockwise lattice: rings reversed
        (NAIP, 1024, "mirrored"),
    ],
)
def test_footprints_wkb_is_byte_identical_to_shapely(name, chip_size, flip):
    item = load(name)
    if flip is not None:
        a, b, c, d, e, f = item["properties"]["proj:transform"][:6]
        south_up, mirrored = [a, b, c, d, -e, f - e * 20000], [-a, b, c + a * 20000, d, e, f]
        item["properties"]["proj:transform"] = south_up if flip == "south-up" else mirrored
    grid = chip_grid(item, chip_size=chip_size)
    subsets = (np.arange(0, grid.size, 3), np.array([grid.size - 1, 0]), np.array([], int))
    for chips in (None, *subsets):
        ours = grid.footprints_wkb(chips)
        expected = shapely.to_wkb(grid.footprints(chips), byte_order=1)  # little-endian WKB
        assert ours.dtype == object and ours.shape == expected.shape
        assert all(type(w) is bytes and len(w) == 93 for w in ours)
        assert ours.tolist() == expected.tolist()
    ours = grid.footprints_wkb()
    assert shapely.is_ccw(shapely.get_exterior_ring(shapely.from_wkb(ours))).all()
