"""Benchmark: chip selection, seeded sampling and stratified sampling on >= 10 million chips.

Fills `stacchip.chips` with grid-only rows generated in SQL (no rasters, no STAC items): 400
one-degree tiles in four regions (Europe, Africa, South and North America), each revisited
about 15 times between 2018 and 2023 by a 42 x 42 grid of 256-px chips (2.56 km at 10 m, as
Sentinel-2; every fourth revisit is `landsat-c2-l2`), per-scene cloudiness with per-chip noise,
10% of chips with some nodata. Rows are written item by item, as the store writes them. The
rows go into each collection's partition with its indexes in place, then ANALYZE (the
partition-by-partition bulk path is measured by bench_scale.py).

Then, through the same query builder the CLI uses (`stacchip_db.selection`), fetching every
row (geometry included) to the client:

1. bbox + date + cloud returning ~1,000 chips: a different box each run (goal p50 <= 20 ms);
2. a seeded sample of 10,000 chips with date + cloud filters, a different seed each run
   (goal <= 500 ms);
3. stratified samples (10,000 chips, equal per year, quarter, collection and 1-degree cell)
   with region + date + cloud (<= 2 s);

and EXPLAIN (ANALYZE, BUFFERS) of each, to check which indexes they use. Reports table and
index sizes per million chips.

    .venv/bin/python bench/bench_queries.py [--rows 10000000] [--runs 25]

Starts a new embedded cluster in a temp dir, durable (fsync on, as `stacchip-db db start` runs
it; `--no-durable` for a labelled fsync-off figure), unless STACCHIP_BENCH_DATABASE_URL points at
a database to fill (its chips are replaced!).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import re
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
from bench_store import (
    BENCH_URL_ENV,
    add_durability_option,
    admin_url,
    configuration,
    fresh_database,
)  # the bench/ folder

from stacchip_db.db import init_database
from stacchip_db.selection import ChipFilter, Sampling, build_selection, execute_selection

CHIPS_PER_ITEM = 42 * 42
# (name, west lon, south lat, tiles east, tiles north): 400 one-degree tiles in all.
REGIONS = (
    ("europe", 0, 40, 10, 8),
    ("africa", 20, -10, 10, 10),
    ("south-america", -70, -30, 10, 10),
    ("north-america", -120, 30, 12, 10),
)
ITEMS_PER_INSERT = 200

log = logging.getLogger("bench_queries")

_ITEMS_SQL = """
CREATE TEMP TABLE bench_items AS
WITH regions (region, lon0, lat0, ncols, nrows) AS (
    SELECT * FROM unnest(%(names)s::text[], %(lons)s::float8[], %(lats)s::float8[],
                         %(cols)s::int[], %(rows)s::int[])
), tiles AS (
    SELECT row_number() OVER (ORDER BY region, tx, ty) AS tile, lon0 + tx AS lon,
           lat0 + ty AS lat
    FROM regions, generate_series(0, ncols - 1) tx, generate_series(0, nrows - 1) ty
)
SELECT row_number() OVER (ORDER BY k, tile) AS n,
       format('%%s_T%%s_%%s', CASE WHEN k %% 4 = 3 THEN 'LC09' ELSE 'S2A' END, tile, k)
           AS item_id,
       CASE WHEN k %% 4 = 3 THEN 'landsat-c2-l2' ELSE 'sentinel-2-l2a' END AS collection,
       lon, lat,
       timestamptz '2018-01-01 00:00Z' + make_interval(secs => random() * 189302400)
           AS datetime,
       power(random(), 2) AS cloudiness
FROM tiles, generate_series(0, %(revisits)s - 1) k
ORDER BY k, tile
LIMIT %(items)s
"""

# One item's chips: 42 x 42 boxes from the tile's north-west corner, 2.56 km wide.
_CHIPS_SQL = """
INSERT INTO stacchip.chips (collection, item_id, chip_size, chip_index_x, chip_index_y,
                            datetime, cloud_fraction, nodata_fraction, geometry)
SELECT i.collection, i.item_id, 256, x, y, i.datetime,
       least(1, greatest(0, i.cloudiness + (random() - 0.5) * 0.4))::real,
       CASE WHEN random() < 0.1 THEN (random() * 0.5)::real ELSE 0 END,
       ST_MakeEnvelope(i.lon + x * i.w, i.lat + 1 - (y + 1) * i.h,
                       i.lon + (x + 1) * i.w, i.lat + 1 - y * i.h, 4326)
FROM (SELECT *, 2560 / (111320 * cos(radians(lat + 0.5))) AS w, 2560 / 110574.0 AS h
      FROM bench_items WHERE n > %(first)s AND n <= %(last)s ORDER BY n) AS i,
     generate_series(0, 41) x, generate_series(0, 41) y
"""


COLLECTIONS = ("sentinel-2-l2a", "landsat-c2-l2")
"""The collections of the generated items (every fourth revisit is Landsat)."""


def fill(conn: psycopg.Connection, rows: int) -> int:
    """Replace the chips with `rows` generated ones (rounded up to whole items)."""
    items = math.ceil(rows / CHIPS_PER_ITEM)
    tiles = sum(cols * nrows for _, _, _, cols, nrows in REGIONS)
    revisits = math.ceil(items / tiles)
    conn.execute("TRUNCATE stacchip.chips")
    # stacchip.chips is partitioned by collection (alembic 0008): each collection's partition,
    # with its indexes, is made before its rows arrive
    conn.execute(
        "SELECT stacchip.chip_partition(c) FROM unnest(%s::text[]) AS c", (list(COLLECTIONS),)
    )
    conn.execute("SELECT setseed(0.42)")
    conn.execute(
        _ITEMS_SQL,
        {
            "names": [r[0] for r in REGIONS], "lons": [float(r[1]) for r in REGIONS],
            "lats": [float(r[2]) for r in REGIONS], "cols": [r[3] for r in REGIONS],
            "rows": [r[4] for r in REGIONS], "revisits": revisits, "items": items,
        },
    )
    start = time.perf_counter()
    for first in range(0, items, ITEMS_PER_INSERT):
        conn.execute(_CHIPS_SQL, {"first": first, "last": first + ITEMS_PER_INSERT})
        log.info("loaded %d/%d items (%.0f s)", min(first + ITEMS_PER_INSERT, items), items,
                 time.perf_counter() - start)
    conn.execute("VACUUM ANALYZE stacchip.chips")
    log.info("filled %d chips of %d items in %.0f s", items * CHIPS_PER_ITEM, items,
             time.perf_counter() - start)
    return items * CHIPS_PER_ITEM


def timed(conn: psycopg.Connection, make: Callable[[int], tuple[ChipFilter, Sampling | None]],
          runs: int) -> tuple[list[float], list[int]]:
    """Wall times (ms) of building, running and fetching the selection, one variant per run."""
    times, counts = [], []
    for run in range(runs):
        chip_filter, sampling = make(run)
        selection = build_selection(chip_filter, sampling)
        began = time.perf_counter()
        rows = execute_selection(conn, selection).fetchall()
        times.append((time.perf_counter() - began) * 1000)
        counts.append(len(rows))
    return times, counts


def explain(conn: psycopg.Connection, chip_filter: ChipFilter,
            sampling: Sampling | None) -> str:
    selection = build_selection(chip_filter, sampling)
    plan = conn.execute(
        psycopg.sql.SQL("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {}").format(selection.query),
        selection.params, prepare=False,
    ).fetchall()
    return "\n".join(row[0] for row in plan)


def indexes_used(plan: str) -> list[str]:
    """The chips indexes a plan scans, by the parent's name (a partition's index is the
    parent's name + `_p<n>`, alembic 0008)."""
    return sorted(set(re.findall(r"\b(chips_\w+?(?:_idx|_pkey))(?:_p\d+)?\b", plan)))


def report(name: str, goal_ms: float, times: list[float], counts: list[int]) -> None:
    p50 = statistics.median(times)
    p90 = sorted(times)[max(0, math.ceil(len(times) * 0.9) - 1)]
    verdict = "meets" if p50 <= goal_ms else "MISSES"
    print(f"{name}: p50 {p50:.1f} ms, p90 {p90:.1f} ms, min {min(times):.1f} ms over "
          f"{len(times)} runs; rows per run median {statistics.median(counts):.0f} "
          f"(min {min(counts)}, max {max(counts)}); goal {goal_ms:.0f} ms: {verdict}")


def calibrate_box(conn: psycopg.Connection, base: ChipFilter, target: int) -> float:
    """The side (degrees) of a box returning about `target` chips with `base`'s other filters."""
    side = 0.5
    for _ in range(3):
        counts = []
        for lon, lat in ((4.0, 44.0), (25.0, -5.0), (-65.0, -25.0), (-110.0, 35.0)):
            box = ChipFilter(**{**base.__dict__, "bbox": (lon, lat, lon + side, lat + side)})
            counts.append(len(execute_selection(conn, build_selection(box)).fetchall()))
        side *= math.sqrt(target / max(1, statistics.median(counts)))
    return side


def run(url: str, rows: int, runs: int, skip_fill: bool) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        total = (conn.execute("SELECT count(*) FROM stacchip.chips").fetchone()[0]
                 if skip_fill else fill(conn, rows))
        version = conn.execute("SHOW server_version").fetchone()[0]
        settings = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('shared_buffers', 'work_mem', 'jit', 'max_parallel_workers_per_gather')"
        ).fetchall())
        print(f"\n{total:,} chips; PostgreSQL {version}; {settings}; {os.cpu_count()} cores")

        # Sizes per million chips.
        sizes = conn.execute(
            "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'stacchip' AND (c.relname = 'chips' OR c.oid IN "
            "(SELECT indexrelid FROM pg_index WHERE indrelid = 'stacchip.chips'::regclass)) "
            "ORDER BY 2 DESC"
        ).fetchall()
        toast = conn.execute(
            "SELECT pg_total_relation_size('stacchip.chips') - pg_relation_size("
            "'stacchip.chips') - pg_indexes_size('stacchip.chips')"
        ).fetchone()[0]
        millions = total / 1e6
        for name, size in sizes:
            print(f"  {name:<24} {size / 2**20:9.0f} MiB  {size / 2**20 / millions:7.1f} "
                  "MiB per million chips")
        print(f"  {'(toast, fsm, vm)':<24} {toast / 2**20:9.0f} MiB")

        rng = random.Random(1)
        dates = {"start": datetime(2020, 1, 1, tzinfo=UTC), "end": datetime(2022, 1, 1, tzinfo=UTC)}
        base = ChipFilter(max_cloud=0.3, **dates)
        side = calibrate_box(conn, base, 1000)
        regions = [(r[1], r[2], r[3], r[4]) for r in REGIONS]

        def bbox_filter(_run: int) -> tuple[ChipFilter, None]:
            lon0, lat0, cols, nrows = regions[rng.randrange(len(regions))]
            lon = lon0 + rng.uniform(0, cols - side)
            lat = lat0 + rng.uniform(0, nrows - side)
            return ChipFilter(bbox=(lon, lat, lon + side, lat + side), max_cloud=0.3,
                              **dates), None

        def sample(run: int) -> tuple[ChipFilter, Sampling]:
            return base, Sampling(10_000, seed=run)

        europe = ChipFilter(bbox=(0, 40, 10, 48), max_cloud=0.3, **dates)

        def stratified(run: int, by: str = "year") -> tuple[ChipFilter, Sampling]:
            return europe, Sampling(10_000, seed=run, stratify_by=by)

        timed(conn, bbox_filter, 3)  # warm-up: first touches of the indexes
        print(f"\nbox side {side:.3f} degrees")
        report("bbox + date + cloud", 20, *timed(conn, bbox_filter, runs))
        report("seeded sample 10,000 (date + cloud)", 500, *timed(conn, sample, max(5, runs // 2)))
        for by in ("year", "quarter", "collection", "cell"):
            report(f"stratified sample 10,000 by {by} (Europe + date + cloud)", 2000,
                   *timed(conn, lambda run, by=by: stratified(run, by), max(5, runs // 4)))
        matching = conn.execute(
            psycopg.sql.SQL("SELECT count(*) FROM ({}) AS s").format(
                build_selection(europe).query), build_selection(europe).params
        ).fetchone()[0]
        print(f"  ({matching:,} chips match the stratified samples' filters)")

        print()
        for name, (chip_filter, sampling) in {
            "bbox + date + cloud": bbox_filter(0),
            "seeded sample": sample(1000),
            "stratified sample": stratified(1000),
        }.items():
            plan = explain(conn, chip_filter, sampling)
            print(f"EXPLAIN {name}: indexes {', '.join(indexes_used(plan)) or 'none'}")
            log.debug("%s", plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=25)
    add_durability_option(parser)
    parser.add_argument("--skip-fill", action="store_true",
                        help="measure the chips already in STACCHIP_BENCH_DATABASE_URL")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the plans")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(message)s")
    print(f"configuration: {configuration(args.durable)}")
    url = os.environ.get(BENCH_URL_ENV)
    if url:
        init_database(url)
        run(url, args.rows, args.runs, args.skip_fill)
        return
    with admin_url(args.durable) as admin:  # a new embedded cluster, removed afterwards
        run(fresh_database(admin, "bench"), args.rows, args.runs, skip_fill=False)


if __name__ == "__main__":
    main()
