"""stage_runs.rebuilds: how often a done stage was re-run because its checkpoint was lost

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 23:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The server default fills the rows that exist; new rows get their value from the farm.
    op.add_column(
        "stage_runs", sa.Column("rebuilds", sa.Integer(), nullable=False, server_default="0")
    )
    op.alter_column("stage_runs", "rebuilds", server_default=None)


def downgrade() -> None:
    op.drop_column("stage_runs", "rebuilds")
