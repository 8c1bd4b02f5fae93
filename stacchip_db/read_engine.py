"""The read engine: selected chips read into arrays, by worker processes when asked.

prechip (npz cubes) and stats (band statistics) read their chips the same way; this module is
that way, and knows nothing of cubes, manifests or statistics. Its public API:

- **Blocks and tasks.** A caller cuts its chips into blocks (`ChipBlock`: rows of one chip size
  in which each item's chips are consecutive, as sorting by key makes them, and the bands to
  read; a prechip cube, a unit of stats work). `read_tasks(blocks, items, jobs=, lanes=)`
  groups each block's rows by item into `ReadTask`s of at most ceil(rows / (2 × jobs)) chips,
  so that `jobs` workers share even a block of one item.
- **Reading.** `read_task(task, out=None)` reads a task's chips in this process
  (`reader.read_item_chips`: each asset opened once, only the chips' windows), into `out` when
  given, through `DATASETS`. `read_blocks(blocks, items, jobs=, lanes=, progress=)` yields
  each block as soon as all its tasks are back (`BlockRead`: float32 pixels
  `(rows, bands, size, size)`, which rows could be read, their `FailedChip`s); with `jobs` > 1
  the pixels live in shared memory and the workers read straight into them.
- **Workers.** `run_tasks(tasks, work, jobs=, before_submit=)` yields `work(task)` (a
  `TaskResult`) for every task in completion order; with `jobs` > 1, `work` (a module-level
  function, or a `functools.partial` of one) runs in that many forked worker processes, at
  most 2 × jobs tasks in flight. Workers die with their parent (`PR_SET_PDEATHSIG` on Linux,
  else they poll its pid), leave SIGINT and SIGHUP to it, and are ended (SIGTERM, then
  SIGKILL) when the consumer stops early.
- **Open datasets.** `DATASETS` (a `DatasetCache`) holds the rasterio datasets this process
  and thread have opened, keyed by signed href, LRU-bounded and forgotten after a fork: each
  worker process has its own, and keeps its tasks' assets open for the next task. A
  random-access reader in any process (`reader.read_chip(..., cache=DATASETS)`) reuses it the
  same way.
- **Stopping.** `stops_cleanly(stopped)` makes a function that runs the engine stop cleanly on
  SIGTERM, SIGINT and SIGHUP: the `finally` blocks on the way out end the workers and unlink
  the shared memory (and remove the caller's partial files), then the caller gets
  `stopped(signal_name)` raised.
- **Failures.** A chip that cannot be read fails alone: `failed_chips` turns the reader's
  failures into `FailedChip`s (the row, the first href that failed it, why).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import groupby
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np
import rasterio

from stacchip_db.reader import ChipFailure, ItemChips, configure_gdal, is_remote, read_item_chips
from stacchip_db.signing import sign_href

if TYPE_CHECKING:  # dataset imports this module (its ChipDataset reads through DATASETS)
    from stacchip_db.dataset import ChipRow

log = logging.getLogger(__name__)


# -- open datasets ------------------------------------------------------------------------------


class DatasetCache:
    """Open rasterio datasets of this process and thread, keyed by href (LRU, bounded).

    GDAL datasets must not be shared between threads or inherited across fork (their file
    offsets would be shared), so the cache is per thread and forgets everything when it finds
    itself in a new process.
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._local = threading.local()

    def _entries(self) -> OrderedDict[str, Any]:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.pid = os.getpid()
            local.entries = OrderedDict()  # inherited handles: dropped, not closed
        return local.entries

    def open(self, href: str, *, sign: bool | None = None) -> Any:
        """The open dataset of `href` (signed when it needs it), opened on first use.

        Keyed by the signed href: when its token is renewed, the dataset is opened again
        with the new one rather than reading on with an expired token.
        """
        entries = self._entries()
        href = sign_href(href, sign=sign)
        src = entries.get(href)
        if src is not None:
            entries.move_to_end(href)
            return src
        if is_remote(href):
            configure_gdal()
        src = rasterio.open(href)
        entries[href] = src
        while len(entries) > self.size:
            _, old = entries.popitem(last=False)
            old.close()
        return src

    def clear(self) -> None:
        """Close every dataset this thread holds."""
        entries = self._entries()
        while entries:
            entries.popitem()[1].close()


DATASETS = DatasetCache()
"""This process's open datasets: each worker's, and random-access readers'."""


# -- stopping on signals ------------------------------------------------------------------------


STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)
)
"""Signals that stop a run cleanly (`stops_cleanly`)."""


class _Stop(BaseException):
    """Raised in the main thread by a stop signal. A BaseException, so that no `except
    Exception` on the way (a chip read recording its failure) mistakes it for a failed read."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal_name = signal.Signals(signum).name


def stops_cleanly(
    stopped: Callable[[str], BaseException],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator: run the function so that SIGTERM, SIGINT and SIGHUP stop it cleanly.

    The signal raises `_Stop` in the main thread, the `finally` blocks on the way out end the
    worker processes and remove shared memory and partial files (later signals are ignored
    meanwhile), and the caller gets `stopped(signal_name)` (a one-line error) raised. The
    previous handlers come back at the end. Outside the main thread (where Python takes no
    signals) the function runs as it is.
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
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
                raise stopped(stop.signal_name) from None
            finally:
                stopping = True  # a signal from here on finds the work done: nothing to raise
                for signum, old in previous.items():
                    signal.signal(signum, old)

        return wrapper

    return decorate


# -- blocks and tasks ---------------------------------------------------------------------------


class ChipBlock(Protocol):
    """Chips read together into one array: rows of one chip size in which each item's chips
    are consecutive (sorted by key), and the bands to read, in order."""

    @property
    def rows(self) -> Sequence[ChipRow]: ...

    @property
    def bands(self) -> Sequence[str]: ...


Block = TypeVar("Block", bound=ChipBlock)


@dataclass(frozen=True)
class ReadTask:
    """Chips `positions` (consecutive rows of block `block`) of one item, read together."""

    block: int
    block_rows: int
    positions: tuple[int, ...]
    item: dict[str, Any]
    chips: tuple[tuple[int, int], ...]
    bands: tuple[str, ...]
    chip_size: int
    lanes: int | None

    @property
    def rows(self) -> slice:
        """The task's rows of its block: consecutive, as `read_tasks` cuts runs of rows."""
        return slice(self.positions[0], self.positions[-1] + 1)

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """The shape of its block's pixels: `(rows, bands, chip_size, chip_size)`."""
        return (self.block_rows, len(self.bands), self.chip_size, self.chip_size)


def read_tasks(
    blocks: Sequence[ChipBlock],
    items: dict[tuple[str, str], dict[str, Any]],
    *,
    jobs: int = 1,
    lanes: int | None = None,
) -> list[ReadTask]:
    """Per block, per item: tasks of at most ceil(block rows / (2 x jobs)) chips with workers.

    Several tasks per worker and block balance the load (chips differ in decoding cost); a
    worker keeps its datasets open between tasks, so smaller tasks cost no extra opens.
    """
    tasks = []
    parts = 1 if jobs <= 1 else 2 * jobs
    for index, block in enumerate(blocks):
        rows = block.rows
        chunk = max(1, math.ceil(len(rows) / parts))
        # an item's chips are consecutive rows of a block (its contract)
        for key, group in groupby(range(len(rows)), key=lambda p: rows[p].item_key):
            members = list(group)
            for start in range(0, len(members), chunk):
                part = members[start : start + chunk]
                tasks.append(
                    ReadTask(
                        index,
                        len(rows),
                        tuple(part),
                        items[key],
                        tuple((rows[p].chip_index_x, rows[p].chip_index_y) for p in part),
                        tuple(block.bands),
                        rows[part[0]].chip_size,
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


def read_task(task: ReadTask, out: np.ndarray | None = None) -> ItemChips:
    """Read the task's chips in this process, into `out` (its rows of the block) when given;
    the assets stay open in `DATASETS` for the process's next task."""
    return read_item_chips(
        task.item,
        task.chips,
        task.bands,
        chip_size=task.chip_size,
        lanes=task.lanes,
        out=out,
        datasets=DATASETS,
    )


# -- worker processes ---------------------------------------------------------------------------


def run_tasks(
    tasks: Sequence[ReadTask],
    work: Callable[[ReadTask], TaskResult],
    *,
    jobs: int = 1,
    before_submit: Callable[[ReadTask], object] | None = None,
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
            _end_processes(set(multiprocessing.active_children()) - before)
            # Then the pool, waiting for its manager thread, which ends on seeing its workers
            # gone. shutdown(wait=False) would forget that thread while it still runs: it then
            # closes its wake-up pipe while concurrent.futures' exit hook writes to it, and a
            # traceback ("Exception ignored … Bad file descriptor") follows the one-line message.
            pool.shutdown(wait=True, cancel_futures=True)


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


# -- failures -----------------------------------------------------------------------------------


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


# -- blocks read into (shared) memory -----------------------------------------------------------


def _shared_name(prefix: str, block: int) -> str:
    return f"{prefix}-{block}"


def _attach(name: str) -> SharedMemory:
    # Python >= 3.13: an attaching process must not track (and later unlink) the segment;
    # before that, forked workers share the parent's resource tracker, which is harmless.
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    return SharedMemory(name=name)


def read_into_shared(prefix: str, task: ReadTask) -> TaskResult:
    """Worker function of `read_blocks` with `jobs` > 1: read the task's chips straight into
    its block, which lives in shared memory (no pixels travel through pipes, no copy in the
    parent)."""
    shm = _attach(_shared_name(prefix, task.block))
    try:
        pixels = np.ndarray(task.block_shape, dtype=np.float32, buffer=shm.buf)
        got = read_task(task, pixels[task.rows])
        ok, failures = got.ok, got.failures
        del pixels, got  # views of the segment must go before it is closed
    finally:
        shm.close()
    return TaskResult(task, None, ok, failures)


@dataclass
class BlockRead(Generic[Block]):
    """A block's pixels (float32, all its rows) and which rows could be read."""

    block: Block
    pixels: np.ndarray
    ok: np.ndarray
    failures: list[FailedChip] = field(default_factory=list)


def read_blocks(
    blocks: Sequence[Block],
    items: dict[tuple[str, str], dict[str, Any]],
    *,
    jobs: int = 1,
    lanes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[BlockRead[Block]]:
    """Each block's pixels as soon as all its chips are read (blocks in completion order).

    The chips are read straight into the float32 array (GDAL converts while it decodes); with
    `jobs` > 1 the array lives in shared memory and the workers write their rows into it. A
    yielded block's pixels are valid until the next iteration. `progress(n)` is told of every
    `n` chips read.
    """
    tasks = read_tasks(blocks, items, jobs=jobs, lanes=lanes)
    remaining = [0] * len(blocks)
    for task in tasks:
        remaining[task.block] += 1
    buffers: dict[int, BlockRead[Block]] = {}
    shared: dict[int, SharedMemory] = {}
    prefix = f"stacchip-{os.getpid()}-{uuid.uuid4().hex[:12]}"

    def block_of(task: ReadTask) -> BlockRead[Block]:
        read = buffers.get(task.block)
        if read is None:
            shape = task.block_shape
            if jobs > 1:  # workers write into it: shared memory
                size = int(np.prod(shape)) * 4
                segment = SharedMemory(_shared_name(prefix, task.block), create=True, size=size)
                shared[task.block] = segment
                pixels = np.ndarray(shape, dtype=np.float32, buffer=segment.buf)
            else:
                pixels = np.empty(shape, dtype=np.float32)
            read = buffers[task.block] = BlockRead(
                blocks[task.block], pixels, np.ones(task.block_rows, dtype=bool)
            )
        return read

    def results() -> Iterator[TaskResult]:
        if jobs > 1:
            work = functools.partial(read_into_shared, prefix)
            yield from run_tasks(tasks, work, jobs=jobs, before_submit=block_of)
            return
        for task in tasks:
            got = read_task(task, block_of(task).pixels[task.rows])
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
            read = block_of(task)
            read.ok[task.rows] = result.ok
            rows = [read.block.rows[p] for p in task.positions]
            read.failures += failed_chips(rows, result.failures)
            if progress is not None:
                progress(len(task.positions))
            remaining[task.block] -= 1
            if remaining[task.block] == 0:
                yield buffers.pop(task.block)
                release(task.block)
    finally:
        for index in list(shared):
            release(index)
