"""`db init` on an empty database, twice, concurrently; and the schema gate."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import psycopg
import pytest
from click.testing import CliRunner

from stacchip_db.cli.options import CliContext, with_database
from stacchip_db.config import Settings
from stacchip_db.db import check_schema, init_database, read_schema_state
from stacchip_db.db.migrate import alembic_head
from stacchip_db.errors import SchemaBehind
from tests.conftest import run_cli

SNAPSHOT_SQL = """
SELECT json_build_object(
  'relations', (SELECT json_agg(n.nspname || '.' || c.relname || ':' || c.relkind::text
                                ORDER BY n.nspname, c.relname)
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname IN ('stacchip', 'pgstac')),
  'functions', (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                WHERE n.nspname IN ('stacchip', 'pgstac')),
  'constraints', (SELECT json_agg(conname ORDER BY conname) FROM pg_constraint
                  WHERE conrelid = 'stacchip.chips'::regclass),
  'queryables', (SELECT json_agg(name || ':' || coalesce(property_wrapper, '') ORDER BY name)
                 FROM pgstac.queryables),
  'extensions', (SELECT json_agg(extname ORDER BY extname) FROM pg_extension)
)
"""


def _snapshot(url: str) -> dict:
    with psycopg.connect(url) as conn:
        return conn.execute(SNAPSHOT_SQL).fetchone()[0]


def test_init_empty_database_twice_is_idempotent(empty_database_url: str) -> None:
    state = init_database(empty_database_url)
    assert state.current, state.problems
    assert state.alembic_revision == alembic_head()
    first = _snapshot(empty_database_url)
    for table in ("pgstac.items:p", "pgstac.collections:r", "stacchip.chips:p"):
        assert table in first["relations"]
    assert {"postgis", "btree_gist"} <= set(first["extensions"])
    assert "eo:cloud_cover:to_float" in first["queryables"]

    again = init_database(empty_database_url)
    assert again.current
    assert _snapshot(empty_database_url) == first


def test_alembic_head_from_file_names_matches_the_revision_scripts() -> None:
    """The schema gate reads the head from file names (no alembic import): every revision file
    must be `NNNN_name.py` with `revision = "NNNN"` following the one before it."""
    from alembic.script import ScriptDirectory

    from stacchip_db.db.migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [alembic_head()]
    revisions = sorted(script.walk_revisions(), key=lambda rev: rev.revision)
    for number, rev in enumerate(revisions, start=1):
        assert rev.revision == f"{number:04d}", rev.path
        assert Path(rev.path).name.startswith(f"{rev.revision}_"), rev.path
        assert rev.down_revision == (f"{number - 1:04d}" if number > 1 else None), rev.path


def test_pgstac_search_works_after_init(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        result = conn.execute("SELECT pgstac.search('{}')").fetchone()[0]
    assert result["type"] == "FeatureCollection"
    assert result["features"] == []


def test_chips_table_enforces_contract(database_url: str) -> None:
    insert = (
        "INSERT INTO stacchip.chips VALUES ('c', 'i', 256, 0, 0, now(), %s, %s, "
        "ST_GeomFromText('POLYGON((0 0,1 0,1 1,0 1,0 0))', 4326))"
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        # A collection's rows go into its partition: hand writers create it first (0008).
        with pytest.raises(psycopg.errors.CheckViolation, match="no partition"):
            conn.execute(insert, (0.5, 0.1))
        partition = conn.execute("SELECT stacchip.chip_partition('c')::text").fetchone()[0]
        assert conn.execute("SELECT stacchip.chip_partition('c')::text").fetchone()[0] == partition
        conn.execute(insert, (0.5, 0.1))
        # The sampling key is stored with the row: the portable hash of 0003.
        stored, portable = conn.execute(
            "SELECT sample_key, stacchip.chip_sample_key(collection, item_id, chip_size, "
            "chip_index_x, chip_index_y) FROM stacchip.chips"
        ).fetchone()
        assert stored == portable
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(insert, (0.2, 0.1))
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(insert.replace("0, 0, now()", "1, 0, now()"), (1.5, 0.0))
        # The contract's spatial index: a GiST index led by the footprint.
        index = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'chips_geometry_datetime_idx'"
        ).fetchone()[0]
        chip_id = conn.execute("SELECT stacchip.chip_id('item', 3, 4)").fetchone()[0]
    assert "USING gist (geometry, datetime)" in index
    assert chip_id == "item-3-4"


def test_concurrent_init_on_empty_database(empty_database_url: str) -> None:
    with ThreadPoolExecutor(3) as pool:
        states = list(pool.map(init_database, [empty_database_url] * 3))
    assert all(state.current for state in states)


def test_schema_gate_names_the_fix(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        check_schema(conn, database_url)  # at head: passes
        conn.execute("UPDATE stacchip.alembic_version SET version_num = '0000'")
        with pytest.raises(SchemaBehind) as excinfo:
            check_schema(conn, database_url)
    message = str(excinfo.value)
    assert "stacchip-db db init" in message
    assert "revision 0000" in message
    assert "\n" not in message


def test_schema_gate_on_empty_database(empty_database_url: str) -> None:
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        state = read_schema_state(conn)
        assert not state.current
        with pytest.raises(SchemaBehind, match="db init"):
            check_schema(conn, empty_database_url)


def test_gated_command_fails_in_one_line_then_init_fixes_it(empty_database_url: str) -> None:
    @click.command()
    @with_database
    def probe(db) -> None:
        click.echo(json.dumps({"ok": db.url == empty_database_url}))

    settings = Settings(database_url=empty_database_url)
    from stacchip_db.cli import CliGroup

    group = CliGroup(commands={"probe": probe})
    runner = CliRunner()
    result = runner.invoke(group, ["probe"], obj=CliContext(settings))
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().count("\n") == 0
    assert "run `stacchip-db db init`" in result.stderr

    init = run_cli(["db", "init"], database_url=empty_database_url)
    assert init.exit_code == 0, init.output
    result = runner.invoke(group, ["probe"], obj=CliContext(settings))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"ok": True}


def test_doctor_reports_versions_and_problems(database_url: str) -> None:
    ok = run_cli(["db", "doctor"], database_url=database_url)
    assert ok.exit_code == 0, ok.output
    assert "pgstac           0.10.0" in ok.stdout
    assert "status           ok" in ok.stdout
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM stacchip.sql_state")
    bad = run_cli(["db", "doctor"], database_url=database_url)
    assert bad.exit_code == 1
    assert "problem          the SQL functions" in bad.stdout
    assert "db init" in bad.stderr


def _upgrade_to(url: str, revision: str) -> None:
    """alembic `upgrade` (or `downgrade`) of schema stacchip to `revision`, nothing else."""
    import sqlalchemy as sa
    from alembic import command

    from stacchip_db.db import connect
    from stacchip_db.db.migrate import alembic_config

    engine = sa.create_engine(
        "postgresql+psycopg://", creator=lambda: connect(url), poolclass=sa.NullPool
    )
    try:
        with engine.connect() as sa_conn:
            config = alembic_config()
            config.attributes["connection"] = sa_conn
            current = sa_conn.execute(
                sa.text("SELECT version_num FROM stacchip.alembic_version")
            ).scalar()
            if current > revision:
                command.downgrade(config, revision)
            else:
                command.upgrade(config, revision)
            sa_conn.commit()
    finally:
        engine.dispose()


# Seeded sample as revision 0003 defines it, written out: chips in chip_sample_key order from
# the seed's offset up, then wrapping around (stacchip.sample_chips, sql/010).
_SAMPLE_0007 = """
WITH k AS (
    SELECT collection, item_id, chip_size, chip_index_x, chip_index_y,
           stacchip.chip_sample_key(collection, item_id, chip_size, chip_index_x,
                                    chip_index_y) AS key,
           ('x' || substr(md5('seed|' || %(seed)s::text), 1, 16))::bit(64)::bigint AS offs
    FROM stacchip.chips
)
SELECT collection, item_id, chip_size, chip_index_x, chip_index_y FROM k
ORDER BY key < offs, key LIMIT %(n)s
"""
_SAMPLE = (
    "SELECT collection, item_id, chip_size, chip_index_x, chip_index_y "
    "FROM stacchip.sample_chips(%(n)s, %(seed)s)"
)
_ROWS = (
    "SELECT collection, item_id, chip_size, chip_index_x, chip_index_y, datetime, "
    "cloud_fraction, nodata_fraction, ST_AsEWKB(geometry) FROM stacchip.chips "
    "ORDER BY collection, item_id, chip_size, chip_index_x, chip_index_y"
)


def test_migration_0008_carries_chips_over_with_the_same_seeded_sample(
    database_url: str,
) -> None:
    """0007 -> 0008 on a database holding chips of two collections: the same rows, one
    partition per collection, the same seeded samples; and back."""
    from stacchip_db.synthetic import fill_chips

    _upgrade_to(database_url, "0007")
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT relkind FROM pg_class WHERE oid = 'stacchip.chips'::regclass"
        ).fetchone()[0] == "r"
        fill_chips(conn, 3000, collection="sentinel-2-l2a")
        fill_chips(conn, 2000, collection="naip", chip_size=512)
        rows = conn.execute(_ROWS).fetchall()
        samples = {seed: conn.execute(_SAMPLE_0007, {"n": 50, "seed": seed}).fetchall()
                   for seed in (0, 7, 123456789)}
    assert len(rows) == 5000
    init_database(database_url)  # to head: 0008, then sql/ (which reads the stored key)
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute(_ROWS).fetchall() == rows
        for seed, sample in samples.items():
            assert conn.execute(_SAMPLE, {"n": 50, "seed": seed}).fetchall() == sample
        partitions = conn.execute(
            "SELECT p.collection, c.relispartition, "
            "(SELECT count(*) FROM stacchip.chips s WHERE s.tableoid = c.oid) "
            "FROM stacchip.chip_partitions p JOIN pg_class c ON c.relname = p.partition "
            "AND c.relnamespace = 'stacchip'::regnamespace ORDER BY 1"
        ).fetchall()
        mismatched = conn.execute(
            "SELECT count(*) FROM stacchip.chips WHERE sample_key <> stacchip.chip_sample_key("
            "collection, item_id, chip_size, chip_index_x, chip_index_y)"
        ).fetchone()[0]
    assert partitions == [("naip", True, 2000), ("sentinel-2-l2a", True, 3000)]
    assert mismatched == 0
    _upgrade_to(database_url, "0007")  # the downgrade carries them back too
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute(_ROWS).fetchall() == rows
        assert conn.execute(_SAMPLE_0007, {"n": 50, "seed": 7}).fetchall() == samples[7]
