"""stage_runs.model_calls, jobs_per_call: how a stage shared the GPU with other jobs' stages

A GPU engine may batch several jobs' model calls (UNet, VAE, text encoder) into one call per
tick. A stage's record keeps how many such calls its last successful attempt took part in and
the mean number of jobs in them. Null: the stage made no batched model calls (a cpu stage, or
a worker without the engine), which is what every stage recorded before this revision made.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 04:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("stage_runs", sa.Column("model_calls", sa.Integer()))
    op.add_column("stage_runs", sa.Column("jobs_per_call", sa.Float()))


def downgrade() -> None:
    op.drop_column("stage_runs", "jobs_per_call")
    op.drop_column("stage_runs", "model_calls")
