"""Run a job's stages in this process, without Celery: the in-process runner.

Like rq's SimpleWorker or dramatiq's stub worker, but against the real Postgres, Redis and
artifact store: every stage goes through the same ``StageRun`` a worker uses (lease, attempt,
checkpoint, fenced record), only the "send" of dispatch puts the next stages on a local queue
instead of the broker. ``farm debug-run JOB`` uses it to reproduce a failure in the
foreground; tests of the runner use it directly.
"""

from __future__ import annotations

import os

from farm.db.job_records import get_job, queued_and_ready
from farm.db.session import session_scope
from farm.pipelines import StageSpec
from farm.tasks.context import Context
from farm.tasks.dispatch import InlineSender
from farm.tasks.runner import StageRun


def run_job_inline(ctx: Context, job_id: str, worker: str | None = None) -> list[tuple[str, str]]:
    """Run every stage of the job that is queued and ready, and what they lead to, until
    nothing is left to run here. Returns (stage, outcome) in the order they ran. Transient
    errors (a service down) are raised, not retried."""
    worker = worker or f"inline@{os.uname().nodename}"
    sender = InlineSender()
    sender.pending.extend(spec.name for spec in _queued_and_ready(ctx, job_id))
    ran = []
    while sender.pending:
        stage = sender.pending.popleft()
        outcome = StageRun(ctx, job_id, stage, worker, sender=sender).execute()
        ran.append((stage, outcome))
    return ran


def _queued_and_ready(ctx: Context, job_id: str) -> list[StageSpec]:
    with session_scope(ctx.db_url) as s:
        return queued_and_ready(get_job(s, job_id))
