"""Drop the geometry-only GiST index: the (geometry, datetime) GiST of 0004 serves its queries.

A GiST index on (geometry, datetime) answers geometry-only searches too (its first column), so
the geometry-only one (0001) only cost writes, and misled the planner: at 10 M chips the
documented bbox + date + cloud query took p50 103 ms when the planner chose it, 18 ms with the
(geometry, datetime) index alone (bench/bench_queries.py). It also cost ~3 ms of every
1,764-chip store and 0.57 s of the bulk load's index rebuild.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP INDEX IF EXISTS stacchip.chips_geometry_idx")


def downgrade() -> None:
    op.execute(
        "CREATE INDEX IF NOT EXISTS chips_geometry_idx ON stacchip.chips USING gist (geometry)"
    )
