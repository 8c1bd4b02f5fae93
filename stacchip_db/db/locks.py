"""Waiting for table locks: how long, and who to name when the wait is given up.

Readers of `stacchip.chips` (ACCESS SHARE) only ever wait for an ACCESS EXCLUSIVE lock: a bulk
load (`index --bulk`, which holds it until its commit), or DDL. Such a wait can last minutes,
and waiting in silence is useless to someone who asked for a list of chips: readers set a
short `lock_timeout` (`set_lock_timeout`) and, when it runs out, say which session holds the table
and what to do (`lock_waits` raises `TableLocked`).

The bulk load marks its transaction with `BULK_APPLICATION` (its `application_name` for that
transaction only), so that the message can say "a bulk load" instead of a pid.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import pq

from stacchip_db.errors import DatabaseError, StacchipError

log = logging.getLogger(__name__)

CHIPS_TABLE = "stacchip.chips"

READ_LOCK_TIMEOUT_S = 2.0
"""How long a reader waits for a lock before it gives up (a bulk load holds one for minutes)."""

BULK_APPLICATION = "stacchip-db index --bulk"
"""`application_name` of a bulk load's transaction (`pg_stat_activity` shows it)."""


class TableLocked(DatabaseError):
    """A statement gave up waiting for a lock another session holds."""


def set_lock_timeout(conn: psycopg.Connection, seconds: float) -> None:
    """`lock_timeout` for the current transaction only (`SET LOCAL`); 0 waits for ever."""
    conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{int(seconds * 1000)}ms",))


def holder_of(conn: psycopg.Connection, table: str = CHIPS_TABLE) -> str:
    """Who holds the strongest granted lock on `table` besides us, in words ("" if nobody).

    Call on a connection outside any failed transaction; it runs one catalog query and ends
    its own transaction if it had to start one.
    """
    idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
    try:
        row = conn.execute(
            """
            SELECT a.pid, a.application_name, l.mode,
                   extract(epoch FROM now() - a.xact_start)::int
            FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'relation' AND l.relation = to_regclass(%s) AND l.granted
              AND l.pid <> pg_backend_pid()
            ORDER BY l.mode = 'AccessExclusiveLock' DESC, a.xact_start
            LIMIT 1
            """,
            (table,),
        ).fetchone()
    except psycopg.Error as exc:  # the description is a courtesy: never hide the real error
        log.debug("could not look up who holds %s: %s", table, exc)
        row = None
    finally:
        if idle and not conn.autocommit and not conn.closed:
            conn.rollback()
    if row is None:
        return ""
    pid, application, mode, seconds = row
    since = f", {seconds} s so far" if seconds is not None else ""
    if application == BULK_APPLICATION:
        return f"a bulk load (index --bulk, pid {pid}{since})"
    who = f"application {application!r}" if application else "another session"
    return f"{who} (pid {pid}, {mode}{since})"


def locked_message(what: str, holder: str, table: str = CHIPS_TABLE) -> str:
    """The one line for a lock wait given up while doing `what`."""
    by = holder or "another session (it has ended since, or cannot be seen)"
    if holder.startswith("a bulk load"):
        advice = "try again when it ends"
    else:
        advice = "try again when it ends, or end that session"
    return f"{what}: {table} is locked by {by}; {advice}"


@contextmanager
def lock_waits(conn: psycopg.Connection, what: str, table: str = CHIPS_TABLE) -> Iterator[None]:
    """A lock wait inside the block that runs out (`lock_timeout`, see `set_lock_timeout`)
    raises `TableLocked`: one line naming `what` was being done and who holds `table`. The
    wait may come bare or already translated (a `StacchipError` caused by it).

    Open the transaction inside the block: the holder is looked up after it has rolled back.
    """
    try:
        yield
    except (psycopg.errors.LockNotAvailable, StacchipError) as exc:
        cause = exc if isinstance(exc, psycopg.Error) else exc.__cause__
        if not isinstance(cause, psycopg.errors.LockNotAvailable):
            raise
        if conn.info.transaction_status == pq.TransactionStatus.INERROR:
            conn.rollback()
        raise TableLocked(locked_message(what, holder_of(conn, table), table)) from cause
