"""Per-band statistics (count, mean, std, min, max) of chips, mergeable across workers.

Each worker summarises its pixels as `BandStats` (count, mean, sum of squared deviations M2,
min, max per band, in float64) and the summaries are merged with Chan et al.'s pairwise update
(`merge`), which stays accurate where the textbook `E[x²] - E[x]²` cancels catastrophically
(reflectances of ~10⁴ have squares of ~10⁸; float64 keeps 16 digits). Pixels equal to the
platform's nodata value (0; -32768 for Sentinel-1; -28672 for MODIS) and NaNs are left out.
std is the population standard deviation (ddof 0), as normalisation uses it.

The YAML written by `to_clay_yaml` has the layout of the Clay model's `configs/metadata.yaml`:
platform -> band_order, rgb_indices, bands -> mean / std -> band -> value.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

from stacchip_db.dataset import ChipRow, ChipSelection, bands_for
from stacchip_db.errors import StacchipError
from stacchip_db.paths import is_safe_name
from stacchip_db.read_engine import (
    FailedChip,
    ReadTask,
    TaskResult,
    failed_chips,
    read_task,
    read_tasks,
    run_tasks,
)
from stacchip_db.sensors import SENSORS, sensor_for

log = logging.getLogger(__name__)


class StatsError(StacchipError):
    """Statistics cannot be computed as asked (no cubes, bands that do not match)."""


@dataclass
class BandStats:
    """Running statistics of each band; `count` is the number of valid pixels."""

    bands: list[str]
    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray

    @classmethod
    def empty(cls, bands: Sequence[str]) -> BandStats:
        n = len(bands)
        return cls(
            list(bands),
            np.zeros(n, dtype=np.int64),
            np.zeros(n),
            np.zeros(n),
            np.full(n, np.inf),
            np.full(n, -np.inf),
        )

    @classmethod
    def from_pixels(
        cls, pixels: np.ndarray, bands: Sequence[str], nodata: float | None
    ) -> BandStats:
        """Statistics of `pixels` `(N, C, H, W)` (or `(C, H, W)`), skipping `nodata` and NaN."""
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.shape[1] != len(bands):
            raise StatsError(
                f"pixels have {pixels.shape[1]} bands but {len(bands)} band names were given "
                f"({', '.join(bands)}); pass `bands` matching the data"
            )
        stats = cls.empty(bands)
        for c in range(len(bands)):  # one band at a time: float64 copies of one band only
            values = pixels[:, c].ravel()
            valid = np.ones(values.shape, dtype=bool) if nodata is None else values != nodata
            if values.dtype.kind == "f":
                valid &= np.isfinite(values)
            values = values[valid].astype(np.float64)
            if values.size == 0:
                continue
            stats.count[c] = values.size
            stats.mean[c] = values.mean()
            stats.m2[c] = np.square(values - stats.mean[c]).sum()
            stats.minimum[c] = values.min()
            stats.maximum[c] = values.max()
        return stats

    def merge(self, other: BandStats) -> BandStats:
        """The statistics of both sets of pixels (Chan's parallel update), as a new object."""
        if other.bands != self.bands:
            raise StatsError(f"cannot merge statistics of bands {other.bands} into {self.bands}")
        n_a, n_b = self.count.astype(np.float64), other.count.astype(np.float64)
        n = n_a + n_b
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = other.mean - self.mean
            weight_b = np.where(n > 0, n_b / n, 0.0)
            mean = self.mean + delta * weight_b
            m2 = self.m2 + other.m2 + np.where(n > 0, delta * delta * n_a * n_b / n, 0.0)
        return BandStats(
            self.bands,
            self.count + other.count,
            mean,
            m2,
            np.minimum(self.minimum, other.minimum),
            np.maximum(self.maximum, other.maximum),
        )

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per band (NaN where no pixel was valid)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, np.sqrt(self.m2 / self.count), np.nan)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per band: band, count, mean, std, min, max (NaN where count is 0)."""
        empty = self.count == 0
        return [
            {
                "band": band,
                "count": int(self.count[i]),
                "mean": float("nan") if empty[i] else float(self.mean[i]),
                "std": float(self.std[i]),
                "min": float("nan") if empty[i] else float(self.minimum[i]),
                "max": float("nan") if empty[i] else float(self.maximum[i]),
            }
            for i, band in enumerate(self.bands)
        ]


def merge_all(parts: Iterable[BandStats]) -> BandStats | None:
    """All `parts` merged, or None when there are none."""
    result = None
    for part in parts:
        result = part if result is None else result.merge(part)
    return result


def _group_name(collection: str, platform: str | None) -> str:
    """The key statistics are grouped under: the platform, else the collection."""
    try:
        return sensor_for(collection, platform).name
    except StacchipError:
        if platform is not None:
            raise
        return collection


def _nodata(collection: str, platform: str | None) -> float:
    try:
        return sensor_for(collection, platform).nodata
    except StacchipError:
        return 0


def task_stats(nodata: dict[str, float], task: ReadTask) -> TaskResult:
    """Worker function of `selection_stats`: the statistics of one task's readable chips."""
    got = read_task(task)
    pixels = got.pixels if got.ok.all() else got.pixels[got.ok]
    collection = task.item["collection"]
    stats = BandStats.from_pixels(pixels, task.bands, nodata[collection])
    return TaskResult(task, stats, got.ok, got.failures)


BLOCK_SIZE = 128
"""Chips per unit of work (as many as a prechip cube)."""


@dataclass(frozen=True)
class _Block:
    """Up to `BLOCK_SIZE` chips of one collection and chip size, sorted by key: a
    `read_engine.ChipBlock`."""

    collection: str
    rows: list[ChipRow]
    bands: list[str]


def _blocks(
    selection: ChipSelection, bands: Sequence[str] | None, platform: str | None
) -> list[_Block]:
    """The selection cut into units of work, in key order (chip size, collection, item, y, x:
    an item's chips consecutive, as the engine needs)."""
    rows = sorted(
        selection.rows,
        key=lambda r: (r.chip_size, r.collection, r.item_id, r.chip_index_y, r.chip_index_x),
    )
    blocks = []
    for (_, collection), group in groupby(rows, key=lambda r: (r.chip_size, r.collection)):
        chips = list(group)
        # Statistics describe the chips prechip would export, which leaves these out.
        if not is_safe_name(collection):
            log.warning(
                "collection %r cannot be a folder name: its %d chips are not exported",
                collection,
                len(chips),
            )
            continue
        names = bands_for(collection, bands, platform)
        blocks += [
            _Block(collection, chips[start : start + BLOCK_SIZE], names)
            for start in range(0, len(chips), BLOCK_SIZE)
        ]
    return blocks


@dataclass
class StatsResult:
    """Statistics per group (platform or collection), and the chips left out (unreadable)."""

    groups: dict[str, BandStats]
    chips: int = 0
    failures: list[FailedChip] = field(default_factory=list)

    @property
    def failed(self) -> int:
        """How many chips could not be read."""
        return len(self.failures)


def selection_stats(
    selection: ChipSelection,
    *,
    bands: Sequence[str] | None = None,
    platform: str | None = None,
    jobs: int = 1,
    lanes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> StatsResult:
    """Band statistics of the selected chips, read like prechip reads them (`read_engine`,
    `jobs` workers).

    Chips whose asset cannot be read are left out, listed in `failures` and logged one line
    each (chip id and href), as prechip does.
    """
    blocks = _blocks(selection, bands, platform)
    nodata = {c: _nodata(c, platform) for c in {b.collection for b in blocks}}
    tasks = read_tasks(blocks, selection.items, jobs=jobs, lanes=lanes)
    work = functools.partial(task_stats, nodata)
    result = StatsResult({})
    for done in run_tasks(tasks, work, jobs=jobs):
        collection = done.task.item["collection"]
        group = _group_name(collection, platform)
        previous = result.groups.get(group)
        result.groups[group] = done.value if previous is None else previous.merge(done.value)
        result.chips += int(done.ok.sum())
        block = blocks[done.task.block]
        failures = failed_chips([block.rows[p] for p in done.task.positions], done.failures)
        for failure in failures:
            log.warning("%s; left out of the statistics", failure)
        result.failures += failures
        if progress is not None:
            progress(len(done.task.positions))
    return result


def cube_stats(
    directory: str | Path, *, bands: Sequence[str] | None = None, platform: str | None = None
) -> StatsResult:
    """Band statistics of the npz cubes under `directory` (`{collection}/cube_*.npz`).

    Band names come from `--bands`, else the manifest beside the cubes, else the platform.
    """
    root = Path(directory)
    cubes = sorted(root.rglob("cube_*.npz"))
    if not cubes:
        raise StatsError(f"no cube_*.npz files under {root}; pass the directory prechip wrote")
    result = StatsResult({})
    for folder in sorted({c.parent for c in cubes}):
        collection = folder.name
        names = (
            list(bands)
            if bands
            else _manifest_bands(folder) or list(sensor_for(collection, platform).bands)
        )
        nodata = _nodata(collection, platform)
        group = _group_name(collection, platform) if not bands else collection
        for path in (c for c in cubes if c.parent == folder):
            with np.load(path) as cube:
                pixels = cube["pixels"]
            part = BandStats.from_pixels(pixels, names, nodata)
            previous = result.groups.get(group)
            result.groups[group] = part if previous is None else previous.merge(part)
            result.chips += pixels.shape[0]
    return result


def _manifest_bands(folder: Path) -> list[str] | None:
    for manifest in sorted(folder.glob("manifest*.parquet")):
        metadata = pq.read_schema(manifest).metadata or {}
        if b"stacchip:bands" in metadata:
            return list(json.loads(metadata[b"stacchip:bands"]))
    return None


def to_clay_yaml(groups: dict[str, BandStats]) -> str:
    """YAML in the layout of Clay's `configs/metadata.yaml` (platform -> bands -> mean/std)."""
    document: dict[str, Any] = {}
    for name, stats in groups.items():
        entry: dict[str, Any] = {"band_order": list(stats.bands)}
        known = SENSORS.get(name)
        if known is not None and all(b in stats.bands for b in known.rgb):
            entry["rgb_indices"] = [stats.bands.index(b) for b in known.rgb]
        rows = stats.rows()
        entry["bands"] = {
            "mean": {r["band"]: round(r["mean"], 6) for r in rows},
            "std": {r["band"]: round(r["std"], 6) for r in rows},
        }
        document[name] = entry
    return yaml.safe_dump(document, sort_keys=False)
