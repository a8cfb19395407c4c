"""jobs.input_offset, jobs.input_size: where a packed input's bytes are in its object

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 08:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("input_offset", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("input_size", sa.Integer(), nullable=True))


def downgrade() -> None:
    packed = sa.text("SELECT count(*) FROM jobs WHERE input_size IS NOT NULL")
    if op.get_bind().execute(packed).scalar():
        # Without their ranges these jobs would read a whole pack as their input.
        raise RuntimeError("jobs with packed inputs exist; finish or delete them first")
    op.drop_column("jobs", "input_size")
    op.drop_column("jobs", "input_offset")
