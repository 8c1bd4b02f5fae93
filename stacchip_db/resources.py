"""Where the shipped migrations and SQL files are.

In a wheel they sit inside the package (`stacchip_db/alembic`, `stacchip_db/sql`); in a source
checkout or an editable install they are at the top of the repository.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """The directory `name` ('alembic' or 'sql'), wherever this install keeps it."""
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"stacchip-db is installed without its {name}/ directory")
