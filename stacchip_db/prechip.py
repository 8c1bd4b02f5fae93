"""prechip: the chips a query selects, as npz cubes in the Clay model's training format.

The plan, deterministic for a given selection (so Batch array jobs agree on it):

1. chips are sorted by key (collection, item, chip size, y, x), so the chips of an item are
   neighbours and the result does not depend on the query's row order or plan;
2. each collection's chips are cut into cubes of `cube_size` (`cube_{k}.npz`, k from 0); the
   last, partial cube is dropped unless `keep_partial`;
3. shard I of N (`shard_index`, `shard_count`) takes the I-th of N contiguous runs of cubes
   (cubes, not chips, so shards never write the same file);
4. the cubes are read by the read engine (`read_engine.read_blocks`: each cube's chips grouped
   by item into read tasks, run in `jobs` worker processes that read straight into the cube);
5. a cube is written when all its tasks are back; a chip that could not be read is logged and
   left out of its cube, and counted in the summary.

Cube contents (docs/architecture.md, "Exports", "npz cubes"): `pixels` float32 `(N, C, H, W)`
in the platform's band order, `lat_norm`, `lon_norm`, `week_norm`, `hour_norm` float32
`(N, 2)`. Beside the cubes, `manifest.parquet` lists per cube and row the chip id, item, x, y,
datetime and footprint. Each file is written whole or not at all (`storage.write_atomically`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stacchip_db.chip_schema import CHIP_TYPES, FOOTPRINT_METADATA, chip_field
from stacchip_db.dataset import ChipRow, ChipSelection, bands_for, check_one_chip_size, clay_norms
from stacchip_db.errors import ConfigError, StacchipError
from stacchip_db.paths import is_safe_name
from stacchip_db.read_engine import BlockRead, read_blocks, stops_cleanly
from stacchip_db.text import plural

log = logging.getLogger(__name__)

CUBE_SIZE = 128
"""Chips per cube (the Clay model's training batches)."""


class PrechipError(StacchipError):
    """The export cannot run as asked (mixed chip sizes, bad shard, unwritable output)."""


class PrechipStopped(PrechipError):
    """The export was stopped by a signal; workers, shared memory and partial files are gone."""


def _stopped(signal_name: str) -> PrechipStopped:
    return PrechipStopped(
        f"prechip was stopped by {signal_name}; the cubes it had written stay "
        "(no manifest), its worker processes, shared memory and partial files are "
        "cleaned up: run it again to finish"
    )


# -- shards -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Part `index` (0-based) of `count` equal parts of the work."""

    index: int
    count: int

    @classmethod
    def checked(cls, index: int, count: int, what: str) -> Shard:
        """The shard, or a ConfigError naming `what` (where the numbers came from)."""
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"{what}: need 0 <= I < N and N >= 1 (got I={index}, N={count})")
        return cls(index, count)

    def part(self, n: int) -> range:
        """Positions `[i*n//N, (i+1)*n//N)` of this shard among `n` things."""
        return range(self.index * n // self.count, (self.index + 1) * n // self.count)


def _shard(index: int | None, count: int | None) -> Shard | None:
    if index is None and count is None:
        return None
    if index is None or count is None:
        raise ConfigError("`shard_index` and `shard_count` go together: give both or neither")
    return Shard.checked(index, count, "`shard_index`/`shard_count`")


# -- the plan -----------------------------------------------------------------------------------


@dataclass
class CubePlan:
    """Cube `index` of `collection`: its chips, in order, and the bands to read (a block of
    the read engine, `read_engine.ChipBlock`)."""

    collection: str
    index: int
    rows: list[ChipRow]
    bands: list[str]

    @property
    def name(self) -> str:
        return f"{self.collection}/cube_{self.index}"


def _sort_key(row: ChipRow) -> tuple[str, str, int, int, int]:
    return row.collection, row.item_id, row.chip_size, row.chip_index_y, row.chip_index_x


def plan_cubes(
    selection: ChipSelection,
    *,
    cube_size: int = CUBE_SIZE,
    keep_partial: bool = False,
    bands: Sequence[str] | None = None,
    platform: str | None = None,
) -> list[CubePlan]:
    """Every cube of the selection, collections in name order (see the module doc)."""
    if cube_size < 1:
        raise ConfigError(f"`cube_size` {cube_size} is not a positive number of chips")
    plans: list[CubePlan] = []
    rows = sorted(selection.rows, key=_sort_key)
    for collection, group in groupby(rows, key=lambda r: r.collection):
        chips = list(group)
        if not is_safe_name(collection):  # it names the cubes' folder: it would escape `out`
            log.warning(
                "collection %r cannot be a folder name: its %d chips are not exported",
                collection,
                len(chips),
            )
            continue
        check_one_chip_size(collection, {r.chip_size for r in chips})
        collection_bands = bands_for(collection, bands, platform)
        for k, start in enumerate(range(0, len(chips), cube_size)):
            part = chips[start : start + cube_size]
            if len(part) < cube_size and not keep_partial:
                break
            plans.append(CubePlan(collection, k, part, collection_bands))
    return plans


def cube_arrays(
    cube: BlockRead[CubePlan], items: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, np.ndarray]:
    """The npz arrays of a cube, without the rows that could not be read."""
    keep = np.flatnonzero(cube.ok)
    rows = [cube.block.rows[i] for i in keep]
    pixels = cube.pixels if len(keep) == len(cube.ok) else cube.pixels[keep]
    if not rows:
        return {"pixels": pixels}
    return {"pixels": pixels, **clay_norms(rows, items)}


MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("cube", pa.int32(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        # `location` may be null: rows made by hand (ChipRow's default) have none
        *(
            chip_field(name, nullable=name == "location")
            for name in CHIP_TYPES
            if name != "geometry"
        ),
        chip_field("geometry", nullable=False).with_metadata(FOOTPRINT_METADATA),
    ]
)
"""Manifest columns: one row per chip written, `(cube, row)` its place in `cube_{cube}.npz`."""

TIME_SERIES_MANIFEST_SCHEMA = MANIFEST_SCHEMA.insert(
    2, pa.field("step", pa.int32(), nullable=False)
)
"""Manifest of time-series cubes: one row per (place, date, chip), `(cube, row, step)` its
place in `pixels[row, step]` of `cube_{cube}.npz`."""


def manifest_name(shard: Shard | None) -> str:
    """`manifest.parquet`, or `manifest-{I}-of-{N}.parquet` for a shard (no two shards clash)."""
    return (
        "manifest.parquet"
        if shard is None
        else (f"manifest-{shard.index}-of-{shard.count}.parquet")
    )


def _manifest_table(
    entries: list[tuple[int, int, int | None, ChipRow]], bands: list[str]
) -> pa.Table:
    """The manifest of `(cube, row, step or None, chip)` entries (steps: time series)."""
    schema = MANIFEST_SCHEMA if entries[0][2] is None else TIME_SERIES_MANIFEST_SCHEMA
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    for cube, row_index, step, row in sorted(entries, key=lambda e: (e[0], e[1], e[2] or 0)):
        for name, value in (
            ("cube", cube),
            ("row", row_index),
            ("step", step),
            ("chip_id", row.chip_id),
            ("collection", row.collection),
            ("item_id", row.item_id),
            ("chip_size", row.chip_size),
            ("chip_index_x", row.chip_index_x),
            ("chip_index_y", row.chip_index_y),
            ("datetime", row.datetime),
            ("cloud_fraction", row.cloud_fraction),
            ("nodata_fraction", row.nodata_fraction),
            ("location", row.location),
            ("geometry", row.geometry),
        ):
            if name in columns:
                columns[name].append(value)
    table = pa.table(columns, schema=schema)
    geo = {
        "version": "1.0.0",
        "primary_column": "geometry",
        "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"]}},
    }
    return table.replace_schema_metadata(
        {b"geo": json.dumps(geo).encode(), b"stacchip:bands": json.dumps(bands).encode()}
    )


class CubeStore:
    """Where cubes go: a local directory, or `s3://bucket/prefix` (boto3, usual endpoint)."""

    def __init__(self, out: str) -> None:
        self.out = out.rstrip("/") if out.startswith("s3://") else out
        self.remote = out.startswith("s3://")
        if not self.remote:
            try:
                Path(out).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise PrechipError(f"cannot create output directory {out}: {e.strerror}") from e

    def url(self, name: str) -> str:
        return f"{self.out}/{name}" if self.remote else str(Path(self.out, name))

    def put(self, name: str, write: Callable[[Path], None]) -> str:
        """Write `name` through `write(local_path)`, whole or not at all (a stop signal or an
        error leaves no partial file); its path or URL."""
        # storage imports boto3: only once there is a cube to write
        from stacchip_db.storage import write_atomically

        url = self.url(name)
        try:
            write_atomically(url, write)
        except OSError as e:
            raise PrechipError(f"cannot write {url}: {e.strerror}") from e
        return url


def _save_npz(arrays: dict[str, Any], compress: bool) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        if not any(hasattr(value, "write_npy") for value in arrays.values()):
            with open(path, "wb") as f:
                (np.savez_compressed if compress else np.savez)(f, **arrays)
            return
        # Time-series pixels (`time_series.StackedPixels`) write themselves chip by chip: the
        # same zip of `.npy` members np.savez writes, without gathering them first.
        import zipfile

        method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        with zipfile.ZipFile(path, "w", compression=method, allowZip64=True) as archive:
            for name, value in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    if hasattr(value, "write_npy"):
                        value.write_npy(member)
                    else:
                        np.lib.format.write_array(member, np.asanyarray(value))

    return write


@dataclass
class PrechipSummary:
    """What an export did."""

    selected: int = 0
    planned: int = 0
    written: int = 0
    failed: int = 0
    not_in_full_cube: int = 0
    unsafe_names: int = 0
    """Chips not exported because their collection cannot be a folder name."""
    cubes: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    time_series: int | None = None
    """T of a time-series export (`pixels` (N, T, C, H, W)), else None."""
    locations: int = 0
    """Time series: places written (each with T chips)."""
    short_locations: int = 0
    """Time series: places left out because fewer than T of their dates were selected."""

    def describe(self) -> str:
        rate = self.written / self.seconds if self.seconds else 0.0
        places = (
            f" ({plural(self.locations, 'location')} x {self.time_series} dates)"
            if self.time_series
            else ""
        )
        text = (
            f"wrote {self.written} chips{places} in {self.cubes} cube{'s' * (self.cubes != 1)} "
            f"({rate:.1f} chips/s, "
            f"{self.seconds:.1f} s) of {self.selected} selected"
        )
        if self.short_locations:
            text += (
                f"; {plural(self.short_locations, 'location')} with fewer than "
                f"{self.time_series} dates left out"
            )
        if self.planned != self.selected:
            text += f"; {self.planned} in this run's cubes"
        if self.not_in_full_cube:
            text += f"; {self.not_in_full_cube} left over in a partial cube (`keep_partial`)"
        if self.failed:
            text += f"; {plural(self.failed, 'chip')} could not be read and were left out"
        if self.unsafe_names:
            skipped = plural(self.unsafe_names, "chip")
            text += f"; {skipped} skipped: collection cannot be a folder name"
        return text


@stops_cleanly(_stopped)
def export_cubes(
    selection: ChipSelection,
    out: str,
    *,
    cube_size: int = CUBE_SIZE,
    bands: Sequence[str] | None = None,
    platform: str | None = None,
    jobs: int = 1,
    lanes: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    keep_partial: bool = False,
    compress: bool = False,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    time_series: int | None = None,
    pick: str = "least-cloudy",
) -> PrechipSummary:
    """Write the selection as npz cubes + manifest under `out` (see the module doc).

    `shard_index` and `shard_count` (both or neither) write only that part of the cubes (an
    AWS Batch array job's: `batch.array_job_shard`). `on_plan(n)` is told how many chips this
    run will read, before reading starts. With `time_series` T, a cube holds `cube_size`
    places at T dates each, picked by `pick` (`time_series.PICKS`; see `time_series`).
    """
    started = time.perf_counter()
    if jobs < 1:
        raise ConfigError(f"`jobs` {jobs} is not a positive number of processes")
    shard = _shard(shard_index, shard_count)
    unsafe = {c for c in {r.collection for r in selection.rows} if not is_safe_name(c)}
    skipped = sum(r.collection in unsafe for r in selection.rows) if unsafe else 0
    short = 0
    if time_series is None:
        plans: list[Any] = plan_cubes(
            selection, cube_size=cube_size, keep_partial=keep_partial, bands=bands,
            platform=platform,
        )  # fmt: skip
        in_cubes = sum(len(p.rows) for p in plans)
        not_in_cube = len(selection) - in_cubes - skipped
    else:
        from stacchip_db.time_series import plan_stack_cubes, plan_stacks

        if cube_size < 1:
            raise ConfigError(f"`cube_size` {cube_size} is not a positive number of chips")
        stacks, short = plan_stacks(selection.rows, time_series, pick)
        for collection in sorted(unsafe):
            log.warning("collection %r cannot be a folder name: its chips are not exported",
                        collection)  # fmt: skip
        stacks = [s for s in stacks if s.collection not in unsafe]
        plans = plan_stack_cubes(
            selection.rows, stacks, cube_size=cube_size, keep_partial=keep_partial,
            bands=bands, platform=platform,
        )  # fmt: skip
        not_in_cube = (len(stacks) - sum(len(p.stacks) for p in plans)) * time_series
    if shard is not None:
        plans = [plans[i] for i in shard.part(len(plans))]
    summary = PrechipSummary(
        selected=len(selection),
        planned=sum(len(p.rows) for p in plans),
        not_in_full_cube=not_in_cube,
        unsafe_names=skipped,
        time_series=time_series,
        short_locations=short,
    )
    store = CubeStore(out)
    if on_plan is not None:
        on_plan(summary.planned)
    manifests: dict[str, list[tuple[int, int, int | None, ChipRow]]] = {}
    bands_of: dict[str, list[str]] = {}
    for cube in read_blocks(plans, selection.items, jobs=jobs, lanes=lanes, progress=progress):
        plan = cube.block
        for failure in cube.failures:
            log.warning("%s; left out of %s", failure, plan.name)
        summary.failed += len(cube.failures)
        entries: list[tuple[int, int, int | None, ChipRow]] = []
        if time_series is None:
            arrays = cube_arrays(cube, selection.items)
            kept = [row for row, ok in zip(plan.rows, cube.ok, strict=True) if ok]
            entries = [(plan.index, i, None, row) for i, row in enumerate(kept)]
        else:
            from stacchip_db.time_series import stack_arrays

            arrays, places = stack_arrays(cube, selection.items)
            entries = [
                (plan.index, n, t, plan.rows[plan.order[k, t]])
                for n, k in enumerate(places)
                for t in range(time_series)
            ]
            summary.locations += len(places)
        del cube.pixels
        if not entries:
            continue
        summary.outputs.append(store.put(f"{plan.name}.npz", _save_npz(arrays, compress)))
        del arrays
        summary.cubes += 1
        summary.written += len(entries)
        manifests.setdefault(plan.collection, []).extend(entries)
        bands_of[plan.collection] = plan.bands
    for collection, entries in manifests.items():
        table = _manifest_table(entries, bands_of[collection])
        store.put(
            f"{collection}/{manifest_name(shard)}",
            lambda path, table=table: pq.write_table(table, path),
        )
    summary.seconds = time.perf_counter() - started
    return summary
