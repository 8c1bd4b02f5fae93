-- stacchip-db SQL files: applied in file-name order by `stacchip-db db init`, every time.
-- Each file must be idempotent (CREATE OR REPLACE, IF NOT EXISTS); tests apply them twice.
-- Contract: objects here live in schema `stacchip`, created by alembic revision 0001.

-- The chip id users see, as the original stacchip's `chipid`: {item_id}-{x}-{y}.
CREATE OR REPLACE FUNCTION stacchip.chip_id(item_id text, chip_index_x int, chip_index_y int)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT item_id || '-' || chip_index_x || '-' || chip_index_y $$;
