"""Benchmark: Clay's scale on one server (issue 12): fill a durable database with N chips in
Clay's platform mix, measure every goal, extrapolate to 72 M and 1 B chips.

For each `--chips N` (default 10 M, then 50 M; each in a fresh database): grid-only STAC
items (projection fields, one asset, no quality band) of seven collections in Clay v1.5's
proportions, 2018-2023, scattered over the globe (seeded), are indexed by `index_item`
(`quality="none"`, `max_nodata=1`: the whole grid) and stored by the write path of
`stacchip-db index --quality none`: `bulk_load` (db/bulk.py), one call per collection, each
a new partition built apart and attached. NAIP, the largest, is loaded last: the "new
collection into a filled database" figure. Then, with medians:

- store of one 1,764-chip item, every row changed (`store_item`), into the full table;
- bbox + date + cloud (~1,000 chips) through `stacchip.select_chips`;
- seeded sample of 10,000 (`stacchip.sample_chips`), several seeds;
- stratified 10,000 over a Europe-sized box by collection / year / quarter / cell;
- table + indexes per chip (every partition, `pg_total_relation_size`), per index;
- 8 concurrent writers (processes, `store_items` of new items) vs one: rows lost/duplicated,
  aggregate rate.

Also once (a fresh database): `index_items` of the 200 NAIP fixture items (`stacchip-db
index`'s library call), whole command. At the end, a table of the measured figures for each N
and their extrapolation to 72 M and 1 B (bytes and load time linear in N; latencies as the
largest measured N, which index walks make nearly independent of N).

    .venv/bin/python bench/bench_scale.py [--chips 10000000 50000000] [--no-durable]
    .venv/bin/python bench/bench_scale.py --chips 1000000     # a quick check

Mind the disk: about 0.5 kB a chip plus WAL (`df -h`). Uses the embedded cluster of
bench_store.py (durable unless `--no-durable`, labelled) or STACCHIP_BENCH_DATABASE_URL.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_store import (  # noqa: E402
    FIXTURES,
    add_durability_option,
    admin_url,
    chip_versions,
    configuration,
    drop_database,
    fresh_database,
)

CLAY_MILLIONS = {  # Clay v1.5 docs/release-notes/data_sampling.md
    "naip": 20.98,
    "sentinel-2-l2a": 18.68,
    "sentinel-1-rtc": 16.13,
    "landsat-c2l1": 5.83,
    "landsat-c2l2-sr": 5.79,
    "linz": 3.30,
    "modis-09A1-061": 1.35,
}
# Per collection: grid (rows, cols) and pixel size (m) of an item; chips of 256 px.
GRIDS = {
    "naip": ((10000, 12000), 0.6),
    "sentinel-2-l2a": ((10980, 10980), 10.0),
    "sentinel-1-rtc": ((10980, 10980), 10.0),
    "landsat-c2l1": ((7700, 7800), 30.0),
    "landsat-c2l2-sr": ((7700, 7800), 30.0),
    "linz": ((9600, 6400), 0.3),
    "modis-09A1-061": ((2400, 2400), 463.3),
}
LAST = "naip"  # loaded last, into the filled database
CHIP_SIZE = 256
EUROPE = [-10.0, 35.0, 30.0, 60.0]
NAIP_200 = "naip-planetary-computer-200.ndjson"
GOALS = {
    "index 200 NAIP items, chips/s": ">= 100,000",
    "bulk load new collection, chips/s": ">= 100,000, within 20 % of empty",
    "store 1,764-chip item p50, ms": "<= 50",
    "bbox+date+cloud p50, ms": "<= 20",
    "seeded sample 10k p50, ms": "<= 300",
    "stratified 10k p50, ms": "<= 1,000 each",
    "bytes per chip": "<= 250",
    "8 writers / 1 writer": ">= 2.5, no lost/duplicate",
}


def make_item(
    collection: str, k: int, rng: random.Random, grid: str | None = None
) -> dict[str, Any]:
    """A grid-only STAC item of `collection` (with the grid of `grid`, else of `collection`)
    somewhere on the globe, 2018-2023."""
    import pyproj

    (rows, cols), res = GRIDS[grid or collection]
    lon, lat = rng.uniform(-179.0, 179.0), rng.uniform(-56.0, 70.0)
    zone = int((lon + 180) // 6) + 1
    epsg = (32600 if lat >= 0 else 32700) + zone
    to_utm = pyproj.Transformer.from_crs(4326, epsg, always_xy=True)
    to_lonlat = pyproj.Transformer.from_crs(epsg, 4326, always_xy=True)
    cx, cy = to_utm.transform(lon, lat)
    x0, y0 = cx - cols * res / 2, cy + rows * res / 2
    corners = [(x0, y0), (x0 + cols * res, y0), (x0 + cols * res, y0 - rows * res),
               (x0, y0 - rows * res)]  # fmt: skip
    ring = [list(to_lonlat.transform(x, y)) for x, y in corners]
    when = datetime(2018, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.uniform(0, 6 * 365.25 * 86400))
    stamp = when.strftime("%Y%m%dT%H%M%S")
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": f"{collection[:6].upper()}_T{zone:02d}{k:07d}_{stamp}_L2A",  # ~35 chars, as S2
        "collection": collection,
        "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
        "bbox": [min(p[0] for p in ring), min(p[1] for p in ring),
                 max(p[0] for p in ring), max(p[1] for p in ring)],
        "properties": {
            "datetime": when.isoformat().replace("+00:00", "Z"),
            "proj:epsg": epsg,
            "proj:shape": [rows, cols],
            "proj:transform": [res, 0.0, x0, 0.0, -res, y0],
        },
        "assets": {"data": {"href": f"s3://bench/{collection}/{k}.tif", "type": "image/tiff"}},
        "links": [],
    }


def chips_per_item(collection: str) -> int:
    (rows, cols), _ = GRIDS[collection]
    return (rows // CHIP_SIZE) * (cols // CHIP_SIZE)


def plan(total: int) -> dict[str, int]:
    """Items per collection for about `total` chips in Clay's proportions."""
    whole = sum(CLAY_MILLIONS.values())
    return {
        c: max(1, round(total * share / whole / chips_per_item(c)))
        for c, share in CLAY_MILLIONS.items()
    }


def load_collection(url: str, collection: str, items: int, seed: int) -> dict[str, float]:
    """Index `items` grid-only items and bulk-load them (a new partition); seconds, chips."""
    from stacchip_db.db import connect
    from stacchip_db.db.bulk import bulk_load
    from stacchip_db.index import index_item

    rng = random.Random(f"{seed}-{collection}")
    clock = time.perf_counter()
    pairs = []
    for k in range(items):
        item = make_item(collection, k, rng)
        pairs.append((item, index_item(item, quality="none", max_nodata=1.0, max_chips=None)))
    indexed = time.perf_counter() - clock
    with connect(url) as conn:
        clock = time.perf_counter()
        result = bulk_load(conn, pairs, chip_size=CHIP_SIZE)
        loaded = time.perf_counter() - clock
    return {"chips": result.chips, "index_s": indexed, "load_s": loaded, **{
        f"t_{k}": v for k, v in result.timings.items()}}


def median_ms(conn: Any, query: str, params_list: list[Any]) -> tuple[float, int]:
    """Median wall time (ms) of `query` over its parameter sets, and the last row count."""
    times, rows = [], 0
    for params in params_list:
        clock = time.perf_counter()
        rows = len(conn.execute(query, params).fetchall())
        times.append(time.perf_counter() - clock)
    return statistics.median(times) * 1000, rows


def _writer(url: str, collection: str, first: int, items: int, seed: int) -> tuple[int, float]:
    """Child process: store `items` new 1,764-chip items, one `store_items` each."""
    from stacchip_db.db import connect
    from stacchip_db.db.store import store_items
    from stacchip_db.index import index_item

    rng = random.Random(f"writer-{seed}-{first}")
    pairs = []
    for k in range(first, first + items):
        item = make_item(collection, k, rng, grid="sentinel-2-l2a")
        pairs.append((item, index_item(item, quality="none", max_nodata=1.0, max_chips=None)))
    stored = 0
    with connect(url) as conn:
        clock = time.perf_counter()
        for pair in pairs:
            stored += store_items(conn, [pair], chip_size=CHIP_SIZE).chips
        return stored, time.perf_counter() - clock


def writers_figure(url: str, writers: int, items: int) -> dict[str, Any]:
    """1 writer, then `writers` at once, of new items of a new collection; rates and a check."""
    from stacchip_db.db import connect

    out: dict[str, Any] = {}
    for n, collection in ((1, "bench-writers-1"), (writers, f"bench-writers-{writers}")):
        jobs = [(url, collection, 100_000 * w, items, w) for w in range(n)]
        clock = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(n) as pool:
            results = pool.starmap(_writer, jobs)
        wall = time.perf_counter() - clock
        chips = sum(r[0] for r in results)
        busy = max(r[1] for r in results)  # writing time, after each child indexed its items
        with connect(url) as conn:
            rows, distinct = conn.execute(
                "SELECT count(*), count(DISTINCT (item_id, chip_index_x, chip_index_y)) "
                "FROM stacchip.chips WHERE collection = %s", (collection,)
            ).fetchone()
        out[n] = {"chips": chips, "rate": chips / busy, "wall": wall, "rows": rows,
                  "distinct": distinct}  # fmt: skip
    one, many = out[1], out[writers]
    return {
        "ratio": many["rate"] / one["rate"],
        "one_rate": one["rate"],
        "many_rate": many["rate"],
        "exact": many["rows"] == many["distinct"] == many["chips"]
        and one["rows"] == one["chips"],
    }


def measure(url: str, total: int, seed: int, reps: int, writers: int) -> dict[str, Any]:
    from stacchip_db.db import connect
    from stacchip_db.db.store import store_item
    from stacchip_db.index import index_item

    figures: dict[str, Any] = {"N": total}
    counts = plan(total)
    order = [c for c in counts if c != LAST] + [LAST]
    loads = {}
    for collection in order:
        loads[collection] = load_collection(url, collection, counts[collection], seed)
        done = loads[collection]
        print(f"  loaded {collection}: {done['chips']:,} chips, index {done['index_s']:.1f} s, "
              f"bulk_load {done['load_s']:.1f} s ({done['chips'] / done['load_s']:,.0f} chips/s"
              f"; copy {done.get('t_copy', 0):.1f} s, indexes {done.get('t_rebuild', 0):.1f} s, "
              f"attach {done.get('t_attach', 0):.2f} s)", flush=True)  # fmt: skip
    first, last = loads[order[0]], loads[LAST]
    figures["chips"] = sum(v["chips"] for v in loads.values())
    figures["empty_rate"] = first["chips"] / first["load_s"]
    figures["new_rate"] = last["chips"] / last["load_s"]
    figures["new_chips"] = last["chips"]
    figures["before_new"] = figures["chips"] - last["chips"]
    figures["new_rate_with_index"] = last["chips"] / (last["load_s"] + last["index_s"])
    figures["load_s"] = sum(v["load_s"] for v in loads.values())
    figures["index_s"] = sum(v["index_s"] for v in loads.values())

    with connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE stacchip.chips")
        sizes = conn.execute(
            """
            SELECT sum(pg_total_relation_size(p.oid))::float8,
                   sum(pg_relation_size(p.oid))::float8
            FROM pg_inherits h JOIN pg_class p ON p.oid = h.inhrelid
            WHERE h.inhparent = 'stacchip.chips'::regclass
            """
        ).fetchone()
        per_index = conn.execute(
            """
            SELECT pi.relname, sum(pg_relation_size(h.inhrelid))::float8
            FROM pg_index x JOIN pg_class pi ON pi.oid = x.indexrelid
            JOIN pg_inherits h ON h.inhparent = pi.oid
            WHERE x.indrelid = 'stacchip.chips'::regclass GROUP BY 1 ORDER BY 2 DESC
            """
        ).fetchall()
        rows = conn.execute("SELECT count(*) FROM stacchip.chips").fetchone()[0]
        figures["bytes_per_chip"] = sizes[0] / rows
        figures["heap_per_chip"] = sizes[1] / rows
        figures["index_per_chip"] = {name: size / rows for name, size in per_index}

        # bbox + date + cloud around item centres, a box of ~0.45 deg: ~1,000 chips
        rng = random.Random(seed)
        centres = conn.execute(
            "SELECT ST_X(c), ST_Y(c), datetime FROM (SELECT ST_Centroid(geometry) c, datetime "
            "FROM stacchip.chips WHERE collection = 'sentinel-2-l2a' "
            "ORDER BY sample_key LIMIT %s) s", (reps,)
        ).fetchall()
        boxes = []
        for x, y, when in centres:
            half = 0.22 + rng.uniform(0, 0.02)
            start = when - timedelta(days=180)
            boxes.append(([x - half, y - half, x + half, y + half], start,
                          start + timedelta(days=365), 0.5))  # fmt: skip
        figures["bbox_ms"], figures["bbox_rows"] = median_ms(
            conn,
            "SELECT * FROM stacchip.select_chips(bbox => %s, start_time => %s, "
            "end_time => %s, max_cloud => %s::real)",
            boxes,
        )
        figures["sample_ms"], _ = median_ms(
            conn, "SELECT * FROM stacchip.sample_chips(10000, %s)",
            [(s,) for s in range(1, reps + 1)],
        )  # fmt: skip
        for by in ("collection", "year", "quarter", "cell"):
            figures[f"strat_{by}_ms"], figures[f"strat_{by}_rows"] = median_ms(
                conn,
                "SELECT * FROM stacchip.sample_chips_stratified(10000, %s, %s, "
                "bbox => %s::float8[])",
                [(s, by, EUROPE) for s in range(1, max(3, reps // 3) + 1)],
            )
        plan_text = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM stacchip.sample_chips_stratified("
            "10000, 1, 'cell', bbox => %s::float8[])", (EUROPE,)).fetchall())  # fmt: skip
        figures["cell_plan"] = plan_text

        # one 1,764-chip item re-stored with every row changed, into the full table
        item = make_item("sentinel-2-l2a", 9_999_999, random.Random(seed))
        chips = index_item(item, quality="none", max_nodata=1.0, max_chips=None)
        versions = chip_versions(chips)
        store_item(conn, item, versions[1], chip_size=CHIP_SIZE)
        times = []
        for rep in range(reps):
            clock = time.perf_counter()
            store_item(conn, item, versions[rep % 2], chip_size=CHIP_SIZE)
            times.append(time.perf_counter() - clock)
        figures["store_ms"] = statistics.median(times) * 1000
        figures["store_chips"] = chips.num_rows
    figures.update({f"writers_{k}": v for k, v in writers_figure(url, writers, 6).items()})
    return figures


def index_fixture(admin: str) -> float:
    """`index_items` of the 200 NAIP fixture items into an empty database: chips/s, whole call."""
    from stacchip_db import index_items

    name = f"stacchip_bench_scale_index_{os.getpid()}"
    url = fresh_database(admin, name)
    try:
        clock = time.perf_counter()
        summary = index_items(FIXTURES / NAIP_200, url)
        seconds = time.perf_counter() - clock
        return summary.chips / seconds
    finally:
        drop_database(admin, name)


def extrapolate(figures: list[dict[str, Any]], n: int) -> dict[str, str]:
    """Figures at `n` chips: bytes and load time linear in n; latencies as the largest run."""
    big = max(figures, key=lambda f: f["N"])
    load_rate = big["chips"] / big["load_s"]
    index_rate = big["chips"] / big["index_s"]
    return {
        "bytes": f"{big['bytes_per_chip'] * n / 1e9:,.0f} GB",
        "load": f"{n / load_rate / 3600:,.1f} h db + {n / index_rate / 3600:,.1f} h indexing",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", type=int, nargs="+", default=[10_000_000, 50_000_000])
    parser.add_argument("--reps", type=int, default=9, help="repetitions of each query")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--keep", action="store_true", help="keep the databases (not dropped)")
    add_durability_option(parser)
    args = parser.parse_args()
    print(f"configuration: {configuration(args.durable)}; machine: {os.cpu_count()} cores")
    results = []
    with admin_url(args.durable) as admin:
        clock = time.perf_counter()
        index_rate = index_fixture(admin)
        print(f"index_items of the 200 NAIP fixture items into an empty database: "
              f"{index_rate:,.0f} chips/s ({time.perf_counter() - clock:.1f} s)", flush=True)
        for total in args.chips:
            name = f"stacchip_bench_scale_{total}"
            url = fresh_database(admin, name)
            print(f"-- {total:,} chips into {name}", flush=True)
            clock = time.perf_counter()
            try:
                figures = measure(url, total, args.seed, args.reps, args.writers)
            finally:
                if not args.keep:
                    drop_database(admin, name)
            figures["wall_s"] = time.perf_counter() - clock
            results.append(figures)
            print(json.dumps({k: v for k, v in figures.items() if k != "cell_plan"},
                             default=str), flush=True)  # fmt: skip
            print("EXPLAIN (ANALYZE, BUFFERS) of the cell-stratified sample:")
            print(figures["cell_plan"], flush=True)
    report(results, index_rate)


def report(results: list[dict[str, Any]], index_rate: float) -> None:
    heads = [f"{f['chips'] / 1e6:,.1f} M" for f in results]
    rows = [
        ("index 200 NAIP items, chips/s", [f"{index_rate:,.0f}"] * len(results)),
        ("bulk load, empty database, chips/s", [f"{f['empty_rate']:,.0f}" for f in results]),
        ("bulk load new collection, chips/s", [
            f"{f['new_rate']:,.0f} ({f['new_chips'] / 1e6:.1f} M into "
            f"{f['before_new'] / 1e6:.1f} M; {f['new_rate'] / f['empty_rate']:.0%} of empty)"
            for f in results]),
        ("  same, with indexing the items", [f"{f['new_rate_with_index']:,.0f}" for f in results]),
        ("store 1,764-chip item p50, ms", [f"{f['store_ms']:.1f}" for f in results]),
        ("bbox+date+cloud p50, ms", [f"{f['bbox_ms']:.1f} ({f['bbox_rows']} chips)"
                                     for f in results]),
        ("seeded sample 10k p50, ms", [f"{f['sample_ms']:.0f}" for f in results]),
        *[(f"stratified 10k by {by} p50, ms", [f"{f[f'strat_{by}_ms']:.0f}" for f in results])
          for by in ("collection", "year", "quarter", "cell")],
        ("bytes per chip (table + indexes)", [
            f"{f['bytes_per_chip']:.0f} (heap {f['heap_per_chip']:.0f})" for f in results]),
        ("8 writers / 1 writer", [
            f"{f['writers_ratio']:.2f} ({f['writers_many_rate']:,.0f} vs "
            f"{f['writers_one_rate']:,.0f} chips/s; exact: {f['writers_exact']})"
            for f in results]),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print("\n| figure | " + " | ".join(heads) + " | goal |")
    print("| --- |" + " --- |" * (len(heads) + 1))
    for name, values in rows:
        goal = next((g for k, g in GOALS.items() if name.startswith(k[:18])), "")
        print(f"| {name:<{width}} | " + " | ".join(values) + f" | {goal} |")
    print("\nper index, bytes per chip (largest run):")
    big = max(results, key=lambda f: f["N"])
    for name, size in big["index_per_chip"].items():
        print(f"  {name:<32} {size:6.1f}")
    print("\nextrapolated (bytes and load time linear in chips; query latencies as measured at "
          f"{big['chips'] / 1e6:.0f} M: index walks grow with log N):")
    for n in (72_070_000, 1_000_000_000):
        e = extrapolate(results, n)
        print(f"  {n / 1e6:,.0f} M chips: {e['bytes']}, load {e['load']}")
    print(f"load average: {os.getloadavg()[0]:.2f} (2-core machine, shared)")


if __name__ == "__main__":
    main()
