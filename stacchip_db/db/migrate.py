"""Bring a database to head (`db init`) and check it is there (the schema gate).

Order, each step idempotent:
1. extensions `postgis` and `btree_gist` (a clear error when PostGIS is not installed);
2. pgstac at the version pinned by pypgstac, through pypgstac's own migrations;
3. schema `stacchip` and alembic's revisions (version table inside `stacchip`);
4. the hand-written SQL files under `sql/`, in name order (templates: `sql_template.expand`),
   and their checksum.

A cluster-wide advisory lock serialises concurrent `db init` runs (many Batch jobs may start
at once against a new RDS database).

Contract with alembic/versions/: each revision file is `NNNN_name.py` with `revision = "NNNN"`
and `down_revision` the one before, so the head is the highest file-name number and the schema
gate that every command runs reads it from the directory listing without importing alembic
(importing it and reading the scripts cost ~0.3 s per command); tests/test_migrations.py checks
the naming and that this equals alembic's own head. alembic, SQLAlchemy and pypgstac's migrator
are imported only by `db init`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from pypgstac.version import __version__ as PGSTAC_VERSION

from stacchip_db.config import mask_url
from stacchip_db.db.connection import connect, translate_errors
from stacchip_db.db.sql_template import expand
from stacchip_db.errors import DatabaseError, PostgisMissing, SchemaBehind
from stacchip_db.resources import resource_dir

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

SCHEMA = "stacchip"
# Any constant works; it only has to be the same for every stacchip-db process.
INIT_LOCK_KEY = 0x57AC_C41B
FIX = "run `stacchip-db db init`"


def sql_files() -> list[Path]:
    """The shipped SQL files, in the order they are applied."""
    return sorted(resource_dir("sql").glob("*.sql"))


def sql_text(path: Path) -> str:
    """A shipped SQL file as it runs: its markers expanded (`sql_template`)."""
    return expand(path.read_text(), shipped_filters=True)


def sql_checksum() -> str:
    """One hash over the names and the SQL as run of all SQL files: changes when any does."""
    digest = hashlib.sha256()
    for path in sql_files():
        digest.update(path.name.encode() + b"\0" + sql_text(path).encode() + b"\0")
    return digest.hexdigest()[:16]


def alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resource_dir("alembic")))
    return config


@functools.cache
def alembic_head() -> str:
    """The head revision: the highest `NNNN` prefix under alembic/versions/ (see the contract
    in the module docstring)."""
    numbers = [
        path.name.split("_", 1)[0]
        for path in (resource_dir("alembic") / "versions").glob("[0-9][0-9][0-9][0-9]_*.py")
    ]
    if not numbers:
        raise RuntimeError("no alembic revisions shipped: the package is incomplete, reinstall it")
    return max(numbers)


@dataclass
class SchemaState:
    """Versions found in a database, against those this stacchip-db expects."""

    server_version: str
    postgis_version: str | None
    pgstac_version: str | None
    alembic_revision: str | None
    sql_checksum: str | None
    problems: list[str] = field(default_factory=list)

    @property
    def current(self) -> bool:
        return not self.problems


def read_schema_state(conn: psycopg.Connection) -> SchemaState:
    """What is installed, and what is missing or behind (as readable problems)."""

    def scalar(query: str) -> str | None:
        try:
            with conn.transaction():
                row = conn.execute(query).fetchone()
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction,
                psycopg.errors.InvalidSchemaName):
            return None
        return None if row is None else str(row[0])

    state = SchemaState(
        server_version=scalar("SHOW server_version") or "unknown",
        postgis_version=scalar(
            "SELECT extversion FROM pg_extension WHERE extname = 'postgis'"
        ),
        pgstac_version=scalar(
            "SELECT version FROM pgstac.migrations ORDER BY datetime DESC, version DESC LIMIT 1"
        ),
        alembic_revision=scalar(f"SELECT version_num FROM {SCHEMA}.alembic_version"),
        sql_checksum=scalar(f"SELECT checksum FROM {SCHEMA}.sql_state"),
    )
    if state.postgis_version is None:
        state.problems.append("extension postgis is not installed")
    if state.pgstac_version != PGSTAC_VERSION:
        state.problems.append(
            f"pgstac is at {state.pgstac_version or 'nothing'}, this stacchip-db needs "
            f"{PGSTAC_VERSION}"
        )
    head = alembic_head()
    if state.alembic_revision != head:
        state.problems.append(
            f"schema {SCHEMA} is at revision {state.alembic_revision or 'nothing'}, "
            f"head is {head}"
        )
    if state.sql_checksum != sql_checksum():
        state.problems.append("the SQL functions (sql/*.sql) are missing or from another version")
    return state


def check_schema(conn: psycopg.Connection, url: str) -> None:
    """The schema gate: every command but `db init` calls this on connect."""
    state = read_schema_state(conn)
    if not state.current:
        raise SchemaBehind(
            f"the database at {mask_url(url)} is not ready for this stacchip-db "
            f"({state.problems[0]}): {FIX}"
        )


def _ensure_extensions(conn: psycopg.Connection) -> None:
    available = conn.execute(
        "SELECT name FROM pg_available_extensions WHERE name IN ('postgis', 'btree_gist')"
    ).fetchall()
    names = {row[0] for row in available}
    if "postgis" not in names:
        major = conn.execute("SHOW server_version_num").fetchone()[0][:2]
        raise PostgisMissing(
            f"PostGIS is not installed on this PostgreSQL {major} server: install it "
            f"(Debian/Ubuntu: apt-get install postgresql-{major}-postgis-3; RDS and most "
            "managed services have it built in) and run `stacchip-db db init` again"
        )
    if "btree_gist" not in names:
        raise PostgisMissing(
            "extension btree_gist is not available: install PostgreSQL's contrib modules "
            "(Debian/Ubuntu: postgresql-contrib)"
        )
    conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    conn.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")


def _migrate_pgstac(url: str) -> str:
    """pgstac's own migration path (install or upgrade) to the pinned version."""
    from pypgstac.db import PgstacDB
    from pypgstac.migrate import Migrate

    pgdb = PgstacDB(dsn=url)
    try:
        return Migrate(pgdb).run_migration()
    finally:
        # disconnect() hands the connection back and forgets the pool without closing it;
        # close the pool ourselves so no session lingers (CREATE DATABASE … TEMPLATE needs that).
        pool = pgdb.pool
        pgdb.disconnect()
        if pool is not None:
            pool.close()


def _migrate_stacchip(conn: psycopg.Connection, url: str) -> None:
    import sqlalchemy as sa
    from alembic import command

    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    # SQLAlchemy gets its own connection from our `connect` (same URL forms, same errors).
    engine = sa.create_engine(
        "postgresql+psycopg://", creator=lambda: connect(url), poolclass=sa.NullPool
    )
    try:
        with engine.connect() as sa_conn:
            config = alembic_config()
            config.attributes["connection"] = sa_conn
            command.upgrade(config, "head")
            sa_conn.commit()
    finally:
        engine.dispose()


def _apply_sql_files(conn: psycopg.Connection) -> None:
    with conn.transaction():
        for path in sql_files():
            log.debug("applying %s", path.name)
            try:
                conn.execute(sql_text(path))
            except psycopg.Error as exc:
                raise DatabaseError(f"applying {path.name} failed: {exc}".splitlines()[0]) from exc
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.sql_state "
            "(one boolean PRIMARY KEY DEFAULT true CHECK (one), checksum text NOT NULL)"
        )
        conn.execute(
            f"INSERT INTO {SCHEMA}.sql_state (checksum) VALUES (%s) "
            "ON CONFLICT (one) DO UPDATE SET checksum = EXCLUDED.checksum",
            (sql_checksum(),),
        )


def init_database(url: str) -> SchemaState:
    """Bring the database at `url` to head; safe to run any number of times, concurrently."""
    with connect(url, autocommit=True) as conn, translate_errors("db init"):
        conn.execute("SELECT pg_advisory_lock(%s)", (INIT_LOCK_KEY,))
        try:
            _ensure_extensions(conn)
            before = read_schema_state(conn)
            if before.pgstac_version != PGSTAC_VERSION:
                log.info("pgstac: %s -> %s", before.pgstac_version or "installing", PGSTAC_VERSION)
                _migrate_pgstac(url)
            if before.alembic_revision != alembic_head():
                log.info("schema %s: %s -> %s", SCHEMA, before.alembic_revision or "creating",
                         alembic_head())
                _migrate_stacchip(conn, url)
            _apply_sql_files(conn)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (INIT_LOCK_KEY,))
        return read_schema_state(conn)
