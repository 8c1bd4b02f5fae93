"""stacchip.chips: one row per chip (public contract: docs/architecture.md, "Database contract").

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from geoalchemy2 import Geometry

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chips",
        sa.Column("collection", sa.Text, nullable=False),
        sa.Column("item_id", sa.Text, nullable=False),
        sa.Column("chip_size", sa.Integer, nullable=False),
        sa.Column("chip_index_x", sa.Integer, nullable=False),
        sa.Column("chip_index_y", sa.Integer, nullable=False),
        sa.Column("datetime", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cloud_fraction", sa.REAL, nullable=False),
        sa.Column("nodata_fraction", sa.REAL, nullable=False),
        sa.Column(
            "geometry",
            Geometry("POLYGON", srid=4326, spatial_index=False),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint(
            "collection", "item_id", "chip_size", "chip_index_x", "chip_index_y",
            name="chips_pkey",
        ),
        sa.CheckConstraint("chip_size > 0", name="chips_chip_size_positive"),
        sa.CheckConstraint(
            "chip_index_x >= 0 AND chip_index_y >= 0", name="chips_index_nonnegative"
        ),
        sa.CheckConstraint(
            "cloud_fraction >= 0 AND cloud_fraction <= 1", name="chips_cloud_fraction_range"
        ),
        sa.CheckConstraint(
            "nodata_fraction >= 0 AND nodata_fraction <= 1", name="chips_nodata_fraction_range"
        ),
        schema="stacchip",
    )
    op.create_index(
        "chips_geometry_idx", "chips", ["geometry"], schema="stacchip", postgresql_using="gist"
    )
    op.create_index("chips_datetime_idx", "chips", ["datetime"], schema="stacchip")


def downgrade() -> None:
    op.drop_table("chips", schema="stacchip")
