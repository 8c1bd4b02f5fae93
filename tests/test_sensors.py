"""Catalog profiles on real items: the quality band each catalog's spelling gives, band order of
exports from each catalog's asset keys, chips clipped to the scene's geometry.

Items are the catalogs' own (tests/data/stac, catalogs/*.ndjson); their rasters are generated
under the asset keys the catalog uses (`SCL`, `B05`, `qa_pixel`, NAIP's 4-band `image`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from affine import Affine

from stacchip_db.grid import chip_grid, outside_footprint
from stacchip_db.index import index_item, quality_used
from stacchip_db.quality import (
    LANDSAT_RULE,
    OUTSIDE_CELLS,
    S2_RULE,
    QualityError,
    chip_fractions,
    choose_rule,
)
from stacchip_db.sensors import profile_for
from stacchip_db.synthetic import synthesize_item
from tests.conftest import FIXTURES
from tests.footprints import catalog_item, catalog_items, outside_mask, reference_fractions

USGS_L2 = "landsat-c2l2-sr-LC09_L2SR_086107_20240311_20240312_02_T2_SR.json"
EDGE_TILE = "S2B_20EPT_20250731_0_L2A"  # Earth Search v0: 1.95 % of its tile has data
PC_S2 = "S2A_MSIL2A_20190101T000001_R116_T58UFE_20201007T214651"
PC_LANDSAT = "LC09_L2SP_084068_20250722_02_T2"
S2_CLOUD, S2_NODATA = {1, 3, 8, 9, 10}, {0}


def landsat_cloud(band: np.ndarray) -> np.ndarray:
    return (band & 0b11010) != 0


def landsat_fill(band: np.ndarray) -> np.ndarray:
    return (band & 1) != 0


def usgs_item() -> dict:
    return json.loads((FIXTURES / USGS_L2).read_text())


def pc_naip_items() -> list[dict]:
    lines = (FIXTURES / "naip-planetary-computer-200.ndjson").read_text().splitlines()
    return [json.loads(line) for line in lines[:3]]


# Every catalog's items: recognised profile and the rule and asset `auto` picks.
CATALOG_CASES = [
    ("planetary-computer-sentinel-2-l2a", "sentinel-2-l2a", "planetary-computer", "s2", "SCL"),
    ("earth-search-v0-sentinel-s2-l2a-cogs", "sentinel-2-l2a", "earth-search-v0", "s2", "SCL"),
    ("earth-search-v1-sentinel-2-l2a", "sentinel-2-l2a", "earth-search-v1", "s2", "scl"),
    ("earth-search-v1-sentinel-2-c1-l2a", "sentinel-2-l2a", "earth-search-v1", "s2", "scl"),
    ("earth-search-v1-landsat-c2-l2", "landsat", "earth-search-v1", "landsat", "qa_pixel"),
    ("planetary-computer-landsat-c2-l2", "landsat", "planetary-computer", "landsat", "qa_pixel"),
]


@pytest.mark.parametrize(("catalog", "sensor", "layout", "rule", "asset"), CATALOG_CASES)
def test_auto_picks_each_catalogs_quality_band(
    catalog: str, sensor: str, layout: str, rule: str, asset: str
) -> None:
    items = catalog_items(catalog)
    assert items
    for item in items:
        profile = profile_for(item)
        assert profile is not None and profile.sensor.name == sensor
        assert layout in profile.layout.catalogs
        choice = choose_rule("auto", item)
        assert (choice.rule.name, choice.rule.asset, choice.found) == (rule, asset, True)
        assert choice.profile == profile.name


def test_auto_on_usgs_naip_and_sentinel1_items() -> None:
    usgs = choose_rule("auto", usgs_item())
    assert (usgs.rule.name, usgs.rule.asset) == ("landsat", "qa_pixel")
    assert "usgs-landsatlook" in usgs.profile
    for naip in pc_naip_items():  # NAIP has no quality band: none, and no warning
        choice = choose_rule("auto", naip)
        assert (choice.rule.name, choice.found, choice.warning) == ("none", True, None)
        assert choice.profile == "naip (planetary-computer)"
    # Earth Search's Sentinel-1 GRD over Antarctica is HH only: the vv band auto wants is absent.
    for grd in catalog_items("earth-search-v1-sentinel-1-grd"):
        choice = choose_rule("auto", grd)
        assert profile_for(grd).sensor.name == "sentinel-1-grd"
        assert choice.rule.name == "none" and not choice.found and "'vv'" in choice.warning
    rtc = {
        "id": "rtc", "collection": "sentinel-1-rtc",
        "assets": {"vv": {"raster:bands": [{"nodata": -32768.0}]}, "vh": {}},
    }  # fmt: skip
    choice = choose_rule("auto", rtc)
    assert (choice.rule.name, choice.rule.asset, choice.rule.fill) == ("sentinel-1", "vv", -32768)


def test_usgs_quality_band_keyed_like_its_file() -> None:
    item = usgs_item()
    item["assets"]["QA_PIXEL.TIF"] = item["assets"].pop("qa_pixel")
    for quality in ("auto", "landsat"):
        rule = choose_rule(quality, item).rule
        assert (rule.name, rule.asset) == ("landsat", "QA_PIXEL.TIF")
        assert rule.classify is LANDSAT_RULE.classify


def test_named_rule_finds_the_catalogs_spelling_and_quality_asset_names_any() -> None:
    pc = catalog_item("planetary-computer-sentinel-2-l2a", PC_S2)
    assert choose_rule("s2", pc).rule.asset == "SCL"  # was: "needs asset 'scl'"
    renamed = copy.deepcopy(pc)
    renamed["assets"]["scene_class"] = renamed["assets"].pop("SCL")
    missing = choose_rule("auto", renamed)
    assert missing.rule.name == "none" and not missing.found
    assert "collection 'sentinel-2-l2a'" in missing.warning and "quality_asset" in missing.warning
    named = choose_rule("auto", renamed, quality_asset="scene_class").rule
    assert (named.name, named.asset) == ("s2", "scene_class")
    assert named.pair_lut is S2_RULE.pair_lut
    unknown = {"id": "x", "collection": "drone", "assets": {"mask": {}}}
    with pytest.raises(QualityError, match="quality_asset 'mask' is given but no rule"):
        choose_rule("auto", unknown, quality_asset="mask")
    assert choose_rule("s2", unknown, quality_asset="mask").rule.asset == "mask"


# -- fractions on generated rasters ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("catalog", "item_id", "asset", "cloud", "nodata"),
    [
        ("planetary-computer-sentinel-2-l2a", PC_S2, "SCL", S2_CLOUD, S2_NODATA),
        ("earth-search-v0-sentinel-s2-l2a-cogs", EDGE_TILE, "SCL", S2_CLOUD, S2_NODATA),
        ("planetary-computer-landsat-c2-l2", PC_LANDSAT, "qa_pixel", landsat_cloud, landsat_fill),
    ],
    ids=["planetary-computer-s2", "earth-search-v0-edge-tile", "planetary-computer-landsat"],
)
def test_auto_fractions_equal_numpy_on_the_generated_band(
    tmp_path: Path, catalog: str, item_id: str, asset: str, cloud, nodata
) -> None:
    item = synthesize_item(catalog_item(catalog, item_id), tmp_path, [asset], scale=10)
    table = index_item(item, chip_size=32, max_nodata=1.0)
    assert quality_used(table)["asset"] == asset
    expected = reference_fractions(item, asset, 32, cloud, nodata)
    got = np.stack(
        [np.asarray(table[c]).reshape(expected.shape[:2]) for c in ("cloud_fraction",
                                                                    "nodata_fraction")],
        axis=-1,
    )
    np.testing.assert_array_equal(got, expected)
    if item_id == EDGE_TILE:  # the sliver misses the synthetic clouds; most chips are outside
        assert (got[..., 1] == 1.0).mean() > 0.9
    else:  # the band was read: its synthetic clouds show
        assert got[..., 0].any()


def _outside_per_chip(item: dict, chip_size: int) -> np.ndarray:
    """Oracle: per-chip share of `OUTSIDE_CELLS`² cell centres outside the geometry."""
    grid = chip_grid(item, chip_size=chip_size)
    cells = min(chip_size, OUTSIDE_CELLS)
    mask = outside_mask(
        item,
        grid.transform @ Affine.scale(chip_size / cells),
        (grid.y_size * cells, grid.x_size * cells),
    )
    return mask.reshape(grid.y_size, cells, grid.x_size, cells).mean(axis=(1, 3))


@pytest.mark.parametrize(
    ("catalog", "item_id"),
    [
        ("earth-search-v0-sentinel-s2-l2a-cogs", EDGE_TILE),
        ("planetary-computer-landsat-c2-l2", PC_LANDSAT),  # no Landsat 7 among the fixtures
    ],
)
def test_chips_outside_the_scene_are_nodata_under_rule_none(catalog: str, item_id: str) -> None:
    item = catalog_item(catalog, item_id)  # rule none: no raster is read
    grid = chip_grid(item)
    cloud, nodata = chip_fractions(grid, item, "none")
    expected = _outside_per_chip(item, grid.chip_size)
    np.testing.assert_allclose(nodata, expected, atol=1e-6)
    assert not cloud.any()
    # Chips whose footprint does not meet the geometry at all are wholly nodata.
    t = grid.transform
    cs = grid.chip_size
    xs, ys = grid.indices()
    left, right = t.c + xs * cs * t.a, t.c + (xs + 1) * cs * t.a
    top, bottom = t.f + ys * cs * t.e, t.f + (ys + 1) * cs * t.e
    boxes = shapely.box(left, bottom, right, top)
    touching = shapely.intersects(boxes, _scene_in_crs(item, grid))
    assert (~touching).sum() > 100 and (nodata.ravel()[~touching] == 1.0).all()
    assert outside_footprint(grid, item) is not None
    kept = index_item(item, quality="none", max_nodata=0.5)
    assert kept.num_rows == int((expected <= 0.5).sum()) < grid.size
    print(f"{item_id}: {kept.num_rows} of {grid.size} chips kept at max_nodata 0.5")


def _scene_in_crs(item: dict, grid) -> shapely.Geometry:
    import pyproj
    from shapely.geometry import shape

    to_crs = pyproj.Transformer.from_crs(4326, grid.crs, always_xy=True)
    return shapely.transform(
        shape(item["geometry"]), lambda xy: np.column_stack(to_crs.transform(xy[:, 0], xy[:, 1]))
    )
