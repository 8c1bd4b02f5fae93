"""prechip: the chips a query selects, as npz cubes in the Clay model's training format.

The plan, deterministic for a given selection (so Batch array jobs agree on it):

1. chips are sorted by key (collection, item, chip size, y, x), so the chips of an item are
   neighbours and the result does not depend on the query's row order or plan;
2. each collection's chips are cut into cubes of `cube_size` (`cube_{k}.npz`, k from 0); the
   last, partial cube is dropped unless `keep_partial`;
3. `shard` I/N takes the I-th of N contiguous runs of cubes (cubes, not chips, so shards never
   write the same file);
4. each cube's chips are grouped by item into read tasks (split so that `jobs` workers share a
   single-item cube); a task opens each asset once and reads only its chips' windows
   (`reader.read_item_chips`); tasks run in `jobs` worker processes;
5. a cube is written when all its tasks are back; a chip that could not be read is logged and
   left out of its cube, and counted in the summary.

Cube contents (docs/architecture.md, "Exports", "npz cubes"): `pixels` float32 `(N, C, H, W)`
in the platform's band order, `lat_norm`, `lon_norm`, `week_norm`, `hour_norm` float32
`(N, 2)`. Beside the cubes, `manifest.parquet` lists per cube and row the chip id, item, x, y,
datetime and footprint.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import groupby
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stacchip_db.dataset import ChipRow, ChipSelection, bands_for, clay_norms
from stacchip_db.errors import ConfigError, StacchipError
from stacchip_db.paths import is_safe_name
from stacchip_db.reader import ChipFailure, ItemChips, read_item_chips
from stacchip_db.text import plural

log = logging.getLogger(__name__)

CUBE_SIZE = 128
"""Chips per cube (the Clay model's training batches)."""

BATCH_INDEX_ENV = "AWS_BATCH_JOB_ARRAY_INDEX"
BATCH_SIZE_ENV = "AWS_BATCH_JOB_ARRAY_SIZE"


class PrechipError(StacchipError):
    """The export cannot run as asked (mixed chip sizes, bad shard, unwritable output)."""


class PrechipStopped(PrechipError):
    """The export was stopped by a signal; workers, shared memory and partial files are gone."""


STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)
)
"""Signals that stop an export cleanly (`stops_cleanly`)."""


class _Stop(BaseException):
    """Raised in the main thread by a stop signal. A BaseException, so that no `except
    Exception` on the way (a chip read recording its failure) mistakes it for a failed read."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal_name = signal.Signals(signum).name


def stops_cleanly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run `func` so that SIGTERM, SIGINT and SIGHUP stop it cleanly: the signal raises `_Stop`
    in the main thread, the `finally` blocks on the way out end the worker processes and
    remove shared memory and partial files (later signals are ignored meanwhile), and the
    caller gets `PrechipStopped` (one line). The previous handlers come back at the end.
    Outside the main thread (where Python takes no signals) `func` runs as it is.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return func(*args, **kwargs)
        stopping = False

        def handler(signum: int, _frame: Any) -> None:
            nonlocal stopping
            if not stopping:
                stopping = True
                raise _Stop(signum)

        previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
        try:
            return func(*args, **kwargs)
        except _Stop as stop:
            raise PrechipStopped(
                f"prechip was stopped by {stop.signal_name}; the cubes it had written stay "
                "(no manifest), its worker processes, shared memory and partial files are "
                "cleaned up: run it again to finish"
            ) from None
        finally:
            stopping = True  # a signal from here on finds the work done: nothing to raise
            for signum, old in previous.items():
                signal.signal(signum, old)

    return wrapper


# -- shards -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Part `index` (0-based) of `count` equal parts of the work."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`I/N` -> Shard(I, N), checked."""
        try:
            index, count = (int(v) for v in text.split("/"))
        except ValueError as e:
            raise ConfigError(f"--shard {text!r} is not I/N (e.g. 0/4)") from e
        return cls.checked(index, count, f"--shard {text}")

    @classmethod
    def checked(cls, index: int, count: int, what: str) -> Shard:
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"{what}: need 0 <= I < N and N >= 1 (got I={index}, N={count})")
        return cls(index, count)

    def part(self, n: int) -> range:
        """Positions `[i*n//N, (i+1)*n//N)` of this shard among `n` things."""
        return range(self.index * n // self.count, (self.index + 1) * n // self.count)


def shard_from_options(
    shard: str | None, shard_count: int | None, environ: dict[str, str] | None = None
) -> Shard | None:
    """The shard from `--shard I/N`, else from `AWS_BATCH_JOB_ARRAY_INDEX` (N from
    `--shard-count` or `AWS_BATCH_JOB_ARRAY_SIZE`); None when neither is set."""
    environ = os.environ if environ is None else environ
    if shard is not None:
        return Shard.parse(shard)
    index_text = environ.get(BATCH_INDEX_ENV)
    if index_text is None:
        return None
    count_text = shard_count if shard_count is not None else environ.get(BATCH_SIZE_ENV)
    if count_text is None:
        raise ConfigError(
            f"{BATCH_INDEX_ENV} is set but the number of shards is not: pass --shard-count N "
            f"or set {BATCH_SIZE_ENV}"
        )
    try:
        return Shard.checked(int(index_text), int(count_text), BATCH_INDEX_ENV)
    except ValueError as e:
        raise ConfigError(
            f"{BATCH_INDEX_ENV}={index_text!r} / shard count {count_text!r} are not integers"
        ) from e


# -- the plan -----------------------------------------------------------------------------------


@dataclass
class CubePlan:
    """Cube `index` of `collection`: its chips, in order, and the bands to read."""

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
        raise ConfigError(f"--cube-size {cube_size} is not a positive number of chips")
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
        sizes = sorted({r.chip_size for r in chips})
        if len(sizes) > 1:
            raise PrechipError(
                f"collection {collection}: the selection mixes chip sizes {sizes}, which cannot "
                "share a cube; select one chip size (filter on chip_size)"
            )
        collection_bands = bands_for(collection, bands, platform)
        for k, start in enumerate(range(0, len(chips), cube_size)):
            part = chips[start : start + cube_size]
            if len(part) < cube_size and not keep_partial:
                break
            plans.append(CubePlan(collection, k, part, collection_bands))
    return plans


@dataclass(frozen=True)
class ReadTask:
    """Chips `positions` (consecutive rows of cube `cube`) of one item, read together."""

    cube: int
    cube_rows: int
    positions: tuple[int, ...]
    item: dict[str, Any]
    chips: tuple[tuple[int, int], ...]
    bands: tuple[str, ...]
    chip_size: int
    lanes: int | None


def read_tasks(
    plans: Sequence[CubePlan],
    items: dict[tuple[str, str], dict[str, Any]],
    *,
    jobs: int = 1,
    lanes: int | None = None,
) -> list[ReadTask]:
    """Per cube, per item: tasks of at most ceil(cube rows / (2 x jobs)) chips with workers.

    Several tasks per worker and cube balance the load (chips differ in decoding cost); a
    worker keeps its datasets open between tasks, so smaller tasks cost no extra opens.
    """
    tasks = []
    parts = 1 if jobs <= 1 else 2 * jobs
    for cube, plan in enumerate(plans):
        chunk = max(1, math.ceil(len(plan.rows) / parts))
        # plan rows are sorted by key: an item's chips are consecutive rows
        for key, group in groupby(range(len(plan.rows)), key=lambda p: plan.rows[p].item_key):
            members = list(group)
            for start in range(0, len(members), chunk):
                part = members[start : start + chunk]
                tasks.append(
                    ReadTask(
                        cube,
                        len(plan.rows),
                        tuple(part),
                        items[key],
                        tuple((plan.rows[p].chip_index_x, plan.rows[p].chip_index_y) for p in part),
                        tuple(plan.bands),
                        plan.rows[part[0]].chip_size,
                        lanes,
                    )
                )
    return tasks


@dataclass
class TaskResult:
    """What a worker sends back: pixels (native dtype) or any other value, and failures."""

    task: ReadTask
    value: Any
    ok: np.ndarray
    failures: list[ChipFailure]


def _shared_name(prefix: str, cube: int) -> str:
    return f"{prefix}-{cube}"


def _attach(name: str) -> SharedMemory:
    # Python >= 3.13: an attaching process must not track (and later unlink) the segment;
    # before that, forked workers share the parent's resource tracker, which is harmless.
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    return SharedMemory(name=name)


def _read_task(task: ReadTask, out: np.ndarray) -> ItemChips:
    """Read the task's chips into `out` (its rows of the cube), in this process."""
    return read_item_chips(
        task.item, task.chips, task.bands, chip_size=task.chip_size, lanes=task.lanes, out=out
    )


def read_into_shared(prefix: str, task: ReadTask) -> TaskResult:
    """Worker function of prechip with `--jobs`: read the task's chips straight into the cube,
    which lives in shared memory (no pixels travel through pipes, no copy in the parent)."""
    shm = _attach(_shared_name(prefix, task.cube))
    try:
        cube = np.ndarray(_cube_shape(task), dtype=np.float32, buffer=shm.buf)
        got = _read_task(task, cube[_rows(task)])
        ok, failures = got.ok, got.failures
        del cube, got  # views of the segment must go before it is closed
    finally:
        shm.close()
    return TaskResult(task, None, ok, failures)


def _cube_shape(task: ReadTask) -> tuple[int, int, int, int]:
    return (task.cube_rows, len(task.bands), task.chip_size, task.chip_size)


def run_tasks(
    tasks: Sequence[ReadTask],
    work: Callable[[ReadTask], TaskResult],
    *,
    jobs: int = 1,
    before_submit: Callable[[ReadTask], None] | None = None,
) -> Iterator[TaskResult]:
    """Results of `work(task)` for every task, in completion order.

    `jobs` > 1 runs them in that many worker processes (forked where the platform allows: the
    workers need nothing but the task), keeping at most 2 × jobs tasks in flight so memory stays
    bounded whatever the number of tasks. `before_submit(task)` runs in this process just
    before a task is handed to a worker.
    """
    if jobs <= 1:
        for task in tasks:
            yield work(task)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),)
    )
    finished = False
    try:
        pending: set[Future[TaskResult]] = set()
        queue = iter(tasks)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < 2 * jobs:
                task = next(queue, None)
                if task is None:
                    exhausted = True
                else:
                    if before_submit is not None:
                        before_submit(task)
                    pending.add(pool.submit(work, task))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
        finished = True
    finally:
        if finished:
            pool.shutdown(wait=True)
        else:
            # Stopped (a signal, an error, the consumer gave up): the tasks in flight are not
            # wanted, and waiting for them could take minutes. End the workers now.
            pool.shutdown(wait=False, cancel_futures=True)
            _end_processes(set(multiprocessing.active_children()) - before)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _worker_init(parent: int) -> None:
    """In each worker, first: die with the parent, and leave signals to the parent.

    A worker whose parent is gone (killed, even by SIGKILL) would wait for tasks for ever and
    keep its shared-memory segments mapped: on Linux the kernel kills it when the parent dies
    (`PR_SET_PDEATHSIG`), elsewhere a thread polls the parent's pid. A forked worker inherits
    the parent's Python handlers: SIGTERM gets its default action back (the parent ends the
    workers with it), and SIGINT and SIGHUP are ignored: Ctrl-C and a hang-up reach the whole
    process group, and the parent ends the workers itself.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.SIG_IGN)
    watched = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            watched = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if os.getppid() != parent:  # the parent died before the watch was set
        os._exit(1)
    if not watched:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _end_processes(processes: set[multiprocessing.process.BaseProcess]) -> None:
    """SIGTERM, then SIGKILL what is still there after a few seconds; reap them all."""
    for process in processes:
        with contextlib.suppress(OSError):
            process.terminate()
    deadline = time.monotonic() + 5.0
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


# -- assembling and writing cubes ---------------------------------------------------------------


@dataclass(frozen=True)
class FailedChip:
    """A selected chip that could not be read: the first asset href that failed it, and why.

    prechip, stats and preview report these one line each and count chips (not chip x asset).
    """

    row: ChipRow
    href: str
    message: str

    def __str__(self) -> str:
        return f"chip {self.row.chip_id}: cannot read {self.href} ({self.message})"


def failed_chips(rows: Sequence[ChipRow], failures: Sequence[ChipFailure]) -> list[FailedChip]:
    """The reader's failures (positions in `rows`) as `FailedChip`s."""
    return [FailedChip(rows[f.position], f.href, f.message) for f in failures]


@dataclass
class CubeRead:
    """A cube's pixels (float32, all planned rows) and which rows could be read."""

    plan: CubePlan
    pixels: np.ndarray
    ok: np.ndarray
    failures: list[FailedChip] = field(default_factory=list)


def read_cubes(
    plans: Sequence[CubePlan],
    items: dict[tuple[str, str], dict[str, Any]],
    *,
    jobs: int = 1,
    lanes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[CubeRead]:
    """Each cube's pixels as soon as all its chips are read (cubes in completion order).

    The chips are read straight into the float32 cube (GDAL converts while it decodes); with
    `jobs` > 1 the cube lives in shared memory and the workers write their rows into it. A
    yielded cube's pixels are valid until the next iteration.
    """
    tasks = read_tasks(plans, items, jobs=jobs, lanes=lanes)
    remaining = [0] * len(plans)
    for task in tasks:
        remaining[task.cube] += 1
    buffers: dict[int, CubeRead] = {}
    shared: dict[int, SharedMemory] = {}
    prefix = f"stacchip-{os.getpid()}-{uuid.uuid4().hex[:12]}"

    def cube_of(task: ReadTask) -> CubeRead:
        cube = buffers.get(task.cube)
        if cube is None:
            shape = _cube_shape(task)
            if jobs > 1:  # workers write into it: shared memory
                size = int(np.prod(shape)) * 4
                segment = SharedMemory(_shared_name(prefix, task.cube), create=True, size=size)
                shared[task.cube] = segment
                pixels = np.ndarray(shape, dtype=np.float32, buffer=segment.buf)
            else:
                pixels = np.empty(shape, dtype=np.float32)
            cube = buffers[task.cube] = CubeRead(
                plans[task.cube], pixels, np.ones(task.cube_rows, dtype=bool)
            )
        return cube

    def results() -> Iterator[TaskResult]:
        if jobs > 1:
            work = functools.partial(read_into_shared, prefix)
            yield from run_tasks(tasks, work, jobs=jobs, before_submit=cube_of)
            return
        for task in tasks:
            got = _read_task(task, cube_of(task).pixels[_rows(task)])
            yield TaskResult(task, None, got.ok, got.failures)

    def release(index: int) -> None:
        segment = shared.pop(index, None)
        if segment is not None:
            segment.unlink()  # the memory goes when the last view of it does
            with contextlib.suppress(BufferError):
                segment.close()

    try:
        for result in results():
            task = result.task
            cube = cube_of(task)
            cube.ok[_rows(task)] = result.ok
            rows = [cube.plan.rows[p] for p in task.positions]
            cube.failures += failed_chips(rows, result.failures)
            if progress is not None:
                progress(len(task.positions))
            remaining[task.cube] -= 1
            if remaining[task.cube] == 0:
                yield buffers.pop(task.cube)
                release(task.cube)
    finally:
        for index in list(shared):
            release(index)


def _rows(task: ReadTask) -> slice:
    """The cube rows of a task: consecutive, as `read_tasks` cuts runs of sorted rows."""
    return slice(task.positions[0], task.positions[-1] + 1)


def cube_arrays(
    cube: CubeRead, items: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, np.ndarray]:
    """The npz arrays of a cube, without the rows that could not be read."""
    keep = np.flatnonzero(cube.ok)
    rows = [cube.plan.rows[i] for i in keep]
    pixels = cube.pixels if len(keep) == len(cube.ok) else cube.pixels[keep]
    if not rows:
        return {"pixels": pixels}
    return {"pixels": pixels, **clay_norms(rows, items)}


MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("cube", pa.int32(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        pa.field("chip_id", pa.string(), nullable=False),
        pa.field("collection", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("chip_size", pa.int32(), nullable=False),
        pa.field("chip_index_x", pa.int32(), nullable=False),
        pa.field("chip_index_y", pa.int32(), nullable=False),
        pa.field("datetime", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("cloud_fraction", pa.float32(), nullable=False),
        pa.field("nodata_fraction", pa.float32(), nullable=False),
        pa.field(
            "geometry",
            pa.binary(),
            nullable=False,
            metadata={b"encoding": b"WKB", b"crs": b"EPSG:4326"},
        ),
    ]
)
"""Manifest columns: one row per chip written, `(cube, row)` its place in `cube_{cube}.npz`."""


def manifest_name(shard: Shard | None) -> str:
    """`manifest.parquet`, or `manifest-{I}-of-{N}.parquet` for a shard (no two shards clash)."""
    return (
        "manifest.parquet"
        if shard is None
        else (f"manifest-{shard.index}-of-{shard.count}.parquet")
    )


def _manifest_table(entries: list[tuple[int, int, ChipRow]], bands: list[str]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in MANIFEST_SCHEMA.names}
    for cube, row_index, row in sorted(entries, key=lambda e: (e[0], e[1])):
        for name, value in (
            ("cube", cube),
            ("row", row_index),
            ("chip_id", row.chip_id),
            ("collection", row.collection),
            ("item_id", row.item_id),
            ("chip_size", row.chip_size),
            ("chip_index_x", row.chip_index_x),
            ("chip_index_y", row.chip_index_y),
            ("datetime", row.datetime),
            ("cloud_fraction", row.cloud_fraction),
            ("nodata_fraction", row.nodata_fraction),
            ("geometry", row.geometry),
        ):
            columns[name].append(value)
    table = pa.table(columns, schema=MANIFEST_SCHEMA)
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
        """Write `name` through `write(local_path)`; atomic for local files (temp + rename)."""
        if self.remote:
            with tempfile.TemporaryDirectory(prefix="stacchip-cube-") as tmp:
                path = Path(tmp, Path(name).name)
                write(path)
                self._upload(path, name)
            return self.url(name)
        target = Path(self.out, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        try:
            write(partial)
            partial.replace(target)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise PrechipError(f"cannot write {target}: {e.strerror}") from e
        except BaseException:  # stopped (a signal) or failed mid-write: no half file stays
            partial.unlink(missing_ok=True)
            raise
        return str(target)

    def _upload(self, path: Path, name: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        from stacchip_db.storage import s3_client, split_s3

        bucket, key = split_s3(self.url(name))
        try:
            s3_client().upload_file(str(path), bucket, key)
        except (BotoCoreError, ClientError) as e:
            raise PrechipError(f"cannot write {self.url(name)}: {e}") from e


def _save_npz(arrays: dict[str, np.ndarray], compress: bool) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays)

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

    def describe(self) -> str:
        rate = self.written / self.seconds if self.seconds else 0.0
        text = (
            f"wrote {self.written} chips in {self.cubes} cube{'s' * (self.cubes != 1)} "
            f"({rate:.1f} chips/s, "
            f"{self.seconds:.1f} s) of {self.selected} selected"
        )
        if self.planned != self.selected:
            text += f"; {self.planned} in this run's cubes"
        if self.not_in_full_cube:
            text += f"; {self.not_in_full_cube} left over in a partial cube (--keep-partial)"
        if self.failed:
            text += f"; {plural(self.failed, 'chip')} could not be read and were left out"
        if self.unsafe_names:
            skipped = plural(self.unsafe_names, "chip")
            text += f"; {skipped} skipped: collection cannot be a folder name"
        return text


@stops_cleanly
def export_cubes(
    selection: ChipSelection,
    out: str,
    *,
    cube_size: int = CUBE_SIZE,
    bands: Sequence[str] | None = None,
    platform: str | None = None,
    jobs: int = 1,
    lanes: int | None = None,
    shard: Shard | None = None,
    keep_partial: bool = False,
    compress: bool = False,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> PrechipSummary:
    """Write the selection as npz cubes + manifest under `out` (see the module doc).

    `on_plan(n)` is told how many chips this run will read, before reading starts.
    """
    started = time.perf_counter()
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs} is not a positive number of processes")
    store = CubeStore(out)
    plans = plan_cubes(
        selection, cube_size=cube_size, keep_partial=keep_partial, bands=bands, platform=platform
    )
    in_cubes = sum(len(p.rows) for p in plans)
    if shard is not None:
        plans = [plans[i] for i in shard.part(len(plans))]
    unsafe = {c for c in {r.collection for r in selection.rows} if not is_safe_name(c)}
    skipped = sum(r.collection in unsafe for r in selection.rows) if unsafe else 0
    summary = PrechipSummary(
        selected=len(selection),
        planned=sum(len(p.rows) for p in plans),
        not_in_full_cube=len(selection) - in_cubes - skipped,
        unsafe_names=skipped,
    )
    if on_plan is not None:
        on_plan(summary.planned)
    manifests: dict[str, list[tuple[int, int, ChipRow]]] = {}
    bands_of: dict[str, list[str]] = {}
    for cube in read_cubes(plans, selection.items, jobs=jobs, lanes=lanes, progress=progress):
        plan = cube.plan
        for failure in cube.failures:
            log.warning("%s; left out of %s", failure, plan.name)
        summary.failed += len(cube.failures)
        arrays = cube_arrays(cube, selection.items)
        del cube.pixels
        kept = [row for row, ok in zip(plan.rows, cube.ok, strict=True) if ok]
        if not kept:
            continue
        summary.outputs.append(store.put(f"{plan.name}.npz", _save_npz(arrays, compress)))
        del arrays
        summary.cubes += 1
        summary.written += len(kept)
        entries = manifests.setdefault(plan.collection, [])
        entries.extend((plan.index, i, row) for i, row in enumerate(kept))
        bands_of[plan.collection] = plan.bands
    for collection, entries in manifests.items():
        table = _manifest_table(entries, bands_of[collection])
        store.put(
            f"{collection}/{manifest_name(shard)}",
            lambda path, table=table: pq.write_table(table, path),
        )
    summary.seconds = time.perf_counter() - started
    return summary
