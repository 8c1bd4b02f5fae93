"""Benchmark: store one item with ~1,760 chips (pgstac upsert + chip rows replaced).

The item is the fixture Sentinel-2 scene (10980 x 10980 px at 10 m: 42 x 42 = 1,764 chips of
256 px), indexed once with `quality="none"` (no pixels needed: this measures the database
write). Each repetition is one `store_item` call on a warm connection; two cases, alternated:
- changed: every chip's cloud fraction differs from what is stored, so all 1,764 rows are
  replaced (deleted and inserted, every index maintained) — re-indexing a scene that changed;
- unchanged: the same rows again (a re-run): the item is upserted and rows that are already
  stored exactly are left alone.
Goal (issue 3): median <= 50 ms for "one item upserted and its chips replaced".

A new embedded cluster, durable (fsync on, as `stacchip-db db start` runs it), is started in a
temp dir unless STACCHIP_BENCH_DATABASE_URL names a server (a fresh database is created on it);
`--no-durable` measures a throwaway fsync-off cluster instead, labelled as such.

    .venv/bin/python bench/bench_store.py [--reps 30]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pyarrow as pa
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stacchip_db.db import init_database  # noqa: E402
from stacchip_db.db.embedded import EmbeddedCluster  # noqa: E402

FIXTURES = REPO / "tests" / "data" / "stac"
S2_ITEM = "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"
BENCH_URL_ENV = "STACCHIP_BENCH_DATABASE_URL"
GOAL_MS = 50.0


def add_durability_option(parser: argparse.ArgumentParser) -> None:
    """`--no-durable`: fsync off, for a labelled side figure only (users run durable)."""
    parser.add_argument(
        "--no-durable", dest="durable", action="store_false",
        help="throwaway cluster with fsync off: NOT what `db start` or a server runs",
    )  # fmt: skip


def configuration(durable: bool) -> str:
    """How to label a figure: the configuration it was measured on."""
    if os.environ.get(BENCH_URL_ENV):
        return f"server at ${BENCH_URL_ENV}"
    if durable:
        return "embedded cluster, durable (fsync on, as `stacchip-db db start` runs)"
    return "embedded cluster, durable=False (fsync off; NOT the default configuration)"


@contextlib.contextmanager
def admin_url(durable: bool = True) -> Iterator[str]:
    """A server to create benchmark databases on: $STACCHIP_BENCH_DATABASE_URL or a new
    embedded cluster, durable (fsync on) as users run it unless `durable=False`."""
    url = os.environ.get(BENCH_URL_ENV)
    if url:
        yield url
        return
    home = Path(tempfile.mkdtemp(prefix="stacchip-bench-"))
    cluster = EmbeddedCluster(home, durable=durable, database="postgres")
    cluster.start()
    try:
        yield cluster.socket_url("postgres")
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


def fresh_database(admin: str, name: str) -> str:
    """A new, migrated database called `name` (dropped first if it exists)."""
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(admin, dbname=name)
    init_database(url)
    return url


def drop_database(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def chip_versions(chips: pa.Table) -> list[pa.Table]:
    """The same chips with two other cloud fractions: storing them in turn changes every row."""
    index = chips.schema.get_field_index("cloud_fraction")
    return [
        chips.set_column(index, "cloud_fraction", pa.array([c] * chips.num_rows, pa.float32()))
        for c in (0.25, 0.5)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    add_durability_option(parser)
    args = parser.parse_args()

    from stacchip_db.db import connect
    from stacchip_db.db.store import store_item
    from stacchip_db.index import index_item

    item = json.loads((FIXTURES / S2_ITEM).read_text())
    # max_nodata=1: keep the whole 42 x 42 grid (the scene covers part of its tile), so the
    # workload stays the 1,764-chip item the goals name.
    chips = index_item(item, quality="none", max_nodata=1.0)
    versions = chip_versions(chips)
    print(f"item {item['id']}: {chips.num_rows} chips of 256 px")
    times: dict[str, list[float]] = {"changed": [], "unchanged": []}
    print(f"configuration: {configuration(args.durable)}")
    with admin_url(args.durable) as admin:
        name = f"stacchip_bench_store_{os.getpid()}"
        url = fresh_database(admin, name)
        try:
            with connect(url) as conn:
                start = time.perf_counter()
                store_item(conn, item, versions[1], chip_size=256)
                first = time.perf_counter() - start
                for rep in range(args.reps):
                    for case, table in (("changed", versions[rep % 2]),
                                        ("unchanged", versions[rep % 2])):
                        start = time.perf_counter()
                        result = store_item(conn, item, table, chip_size=256)
                        times[case].append(time.perf_counter() - start)
                rows = conn.execute("SELECT count(*) FROM stacchip.chips").fetchone()[0]
                cloud = conn.execute("SELECT DISTINCT cloud_fraction FROM stacchip.chips")
                cloud = [row[0] for row in cloud]
        finally:
            drop_database(admin, name)
    expected_cloud = [0.25 if (args.reps - 1) % 2 == 0 else 0.5]
    if rows != chips.num_rows or result.chips != chips.num_rows or cloud != expected_cloud:
        raise SystemExit(f"wrong rows: {rows} rows, {result.chips} stored, cloud {cloud}")
    print(f"first store (creates collection and partition): {first * 1000:.1f} ms")
    for case, values in times.items():
        median = statistics.median(values) * 1000
        print(
            f"re-store, {case} ({chips.num_rows} chips), {args.reps} runs: "
            f"median {median:.1f} ms, min {min(values) * 1000:.1f} ms, "
            f"max {max(values) * 1000:.1f} ms; goal <= {GOAL_MS:.0f} ms: "
            f"{'met' if median <= GOAL_MS else 'NOT met'}"
        )
    print(f"load average while running: {os.getloadavg()[0]:.2f} (2-core machine, shared)")


if __name__ == "__main__":
    main()
