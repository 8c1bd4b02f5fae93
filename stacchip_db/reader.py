"""Chip pixels from COGs: which asset holds each band, and reading chip windows from it.

One item at a time: `read_item_chips` opens each asset of the requested bands once, reads only
the windows of the requested chips (a coarser band at its own resolution, upsampled by the
integer factor with `np.repeat`: nearest, as `grid` defines it) and stacks them into a
`(chips, bands, chip_size, chip_size)` array in the platform's band order.

Where the files are remote (HTTP, S3), latency and not bandwidth limits the reads, so the reads
of one item are spread over "lanes" run by threads: each lane opens the assets it reads once
and reads its windows in order; GDAL's /vsicurl/ cache shares the file headers between lanes of
the same asset. Local reads are CPU-bound (tile decompression), so they use one lane: the
parallelism there comes from worker processes (`read_engine`, `prechip --jobs`).

A window that cannot be read fails its chip, not the item: `ItemChips.failures` names the chip
and the first href that failed it (one entry per chip), and the caller decides (prechip leaves
the chip out and carries on).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
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
    grid = chip_grid(item, chip_size=chip_size, max_chips=None)  # chips already indexed
    reads = plan_reads(item, bands)
    if lanes is None:
        lanes = REMOTE_LANES if any(is_remote(r.href) for r in reads) else 1
    if any(is_remote(r.href) for r in reads):
        configure_gdal()
    n = len(chips)
    shape = (n, len(bands), chip_size, chip_size)
    if out is not None and out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    pixels = out if out is not None else np.empty(shape, dtype=dtype or _dtype(item, reads))
    ok = np.ones(n, dtype=bool)
    failures: list[ChipFailure] = []
    lock = threading.Lock()

    def fail(position: int, href: str, exc: BaseException) -> None:
        with lock:
            if ok[position]:  # one failure per chip (its first asset), so callers count chips
                ok[position] = False
                failures.append(ChipFailure(position, href, first_line(exc)))

    work = _lanes(reads, n, lanes)

    def run(lane: _Lane) -> None:
        with ExitStack() as stack:
            for read in lane.reads:
                try:
                    # One lane runs in the calling thread: keep its datasets open for the next
                    # item task of this process (workers get many). Threads open their own.
                    if len(work) == 1 and datasets is not None:
                        src = datasets.open(read.href, sign=sign)
                    else:
                        signed = sign_href(read.href, sign=sign)
                        src = stack.enter_context(rasterio.open(signed))
                except (RasterioError, OSError) as exc:
                    for position in lane.positions:
                        fail(position, read.href, exc)
                    continue
                where = f"asset {read.asset!r} ({read.href})"
                for position in lane.positions:
                    if not ok[position]:
                        continue
                    x, y = chips[position]
                    # Consecutive output bands are a view: read into place. Else via a copy.
                    first, last = read.positions[0], read.positions[-1]
                    contiguous = last - first + 1 == len(read.positions)
                    try:
                        if contiguous:
                            target = pixels[position, first : last + 1]
                            _read_window(src, grid, x, y, read.indexes, where, out=target)
                        else:
                            data = _read_window(src, grid, x, y, read.indexes, where)
                            pixels[position, list(read.positions)] = data
                    except (RasterioError, OSError) as exc:
                        fail(position, read.href, exc)

    if len(work) == 1:
        run(work[0])
    else:
        with ThreadPoolExecutor(max_workers=len(work), thread_name_prefix="chip-read") as pool:
            for _ in pool.map(run, work):
                pass
    failures.sort(key=lambda f: f.position)
    pixels[~ok] = 0
    return ItemChips(pixels, ok, failures)


def _dtype(item: Any, reads: list[AssetRead]) -> np.dtype:
    """The promoted `raster:bands` data type of the assets read (default uint16)."""
    view = item_view(item)
    types = []
    for read in reads:
        bands = view.assets[read.asset].get("raster:bands") or [{}]
        types.append(np.dtype(bands[0].get("data_type", "uint16")))
    return np.result_type(*types) if types else np.dtype("float32")


# -- random access (ChipDataset) ----------------------------------------------------------------


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
) -> np.ndarray:
    """Pixels `(len(bands), chip_size, chip_size)` of one chip, datasets reused via `cache`
    (`read_engine.DATASETS`: this process's open datasets).

    Raises ChipReadError naming the chip and the href when an asset cannot be read;
    Planetary Computer hrefs are signed as in `read_item_chips`.
    """
    grid = grid or chip_grid(item, chip_size=chip_size, max_chips=None)
    reads = reads if reads is not None else plan_reads(item, bands)
    out: np.ndarray | None = None
    for read in reads:
        where = f"asset {read.asset!r} ({read.href})"
        try:
            data = _read_window(
                cache.open(read.href, sign=sign), grid, x, y, read.indexes, where
            )
        except (RasterioError, OSError) as exc:
            raise ChipReadError(
                f"chip {grid.item_id}-{x}-{y}: cannot read {read.href}: {first_line(exc)}"
            ) from exc
        if out is None:
            out = np.zeros((len(bands), chip_size, chip_size), dtype=_dtype(item, reads))
        out[list(read.positions)] = data
    if out is None:
        raise BandError(f"chip {grid.item_id}-{x}-{y}: no bands requested")
    return out


class ChipReadError(StacchipError):
    """A chip's asset could not be opened or its window read."""
