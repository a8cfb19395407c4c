"""Send stage messages. A message carries (job_id, stage) and nothing else."""

from __future__ import annotations

import logging

from kombu.exceptions import KombuError, OperationalError

from farm.errors import MetadataError
from farm.pipelines import get_pipeline
from farm.tasks.app import TASK_FOR_QUEUE, app, celery_priority

log = logging.getLogger(__name__)


def send_stage(
    job_id: str,
    pipeline: str,
    stage: str,
    priority: int,
    producer=None,
    countdown: float | None = None,
) -> None:
    """``producer``: reuse one broker connection across many sends (a folder's chunk).
    ``countdown``: seconds before a worker may run it (a retry's backoff)."""
    queue = get_pipeline(pipeline).stage(stage).queue
    try:
        app.send_task(
            TASK_FOR_QUEUE[queue],
            args=(job_id, stage),
            queue=queue,
            priority=celery_priority(priority),
            producer=producer,
            countdown=countdown,
            retry=True,
            retry_policy={"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5},
        )
    except OperationalError as exc:
        raise MetadataError(f"The broker is unreachable ({exc.__class__.__name__})") from exc


def send_stages(
    job_id: str, pipeline: str, stages: list[str], priority: int, producer=None
) -> None:
    for stage in stages:
        send_stage(job_id, pipeline, stage, priority, producer)


def send_many(pipeline: str, jobs: list[tuple[str, list[str]]], priority: int) -> None:
    """Many jobs' first messages over one connection, in one pipelined round trip. Should
    the batch fail (delivery of its messages is then uncertain), they are sent again one by
    one with the usual retries: a message that arrives twice is a no-op by design."""
    try:
        with app.producer_or_acquire() as producer, producer.batch():
            for job_id, stages in jobs:
                send_stages(job_id, pipeline, stages, priority, producer)
    except (KombuError, MetadataError) as exc:
        log.warning("batched send of %d jobs failed (%s); sending one by one", len(jobs), exc)
        for job_id, stages in jobs:
            send_stages(job_id, pipeline, stages, priority)
