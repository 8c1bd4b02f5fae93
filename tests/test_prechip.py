"""prechip: npz cubes from a real database and real COGs, checked against direct rasterio reads."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from rasterio.enums import Resampling
from rasterio.windows import Window

from stacchip_db.dataset import ChipSelection
from stacchip_db.db.connection import connect
from stacchip_db.errors import ConfigError
from stacchip_db.prechip import export_cubes
from stacchip_db.sensors import SENSORS
from tests.conftest import REPO, error_line, run_cli, store_indexed

S2_BANDS = list(SENSORS["sentinel-2-l2a"].bands)
CHIP = 64  # 1098 px scene (scale 10): a 17 x 17 grid; 20 m bands read as 32 px windows
ALL = "SELECT collection, item_id, chip_size, chip_index_x, chip_index_y FROM stacchip.chips"


def store(database_url: str, items: list[dict]) -> int:
    return store_indexed(database_url, items, chip_size=CHIP)


def manifest(out: Path, collection: str, name: str = "manifest.parquet") -> list[dict]:
    return pq.read_table(out / collection / name).to_pylist()


def direct_read(href: str, x: int, y: int, scale: int) -> np.ndarray:
    """Chip (x, y) read straight with rasterio, nearest-resampled to CHIP px when coarser."""
    size = CHIP // scale
    with rasterio.open(href) as src:
        return src.read(
            1,
            window=Window(x * size, y * size, size, size),
            out_shape=(CHIP, CHIP),
            resampling=Resampling.nearest,
        )


def test_cubes_equal_direct_reads_and_carry_clay_metadata(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    n = store(database_url, s2_items[:1])
    out = tmp_path / "cubes"
    result = run_cli(
        ["prechip", "--query", ALL, "--out", str(out), "--cube-size", "16"],
        database_url=database_url,
    )
    assert result.exit_code == 0, result.output
    item = s2_items[0]
    collection = item["collection"]
    rows = manifest(out, collection)
    assert len(rows) == n // 16 * 16  # full cubes only
    assert f"{n // 16 * 16} chips in {n // 16} cubes" in result.stdout
    with connect(database_url) as conn:
        centres = dict(
            (r[0], (r[1], r[2]))
            for r in conn.execute(
                "SELECT stacchip.chip_id(item_id, chip_index_x, chip_index_y), "
                "ST_X(ST_Centroid(geometry)), ST_Y(ST_Centroid(geometry)) FROM stacchip.chips"
            )
        )
    cubes = {}
    checked = 0
    for row in rows:
        if row["cube"] not in cubes:
            cubes[row["cube"]] = np.load(out / collection / f"cube_{row['cube']}.npz")
        cube = cubes[row["cube"]]
        assert cube["pixels"].dtype == np.float32
        assert cube["pixels"].shape[1:] == (10, CHIP, CHIP)
        x, y, r = row["chip_index_x"], row["chip_index_y"], row["row"]
        if checked < 12:  # pixel equality, 10 m (blue, nir) and 20 m (rededge1, swir22) bands
            for band, scale in (("blue", 1), ("nir", 1), ("rededge1", 2), ("swir22", 2)):
                expected = direct_read(item["assets"][band]["href"], x, y, scale)
                got = cube["pixels"][r, S2_BANDS.index(band)]
                np.testing.assert_array_equal(got, expected.astype(np.float32), err_msg=band)
            checked += 1
        lon, lat = centres[row["chip_id"]]
        np.testing.assert_allclose(
            cube["lat_norm"][r],
            [math.sin(math.radians(lat)), math.cos(math.radians(lat))],
            atol=1e-6,
        )
        np.testing.assert_allclose(
            cube["lon_norm"][r],
            [math.sin(math.radians(lon)), math.cos(math.radians(lon))],
            atol=1e-6,
        )
        # 2024-03-11T14:11:54Z: ISO week 11, 14 h.
        week, hour = 11 * 2 * math.pi / 52, 14 * 2 * math.pi / 24
        np.testing.assert_allclose(
            cube["week_norm"][r], [math.sin(week), math.cos(week)], atol=1e-6
        )
        np.testing.assert_allclose(
            cube["hour_norm"][r], [math.sin(hour), math.cos(hour)], atol=1e-6
        )
        assert row["datetime"] == datetime(2024, 3, 11, 14, 11, 54, 463000, tzinfo=UTC)
        assert shapely.from_wkb(row["geometry"]).centroid.x == pytest.approx(lon)
    assert checked == 12
    # latitude of this scene is about -32.5 degrees: not swapped with longitude (-64)
    first = cubes[0]
    assert math.degrees(math.asin(first["lat_norm"][0][0])) == pytest.approx(-32.5, abs=1.5)
    assert math.degrees(math.asin(first["lon_norm"][0][0])) == pytest.approx(-63.5, abs=1.5)


def test_keep_partial_writes_the_last_cube(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    n = store(database_url, s2_items[:1])
    out = tmp_path / "cubes"
    result = run_cli(
        [
            "prechip",
            "--query",
            ALL + " LIMIT 40",
            "--out",
            str(out),
            "--cube-size",
            "16",
            "--keep-partial",
            "--bands",
            "red,swir16",
        ],
        database_url=database_url,
    )
    assert result.exit_code == 0, result.output
    assert n > 40
    collection = s2_items[0]["collection"]
    last = np.load(out / collection / "cube_2.npz")
    assert last["pixels"].shape == (8, 2, CHIP, CHIP)
    assert len(manifest(out, collection)) == 40


@pytest.mark.parametrize(
    "query",
    [
        "DELETE FROM stacchip.chips",
        "UPDATE stacchip.chips SET cloud_fraction = 1",
        ALL + "; DROP TABLE stacchip.chips",
    ],
)
def test_query_that_writes_is_refused_and_changes_nothing(
    database_url: str, s2_items: list[dict], tmp_path: Path, query: str
) -> None:
    n = store(database_url, s2_items[:1])
    result = run_cli(
        ["prechip", "--query", query, "--out", str(tmp_path / "o")], database_url=database_url
    )
    line = error_line(result)
    assert "--query must be one read-only SELECT" in line, line
    with psycopg.connect(database_url) as conn:
        count, cloudy = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE cloud_fraction = 1) FROM stacchip.chips"
        ).fetchone()
    assert count == n
    assert cloudy < n


def test_query_writing_through_a_function_is_refused(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    store(database_url, s2_items[:1])
    item_id = s2_items[0]["id"]
    query = f"SELECT pgstac.delete_item('{item_id}'), * FROM stacchip.chips"
    line = error_line(
        run_cli(["prechip", "--query", query, "--out", str(tmp_path)], database_url=database_url)
    )
    assert "read-only" in line
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM pgstac.items").fetchone()[0] == 1


def test_missing_key_columns_are_named(database_url: str, tmp_path: Path) -> None:
    query = "SELECT collection, item_id FROM stacchip.chips"
    line = error_line(
        run_cli(["prechip", "--query", query, "--out", str(tmp_path)], database_url=database_url)
    )
    assert "chip_size, chip_index_x, chip_index_y" in line, line


def test_unreadable_asset_leaves_chips_out_and_the_run_goes_on(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    broken = copy.deepcopy(s2_items[1])
    broken["assets"]["nir"]["href"] = str(tmp_path / "gone.tif")
    broken["assets"]["red"]["href"] = str(tmp_path / "gone-too.tif")  # counted once per chip
    store(database_url, [s2_items[0], broken])
    out = tmp_path / "cubes"
    with psycopg.connect(database_url) as conn:
        per_item = dict(
            conn.execute("SELECT item_id, count(*) FROM stacchip.chips GROUP BY item_id")
        )
    result = run_cli(
        ["prechip", "--query", ALL, "--out", str(out), "--cube-size", "8", "--keep-partial"],
        database_url=database_url,
    )
    assert result.exit_code == 3, result.output
    failed = per_item[broken["id"]]
    assert f"{failed} chips could not be read" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "gone" in line]
    assert len(warnings) == failed
    assert f"{broken['id']}-" in warnings[0]
    rows = manifest(out, broken["collection"])
    assert {r["item_id"] for r in rows} == {s2_items[0]["id"]}
    assert len(rows) == per_item[s2_items[0]["id"]]


def test_shards_cover_every_chip_once_and_jobs_give_the_same_cubes(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    n = store(database_url, s2_items)
    collection = s2_items[0]["collection"]
    common = [
        "prechip",
        "--query",
        ALL,
        "--cube-size",
        "16",
        "--keep-partial",
        "--bands",
        "blue,rededge1",
    ]
    seen: list[str] = []
    for i in range(3):
        out = tmp_path / "shards"
        result = run_cli(
            [*common, "--out", str(out), "--shard", f"{i}/3"], database_url=database_url
        )
        assert result.exit_code == 0, result.output
        seen += [r["chip_id"] for r in manifest(out, collection, f"manifest-{i}-of-3.parquet")]
    assert len(seen) == n == len(set(seen))

    one, two = tmp_path / "one", tmp_path / "two"
    for out, jobs in ((one, "1"), (two, "2")):
        result = run_cli([*common, "--out", str(out), "--jobs", jobs], database_url=database_url)
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (one / collection).glob("cube_*.npz"))
    assert names == sorted(p.name for p in (two / collection).glob("cube_*.npz"))
    assert len(names) == math.ceil(n / 16)
    for name in names:
        a, b = np.load(one / collection / name), np.load(two / collection / name)
        assert sorted(a.files) == ["hour_norm", "lat_norm", "lon_norm", "pixels", "week_norm"]
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {key}")
    assert manifest(one, collection) == manifest(two, collection)
    # the shards' cubes are the same cubes
    shard_cube = np.load(tmp_path / "shards" / collection / names[0])
    expected = np.load(one / collection / names[0])["pixels"]
    np.testing.assert_array_equal(shard_cube["pixels"], expected)


def test_batch_array_index_picks_the_shard(
    database_url: str, s2_items: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store(database_url, s2_items[:1])
    monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", "1")
    out = tmp_path / "o"
    args = ["prechip", "--query", ALL, "--out", str(out), "--cube-size", "16", "--bands", "red"]
    line = error_line(run_cli(args, database_url=database_url))
    assert "--shard-count" in line
    result = run_cli([*args, "--shard-count", "2"], database_url=database_url)
    assert result.exit_code == 0, result.output
    assert "(shard 1/2)" in result.stdout
    assert (out / s2_items[0]["collection"] / "manifest-1-of-2.parquet").exists()


def test_bad_shard_and_unknown_platform_are_one_line_errors(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    store(database_url, s2_items[:1])
    line = error_line(
        run_cli(
            ["prechip", "--query", ALL, "--out", str(tmp_path), "--shard", "3/3"],
            database_url=database_url,
        )
    )
    assert "--shard 3/3" in line
    line = error_line(
        run_cli(
            ["prechip", "--query", ALL, "--out", str(tmp_path), "--bands", "red,thermal"],
            database_url=database_url,
        )
    )
    assert "thermal" in line and "--bands" in line


def test_cubes_to_s3_and_filter_options(
    database_url: str, s2_items: list[dict], s3_server, s3_bucket: str, tmp_path: Path
) -> None:
    store(database_url, s2_items)
    collection = s2_items[1]["collection"]
    result = run_cli(
        ["prechip", "--collection", collection, "--max-cloud", "0.1", "-n", "20", "--seed", "7",
         "--cube-size", "10", "--bands", "red,nir08", "--out", f"s3://{s3_bucket}/export"],
        database_url=database_url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote 20 chips in 2 cubes" in result.stdout
    client = s3_server.client()
    keys = sorted(
        o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    )
    assert keys == [
        f"export/{collection}/cube_0.npz",
        f"export/{collection}/cube_1.npz",
        f"export/{collection}/manifest.parquet",
    ]
    local = tmp_path / "cube_1.npz"
    client.download_file(s3_bucket, keys[1], str(local))
    assert np.load(local)["pixels"].shape == (10, 2, CHIP, CHIP)
    manifest_path = tmp_path / "manifest.parquet"
    client.download_file(s3_bucket, keys[2], str(manifest_path))
    rows = pq.read_table(manifest_path).to_pylist()
    assert len(rows) == 20
    assert all(r["cloud_fraction"] <= 0.1 for r in rows)
    # --query and filters together are ambiguous
    line = error_line(
        run_cli(["prechip", "--query", ALL, "--max-cloud", "0.1", "--out", str(tmp_path)],
                database_url=database_url)
    )  # fmt: skip
    assert "either --query" in line
    # a bucket that does not exist: one line naming it, not boto3's traceback
    missing = f"s3://{s3_bucket}-missing/export"
    line = error_line(
        run_cli(["prechip", "--query", ALL, "--cube-size", "10", "--out", missing],
                database_url=database_url)
    )  # fmt: skip
    assert f"bucket of {missing}/" in line and "does not exist" in line


def test_shard_parameters_of_the_library_are_checked(tmp_path: Path) -> None:
    empty = ChipSelection([], {})
    with pytest.raises(ConfigError, match="`shard_index` and `shard_count` go together"):
        export_cubes(empty, str(tmp_path), shard_index=1)
    with pytest.raises(ConfigError, match="`shard_index`/`shard_count`: need 0 <= I < N"):
        export_cubes(empty, str(tmp_path), shard_index=2, shard_count=2)
    assert export_cubes(empty, str(tmp_path), shard_index=1, shard_count=2).written == 0


# -- stopping: signals and a dead parent leave nothing behind ----------------------------------


def _children(pid: int) -> set[int]:
    """Pids of the processes whose parent is `pid` (workers, resource tracker)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _segments(pid: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"stacchip-{pid}-*"))


STOPPED_CHIP_SIZE = 16
"""Chips of the exports the tests stop: ~9,000 in ~1,100 cubes, so that the export is still
running when the signal comes (with 32-px chips the faster reader sometimes finished first)."""


def _start_export(database_url: str, out: Path) -> subprocess.Popen[str]:
    """`prechip --jobs 2` over every chip in 8-chip cubes: hundreds of cubes or more."""
    env = {**os.environ, "STACCHIP_DATABASE_URL": database_url}
    return subprocess.Popen(
        [sys.executable, "-m", "stacchip_db.cli", "-q", "prechip", "--query", ALL, "--out",
         str(out), "--cube-size", "8", "--jobs", "2"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen[str], pids: set[int]) -> Iterator[None]:
    """Whatever the assertions say, kill what is left of the export (a failing test must not
    leave blocked workers and their shared memory behind) and reap it."""
    try:
        yield
    finally:
        for pid in [proc.pid, *pids]:
            if _alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for segment in _segments(proc.pid):
            Path("/dev/shm", segment).unlink(missing_ok=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)


def _caught_mid_run(proc: subprocess.Popen[str]) -> set[int]:
    """Wait until the export reads into shared memory with its workers up; their pids."""
    deadline = time.monotonic() + 120
    while not (_segments(proc.pid) and len(_children(proc.pid)) >= 2):
        assert proc.poll() is None, f"the export ended before it was caught: {proc.stderr}"
        assert time.monotonic() < deadline, "the export never started reading"
        time.sleep(0.01)
    return _children(proc.pid)


def _gone(pids: set[int], pid: int, seconds: float = 15) -> tuple[set[int], list[str]]:
    """Wait up to `seconds` for `pids` to end and `pid`'s segments to go; what is left."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = {p for p in pids if _alive(p)}
        if not alive and not _segments(pid):
            break
        time.sleep(0.05)
    return {p for p in pids if _alive(p)}, _segments(pid)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_export_leaves_no_worker_segment_or_partial_file(
    database_url: str, s2_items: list[dict], tmp_path: Path, signum: int
) -> None:
    store_indexed(database_url, s2_items, chip_size=STOPPED_CHIP_SIZE)
    out = tmp_path / "cubes"
    proc = _start_export(database_url, out)
    workers = _caught_mid_run(proc)
    with _reaped(proc, workers):
        proc.send_signal(signum)
        proc.wait(timeout=60)
        stderr = proc.stderr.read() if proc.stderr else ""
        assert proc.returncode == 1
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "stopped by " + signal.Signals(signum).name in lines[0], stderr
        assert _gone(workers, proc.pid) == (set(), [])
        assert not list(out.rglob("*.partial"))
        assert not list(out.rglob("manifest*.parquet"))  # an unfinished export has no manifest


@pytest.mark.timeout(300)
def test_workers_end_when_the_export_is_killed(
    database_url: str, s2_items: list[dict], tmp_path: Path
) -> None:
    store_indexed(database_url, s2_items, chip_size=STOPPED_CHIP_SIZE)
    proc = _start_export(database_url, tmp_path / "cubes")
    workers = _caught_mid_run(proc)
    with _reaped(proc, workers):
        proc.kill()  # SIGKILL: nothing runs in the parent
        proc.wait(timeout=60)
        # the kernel ends the workers (PR_SET_PDEATHSIG); Python's resource tracker, whose
        # pipe they held open too, then unlinks the segments the parent registered
        assert _gone(workers, proc.pid) == (set(), [])
