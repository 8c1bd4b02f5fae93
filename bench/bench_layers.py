"""Benchmark: auxiliary layers (issue 13's goals), medians on this machine.

1. Class fractions of one full Sentinel-2 scene (the fixture item's real 10980 x 10980 grid,
   256-px chips: 1,764 chips) from a 10 m EPSG:4326 categorical COG on local disk
   (`synthetic.write_class_raster`, WorldCover classes in 3-pixel squares, deflate, 512-px
   tiles): `class_fractions.chip_classes` plus the rows `layers.py` writes (goal <= 1 s).
2. A quota sample of 10,000 chips over ~10 M chips (`bench_queries.fill`: Sentinel-2-like
   2.56 km chips, 400 one-degree tiles revisited ~15 times) with 4 quota classes and a cloud
   filter, a different seed each run (goal <= 1 s). The raster layer's fractions are
   generated in SQL (a dominant class per chip by hashing its key, WorldCover-like shares):
   what is measured is the selection, not the fractions.
3. `--within` a country-sized polygon layer at the same 10 M chips: Natural Earth's outline of
   Switzerland (the package's basemap) as a vector layer, with a time window calibrated to
   ~1,000 chips, a different window each run (goal p50 <= 100 ms).

    .venv/bin/python bench/bench_layers.py [--rows 10000000] [--runs 15] [--skip-fill]

Starts a new embedded cluster in a temp dir unless STACCHIP_BENCH_DATABASE_URL points at a
database to fill (its chips and layers are replaced!).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from bench_queries import fill  # the bench/ folder
from bench_store import (
    BENCH_URL_ENV,
    add_durability_option,
    admin_url,
    configuration,
    fresh_database,
)

from stacchip_db.class_fractions import chip_classes
from stacchip_db.db import init_database
from stacchip_db.grid import chip_grid
from stacchip_db.selection import ChipFilter, Sampling, build_selection, execute_selection
from stacchip_db.synthetic import WORLDCOVER_CLASSES, write_class_raster

REPO = Path(__file__).resolve().parents[1]
S2_ITEM = REPO / "stacchip_db/demo_data/sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"
TEN_METRES = 1 / 12000  # WorldCover's pixel, in degrees (8.33e-5)
SHARES = {"tree": 300, "grass": 250, "crop": 200, "shrub": 100, "built": 50, "water": 50,
          "bare": 50}  # per mille  # fmt: skip

log = logging.getLogger("bench_layers")


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def bench_fractions(runs: int) -> None:
    import rasterio
    import shapely.geometry

    from stacchip_db.layers import _rows

    item = json.loads(S2_ITEM.read_text())
    grid = chip_grid(item, chip_size=256)
    minx, miny, maxx, maxy = shapely.geometry.shape(item["geometry"]).bounds
    folder = Path(tempfile.mkdtemp(prefix="stacchip-bench-classes-"))
    try:
        started = time.perf_counter()
        path = write_class_raster(folder / "worldcover.tif",
                                  (minx - 0.02, miny - 0.02, maxx + 0.02, maxy + 0.02),
                                  TEN_METRES, seed=1)  # fmt: skip
        with rasterio.open(path) as ds:
            size = f"{ds.width} x {ds.height} px"
        print(f"\n1. class COG {size} ({path.stat().st_size / 2**20:.0f} MiB) written in "
              f"{time.perf_counter() - started:.0f} s; scene grid {grid.shape}, "
              f"{grid.size} chips")  # fmt: skip
        xs, ys = grid.indices()
        chips = list(zip(xs.tolist(), ys.tolist(), strict=True))
        names = dict(WORLDCOVER_CLASSES)
        order = {v: i for i, v in enumerate(names)}
        times, reads = [], []
        for _ in range(runs):
            with rasterio.open(path) as ds:  # a new open each run: no warm block cache
                clock = time.perf_counter()
                counted = chip_classes(grid, ds, chips)
                read = time.perf_counter() - clock
                rows = _rows("c", "i", 256, xs.tolist(), ys.tolist(), counted, names, order)
                times.append(time.perf_counter() - clock)
                reads.append(read)
        assert len(rows) == grid.size
        print(f"   class fractions of {grid.size} chips: median {median_ms(times):.0f} ms "
              f"(sampling + counting {median_ms(reads):.0f} ms), {runs} runs; goal <= 1000 ms, "
              f"ratio {median_ms(times) / 1000:.2f}")  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def generate_fractions(conn: psycopg.Connection) -> None:
    cases, low = [], 0
    for name, share in SHARES.items():
        cases.append(f"WHEN h < {low + share} THEN '{name}'")
        low += share
    conn.execute("DELETE FROM stacchip.layers")
    conn.execute(
        "INSERT INTO stacchip.layers (name, kind, source, class_values, class_names, nodata) "
        "VALUES ('worldcover', 'raster', 'generated', %s, %s, 0)",
        (list(WORLDCOVER_CLASSES), list(WORLDCOVER_CLASSES.values())),
    )
    clock = time.perf_counter()
    conn.execute("DROP INDEX IF EXISTS stacchip.chip_classes_dominant_key_idx")
    conn.execute(
        f"""
        INSERT INTO stacchip.chip_classes
        SELECT 'worldcover', c.collection, c.item_id, c.chip_size, c.chip_index_x,
               c.chip_index_y, k.key, jsonb_build_object(d.dominant, 0.6, 'water', 0.1),
               d.dominant, 0.0
        FROM stacchip.chips AS c,
             LATERAL (SELECT stacchip.chip_sample_key(c.collection, c.item_id, c.chip_size,
                      c.chip_index_x, c.chip_index_y) AS key) AS k,
             LATERAL (SELECT abs(k.key % 1000) AS h) AS m,
             LATERAL (SELECT CASE {" ".join(cases)} ELSE 'wetland' END AS dominant) AS d
        """
    )
    conn.execute("CREATE INDEX chip_classes_dominant_key_idx "
                 "ON stacchip.chip_classes (layer, dominant, sample_key)")  # fmt: skip
    conn.execute("VACUUM ANALYZE stacchip.chip_classes")
    size = conn.execute(
        "SELECT pg_total_relation_size('stacchip.chip_classes')").fetchone()[0]  # fmt: skip
    print(f"   fractions generated in {time.perf_counter() - clock:.0f} s "
          f"({size / 2**20:.0f} MiB with indexes)")  # fmt: skip


def timed(conn: psycopg.Connection, make, runs: int) -> tuple[list[float], list[int]]:
    times, counts = [], []
    for run in range(runs):
        chip_filter, sampling = make(run)
        selection = build_selection(chip_filter, sampling)
        clock = time.perf_counter()
        rows = execute_selection(conn, selection).fetchall()
        times.append(time.perf_counter() - clock)
        counts.append(len(rows))
    return times, counts


def add_switzerland(conn: psycopg.Connection, folder: Path) -> None:
    """The basemap's outline holding Bern (the file has outlines only) as layer `countries`."""
    import geopandas
    from shapely.geometry import Point

    from stacchip_db.layers import add_vector_layer, remove_layer

    frame = geopandas.read_file(REPO / "stacchip_db/basemap/ne_110m_countries.geojson")
    swiss = frame[frame.geometry.contains(Point(7.45, 46.95))].copy()
    swiss["NAME"] = "Switzerland"
    path = folder / "countries.gpkg"
    swiss[["NAME", "geometry"]].to_file(path)
    if conn.execute("SELECT 1 FROM stacchip.layers WHERE name = 'countries'").fetchone():
        remove_layer(conn, "countries")
    add_vector_layer(conn, "countries", str(path), columns=["NAME"])


def run(url: str, rows: int, runs: int, skip_fill: bool) -> None:
    bench_fractions(max(3, runs // 3))
    with psycopg.connect(url, autocommit=True) as conn:
        total = (conn.execute("SELECT count(*) FROM stacchip.chips").fetchone()[0]
                 if skip_fill else fill(conn, rows))  # fmt: skip
        print(f"\n{total:,} chips; {os.cpu_count()} cores (shared with other work)")
        generate_fractions(conn)
        quotas = (("tree", 0.3), ("crop", 0.2), ("built", 0.1), ("water", 0.15))
        cloud = ChipFilter(max_cloud=0.3)

        def quota(run: int) -> tuple[ChipFilter, Sampling]:
            return cloud, Sampling(10_000, seed=run, stratify_by="layer:worldcover",
                                   quotas=quotas)  # fmt: skip

        timed(conn, quota, 2)  # warm-up
        times, counts = timed(conn, quota, runs)
        print(f"\n2. quota sample 10,000 (4 quotas + max cloud 0.3): median "
              f"{median_ms(times):.0f} ms, min {min(times) * 1000:.0f}, max "
              f"{max(times) * 1000:.0f} ({runs} runs, {min(counts)}-{max(counts)} chips); "
              f"goal <= 1000 ms, ratio {median_ms(times) / 1000:.2f}")  # fmt: skip

        folder = Path(tempfile.mkdtemp(prefix="stacchip-bench-layers-"))
        add_switzerland(conn, folder)
        shutil.rmtree(folder, ignore_errors=True)
        switzerland = ("countries", "NAME", "Switzerland")
        (inside,) = conn.execute(
            "SELECT count(*) FROM stacchip.select_chips(within => %s)", (list(switzerland),)
        ).fetchone()
        days = min(2000, max(1, round(2190 * 1000 / max(inside, 1))))
        rng = random.Random(1)
        first = datetime(2018, 1, 1, tzinfo=UTC)

        def within(_run: int) -> tuple[ChipFilter, None]:
            start = first + timedelta(days=rng.randrange(0, 2190 - days))
            return ChipFilter(within=switzerland, start=start,
                              end=start + timedelta(days=days)), None  # fmt: skip

        timed(conn, within, 3)
        times, counts = timed(conn, within, runs * 2)
        print(f"\n3. --within countries:NAME=Switzerland ({inside:,} chips in all) + a "
              f"{days}-day window: p50 {median_ms(times):.1f} ms, max {max(times) * 1000:.1f} "
              f"({runs * 2} runs, median {statistics.median(counts):.0f} chips); goal <= 100 ms, "
              f"ratio {median_ms(times) / 100:.2f}")  # fmt: skip
        clock = time.perf_counter()
        whole = execute_selection(conn, build_selection(ChipFilter(within=switzerland)))
        n = len(whole.fetchall())
        print(f"   all {n:,} chips within Switzerland: {time.perf_counter() - clock:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=15)
    add_durability_option(parser)
    parser.add_argument("--skip-fill", action="store_true",
                        help="measure the chips already in STACCHIP_BENCH_DATABASE_URL")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
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
