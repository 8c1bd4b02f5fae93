"""GiST index on (geometry, datetime): a box and a time range in one index scan.

Chips are written item by item, so `datetime` is uncorrelated with the physical order; with
only the GiST on geometry and the btree on datetime, a "box + two years" query made the
planner AND a 3-million-entry datetime bitmap with a 4,000-entry box bitmap (240 ms at 10 M
chips, bench/bench_queries.py). With both columns in one GiST (btree_gist gives timestamptz
its GiST operators; `db init` installs it before alembic runs) the scan touches only the
chips inside the box and the range.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX chips_geometry_datetime_idx ON stacchip.chips USING gist (geometry, datetime)"
    )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS stacchip.chips_geometry_datetime_idx")
