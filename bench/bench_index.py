"""Benchmark: index one full-size Sentinel-2 scene, stacchip-db vs the original stacchip 0.1.38.

The scene is the fixture item `S2A_T20HNJ_20240311T140636_L2A` with its `scl` asset pointing at
a generated 5490 x 5490 SCL COG (clouds and a nodata wedge, see `stacchip_db.synthetic`).
Each repetition runs in a fresh subprocess (ours in this venv, the original in its own venv,
made by `bench/setup_original.sh`); the parent reads the child's peak RSS with `os.wait4`, the
child reports the wall time of the indexing call alone (imports and item parsing excluded).
Then the chip sets and fractions of both are checked to be identical, and, in one extra run
of the original on an item carrying the 10 m grid at item level (which sidesteps the original's
transform bug, see `stacchip_db.grid`), the footprints too.

    .venv/bin/python bench/bench_index.py [--reps 5] [--out bench/out]
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
FIXTURES = REPO / "tests" / "data" / "stac"
S2_ITEM = "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json"
ORIG_VENV = Path(os.environ.get("STACCHIP_ORIG_VENV", "/work/venvs/stacchip-orig"))


# -- children ---------------------------------------------------------------------------------
# Run as `python bench_index.py --worker {ours,orig} item.json result.json`. They import only
# what their venv has: the original's venv has no stacchip_db, ours no stacchip.


def _worker_ours(item_path: str, calls: int) -> tuple[list[float], dict]:
    from stacchip_db.index import index_item

    item = json.loads(Path(item_path).read_text())
    elapsed = []
    table = None
    for _ in range(calls):  # cold (first call in the process), then warm
        start = time.perf_counter()
        table = index_item(item, quality="s2")
        elapsed.append(time.perf_counter() - start)
    if table is None:
        return elapsed, {}
    return elapsed, {
        "x": table["chip_index_x"].to_pylist(),
        "y": table["chip_index_y"].to_pylist(),
        "cloud": table["cloud_fraction"].to_pylist(),
        "nodata": table["nodata_fraction"].to_pylist(),
        "wkb_hex": [g.hex() for g in table["geometry"].to_pylist()],
    }


def _worker_orig(item_path: str, calls: int) -> tuple[list[float], dict]:
    import contextlib
    import io

    import geoarrow.pyarrow as ga
    import pystac
    from stacchip.indexer import Sentinel2Indexer

    item = pystac.Item.from_dict(json.loads(Path(item_path).read_text()))
    elapsed = []
    table = None
    for _ in range(calls):  # cold (first call in the process), then warm
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress
            table = Sentinel2Indexer(item).create_index()
        elapsed.append(time.perf_counter() - start)
    if table is None:
        return elapsed, {}
    return elapsed, {
        "x": table["chip_index_x"].to_pylist(),
        "y": table["chip_index_y"].to_pylist(),
        "cloud": table["cloud_cover_percentage"].to_pylist(),
        "nodata": table["nodata_percentage"].to_pylist(),
        "wkt": [str(g) for g in ga.as_wkt(table["geometry"]).combine_chunks().storage.to_pylist()],
    }


def _worker(kind: str, item_path: str, result_path: str) -> None:
    if kind == "prepare":
        Path(result_path).write_text(json.dumps(_prepare(Path(item_path))))
        return
    calls = 0 if kind.endswith("-idle") else 2
    worker = _worker_ours if kind.startswith("ours") else _worker_orig
    elapsed, result = worker(item_path, calls)
    result["seconds"] = elapsed
    Path(result_path).write_text(json.dumps(result))


def _prepare(out: Path) -> list[str]:
    """Write the SCL COG and two items: as fetched, and with the 10 m grid at item level."""
    from stacchip_db.synthetic import synthesize_item

    item = json.loads((FIXTURES / S2_ITEM).read_text())
    item = synthesize_item(item, out, ["scl"], scale=1, seed=0)
    plain = out / "s2_item.json"
    plain.write_text(json.dumps(item))
    red = item["assets"]["red"]
    item["properties"]["proj:shape"] = red["proj:shape"]
    item["properties"]["proj:transform"] = red["proj:transform"]
    with_grid = out / "s2_item_item_level_grid.json"
    with_grid.write_text(json.dumps(item))
    return [str(plain), str(with_grid)]


# -- parent -----------------------------------------------------------------------------------
# The parent stays small (no numpy before the runs): a forked child's peak RSS starts from the
# parent's RSS at fork time, so the COG is generated in a child too.


def _run(python: Path, kind: str, item: Path, result: Path) -> tuple[dict, int]:
    """One fresh process: (its result, its peak RSS in bytes)."""
    argv = [str(python), __file__, "--worker", kind, str(item), str(result)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed with exit code {proc.returncode}: {argv}")
    return json.loads(result.read_text()), usage.ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def _common(ours: dict, orig: dict) -> tuple[list[int], list[int]]:
    """Row positions of the chips both indexes keep, in the same order."""
    orig_at = {xy: i for i, xy in enumerate(zip(orig["x"], orig["y"], strict=True))}
    pairs = [
        (i, orig_at[xy])
        for i, xy in enumerate(zip(ours["x"], ours["y"], strict=True))
        if xy in orig_at
    ]
    return [i for i, _ in pairs], [j for _, j in pairs]


def _compare(ours: dict, orig: dict) -> tuple[list[str], list[str]]:
    """(differences the clip to the scene explains, real problems) between the two indexes.

    The original keeps every chip of the grid; stacchip-db counts the part of a chip outside
    the item's geometry as nodata (so chips wholly outside are dropped and edge chips carry
    more nodata). Chips ours keeps must be the original's, with equal cloud fractions.
    """
    import numpy as np

    notes, problems = [], []
    ours_xy = set(zip(ours["x"], ours["y"], strict=True))
    orig_xy = set(zip(orig["x"], orig["y"], strict=True))
    if ours_xy - orig_xy:
        problems.append(f"{len(ours_xy - orig_xy)} chips kept only by ours")
    if orig_xy - ours_xy:
        notes.append(f"{len(orig_xy - ours_xy)} chips outside the scene dropped by ours")
    mine, theirs = _common(ours, orig)
    for key in ("cloud", "nodata"):
        a = np.asarray(ours[key], dtype=np.float32)[mine]
        b = np.asarray(orig[key], dtype=np.float32)[theirs]
        differ = int((a != b).sum())
        if key == "nodata" and differ:
            if (a < b).any():
                problems.append(f"nodata lower than the original's on {int((a < b).sum())} chips")
            notes.append(f"{differ} edge chips carry the nodata of their part outside the scene")
        elif differ:
            problems.append(f"{key} fractions differ on {differ} chips")
    return notes, problems


def _footprints_agree(ours: dict, orig: dict) -> tuple[int, int, float]:
    """(equal footprints, chips, max vertex distance in degrees) over the chips both keep."""
    import numpy as np
    import shapely

    mine, theirs = _common(ours, orig)
    a = shapely.from_wkb([bytes.fromhex(ours["wkb_hex"][i]) for i in mine])
    b = shapely.from_wkt([orig["wkt"][j] for j in theirs])
    equal = shapely.equals_exact(shapely.normalize(a), shapely.normalize(b), tolerance=1e-9)
    ca = shapely.get_coordinates(shapely.normalize(a))
    cb = shapely.get_coordinates(shapely.normalize(b))
    gap = float(np.abs(ca - cb).max()) if ca.shape == cb.shape else float("inf")
    return int(equal.sum()), len(a), gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "ITEM", "RESULT"))
    args = parser.parse_args()
    if args.worker:
        _worker(*args.worker)
        return

    orig_python = ORIG_VENV / "bin" / "python"
    if not orig_python.exists():
        raise SystemExit(f"no original stacchip venv at {ORIG_VENV}; run bench/setup_original.sh")
    args.out.mkdir(parents=True, exist_ok=True)
    ours_python = Path(sys.executable)
    paths, _ = _run(ours_python, "prepare", args.out, args.out / "items.json")
    item, item_with_grid = (Path(p) for p in paths)

    pythons = {"ours": ours_python, "orig": orig_python}
    cold: dict[str, list[float]] = {"ours": [], "orig": []}
    warm: dict[str, list[float]] = {"ours": [], "orig": []}
    peak: dict[str, list[int]] = {"ours": [], "orig": []}
    idle: dict[str, int] = {}
    last: dict[str, dict] = {}
    for kind in ("ours", "orig"):
        _, idle[kind] = _run(pythons[kind], f"{kind}-idle", item, args.out / "idle.json")
    for rep in range(args.reps):
        for kind in ("ours", "orig"):  # interleaved, so drift hits both alike
            data, rss = _run(pythons[kind], kind, item, args.out / f"result_{kind}_{rep}.json")
            cold[kind].append(data["seconds"][0])
            warm[kind].append(data["seconds"][1])
            peak[kind].append(rss)
            last[kind] = data

    notes, problems = _compare(last["ours"], last["orig"])
    orig_grid, _ = _run(orig_python, "orig", item_with_grid, args.out / "orig_grid.json")
    same, total, gap = _footprints_agree(last["ours"], orig_grid)
    same_plain, _, _ = _footprints_agree(last["ours"], last["orig"])

    mib = 2**20
    rows = [
        ("first call in process, s", {k: statistics.median(v) for k, v in cold.items()}, 1),
        ("second call in process, s", {k: statistics.median(v) for k, v in warm.items()}, 1),
        ("peak RSS of process, MiB", {k: statistics.median(v) / mib for k, v in peak.items()}, 0),
        (
            "  of which indexing, MiB",
            {k: statistics.median(v) / mib - idle[k] / mib for k, v in peak.items()},
            0,
        ),
        ("  imports + item only, MiB", {k: v / mib for k, v in idle.items()}, 0),
    ]
    print(
        "Sentinel-2 scene, SCL 5490 x 5490 (20 m) on the 10980 x 10980 grid, chip 256; "
        f"medians of {args.reps} fresh processes each"
    )
    print(f"{'':30}{'stacchip-db':>12}{'stacchip 0.1.38':>17}{'original/ours':>15}")
    for label, values, digits in rows:
        ours, orig = values["ours"], values["orig"]
        print(f"{label:30}{ours:>12.{digits + 2}f}{orig:>17.{digits + 2}f}{orig / ours:>14.1f}x")
    print(f"chips kept: {len(last['ours']['x'])} of 1764 (ours), {len(last['orig']['x'])} (orig)")
    print("clip to the scene:", "; ".join(notes) or "no chip outside the scene")
    verdict = "yes" if not problems else "NO: " + "; ".join(problems)
    print("kept chips and cloud fractions equal:", verdict)
    print(
        f"footprints of the chips both keep equal to the original's: {same_plain}/{total} with "
        "the item as fetched "
        f"(the original takes the 60 m transform), {same}/{total} with the 10 m grid at item "
        f"level (max vertex difference {gap:.1e} deg)"
    )
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
