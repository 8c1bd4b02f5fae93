"""Benchmark of issue 14's goals: time-series export rate, and the split audit at 10 M chips.

1. **Time series vs single-date prechip** (`--reps`): one Sentinel-2 tile at 4 dates
   (`stacchip_db.synthetic`, scale 2: 5490 px at 20 m, 10 bands + SCL, deflate COGs written
   once into `--out`), indexed at 256 px (`index_item`, 441 places); 128 places x 4 dates =
   512 chips. `prechip.export_cubes` of those 512 chips as single-date cubes (4 x 128) and as
   one time-series cube (`time_series=4`: 128 x 4), alternately, in fresh processes (page
   cache warm after the first), `--jobs` 1 and 2. Rate = chips written / seconds of the
   export (selection building excluded). Goal: time series >= single-date rate.
2. **Audit at 10 M chips** (`--chips`): an embedded cluster under a temporary STACCHIP_HOME
   (durable: fsync on), `db init`, `synthetic.fill_chips` (the server makes the rows: 1,000
   items of 100 x 100 chips of 0.01°, VACUUM ANALYZE), then `stacchip-db audit` (the default
   1° split) and `audit --split-buffer 0`, each `--reps` times in a fresh process: wall time
   and the client's peak RSS (VmHWM). The server's memory is bounded by its settings
   (work_mem; the GROUP BY over places spills to disk). Goal: <= 60 s.

    .venv/bin/python bench/bench_places.py [--reps 5] [--chips 10000000] [--skip-audit]

Prints medians and the ratio time series / single-date. The machine's load is not
controlled: say in the notes whether it was shared.
"""

from __future__ import annotations

import argparse
import copy
import json
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
from bench_chips_memory import cli_env, run_cli  # noqa: E402  (the bench/ folder)

from tests.peak_rss import peak_rss_mib  # noqa: E402  (the tests' measurement)

FIXTURE = REPO / "tests" / "data" / "stac" / "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"
BANDS = [
    "blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir", "nir08", "swir16", "swir22",
]  # fmt: skip
DATES = ("2024-03-11T14:11:54Z", "2024-05-10T14:11:54Z", "2024-07-09T14:11:54Z",
         "2024-09-07T14:11:54Z")  # fmt: skip
PLACES, CHIP_SIZE = 128, 256


def make_items(out: Path) -> list[dict]:
    """The 4 dated items (COGs written once)."""
    from stacchip_db.synthetic import synthesize_item

    listing = out / "items.json"
    if listing.exists():
        return json.loads(listing.read_text())
    source = json.loads(FIXTURE.read_text())
    items = []
    for n, when in enumerate(DATES):
        raw = copy.deepcopy(source)
        raw["id"] = f"{source['id']}_d{n}"
        raw["properties"]["datetime"] = when
        folder = out / f"d{n}"
        folder.mkdir(parents=True, exist_ok=True)
        items.append(synthesize_item(raw, folder, [*BANDS, "scl"], scale=2, seed=n))
    listing.write_text(json.dumps(items))
    return items


def _worker(kind: str, out: Path, jobs: int) -> None:
    """In a child: build the selection (no database), export, print chips/s."""
    from stacchip_db.dataset import ChipRow, ChipSelection
    from stacchip_db.index import index_item, item_datetime
    from stacchip_db.prechip import export_cubes

    items = json.loads((out / "items.json").read_text())
    rows = []
    for item in items:
        table = index_item(item, quality="none", chip_size=CHIP_SIZE, max_nodata=1.0)
        when = item_datetime(item)
        for x, y, location, geometry in zip(
            *(table.column(c).to_pylist() for c in
              ("chip_index_x", "chip_index_y", "location", "geometry")), strict=True,
        ):  # fmt: skip
            if y * 21 + x < PLACES:  # the first 128 places of the tile
                rows.append(ChipRow(item["collection"], item["id"], CHIP_SIZE, x, y, when,
                                    0.0, 0.0, geometry, location))  # fmt: skip
    selection = ChipSelection(rows, {(i["collection"], i["id"]): i for i in items})
    target = Path(tempfile.mkdtemp(prefix=f"places-{kind}-", dir=out))
    started = time.perf_counter()
    summary = export_cubes(
        selection, str(target), cube_size=PLACES, jobs=jobs,
        time_series=4 if kind == "series" else None,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    shutil.rmtree(target)
    assert summary.written == PLACES * 4, summary.describe()
    print(json.dumps({"rate": summary.written / seconds}))


def bench_export(out: Path, reps: int) -> None:
    make_items(out)
    for jobs in (1, 2):
        rates: dict[str, list[float]] = {"single": [], "series": []}
        for _ in range(reps + 1):  # the first round warms the page cache and is dropped
            for kind in rates:
                child = subprocess.run(
                    [sys.executable, __file__, "--worker", kind, "--out", str(out),
                     "--jobs", str(jobs)],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                rates[kind].append(json.loads(child.stdout.splitlines()[-1])["rate"])
        single, series = (statistics.median(rates[k][1:]) for k in ("single", "series"))
        verdict = "meets" if series >= single else "MISSES"
        print(
            f"export of {PLACES} places x 4 dates x 10 bands, --jobs {jobs}: single-date "
            f"{single:.1f} chips/s {[round(r) for r in rates['single'][1:]]}, time series "
            f"{series:.1f} chips/s {[round(r) for r in rates['series'][1:]]}; ratio "
            f"{series / single:.2f} (goal >= 1: {verdict})"
        )


def bench_audit(chips: int, reps: int) -> None:
    import psycopg

    from stacchip_db.synthetic import fill_chips

    home = Path(tempfile.mkdtemp(prefix="stacchip-places-"))
    env = cli_env(home)
    try:
        run_cli(env, "db", "start")
        run_cli(env, "db", "init")
        url = run_cli(env, "db", "url")
        started = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as conn:
            fill_chips(conn, chips)
            conn.execute("VACUUM (ANALYZE) stacchip.chips")
        print(f"{chips:,} chips made in {time.perf_counter() - started:.0f} s "
              "(embedded cluster, fsync on)")  # fmt: skip
        for args in (["audit"], ["audit", "--split-buffer", "0"]):
            seconds, rss = [], []
            for _ in range(reps):
                clock = time.perf_counter()
                try:
                    rss.append(peak_rss_mib(["-q", *args], env, REPO, home / "vmhwm"))
                except subprocess.CalledProcessError as e:  # exit 1: a leak was found
                    if e.returncode != 1:
                        raise
                seconds.append(time.perf_counter() - clock)
            median = statistics.median(seconds)
            verdict = "meets" if median <= 60 else "MISSES"
            rss_text = f"{statistics.median(rss):.0f} MiB" if rss else "n/a (leak exit)"
            print(
                f"stacchip-db {' '.join(args)} over {chips:,} chips: median {median:.1f} s "
                f"{[round(s, 1) for s in seconds]}, client peak RSS {rss_text}; goal 60 s: "
                f"{verdict}"
            )
            print("  " + _cli_lines(env, args))
    finally:
        subprocess.run([sys.executable, "-m", "stacchip_db.cli", "-q", "db", "stop"],
                       env=env, capture_output=True)  # fmt: skip
        shutil.rmtree(home, ignore_errors=True)


def _cli_lines(env: dict[str, str], args: list[str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "stacchip_db.cli", "-q", *args],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    return " | ".join(result.stdout.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--chips", type=int, default=10_000_000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "places")
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument("--skip-audit", action="store_true")
    parser.add_argument("--worker", choices=["single", "series"], help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.out, args.jobs)
        return
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the start")
    if not args.skip_export:
        bench_export(args.out, args.reps)
    if not args.skip_audit:
        bench_audit(args.chips, args.reps)


if __name__ == "__main__":
    main()
