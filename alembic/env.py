"""Alembic environment for stacchip-db.

Runs only on a live connection handed over by `stacchip_db.db.migrate` (no alembic.ini, no
URL here), keeps its version table in schema `stacchip`, and never looks at other schemas
(pgstac's, PostGIS's `spatial_ref_sys`): those belong to their own installers.
"""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=None,
    version_table_schema="stacchip",
    include_schemas=False,
)
with context.begin_transaction():
    context.run_migrations()
