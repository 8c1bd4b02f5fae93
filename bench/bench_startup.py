"""Time from `stacchip-db db start` on a new $STACCHIP_HOME to a migrated database.

Each repetition: a fresh temporary home, `db start` then `db init` as separate processes (as a
user would type them), timed together and apart; the cluster is stopped and removed after.
Prints the median of --repeat runs (default 3).

    .venv/bin/python bench/bench_startup.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(home: Path, *args: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACCHIP_")}
    env["STACCHIP_HOME"] = str(home)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stacchip_db.cli", "-q", *args], env=env, check=True,
                   capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    starts, inits, totals = [], [], []
    for _ in range(args.repeat):
        home = Path(tempfile.mkdtemp(prefix="sdb-bench-"))
        try:
            start = _run(home, "db", "start")
            init = _run(home, "db", "init")
        finally:
            _run(home, "db", "stop")
            shutil.rmtree(home, ignore_errors=True)
        starts.append(start)
        inits.append(init)
        totals.append(start + init)
    print(f"runs: {args.repeat} (fresh STACCHIP_HOME each)")
    print(f"db start (initdb + start):  median {statistics.median(starts):.2f} s  {starts}")
    print(f"db init (pgstac + alembic): median {statistics.median(inits):.2f} s")
    print(f"start -> migrated database: median {statistics.median(totals):.2f} s")


if __name__ == "__main__":
    main()
