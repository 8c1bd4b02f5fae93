"""The bulk load: a collection's chips built apart, then attached as its partition.

`stacchip.chips` is partitioned by collection (alembic 0008). Maintaining indexes row by row
costs several times more than building them once after the rows are in, and it grows with
what is already stored; so `bulk_load` (the `index --bulk` path) builds each collection's
partition as a table of its own: rows by one binary COPY (`db/copy.py`) in primary-key order,
then the indexes of `stacchip.chips` (`stacchip.create_chip_partition_indexes`, alembic
0008: read from the catalog, so later indexes come too), then
`ATTACH PARTITION`, all in one transaction. The other collections' partitions are neither
rebuilt nor locked: ATTACH takes the parent's SHARE UPDATE EXCLUSIVE lock, which readers and
writers do not wait for. Only a collection that already has a partition (forced `--bulk`)
costs a short exclusive lock of `stacchip.chips` at the end, to swap its old partition for the
new one. The collections and pgstac partitions, the item locks and the pgstac upsert are the
store protocol's (`db/store.py`). `chips_table_is_empty` is how `index` chooses this path by
itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql

from stacchip_db.db.copy import copy_chip_rows
from stacchip_db.db.items import PreparedItem, prepare_item, with_locations
from stacchip_db.db.locks import (
    BULK_APPLICATION,
    CHIPS_TABLE,
    READ_LOCK_TIMEOUT_S,
    holder_of,
    set_lock_timeout,
)
from stacchip_db.db.store import (
    BATCH_ITEMS,
    OnConflict,
    StoreResult,
    check_idle,
    ensure_collections_and_partitions,
    lock_collections,
    lock_items,
    storing,
    upsert_items,
)

log = logging.getLogger(__name__)

BULK_MAINTENANCE_WORK_MEM = "1GB"
"""`maintenance_work_mem` of the bulk load's transaction (index builds sort in memory)."""
BULK_LOCK_ATTEMPT_S = 1.0
"""How long one attempt of the bulk load to lock stacchip.chips waits (see `_lock_exclusively`;
only to swap a collection's existing partition)."""
BULK_LOCK_PAUSE_S = 0.2
"""The pause between two such attempts, in which the sessions queued behind it go on."""

SCHEMA = CHIPS_TABLE.split(".")[0]
_PARENT = sql.SQL(CHIPS_TABLE)  # a constant of ours, not input

_BULK_COLUMNS = (
    "collection", "item_id", "chip_size", "chip_index_x", "chip_index_y", "datetime",
    "cloud_fraction", "nodata_fraction", "location", "geometry",
)  # fmt: skip


def bulk_columns(prepared: Sequence[PreparedItem]) -> tuple[str, ...]:
    """The COPY's columns: `location` only when every chips table carries it (`bulk_load`
    always gives it: `items.with_locations`)."""
    if all("location" in p.chips.column_names for p in prepared):
        return _BULK_COLUMNS
    return tuple(c for c in _BULK_COLUMNS if c != "location")


def bulk_copy_data(prepared: Sequence[PreparedItem], chip_size: int) -> tuple[bytes, int]:
    """Binary COPY data in `stacchip.chips`' own columns (`_BULK_COLUMNS`), and its rows.

    The geometry goes as the table's WKB (the column's typmod gives it SRID 4326); rows in
    primary-key order (`_bulk_copy_parts`).
    """
    parts, total = _bulk_copy_parts(prepared, chip_size)
    return b"".join(parts), total


def _bulk_copy_parts(prepared: Sequence[PreparedItem], chip_size: int) -> tuple[list[bytes], int]:
    """The COPY data as parts; rows in primary-key order (items by collection and id, then
    chip x, then y): the key's index build then sorts presorted input (0.6 -> 0.25 s for the
    200 NAIP items)."""
    # Items in key order (UTF-8 byte order: the server's order under C and C.UTF-8 collations;
    # under others the sort just does its usual work).
    prepared = sorted(prepared, key=lambda p: (p.collection.encode(), p.item_id.encode()))
    item_values = {
        "collection": [p.collection for p in prepared],
        "item_id": [p.item_id for p in prepared],
        "chip_size": [chip_size] * len(prepared),
        "datetime": [p.datetime for p in prepared],
    }
    return copy_chip_rows(
        bulk_columns(prepared), [p.chips for p in prepared], item_values, key_order=True
    )


def _dedupe(prepared: Sequence[PreparedItem]) -> tuple[list[PreparedItem], int]:
    """One entry per item, the last given (in the order of those last entries); duplicates."""
    last: dict[tuple[str, str], PreparedItem] = {}
    for p in prepared:
        last.pop((p.collection, p.item_id), None)
        last[(p.collection, p.item_id)] = p
    return list(last.values()), len(prepared) - len(last)


def bulk_load(
    conn: psycopg.Connection,
    pairs: Iterable[tuple[Mapping[str, Any], pa.Table]],
    *,
    chip_size: int,
    strict: bool = False,
    on_conflict: OnConflict | str = OnConflict.upsert,
    batch_items: int = BATCH_ITEMS,
    maintenance_work_mem: str = BULK_MAINTENANCE_WORK_MEM,
) -> StoreResult:
    """Store many items and their chips, each collection's partition built apart and attached.

    For large loads (a new collection, or many items at once): building indexes once costs
    several times less than maintaining them row by row. In ONE transaction:

    1. the collections' advisory locks, exclusive (their writers wait until the commit, then
       go on as usual), the items' advisory locks (as `store_items`), pgstac `upsert_items` in
       batches;
    2. per collection, a new table like `stacchip.chips` (its name from the partition
       registry, `stacchip.chip_partitions`) holding: the rows the collection's current
       partition keeps, if it has one (SHARE locked: read on, written by nobody), then all
       given chip rows by one binary COPY in primary-key order; then the primary key and
       every index of `stacchip.chips` (`stacchip.create_chip_partition_indexes`,
       `maintenance_work_mem` raised for the transaction) and a CHECK of its collection, so
       that ATTACH need not scan it;
    3. `ATTACH PARTITION` of each new table (the parent's SHARE UPDATE EXCLUSIVE lock: readers
       and writers of every collection go on). A collection that had a partition first
       detaches and drops it, under a short ACCESS EXCLUSIVE lock of `stacchip.chips`, asked
       for in short attempts (`_lock_exclusively`) by a transaction whose `application_name`
       is `locks.BULK_APPLICATION`, so that readers who give up waiting can name it. Commit.

    All or nothing: any error rolls everything back (nothing is stored). Items given more than
    once: the last one wins (`result.duplicates`). Bad items raise `ItemError` before the
    database is touched, as `store_items`. All chips are held in memory (about 300 bytes a
    chip: tables and COPY data) until the COPY. `result.timings` has the seconds of each step.
    """
    on_conflict = OnConflict(on_conflict)
    prepared, duplicates = _dedupe([prepare_item(item, chips) for item, chips in pairs])
    result = StoreResult(duplicates=duplicates)
    if not prepared:
        return result
    check_idle(conn)
    what = f"bulk loading {len(prepared)} items ({prepared[0].item_id} …)"
    timings = result.timings
    with storing(what, on_conflict):
        clock = time.perf_counter()
        result.collections_created = ensure_collections_and_partitions(
            conn, prepared, strict=strict, chip_partitions=False
        )
        timings["partitions"] = time.perf_counter() - clock
        with conn.transaction():
            clock = time.perf_counter()
            conn.execute(  # raised for this transaction only, never lowered
                "SELECT set_config('maintenance_work_mem', %s, true) WHERE pg_size_bytes("
                "current_setting('maintenance_work_mem')) < pg_size_bytes(%s)",
                (maintenance_work_mem, maintenance_work_mem),
            )
            # for this transaction only: readers that give up waiting name the bulk load
            conn.execute("SELECT set_config('application_name', %s, true)", (BULK_APPLICATION,))
            lock_collections(conn, (p.collection for p in prepared), exclusive=True)
            lock_items(conn, prepared)
            prepared = upsert_items(
                conn, prepared, chip_size, on_conflict, result, batch_items=batch_items
            )
            timings["upsert"] = time.perf_counter() - clock
            if not prepared:
                return result
            prepared = with_locations(prepared, chip_size)
            existing = dict(
                conn.execute(
                    "SELECT collection, partition FROM stacchip.chip_partitions "
                    "WHERE collection = ANY(%s)",
                    (sorted({p.collection for p in prepared}),),
                ).fetchall()
            )
            if existing:
                _replaced_items(conn, prepared)
            by_collection: dict[str, list[PreparedItem]] = {}
            for p in prepared:
                by_collection.setdefault(p.collection, []).append(p)
            built = [
                _build_partition(
                    conn, collection, existing.get(collection), items, chip_size,
                    timings,
                )
                for collection, items in sorted(by_collection.items())
            ]
            clock = time.perf_counter()
            if any(b.old is not None for b in built):
                _lock_exclusively(conn, CHIPS_TABLE)
            timings["lock"] = time.perf_counter() - clock
            clock = time.perf_counter()
            for b in built:
                _attach(conn, b)
            timings["attach"] = time.perf_counter() - clock
            clock = time.perf_counter()
        timings["commit"] = time.perf_counter() - clock
    result.items = len(prepared)
    result.chips = sum(b.rows for b in built)
    return result


@dataclass(frozen=True)
class _Built:
    """A collection's new partition, built and not yet attached."""

    collection: str
    table: sql.Composed  # stacchip.<name>
    name: str
    old: str | None  # the partition it replaces
    rows: int  # chip rows given for it (not counting the rows kept from `old`)


def _build_partition(
    conn: psycopg.Connection,
    collection: str,
    old: str | None,
    prepared: Sequence[PreparedItem],
    chip_size: int,
    timings: dict[str, float],
) -> _Built:
    """A new table with the collection's rows and every index of `stacchip.chips`; `old` is
    the collection's current partition, whose rows of other items or sizes it keeps."""
    clock = time.perf_counter()
    # A name the database makes, never the collection id (user input).
    name = conn.execute(
        "SELECT 'chips_p' || nextval('stacchip.chip_partition_seq')"
    ).fetchone()[0]
    table = sql.SQL("{}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(name))
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
            "INCLUDING GENERATED INCLUDING STORAGE)"
        ).format(table, _PARENT)
    )
    # Checked row by row as the rows come (cheaper than a scan after); ATTACH then knows
    # every row belongs to the partition and does not scan it.
    conn.execute(
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK (collection = {})").format(
            table, sql.Identifier(f"{name}_collection"), sql.Literal(collection)
        )
    )
    if old is not None:
        old_table = sql.SQL("{}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(old))
        # Nobody writes it from now on (its writers wait for the collection lock already;
        # this also holds off writers that do not take it); readers go on.
        conn.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(old_table))
        columns = sql.SQL(", ").join(map(sql.Identifier, _BULK_COLUMNS))
        keys = sql.SQL(", ").join(map(sql.Identifier, _BULK_COLUMNS[:5]))
        conn.execute(
            sql.SQL(
                "INSERT INTO {new} ({columns}) SELECT {columns} FROM {old} o "
                "WHERE o.chip_size <> %s OR NOT EXISTS (SELECT 1 FROM stacchip_bulk_keys k "
                "WHERE k.collection = %s AND k.item_id = o.item_id) ORDER BY {keys}"
            ).format(new=table, columns=columns, old=old_table, keys=keys),
            (chip_size, collection),
        )
    timings["delete"] = timings.get("delete", 0.0) + time.perf_counter() - clock
    clock = time.perf_counter()
    parts, rows = _bulk_copy_parts(prepared, chip_size)
    with conn.cursor().copy(
        sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT binary)").format(
            table, sql.SQL(", ").join(map(sql.Identifier, _BULK_COLUMNS))
        )
    ) as copy:
        for part in parts:
            copy.write(part)
    del parts
    timings["copy"] = timings.get("copy", 0.0) + time.perf_counter() - clock
    clock = time.perf_counter()
    conn.execute("SELECT stacchip.create_chip_partition_indexes(%s)", (name,))
    timings["rebuild"] = timings.get("rebuild", 0.0) + time.perf_counter() - clock
    return _Built(collection, table, name, old, rows)


def _attach(conn: psycopg.Connection, built: _Built) -> None:
    """Attach `built` as its collection's partition (first dropping the one it replaces)."""
    if built.old is not None:
        old_table = sql.SQL("{}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(built.old))
        conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(_PARENT, old_table))
        conn.execute(sql.SQL("DROP TABLE {}").format(old_table))
        conn.execute(
            "UPDATE stacchip.chip_partitions SET partition = %s WHERE collection = %s",
            (built.name, built.collection),
        )
    else:
        conn.execute(
            "INSERT INTO stacchip.chip_partitions (collection, partition) VALUES (%s, %s)",
            (built.collection, built.name),
        )
    conn.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES IN ({})").format(
            _PARENT, built.table, sql.Literal(built.collection)
        )
    )
    # The partition bound says it now; the CHECK would only cost every write a test.
    conn.execute(
        sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            built.table, sql.Identifier(f"{built.name}_collection")
        )
    )


def _replaced_items(conn: psycopg.Connection, prepared: Sequence[PreparedItem]) -> None:
    """The items being loaded, as a temp table `stacchip_bulk_keys` (a partition rebuilt
    leaves out their old rows: one hashed anti-join, whatever the number of items)."""
    conn.execute(
        "CREATE TEMP TABLE stacchip_bulk_keys (collection text, item_id text) ON COMMIT DROP"
    )
    with conn.cursor().copy("COPY stacchip_bulk_keys (collection, item_id) FROM STDIN") as copy:
        for p in prepared:
            copy.write_row((p.collection, p.item_id))
    conn.execute("ANALYZE stacchip_bulk_keys")


def _lock_exclusively(conn: psycopg.Connection, table: str) -> None:
    """`LOCK TABLE … IN ACCESS EXCLUSIVE MODE`, asked for in short attempts.

    While a lock request waits (for a long read to end, say), every later reader and writer
    of the table queues behind it, even though nobody holds the table yet. So each attempt
    gives up after `BULK_LOCK_ATTEMPT_S` (a savepoint: the rest of the transaction stays),
    steps aside for a moment to let the queue through, and asks again, until it is granted.
    """
    previous = conn.execute("SELECT current_setting('lock_timeout')").fetchone()[0]
    attempts = 0
    while True:
        try:
            with conn.transaction():
                set_lock_timeout(conn, BULK_LOCK_ATTEMPT_S)
                conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            break
        except psycopg.errors.LockNotAvailable:
            attempts += 1
            if attempts == 1:
                log.info(
                    "bulk load: waiting for %s to end (it uses %s)",
                    holder_of(conn, table) or "another session",
                    table,
                )
            time.sleep(BULK_LOCK_PAUSE_S)
    conn.execute("SELECT set_config('lock_timeout', %s, true)", (previous,))


def chips_table_is_empty(
    conn: psycopg.Connection, collections: Sequence[str] | None = None
) -> bool:
    """Whether `stacchip.chips` has no rows, or (`collections`) none of those collections
    (their partitions are missing or empty): where a bulk load builds partitions that nobody
    has filled yet. One probe of those partitions only; commits nothing.

    False also when another session holds the table exclusively for longer than
    `READ_LOCK_TIMEOUT_S` (a bulk load swapping a partition): the normal path the caller then
    takes waits for that load and goes on after it.
    """
    try:
        with conn.transaction():
            set_lock_timeout(conn, READ_LOCK_TIMEOUT_S)
            if collections is None:
                query = f"SELECT NOT EXISTS (SELECT 1 FROM {CHIPS_TABLE})"
                return conn.execute(query).fetchone()[0]
            return conn.execute(  # the value prunes the other collections' partitions
                f"SELECT NOT EXISTS (SELECT 1 FROM {CHIPS_TABLE} WHERE collection = ANY(%s))",
                (sorted(set(collections)),),
            ).fetchone()[0]
    except psycopg.errors.LockNotAvailable:
        log.info(
            "%s is locked by %s: taken as not empty (the normal path waits for it)",
            CHIPS_TABLE,
            holder_of(conn) or "another session",
        )
        return False
