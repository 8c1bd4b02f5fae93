"""reader: band lookup per platform, chip windows at every resolution, failures, lanes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from stacchip_db.read_engine import DatasetCache
from stacchip_db.reader import (
    _lanes,
    plan_reads,
    read_chip,
    read_item_chips,
)
from stacchip_db.sensors import BandError, sensor_for
from stacchip_db.synthetic import synthesize_item
from tests.conftest import FIXTURES, S2_BANDS

NAIP = "naip_m_4207009_ne_19_060_20211024.json"


def test_platform_from_collection_id_or_option() -> None:
    assert sensor_for("sentinel-2-c1-l2a").name == "sentinel-2-l2a"
    assert sensor_for("landsat-c2-l2").bands == (
        "red", "green", "blue", "nir08", "swir16", "swir22",
    )  # fmt: skip
    assert sensor_for("naip").bands == ("red", "green", "blue", "nir")
    assert sensor_for("whatever", "linz").name == "linz"
    with pytest.raises(BandError, match="`platform`"):
        sensor_for("my-drone-flights")
    with pytest.raises(BandError, match="unknown platform 'drone'"):
        sensor_for("x", "drone")


def test_bands_of_a_multi_band_asset_by_position() -> None:
    item = json.loads((FIXTURES / NAIP).read_text())  # one asset, eo:bands b1..b4
    reads = plan_reads(item, ["red", "green", "blue", "nir"])
    assert [(r.asset, r.indexes, r.positions) for r in reads] == [
        ("asset", (1, 2, 3, 4), (0, 1, 2, 3))
    ]
    s2 = json.loads((FIXTURES / "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json").read_text())
    reads = plan_reads(s2, ["nir", "blue"])
    assert [(r.asset, r.indexes, r.positions) for r in reads] == [
        ("nir", (1,), (0,)),
        ("blue", (1,), (1,)),
    ]
    with pytest.raises(BandError, match="thermal"):
        plan_reads(s2, ["blue", "thermal"])


def test_windows_at_10_20_and_60_m(s2_items: list[dict]) -> None:
    item = s2_items[0]
    # 60 m beside 10 m: factor 6 does not divide 64, GDAL's nearest resampling does it
    bands = ["blue", "swir22", "coastal"]
    item = copy.deepcopy(item)
    out = Path(item["assets"]["blue"]["href"]).parent / "coastal"
    coastal = synthesize_item(item, out, ["coastal"], scale=1)["assets"]["coastal"]
    item["assets"]["coastal"] = coastal
    chips = [(0, 0), (5, 7), (16, 16)]
    got = read_item_chips(item, chips, bands, chip_size=64)
    assert got.ok.all() and got.pixels.shape == (3, 3, 64, 64)
    for i, (x, y) in enumerate(chips):
        for c, (band, factor) in enumerate((("blue", 1), ("swir22", 2), ("coastal", 6))):
            with rasterio.open(item["assets"][band]["href"]) as src:
                size = 64 / factor
                expected = src.read(
                    1,
                    window=Window(x * size, y * size, size, size),
                    out_shape=(64, 64),
                    resampling=Resampling.nearest,
                )
            np.testing.assert_array_equal(got.pixels[i, c], expected, err_msg=f"{band} {x},{y}")
    single = read_chip(item, 5, 7, bands, chip_size=64, cache=DatasetCache())
    np.testing.assert_array_equal(single, got.pixels[1])


def test_unreadable_asset_fails_its_chips_only(s2_items: list[dict], tmp_path: Path) -> None:
    item = copy.deepcopy(s2_items[0])
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff")
    item["assets"]["red"]["href"] = str(broken)
    got = read_item_chips(item, [(1, 1), (2, 2)], ["blue", "red"], chip_size=64)
    assert not got.ok.any()
    assert {f.href for f in got.failures} == {str(broken)}
    assert (got.pixels == 0).all()
    fine = read_item_chips(item, [(1, 1)], ["blue"], chip_size=64)
    assert fine.ok.all() and fine.pixels.any()


def test_remote_reads_are_spread_over_lanes() -> None:
    reads = [object()] * 10  # ten assets
    lanes = _lanes(reads, 128, 32)  # type: ignore[arg-type]
    assert len(lanes) == 30  # 3 readers per asset
    per_asset = [sum(len(lane.positions) for lane in lanes[i * 3 : i * 3 + 3]) for i in range(10)]
    assert per_asset == [128] * 10
    assert len(_lanes(reads, 128, 1)) == 1  # type: ignore[arg-type]
    assert len(_lanes(reads, 128, 4)) == 4  # type: ignore[arg-type]


def test_dataset_cache_reuses_and_bounds(s2_items: list[dict]) -> None:
    cache = DatasetCache(size=2)
    hrefs = [s2_items[0]["assets"][b]["href"] for b in S2_BANDS[:3]]
    first = cache.open(hrefs[0])
    assert cache.open(hrefs[0]) is first
    cache.open(hrefs[1])
    cache.open(hrefs[2])  # evicts the least recently used
    assert first.closed
    cache.clear()
