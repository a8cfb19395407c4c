"""batch_jobs: a job belongs to every batch that submitted its input

Generated from the models (alembic revision --autogenerate), then the backfill added: every
job keeps the batch it was recorded in, its path there being its stored name (names that were
not UTF-8 were stored with U+FFFD, the best that is left of them).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 22:54:54
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "batch_jobs",
        sa.Column("batch_id", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("input_path", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batches.id"],
            name=op.f("fk_batch_jobs_batch_id_batches"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_batch_jobs_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("batch_id", "job_id", name=op.f("pk_batch_jobs")),
    )
    op.create_index(op.f("ix_batch_jobs_job_id"), "batch_jobs", ["job_id"], unique=False)
    op.execute(
        "INSERT INTO batch_jobs (batch_id, job_id, input_path) "
        "SELECT batch_id, id, convert_to(coalesce(input_name, id), 'UTF8') "
        "FROM jobs WHERE batch_id IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_batch_jobs_job_id"), table_name="batch_jobs")
    op.drop_table("batch_jobs")
