"""Benchmark: ChipDataset vs TorchGeo as a PyTorch training loader, local and over HTTP.

One full-size Sentinel-2 scene (10 bands: blue, green, red, nir at 10980 x 10980, the six
others at 5490 x 5490, deflate COGs generated once by `stacchip_db.synthetic` into `--out`,
shared with bench_prechip.py), 256 px chips, `DataLoader(num_workers=2, batch_size=8)`:

- `torchgeo`: TorchGeo's `RasterDataset` (`separate_files`, one file per band) with
  `RandomGeoSampler(size=256)` and `stack_samples`, on the same files;
- `chipdataset`: `ChipDataset` over the scene's chips indexed in an embedded database (a random
  sample of `--samples` chips, different per repetition), `ChipSampler` order, `prefetch=16`
  (`--prefetch`; `--lanes` replaces the dataset's default lanes);
- `prechip-j1` (HTTP only): `prechip`'s read path with `--jobs 1` on the same chips, the rate
  the issue asks ChipDataset to reach over HTTP;
- `chipdataset-direct` (only when named in `--kinds`): the same ChipDataset's batches read in
  one process without a DataLoader, to tell the reader's rate from the DataLoader's cost.

Scenarios: `local` (page cache warm) and `http` (the files behind `bench/latency_proxy.py`,
+20 ms per request, through GDAL's /vsicurl/; the dataset's items get the proxy's hrefs after
loading). torch and TorchGeo run in their own venv (`bench/setup_torchgeo.sh`, default
/work/venvs/torchgeo, `$STACCHIP_TORCHGEO_VENV`), with this checkout first on PYTHONPATH.
Every contender gets GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR,
CPL_VSIL_CURL_ALLOWED_EXTENSIONS=.tif and GDAL_HTTP_MULTIRANGE=YES.

Each repetition runs every contender in a fresh process, in turn; a rate is samples over the
wall time from `iter(loader)` to the last batch (worker start included, dataset construction
not). Before timing, a check: ChipDataset in a DataLoader with two workers under `fork` and
`spawn` gives exactly the pixels read in the parent one band after another (`lanes=1`).

    .venv/bin/python bench/bench_loader.py [--reps 5] [--scenarios local,http]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TORCHGEO_VENV = Path(os.environ.get("STACCHIP_TORCHGEO_VENV", "/work/venvs/torchgeo"))
BANDS = [
    "blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir", "nir08", "swir16", "swir22",
]  # fmt: skip
CHIP_SIZE = 256
BATCH = 8
WORKERS = 2
PREFETCH = 16
GDAL_ENV = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif",
    "GDAL_HTTP_MULTIRANGE": "YES",
}


# -- children: `python bench_loader.py --worker KIND spec.json` --------------------------------


def _chip_dataset(spec: dict, **kwargs: object) -> Any:
    """The spec's chips as a ChipDataset, hrefs pointed at `spec["root"]` when it is a URL."""
    from stacchip_db import ChipDataset

    values = ", ".join(f"({x}, {y})" for x, y in spec["chips"])
    query = (
        "SELECT c.collection, c.item_id, c.chip_size, c.chip_index_x, c.chip_index_y "
        f"FROM stacchip.chips c JOIN (VALUES {values}) AS v (x, y) "
        "ON c.chip_index_x = v.x AND c.chip_index_y = v.y "
        f"WHERE c.chip_size = {CHIP_SIZE}"
    )
    dataset = ChipDataset(query, database_url=spec["database_url"], **kwargs)
    if spec["root"].startswith("http"):
        for item in dataset.items.values():
            for asset in item["assets"].values():
                asset["href"] = f"{spec['root']}/{Path(asset['href']).name}"
    return dataset


def _worker_chipdataset(spec: dict) -> tuple[float, float, int]:
    from torch.utils.data import DataLoader

    from stacchip_db import ChipSampler

    dataset = _chip_dataset(spec, prefetch=spec["prefetch"], lanes=spec["lanes"])
    sampler = ChipSampler(dataset, seed=spec["seed"])
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=WORKERS, sampler=sampler)
    start = time.perf_counter()
    n, total = 0, 0.0
    for batch in loader:
        n += len(batch["pixels"])
        total += float(batch["pixels"].double().sum())
    return time.perf_counter() - start, total, n


def _worker_direct(spec: dict) -> tuple[float, float, int]:
    """ChipDataset's batches in one process, no DataLoader (`--kinds chipdataset-direct`): the
    reader alone, to tell its rate from what the DataLoader's workers and collation cost."""
    from stacchip_db import ChipSampler

    dataset = _chip_dataset(spec, prefetch=spec["prefetch"], lanes=spec["lanes"])
    order = list(ChipSampler(dataset, seed=spec["seed"]))
    start = time.perf_counter()
    n, total = 0, 0.0
    for i in range(0, len(order), BATCH):
        for sample in dataset.__getitems__(order[i : i + BATCH]):
            n += 1
            total += float(sample["pixels"].sum(dtype="float64"))
    return time.perf_counter() - start, total, n


def _worker_torchgeo(spec: dict) -> tuple[float, float, int]:
    import warnings

    import torch
    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import RandomGeoSampler

    warnings.filterwarnings("ignore")

    class Scene(RasterDataset):
        # one file per band: the glob finds the scene by its blue band, `band` names the others
        filename_glob = "*_blue.tif"
        filename_regex = r"^.+_(?P<band>[a-z0-9]+)\.tif$"
        separate_files = True
        all_bands = tuple(BANDS)
        rgb_bands = ("red", "green", "blue")

    blue = Path(spec["item"]["assets"]["blue"]["href"]).name
    paths = [f"{spec['root']}/{blue}"] if spec["root"].startswith("http") else spec["root"]
    # Built in a thread of its own: it opens the files, and over HTTP GDAL would keep that
    # thread's connection, which the forked workers would then share (garbled responses).
    with ThreadPoolExecutor(1) as pool:
        dataset = pool.submit(Scene, paths=paths, bands=BANDS).result()
    sampler = RandomGeoSampler(
        dataset, size=CHIP_SIZE, length=len(spec["chips"]),
        generator=torch.Generator().manual_seed(spec["seed"]),
    )  # fmt: skip
    loader = DataLoader(
        dataset, sampler=sampler, batch_size=BATCH, num_workers=WORKERS, collate_fn=stack_samples
    )
    start = time.perf_counter()
    n, total = 0, 0.0
    for batch in loader:
        n += len(batch["image"])
        total += float(batch["image"].double().sum())
    return time.perf_counter() - start, total, n


def _worker_prechip(spec: dict) -> tuple[float, float, int]:
    import numpy as np

    from stacchip_db.dataset import ChipSelection
    from stacchip_db.prechip import plan_cubes
    from stacchip_db.read_engine import read_blocks

    dataset = _chip_dataset(spec)
    selection = ChipSelection(dataset.rows, dataset.items)
    start = time.perf_counter()
    plans = plan_cubes(selection, cube_size=len(selection.rows), bands=BANDS)
    total = 0.0
    for cube in read_blocks(plans, selection.items, jobs=1):
        total += float(cube.pixels.sum(dtype=np.float64))
    return time.perf_counter() - start, total, len(selection.rows)


def _check_workers(spec: dict) -> None:
    """DataLoader(num_workers=2) under fork and spawn, with prefetch: the parent's pixels."""
    import numpy as np
    from torch.utils.data import DataLoader

    from stacchip_db import ChipSampler

    reference = _chip_dataset(spec, lanes=1)
    for method in ("fork", "spawn"):
        dataset = _chip_dataset(spec, prefetch=PREFETCH)
        sampler = ChipSampler(dataset, seed=spec["seed"])
        order = list(sampler)
        loader = DataLoader(
            dataset, batch_size=BATCH, num_workers=WORKERS, sampler=sampler,
            multiprocessing_context=method,
        )  # fmt: skip
        n = 0
        for batch in loader:
            for pixels, chip_id in zip(batch["pixels"], batch["chip_id"], strict=True):
                index = order[n]
                assert chip_id == reference.rows[index].chip_id, (method, n)
                expected = reference.read_pixels([index])[0]
                assert np.array_equal(pixels.numpy(), expected), (method, chip_id)
                n += 1
        assert n == len(order), (method, n)
        print(f"DataLoader check {method}: {n} samples equal the parent's reads", file=sys.stderr)


def _child(kind: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if kind == "check":
        _check_workers(spec)
        print(json.dumps({"ok": True}))
        return
    work = {
        "torchgeo": _worker_torchgeo,
        "chipdataset": _worker_chipdataset,
        "prechip-j1": _worker_prechip,
        "chipdataset-direct": _worker_direct,
    }[kind]
    seconds, total, n = work(spec)
    print(json.dumps({"seconds": seconds, "sum": total, "samples": n}))


# -- parent -------------------------------------------------------------------------------------


def make_scene(out: Path) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    from bench_prechip import make_scene as make

    return make(out)


def pick_chips(n: int, seed: int) -> list[list[int]]:
    grid = 10980 // CHIP_SIZE
    cells = random.Random(seed).sample(range(grid * grid), n)
    return [[c % grid, c // grid] for c in cells]


def index_scene(url: str, item: dict) -> None:
    import psycopg

    from stacchip_db.db import init_database
    from stacchip_db.db.store import store_item
    from stacchip_db.index import index_item

    init_database(url)
    with psycopg.connect(url, autocommit=True) as conn:
        # every chip of the grid (the scene has no quality band: fractions are not the point)
        chips = index_item(item, chip_size=CHIP_SIZE, quality="none", max_nodata=1.0)
        store_item(conn, item, chips, chip_size=CHIP_SIZE)


def run_child(kind: str, spec: Path) -> dict:
    own_venv = kind in ("prechip-j1", "chipdataset-direct")  # no torch needed
    python = sys.executable if own_venv else str(TORCHGEO_VENV / "bin" / "python")
    env = {**os.environ, **GDAL_ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [python, __file__, "--worker", kind, str(spec)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    if kind == "check":
        sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warm(out: Path) -> None:
    """Read every COG once: the local scenario is measured with the page cache warm."""
    for path in out.glob("*.tif"):
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--samples", type=int, default=256, help="per run, local")
    parser.add_argument("--http-samples", type=int, default=128, help="per run, over HTTP")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "prechip")
    parser.add_argument("--scenarios", default="local,http")
    parser.add_argument("--kinds", default="torchgeo,chipdataset,prechip-j1")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--prefetch", type=int, default=PREFETCH, help="ChipDataset's")
    parser.add_argument("--lanes", type=int, default=None, help="ChipDataset's (its default)")
    parser.add_argument("--no-check", action="store_true", help="skip the fork/spawn check")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _child(*args.worker)
        return
    sys.path.insert(0, str(REPO))  # this checkout, not an installed stacchip-db
    if not (TORCHGEO_VENV / "bin" / "python").exists():
        raise SystemExit(f"no TorchGeo venv at {TORCHGEO_VENV}: run bench/setup_torchgeo.sh")
    from stacchip_db.db.embedded import EmbeddedCluster

    args.out.mkdir(parents=True, exist_ok=True)
    item = make_scene(args.out)
    home = Path(tempfile.mkdtemp(prefix="stacchip-bench-loader-"))
    cluster = EmbeddedCluster(home, database="postgres")
    cluster.start()
    results: dict[tuple[str, str], list[float]] = {}
    try:
        import psycopg

        with psycopg.connect(cluster.socket_url("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench")
        url = cluster.socket_url("bench")
        index_scene(url, item)
        warm(args.out)
        base = {"item": item, "database_url": url, "root": str(args.out),
                "prefetch": args.prefetch, "lanes": args.lanes}  # fmt: skip
        if not args.no_check:
            spec = args.out / "loader_check.json"
            spec.write_text(json.dumps({**base, "chips": pick_chips(48, 99), "seed": 99}))
            run_child("check", spec)
        for scenario in args.scenarios.split(","):
            proxy = None
            samples = args.samples
            root = str(args.out)
            kinds = [k for k in args.kinds.split(",") if k != "prechip-j1" or scenario == "http"]
            if scenario == "http":
                samples = args.http_samples
                root = f"http://127.0.0.1:{args.port}"
                proxy = subprocess.Popen(
                    [sys.executable, str(REPO / "bench" / "latency_proxy.py"), "--dir",
                     str(args.out), "--port", str(args.port), "--delay-ms", str(args.latency_ms)],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                proxy.stdout.readline()  # type: ignore[union-attr]  # serving …
            try:
                for rep in range(args.reps):
                    spec = args.out / f"loader_{scenario}.json"
                    chips = pick_chips(samples, rep)
                    spec.write_text(json.dumps({**base, "root": root, "chips": chips, "seed": rep}))
                    sums = {}
                    for kind in kinds:
                        got = run_child(kind, spec)
                        rate = got["samples"] / got["seconds"]
                        results.setdefault((scenario, kind), []).append(rate)
                        sums[kind] = round(got["sum"])
                        print(f"{scenario} rep {rep} {kind}: {rate:.1f} samples/s "
                              f"({got['samples']} in {got['seconds']:.1f} s)",
                              file=sys.stderr)  # fmt: skip
                    if "prechip-j1" in sums and "chipdataset" in sums:
                        # same chips: the same pixels, whichever reader
                        assert sums["prechip-j1"] == sums["chipdataset"], sums
            finally:
                if proxy is not None:
                    proxy.terminate()
                    proxy.wait()
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)
    report(results, args)


def report(results: dict[tuple[str, str], list[float]], args: argparse.Namespace) -> None:
    print(f"\n{BATCH}-sample batches of {len(BANDS)} bands x {CHIP_SIZE}² px, "
          f"DataLoader(num_workers={WORKERS}); medians of {args.reps} runs (samples/s), "
          f"{args.samples} samples per run local, {args.http_samples} over HTTP")  # fmt: skip
    print("| source | TorchGeo | ChipDataset | ratio | prechip --jobs 1 |")
    print("| --- | --- | --- | --- | --- |")
    names = {
        "local": "local files, page cache warm",
        "http": f"same files over HTTP, +{args.latency_ms:g} ms per request",
    }
    for scenario in args.scenarios.split(","):
        med = {k: statistics.median(v) for (s, k), v in results.items() if s == scenario}
        tg, ours, pre = med.get("torchgeo"), med.get("chipdataset"), med.get("prechip-j1")
        if "chipdataset-direct" in med:
            print(f"({scenario}: ChipDataset without a DataLoader, one process: "
                  f"{med['chipdataset-direct']:.1f} samples/s)")  # fmt: skip
        cells = [
            f"{tg:.1f}" if tg else "-",
            f"{ours:.1f}" if ours else "-",
            f"{ours / tg:.2f}×" if tg and ours else "-",
            f"{pre:.1f} chips/s" if pre else "-",
        ]
        print(f"| {names.get(scenario, scenario)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
