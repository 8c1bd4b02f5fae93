"""stacchip.chips.location: the location key of each chip, computed for the rows already stored.

Chips with the same CRS, pixel size, chip size and top-left corner on the pixel grid cover the
same ground the same way, whatever their item or date: they share a location key, the first 64
bits of md5 of a canonical text of those (`stacchip_db.grid.location_text`), a signed bigint
computed in Python by `index_item` when a chip is indexed. Time series (`prechip
--time-series`), samples by place (`sample --by-location`) and the split audit group chips by it.

Existing rows get theirs here, from their pgstac items (the CRS and transform live in the item,
not in the row), in batches of items, so memory does not grow with the table. Rows whose item
is not in pgstac, or has no usable grid, get the hash of their own chip key (as
`stacchip.chip_sample_key`): a location of their own. Then the column becomes NOT NULL and is
indexed, and a trigger gives that same fallback to rows inserted later without a location.
Written for a plain or a partitioned `stacchip.chips` (ADD COLUMN, UPDATE, CREATE INDEX and
row triggers on a partitioned parent reach every partition).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

import numpy as np
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

BATCH_ITEMS = 200
"""Items whose chips are computed and written per UPDATE."""


def upgrade() -> None:
    from stacchip_db.db.items import stored_items
    from stacchip_db.index import chip_locations

    op.execute("ALTER TABLE stacchip.chips ADD COLUMN location bigint")
    conn = op.get_bind().connection.driver_connection  # psycopg: arrays and server cursors
    groups = conn.execute(
        "SELECT DISTINCT collection, item_id, chip_size FROM stacchip.chips "
        "ORDER BY collection, item_id, chip_size"
    ).fetchall()
    for start in range(0, len(groups), BATCH_ITEMS):
        batch = groups[start : start + BATCH_ITEMS]
        items = stored_items(conn, [(g[0], g[1]) for g in batch])
        keys: list[list] = [[], [], [], [], [], []]
        for collection, item_id, chip_size in batch:
            item = items.get((collection, item_id))
            if item is None:
                continue  # no item: the key-hash fallback below
            xs, ys = (
                np.array(column, dtype=np.int64)
                for column in zip(
                    *conn.execute(
                        "SELECT chip_index_x, chip_index_y FROM stacchip.chips "
                        "WHERE collection = %s AND item_id = %s AND chip_size = %s",
                        (collection, item_id, chip_size),
                    ).fetchall(),
                    strict=True,
                )
            )
            locations = chip_locations(item, chip_size, xs, ys)
            keys[0] += [collection] * len(xs)
            keys[1] += [item_id] * len(xs)
            keys[2] += [chip_size] * len(xs)
            keys[3] += xs.tolist()
            keys[4] += ys.tolist()
            keys[5] += locations.tolist()
        if keys[0]:
            conn.execute(
                "UPDATE stacchip.chips AS c SET location = u.location "
                "FROM unnest(%s::text[], %s::text[], %s::int[], %s::int[], %s::int[], "
                "%s::bigint[]) AS u (collection, item_id, chip_size, x, y, location) "
                "WHERE c.collection = u.collection AND c.item_id = u.item_id "
                "AND c.chip_size = u.chip_size AND c.chip_index_x = u.x AND c.chip_index_y = u.y",
                keys,
            )
    op.execute(
        "UPDATE stacchip.chips SET location = stacchip.chip_sample_key(collection, item_id, "
        "chip_size, chip_index_x, chip_index_y) WHERE location IS NULL"
    )
    op.execute("ALTER TABLE stacchip.chips ALTER COLUMN location SET NOT NULL")
    op.execute("CREATE INDEX chips_location_idx ON stacchip.chips (location)")
    # On a partitioned table: its partitions' indexes named as
    # stacchip.create_chip_partition_indexes (0008) names them, `chips_location_idx_p<n>`.
    op.execute(
        """
        DO $$
        DECLARE ix record;
        BEGIN
            FOR ix IN
                SELECT c.oid::regclass AS child, regexp_replace(t.relname, '^chips_', '') AS suffix
                FROM pg_inherits h JOIN pg_class p ON p.oid = h.inhparent
                JOIN pg_class c ON c.oid = h.inhrelid
                JOIN pg_index x ON x.indexrelid = c.oid JOIN pg_class t ON t.oid = x.indrelid
                WHERE p.relnamespace = 'stacchip'::regnamespace
                  AND p.relname = 'chips_location_idx'
            LOOP
                EXECUTE format('ALTER INDEX %s RENAME TO %I', ix.child,
                               'chips_location_idx_' || ix.suffix);
            END LOOP;
        END
        $$
        """
    )
    # Rows written without a location (INSERTs by hand or by other tools, which know no grid)
    # get the key-hash fallback rather than failing the NOT NULL: the trigger's WHEN is checked
    # in C per row, so writers that give the location (every stacchip-db path) pay nothing.
    op.execute(
        """
        CREATE FUNCTION stacchip.chip_location_default() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            NEW.location := stacchip.chip_sample_key(NEW.collection, NEW.item_id,
                NEW.chip_size, NEW.chip_index_x, NEW.chip_index_y);
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER chips_location_default BEFORE INSERT ON stacchip.chips FOR EACH ROW "
        "WHEN (NEW.location IS NULL) EXECUTE FUNCTION stacchip.chip_location_default()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS chips_location_default ON stacchip.chips")
    op.execute("DROP FUNCTION IF EXISTS stacchip.chip_location_default()")
    op.execute("DROP INDEX IF EXISTS stacchip.chips_location_idx")
    op.execute("ALTER TABLE stacchip.chips DROP COLUMN location")
