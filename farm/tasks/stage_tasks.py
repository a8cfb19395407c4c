"""The two Celery tasks: one per queue, both running the same wrapper."""

from __future__ import annotations

import random

from celery import Task

from farm.errors import FarmError
from farm.tasks import context
from farm.tasks.app import app
from farm.tasks.runner import StageRun

# Transient faults (S3/DB/Redis down) back off exponentially, capped well under the
# visibility timeout, for about ten minutes in all before the task gives up.
MAX_TRANSIENT_RETRIES = 12
MAX_BACKOFF_S = 60


def _run(task: Task, queue: str, job_id: str, stage: str) -> str:
    """Run the delivered stage, then any next stage of the job on this same queue (see
    StageRun: no broker hop between them, each still its own checkpointed, recorded stage)."""
    retry = bool(task.request.retries)
    while True:
        run = StageRun(context.current(), job_id, stage, task.request.hostname, retry, queue)
        try:
            outcome = run.execute()
        except FarmError as exc:
            if not exc.retryable:
                raise
            delay = min(MAX_BACKOFF_S, 2**task.request.retries) * random.uniform(0.5, 1.0)
            # The retry is for the stage that hit the fault, which may be a continued one.
            raise task.retry(
                args=(job_id, stage), exc=exc, countdown=delay, max_retries=MAX_TRANSIENT_RETRIES
            ) from exc
        if run.continue_with is None:
            return outcome
        stage, retry = run.continue_with, False


@app.task(name="farm.cpu.run_stage", bind=True)
def cpu_stage(self: Task, job_id: str, stage: str) -> str:
    return _run(self, "cpu", job_id, stage)


@app.task(name="farm.gpu.run_stage", bind=True)
def gpu_stage(self: Task, job_id: str, stage: str) -> str:
    return _run(self, "gpu", job_id, stage)
