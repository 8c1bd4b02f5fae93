"""`stacchip-db demo` from the installed wheel, outside the source tree, on a database of its own.

The wheel is built and installed (`--no-deps`, into a folder put on PYTHONPATH) as a user's
pip would, so the demo's STAC items must come from package data, not from the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from stacchip_db.db.embedded import EmbeddedCluster
from tests.conftest import REPO, PgServer, run_cli

DEMO_ITEMS = (
    "naip-collection.json",
    "naip-planetary-computer-200.ndjson",
    "sentinel-2-l2a-S2A_T20HNJ_20240311T140636_L2A.json",
    "sentinel-2-l2a-collection.json",
)


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout, installed into a folder of its own."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out / "dist"), str(REPO)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = (out / "dist").glob("stacchip_db-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in DEMO_ITEMS:
        assert f"stacchip_db/demo_data/{name}" in names
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))
    ).decode()
    assert "Provides-Extra: demo" in metadata
    runtime = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    # The demo's server stack is an extra, never a runtime dependency of the tool.
    assert not [line for line in runtime if "stac-fastapi" in line and "extra ==" not in line]
    site = out / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return site


def _run_installed(
    site: Path, args: list[str], cwd: Path, env: dict[str, str], prelude: str = ""
) -> subprocess.CompletedProcess[str]:
    """`stacchip-db ARGS` from the installed wheel (the venv supplies the dependencies)."""
    script = f"{prelude}from stacchip_db.cli import main\nmain({args!r}, prog_name='stacchip-db')"
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd, env={**env, "PYTHONPATH": str(site)}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def _user_environment(database_url: str, tmp_path: Path) -> dict[str, str]:
    """A user who has a database of their own configured (a server URL and a home)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACCHIP_")}
    env["STACCHIP_DATABASE_URL"] = database_url
    env["STACCHIP_HOME"] = str(tmp_path / "users-home")
    return env


@pytest.fixture
def demo_out() -> Iterator[Path]:
    # Short path: the demo's database listens on a unix socket in OUT/home (107 bytes at most).
    import shutil
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="sdb-demo-"))
    out.chmod(0o755)  # the server user (postgres, under root) must reach OUT/home
    yield out
    EmbeddedCluster(out / "home").stop()
    shutil.rmtree(out, ignore_errors=True)


def _count(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        return int(conn.execute(sql).fetchone()[0])


def test_demo_from_the_wheel_uses_only_a_database_of_its_own(
    installed_wheel: Path, database_url: str, pg_server: PgServer, demo_out: Path, tmp_path: Path
) -> None:
    env = _user_environment(database_url, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _run_installed(installed_wheel, ["demo", "--out", str(demo_out)], elsewhere, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # The user's database and server are untouched.
    assert _count(database_url, "SELECT count(*) FROM stacchip.chips") == 0
    assert _count(database_url, "SELECT count(*) FROM pgstac.items") == 0
    assert _count(
        pg_server.admin_url,
        "SELECT count(*) FROM pg_database WHERE datname = 'stacchip_demo_source'",
    ) == 0
    assert not (tmp_path / "users-home").exists()

    # What it made is where it says, and its closing hint works as printed.
    home = demo_out / "home"
    assert f"export STACCHIP_HOME={home}" in done.stdout
    for made in ("sample.csv", "preview.png", "map.png", "band_stats.yaml"):
        assert (demo_out / made).stat().st_size > 0, made
    # prechip exports the same seeded sample of 48 that `sample` wrote, in cubes of 16 chips.
    sampled = len((demo_out / "sample.csv").read_text().splitlines()) - 1
    cubes = list((demo_out / "cubes" / "sentinel-2-l2a").glob("cube_*.npz"))
    assert sampled == 48 and len(cubes) == 3, (sampled, cubes)
    url = run_cli(["db", "url"], home=home)
    assert url.exit_code == 0, url.output
    assert _count(url.stdout.strip(), "SELECT count(*) FROM stacchip.chips") > 0
    assert run_cli(["db", "stop"], home=home).exit_code == 0
    assert not EmbeddedCluster(home).status().running


def test_demo_without_its_extra_says_what_to_install(
    installed_wheel: Path, demo_out: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACCHIP_")}
    # As if uvicorn were not installed: the import system finds no such module.
    done = _run_installed(
        installed_wheel, ["demo", "--out", str(demo_out)], tmp_path, env,
        prelude="import sys\nsys.modules['uvicorn'] = None\n",
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == ["Error: the demo needs uvicorn: pip install 'stacchip-db[demo]'"], lines
    assert not (demo_out / "home").exists()


def test_a_failing_demo_is_one_line_and_stops_its_database(
    installed_wheel: Path, demo_out: Path, tmp_path: Path
) -> None:
    # A broken install: the demo's catalog items are gone from the package data, which the
    # demo finds only after it has started its database.
    broken = tmp_path / "broken-site"
    subprocess.run(["cp", "-r", str(installed_wheel), str(broken)], check=True)
    (broken / "stacchip_db" / "demo_data" / DEMO_ITEMS[2]).unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACCHIP_")}
    done = _run_installed(broken, ["demo", "--out", str(demo_out)], tmp_path, env)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "reinstall stacchip-db" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert EmbeddedCluster(demo_out / "home").status().initialized  # it had made one
    assert not EmbeddedCluster(demo_out / "home").status().running


def test_db_url_creates_and_starts_nothing(tmp_path: Path) -> None:
    home = tmp_path / "no-such-home"
    result = run_cli(["db", "url"], home=home)
    assert result.exit_code == 1
    assert "no embedded database is running" in result.stderr
    assert "stacchip-db db start" in result.stderr
    assert not home.exists()


def test_the_demo_home_is_where_the_server_user_can_reach_it(demo_out: Path) -> None:
    from stacchip_db.demo import DEMO_HOMES, demo_home

    open_out = demo_out / "open"  # demo_out: a folder under /tmp that the server can enter
    open_out.mkdir(mode=0o755)
    assert demo_home(open_out) == open_out / "home"
    closed = demo_out / "closed"  # as a clone under /root (0700) would be, for postgres
    closed.mkdir(mode=0o700)
    out = closed / "demo-output"
    out.mkdir()
    if os.geteuid() != 0:  # no server user to keep out: every folder the user has is fine
        assert demo_home(out) == out / "home"
        return
    home = demo_home(out)
    assert home.parent == DEMO_HOMES and home != demo_home(open_out)
    assert demo_home(out) == home  # the same output folder always finds its database again
