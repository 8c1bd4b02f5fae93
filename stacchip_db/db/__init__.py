"""The database layer: embedded cluster, connections, migrations and the schema gate."""

from stacchip_db.db.connection import Database, connect, resolve_url, translate_errors
from stacchip_db.db.migrate import check_schema, init_database, read_schema_state

__all__ = [
    "Database",
    "check_schema",
    "connect",
    "init_database",
    "read_schema_state",
    "resolve_url",
    "translate_errors",
]
