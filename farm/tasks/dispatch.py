"""Send stage messages. A message carries (job_id, stage) and nothing else."""

from __future__ import annotations

from kombu.exceptions import OperationalError

from farm.errors import MetadataError
from farm.pipelines import get_pipeline
from farm.tasks.app import TASK_FOR_QUEUE, app, celery_priority


def send_stage(job_id: str, pipeline: str, stage: str, priority: int, producer=None) -> None:
    """``producer``: reuse one broker connection across many sends (a folder's chunk)."""
    queue = get_pipeline(pipeline).stage(stage).queue
    try:
        app.send_task(
            TASK_FOR_QUEUE[queue],
            args=(job_id, stage),
            queue=queue,
            priority=celery_priority(priority),
            producer=producer,
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
