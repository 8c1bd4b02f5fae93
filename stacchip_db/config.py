"""Settings read in one place: the database URL and where the embedded database lives.

The CLI builds `Settings` from its options and the environment; tests build it with explicit
values so nothing leaks in from a developer's shell.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

DATABASE_URL_ENV = "STACCHIP_DATABASE_URL"
QUERY_DATABASE_URL_ENV = "STACCHIP_QUERY_DATABASE_URL"
HOME_ENV = "STACCHIP_HOME"


ROOT_HOME = Path("/var/lib/stacchip-db")
"""Root's default home: root's own data folder (under /root, 0700) is out of the server
user's reach, and its permissions are not ours to change."""


def default_home() -> Path:
    """`$XDG_DATA_HOME/stacchip-db`, usually `~/.local/share/stacchip-db`; as root
    `/var/lib/stacchip-db`, unless a home made there by an earlier version exists."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    home = Path(data_home) / "stacchip-db"
    if os.geteuid() == 0 and not home.exists():
        return ROOT_HOME
    return home


@dataclass(frozen=True)
class Settings:
    """Where the database is.

    `database_url` is a libpq URL or keyword/value string; None means the embedded database
    under `home`. `query_database_url` is the login user SQL runs as (`--query`), when not the
    restricted login `db init` made (stacchip_db/db/user_sql.py).
    """

    database_url: str | None = None
    home: Path = Path()
    query_database_url: str | None = None

    @classmethod
    def from_env(cls, database_url: str | None = None, home: str | Path | None = None) -> Settings:
        """Explicit values win over `STACCHIP_DATABASE_URL` and `STACCHIP_HOME`."""
        url = database_url or os.environ.get(DATABASE_URL_ENV) or None
        home_path = Path(home or os.environ.get(HOME_ENV) or default_home()).expanduser()
        query_url = os.environ.get(QUERY_DATABASE_URL_ENV) or None
        return cls(database_url=url, home=home_path.absolute(), query_database_url=query_url)

    @property
    def embedded(self) -> bool:
        return self.database_url is None


# Where passwords hide. A URL's user info runs to the LAST `@` of the URL (a raw `@`, `:`, `/`
# or `?` in a password must not end it early; masking too much is the safe side). Query form
# `?password=` / `&password=`; libpq keyword form `password=…` (quoted or not), also
# PGPASSWORD= and FOO_PASSWORD=.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s:/]*:)(?P<pw>\S*)(?=@)", re.I)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<pw>[^&\s]*)", re.I)
_KV_PASSWORD = re.compile(
    r"(?P<head>(?<![?&\w])(?:\w*_|pg)?password\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'?|\S+)", re.I
)
# The signature of a SAS token (Planetary Computer hrefs as GDAL or requests report them).
_QUERY_SAS = re.compile(r"(?P<head>[?&]sig=)(?P<pw>[^&\s'\"]+)", re.I)
MASK = "***"


def mask_url(text: str) -> str:
    """Replace every password in `text` (URL, query or keyword form) and SAS token signature
    with `***`."""
    for pattern in (_URL_PASSWORD, _QUERY_PASSWORD, _KV_PASSWORD, _QUERY_SAS):
        text = pattern.sub(lambda m: m.group("head") + MASK, text)
    return text


class MaskPasswordsFilter(logging.Filter):
    """Logging filter that masks passwords in every record, whatever logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_url(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True
