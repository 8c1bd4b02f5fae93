"""Auxiliary layers: their registry, vector layers' schema, and per-chip class fractions.

`stacchip.layers` names each layer (vector or categorical raster) and where it came from;
a vector layer's features are a table of their own in schema `stacchip_layers` (made by
`stacchip-db layer add`, GiST on `geometry`, EPSG:4326); a raster layer's per-chip class
fractions are rows of `stacchip.chip_classes`, keyed by the layer and the chip's key columns.
Chips are referenced by their key, not by a foreign key: `bulk_load` refuses a chips table
that another table references, and the chips table's layout is not this revision's business.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS stacchip_layers")
    op.execute(
        """
        CREATE TABLE stacchip.layers (
            name text PRIMARY KEY CONSTRAINT layers_name_check
                CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
            kind text NOT NULL CONSTRAINT layers_kind_check CHECK (kind IN ('vector', 'raster')),
            source text NOT NULL,
            columns text[] NOT NULL DEFAULT '{}',
            stratum_column text,
            class_values bigint[],
            class_names text[],
            nodata double precision,
            features bigint,
            added_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        """
        CREATE TABLE stacchip.chip_classes (
            layer text NOT NULL REFERENCES stacchip.layers (name) ON DELETE CASCADE,
            collection text NOT NULL,
            item_id text NOT NULL,
            chip_size integer NOT NULL,
            chip_index_x integer NOT NULL,
            chip_index_y integer NOT NULL,
            sample_key bigint NOT NULL,
            fractions jsonb NOT NULL,
            dominant text,
            nodata_fraction real NOT NULL
                CONSTRAINT chip_classes_nodata_range CHECK (nodata_fraction BETWEEN 0 AND 1),
            CONSTRAINT chip_classes_pkey
                PRIMARY KEY (layer, collection, item_id, chip_size, chip_index_x, chip_index_y)
        )
        """
    )
    # Stratified and quota samples walk one stratum in sampling order and stop after k.
    op.execute(
        "CREATE INDEX chip_classes_dominant_key_idx "
        "ON stacchip.chip_classes (layer, dominant, sample_key)"
    )


def downgrade() -> None:
    op.execute("DROP TABLE stacchip.chip_classes")
    op.execute("DROP TABLE stacchip.layers")
    op.execute("DROP SCHEMA stacchip_layers CASCADE")
