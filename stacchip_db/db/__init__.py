"""The database layer: embedded cluster, connections, migrations and the schema gate.

Names are imported from their modules on first use (PEP 562), so that importing one submodule
(`stacchip_db.db.connection`, `stacchip_db.db.store`) does not import the migration machinery
(alembic, SQLAlchemy, pypgstac's migrations) as well.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stacchip_db.db.connection import Database, connect, resolve_url, translate_errors
    from stacchip_db.db.migrate import check_schema, init_database, read_schema_state

_LAZY = {
    "Database": "stacchip_db.db.connection",
    "connect": "stacchip_db.db.connection",
    "resolve_url": "stacchip_db.db.connection",
    "translate_errors": "stacchip_db.db.connection",
    "check_schema": "stacchip_db.db.migrate",
    "init_database": "stacchip_db.db.migrate",
    "read_schema_state": "stacchip_db.db.migrate",
}

__all__ = [
    "Database",
    "check_schema",
    "connect",
    "init_database",
    "read_schema_state",
    "resolve_url",
    "translate_errors",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
