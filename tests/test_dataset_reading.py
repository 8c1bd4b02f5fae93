"""ChipDataset's reading: concurrent windows equal sequential per-band reads, batches, read-ahead
in a sampler's order, worker processes under fork and spawn, COGs over HTTP."""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from stacchip_db import ChipDataset, ChipSampler
from stacchip_db.dataset import DatasetError
from stacchip_db.reader import ChipReadError
from tests.conftest import REPO, S2_BANDS, store_indexed

CHIP = 64
ALL = "SELECT collection, item_id, chip_size, chip_index_x, chip_index_y FROM stacchip.chips"
# the last column and row of chips reach past the 1098 px image: boundless reads
EDGE = ALL + " WHERE chip_index_x IN (0, 7, 17) ORDER BY chip_index_y, chip_index_x LIMIT 12"


def _per_band(item: dict, x: int, y: int) -> np.ndarray:
    """The chip read band by band with plain rasterio, coarse bands resampled by GDAL."""
    out = np.zeros((len(S2_BANDS), CHIP, CHIP), dtype=np.float32)
    for c, band in enumerate(S2_BANDS):
        with rasterio.open(item["assets"][band]["href"]) as src:
            factor = 1098 // src.width
            size = CHIP // factor
            out[c] = src.read(
                1,
                window=Window(x * size, y * size, size, size),
                out_shape=(CHIP, CHIP),
                resampling=Resampling.nearest,
                boundless=True,
                fill_value=src.nodata or 0,
            )
    return out


def test_concurrent_reads_equal_sequential_per_band_reads(
    database_url: str, s2_items: list[dict]
) -> None:
    store_indexed(database_url, s2_items, chip_size=CHIP)
    concurrent = ChipDataset(EDGE, database_url=database_url, lanes=10)
    sequential = ChipDataset(EDGE, database_url=database_url, lanes=1)
    assert len(concurrent) == 12
    batch = concurrent.__getitems__(list(range(12)))
    for i, sample in enumerate(batch):
        item = concurrent.items[(sample["collection"], sample["item_id"])]
        expected = _per_band(item, sample["chip_index_x"], sample["chip_index_y"])
        assert sample["pixels"].dtype == np.float32
        np.testing.assert_array_equal(sample["pixels"], expected, err_msg=sample["chip_id"])
        np.testing.assert_array_equal(concurrent[i]["pixels"], expected)
        np.testing.assert_array_equal(sequential[i]["pixels"], expected)
        assert sample["chip_id"] == sequential[i]["chip_id"]
    # a batch mixing items and repeating a chip
    mixed = ChipDataset(
        ALL + " ORDER BY chip_index_y, chip_index_x, item_id LIMIT 40", database_url=database_url
    )
    picks = [0, 39, 5, 0, 20]
    assert len({mixed.rows[i].item_id for i in picks}) == 2
    for i, sample in zip(picks, mixed.__getitems__(picks), strict=True):
        row = mixed.rows[i]
        expected = _per_band(mixed.items[row.item_key], row.chip_index_x, row.chip_index_y)
        np.testing.assert_array_equal(sample["pixels"], expected)
        assert sample["chip_id"] == row.chip_id


def test_a_chip_that_cannot_be_read_is_named(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    dataset = ChipDataset(ALL + " LIMIT 3", database_url=database_url, lanes=4)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff")
    for item in dataset.items.values():
        item["assets"]["nir08"]["href"] = str(broken)
    row = dataset.rows[1]
    with pytest.raises(ChipReadError, match=rf"chip {row.chip_id}: cannot read {broken}"):
        dataset[1]
    with pytest.raises(ChipReadError, match=rf"cannot read {broken}"):
        dataset.__getitems__([0, 1, 2])
    with pytest.raises(DatasetError, match="`lanes` must be at least 1, not 0"):
        ChipDataset(ALL, database_url=database_url, lanes=0)
    with pytest.raises(DatasetError, match="`prefetch` must not be negative"):
        ChipDataset(ALL, database_url=database_url, prefetch=-1)


def test_prefetch_reads_the_next_batches_of_the_sampler(
    database_url: str, s2_items: list[dict]
) -> None:
    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    plain = ChipDataset(ALL + " LIMIT 40", database_url=database_url)
    dataset = ChipDataset(ALL + " LIMIT 40", database_url=database_url, prefetch=16)
    sampler = ChipSampler(dataset, seed=2)
    order = list(sampler)
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    for batch in batches:  # what a DataLoader without workers asks for, batch by batch
        for index, sample in zip(batch, dataset.__getitems__(batch), strict=True):
            np.testing.assert_array_equal(sample["pixels"], plain[index]["pixels"])
            assert sample["chip_id"] == plain.rows[index].chip_id
    ahead = dataset._ahead
    assert ahead is not None and ahead.served == len(batches) - 1 and ahead.misses == 0
    # requests off the sampler's order are answered all the same (read directly)
    sample = dataset[7]
    np.testing.assert_array_equal(sample["pixels"], plain[7]["pixels"])
    # next epoch: new order, read ahead again
    sampler.set_epoch(1)
    order = list(sampler)
    served = ahead.served
    for i in range(0, len(order), 8):
        batch = order[i : i + 8]
        for index, sample in zip(batch, dataset.__getitems__(batch), strict=True):
            np.testing.assert_array_equal(sample["pixels"], plain[index]["pixels"])
    assert ahead.served == served + len(batches) - 1


def _worker_sums(dataset: ChipDataset, batches: list[list[int]]) -> list[list[float]]:
    """What a DataLoader worker does with its batches (fresh process: fork or spawn)."""
    return [
        [float(s["pixels"].sum(dtype=np.float64)) for s in dataset.__getitems__(batch)]
        for batch in batches
    ]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_two_worker_processes(database_url: str, s2_items: list[dict], method: str) -> None:
    store_indexed(database_url, s2_items, chip_size=CHIP)
    dataset = ChipDataset(ALL + " LIMIT 48", database_url=database_url, prefetch=8, lanes=4)
    sampler = ChipSampler(dataset, seed=9)
    order = list(sampler)
    batches = [order[i : i + 4] for i in range(0, len(order), 4)]
    # read in this process first: its lane threads and open datasets must not trouble a fork
    expected = _worker_sums(dataset, batches)
    context = multiprocessing.get_context(method)
    with context.Pool(2) as pool:
        got = pool.starmap(_worker_sums, [(dataset, batches[0::2]), (dataset, batches[1::2])])
    assert got[0] == expected[0::2] and got[1] == expected[1::2]


# -- over HTTP ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def http_root(s2_items: list[dict]) -> Iterator[str]:
    """The first item's COGs on a loopback HTTP server (bench/latency_proxy.py: byte ranges,
    keep-alive, +5 ms per request), in a process of its own."""
    root = Path(s2_items[0]["assets"]["blue"]["href"]).parent
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "latency_proxy.py"), "--dir", str(root),
         "--port", str(port), "--delay-ms", "5"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and "serving" in proc.stdout.readline()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_remote_cogs_read_concurrently_equal_local_reads(
    database_url: str, s2_items: list[dict], http_root: str
) -> None:
    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    local = ChipDataset(EDGE, database_url=database_url)
    remote = ChipDataset(EDGE, database_url=database_url, prefetch=4)
    for item in remote.items.values():
        for asset in item["assets"].values():
            asset["href"] = f"{http_root}/{Path(asset['href']).name}"
    ChipSampler(remote, shuffle=False)
    got = [remote.__getitems__(list(range(i, i + 4))) for i in range(0, len(remote), 4)]
    for i, sample in enumerate(s for batch in got for s in batch):
        np.testing.assert_array_equal(sample["pixels"], local[i]["pixels"], err_msg=str(i))
    assert remote._ahead is not None and remote._ahead.served == 2
    # one sample at a time, its ten bands on ten lanes
    np.testing.assert_array_equal(remote[11]["pixels"], local[11]["pixels"])
