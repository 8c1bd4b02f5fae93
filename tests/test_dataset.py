"""ChipDataset and load_selection: a query's chips as a map-style dataset, and its guards."""

from __future__ import annotations

import math
import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from stacchip_db import ChipDataset
from stacchip_db.dataset import QueryError, item_time, load_selection
from stacchip_db.read_engine import DATASETS
from stacchip_db.selection import ChipFilter
from tests.conftest import S2_BANDS, store_indexed

CHIP = 64
ALL = "SELECT collection, item_id, chip_size, chip_index_x, chip_index_y FROM stacchip.chips"


def _pixel_sum(dataset: ChipDataset, index: int) -> float:
    return float(dataset[index]["pixels"].sum(dtype=np.float64))


def test_len_getitem_and_metadata(database_url: str, s2_items: list[dict]) -> None:
    n = store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    query = ALL + " ORDER BY chip_index_y DESC, chip_index_x LIMIT 20"
    dataset = ChipDataset(query, database_url=database_url)
    assert len(dataset) == 20 < n
    sample = dataset[3]
    assert sample["pixels"].shape == (10, CHIP, CHIP)
    assert sample["pixels"].dtype == np.float32
    assert sample["bands"] == list(S2_BANDS)
    x, y = sample["chip_index_x"], sample["chip_index_y"]
    assert sample["chip_id"] == f"{s2_items[0]['id']}-{x}-{y}"
    item = s2_items[0]
    with rasterio.open(item["assets"]["swir16"]["href"]) as src:  # a 20 m band
        expected = src.read(
            1,
            window=Window(x * CHIP // 2, y * CHIP // 2, CHIP // 2, CHIP // 2),
            out_shape=(CHIP, CHIP),
            resampling=Resampling.nearest,
        )
    np.testing.assert_array_equal(sample["pixels"][S2_BANDS.index("swir16")], expected)
    assert sample["datetime"].startswith("2024-03-11T14:11:54")
    assert -34 < sample["lat"] < -31 and -65 < sample["lon"] < -62
    np.testing.assert_allclose(
        sample["lat_norm"],
        [math.sin(math.radians(sample["lat"])), math.cos(math.radians(sample["lat"]))],
        rtol=1e-6,
    )
    assert dataset[-1]["chip_id"] == dataset[19]["chip_id"]
    with pytest.raises(IndexError):
        dataset[20]


def test_pickles_and_reads_in_another_process(database_url: str, s2_items: list[dict]) -> None:
    store_indexed(database_url, s2_items, chip_size=CHIP)
    dataset = ChipDataset(ALL + " LIMIT 12", database_url=database_url, bands=["red", "nir08"])
    expected = [_pixel_sum(dataset, i) for i in range(len(dataset))]
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(clone) == 12
    assert clone[5]["chip_id"] == dataset[5]["chip_id"]
    # a DataLoader's workers: fresh processes that reopen the COGs on first use
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        sums = pool.starmap(_pixel_sum, [(dataset, i) for i in range(len(dataset))])
    assert sums == expected
    assert dataset[0]["pixels"].shape == (2, CHIP, CHIP)


def test_open_datasets_are_reused_per_href(database_url: str, s2_items: list[dict]) -> None:
    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    DATASETS.clear()
    dataset = ChipDataset(ALL + " LIMIT 5", database_url=database_url, bands=["blue", "red"])
    first = DATASETS.open(s2_items[0]["assets"]["blue"]["href"])
    for i in range(len(dataset)):
        dataset[i]
    assert DATASETS.open(s2_items[0]["assets"]["blue"]["href"]) is first
    assert not first.closed


def test_a_chip_filter_selects_too(database_url: str, s2_items: list[dict]) -> None:
    store_indexed(database_url, s2_items, chip_size=CHIP)
    wanted = s2_items[1]["collection"]
    dataset = ChipDataset(
        ChipFilter(collections=(wanted,), max_cloud=0.0), database_url=database_url
    )
    assert len(dataset) > 0
    assert all(row.cloud_fraction == 0.0 for row in dataset.rows)


def test_load_selection_guards(database_url: str, s2_items: list[dict]) -> None:
    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    with pytest.raises(QueryError, match=r"deadline of 0\.2 s \(`statement_timeout_s`\)"):
        load_selection(database_url, ALL + " WHERE pg_sleep(2) IS NOT NULL",
                       statement_timeout_s=0.2)  # fmt: skip
    with pytest.raises(QueryError, match=r"not in stacchip\.chips"):
        load_selection(
            database_url, "SELECT 'c' AS collection, 'i' AS item_id, 64 AS chip_size, "
            "0 AS chip_index_x, 0 AS chip_index_y",
        )  # fmt: skip
    assert len(load_selection(database_url, ALL + " LIMIT 0")) == 0
    with pytest.raises(QueryError, match="`statement_timeout_s` must be positive, not 0"):
        load_selection(database_url, ALL, statement_timeout_s=0)


def test_item_time_uses_the_time_of_day_or_noon() -> None:
    assert item_time({"properties": {"datetime": "2024-03-11T14:11:54Z"}}) == (11, 14.0)
    assert item_time({"properties": {"datetime": None, "start_datetime": "2021-01-04"}}) == (
        1,
        12.0,
    )


def test_pixels_equal_prechip_cube(database_url: str, s2_items: list[dict], tmp_path: Path) -> None:
    from tests.conftest import run_cli

    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    query = ALL + " ORDER BY chip_index_y, chip_index_x LIMIT 8"
    result = run_cli(
        ["prechip", "--query", query, "--out", str(tmp_path), "--cube-size", "8"],
        database_url=database_url,
    )
    assert result.exit_code == 0, result.output
    cube = np.load(next(tmp_path.rglob("cube_0.npz")))
    dataset = ChipDataset(query, database_url=database_url)
    for i in range(8):
        np.testing.assert_array_equal(dataset[i]["pixels"], cube["pixels"][i])
        np.testing.assert_array_equal(dataset[i]["lon_norm"], cube["lon_norm"][i])
