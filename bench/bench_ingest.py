"""Benchmark: sentinel-2 ingest jobs from the loopback STAC API into an embedded database.

Set-up (not timed): a new embedded cluster (durable, as users run it) holding a pgstac source
catalog served by stac-fastapi-pgstac on 127.0.0.1 (`stacchip_db.demo`) and the main database.
The catalog has the demo's Sentinel-2 scenes for 8 MGRS tiles (one per job, so concurrent jobs
write different items, as Batch array jobs over different tiles do); every asset points at one
set of synthetic COGs on local disk at `--scale` (5: 2196 px at 10 m, an 8 x 8 chip grid).

1. One job over 8 scenes (`stacchip-db ingest sentinel-2 --json` in a subprocess, new target
   and empty tables each repetition): wall time and the job's own split (search, copy,
   index, store); the quality read inside `index` is measured apart (reading the 8 copied SCL
   bands with `read_quality_band`). Median of `--reps`.
2. 8 concurrent jobs (8 subprocesses, one tile each) against 1 job: jobs per minute and chip
   rows stored per second. Median of `--reps`.

    .venv/bin/python bench/bench_ingest.py [--reps 3] [--scale 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import psycopg

from stacchip_db.db import init_database
from stacchip_db.db.embedded import EmbeddedCluster
from stacchip_db.demo import (
    S2_COLLECTION_FIXTURE,
    S2_TILE,
    StacApiServer,
    collection_document,
    load_catalog,
    s2_item,
    s2_sample_rows,
    s2_variants,
    synthesize_assets,
    write_sample_source,
)
from stacchip_db.grid import chip_grid
from stacchip_db.processors.sentinel2 import choose_years
from stacchip_db.quality import read_quality_band

JOBS = 8
TILES = [f"2{n}HNJ" for n in range(JOBS)]  # 20HNJ … 27HNJ: names only, same footprint


def full_indexes(count: int) -> list[int]:
    """Job indexes whose two years have a scene in all 8 quarters (not 2020 or 2021)."""
    found, index = [], 0
    while len(found) < count:
        if not set(choose_years(index)) & {2020, 2021}:
            found.append(index)
        index += 1
    return found


def ingest(url: str, api: str, source: Path, target: Path, index: int) -> subprocess.Popen:
    env = dict(os.environ, STACCHIP_DATABASE_URL=url)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stacchip_db.cli",
            "-q",
            "ingest",
            "sentinel-2",
            "--index",
            str(index),
            "--sample-source",
            str(source),
            "--target",
            str(target),
            "--stac-api",
            api,
            "--json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed: {err.strip()}")
    return json.loads(out)


def reset(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM stacchip.chips")
        conn.execute("DELETE FROM pgstac.items")
        conn.execute("DELETE FROM stacchip.jobs")


def run_round(url: str, api: str, source: Path, work: Path, indexes: list[int]) -> tuple:
    """Run the jobs at once; (wall seconds, summaries, chip rows in the database)."""
    reset(url)
    target = work / f"target-{time.monotonic_ns()}"
    start = time.perf_counter()
    procs = [ingest(url, api, source, target, i) for i in indexes]
    summaries = [finish(p) for p in procs]
    wall = time.perf_counter() - start
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT count(*) FROM stacchip.chips").fetchone()[0]
    shutil.rmtree(target, ignore_errors=True)
    return wall, summaries, rows


def quality_read_seconds(items: list[dict]) -> float:
    start = time.perf_counter()
    for item in items:
        read_quality_band(chip_grid(item), item["assets"]["scl"]["href"], asset="scl")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=int, default=5)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="stacchip-bench-ingest-"))
    cluster = EmbeddedCluster(home, database="postgres")
    cluster.start()
    try:
        admin = cluster.socket_url("postgres")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench_source")
            conn.execute("CREATE DATABASE bench_main")
        source_url, main_url = cluster.socket_url("bench_source"), cluster.socket_url("bench_main")
        bases = synthesize_assets(home / "cogs", s2_scale=args.scale)
        base_variants = [v for v in s2_variants() if v.tile == S2_TILE]
        items = [
            s2_item(bases["s2"], replace(v, tile=tile), "sentinel-2-l2a")
            for tile in TILES
            for v in base_variants
        ]
        load_catalog(
            source_url, [collection_document(S2_COLLECTION_FIXTURE, "sentinel-2-l2a")], items
        )
        init_database(main_url)
        indexes = full_indexes(JOBS)
        # Row i of the sample source is tile i for the chosen indexes: each job its own tile.
        area = s2_sample_rows(1)[0][0]
        rows = [(area, {"name": S2_TILE})] * (max(indexes) + 1)
        for tile, index in zip(TILES, indexes, strict=True):
            rows[index] = (area, {"name": tile})
        source = write_sample_source(home / "samples.geojson", rows)

        with StacApiServer(source_url) as api:
            singles, concurrent = [], []
            for _ in range(args.reps):
                singles.append(run_round(main_url, api.url, source, home, indexes[:1]))
            for _ in range(args.reps):
                concurrent.append(run_round(main_url, api.url, source, home, indexes))

        # Quality read apart: the 8 SCL bands of one job's scenes (copied files are gone; the
        # copies are byte-identical to the shared synthetic COG, so read that).
        scl_items = [i for i in items if i["properties"]["grid:code"] == f"MGRS-{TILES[0]}"][:8]
        quality = statistics.median(quality_read_seconds(scl_items) for _ in range(args.reps))
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    wall1 = med([w for w, _, _ in singles])
    phases = {
        k: med([s[0]["timings"][k] for _, s, _ in singles])
        for k in ("search", "copy", "index", "store")
    }
    scenes = len(singles[0][1][0]["scenes"])
    chips1 = singles[0][2]
    print(
        f"conditions: {os.cpu_count()} CPUs, scale {args.scale}, {args.reps} repetitions, "
        f"medians; embedded PostgreSQL (durable), loopback stac-fastapi-pgstac, local target"
    )
    print(f"\n1 job, {scenes} scenes, {chips1} chips: wall {wall1:.2f} s (process start included)")
    for name, seconds in phases.items():
        print(f"  {name:<7} {seconds:6.2f} s")
    print(
        f"  of which quality read (8 SCL bands, measured apart) {quality:.2f} s, "
        f"index without it {max(phases['index'] - quality, 0):.2f} s"
    )
    print(
        f"  job total (phases) {sum(phases.values()):.2f} s; process start, imports, "
        f"sample read: {wall1 - sum(phases.values()):.2f} s"
    )

    wall8 = med([w for w, _, _ in concurrent])
    rows8 = concurrent[0][2]
    print(f"\n{JOBS} concurrent jobs ({rows8} chips): wall {wall8:.2f} s")
    print(
        f"  jobs per minute: 1 job {60 / wall1:.1f}, {JOBS} jobs {60 * JOBS / wall8:.1f} "
        f"(x{(JOBS / wall8) / (1 / wall1):.2f})"
    )
    print(f"  chip rows per second: 1 job {chips1 / wall1:.0f}, {JOBS} jobs {rows8 / wall8:.0f}")


if __name__ == "__main__":
    main()
