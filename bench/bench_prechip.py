"""Benchmark: prechip's chip reading vs the original stacchip 0.1.38 and vs the sequential bound.

128 random chips (256 px) x 10 Sentinel-2 bands from one full-size scene: blue, green, red, nir
at 10980 x 10980 (10 m) and rededge1-3, nir08, swir16, swir22 at 5490 x 5490 (20 m), deflate
COGs generated once by `stacchip_db.synthetic` (scale 1) into `--out` (git-ignored).

Contenders, each repetition in a fresh subprocess, in this order per repetition:

- `orig`: stacchip 0.1.38 in its own venv (`bench/setup_original.sh`), per chip
  `Chipper(NoStatsChipIndexer(item), assets=bands).chip(x, y)`, the pystac Item in memory;
- `bound`: the same windows read sequentially with rasterio from datasets opened once (coarse
  bands at their own resolution, no upsampling, no assembling);
- `ours jN`: `stacchip_db.read_engine.read_blocks` with `--jobs N`: the prechip read path
  (tasks per item, one open per asset per reader, windows, nearest upsampling, float32 cube).

Scenarios: `local` (files on disk, page cache warm) and `http` (the same files behind
`bench/latency_proxy.py`, +20 ms per request, read through GDAL's /vsicurl/). All contenders
get GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR, CPL_VSIL_CURL_ALLOWED_EXTENSIONS=.tif and
GDAL_HTTP_MULTIRANGE=YES; ours adds its own `reader.REMOTE_GDAL_CONFIG` defaults.
Each child reports chips/s of its reading loop (imports and item parsing excluded) and the sum
of all pixels, which must agree between contenders.

    .venv/bin/python bench/bench_prechip.py [--reps 3] [--scenarios local,http]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "stac"
S2_ITEM = "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"
ORIG_VENV = Path(os.environ.get("STACCHIP_ORIG_VENV", "/work/venvs/stacchip-orig"))
BANDS = [
    "blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir", "nir08", "swir16", "swir22",
]  # fmt: skip
CHIP_SIZE = 256
GDAL_ENV = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif",
    "GDAL_HTTP_MULTIRANGE": "YES",
}


# -- children: `python bench_prechip.py --worker KIND spec.json` -------------------------------


def _worker_orig(item: dict, chips: list[list[int]]) -> tuple[float, float]:
    import warnings

    import pystac
    from stacchip.chipper import Chipper
    from stacchip.indexer import NoStatsChipIndexer

    warnings.filterwarnings("ignore")
    stac_item = pystac.Item.from_dict(item)
    total = 0.0
    start = time.perf_counter()
    for x, y in chips:
        pixels = Chipper(NoStatsChipIndexer(stac_item), assets=BANDS).chip(x, y)
        total += float(sum(a.sum(dtype="float64") for a in pixels.values()))
    return time.perf_counter() - start, total


def _worker_bound(item: dict, chips: list[list[int]]) -> tuple[float, float]:
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    start = time.perf_counter()
    sources = [rasterio.open(item["assets"][b]["href"]) for b in BANDS]
    total = 0.0
    for x, y in chips:
        for src in sources:
            factor = 10980 // src.width
            size = CHIP_SIZE // factor
            data = src.read(1, window=Window(x * size, y * size, size, size))
            # upsampled chips hold each coarse pixel factor² times: same sum as the others
            total += float(data.sum(dtype=np.float64)) * factor * factor
    elapsed = time.perf_counter() - start
    for src in sources:
        src.close()
    return elapsed, total


def _worker_ours(item: dict, chips: list[list[int]], jobs: int) -> tuple[float, float]:
    from datetime import UTC, datetime

    import numpy as np

    from stacchip_db.dataset import ChipRow, ChipSelection
    from stacchip_db.prechip import plan_cubes
    from stacchip_db.read_engine import read_blocks

    rows = [
        ChipRow(item["collection"], item["id"], CHIP_SIZE, x, y, datetime.now(UTC), 0, 0, b"")
        for x, y in chips
    ]
    selection = ChipSelection(rows, {(item["collection"], item["id"]): item})
    start = time.perf_counter()
    plans = plan_cubes(selection, cube_size=len(rows), bands=BANDS)
    total = 0.0
    for cube in read_blocks(plans, selection.items, jobs=jobs):
        total += float(cube.pixels.sum(dtype=np.float64))
    return time.perf_counter() - start, total


def _child(kind: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if kind == "orig":
        elapsed, total = _worker_orig(spec["item"], spec["chips"])
    elif kind == "bound":
        elapsed, total = _worker_bound(spec["item"], spec["chips"])
    else:
        elapsed, total = _worker_ours(spec["item"], spec["chips"], int(kind.removeprefix("j")))
    print(json.dumps({"seconds": elapsed, "sum": total}))


# -- parent -------------------------------------------------------------------------------------


def make_scene(out: Path) -> dict:
    """The full-size item with local hrefs (COGs written on first use, ~2 minutes)."""
    item_path = out / "item.json"
    if item_path.exists():
        return json.loads(item_path.read_text())
    from stacchip_db.synthetic import synthesize_item

    source = json.loads((FIXTURES / S2_ITEM).read_text())
    started = time.perf_counter()
    item = synthesize_item(source, out, BANDS, scale=1, seed=0)
    print(f"generated the scene in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    item_path.write_text(json.dumps(item))
    return item


def pick_chips(n: int, seed: int = 0) -> list[list[int]]:
    grid = 10980 // CHIP_SIZE
    cells = random.Random(seed).sample(range(grid * grid), n)
    return [[c % grid, c // grid] for c in cells]


def run_child(kind: str, spec: Path) -> dict:
    python = str(ORIG_VENV / "bin" / "python") if kind == "orig" else sys.executable
    env = {**os.environ, **GDAL_ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [python, __file__, "--worker", kind, str(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chips", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "prechip")
    parser.add_argument("--scenarios", default="local,http")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--kinds", default="orig,bound,j1,j2")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _child(*args.worker)
        return
    if not (ORIG_VENV / "bin" / "python").exists():
        raise SystemExit(f"no original stacchip venv at {ORIG_VENV}: run bench/setup_original.sh")
    args.out.mkdir(parents=True, exist_ok=True)
    item = make_scene(args.out)
    chips = pick_chips(args.chips)
    kinds = args.kinds.split(",")
    results: dict[tuple[str, str], list[float]] = {}
    sums: dict[str, set[float]] = {}
    for scenario in args.scenarios.split(","):
        proxy = None
        run_item = json.loads(json.dumps(item))
        if scenario == "http":
            proxy = subprocess.Popen(
                [sys.executable, str(REPO / "bench" / "latency_proxy.py"), "--dir",
                 str(args.out), "--port", str(args.port), "--delay-ms", str(args.latency_ms)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            proxy.stdout.readline()  # type: ignore[union-attr]  # serving …
            for band in BANDS:
                name = Path(run_item["assets"][band]["href"]).name
                run_item["assets"][band]["href"] = f"http://127.0.0.1:{args.port}/{name}"
        spec = args.out / f"spec_{scenario}.json"
        spec.write_text(json.dumps({"item": run_item, "chips": chips}))
        try:
            for rep in range(args.reps):
                for kind in kinds:
                    got = run_child(kind, spec)
                    rate = len(chips) / got["seconds"]
                    results.setdefault((scenario, kind), []).append(rate)
                    sums.setdefault(kind, set()).add(round(got["sum"]))
                    print(f"{scenario} rep {rep} {kind}: {rate:.1f} chips/s", file=sys.stderr)
        finally:
            if proxy is not None:
                proxy.terminate()
                proxy.wait()
    agree = len(set().union(*sums.values())) == 1
    print(f"\n{len(chips)} chips x {len(BANDS)} bands, medians of {args.reps} runs "
          f"(chips/s); pixel sums agree across contenders: {agree}")  # fmt: skip
    print("| scenario | " + " | ".join(kinds) + " | ours j1 / orig | ours j2 / j1 | j1 / bound |")
    print("| --- " * (len(kinds) + 4) + "|")
    for scenario in args.scenarios.split(","):
        med = {k: statistics.median(results[(scenario, k)]) for k in kinds}
        cells = [f"{med[k]:.1f}" for k in kinds]
        ratio = [
            f"{med['j1'] / med['orig']:.2f}x" if "orig" in med and "j1" in med else "-",
            f"{med['j2'] / med['j1']:.2f}x" if "j2" in med and "j1" in med else "-",
            f"{med['j1'] / med['bound']:.2f}x" if "bound" in med and "j1" in med else "-",
        ]
        print(f"| {scenario} | " + " | ".join(cells + ratio) + " |")


if __name__ == "__main__":
    main()
