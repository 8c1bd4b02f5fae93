"""Chip pixels from COGs: which asset holds each band, and reading chip windows from it.

One reading implementation, `read_chips`, for every reader: prechip, stats and preview read an
item's chips at a time (`read_item_chips`), ChipDataset a sample or a batch of samples. It opens
each asset of the requested bands once per reading thread, reads only the windows of the
requested chips (a coarser band at its own resolution, upsampled by the integer factor: nearest,
as `grid` defines it) and stacks them into `(chips, bands, chip_size, chip_size)` arrays in the
platform's band order.

Where the files are remote (HTTP, S3), latency and not bandwidth limits the reads, so the
windows are spread over "lanes" run by the process's lane pool: long-lived threads, each lane
pinned to a thread by its asset's href. A random-access reader (ChipDataset) keeps the datasets
those threads open (`keep_open`, in the read engine's `DatasetCache`, entries per thread), so
the dataset a thread opened (header and tile index parsed once) serves the next sample too;
GDAL's /vsicurl/ cache shares file headers between threads. Local reads are CPU-bound (tile
decompression) and run in one lane in the calling thread by default: the parallelism there
comes from worker processes (`read_engine`, `prechip --jobs`, a DataLoader's workers).

A window that cannot be read fails its chip, not the item: `ItemChips.failures` names the chip
and the first href that failed it (one entry per chip), and the caller decides (prechip leaves
the chip out and carries on; a dataset raises `ChipReadError`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError

from stacchip_db.errors import StacchipError
from stacchip_db.grid import ChipGrid, chip_grid, item_view
from stacchip_db.sensors import BandError, band_names, locate_band, profile_for
from stacchip_db.signing import sign_href
from stacchip_db.text import first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssetRead:
    """Bands read from one asset: its 1-based band `indexes` go to output `positions`."""

    asset: str
    href: str
    indexes: tuple[int, ...]
    positions: tuple[int, ...]


def plan_reads(item: Any, bands: Sequence[str]) -> list[AssetRead]:
    """Which asset (and band of it) holds each of `bands`, grouped by asset.

    Each band is found by `sensors.locate_band`: through the item's catalog layout (`rededge1`
    is asset `B05` on Planetary Computer), else the asset of that key (band 1), else the band
    of a multi-band asset whose `eo:bands` entry is named so (NAIP's `image`); else, for
    NAIP/LINZ-like items with a single multi-band image asset, the band at the same position.
    """
    view = item_view(item)
    profile = profile_for(view)
    found: dict[str, tuple[str, int]] = {}
    for band in bands:
        where = locate_band(view, band, profile)
        if where is not None:
            found[band] = where
    missing = [b for b in bands if b not in found]
    if missing:
        multi = [k for k, f in view.assets.items() if len(band_names(f)) >= len(bands)]
        if len(multi) == 1:
            found.update({b: (multi[0], i + 1) for i, b in enumerate(bands) if b in missing})
            missing = []
    if missing:
        raise BandError(
            f"item {view.id}: no asset or named band for {', '.join(missing)} (assets: "
            f"{', '.join(sorted(view.assets))}); pass `bands` with names the item has"
        )
    reads: dict[str, tuple[list[int], list[int]]] = {}
    for position, band in enumerate(bands):
        asset, index = found[band]
        indexes, positions = reads.setdefault(asset, ([], []))
        indexes.append(index)
        positions.append(position)
    return [
        AssetRead(asset, str(view.assets[asset]["href"]), tuple(ix), tuple(pos))
        for asset, (ix, pos) in reads.items()
    ]


def is_remote(href: str) -> bool:
    """True for hrefs GDAL reads over the network (HTTP, S3, GCS, /vsicurl/ …)."""
    return href.startswith(("http://", "https://", "s3://", "gs://", "az://", "/vsi"))


REMOTE_LANES = 32
"""Concurrent reads per item when its assets are remote (20 ms latency: ~1 request per read)."""

REMOTE_GDAL_CONFIG = {
    # No directory listing per file (sidecar lookups cost a request each).
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # A window spanning several tiles: fetch their byte ranges in parallel, merged when adjacent.
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    # Header + tile index of a COG in the first request instead of several small ones.
    "GDAL_INGESTED_BYTES_AT_OPEN": "65536",
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
}
"""GDAL settings for remote COGs; an environment variable of the same name wins."""


def configure_gdal() -> None:
    """Apply `REMOTE_GDAL_CONFIG` to this process (GDAL reads them from the environment).

    Environment variables rather than `rasterio.Env` because reading threads share them and
    rasterio's Env is per thread.
    """
    for key, value in REMOTE_GDAL_CONFIG.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class ChipFailure:
    """Chip `position` (in the caller's list) could not be read from `href`."""

    position: int
    href: str
    message: str


@dataclass
class ItemChips:
    """Pixels of some chips of one item; `ok[i]` False where chip i failed (its pixels are 0).

    `failures` has one entry per failed chip: the first asset that failed it.
    """

    pixels: np.ndarray
    ok: np.ndarray
    failures: list[ChipFailure] = field(default_factory=list)


def _read_window(
    src: Any,
    grid: ChipGrid,
    x: int,
    y: int,
    indexes: tuple[int, ...],
    asset: str,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """`(len(indexes), cs, cs)` pixels of chip (x, y) from an open dataset, into `out` if given.

    `out` may have another dtype (GDAL converts while decoding) and may be a strided view, so
    callers can read straight into a cube without an intermediate array.
    """
    cs = grid.chip_size
    window = grid.window(x, y, src.transform, asset=asset)
    inside = (
        window.col_off >= 0
        and window.row_off >= 0
        and window.col_off + window.width <= src.width
        and window.row_off + window.height <= src.height
    )
    fill = src.nodata if src.nodata is not None else 0
    # The window's size in asset pixels gives the asset's factor relative to the finest grid;
    # `grid` makes it fractional when the factor does not divide the chip size.
    whole = float(window.width).is_integer() and float(window.height).is_integer()
    fx, fy = cs / window.width, cs / window.height
    if fx == fy == 1:
        return src.read(indexes, window=window, boundless=not inside, fill_value=fill, out=out)
    if whole and fx.is_integer() and fy.is_integer():
        data = src.read(indexes, window=window, boundless=not inside, fill_value=fill)
        n, h, w = data.shape
        if out is None:
            out = np.empty((n, cs, cs), dtype=data.dtype)
        # Nearest upsampling by the integer factors in one pass: each pixel becomes fy x fx.
        out.reshape(n, h, int(fy), w, int(fx))[...] = data[:, :, None, :, None]
        return out
    # The factor does not divide the chip size: GDAL's nearest resampling of the fractional
    # window is the same nearest upsampling, done by GDAL.
    if out is None:
        out = np.empty((len(indexes), cs, cs), dtype=src.dtypes[indexes[0] - 1])
    return src.read(
        indexes,
        window=window,
        resampling=Resampling.nearest,
        boundless=not inside,
        fill_value=fill,
        out=out,
    )


@dataclass(frozen=True)
class _Lane:
    """Windows one thread reads: chips `positions` of each asset in `reads`."""

    reads: tuple[AssetRead, ...]
    positions: tuple[int, ...]


def _lanes(reads: list[AssetRead], n_chips: int, lanes: int) -> list[_Lane]:
    """Split (asset x chips) into at most `lanes` lanes; each asset is opened once per lane."""
    if lanes <= 1 or n_chips == 0:
        return [_Lane(tuple(reads), tuple(range(n_chips)))]
    if lanes < len(reads):
        return [_Lane(tuple(reads[i::lanes]), tuple(range(n_chips))) for i in range(lanes)]
    per_asset = min(n_chips, max(1, lanes // len(reads)))
    out = []
    for read in reads:
        for part in np.array_split(np.arange(n_chips), per_asset):
            out.append(_Lane((read,), tuple(int(p) for p in part)))
    return out


# -- the lane pool: reading threads that outlive a call ---------------------------------------


class _LanePool:
    """Long-lived reading threads of one process, each fed by its own queue.

    A lane is pinned to a thread by its asset's href (`thread_for`), so the same asset of the
    same item lands on the same thread call after call: that thread's `DatasetCache` entry (the
    open dataset with its parsed header and tile index) is reused by the next chip, the next
    item task or the next sample, instead of every thread opening every asset.

    Threads start on first use and are daemons (a finished program does not wait for them).
    A pool belongs to the process that made it: after a fork the child makes its own
    (`lane_pool`), and `_quiesce` holds a fork until no lane is running, so a child never
    inherits a GDAL lock taken by a reading thread that does not exist in it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.pid = os.getpid()
        self._queues: list[queue.SimpleQueue[Any]] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running = 0

    def thread_for(self, key: str, taken: set[int]) -> int:
        """The thread for `key` (stable across calls), the next free one if `taken` has it."""
        first = zlib.crc32(key.encode()) % self.size
        for step in range(self.size):
            slot = (first + step) % self.size
            if slot not in taken:
                return slot
        return first

    def submit(self, slot: int, work: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            while len(self._queues) <= slot:
                q: queue.SimpleQueue[Any] = queue.SimpleQueue()
                thread = threading.Thread(
                    target=self._serve, args=(q,), name=f"chip-read-{len(self._queues)}",
                    daemon=True,
                )  # fmt: skip
                self._queues.append(q)
                thread.start()
            self._running += 1
        self._queues[slot].put((work, future))
        return future

    def _serve(self, q: queue.SimpleQueue[Any]) -> None:
        _LANE_THREAD.active = True
        while True:
            work, future = q.get()
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(work())
                    except BaseException as exc:  # handed to the caller by future.result()
                        future.set_exception(exc)
            finally:
                with self._lock:
                    self._running -= 1
                    if self._running == 0:
                        self._idle.notify_all()
                del work, future

    def wait_idle(self, timeout_s: float) -> None:
        with self._lock:
            self._idle.wait_for(lambda: self._running == 0, timeout=timeout_s)


_LANE_THREAD = threading.local()
_POOL: _LanePool | None = None
_POOL_LOCK = threading.Lock()


def lane_pool() -> _LanePool:
    """This process's lane pool (`REMOTE_LANES` threads), made on first use after a fork."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _LanePool(REMOTE_LANES)
        return _POOL


def _quiesce() -> None:
    """Before a fork: let running lanes finish (a few seconds at most), so no reading thread
    holds a GDAL or /vsicurl/ lock the child would inherit locked."""
    pool = _POOL
    if pool is not None and pool.pid == os.getpid() and not getattr(_LANE_THREAD, "active", 0):
        pool.wait_idle(FORK_WAIT_S)


FORK_WAIT_S = 10.0
"""How long a fork waits for running lanes of the forking process."""


def _forget_in_child() -> None:
    """In a forked child: the parent's pool and its lock (held, maybe, by a thread that does
    not exist here) are not this process's."""
    global _POOL, _POOL_LOCK
    _POOL = None
    _POOL_LOCK = threading.Lock()


os.register_at_fork(before=_quiesce, after_in_child=_forget_in_child)


# -- reading ------------------------------------------------------------------------------------


@dataclass
class ChipRequest:
    """Chips `(x, y)` of one item to read, with the bands and chip size to read them at.

    `reads` and `grid` (from `plan_reads` and `grid.chip_grid`) may be given when the caller
    keeps them across calls (ChipDataset, per item); `out`, an array of shape
    `(len(chips), len(bands), chip_size, chip_size)` of any dtype, receives the pixels.
    """

    item: Any
    chips: Sequence[tuple[int, int]]
    bands: Sequence[str]
    chip_size: int
    out: np.ndarray | None = None
    reads: list[AssetRead] | None = None
    grid: ChipGrid | None = None


def read_chips(
    requests: Sequence[ChipRequest],
    *,
    lanes: int | None = None,
    dtype: Any = None,
    sign: bool | None = None,
    cache: OpenDatasets | None = None,
    keep_open: bool = False,
) -> list[ItemChips]:
    """Pixels of the chips of each request, all read in one go; one `ItemChips` per request.

    The one reading implementation: `read_item_chips` (prechip, stats, preview) is one request
    and ChipDataset a sample or a batch of them. The windows of all requests (asset x chips)
    are spread over at most `lanes` lanes (default: 1 when every asset is local, else
    `REMOTE_LANES`); a single local lane runs in the calling thread, any other on the process's
    lane pool, pinned by href. Datasets come from `cache` (the read engine's `DATASETS`) in the
    calling thread, and in the pool's threads too with `keep_open` (random access: the next
    sample finds its assets open in the thread its lanes are pinned to); else a lane opens its
    assets and closes them when done (an item task's assets are not read again).
    Failures as in `read_item_chips`.
    """
    planned = []
    for request in requests:
        # chips were already indexed: no limit on their number here
        grid = request.grid or chip_grid(request.item, chip_size=request.chip_size, max_chips=None)
        reads = (
            request.reads if request.reads is not None else plan_reads(request.item, request.bands)
        )
        planned.append((request, grid, reads))
    remote = any(is_remote(r.href) for _, _, reads in planned for r in reads)
    if remote:
        configure_gdal()
    if lanes is None:
        lanes = REMOTE_LANES if remote else 1
    results = []
    for request, _, reads in planned:
        n = len(request.chips)
        shape = (n, len(request.bands), request.chip_size, request.chip_size)
        out = request.out
        if out is not None and out.shape != shape:
            raise ValueError(f"out has shape {out.shape}, expected {shape}")
        if out is None:
            out = np.empty(shape, dtype=dtype or _dtype(request.item, reads))
        results.append(ItemChips(out, np.ones(n, dtype=bool)))
    lock = threading.Lock()
    caller = threading.current_thread()

    def fail(got: ItemChips, position: int, href: str, exc: BaseException) -> None:
        with lock:
            if got.ok[position]:  # one failure per chip (its first asset): callers count chips
                got.ok[position] = False
                got.failures.append(ChipFailure(position, href, first_line(exc)))

    def run(got: ItemChips, request: ChipRequest, grid: ChipGrid, lane: _Lane) -> None:
        keep = cache is not None and (keep_open or threading.current_thread() is caller)
        with ExitStack() as stack:
            for read in lane.reads:
                try:
                    if keep:
                        src = cache.open(read.href, sign=sign)  # type: ignore[union-attr]
                    else:
                        signed = sign_href(read.href, sign=sign)
                        src = stack.enter_context(rasterio.open(signed))
                except (RasterioError, OSError) as exc:
                    for position in lane.positions:
                        fail(got, position, read.href, exc)
                    continue
                read_lane(got, request, grid, lane, read, src)

    def read_lane(
        got: ItemChips, request: ChipRequest, grid: ChipGrid, lane: _Lane, read: AssetRead,
        src: Any,
    ) -> None:  # fmt: skip
        """The lane's windows of one open asset."""
        where = f"asset {read.asset!r} ({read.href})"
        # Consecutive output bands are a view: read into place. Else via a copy.
        first, last = read.positions[0], read.positions[-1]
        contiguous = last - first + 1 == len(read.positions)
        for position in lane.positions:
            if not got.ok[position]:
                continue
            x, y = request.chips[position]
            try:
                if contiguous:
                    target = got.pixels[position, first : last + 1]
                    _read_window(src, grid, x, y, read.indexes, where, out=target)
                else:
                    data = _read_window(src, grid, x, y, read.indexes, where)
                    got.pixels[position, list(read.positions)] = data
            except (RasterioError, OSError) as exc:
                fail(got, position, read.href, exc)

    # Each request gets its share of the lanes (at least one).
    share = max(1, lanes // max(1, len(planned)))
    work = [
        (got, request, grid, lane)
        for got, (request, grid, reads) in zip(results, planned, strict=True)
        for lane in _lanes(reads, len(request.chips), share if lanes > 1 else 1)
    ]
    # Remote reads never run in the calling thread: GDAL keeps a /vsicurl/ connection per
    # thread, and a process forked from a thread holding one (a DataLoader's workers forked
    # from the main thread) would share its socket with its siblings. A lane thread never
    # waits for other lanes: it reads its own work inline.
    inline = not remote and (lanes <= 1 or len(work) <= 1)
    if inline or getattr(_LANE_THREAD, "active", False):
        for args in work:
            run(*args)
    else:
        pool = lane_pool()
        taken: set[int] = set()
        futures = []
        for got, request, grid, lane in work:
            key = f"{lane.reads[0].href}#{lane.positions[:1]}" if lane.reads else ""
            slot = pool.thread_for(key, taken)
            taken.add(slot)
            futures.append(pool.submit(slot, partial(run, got, request, grid, lane)))
        for future in futures:
            future.result()
    for got in results:
        got.failures.sort(key=lambda f: f.position)
        got.pixels[~got.ok] = 0
    return results


def read_item_chips(
    item: Any,
    chips: Sequence[tuple[int, int]],
    bands: Sequence[str],
    *,
    chip_size: int,
    lanes: int | None = None,
    dtype: Any = None,
    out: np.ndarray | None = None,
    sign: bool | None = None,
    datasets: OpenDatasets | None = None,
) -> ItemChips:
    """Pixels `(len(chips), len(bands), chip_size, chip_size)` of chips `(x, y)` of `item`.

    `lanes` (default: 1 for local files, `REMOTE_LANES` for remote ones) is the number of
    concurrent readers. The pixels go into `out` when given (any dtype, e.g. a slice of a
    float32 cube), else into a new array of `dtype`, else of the assets' (promoted) dtype.
    Chips that fail are zero.
    An asset that cannot be opened fails every chip; a window that cannot be read, its chip.
    Planetary Computer hrefs are signed when opened (`signing.sign_href`; `sign=False` or
    `$STACCHIP_SIGN=0` turns it off).
    With one lane, the datasets are opened through `datasets` (the read engine's
    `DATASETS`), which keeps them open for the caller's next read; without it, and in lanes
    run by threads, they are closed on return.
    Raises BandError / GridError when the item cannot give these bands on this grid at all,
    SigningError when no SAS token can be had.
    """
    request = ChipRequest(item, chips, bands, chip_size, out=out)
    return read_chips([request], lanes=lanes, dtype=dtype, sign=sign, cache=datasets)[0]


def _dtype(item: Any, reads: list[AssetRead]) -> np.dtype:
    """The promoted `raster:bands` data type of the assets read (default uint16)."""
    view = item_view(item)
    types = []
    for read in reads:
        bands = view.assets[read.asset].get("raster:bands") or [{}]
        types.append(np.dtype(bands[0].get("data_type", "uint16")))
    return np.result_type(*types) if types else np.dtype("float32")


# -- open datasets ------------------------------------------------------------------------------


class OpenDatasets(Protocol):
    """Where a reader gets datasets it may keep open: the read engine's `DatasetCache`."""

    def open(self, href: str, *, sign: bool | None = None) -> Any:
        """The open dataset of `href`, signed when it needs it; the cache closes it."""
        ...


def read_chip(
    item: Any,
    x: int,
    y: int,
    bands: Sequence[str],
    *,
    chip_size: int,
    cache: OpenDatasets,
    reads: list[AssetRead] | None = None,
    grid: ChipGrid | None = None,
    sign: bool | None = None,
    lanes: int | None = None,
) -> np.ndarray:
    """Pixels `(len(bands), chip_size, chip_size)` of one chip, datasets reused via `cache`
    (`read_engine.DATASETS`: this process's open datasets).

    `read_chips` with one chip (its bands read concurrently when `lanes` > 1).
    Raises ChipReadError naming the chip and the href when an asset cannot be read;
    Planetary Computer hrefs are signed as in `read_item_chips`.
    """
    grid = grid or chip_grid(item, chip_size=chip_size, max_chips=None)
    reads = reads if reads is not None else plan_reads(item, bands)
    if not reads:
        raise BandError(f"chip {grid.item_id}-{x}-{y}: no bands requested")
    request = ChipRequest(item, [(x, y)], bands, chip_size, reads=reads, grid=grid)
    got = read_chips([request], lanes=lanes, sign=sign, cache=cache, keep_open=True)[0]
    raise_failures(grid.item_id, request.chips, got)
    return got.pixels[0]


def raise_failures(item_id: str, chips: Sequence[tuple[int, int]], got: ItemChips) -> None:
    """Raise ChipReadError for the first chip of `got` that failed (for readers that cannot
    leave a chip out, as a dataset cannot)."""
    if got.failures:
        failure = got.failures[0]
        x, y = chips[failure.position]
        raise ChipReadError(
            f"chip {item_id}-{x}-{y}: cannot read {failure.href}: {failure.message}"
        )


class ChipReadError(StacchipError):
    """A chip's asset could not be opened or its window read."""
