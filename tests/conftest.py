"""Test fixtures: a real PostgreSQL + PostGIS + pgstac, one fresh database per test.

A session-wide throwaway cluster is started with the same embedded-database code users run
(or the server at `STACCHIP_TEST_DATABASE_URL` is used), migrated once into a template
database; each test gets `CREATE DATABASE … TEMPLATE` of it (fast and isolated).

Outbound network is blocked for the whole session: loopback and unix sockets only.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg.conninfo import make_conninfo

from stacchip_db.cli import main
from stacchip_db.config import Settings
from stacchip_db.db import init_database
from stacchip_db.db.embedded import EmbeddedCluster

# Loopback servers: a real STAC API, a real S3-protocol server, Planetary Computer's token API
# and blob storage.
pytest_plugins = ("stac_server", "s3_server", "sensor_catalog", "pc_server")

TEST_DATABASE_URL_ENV = "STACCHIP_TEST_DATABASE_URL"
REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "stac"
"""The real STAC items the tests use (see tests/data/README.md): the one place they are found."""


# -- no internet ------------------------------------------------------------------------------

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _is_local(sock: socket.socket, address: object) -> bool:
    if sock.family == socket.AF_UNIX:
        return True
    host = address[0] if isinstance(address, tuple) else str(address)
    return host in ("localhost", "::1") or str(host).startswith("127.")


def _guarded_connect(sock: socket.socket, address: object) -> None:
    if not _is_local(sock, address):
        raise ConnectionRefusedError(f"tests may not reach the internet (tried {address!r})")
    return _real_connect(sock, address)


def _guarded_connect_ex(sock: socket.socket, address: object) -> int:
    if not _is_local(sock, address):
        raise ConnectionRefusedError(f"tests may not reach the internet (tried {address!r})")
    return _real_connect_ex(sock, address)


@pytest.fixture(autouse=True, scope="session")
def _block_network() -> Iterator[None]:
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
    yield
    socket.socket.connect = _real_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the developer's shell reaches the code under test."""
    for name in (
        "STACCHIP_DATABASE_URL",
        "STACCHIP_QUERY_DATABASE_URL",
        "STACCHIP_HOME",
        "AWS_BATCH_JOB_ARRAY_INDEX",
        "STACCHIP_SIGN",
        "PC_SDK_SAS_URL",
        "PC_SDK_SUBSCRIPTION_KEY",
    ):
        monkeypatch.delenv(name, raising=False)


# -- the server and its databases -------------------------------------------------------------


class PgServer:
    """A PostgreSQL server the tests may create and drop databases on."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self._names = itertools.count()

    def url(self, dbname: str) -> str:
        return make_conninfo(self.admin_url, dbname=dbname)

    def new_name(self, prefix: str) -> str:
        return f"{prefix}_{os.getpid()}_{next(self._names)}"

    def create(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            clause = f' TEMPLATE "{template}"' if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{clause}')
            if template:
                # CREATE DATABASE … TEMPLATE copies the contents, not the database's own
                # settings (ALTER DATABASE … SET, e.g. db init's search_path): copy them too.
                rows = conn.execute(
                    "SELECT unnest(s.setconfig) FROM pg_db_role_setting s "
                    "JOIN pg_database d ON d.oid = s.setdatabase "
                    "WHERE d.datname = %s AND s.setrole = 0",
                    (template,),
                ).fetchall()
                for (setting,) in rows:
                    key, value = setting.split("=", 1)
                    conn.execute(f'ALTER DATABASE "{name}" SET {key} TO {value}')
        return self.url(name)

    def drop(self, name: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    url = os.environ.get(TEST_DATABASE_URL_ENV)
    if url:
        yield PgServer(url)
        return
    home = Path(tempfile.mkdtemp(prefix="stacchip-test-"))
    cluster = EmbeddedCluster(home, durable=False, database="postgres")
    cluster.start()
    try:
        yield PgServer(cluster.socket_url("postgres"))
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def template_database(pg_server: PgServer) -> Iterator[str]:
    """A database migrated to head once; tests copy it."""
    name = pg_server.new_name("stacchip_tmpl")
    init_database(pg_server.create(name))
    yield name
    pg_server.drop(name)


@pytest.fixture
def database_url(pg_server: PgServer, template_database: str) -> Iterator[str]:
    """A fresh database at head, for this test alone."""
    name = pg_server.new_name("stacchip_test")
    url = pg_server.create(name, template=template_database)
    yield url
    pg_server.drop(name)


@pytest.fixture
def empty_database_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh database with nothing installed, for migration tests."""
    name = pg_server.new_name("stacchip_empty")
    url = pg_server.create(name)
    yield url
    pg_server.drop(name)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=database_url, home=tmp_path / "home")


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


# -- the CLI ----------------------------------------------------------------------------------


def run_cli(args: list[str], *, database_url: str | None = None, home: Path | None = None,
            input: str | None = None, env: dict[str, str] | None = None) -> Result:
    """Run `stacchip-db ARGS` in-process with an explicit database and home (and `env`)."""
    env = {"STACCHIP_DATABASE_URL": database_url, "STACCHIP_HOME": str(home) if home else None,
           **(env or {})}
    return CliRunner().invoke(main, args, env=env, input=input, catch_exceptions=False)


def error_line(result: Result) -> str:
    """The one `Error:` line a failed command printed; fails if there is none, or a traceback."""
    assert result.exit_code == 1, f"exit {result.exit_code}: {result.output}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# -- indexed synthetic scenes (prechip, stats, dataset, pictures) -----------------------------

S2_FIXTURE = "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"
S2_BANDS = (
    "blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir", "nir08", "swir16", "swir22",
)  # fmt: skip


@pytest.fixture(scope="session")
def s2_items(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Two synthetic Sentinel-2 items (10 bands + scl, ids suffixed _0 and _1) on the fixture's
    grid at scale 10 (1098 px at 10 m, 549 px at 20 m)."""
    from stacchip_db.synthetic import synthesize_item

    source = json.loads((FIXTURES / S2_FIXTURE).read_text())
    items = []
    for n in range(2):
        raw = copy.deepcopy(source)
        raw["id"] = f"{source['id']}_{n}"
        out = tmp_path_factory.mktemp(f"s2_{n}")
        items.append(synthesize_item(raw, out, [*S2_BANDS, "scl"], scale=10, seed=n))
    return items


def store_indexed(database_url: str, items: list[dict], *, chip_size: int) -> int:
    """Index `items` and store them with their chips (the `index` command's path); the number
    of chips stored."""
    from stacchip_db.db.store import store_item
    from stacchip_db.index import index_item

    total = 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        for item in items:
            chips = index_item(item, chip_size=chip_size)
            store_item(conn, item, chips, chip_size=chip_size)
            total += chips.num_rows
    return total
