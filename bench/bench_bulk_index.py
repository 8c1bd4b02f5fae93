"""Benchmark: `stacchip-db index` of the 200 NAIP fixture items into an empty database.

End to end, as a user runs it: each repetition creates a fresh, migrated, EMPTY database and
times `stacchip-db -q index --quality none --json naip-planetary-computer-200.ndjson` as a
subprocess, from process start to exit (438,643 chips of 256 px). Into an empty table the
command bulk-loads (indexes rebuilt once); `--no-bulk` times the batched path instead. Reports
the median of the repetitions in chips/s (goal >= 100,000 chips/s) and the median split: process
start (wall minus the command's own time), indexing, pgstac upsert, COPY, index rebuild. For
reference it also runs the original stacchip 0.1.38's grid alone
(`NoStatsChipIndexer(item).create_index()`, no storage) on the first items, in its own venv
(bench/setup_original.sh), in the same run.

A new embedded cluster, durable (fsync on, as `stacchip-db db start` runs it), is started in a
temp dir unless STACCHIP_BENCH_DATABASE_URL names a server (fresh databases are created on it);
`--no-durable` measures a throwaway fsync-off cluster instead, labelled as such.

    .venv/bin/python bench/bench_bulk_index.py [--reps 3] [--orig-items 20] [--no-bulk]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from bench_store import (  # noqa: E402
    FIXTURES,
    add_durability_option,
    admin_url,
    configuration,
    drop_database,
    fresh_database,
)

NAIP_200 = FIXTURES / "naip-planetary-computer-200.ndjson"
ORIG_VENV = Path(os.environ.get("STACCHIP_ORIG_VENV", "/work/venvs/stacchip-orig"))
GOAL = 100_000
CLI = [sys.executable, "-m", "stacchip_db.cli"]

ORIG_GRID = """
import json, sys, time
from pystac import Item
from stacchip.indexer import NoStatsChipIndexer
items = [json.loads(line) for line in open(sys.argv[1])][: int(sys.argv[2])]
start, chips = time.perf_counter(), 0
for data in items:
    chips += NoStatsChipIndexer(Item.from_dict(data)).create_index().num_rows
print(json.dumps({"chips": chips, "seconds": time.perf_counter() - start}))
"""


def run_ours(url: str, mode: str) -> tuple[float, dict]:
    env = {**os.environ, "STACCHIP_DATABASE_URL": url}
    start = time.perf_counter()
    done = subprocess.run(
        [*CLI, "-q", "index", "--quality", "none", mode, "--json", str(NAIP_200)],
        env=env, cwd=REPO, capture_output=True, text=True, check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"stacchip-db index failed: {done.stderr.strip()}")
    return seconds, json.loads(done.stdout)


def split_of(wall: float, summary: dict) -> dict[str, float]:
    """Where the wall time went: process start and the bulk load's steps (batched: start only)."""
    timings = summary.get("timings") or {}
    split = {"start": wall - summary["seconds"]}
    if timings:
        split["index"] = timings.get("index", 0.0)
        split["upsert"] = timings.get("partitions", 0.0) + timings.get("upsert", 0.0)
        split["copy"] = sum(timings.get(k, 0.0) for k in ("lock", "delete", "copy"))
        split["rebuild"] = timings.get("rebuild", 0.0) + timings.get("commit", 0.0)
    return split


def run_original(items: int) -> dict | None:
    python = ORIG_VENV / "bin" / "python"
    if not python.exists():
        return None
    done = subprocess.run(
        [str(python), "-c", ORIG_GRID, str(NAIP_200), str(items)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        print(f"original stacchip failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    add_durability_option(parser)
    parser.add_argument("--orig-items", type=int, default=20,
                        help="items the original's grid runs on (0: skip it)")
    parser.add_argument("--no-bulk", action="store_true",
                        help="time the batched path (index --no-bulk) instead of the bulk load")
    args = parser.parse_args()
    mode = "--no-bulk" if args.no_bulk else "--bulk"

    rates, walls, summaries = [], [], []
    splits: dict[str, list[float]] = {}
    print(f"configuration: {configuration(args.durable)}")
    with admin_url(args.durable) as admin:
        for rep in range(args.reps):
            name = f"stacchip_bench_bulk_{os.getpid()}_{rep}"
            url = fresh_database(admin, name)
            try:
                seconds, summary = run_ours(url, mode)
            finally:
                drop_database(admin, name)
            rates.append(summary["chips"] / seconds)
            walls.append(seconds)
            summaries.append(summary)
            split = split_of(seconds, summary)
            for step, value in split.items():
                splits.setdefault(step, []).append(value)
            print(
                f"run {rep + 1}: {summary['items']} items, {summary['chips']:,} chips in "
                f"{seconds:.2f} s wall ({summary['seconds']:.2f} s inside the command) = "
                f"{summary['chips'] / seconds:,.0f} chips/s; load {os.getloadavg()[0]:.2f}; "
                + ", ".join(f"{step} {value:.2f}" for step, value in split.items())
            )
    median = statistics.median(rates)
    if splits:
        print(
            f"median split (s), {mode}: "
            + ", ".join(f"{step} {statistics.median(v):.2f}" for step, v in splits.items())
        )
    print(
        f"stacchip-db index {mode}, 200 NAIP items, end to end incl. process start: median "
        f"{median:,.0f} chips/s over {args.reps} runs (median wall {statistics.median(walls):.2f}"
        f" s); goal >= {GOAL:,}: {'met' if median >= GOAL else 'NOT met'}"
    )
    if args.orig_items:
        orig = run_original(args.orig_items)
        if orig is None:
            print(f"original stacchip: no venv at {ORIG_VENV} (run bench/setup_original.sh)")
        else:
            orig_rate = orig["chips"] / orig["seconds"]
            print(
                f"original stacchip 0.1.38 grid only (NoStatsChipIndexer, no storage), first "
                f"{args.orig_items} items: {orig['chips']:,} chips in {orig['seconds']:.2f} s = "
                f"{orig_rate:,.0f} chips/s; ours end to end is {median / orig_rate:.1f}x that"
            )
    print(f"conditions: 2-core machine shared with other jobs, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
