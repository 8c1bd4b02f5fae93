"""stacchip.jobs: what each processor job did, so operators can find and re-run failures.

One row per (processor, sample source, job index); a re-run updates its row.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("processor", sa.Text, nullable=False),
        sa.Column("sample_source", sa.Text, nullable=False),
        sa.Column("job_index", sa.Integer, nullable=False),
        sa.Column("target", sa.Text, nullable=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("scenes", postgresql.JSONB, nullable=False, server_default=sa.text("'[]'")),
        sa.Column("timings", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'")),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
        sa.Column("host", sa.Text, nullable=True),
        sa.Column(
            "started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("processor", "sample_source", "job_index", name="jobs_job_key"),
        sa.CheckConstraint(
            "status IN ('running', 'succeeded', 'failed')", name="jobs_status_known"
        ),
        schema="stacchip",
    )
    op.create_index("jobs_status_idx", "jobs", ["processor", "status"], schema="stacchip")


def downgrade() -> None:
    op.drop_table("jobs", schema="stacchip")
