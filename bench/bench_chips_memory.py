"""Peak RSS of `stacchip-db chips --format geojson` and `--format csv` over ~438k chips.

The database is the default durable configuration: an embedded cluster started by
`stacchip-db db start` under a temporary STACCHIP_HOME (fsync on), `db init`, then N synthetic
chips made by the server (`synthetic.fill_chips`: generate_series, no files). Each run is a
fresh `stacchip-db -q chips --format F` process writing to standard output (sent to
/dev/null, so the disk holds only the database, ~0.3 GB); its peak RSS is the VmHWM of
/proc/self/status read at exit (wait4's ru_maxrss would also count this script's memory, which
a child starts from before it execs). Prints the median of --repeat runs per format.

    .venv/bin/python bench/bench_chips_memory.py --chips 438000 --repeat 3
    .venv/bin/python bench/bench_chips_memory.py --code /path/to/other/checkout   # compare

Goal (issue 10): geojson < 300 MB (before streaming: 1.56 GB geojson, 917 MB csv).
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

REPO = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(REPO))
from tests.peak_rss import peak_rss_mib  # noqa: E402  (the tests' measurement)


def cli_env(home: Path, code: Path = REPO) -> dict[str, str]:
    """The environment of a `stacchip-db` run against the embedded home `home`, importing
    stacchip_db from `code` (no STACCHIP_* variable of the caller's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACCHIP_")}
    env["STACCHIP_HOME"] = str(home)
    env["PYTHONPATH"] = str(code)
    return env


def run_cli(env: dict[str, str], *args: str) -> str:
    """`stacchip-db -q ARGS` in `env`; its stdout."""
    return subprocess.run(
        [sys.executable, "-m", "stacchip_db.cli", "-q", *args],
        env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()


def _measure(
    env: dict[str, str], code: Path, output_format: str, report: Path
) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one `chips --format F` run to /dev/null."""
    started = time.perf_counter()
    # in `code`: `python -c` puts the working directory first on sys.path
    rss = peak_rss_mib(["-q", "chips", "--format", output_format], env, code, report)
    return rss, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", type=int, default=438_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--formats", default="geojson,csv")
    parser.add_argument("--code", type=Path, default=REPO,
                        help="source tree whose stacchip_db runs the chips command")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="sdb-bench-mem-"))
    fill_env = cli_env(home, REPO)
    env = cli_env(home, args.code)
    try:
        run_cli(fill_env, "db", "start")
        run_cli(fill_env, "db", "init")
        started = time.perf_counter()
        import psycopg

        from stacchip_db.synthetic import fill_chips

        with psycopg.connect(run_cli(fill_env, "db", "url"), autocommit=True) as conn:
            with conn.transaction():
                fill_chips(conn, args.chips)
            # steady state: the first reads after a load would set every row's hint bits
            # (writing each page again) while autovacuum runs beside them
            conn.execute("VACUUM (ANALYZE) stacchip.chips")
        print(f"{args.chips:,} chips made in {time.perf_counter() - started:.1f} s "
              f"(embedded cluster, fsync on); code: {args.code}")
        for output_format in args.formats.split(","):
            runs = [_measure(env, args.code, output_format, home / "vmhwm")
                    for _ in range(args.repeat)]
            rss = [r for r, _ in runs]
            seconds = [s for _, s in runs]
            print(f"chips --format {output_format}: peak RSS median "
                  f"{statistics.median(rss):.0f} MiB {[round(r) for r in rss]}, "
                  f"{statistics.median(seconds):.1f} s")
    finally:
        subprocess.run([sys.executable, "-m", "stacchip_db.cli", "-q", "db", "stop"],
                       env=fill_env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
