"""SQL that a user wrote (`--query`, `ChipDataset(query=…)`): the login it runs as, its deadline.

What a query's author can and cannot do is README's "Who runs your SQL". How:

- The query runs on a connection of its own whose *session* user is the restricted login that
  `db init` makes for this database (sql/020_query_login.sql; its password is in
  `stacchip.query_login`, which only the tool's login reads), or the one
  `STACCHIP_QUERY_DATABASE_URL` names. Never on the tool's connection: that may be a superuser's,
  and `SET ROLE` is no sandbox there, since the query could set `role` back.
- Before anything runs, `check_login` refuses a login that is, or may become, a role that can do
  more than read (superuser, CREATEROLE, CREATEDB, REPLICATION, BYPASSRLS, the server-file,
  program, signal and read/write-all roles, or one that may write `stacchip.chips`).
- The query runs in a READ ONLY, REPEATABLE READ transaction through a server-side cursor
  (exactly one SELECT), on the snapshot the tool's own transaction exported (the chips it
  returns are the ones the tool then looks up), and the transaction is always rolled back: a
  read-only transaction still lets `lo_from_bytea` create a large object.
- The deadline is kept by the client (`Deadline`): a timer cancels the running statement when the
  time is up, and again every `RECANCEL_S` until the query stops, and each fetch checks it
  first; so it covers the DECLARE and every FETCH, and nothing the query sets can lift it.
  The server's `statement_timeout` is set too, only as a fallback for a client that dies.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from stacchip_db.config import QUERY_DATABASE_URL_ENV, mask_url
from stacchip_db.db.connection import connect, masked_first_line
from stacchip_db.db.locks import READ_LOCK_TIMEOUT_S, set_lock_timeout
from stacchip_db.errors import DatabaseError, DatabaseUnavailable, StacchipError

RECANCEL_S = 0.25
"""After the deadline, how often the cancel request is sent again until the query stops (a
request that arrives between two FETCHes cancels nothing)."""
FETCH_ROWS = 5000
"""Rows per FETCH from the user's cursor (the deadline is checked before each)."""
CURSOR = "stacchip_user_query"

# Roles whose members may read or write server files, run programs or signal other sessions,
# or read/write every table: a login for user SQL must not be (or become) one of them.
_POWER_ROLES = (
    "pg_read_server_files", "pg_write_server_files", "pg_execute_server_program",
    "pg_signal_backend", "pg_read_all_data", "pg_write_all_data",
)  # fmt: skip
_CHECK_LOGIN = """
SELECT session_user, r.rolname, concat_ws(', ',
    CASE WHEN r.rolsuper THEN 'superuser' END, CASE WHEN r.rolcreaterole THEN 'createrole' END,
    CASE WHEN r.rolcreatedb THEN 'createdb' END, CASE WHEN r.rolreplication THEN 'replication' END,
    CASE WHEN r.rolbypassrls THEN 'bypassrls' END,
    CASE WHEN r.rolname = ANY (%(power)s) THEN 'server files, programs or signals' END,
    CASE WHEN has_table_privilege(r.oid, 'stacchip.chips', 'INSERT, UPDATE, DELETE, TRUNCATE')
         THEN 'writes stacchip.chips' END)
FROM pg_roles r
WHERE pg_has_role(session_user, r.oid, 'MEMBER')
  AND (r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls
       OR r.rolname = ANY (%(power)s)
       OR has_table_privilege(r.oid, 'stacchip.chips', 'INSERT, UPDATE, DELETE, TRUNCATE'))
ORDER BY r.rolname = session_user DESC, r.rolname
LIMIT 1
"""


class QueryError(StacchipError):
    """A user's query was refused, failed, ran past its deadline, or returned the wrong thing."""


class QueryLoginError(DatabaseError):
    """The restricted login for user SQL is missing, cannot log in, or may do more than read."""


# -- the login ----------------------------------------------------------------------------------


def login_url(conn: psycopg.Connection, database_url: str) -> str:
    """The URL of this database's restricted login: `database_url` with the role and password
    stored by `db init` (host, port, database and TLS settings stay the same).

    `conn` is the tool's connection to that database (it alone may read the password).
    """
    try:
        with conn.transaction():
            row = conn.execute("SELECT role, password FROM stacchip.query_login").fetchone()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege):
        row = None
    if row is None:
        raise QueryLoginError(
            f"the database at {mask_url(database_url)} has no restricted login for user SQL: "
            "run `stacchip-db db init` as a role with CREATEROLE, or set "
            f"{QUERY_DATABASE_URL_ENV} to a login that may only read"
        )
    return make_conninfo(database_url, user=row[0], password=row[1])


def connect_login(url: str, *, explicit: bool) -> psycopg.Connection:
    """Connect as the login for user SQL and `check_login` it; `explicit` when the URL came
    from `STACCHIP_QUERY_DATABASE_URL` (it changes what the error tells to fix)."""
    fix = (
        f"check {QUERY_DATABASE_URL_ENV}" if explicit
        else "run `stacchip-db db init` (it renews the login) or allow the role in pg_hba.conf"
    )  # fmt: skip
    try:
        conn = connect(url)
    except DatabaseUnavailable as exc:
        raise QueryLoginError(f"cannot log in for user SQL: {exc}; {fix}") from exc
    try:
        check_login(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def check_login(conn: psycopg.Connection) -> None:
    """Refuse a session whose user is, or may become, a role that can do more than read."""
    try:
        found = conn.execute(_CHECK_LOGIN, {"power": list(_POWER_ROLES)}).fetchone()
        conn.rollback()
    except psycopg.Error as exc:
        detail = masked_first_line(exc)
        raise QueryLoginError(f"cannot check the login for user SQL: {detail}") from exc
    if found is not None:
        user, role, powers = found
        through = "" if role == user else f" through role {role}"
        raise QueryLoginError(
            f"the login for user SQL ({user}) may do more than read{through} ({powers}); "
            f"run `stacchip-db db init` and use its login, or point {QUERY_DATABASE_URL_ENV} at "
            "a role that may only SELECT"
        )


# -- the deadline -------------------------------------------------------------------------------


class Deadline:
    """Cancel what `conn` runs once `seconds` have passed; `expired` says whether they have.

    A context manager around the statements it bounds. The timer thread sends libpq's cancel
    request (`cancel_safe`), and again every `RECANCEL_S`, until the block ends: a request that
    lands while the client is between two FETCHes cancels nothing, so callers also `check()`
    before each fetch.
    """

    def __init__(self, conn: psycopg.Connection, seconds: float) -> None:
        self.conn = conn
        self.seconds = seconds
        self.expired = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stacchip-deadline", daemon=True)

    def __enter__(self) -> Deadline:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        if self._done.wait(self.seconds):
            return
        self.expired.set()
        while True:
            with suppress(psycopg.Error):
                self.conn.cancel_safe(timeout=RECANCEL_S * 4)
            if self._done.wait(RECANCEL_S):
                return

    def check(self) -> None:
        """Raise `psycopg.errors.QueryCanceled` when the time is up."""
        if self.expired.is_set():
            raise psycopg.errors.QueryCanceled("canceling statement due to the client's deadline")


# -- running it ---------------------------------------------------------------------------------


def check_timeout(timeout_s: float) -> None:
    """Refuse a deadline that is not positive (before anything connects)."""
    if timeout_s <= 0:
        raise QueryError(f"`statement_timeout_s` must be positive, not {timeout_s:g}")


@dataclass
class UserRows:
    """The open result of a user's query: its column names, and its rows in batches."""

    columns: list[str]
    _cursor: psycopg.ServerCursor
    _deadline: Deadline

    def batches(self) -> Iterator[list[tuple[Any, ...]]]:
        """Rows `FETCH_ROWS` at a time, each fetch under the deadline."""
        while True:
            self._deadline.check()
            rows = self._cursor.fetchmany(FETCH_ROWS)
            if not rows:
                return
            yield rows


@contextmanager
def user_query(
    url: str,
    statement: sql.Composable,
    params: Any,
    *,
    timeout_s: float,
    snapshot: str | None = None,
    explicit_login: bool = False,
) -> Iterator[UserRows]:
    """Run a user's statement as the restricted login at `url` (from `login_url`, or
    `explicit_login` from STACCHIP_QUERY_DATABASE_URL), read-only, on `snapshot` (exported by
    the tool's transaction, `pg_export_snapshot()`), rolled back afterwards; the deadline
    `timeout_s` covers the statement and every fetch inside the block.

    Raises QueryError (one line, naming `query` and `statement_timeout_s`) when the database
    refuses or fails the statement or the deadline passes.
    """
    check_timeout(timeout_s)
    conn = connect_login(url, explicit=explicit_login)
    deadline = Deadline(conn, timeout_s)
    try:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        if snapshot is not None:
            try:
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            except psycopg.Error as exc:
                raise QueryLoginError(
                    f"the login for user SQL cannot share the tool's snapshot "
                    f"({masked_first_line(exc)}); point {QUERY_DATABASE_URL_ENV} at the same "
                    "database"
                ) from exc
        conn.execute(
            "SELECT set_config('statement_timeout', %s, true), "
            "set_config('search_path', 'pgstac, public', true)",
            (f"{max(1, round(timeout_s * 1000))}ms",),
        )
        # Behind a bulk load the query would wait in silence: give up soon, and the caller's
        # `locks.lock_waits` names who holds the table.
        set_lock_timeout(conn, READ_LOCK_TIMEOUT_S)
        with deadline:
            try:
                cursor = conn.cursor(name=CURSOR)
                cursor.execute(statement, params)
                columns = [d.name for d in cursor.description or []]
                yield UserRows(columns, cursor, deadline)
            except psycopg.errors.QueryCanceled as exc:
                raise _past_deadline(timeout_s) from exc
            except psycopg.errors.ReadOnlySqlTransaction as exc:
                raise QueryError(
                    f"`query` tried to write, and user SQL is read-only: {masked_first_line(exc)}"
                ) from exc
            except psycopg.Error as exc:
                if deadline.expired.is_set():  # a cancelled query may fail otherwise
                    raise _past_deadline(timeout_s) from exc
                raise QueryError(
                    "`query` must be one read-only SELECT that the restricted login may run; "
                    f"the database refused it: {masked_first_line(exc)}"
                ) from exc
    finally:
        # Closing without COMMIT rolls back whatever the query did (large objects included).
        conn.close()


def _past_deadline(timeout_s: float) -> QueryError:
    return QueryError(
        f"`query` ran past its deadline of {timeout_s:g} s (`statement_timeout_s`) and was "
        "cancelled; make it cheaper or raise `statement_timeout_s`"
    )


KEY_COLUMNS = ("collection", "item_id", "chip_size", "chip_index_x", "chip_index_y")
"""Columns a chip query must return: the key of `stacchip.chips`."""


def key_batches(result: Any) -> Iterator[list[tuple[Any, ...]]]:
    """The chip keys (`KEY_COLUMNS`) of a user query's result, batch by batch; a `QueryError`
    naming what is missing when the query does not return them all."""
    missing = [c for c in KEY_COLUMNS if c not in result.columns]
    if missing:
        raise QueryError(
            f"`query` does not return the chip key column(s) {', '.join(missing)} "
            f"(it returns {', '.join(result.columns) or 'nothing'}); select "
            f"{', '.join(KEY_COLUMNS)}"
        )
    where = [result.columns.index(c) for c in KEY_COLUMNS]
    for batch in result.batches():
        yield [tuple(row[i] for i in where) for row in batch]
