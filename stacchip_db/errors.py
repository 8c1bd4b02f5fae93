"""The exceptions stacchip-db reports to users.

Every error a user can cause (bad input, a database that is down, a schema that is behind)
is a `StacchipError`: the CLI prints its message as one line and exits 1. Anything else is a
bug and keeps its traceback.
"""

import logging

log = logging.getLogger(__name__)


class StacchipError(Exception):
    """Base of every error stacchip-db reports as one line."""


class ConfigError(StacchipError):
    """A setting (option or environment variable) is missing or invalid."""


class DatabaseError(StacchipError):
    """The database could not be reached or refused a statement."""


class DatabaseUnavailable(DatabaseError):
    """No connection could be made (server down, wrong host, wrong password)."""


class PostgisMissing(DatabaseError):
    """The server has no PostGIS extension to install."""


class SchemaBehind(DatabaseError):
    """The database's schema is older than this stacchip-db needs."""


class EmbeddedDatabaseError(StacchipError):
    """The embedded PostgreSQL cluster could not be created, started or stopped."""


def item_failure_line(error: BaseException, item_id: str) -> str:
    """One line for an item that failed (indexing, storing, ingesting): whitespace collapsed,
    `item {item_id}: ` in front unless the message names the item already. An error that is not
    a `StacchipError` keeps its type's name, and its traceback goes to the debug log (-vv)."""
    text = " ".join(str(error).split())
    if not isinstance(error, StacchipError):
        log.debug("item %s failed", item_id, exc_info=error)
        text = f"{type(error).__name__}: {text}"
    return text if item_id in text else f"item {item_id}: {text}"
