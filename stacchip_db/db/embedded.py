"""The embedded database: a private PostgreSQL cluster that stacchip-db creates and runs itself.

It lives under `$STACCHIP_HOME` and listens on a unix socket plus loopback TCP on a port chosen
once and kept, so QGIS or stac-fastapi-pgstac can connect too. The server binaries are the
machine's own (`pg_config --bindir`, the Debian paths, or `$STACCHIP_PG_BINDIR`). PostgreSQL
refuses to run as root, so as root the server runs as the `postgres` user (or
`$STACCHIP_PG_USER`).

The home is split by who may change what, because as root we must never write through a path
the server user controls (a link it plants would make root overwrite any file):

    $STACCHIP_HOME/        the invoking user's (as root: group of the server user, 0710)
        .lock  port  password          written only by us, replaced atomically, never followed
        server/            the server user's, 0700: pgdata/, postgresql.log, the unix socket

Earlier versions kept `pgdata/`, the log and the socket directly in a home owned by the server
user; such a home is taken back and moved into this layout on the next start.

Every process that needs the database calls `ensure_running()`; a file lock makes concurrent
callers agree, and a second process that finds the cluster running reuses it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from stacchip_db.config import ROOT_HOME
from stacchip_db.errors import EmbeddedDatabaseError

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
DATABASE = "stacchip"
BINDIR_ENV = "STACCHIP_PG_BINDIR"
SERVER_USER_ENV = "STACCHIP_PG_USER"
SERVER_DIR = "server"
"""The home's subfolder that belongs to the server user: data, log, socket."""
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
    socket_dir: Path | None = None

    def describe(self) -> str:
        if not self.initialized:
            return f"embedded database: not created yet (home {self.home})"
        if not self.running:
            return f"embedded database: stopped (home {self.home})"
        return f"embedded database: running ({self.where()})"

    def where(self) -> str:
        return f"pid {self.pid}, port {self.port}, socket in {self.socket_dir or self.home}"


class EmbeddedCluster:
    """A PostgreSQL cluster under `home`, owned and run by stacchip-db.

    `durable=False` (tests, throwaway clusters) turns off fsync and friends: much faster,
    and a crash may lose the cluster, which is fine for data that is rebuilt anyway.
    """

    def __init__(self, home: Path, *, durable: bool = True, database: str = DATABASE) -> None:
        # The real path: a link on the way would be one more thing that must be trusted.
        self.home = Path(os.path.realpath(home))
        self.server_dir = self.home / SERVER_DIR
        self.log_file = self.server_dir / "postgresql.log"
        self.password_file = self.home / "password"
        self.port_file = self.home / "port"
        self.lock_file = self.home / ".lock"
        self.durable = durable
        self.database = database
        if len(str(self.server_dir).encode()) > MAX_SOCKET_DIR:
            raise EmbeddedDatabaseError(
                f"STACCHIP_HOME {self.home} is too long for a unix socket path in it "
                f"(at most {MAX_SOCKET_DIR - len(SERVER_DIR) - 1} bytes): "
                "choose a shorter STACCHIP_HOME"
            )

    @property
    def data_dir(self) -> Path:
        """`server/pgdata`, or the `pgdata` of an earlier version's home not moved yet."""
        legacy, current = self.home / "pgdata", self.server_dir / "pgdata"
        if _is_real_dir(legacy) and not os.path.lexists(current):
            return legacy
        return current

    # -- public API -------------------------------------------------------------------------

    def status(self) -> ClusterStatus:
        """Whether the cluster exists and runs, with its pid, port and socket folder."""
        initialized = (self.data_dir / "PG_VERSION").exists()
        if not initialized:
            return ClusterStatus(self.home, False, False)
        result = self._pg_ctl("status", check=False)
        if result.returncode != 0:
            return ClusterStatus(self.home, True, False)
        pid, port, socket_dir = self._read_postmaster_pid()
        return ClusterStatus(self.home, True, True, pid, port, socket_dir)

    def start(self) -> tuple[ClusterStatus, bool]:
        """Create the cluster if needed and start it; returns (status, whether we started it)."""
        with self._lock():
            current = self.status()
            if current.running:
                return current, False
            self._check_server_can_reach()
            self._move_legacy_layout()
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb()
            port = self._choose_port()
            options = [
                f"-c port={port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories='{self.server_dir}'",
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
            _replace_file(self.port_file, f"{port}\n", durable=self.durable)
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
        port, socket_dir = self._socket_location()
        return (
            f"postgresql://{SUPERUSER}@/{quote(database or self.database)}"
            f"?host={quote(str(socket_dir), safe='/')}&port={port}"
        )

    def tcp_url(self, database: str | None = None, *, show_password: bool = False) -> str:
        """A libpq URL over loopback TCP, for tools that cannot use the socket."""
        password = "***"
        if show_password:
            stored = _read_file(self.password_file, ours=True)
            if not stored or not stored.strip():
                raise EmbeddedDatabaseError(
                    f"no password for the embedded database in {self.password_file}: run "
                    "`stacchip-db db stop` and `stacchip-db db start` to set a new one"
                )
            password = quote(stored.strip(), safe="")
        port, _ = self._socket_location()
        return (
            f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{port}"
            f"/{quote(database or self.database)}"
        )

    # -- the home: who may write where ------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self._prepare_home()
        fd = self._open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _prepare_home(self) -> None:
        """Make the home ours alone (as root: enterable by the server user's group) and
        `server/` the server user's; take back a home an earlier version gave the server user.
        """
        user = self._server_user()
        if user is not None:
            self._check_parents(user)
        self.home.mkdir(parents=True, exist_ok=True)
        st = os.lstat(self.home)
        if not stat.S_ISDIR(st.st_mode):
            raise EmbeddedDatabaseError(
                f"STACCHIP_HOME {self.home} is not a folder: set STACCHIP_HOME to a folder"
            )
        me = os.geteuid()
        if st.st_uid != me:
            if user is None or st.st_uid != user.pw_uid:
                raise EmbeddedDatabaseError(
                    f"STACCHIP_HOME {self.home} belongs to user {_user_name(st.st_uid)}, not to "
                    f"{_user_name(me)}: set STACCHIP_HOME to a folder of your own"
                )
            # Earlier versions chowned the home to the server user: from now on it may not
            # add or replace anything here.
            log.warning("took back %s from user %s: the server now keeps its files in %s",
                        self.home, user.pw_name, self.server_dir)
        group = user.pw_gid if user is not None else st.st_gid
        if (st.st_uid, st.st_gid) != (me, group):
            os.chown(self.home, me, group, follow_symlinks=False)
        mode = 0o710 if user is not None else 0o700
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(self.home, mode)

        with contextlib.suppress(FileExistsError):
            os.mkdir(self.server_dir, 0o700)
        st = os.lstat(self.server_dir)
        if not stat.S_ISDIR(st.st_mode):
            raise EmbeddedDatabaseError(
                f"{self.server_dir} is not a folder but a link or file: remove it and run the "
                "command again"
            )
        if user is not None and (st.st_uid, st.st_gid) != (user.pw_uid, user.pw_gid):
            os.chown(self.server_dir, user.pw_uid, user.pw_gid, follow_symlinks=False)
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(self.server_dir, 0o700)

    def _check_parents(self, user: pwd.struct_passwd) -> None:
        """Refuse a home the server user could swap for its own by renaming a parent folder."""
        groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
        for parent in self.home.parents:
            try:
                st = os.stat(parent)
            except FileNotFoundError:
                continue  # created by us below, so ours
            mode = st.st_mode
            owns = st.st_uid == user.pw_uid
            writable = (mode & stat.S_IWOTH) or (mode & stat.S_IWGRP and st.st_gid in groups)
            # In a sticky folder (/tmp) others may not rename what they do not own.
            if owns or (writable and not mode & stat.S_ISVTX):
                raise EmbeddedDatabaseError(
                    f"STACCHIP_HOME {self.home} is inside {parent}, which the server user "
                    f"{user.pw_name} may change: as root set STACCHIP_HOME to a folder whose "
                    f"parents only root can change (the default is {ROOT_HOME})"
                )

    def _check_server_can_reach(self) -> None:
        """As root, stop with one line when the server user cannot enter the home.

        Permissions of folders outside the home are the administrator's, so they are named,
        not changed.
        """
        user = self._server_user()
        if user is None or self._server_can_enter(self.server_dir):
            return
        for folder in [*reversed(self.home.parents), self.home, self.server_dir]:
            if not self._server_can_enter(folder):
                st = os.stat(folder)
                raise EmbeddedDatabaseError(
                    f"the server user {user.pw_name} cannot enter {folder} (mode "
                    f"{stat.S_IMODE(st.st_mode):o}, owner {_user_name(st.st_uid)}) on the way to "
                    f"STACCHIP_HOME {self.home}: set STACCHIP_HOME to a folder it can reach "
                    f"(e.g. {ROOT_HOME}) or allow it through (chmod o+x {folder})"
                )

    def server_can_enter(self, folder: Path) -> bool:
        """Whether the server user can enter `folder` (an existing one); always true unless
        we run as root, when the server runs as an unprivileged user."""
        return self._server_user() is None or self._server_can_enter(folder)

    def _server_can_enter(self, folder: Path) -> bool:
        # Asked of the kernel as the server user: ACLs and groups count as they will for it.
        return self._run(["test", "-x", str(folder)], check=False).returncode == 0

    def _open_lock(self) -> int:
        """The lock file, opened without following a link and without truncating anything."""
        flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        for _ in range(3):
            try:
                fd = os.open(self.lock_file, flags, 0o600)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise EmbeddedDatabaseError(
                        f"cannot open the lock file {self.lock_file}: {exc.strerror}"
                    ) from exc
            else:
                if _is_own_file(os.fstat(fd)):
                    return fd
                os.close(fd)
            # Only we can write in the home by now, so removing the stranger cannot race.
            log.warning("removed %s: a link or another user's file, not stacchip-db's lock",
                        self.lock_file)
            _remove_entry(self.lock_file)
        raise EmbeddedDatabaseError(
            f"cannot create the lock file {self.lock_file}: remove it and run the command again"
        )

    def _move_legacy_layout(self) -> None:
        """Move a stopped cluster of an earlier version (`pgdata/` in the home) into `server/`."""
        legacy = self.home / "pgdata"
        if self.data_dir != legacy:
            return
        os.rename(legacy, self.server_dir / "pgdata")
        old_log = self.home / "postgresql.log"
        if os.path.lexists(old_log) and not os.path.lexists(self.log_file):
            os.rename(old_log, self.log_file)
        # A server stopped after we took the home back could not remove its socket files.
        for leftover in self.home.glob(".s.PGSQL.*"):
            _remove_entry(leftover)
        log.info("moved the embedded database from %s to %s", legacy, self.data_dir)

    # -- running the server's programs ------------------------------------------------------

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
            # cwd "/": every path is absolute, and the server user may not enter ours.
            result = subprocess.run(
                args, capture_output=True, text=True, env=env, cwd="/", **kwargs
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

    def _initdb(self) -> None:
        password = secrets.token_urlsafe(18)
        user = self._server_user()
        # initdb runs as the server user and reads the password from a file: a fresh name in
        # the home, which the server user may enter but not change.
        fd, pwfile = tempfile.mkstemp(dir=self.home, prefix=".initdb-password-")
        try:
            if user is not None:
                os.fchown(fd, user.pw_uid, user.pw_gid)
            with os.fdopen(fd, "w") as handle:
                handle.write(password + "\n")
            args = [
                str(find_bindir() / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                "-E", "UTF8", "--locale=C.UTF-8", "--auth-local=trust",
                "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
            ]
            if not self.durable:
                args.append("--no-sync")
            self._run(args)
        finally:
            os.unlink(pwfile)
        _replace_file(self.password_file, password + "\n", durable=self.durable)
        log.info("created a new embedded database cluster in %s", self.data_dir)

    def _choose_port(self) -> int:
        """The port used last time if it is free (stable URLs for other tools), else a new one."""
        port = _parse_port(_read_file(self.port_file, ours=True))
        if port is not None and _port_is_free(port):
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def _socket_location(self) -> tuple[int, Path]:
        """(port, socket folder) of the running server, else of the last start."""
        _, port, socket_dir = self._read_postmaster_pid()
        if port is None:
            port = _parse_port(_read_file(self.port_file, ours=True))
        if port is None:
            raise EmbeddedDatabaseError(
                f"the embedded database in {self.home} was never started: "
                "run `stacchip-db db start`"
            )
        return port, socket_dir or self.server_dir

    def _read_postmaster_pid(self) -> tuple[int | None, int | None, Path | None]:
        """pid, port and first socket folder from the server's `postmaster.pid`."""
        lines = (_read_file(self.data_dir / "postmaster.pid", ours=False) or "").splitlines()
        try:
            pid, port = int(lines[0]), int(lines[3])
        except (IndexError, ValueError):
            return None, None, None
        socket_dir = Path(lines[4]) if len(lines) > 4 and lines[4].strip() else None
        return pid, port, socket_dir

    def _create_database(self) -> None:
        with psycopg.connect(self.socket_url("postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.database}"')
            self._ensure_password(conn)

    def _ensure_password(self, conn: psycopg.Connection) -> None:
        """Set a new TCP password when ours is gone (or was replaced by someone else's file)."""
        stored = _read_file(self.password_file, ours=True)
        if stored and stored.strip():
            return
        password = secrets.token_urlsafe(18)
        # Hashed here, as psql's \password does, so the clear text never reaches the server.
        verifier = conn.pgconn.encrypt_password(
            password.encode(), SUPERUSER.encode(), b"scram-sha-256"
        ).decode()
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
            sql.Identifier(SUPERUSER), sql.Literal(verifier)
        ))
        _replace_file(self.password_file, password + "\n", durable=self.durable)
        log.warning("%s was missing or not stacchip-db's: set a new password for TCP logins "
                    "(see `stacchip-db db url --tcp --show-password`)", self.password_file)

    def _log_tail(self) -> str:
        text = _read_file(self.log_file, ours=False)
        if text is None:
            return "no log"
        lines = text.strip().splitlines()
        return lines[-1] if lines else "empty log"


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _is_own_file(st: os.stat_result) -> bool:
    """A regular file of ours with one name: not a FIFO, device or someone's hard link."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1


def _read_file(path: Path, *, ours: bool, limit: int = 1 << 16) -> str | None:
    """The last `limit` bytes of `path` as text, None when missing or not acceptable.

    Never follows a link in the last component and never blocks on a FIFO; with `ours`, only a
    file `_is_own_file` accepts is read (anything else is what someone else put there).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            log.warning("ignored %s: a symbolic link, not a file stacchip-db wrote", path)
        return None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(fd)
        if ours and not _is_own_file(st):
            log.warning("ignored %s: not a file stacchip-db wrote (owner %s, %d names)",
                        path, _user_name(st.st_uid), st.st_nlink)
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        handle.seek(max(0, st.st_size - limit))
        return handle.read(limit).decode(errors="replace")


def _replace_file(path: Path, text: str, *, durable: bool) -> None:
    """Write a new private file and rename it over `path`: whatever was there (a link
    included) is replaced, never written through."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise EmbeddedDatabaseError(
            f"cannot write {path}: {exc.strerror}; remove it and run the command again"
        ) from exc


def _remove_entry(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise EmbeddedDatabaseError(
            f"{path} is not stacchip-db's and cannot be removed ({exc.strerror}): remove it "
            "and run the command again"
        ) from exc


def _parse_port(text: str | None) -> int | None:
    return int(text) if text and text.strip().isdigit() else None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
