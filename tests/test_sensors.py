"""Catalog profiles on real items: the quality band each catalog's spelling gives, band order of
exports from each catalog's asset keys, chips clipped to the scene's geometry.

Items are the catalogs' own (tests/data/stac, catalogs/*.ndjson); their rasters are generated
under the asset keys the catalog uses (`SCL`, `B05`, `qa_pixel`, NAIP's 4-band `image`).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from affine import Affine

from stacchip_db.grid import chip_grid, outside_footprint
from stacchip_db.index import index_item, quality_used
from stacchip_db.quality import (
    LANDSAT_RULE,
    OUTSIDE_CELLS,
    S2_RULE,
    NoQualityBandWarning,
    QualityError,
    chip_fractions,
    choose_rule,
)
from stacchip_db.reader import plan_reads, read_item_chips
from stacchip_db.sensors import SENSORS, BandError, find_asset, profile_for, sensor_for
from stacchip_db.synthetic import synthesize_item
from tests.conftest import FIXTURES, run_cli
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
    with pytest.raises(QualityError, match="`quality_asset` 'mask' is given but no rule"):
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


# -- exports in the platform's band order, from each catalog's keys ----------------------------

PC_KEYS = dict(
    blue="B02", green="B03", red="B04", rededge1="B05", rededge2="B06", rededge3="B07",
    nir="B08", nir08="B8A", swir16="B11", swir22="B12",
)  # fmt: skip
"""How Planetary Computer and Earth Search v0 key Sentinel-2's bands (written out by hand)."""

EXPORT_CASES = [
    ("planetary-computer-sentinel-2-l2a", PC_S2, "sentinel-2-l2a", PC_KEYS),
    ("earth-search-v0-sentinel-s2-l2a-cogs", EDGE_TILE, "sentinel-2-l2a", PC_KEYS),
    (
        "earth-search-v1-sentinel-2-c1-l2a", "S2B_T24MUA_20250731T130245_L2A", "sentinel-2-l2a",
        {b: b for b in PC_KEYS},
    ),
    (
        "planetary-computer-landsat-c2-l2", PC_LANDSAT, "landsat",
        {b: b for b in ("red", "green", "blue", "nir08", "swir16", "swir22")},
    ),
]  # fmt: skip


def _expected_chip(href: str, band: int, grid, x: int, y: int) -> np.ndarray:
    """Chip (x, y) straight from the file, repeated up to the finest grid when coarser."""
    with rasterio.open(href) as src:
        factor = round(src.transform.a / grid.transform.a)
        size = grid.chip_size // factor
        data = src.read(band)[y * size : (y + 1) * size, x * size : (x + 1) * size]
    return np.repeat(np.repeat(data, factor, axis=0), factor, axis=1)


@pytest.mark.parametrize(("catalog", "item_id", "sensor", "keys"), EXPORT_CASES)
def test_exports_read_each_catalogs_keys_in_the_platforms_band_order(
    tmp_path: Path, catalog: str, item_id: str, sensor: str, keys: dict[str, str]
) -> None:
    raw = catalog_item(catalog, item_id)
    item = synthesize_item(raw, tmp_path, sorted(set(keys.values())), scale=20)
    bands = SENSORS[sensor].bands
    assert sensor_for(raw["collection"]).name == sensor
    grid = chip_grid(item, chip_size=32)
    chips = [(0, 0), (grid.x_size - 1, grid.y_size - 1)]
    got = read_item_chips(item, chips, bands, chip_size=32)
    assert got.ok.all() and got.pixels.shape == (2, len(bands), 32, 32)
    for position, band in enumerate(bands):
        href = item["assets"][keys[band]]["href"]
        for n, (x, y) in enumerate(chips):
            np.testing.assert_array_equal(
                got.pixels[n, position], _expected_chip(href, 1, grid, x, y), err_msg=band
            )


def test_naip_image_bands_from_planetary_computers_eo_bands(tmp_path: Path) -> None:
    raw = pc_naip_items()[0]
    item = synthesize_item(raw, tmp_path, ["image"], scale=20)
    reads = plan_reads(item, SENSORS["naip"].bands)
    assert [(r.asset, r.indexes) for r in reads] == [("image", (1, 2, 3, 4))]
    grid = chip_grid(item, chip_size=32)
    got = read_item_chips(item, [(1, 1)], SENSORS["naip"].bands, chip_size=32)
    for i in range(4):
        expected = _expected_chip(item["assets"]["image"]["href"], i + 1, grid, 1, 1)
        np.testing.assert_array_equal(got.pixels[0, i], expected)


def test_find_asset_matches_case_and_file_extension() -> None:
    assets = {"QA_PIXEL.TIF": {}, "SCL": {}, "red": {}}
    assert find_asset(assets, "qa_pixel") == "QA_PIXEL.TIF"
    assert find_asset(assets, "scl") == "SCL" and find_asset(assets, "red") == "red"
    assert find_asset(assets, "nir") is None


# -- the index command: rule per collection, warning once, --quality-asset -------------------


def _write_ndjson(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_index_reports_rules_per_collection_and_warns_once(
    database_url: str, tmp_path: Path
) -> None:
    pc = synthesize_item(catalog_item("planetary-computer-sentinel-2-l2a", PC_S2),
                         tmp_path / "pc", ["SCL"], scale=10)  # fmt: skip
    drones = []
    for n in range(2):  # a layout no catalog profile knows: S2 bands under other names
        drone = copy.deepcopy(pc)
        drone["id"], drone["collection"] = f"drone-{n}", "drone-survey"
        drone["assets"] = {"mask": drone["assets"]["SCL"], "band-1": drone["assets"]["B02"]}
        drones.append(drone)
    path = _write_ndjson(tmp_path / "items.ndjson", [pc, *drones])
    result = run_cli(["index", "--chip-size", "64", "--json", str(path)],
                     database_url=database_url)  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["quality"] == [
        {"collection": "drone-survey", "rule": "none", "asset": None, "profile": None, "items": 2},
        {"collection": "sentinel-2-l2a", "rule": "s2", "asset": "SCL",
         "profile": "sentinel-2-l2a (planetary-computer/earth-search-v0)", "items": 1},
    ]  # fmt: skip
    warned = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warned) == 1 and "collection 'drone-survey'" in warned[0]
    assert "--quality-asset" in warned[0] and summary["warnings"] == [warned[0][9:]]
    # The text summary says the same, one line per collection and rule.
    text = run_cli(["index", "--chip-size", "64", str(path)], database_url=database_url)
    assert "sentinel-2-l2a: quality s2 on asset SCL" in text.stdout
    assert "drone-survey: quality none, 2 items" in text.stdout
    # Naming the band: the rule must be named too, since no profile says what `mask` holds.
    bad = run_cli(["index", "--chip-size", "64", "--quality-asset", "mask", str(path)],
                  database_url=database_url)  # fmt: skip
    assert bad.exit_code == 1 and "--quality-asset 'mask' is given but no rule" in bad.stderr
    named = run_cli(
        ["index", "--chip-size", "64", "--quality", "s2", "--quality-asset", "mask", "--json",
         str(_write_ndjson(tmp_path / "drones.ndjson", drones))],
        database_url=database_url,
    )  # fmt: skip
    assert named.exit_code == 0, named.output
    rows = json.loads(named.stdout)["quality"]
    assert [(r["rule"], r["asset"], r["items"]) for r in rows] == [("s2", "mask", 2)]
    assert "Warning" not in named.stderr


def test_index_item_warns_for_an_unknown_layout() -> None:
    item = catalog_item("planetary-computer-sentinel-2-l2a", PC_S2)
    item["assets"]["scene"] = item["assets"].pop("SCL")
    item["collection"] = "my-copy"
    with pytest.warns(NoQualityBandWarning, match="collection 'my-copy'.*keeps it in 'SCL'"):
        table = index_item(item, chip_size=512)
    profile = "sentinel-2-l2a (planetary-computer/earth-search-v0)"  # known by its band keys
    assert quality_used(table) == {"rule": "none", "asset": None, "profile": profile,
                                   "found": False}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known layout does not warn
        assert quality_used(index_item(pc_naip_items()[0], chip_size=512))["found"]


def test_prechip_and_stats_on_planetary_computer_items_with_no_flags(
    database_url: str, tmp_path: Path
) -> None:
    item = synthesize_item(catalog_item("planetary-computer-sentinel-2-l2a", PC_S2), tmp_path,
                           ["SCL", *PC_KEYS.values()], scale=20)  # fmt: skip
    path = _write_ndjson(tmp_path / "items.ndjson", [item])
    assert run_cli(["index", "--chip-size", "32", str(path)],
                   database_url=database_url).exit_code == 0  # fmt: skip
    query = "SELECT * FROM stacchip.chips ORDER BY chip_index_y, chip_index_x LIMIT 4"
    out = tmp_path / "cubes"
    result = run_cli(["prechip", "--query", query, "--out", str(out), "--cube-size", "4"],
                     database_url=database_url)  # fmt: skip
    assert result.exit_code == 0, result.output
    cube = np.load(out / "sentinel-2-l2a" / "cube_0.npz")
    rows = pq.read_table(out / "sentinel-2-l2a" / "manifest.parquet").to_pylist()
    grid = chip_grid(item, chip_size=32)
    for row in rows:
        x, y = row["chip_index_x"], row["chip_index_y"]
        for position, band in enumerate(SENSORS["sentinel-2-l2a"].bands):
            expected = _expected_chip(item["assets"][PC_KEYS[band]]["href"], 1, grid, x, y)
            np.testing.assert_array_equal(cube["pixels"][row["row"], position], expected)
    stats = run_cli(["stats", "--query", query], database_url=database_url)
    assert stats.exit_code == 0, stats.output
    assert "rededge1" in stats.stdout and "swir22" in stats.stdout


def test_unknown_band_names_the_item_and_its_assets() -> None:
    item = catalog_item("earth-search-v0-sentinel-s2-l2a-cogs", EDGE_TILE)
    with pytest.raises(BandError, match="no asset or named band for thermal") as info:
        plan_reads(item, ["red", "thermal"])
    assert EDGE_TILE in str(info.value) and "B03" in str(info.value)  # lists what it has
    assert plan_reads(item, ["red"])[0].asset == "B04"  # was: "no asset or named band for red"
