"""Quality rules: per-chip cloud and nodata fractions from real COGs. Pure (no database)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stacchip_db.errors import StacchipError
from stacchip_db.grid import AssetGridError, chip_grid
from stacchip_db.quality import (
    LANDSAT_RULE,
    MODIS_RULE,
    NONE_RULE,
    RULES,
    S2_RULE,
    QualityError,
    QualityRule,
    band_fractions,
    chip_fractions,
    nodata_value_rule,
    read_quality_band,
    register_rule,
    resolve_rule,
)
from stacchip_db.synthetic import (
    LANDSAT_CLEAR,
    LANDSAT_CLOUD,
    LANDSAT_DILATED,
    LANDSAT_FILL,
    LANDSAT_SHADOW,
    item_from_arrays,
    synthesize_item,
)
from tests.conftest import FIXTURES
from tests.footprints import reference_fractions

S2 = "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"
LANDSAT = "landsat-c2l2-sr-LC09_L2SR_086107_20240311_20240312_02_T2_SR.json"
NAIP = "naip_m_4207009_ne_19_060_20211024.json"


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def fractions(item: dict, quality: str | QualityRule, chip_size: int) -> np.ndarray:
    """`(y, x, 2)` array of (cloud, nodata) fractions."""
    grid = chip_grid(item, chip_size=chip_size)
    return np.stack(chip_fractions(grid, item, quality), axis=-1)


def test_sentinel2_scl_at_20m_beside_a_10m_grid(tmp_path: Path):
    # 10 m grid of 3 x 2 chips of 4 px; SCL at 20 m: 2 x 2 SCL pixels per chip.
    scl = np.array(
        [
            [9, 4, 0, 0, 4, 4],
            [4, 4, 0, 1, 3, 8],
            [10, 10, 4, 4, 0, 0],
            [10, 10, 4, 2, 0, 0],
        ],
        dtype=np.uint8,
    )
    item = item_from_arrays("s2", tmp_path, {"scl": (scl, 2)}, shape=(8, 12))
    got = fractions(item, "s2", chip_size=4)
    expected = np.array(
        [
            [[0.25, 0.0], [0.25, 0.75], [0.5, 0.0]],
            [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(got, expected)


def test_integer_factor_not_dividing_the_chip_falls_back_to_upsampling(tmp_path: Path):
    # chip 3 px on the 10 m grid, SCL at 20 m: a chip covers 1.5 SCL pixels.
    scl = np.array([[9, 4, 0], [4, 4, 4], [0, 0, 9]], dtype=np.uint8)
    item = item_from_arrays("s2", tmp_path, {"scl": (scl, 2)}, shape=(6, 6))
    got = fractions(item, "s2", chip_size=3)
    expected = reference_fractions(item, "scl", 3, {1, 3, 8, 9, 10}, {0})
    np.testing.assert_array_equal(got, expected)
    # chip (0, 0) = upsampled rows 0-2, cols 0-2: 4 px of the 9 (top-left SCL pixel) + 2 of 4.
    np.testing.assert_array_equal(got[0, 0], np.float32([4 / 9, 0.0]))


def test_synthetic_sentinel2_scene_matches_the_per_chip_reference(tmp_path: Path):
    item = synthesize_item(load(S2), tmp_path, ["scl"], scale=10)  # 1098 px grid, SCL 549 px
    got = fractions(item, "auto", chip_size=64)
    expected = reference_fractions(item, "scl", 64, {1, 3, 8, 9, 10}, {0})
    assert got.shape == (17, 17, 2)
    np.testing.assert_array_equal(got, expected)
    assert (got[..., 0] > 0).sum() > 10 and (got[..., 1] == 1).sum() > 10  # clouds, empty chips


def test_pair_lookup_fast_path_equals_the_per_pixel_classifier(tmp_path: Path):
    item = synthesize_item(load(S2), tmp_path, ["scl"], scale=5)  # SCL 1098 x 1098
    grid = chip_grid(item, chip_size=128)
    band = read_quality_band(grid, item["assets"]["scl"]["href"], asset="scl")
    assert S2_RULE.pair_lut is not None and band.dtype == np.uint8
    per_pixel = QualityRule("s2-slow", "scl", S2_RULE.classify)
    fast = band_fractions(band, S2_RULE, grid.y_size, grid.x_size)
    slow = band_fractions(band, per_pixel, grid.y_size, grid.x_size)
    np.testing.assert_array_equal(np.stack(fast), np.stack(slow))
    assert np.stack(fast).any()


def test_landsat_qa_pixel_bits(tmp_path: Path):
    cirrus_only = LANDSAT_CLEAR | 0b100  # bit 2 (cirrus) is not a cloud bit here
    qa = np.array(
        [
            [LANDSAT_FILL, LANDSAT_FILL, LANDSAT_CLOUD, LANDSAT_CLEAR],
            [LANDSAT_FILL, LANDSAT_CLEAR, LANDSAT_DILATED, LANDSAT_SHADOW],
            [cirrus_only, cirrus_only, LANDSAT_CLEAR, LANDSAT_CLEAR],
            [cirrus_only, LANDSAT_CLEAR, LANDSAT_CLEAR, LANDSAT_FILL | 0b1000],
        ],
        dtype=np.uint16,
    )
    item = item_from_arrays("ls", tmp_path, {"qa_pixel": (qa, 1)}, shape=(4, 4), crs="EPSG:3031")
    got = fractions(item, "auto", chip_size=2)
    expected = np.array(
        [[[0.0, 0.75], [0.75, 0.0]], [[0.0, 0.0], [0.25, 0.25]]],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(got, expected)


def test_modis_qc_bits_follow_the_original(tmp_path: Path):
    qc = np.array([[0, 1, 2, 3], [3, 3, 1 | 0b100, 0]], dtype=np.uint32)
    item = item_from_arrays("modis", tmp_path, {"sur_refl_qc_500m": (qc, 1)}, shape=(2, 4))
    got = fractions(item, "modis", chip_size=2)
    np.testing.assert_array_equal(got, np.float32([[[0.25, 0.5], [0.25, 0.25]]]))


@pytest.mark.parametrize(
    ("dtype", "value"), [("uint8", 0), ("int16", -9999), ("float32", float("nan"))]
)
def test_nodata_value_rule(tmp_path: Path, dtype: str, value: float):
    band = np.ones((4, 4), dtype=dtype)
    band[:2, :1] = value
    band[2:, 2:] = value
    item = item_from_arrays("linz", tmp_path, {"visual": (band, 1)}, shape=(4, 4))
    got = fractions(item, nodata_value_rule("visual", value), chip_size=2)
    np.testing.assert_array_equal(got, np.float32([[[0, 0.5], [0, 0]], [[0, 0], [0, 1]]]))


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # rasterio's boundless read
def test_quality_band_smaller_than_the_grid_counts_the_gap_as_nodata(tmp_path: Path):
    scl = np.full((3, 4), 4, dtype=np.uint8)  # 20 m, covers 6 of the grid's 8 rows
    item = item_from_arrays("s2", tmp_path, {"scl": (scl, 2)}, shape=(8, 8))
    got = fractions(item, "s2", chip_size=4)
    np.testing.assert_array_equal(got[..., 1], np.float32([[0, 0], [0.5, 0.5]]))


def test_auto_picks_the_rule_from_the_assets():
    assert resolve_rule("auto", load(S2)) is S2_RULE
    assert resolve_rule("auto", load(LANDSAT)) is LANDSAT_RULE
    assert resolve_rule("auto", load(NAIP)) is NONE_RULE
    assert resolve_rule("auto", {"id": "m", "assets": {"sur_refl_qc_500m": {}}}) is MODIS_RULE
    assert set(RULES) >= {"s2", "landsat", "modis", "none"}


def test_none_rule_reads_nothing():
    item = load(NAIP)  # its href points at a bucket no test can reach
    got = fractions(item, "auto", chip_size=1024)
    assert got.shape == (12, 9, 2) and not got.any()


def test_registered_rule_is_usable_by_name(tmp_path: Path):
    rule = register_rule(nodata_value_rule("visual", 0, name="test-linz"))
    try:
        assert resolve_rule("test-linz", {}) is rule
    finally:
        RULES.pop("test-linz")


def test_unknown_rule_is_an_error():
    with pytest.raises(QualityError, match="unknown quality rule 'clouds'; use auto or one of"):
        resolve_rule("clouds", load(S2))


def test_missing_quality_asset_is_an_error():
    item = load(NAIP)
    with pytest.raises(QualityError, match=r"rule .s2. needs asset .scl..*assets: asset"):
        fractions(item, "s2", chip_size=1024)


def test_unreadable_quality_band_is_an_error(tmp_path: Path):
    item = load(S2)
    item["assets"]["scl"]["href"] = str(tmp_path / "missing.tif")
    with pytest.raises(QualityError, match=r"S2A_T20HNJ_20240311T140636_L2A: cannot read asset"):
        fractions(item, "s2", chip_size=256)
    assert issubclass(QualityError, StacchipError)


def test_quality_band_on_another_grid_is_an_error(tmp_path: Path):
    scl = np.zeros((4, 4), dtype=np.uint8)
    item = item_from_arrays("s2", tmp_path, {"scl": (scl, 1)}, shape=(4, 4), origin=(5, 4e6))
    item["properties"]["proj:transform"][2] = 0.0  # grid origin 5 m (half a pixel) away
    with pytest.raises(AssetGridError, match="asset 'scl'"):
        fractions(item, "s2", chip_size=2)


def test_non_integer_band_for_a_lookup_rule_is_an_error(tmp_path: Path):
    band = np.zeros((2, 2), dtype=np.float32)
    item = item_from_arrays("s2", tmp_path, {"scl": (band, 1)}, shape=(2, 2))
    with pytest.raises(QualityError, match="float32, expected integers"):
        fractions(item, "s2", chip_size=2)
