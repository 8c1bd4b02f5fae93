"""The embedded database: a private PostgreSQL cluster that stacchip-db creates and runs itself.

It lives under `$STACCHIP_HOME` (data in `pgdata/`, log in `postgresql.log`) and listens on a
unix socket in that folder plus loopback TCP on a port chosen once and kept, so QGIS or
stac-fastapi-pgstac can connect too. The server binaries are the machine's own (`pg_config
--bindir`, the Debian paths, or `$STACCHIP_PG_BINDIR`). PostgreSQL refuses to run as root, so
as root the server runs as the `postgres` user (or `$STACCHIP_PG_USER`).

Every process that needs the database calls `ensure_running()`; a file lock makes concurrent
callers agree, and a second process that finds the cluster running reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg

from stacchip_db.errors import EmbeddedDatabaseError

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
DATABASE = "stacchip"
BINDIR_ENV = "STACCHIP_PG_BINDIR"
SERVER_USER_ENV = "STACCHIP_PG_USER"
# A unix socket path may not exceed 107 bytes; `.s.PGSQL.NNNNN` takes 15 of them.
MAX_SOCKET_DIR = 107 - 16


def find_bindir() -> Path:
    """Where `initdb`, `pg_ctl` and `postgres` are: env override, pg_config, Debian paths, PATH."""
    candidates: list[Path] = []
    if os.environ.get(BINDIR_ENV):
        candidates.append(Path(os.environ[BINDIR_ENV]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            ).stdout.strip()
            candidates.append(Path(out))
    # Debian/Ubuntu keep each major version apart; prefer the newest.
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(debian)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    raise EmbeddedDatabaseError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them "
        "(Debian/Ubuntu: apt-get install postgresql postgresql-15-postgis-3), set "
        f"{BINDIR_ENV}, or use a server with --database-url / STACCHIP_DATABASE_URL"
    )


@dataclass(frozen=True)
class ClusterStatus:
    """What `db status` reports."""

    home: Path
    initialized: bool
    running: bool
    pid: int | None = None
    port: int | None = None

    def describe(self) -> str:
        if not self.initialized:
            return f"embedded database: not created yet (home {self.home})"
        if not self.running:
            return f"embedded database: stopped (home {self.home})"
        return f"embedded database: running ({self.where()})"

    def where(self) -> str:
        return f"pid {self.pid}, port {self.port}, socket in {self.home}"


class EmbeddedCluster:
    """A PostgreSQL cluster under `home`, owned and run by stacchip-db.

    `durable=False` (tests, throwaway clusters) turns off fsync and friends: much faster,
    and a crash may lose the cluster, which is fine for data that is rebuilt anyway.
    """

    def __init__(self, home: Path, *, durable: bool = True, database: str = DATABASE) -> None:
        self.home = Path(home).absolute()
        self.data_dir = self.home / "pgdata"
        self.log_file = self.home / "postgresql.log"
        self.password_file = self.home / "password"
        self.port_file = self.home / "port"
        self.durable = durable
        self.database = database
        if len(str(self.home).encode()) > MAX_SOCKET_DIR:
            raise EmbeddedDatabaseError(
                f"STACCHIP_HOME {self.home} is too long for a unix socket path "
                f"(at most {MAX_SOCKET_DIR} bytes): choose a shorter STACCHIP_HOME"
            )

    # -- public API -------------------------------------------------------------------------

    def status(self) -> ClusterStatus:
        """Whether the cluster exists and runs, with its pid and port."""
        initialized = (self.data_dir / "PG_VERSION").exists()
        if not initialized:
            return ClusterStatus(self.home, False, False)
        result = self._pg_ctl("status", check=False)
        if result.returncode != 0:
            return ClusterStatus(self.home, True, False)
        pid, port = self._read_postmaster_pid()
        return ClusterStatus(self.home, True, True, pid, port)

    def start(self) -> tuple[ClusterStatus, bool]:
        """Create the cluster if needed and start it; returns (status, whether we started it)."""
        with self._lock():
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb()
            current = self.status()
            if current.running:
                return current, False
            port = self._choose_port()
            options = [
                f"-c port={port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories='{self.home}'",
            ]
            if not self.durable:
                options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
            result = self._pg_ctl(
                "start", "-w", "-t", "60", "-l", str(self.log_file), "-o", " ".join(options),
                check=False,
            )
            if result.returncode != 0:
                raise EmbeddedDatabaseError(
                    f"the embedded database did not start (pg_ctl exit {result.returncode}); "
                    f"see {self.log_file}: {self._log_tail()}"
                )
            self.port_file.write_text(str(port))
            self._create_database()
            started = self.status()
            # debug here: `db start` prints it; ensure_running announces starts it makes
            log.debug("started the embedded database on port %s (home %s)", started.port, self.home)
            return started, True

    def ensure_running(self) -> ClusterStatus:
        """Start the cluster unless it runs already (the path every command takes)."""
        current = self.status()
        if current.running:
            return current
        current, started = self.start()
        if started:
            log.info("started the embedded database on port %s (home %s)", current.port, self.home)
        return current

    def stop(self) -> bool:
        """Stop the cluster; returns False when it was not running."""
        with self._lock():
            if not self.status().running:
                return False
            result = self._pg_ctl("stop", "-w", "-t", "60", "-m", "fast", check=False)
            if result.returncode != 0:
                raise EmbeddedDatabaseError(
                    f"the embedded database did not stop: {result.stderr.strip() or result.stdout}"
                )
            log.debug("stopped the embedded database (home %s)", self.home)  # the caller says it
            return True

    def socket_url(self, database: str | None = None) -> str:
        """A libpq URL over the unix socket: no password needed, only this machine's users."""
        port = self._known_port()
        return (
            f"postgresql://{SUPERUSER}@/{quote(database or self.database)}"
            f"?host={quote(str(self.home), safe='/')}&port={port}"
        )

    def tcp_url(self, database: str | None = None, *, show_password: bool = False) -> str:
        """A libpq URL over loopback TCP, for tools that cannot use the socket."""
        password = self.password_file.read_text().strip() if show_password else "***"
        return (
            f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self._known_port()}"
            f"/{quote(database or self.database)}"
        )

    # -- internals --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _server_user(self) -> pwd.struct_passwd | None:
        """The unprivileged user that runs the server when we are root, else None."""
        if os.geteuid() != 0:
            return None
        name = os.environ.get(SERVER_USER_ENV, "postgres")
        try:
            return pwd.getpwnam(name)
        except KeyError:
            raise EmbeddedDatabaseError(
                f"running as root, the embedded database needs an unprivileged user '{name}' "
                f"to run PostgreSQL: create it (useradd --system {name}), set "
                f"{SERVER_USER_ENV}, or run stacchip-db as a normal user"
            ) from None

    def _run(self, args: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        user = self._server_user()
        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        kwargs: dict = {}
        if user is not None:
            env["HOME"] = user.pw_dir
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        try:
            result = subprocess.run(
                args, capture_output=True, text=True, env=env, cwd=self.home, **kwargs
            )
        except OSError as exc:
            raise EmbeddedDatabaseError(f"could not run {args[0]}: {exc}") from exc
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise EmbeddedDatabaseError(
                f"{Path(args[0]).name} failed (exit {result.returncode}): "
                f"{detail[-1] if detail else 'no output'}"
            )
        return result

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run([str(find_bindir() / "pg_ctl"), "-D", str(self.data_dir), *args],
                         check=check)

    def _prepare_home(self) -> None:
        """Make home private to the server user, and reachable by it when we are root."""
        self.home.mkdir(parents=True, exist_ok=True)
        user = self._server_user()
        if user is None:
            self.home.chmod(0o700)
            return
        os.chown(self.home, user.pw_uid, user.pw_gid)
        self.home.chmod(0o700)
        # The server user must traverse every parent (e.g. /root is 0700): add o+x only.
        for parent in self.home.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)
                log.info("granted traverse permission (o+x) on %s so user %s can reach %s",
                         parent, user.pw_name, self.home)

    def _initdb(self) -> None:
        self._prepare_home()
        password = secrets.token_urlsafe(18)
        pwfile = self.home / ".initdb-password"
        pwfile.write_text(password + "\n")
        user = self._server_user()
        if user is not None:
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        pwfile.chmod(0o600)
        args = [
            str(find_bindir() / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
            "-E", "UTF8", "--locale=C.UTF-8", "--auth-local=trust",
            "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
        ]
        if not self.durable:
            args.append("--no-sync")
        try:
            self._run(args)
        finally:
            pwfile.unlink(missing_ok=True)
        self.password_file.write_text(password + "\n")
        self.password_file.chmod(0o600)
        log.info("created a new embedded database cluster in %s", self.data_dir)

    def _choose_port(self) -> int:
        """The port used last time if it is free (stable URLs for other tools), else a new one."""
        if self.port_file.exists():
            port = int(self.port_file.read_text().strip())
            if _port_is_free(port):
                return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def _known_port(self) -> int:
        _, port = self._read_postmaster_pid()
        if port is None and self.port_file.exists():
            port = int(self.port_file.read_text().strip())
        if port is None:
            raise EmbeddedDatabaseError(
                f"the embedded database in {self.home} was never started: "
                "run `stacchip-db db start`"
            )
        return port

    def _read_postmaster_pid(self) -> tuple[int | None, int | None]:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            return int(lines[0]), int(lines[3])
        except (OSError, IndexError, ValueError):
            return None, None

    def _create_database(self) -> None:
        url = self.socket_url("postgres")
        with psycopg.connect(url, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.database}"')

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "empty log"


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
