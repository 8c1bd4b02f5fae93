"""Indexes on (stratum, sampling key): a stratified sample walks each stratum in seeded order.

`stacchip.sample_chips_stratified` (sql/010_selection.sql) takes each stratum's first k chips in
sampling-key order from the seed's offset. With these indexes that is an ordered walk of one
stratum that stops after k matching chips, instead of ranking every matching chip (4 s for a
year-stratified sample of 10,000 from 340,000 matching chips at 10 M chips; 0.4-0.5 s with
them, bench/bench_queries.py). Years and quarters are taken in UTC, as stacchip.chip_stratum
does (`timestamptz AT TIME ZONE 'UTC'` then `date_trunc` on a timestamp: immutable). Sizes at
10 M chips: year and quarter 301 MiB each, collection 387 MiB.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_KEY = "stacchip.chip_sample_key(collection, item_id, chip_size, chip_index_x, chip_index_y)"
_INDEXES = {
    "chips_year_sample_key_idx": f"date_trunc('year', datetime AT TIME ZONE 'UTC'), {_KEY}",
    "chips_quarter_sample_key_idx": f"date_trunc('quarter', datetime AT TIME ZONE 'UTC'), {_KEY}",
    "chips_collection_sample_key_idx": f"collection, {_KEY}",
}


def upgrade() -> None:
    for name, columns in _INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON stacchip.chips ({columns})")


def downgrade() -> None:
    for name in _INDEXES:
        op.execute(f"DROP INDEX IF EXISTS stacchip.{name}")
