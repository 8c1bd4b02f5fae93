"""The embedded database's life cycle through the CLI, and its one-line failures."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from stacchip_db.config import ROOT_HOME, default_home
from stacchip_db.db.embedded import EmbeddedCluster, find_bindir
from tests.conftest import error_line, run_cli


@pytest.fixture
def home() -> Iterator[Path]:
    # Short path under /tmp: a unix socket path may not exceed 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="sdb-"))
    yield path
    EmbeddedCluster(path).stop()
    shutil.rmtree(path, ignore_errors=True)


SERVER_USER = "postgres"  # who runs the server when the tests run as root, as they do
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="only as root is the server another user")


def _as_server_user(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), user=SERVER_USER, group=SERVER_USER, extra_groups=[],
                          capture_output=True, text=True, cwd="/")


@pytest.fixture
def roots_file() -> Iterator[Path]:
    """A file only root may write, which links planted by the server user point at."""
    folder = Path(tempfile.mkdtemp(prefix="sdb-target-"))
    target = folder / "precious"
    target.write_text("root's own data\n")
    target.chmod(0o644)
    yield target
    shutil.rmtree(folder, ignore_errors=True)


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


@as_root
def test_links_planted_by_the_server_user_are_not_followed(home: Path, roots_file: Path) -> None:
    server = pwd.getpwnam(SERVER_USER)
    untouched = (roots_file.read_bytes(), roots_file.stat().st_mtime_ns)
    cluster = EmbeddedCluster(home, durable=False)
    cluster.start()
    with psycopg.connect(cluster.socket_url(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")

    # A new home: the server user may enter it, but not add or replace anything in it.
    st = home.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, server.pw_gid, 0o710)
    assert (home / "server").stat().st_uid == server.pw_uid
    planted = _as_server_user("ln", "-sf", str(roots_file), str(home / "port"))
    assert planted.returncode != 0 and "Permission denied" in planted.stderr
    cluster.stop()

    # A home as earlier versions left it (everything in it, owned by the server user), where
    # the server user replaced root's files with links to a file of root's.
    os.rename(home / "server" / "pgdata", home / "pgdata")
    os.rename(home / "server" / "postgresql.log", home / "postgresql.log")
    os.rmdir(home / "server")
    os.chown(home, server.pw_uid, server.pw_gid)
    home.chmod(0o700)
    names = (".lock", "port", "password")
    plant = " && ".join(f"rm -f {name} && ln -s {roots_file} {name}" for name in names)
    planted = _as_server_user("sh", "-c", f"cd {home} && {plant}")
    assert planted.returncode == 0, planted.stderr

    result = run_cli(["db", "start"], home=home)
    assert result.exit_code == 0, result.output
    assert (roots_file.read_bytes(), roots_file.stat().st_mtime_ns) == untouched
    for name in names:
        st = os.lstat(home / name)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0, name
    assert home.stat().st_uid == 0 and not (home / "pgdata").exists()
    assert (home / "server" / "pgdata" / "PG_VERSION").exists()
    assert "took back" in result.stderr and "set a new password" in result.stderr

    tcp = run_cli(["db", "url", "--tcp", "--show-password"], home=home).stdout.strip()
    with psycopg.connect(tcp) as conn:  # the new password works, and the data is still there
        assert conn.execute("SELECT answer FROM kept").fetchone() == (42,)


@as_root
def test_a_parent_the_server_user_cannot_enter_is_named_not_changed() -> None:
    parent = Path(tempfile.mkdtemp(prefix="sdb-p-"))
    try:
        parent.chmod(0o750)  # like /root: the server user is neither owner nor in the group
        error = error_line(run_cli(["db", "start"], home=parent / "home"))
        assert f"server user {SERVER_USER} cannot enter {parent} (mode 750" in error
        assert "set STACCHIP_HOME to a folder it can reach" in error
        assert stat.S_IMODE(parent.stat().st_mode) == 0o750
        assert not (parent / "home" / "server" / "pgdata").exists()
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@as_root
def test_a_home_in_a_folder_the_server_user_may_change_is_refused() -> None:
    parent = Path(tempfile.mkdtemp(prefix="sdb-p-"))
    try:
        server = pwd.getpwnam(SERVER_USER)
        os.chown(parent, server.pw_uid, server.pw_gid)  # it could swap the home for its own
        error = error_line(run_cli(["db", "start"], home=parent / "home"))
        assert f"is inside {parent}, which the server user {SERVER_USER} may change" in error
        assert not (parent / "home").exists()
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@as_root
def test_roots_default_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert default_home() == ROOT_HOME
    earlier = tmp_path / ".local" / "share" / "stacchip-db"  # made by an earlier version
    earlier.mkdir(parents=True)
    assert default_home() == earlier
