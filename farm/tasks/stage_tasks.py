"""The Celery tasks: one for each built-in queue and one for any queue a plugin names, all
running the same wrapper."""

from __future__ import annotations

import logging
import random

from celery import Task

from farm import tracing
from farm.errors import FarmError
from farm.tasks import context, dispatch
from farm.tasks.app import ANY_QUEUE_TASK, app
from farm.tasks.runner import StageRun

log = logging.getLogger(__name__)

# Transient faults (S3/DB/Redis down) back off exponentially, capped well under the
# visibility timeout, for about ten minutes in all before the task gives up.
MAX_TRANSIENT_RETRIES = 12
MAX_BACKOFF_S = 60


def _run(task: Task, queue: str, job_id: str, stage: str) -> str:
    """Run the delivered stage, then any next stage of the job that dispatch continues in
    this worker (no broker hop between them, each still its own checkpointed, recorded stage)."""
    ctx, worker, retry = context.current(), task.request.hostname, bool(task.request.retries)
    run = StageRun(ctx, job_id, stage, worker, retry, queue)
    try:
        with tracing.continued(tracing.headers_of(task.request)):
            outcome = run.execute()
    except FarmError as exc:
        if not exc.retryable:
            raise
        raise task.retry(
            exc=exc, countdown=_backoff(task.request.retries), max_retries=MAX_TRANSIENT_RETRIES
        ) from exc
    job = run.job  # known once the delivered stage ran: what a continued stage's retry needs
    while run.continue_with:
        spec, parent = run.continue_with, run.trace_headers
        run = StageRun(ctx, job_id, spec.name, worker, serves=queue)
        try:
            with tracing.continued(parent):
                outcome = run.execute()
        except FarmError as exc:
            if not exc.retryable:
                raise
            # This message's own stage is done, so the continued one gets a message of its
            # own, with its own retry count; with the broker down too, the reconciler sends it.
            log.warning("%s/%s: %s; sending it as its own message", job_id, run.stage, exc)
            with tracing.continued(parent):
                dispatch.send_or_leave(
                    run.sender, job_id, [spec], job.priority, countdown=_backoff(0)
                )
            return "requeued"
    return outcome


def _backoff(retries: int) -> float:
    return min(MAX_BACKOFF_S, 2**retries) * random.uniform(0.5, 1.0)


@app.task(name="farm.cpu.run_stage", bind=True)
def cpu_stage(self: Task, job_id: str, stage: str) -> str:
    return _run(self, "cpu", job_id, stage)


@app.task(name="farm.gpu.run_stage", bind=True)
def gpu_stage(self: Task, job_id: str, stage: str) -> str:
    return _run(self, "gpu", job_id, stage)


@app.task(name=ANY_QUEUE_TASK, bind=True)
def any_queue_stage(self: Task, job_id: str, stage: str) -> str:
    return _run(self, self.request.delivery_info.get("routing_key") or "", job_id, stage)
