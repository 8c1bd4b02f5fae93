"""Connections to the database, and the one place where connection errors become ours.

`resolve_url` turns settings into a libpq URL (starting the embedded database when no URL is
given). `connect` opens a psycopg connection and translates failures into one-line
`DatabaseUnavailable` errors with the password masked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from stacchip_db.config import Settings, mask_url
from stacchip_db.db.embedded import EmbeddedCluster
from stacchip_db.errors import DatabaseError, DatabaseUnavailable
from stacchip_db.text import first_line

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10


def resolve_url(settings: Settings) -> str:
    """The database URL: the configured one, or the embedded database's (started if needed)."""
    if settings.database_url:
        return settings.database_url
    cluster = EmbeddedCluster(settings.home)
    cluster.ensure_running()
    return cluster.socket_url()


def _explain(exc: psycopg.OperationalError, url: str) -> str:
    """One line saying what went wrong and what to do about it."""
    raw = str(exc).strip()
    # libpq: "connection failed: connection to server at … failed: Connection refused", then
    # its hint "Is the server running …?" (once per address tried): keep the reason, drop the
    # hint, which our own advice below repeats.
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    reasons = [line for line in lines if not line.lower().startswith("is the server running")]
    detail = (reasons or lines or [exc.__class__.__name__])[-1]
    for prefix in ("connection failed: ", "connection is bad: "):
        detail = detail.removeprefix(prefix)
    lowered = raw.lower()
    masked = mask_url(url)
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return (
            f"database refused the login at {masked}: {detail.strip()}; "
            "check the user and password"
        )
    if "does not exist" in lowered and "database" in lowered:
        return f"{detail.strip()} at {masked}: create it (createdb) or fix the URL"
    if "connection refused" in lowered or "no such file" in lowered or "timeout" in lowered:
        return (
            f"cannot connect to the database at {masked}: {detail.strip()}; is the server running "
            "and the URL (--database-url / STACCHIP_DATABASE_URL) right?"
        )
    return f"cannot connect to the database at {masked}: {mask_url(detail.strip())}"


def connect(url: str, *, autocommit: bool = False, **kwargs: object) -> psycopg.Connection:
    """Open a psycopg connection; connection failures raise `DatabaseUnavailable` (one line)."""
    try:
        return psycopg.connect(
            url,
            autocommit=autocommit,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name="stacchip-db",
            **kwargs,
        )
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(_explain(exc, url)) from exc
    except psycopg.ProgrammingError as exc:  # malformed URL / conninfo
        raise DatabaseUnavailable(
            f"invalid database URL {mask_url(url)}: {mask_url(str(exc).strip())}"
        ) from exc


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn a database error raised inside into a one-line `DatabaseError` naming `what`."""
    try:
        yield
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"{what}: lost the database connection: {masked_first_line(exc)}"
        ) from exc
    except psycopg.Error as exc:
        raise DatabaseError(f"{what}: {masked_first_line(exc)}") from exc


def masked_first_line(exc: BaseException) -> str:
    """`text.first_line` with passwords masked: database errors may quote a URL."""
    return mask_url(first_line(exc))


class Database:
    """A database URL that passed the schema gate; commands open connections from it.

    `query_url`: the login user SQL runs as, when set explicitly (`STACCHIP_QUERY_DATABASE_URL`);
    None means the restricted login `db init` made (`stacchip_db.db.user_sql`).
    """

    def __init__(self, url: str, query_url: str | None = None) -> None:
        self.url = url
        self.query_url = query_url

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    def connect(self, *, autocommit: bool = False, **kwargs: object) -> psycopg.Connection:
        return connect(self.url, autocommit=autocommit, **kwargs)
