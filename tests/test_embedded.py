"""The embedded database's life cycle through the CLI, and its one-line failures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from stacchip_db.db.embedded import EmbeddedCluster, find_bindir
from tests.conftest import error_line, run_cli


@pytest.fixture
def home() -> Iterator[Path]:
    # Short path under /tmp: a unix socket path may not exceed 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="sdb-"))
    yield path
    EmbeddedCluster(path).stop()
    shutil.rmtree(path, ignore_errors=True)


def _cli_subprocess(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACCHIP_")}
    env["STACCHIP_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "stacchip_db.cli", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )


def test_start_twice_status_stop_status(home: Path) -> None:
    first = run_cli(["db", "start"], home=home)
    assert first.exit_code == 0, first.output
    assert "the embedded database started (pid" in first.stdout
    assert first.output.count("started") == 1, first.output  # said once, not logged again

    again = _cli_subprocess(home, "db", "start")  # a second process reuses the cluster
    assert again.returncode == 0, again.stderr
    assert "is already running" in again.stdout
    pid = EmbeddedCluster(home).status().pid
    assert f"pid {pid}," in first.stdout and f"pid {pid}," in again.stdout

    status = run_cli(["db", "status"], home=home)
    assert status.exit_code == 0
    assert "running" in status.stdout

    url = run_cli(["db", "url"], home=home).stdout.strip()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == "stacchip"

    stop = run_cli(["db", "stop"], home=home)
    assert stop.exit_code == 0 and "stopped the embedded database" in stop.stdout
    assert stop.output.count("stopped") == 1, stop.output
    stopped = run_cli(["db", "status"], home=home)
    assert stopped.exit_code == 3
    assert "stopped" in stopped.stdout
    stop_again = run_cli(["db", "stop"], home=home)
    assert "was not running" in stop_again.stdout


def test_commands_start_the_database_and_tcp_needs_the_password(home: Path) -> None:
    result = run_cli(["db", "init"], home=home)  # nothing started it before
    assert result.exit_code == 0, result.output
    assert "pgstac 0.10.0" in result.stdout

    masked = run_cli(["db", "url", "--tcp"], home=home).stdout.strip()
    assert ":***@127.0.0.1:" in masked
    tcp = run_cli(["db", "url", "--tcp", "--show-password"], home=home).stdout.strip()
    with psycopg.connect(tcp) as conn:  # other tools reach it over loopback TCP
        assert conn.execute("SELECT postgis_lib_version()").fetchone()[0].startswith("3.")

    wrong = tcp.replace(tcp.split(":")[2].split("@")[0], "not-the-password")
    denied = run_cli(["db", "doctor"], database_url=wrong)
    error = error_line(denied)
    assert "refused the login" in error and "check the user and password" in error
    assert "not-the-password" not in denied.stderr


def test_db_start_refuses_a_server_url(home: Path) -> None:
    result = run_cli(["db", "start"], database_url="postgresql://u:pw@127.0.0.1:1/x", home=home)
    assert "manages the embedded database" in error_line(result)
    assert ":pw@" not in result.stderr


@pytest.fixture
def bindir_without_postgis(tmp_path: Path) -> Path:
    """A relocated copy of the server binaries whose share dir lacks PostGIS.

    PostgreSQL finds its share directory relative to its own binary, so this is a real
    server that has never heard of PostGIS, as on a machine where it is not installed.
    """
    real_bin = find_bindir()
    real_share = Path(
        subprocess.run([str(real_bin / "pg_config"), "--sharedir"], capture_output=True,
                       text=True, check=True).stdout.strip()
    )
    relative_bin = real_bin.relative_to(real_bin.parents[3])  # e.g. lib/postgresql/15/bin
    root = Path(tempfile.mkdtemp(prefix="sdb-nopostgis-"))
    bin_copy = root / relative_bin
    shutil.copytree(real_bin, bin_copy, symlinks=True)
    (bin_copy.parent / "lib").symlink_to(real_bin.parent / "lib")
    share = root / real_share.relative_to(real_bin.parents[3])
    (share / "extension").mkdir(parents=True)
    for entry in real_share.iterdir():
        if entry.name != "extension":
            (share / entry.name).symlink_to(entry)
    for entry in (real_share / "extension").iterdir():
        if not entry.name.startswith("postgis"):
            (share / "extension" / entry.name).symlink_to(entry)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o005)
    yield bin_copy
    shutil.rmtree(root, ignore_errors=True)


def test_database_without_postgis_says_how_to_install_it(
    home: Path, bindir_without_postgis: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACCHIP_PG_BINDIR", str(bindir_without_postgis))
    result = run_cli(["db", "init"], home=home)
    error = error_line(result)
    assert "PostGIS is not installed" in error
    assert "apt-get install postgresql-" in error and "-postgis-3" in error
