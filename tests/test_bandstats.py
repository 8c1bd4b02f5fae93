"""Band statistics: Chan/Welford merging against numpy, and `stacchip-db stats` end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

from stacchip_db.bandstats import BandStats, merge_all
from stacchip_db.sensors import SENSORS, sensor_for
from tests.conftest import S2_BANDS, error_line, run_cli, store_indexed

CHIP = 64
ALL = "SELECT collection, item_id, chip_size, chip_index_x, chip_index_y FROM stacchip.chips"


def numpy_stats(pixels: np.ndarray, nodata: float) -> list[tuple[int, float, float, float, float]]:
    """(count, mean, std, min, max) per band of `(N, C, H, W)`, the obvious way."""
    out = []
    for c in range(pixels.shape[1]):
        values = pixels[:, c].ravel().astype(np.float64)
        values = values[values != nodata]
        out.append((values.size, values.mean(), values.std(), values.min(), values.max()))
    return out


def test_merged_parts_equal_numpy_on_the_whole() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 10000, size=(12, 3, 16, 16)).astype(np.uint16)
    pixels[rng.random(pixels.shape) < 0.2] = 0  # nodata
    parts = [BandStats.from_pixels(pixels[i : i + 5], ["a", "b", "c"], 0) for i in (0, 5, 10)]
    merged = merge_all(parts)
    assert merged is not None
    for row, (count, mean, std, lo, hi) in zip(merged.rows(), numpy_stats(pixels, 0), strict=True):
        assert row["count"] == count
        assert row["mean"] == pytest.approx(mean, rel=1e-12)
        assert row["std"] == pytest.approx(std, rel=1e-10)
        assert (row["min"], row["max"]) == (lo, hi)


def test_merge_is_stable_where_sum_of_squares_is_not() -> None:
    # values near 1e9 with unit spread: E[x²] - E[x]² loses every digit in float64
    rng = np.random.default_rng(2)
    values = (1e9 + rng.normal(0, 1, size=(40, 1, 10, 10))).astype(np.float64)
    naive = np.sqrt(max(0.0, (values**2).mean() - values.mean() ** 2))
    parts = [BandStats.from_pixels(values[i : i + 1], ["x"], None) for i in range(40)]
    merged = merge_all(parts)
    assert merged is not None
    assert merged.std[0] == pytest.approx(values.std(), rel=1e-6)
    assert abs(naive - values.std()) > 0.1  # what the textbook formula would have given


def test_nodata_values_per_platform() -> None:
    assert sensor_for("sentinel-1-rtc").nodata == -32768
    assert sensor_for("modis-09A1-061").nodata == -28672
    assert sensor_for("sentinel-2-c1-l2a").nodata == 0
    pixels = np.array([[[[-32768, 2], [4, -32768]]]], dtype=np.int16)
    stats = BandStats.from_pixels(pixels, ["vv"], SENSORS["sentinel-1-rtc"].nodata)
    assert stats.rows()[0] == {"band": "vv", "count": 2, "mean": 3.0, "std": 1.0,
                               "min": 2.0, "max": 4.0}  # fmt: skip


def test_stats_of_a_selection_equal_numpy_on_the_exported_pixels(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    store_indexed(database_url, s2_items, chip_size=CHIP)
    out = tmp_path / "cubes"
    result = run_cli(
        ["prechip", "--query", ALL, "--out", str(out), "--cube-size", "32", "--keep-partial"],
        database_url=database_url,
    )
    assert result.exit_code == 0, result.output
    pixels = np.concatenate([np.load(p)["pixels"] for p in sorted(out.rglob("cube_*.npz"))])
    expected = numpy_stats(pixels, 0)

    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    result = run_cli(["stats", "--query", ALL, "--yaml", str(one)], database_url=database_url)
    assert result.exit_code == 0, result.output
    table = result.stdout.splitlines()
    assert table[0].split() == ["platform", "band", "count", "mean", "std", "min", "max"]
    blue = table[1].split()
    assert blue[:3] == ["sentinel-2-l2a", "blue", str(expected[0][0])]
    assert f"{pixels.shape[0]} chips" in result.stdout
    result = run_cli(
        ["stats", "--query", ALL, "--jobs", "2", "--yaml", str(two)], database_url=database_url
    )
    assert result.exit_code == 0, result.output
    cubes_yaml = tmp_path / "cubes.yaml"
    result = run_cli(["stats", "--cubes", str(out), "--yaml", str(cubes_yaml)])
    assert result.exit_code == 0, result.output

    for path in (one, two, cubes_yaml):
        doc = yaml.safe_load(path.read_text())["sentinel-2-l2a"]
        assert doc["band_order"] == list(S2_BANDS)
        assert doc["rgb_indices"] == [2, 1, 0]
        for band, (_, mean, std, _, _) in zip(S2_BANDS, expected, strict=True):
            assert doc["bands"]["mean"][band] == pytest.approx(mean, abs=1e-5), (path, band)
            assert doc["bands"]["std"][band] == pytest.approx(std, abs=1e-5), (path, band)


def test_stats_needs_one_source(database_url: str, tmp_path: Path) -> None:
    result = run_cli(["stats"], database_url=database_url)  # no filters: every chip (none)
    assert result.exit_code == 0, result.output
    assert "0 chips" in result.stdout
    line = error_line(run_cli(["stats", "--cubes", str(tmp_path)]))
    assert "no cube_*.npz" in line
    line = error_line(
        run_cli(["stats", "--cubes", str(tmp_path), "--query", ALL], database_url=database_url)
    )
    assert "either --cubes" in line


def test_stats_over_mixed_chip_sizes(database_url: str, s2_items: list[dict]) -> None:
    small = store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    large = store_indexed(database_url, s2_items[1:], chip_size=2 * CHIP)
    result = run_cli(["stats", "--query", ALL, "--bands", "red"], database_url=database_url)
    assert result.exit_code == 0, result.output
    assert f"{small + large} chips" in result.stdout
    # prechip cannot stack two chip sizes into one cube: it says so
    line = error_line(
        run_cli(["prechip", "--query", ALL, "--out", "unused"], database_url=database_url)
    )
    assert "mixes chip sizes" in line


def test_stats_names_unreadable_chips_and_counts_chips(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    broken = copy.deepcopy(s2_items[1])
    broken["assets"]["nir"]["href"] = str(tmp_path / "gone.tif")
    broken["assets"]["blue"]["href"] = str(tmp_path / "gone-too.tif")  # two assets, one count
    good = store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    failed = store_indexed(database_url, [broken], chip_size=CHIP)
    result = run_cli(["stats", "--query", ALL, "--jobs", "2"], database_url=database_url)
    assert result.exit_code == 3, result.output
    assert f"{good} chips; {failed} chips could not be read and were left out" in result.stdout
    named = [line for line in result.stderr.splitlines() if "cannot read" in line]
    assert len(named) == failed
    assert all(f"chip {broken['id']}-" in line and "gone" in line for line in named), named
