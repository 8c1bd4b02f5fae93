"""User SQL (`--query`, `ChipDataset(query=…)`) runs as its own least-privileged login, under a
deadline the client keeps: the security reviewer's probes, the login's design, the deadline."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from stacchip_db import ChipDataset
from stacchip_db.dataset import QueryError, load_selection
from stacchip_db.db import init_database
from stacchip_db.db.embedded import SERVER_DIR, EmbeddedCluster
from stacchip_db.db.user_sql import Deadline, QueryLoginError
from tests.conftest import PgServer, error_line, run_cli, store_indexed

CHIP = 64
KEYS = (
    "SELECT 'c' AS collection, 'i' AS item_id, 64 AS chip_size, 0 AS chip_index_x, "
    "0 AS chip_index_y"
)
ALL = "SELECT collection, item_id, chip_size, chip_index_x, chip_index_y FROM stacchip.chips"


def _world(admin: psycopg.Connection) -> tuple:
    """What a probe must leave alone: large objects, replication slots, the last config load."""
    return admin.execute(
        "SELECT (SELECT count(*) FROM pg_largeobject_metadata), "
        "(SELECT count(*) FROM pg_replication_slots), pg_conf_load_time()"
    ).fetchone()


def _login_role(database_url: str) -> str:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT role FROM stacchip.query_login").fetchone()[0]


PROBES = {
    "lo_import": ("lo_import('/etc/passwd')", "permission denied for function lo_import"),
    "lo_from_bytea+lo_export": (
        "lo_export(lo_from_bytea(0, convert_to('archive_command = ''touch {target}.pwned''', "
        "'UTF8')), '{target}')",
        "permission denied for function lo_export",
    ),
    "pg_read_file": ("pg_read_file('/etc/passwd')", "permission denied for function pg_read_file"),
    "pg_terminate_backend": ("pg_terminate_backend({admin_pid})", "terminate"),
    "replication_slot": (
        "pg_create_physical_replication_slot('stacchip_probe')",
        "superuser or replication role",
    ),
    "pg_reload_conf": ("pg_reload_conf()", "permission denied for function pg_reload_conf"),
    "set_config_role": (
        "set_config('role', '{admin_user}', true)",
        'permission denied to set role "{admin_user}"',
    ),
    "session_authorization": (
        "set_config('session_authorization', '{admin_user}', true)",
        "permission denied to set session authorization",
    ),
}


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_probe_is_refused_in_one_line_and_changes_nothing(
    database_url: str, tmp_path: Path, probe: str
) -> None:
    target = tmp_path / "writable" / "postgresql.auto.conf"
    target.parent.mkdir()
    target.parent.chmod(0o777)  # the server could write here: only a refusal keeps it empty
    with psycopg.connect(database_url, autocommit=True) as admin:
        names = {
            "admin_pid": admin.info.backend_pid,
            "admin_user": admin.execute("SELECT current_user").fetchone()[0],
            "target": str(target),
        }
        expression, refusal = PROBES[probe]
        before = _world(admin)
        result = run_cli(
            ["prechip", "--query", f"{KEYS}, {expression.format(**names)} AS probe",
             "--out", str(tmp_path / "out")],
            database_url=database_url,
        )  # fmt: skip
        line = error_line(result)
        assert line.startswith("Error: --query must be one read-only SELECT"), line
        assert refusal.format(**names) in line, line
        assert "root:" not in result.output  # nothing of /etc/passwd came back
        assert admin.execute("SELECT 1").fetchone() == (1,)  # not killed
        assert _world(admin) == before
    assert not list(target.parent.iterdir())
    assert not (tmp_path / "out").exists()


def test_large_objects_made_by_a_query_that_succeeds_are_rolled_back(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    query = (
        "SELECT c.*, lo_from_bytea(0, 'archive_command = ''touch /tmp/x''') AS lo "
        "FROM stacchip.chips c ORDER BY chip_index_y, chip_index_x LIMIT 4"
    )
    with psycopg.connect(database_url, autocommit=True) as admin:
        before = _world(admin)
        dataset = ChipDataset(query, database_url=database_url)
        assert len(dataset) == 4
        assert _world(admin) == before


def test_the_query_cannot_lift_its_deadline(database_url: str, tmp_path: Path) -> None:
    marker = "stacchip_deadline_probe"
    query = (
        f"{KEYS}, '{marker}' AS marker FROM (SELECT set_config('statement_timeout', '0', true)) s "
        "WHERE pg_sleep(30) IS NOT NULL"
    )
    started = time.monotonic()
    result = run_cli(
        ["prechip", "--query", query, "--statement-timeout", "1", "--out", str(tmp_path)],
        database_url=database_url,
    )
    elapsed = time.monotonic() - started
    line = error_line(result)
    assert "--query ran past its deadline of 1 s (--statement-timeout)" in line, line
    assert "raise --statement-timeout" in line
    assert elapsed < 20, elapsed  # the sleep alone is 30 s
    with psycopg.connect(database_url, autocommit=True) as admin:
        for _ in range(50):  # the cancelled backend goes away once its connection is closed
            running = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> "
                "pg_backend_pid()",
                (f"%{marker}%",),
            ).fetchone()[0]
            if not running:
                break
            time.sleep(0.1)
        assert running == 0


def test_the_deadline_covers_every_fetch(database_url: str) -> None:
    # Each FETCH (5,000 rows, ~0.1 ms of sleep a row) stays under the limit; all of them do
    # not. A per-statement timeout would let this run for its ~8 s.
    query = (
        "SELECT 'c' AS collection, 'i' AS item_id, 64 AS chip_size, g AS chip_index_x, "
        "0 AS chip_index_y FROM generate_series(1, 60000) g "
        "WHERE set_config('statement_timeout', '0', true) IS NOT NULL "
        "AND pg_sleep(0.0001) IS NOT NULL"
    )
    started = time.monotonic()
    with pytest.raises(QueryError, match=r"deadline of 1\.5 s \(`statement_timeout_s`\)"):
        load_selection(database_url, query, statement_timeout_s=1.5)
    assert time.monotonic() - started < 6


def test_a_cancel_between_fetches_still_stops_the_next_one(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        with Deadline(conn, 0.2) as deadline:
            time.sleep(0.4)  # the client is busy and the server idle when the time is up
            with pytest.raises(psycopg.errors.QueryCanceled):
                deadline.check()
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(10)")  # sent anyway: cancelled again
            assert time.monotonic() - started < 5
        assert conn.execute("SELECT 1").fetchone() == (1,)  # no cancel after the block


def test_ordinary_query_joining_pgstac_works_in_cli_and_dataset(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    store_indexed(database_url, s2_items, chip_size=CHIP)
    query = (
        "SELECT c.collection, c.item_id, c.chip_size, c.chip_index_x, c.chip_index_y "
        "FROM stacchip.chips c JOIN pgstac.items i ON i.collection = c.collection "
        f"AND i.id = c.item_id WHERE i.id = '{s2_items[1]['id']}' "
        "AND i.datetime >= '2024-03-01' ORDER BY c.chip_index_y, c.chip_index_x LIMIT 8"
    )
    result = run_cli(
        ["prechip", "--query", query, "--out", str(tmp_path), "--cube-size", "8"],
        database_url=database_url,
    )
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.rglob("cube_0.npz"))) == 1
    dataset = ChipDataset(query, database_url=database_url)
    assert [r.item_id for r in dataset.rows] == [s2_items[1]["id"]] * 8
    # the documented selection functions, the stratified sample's plpgsql walk included
    sampled = ChipDataset(
        "SELECT * FROM stacchip.sample_chips_stratified(6, seed => 1, stratify_by => 'year')",
        database_url=database_url,
    )
    assert len(sampled) == 6


def test_the_query_runs_as_the_restricted_login(database_url: str, s2_items: list[dict]) -> None:
    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    role = _login_role(database_url)
    as_login = (
        f"{ALL} WHERE session_user = '{role}' AND current_user = '{role}' AND NOT "
        "(SELECT rolsuper FROM pg_roles WHERE rolname = session_user) LIMIT 3"
    )
    assert len(load_selection(database_url, as_login)) == 3
    with pytest.raises(QueryError, match="permission denied for table query_login"):
        load_selection(database_url, f"{ALL}, stacchip.query_login LIMIT 1")
    with psycopg.connect(database_url) as admin:
        executable_definers = admin.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.prosecdef "
            "AND p.pronamespace IN ('stacchip'::regnamespace, 'pgstac'::regnamespace) "
            "AND has_function_privilege(%s, p.oid, 'EXECUTE')",
            (role,),
        ).fetchall()
        writes = admin.execute(
            "SELECT c.oid::regclass::text FROM pg_class c "
            "WHERE c.relnamespace IN ('stacchip'::regnamespace, 'pgstac'::regnamespace) "
            "AND c.relkind IN ('r', 'p', 'v', 'm') "
            "AND has_table_privilege(%s, c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE')",
            (role,),
        ).fetchall()
    assert executable_definers == []
    assert writes == []


def test_a_login_that_may_do_more_than_read_is_refused(database_url: str) -> None:
    # the tool's own login (a superuser on the embedded cluster, the table owner anywhere)
    with pytest.raises(QueryLoginError, match="may do more than read"):
        load_selection(database_url, ALL, query_database_url=database_url)


def test_missing_login_says_to_run_db_init(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM stacchip.query_login")
    line = error_line(run_cli(["stats", "--query", ALL], database_url=database_url))
    assert "no restricted login for user SQL" in line and "db init" in line, line
    assert run_cli(["db", "init"], database_url=database_url).exit_code == 0
    assert len(load_selection(database_url, ALL)) == 0


def test_explicit_query_login(database_url: str, s2_items: list[dict], tmp_path: Path) -> None:
    store_indexed(database_url, s2_items[:1], chip_size=CHIP)
    with psycopg.connect(database_url, autocommit=True) as conn:
        name = f"reader_{conn.info.backend_pid}"
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD 'secret-reader'")
        conn.execute(f"GRANT USAGE ON SCHEMA stacchip, pgstac TO {name}")
        conn.execute(f"GRANT SELECT ON stacchip.chips TO {name}")
    try:
        url = make_conninfo(database_url, user=name, password="secret-reader")
        query = f"{ALL} WHERE session_user = '{name}' LIMIT 2"
        result = run_cli(
            ["prechip", "--query", query, "--out", str(tmp_path), "--keep-partial"],
            database_url=database_url, env={"STACCHIP_QUERY_DATABASE_URL": url},
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "2 chips" in result.output, result.output
        assert "secret-reader" not in result.output
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {name}")
            conn.execute(f"DROP ROLE {name}")


def _tcp_url(url: str) -> str:
    """`url` over loopback TCP with the password (scram) when it names the embedded cluster's
    unix socket; else `url` itself (a server URL from STACCHIP_TEST_DATABASE_URL)."""
    params = conninfo_to_dict(url)
    host = str(params.get("host", ""))
    if not host.startswith("/"):
        return url
    socket_dir = Path(host)  # the embedded cluster's socket lives in HOME/server
    home = socket_dir.parent if socket_dir.name == SERVER_DIR else socket_dir
    tcp = EmbeddedCluster(home).tcp_url(str(params["dbname"]), show_password=True)
    return make_conninfo(url, host="127.0.0.1", password=conninfo_to_dict(tcp)["password"])


def test_databases_on_one_server_keep_their_own_logins(pg_server: PgServer) -> None:
    names = [pg_server.new_name("stacchip_login") for _ in range(2)]
    try:
        first, second = (_tcp_url(pg_server.create(n)) for n in names)
        for url in (first, second):
            init_database(url)
        roles = [_login_role(u) for u in (first, second)]
        assert roles[0] != roles[1]
        init_database(first)  # a new password for the first: the second's still works
        for url in (first, second):  # over TCP the passwords are checked (scram)
            assert len(load_selection(url, ALL)) == 0
        # A copy made from a template logs in as the template's role until its own db init.
        copy = pg_server.new_name("stacchip_copy")
        names.append(copy)
        copy_url = _tcp_url(pg_server.create(copy, template=names[0]))
        assert _login_role(copy_url) == roles[0]
        assert len(load_selection(copy_url, ALL)) == 0
        init_database(copy_url)
        own = _login_role(copy_url)
        assert own not in roles
        assert len(load_selection(copy_url, ALL)) == 0
        with psycopg.connect(copy_url) as conn:
            usage = conn.execute(
                "SELECT has_schema_privilege(%s, 'stacchip', 'USAGE'), "
                "has_table_privilege(%s, 'stacchip.chips', 'SELECT')",
                (roles[0], roles[0]),
            ).fetchone()
        assert usage == (False, False)  # the template's role lost its grants in the copy
        assert len(load_selection(first, ALL)) == 0
    finally:
        for name in names:
            pg_server.drop(name)

