"""stacchip.query_login: the restricted login that user SQL runs as (sql/020_query_login.sql).

One row: the database it was made for (its oid, so a copy made with CREATE DATABASE … TEMPLATE
can tell the row is its template's), the role and its password. Readable only by its owner,
the login that runs `db init` (and superusers); never granted to the restricted role itself.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE stacchip.query_login (
            one boolean PRIMARY KEY DEFAULT true CHECK (one),
            database_oid oid NOT NULL,
            role name NOT NULL,
            password text NOT NULL
        )
        """
    )
    op.execute("REVOKE ALL ON stacchip.query_login FROM PUBLIC")


def downgrade() -> None:
    op.execute("DROP TABLE stacchip.query_login")
