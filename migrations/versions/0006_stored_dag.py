"""stage_runs.op, after_stages, content_type: each job stores the DAG it runs

A pipeline may build its DAG from the job's parameters at submit (N branches), so the job keeps
what was built: each stage record names its stage function (op), the stages it reads
(after_stages) and, once done, the content type of its checkpoint. Existing jobs ran the
built-in linear pipelines, whose DAGs are filled in here: each stage after the one before it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 02:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What the built-in pipelines ran under each stage name when this revision was written.
FILL_OP = """
UPDATE stage_runs AS r SET op = CASE
    WHEN j.pipeline = 'noop' THEN 'noop'
    WHEN j.pipeline = 'txt2img' AND r.stage = 'noise' THEN 'noise_txt2img'
    ELSE r.stage END
FROM jobs AS j WHERE j.id = r.job_id
"""
FILL_AFTER = """
UPDATE stage_runs AS r SET after_stages = COALESCE(
    (SELECT jsonb_build_array(p.stage) FROM stage_runs AS p
     WHERE p.job_id = r.job_id AND p.position = r.position - 1),
    '[]'::jsonb)
"""
FILL_CONTENT_TYPE = """
UPDATE stage_runs SET content_type = CASE
    WHEN artifact_key LIKE '%.png' THEN 'image/png'
    ELSE 'application/x-farm-tensors+zstd' END
WHERE artifact_key IS NOT NULL
"""


def upgrade() -> None:
    op.add_column("stage_runs", sa.Column("op", sa.String(64)))
    op.add_column("stage_runs", sa.Column("after_stages", postgresql.JSONB()))
    op.add_column("stage_runs", sa.Column("content_type", sa.String(128)))
    op.execute(FILL_OP)
    op.execute(FILL_AFTER)
    op.execute(FILL_CONTENT_TYPE)
    op.alter_column("stage_runs", "op", nullable=False)
    op.alter_column("stage_runs", "after_stages", nullable=False)


def downgrade() -> None:
    op.drop_column("stage_runs", "content_type")
    op.drop_column("stage_runs", "after_stages")
    op.drop_column("stage_runs", "op")
