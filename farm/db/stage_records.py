"""The fenced statements a worker runs on one stage's record, on a Core connection.

The attempt number taken in ``begin_stage`` is the fencing token: a delivery may commit its
stage only while the record still carries its attempt, so a delivery that lost its lease can
never overwrite the work of the one that replaced it. These run on every stage, so they are
Core statements: the ORM's identity map and flush would cost more than the SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import func, select, update

from farm.db.job_records import mark_cancelled
from farm.db.models import TERMINAL, JobStatus, StageStatus
from farm.db.rows import (
    Conn,
    fenced,
    jobs,
    lock_job,
    mark_queued,
    runs,
    stage_is,
    stage_statuses,
    update_job,
)
from farm.errors import JobNotFound
from farm.pipelines import get_pipeline


@dataclass(frozen=True)
class JobRow:
    """What a stage delivery needs to know of its job."""

    id: str
    pipeline: str
    params: dict
    status: str
    priority: int
    input_key: str | None
    input_offset: int | None  # set when the input is a byte range of a packed object
    input_size: int | None


_JOB_COLUMNS = tuple(jobs.c[name] for name in JobRow.__dataclass_fields__)


class BeginAction(StrEnum):
    RUN = "run"  # this delivery owns the stage now
    SKIP = "skip"  # done already, or the job is over
    CRASHED = "crashed"  # the poison guard tripped: too many deliveries died


@dataclass(frozen=True)
class Begin:
    """The outcome of trying to start a stage delivery."""

    action: BeginAction
    attempt: int = 0
    job: JobRow | None = None


def begin_stage(
    conn: Conn, job_id: str, stage: str, worker: str, max_lost: int, retry: bool = False
) -> Begin:
    """Take the stage for this delivery (attempt + 1) unless it is done or the job is over.
    ``retry``: this delivery is Celery's retry after a transient fault, not a redelivery."""
    job = JobRow(*lock_job(conn, job_id, *_JOB_COLUMNS))
    row = conn.execute(
        select(runs.c.status.label("run_status"), runs.c.attempts, runs.c.lost_runs).where(
            stage_is(job_id, stage)
        )
    ).one_or_none()
    if row is None:
        raise JobNotFound(f"Job {job_id!r} has no stage {stage!r}.")
    if row.run_status == StageStatus.DONE or job.status in TERMINAL:
        return Begin(BeginAction.SKIP, job=job)
    lost = row.lost_runs
    if row.run_status == StageStatus.RUNNING and not retry:
        lost += 1  # the previous delivery started and never finished: its worker died
    if lost >= max_lost:
        conn.execute(update(runs).where(stage_is(job_id, stage)).values(lost_runs=lost))
        return Begin(BeginAction.CRASHED, attempt=row.attempts, job=job)
    attempt = row.attempts + 1
    conn.execute(
        update(runs)
        .where(stage_is(job_id, stage))
        .values(
            status=StageStatus.RUNNING,
            attempts=attempt,
            lost_runs=lost,
            worker=worker,
            started_at=func.now(),
            heartbeat_at=func.now(),
            finished_at=None,
            duration_s=None,
        )
    )
    started = func.coalesce(jobs.c.started_at, func.now())
    update_job(conn, job_id, status=JobStatus.RUNNING, current_stage=stage, started_at=started)
    return Begin(BeginAction.RUN, attempt=attempt, job=job)


def heartbeat(conn: Conn, job_id: str, stage: str, attempt: int) -> bool:
    """Extend the stage's liveness; False when another delivery has taken it over."""
    result = conn.execute(
        update(runs).where(fenced(job_id, stage, attempt)).values(heartbeat_at=func.now())
    )
    return result.rowcount == 1


@dataclass(frozen=True)
class Checkpoint:
    """What a finished stage wrote."""

    key: str
    size: int
    checksum: str
    duration_s: float


class Outcome(StrEnum):
    """What committing a finished stage led to."""

    ADVANCED = "advanced"  # recorded; ``Completed.ready`` are the stages to start next
    FINISHED = "finished"  # recorded, and it was the job's last stage
    FENCED_OUT = "fenced-out"  # another delivery owns the stage now: nothing recorded
    JOB_STOPPED = "job-stopped"  # recorded, but the job was cancelled or failed meanwhile


@dataclass(frozen=True)
class Completed:
    outcome: Outcome
    ready: tuple[str, ...] = ()


def complete_stage(
    conn: Conn, job_id: str, stage: str, attempt: int, checkpoint: Checkpoint
) -> Completed:
    """Commit the stage as done and decide, under the job's lock, which stages became ready
    (each marked queued here, so exactly one committer ever sends a join stage)."""
    job_status, pipeline_name = lock_job(conn, job_id, jobs.c.status, jobs.c.pipeline)
    statuses = stage_statuses(conn, job_id)
    result = conn.execute(
        update(runs)
        .where(fenced(job_id, stage, attempt))
        .values(
            status=StageStatus.DONE,
            finished_at=func.now(),
            duration_s=checkpoint.duration_s,
            artifact_key=checkpoint.key,
            artifact_size=checkpoint.size,
            checksum=checkpoint.checksum,
            error_code=None,
            error_message=None,
        )
    )
    if result.rowcount != 1:
        return Completed(Outcome.FENCED_OUT)
    if job_status in TERMINAL:
        return Completed(Outcome.JOB_STOPPED)  # keep its checkpoint, go no further
    statuses[stage] = StageStatus.DONE
    pipeline = get_pipeline(pipeline_name)
    done = {name for name, status in statuses.items() if status == StageStatus.DONE}
    if len(done) == len(pipeline.stages):
        update_job(
            conn,
            job_id,
            status=JobStatus.DONE,
            output_key=checkpoint.key,
            current_stage=None,
            finished_at=func.now(),
        )
        return Completed(Outcome.FINISHED)
    waiting = (StageStatus.QUEUED, StageStatus.RUNNING)
    ready = [s.name for s in pipeline.ready(done) if statuses[s.name] not in waiting]
    mark_queued(conn, job_id, ready)
    return Completed(Outcome.ADVANCED, tuple(ready))


def fail_stage(
    conn: Conn, job_id: str, stage: str, attempt: int | None, code: str, message: str
) -> None:
    """Fail the stage and its job with a stable code; nothing is retried after this.
    ``attempt`` None: fail it whoever owns it (the poison guard, a bad record)."""
    (job_status,) = lock_job(conn, job_id, jobs.c.status)
    # With an attempt, only while that delivery still owns the stage and it is running: a
    # stage already committed done can never be failed afterwards.
    which = stage_is(job_id, stage) if attempt is None else fenced(job_id, stage, attempt)
    failed = conn.execute(
        update(runs)
        .where(which)
        .values(
            status=StageStatus.FAILED,
            finished_at=func.now(),
            error_code=code,
            error_message=message,
        )
    )
    if failed.rowcount and job_status not in TERMINAL:
        update_job(
            conn,
            job_id,
            status=JobStatus.FAILED,
            error_code=code,
            error_message=message,
            finished_at=func.now(),
        )


def requeue_stage(
    conn: Conn, job_id: str, stage: str, attempt: int, code: str, reason: str
) -> None:
    """A transient fault: the stage goes back to queued and its retry message is on the way.
    ``code`` (a TransientError's) says which service it waits on, ``reason`` why."""
    conn.execute(
        update(runs)
        .where(fenced(job_id, stage, attempt))
        .values(
            status=StageStatus.QUEUED,
            queued_at=func.now(),
            error_code=code,
            error_message=reason,
        )
    )


def cancel_stage(conn: Conn, job_id: str, stage: str, attempt: int) -> None:
    """The running stage saw its job's cancel flag: it and the job end cancelled."""
    mark_cancelled(conn, job_id)  # takes the job's lock first, as everywhere
    conn.execute(
        update(runs)
        .where(fenced(job_id, stage, attempt))
        .values(status=StageStatus.CANCELLED, finished_at=func.now())
    )
