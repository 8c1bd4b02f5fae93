"""Sampling key of a chip: a portable hash of its key, and an index to walk chips in its order.

Seeded sampling (`stacchip.sample_chips`, sql/010_selection.sql) takes the chips that follow a
seed-dependent offset in the order of this key. The key is md5 of the chip key, so it is the
same on any server and for any physical row order, and it needs no column: writers of
`stacchip.chips` (COPY, INSERT … SELECT) stay unaware of it. The function lives here, not in
sql/, because the index depends on it: changing it means a new revision that rebuilds the index.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The first 64 bits of md5(collection|item_id|chip_size|x|y) as a signed bigint: uniform over
    # the bigint range, portable (md5 and text casts of integers do not depend on the server).
    op.execute(
        """
        CREATE OR REPLACE FUNCTION stacchip.chip_sample_key(
            collection text, item_id text, chip_size int, chip_index_x int, chip_index_y int
        )
        RETURNS bigint
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS $$
            SELECT ('x' || substr(md5(
                collection || '|' || item_id || '|' || chip_size::text || '|'
                || chip_index_x::text || '|' || chip_index_y::text
            ), 1, 16))::bit(64)::bigint
        $$
        """
    )
    op.execute(
        "CREATE INDEX chips_sample_key_idx ON stacchip.chips "
        "(stacchip.chip_sample_key(collection, item_id, chip_size, chip_index_x, chip_index_y))"
    )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS stacchip.chips_sample_key_idx")
    op.execute(
        "DROP FUNCTION IF EXISTS stacchip.chip_sample_key(text, text, int, int, int)"
    )
