"""`ItemWriter`: a stream of `(item, chips)` pairs stored in batches, one item's failure
sparing the others.

Each batch is one `store_items` call (`db/store.py`: its two transactions, item locks, COPY).
With `background=True` the batches are written by threads, one per connection, fed through a
bounded queue, so that indexing the next items overlaps with the database writing the
previous ones.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pyarrow as pa

from stacchip_db.db.items import ItemError, check_item, item_id_of
from stacchip_db.db.store import BATCH_ITEMS, OnConflict, StoreResult, store_items
from stacchip_db.errors import item_failure_line

log = logging.getLogger(__name__)

BATCH_CHIPS = 50_000
"""Default number of chips `ItemWriter` collects before writing a batch."""


@dataclass(frozen=True)
class ItemFailure:
    """An item that could not be stored, with the one-line reason."""

    item_id: str
    message: str


def _failure(item: Any, error: Exception) -> ItemFailure:
    item_id = item_id_of(item)
    return ItemFailure(item_id, item_failure_line(error, item_id))


class ItemWriter:
    """Store a stream of `(item, chips)` pairs in batches; one item's failure spares the rest.

        with ItemWriter(conn, chip_size=256) as writer:
            for item in items:
                writer.add(item, index_item(item))
        writer.result, writer.failures

    A batch is written (one `store_items` call) when it holds `batch_chips` chips or
    `batch_items` items, and at exit. When a batch fails, its items are stored one by one, so
    the bad ones are named in `failures` and the others stored. With `background=True` batches
    are written by a thread while the caller goes on indexing (the database works in its own
    process, so the two overlap even under the GIL); at most two batches wait in memory.
    `extra_connections` (background only; the caller opens and closes them) add one writer
    thread each, so several database backends insert at once.
    An item added twice is written by the later batch when there is one writer; with several,
    either version may end up stored (each consistently, never a mix).
    """

    def __init__(
        self,
        conn: psycopg.Connection,
        *,
        chip_size: int,
        strict: bool = False,
        on_conflict: OnConflict | str = OnConflict.upsert,
        batch_chips: int = BATCH_CHIPS,
        batch_items: int = BATCH_ITEMS,
        background: bool = False,
        extra_connections: Sequence[psycopg.Connection] = (),
    ) -> None:
        if extra_connections and not background:
            raise ValueError("extra_connections need background=True (one thread each)")
        self.conn = conn
        self.chip_size = chip_size
        self.strict = strict
        self.on_conflict = OnConflict(on_conflict)
        self.batch_chips = batch_chips
        self.batch_items = batch_items
        self.result = StoreResult()
        self.failures: list[ItemFailure] = []
        self._batch: list[tuple[Mapping[str, Any], pa.Table]] = []
        self._batch_keys: set[tuple[str, str]] = set()
        self._batch_rows = 0
        self._lock = threading.Lock()  # result and failures, shared by the writer threads
        self._queue: queue.Queue[list[tuple[Mapping[str, Any], pa.Table]] | None] | None = None
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        if background:
            connections = [conn, *extra_connections]
            self._queue = queue.Queue(maxsize=len(connections) + 1)
            for n, writer_conn in enumerate(connections):
                thread = threading.Thread(
                    target=self._drain,
                    args=(self._queue, writer_conn),
                    name=f"stacchip-store-{n}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)

    def __enter__(self) -> ItemWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    def add(self, item: Mapping[str, Any], chips: pa.Table) -> bool:
        """Queue one item (False and a failure when it cannot be stored); writes full batches."""
        try:
            key = check_item(item)[:2]
        except ItemError as e:  # caught before it can spoil a whole batch
            with self._lock:
                self.failures.append(ItemFailure(item_id_of(item), str(e)))
            return False
        if key in self._batch_keys:  # one item once per transaction
            self.flush()
        self._batch.append((item, chips))
        self._batch_keys.add(key)
        self._batch_rows += chips.num_rows
        if self._batch_rows >= self.batch_chips or len(self._batch) >= self.batch_items:
            self.flush()
        return True

    def flush(self) -> None:
        """Write (or hand to a writer thread) what has been added so far."""
        if not self._batch:
            return
        batch, self._batch, self._batch_keys, self._batch_rows = self._batch, [], set(), 0
        if self._queue is None:
            self._write(batch, self.conn)
            return
        self._raise_thread_error()
        self._queue.put(batch)

    def close(self) -> None:
        """Write the last batch and wait for the threads; re-raises a thread's crash."""
        try:
            self.flush()
        finally:
            if self._queue is not None:
                for _ in self._threads:
                    self._queue.put(None)
                for thread in self._threads:
                    thread.join()
                self._threads = []
        self._raise_thread_error()

    def _raise_thread_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _drain(
        self,
        batches: queue.Queue[list[tuple[Mapping[str, Any], pa.Table]] | None],
        conn: psycopg.Connection,
    ) -> None:
        while (batch := batches.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a dead thread
            try:
                self._write(batch, conn)
            except BaseException as e:  # handed to the caller by flush/close
                self._error = e

    def _write(
        self, batch: list[tuple[Mapping[str, Any], pa.Table]], conn: psycopg.Connection
    ) -> None:
        kwargs = {
            "chip_size": self.chip_size,
            "strict": self.strict,
            "on_conflict": self.on_conflict,
        }
        # Any exception of a batch (not only ours: a malformed item can raise anything) is
        # isolated to its items, except a lost connection, which every item would meet again.
        try:
            self._done(store_items(conn, batch, **kwargs))
            return
        except Exception as e:
            if conn.closed or conn.broken:
                raise
            if len(batch) == 1:
                self._done(failure=_failure(batch[0][0], e))
                return
            log.debug("batch of %d items failed (%s); storing them one by one", len(batch), e)
        for item, chips in batch:
            try:
                self._done(store_items(conn, [(item, chips)], **kwargs))
            except Exception as e:
                if conn.closed or conn.broken:
                    raise
                self._done(failure=_failure(item, e))

    def _done(self, result: StoreResult | None = None, failure: ItemFailure | None = None) -> None:
        with self._lock:
            if result is not None:
                self.result.add(result)
            if failure is not None:
                self.failures.append(failure)
