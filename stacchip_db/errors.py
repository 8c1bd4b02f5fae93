"""The exceptions stacchip-db reports to users.

Every error a user can cause (bad input, a database that is down, a schema that is behind)
is a `StacchipError`: the CLI prints its message as one line and exits 1. Anything else is a
bug and keeps its traceback.
"""


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
