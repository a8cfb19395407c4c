"""Job-record operations: every state change of jobs and stage runs, each one transaction.

The attempt number taken in ``begin_stage`` is the fencing token: a delivery may commit its
stage only while the record still carries its attempt, so a delivery that lost its lease can
never overwrite the work of the one that replaced it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session, joinedload
from sqlalchemy.orm.attributes import set_committed_value

from farm.db.models import TERMINAL, Batch, Job, JobStatus, StageRun, StageStatus
from farm.errors import FarmError, JobNotFound
from farm.pipelines import Pipeline, get_pipeline


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class NewJob:
    """What submit() records before anything is enqueued."""

    pipeline: str
    params: dict
    priority: int = 5
    batch_id: str | None = None
    input_name: str | None = None
    input_key: str | None = None
    idempotency_key: str | None = None
    job_id: str | None = None


def create_batch(session: Session, source: str | None, params: dict) -> Batch:
    batch = Batch(id=new_id(), source=source, params=params)
    session.add(batch)
    return batch


def create_job(session: Session, new: NewJob) -> Job:
    """Insert the job and one pending record per stage of its pipeline."""
    pipeline = get_pipeline(new.pipeline)
    job = Job(
        id=new.job_id or new_id(),
        pipeline=pipeline.name,
        params=new.params,
        status=JobStatus.QUEUED,
        priority=new.priority,
        batch_id=new.batch_id,
        input_name=new.input_name,
        input_key=new.input_key,
        idempotency_key=new.idempotency_key,
    )
    job.stage_runs = [
        StageRun(stage=spec.name, position=i, queue=spec.queue, status=StageStatus.PENDING)
        for i, spec in enumerate(pipeline.stages)
    ]
    session.add(job)
    return job


def insert_jobs(
    session: Session, pipeline: Pipeline, jobs: list[NewJob], failures: dict[str, FarmError]
) -> list[str]:
    """Insert many jobs of one pipeline in two statements (jobs, then their stage records).
    Jobs in ``failures`` are recorded as failed at submit; the others get their first
    stages queued. Returns the ids of the jobs to enqueue. What a folder submit uses: the
    ORM's per-object bookkeeping would cost more than the database itself."""
    if not jobs:
        return []
    now = datetime.now(UTC)
    first = {spec.name for spec in pipeline.ready(())}
    # Table-level inserts: one multi-row statement each (the ORM would split rows by shape).
    rows = [_job_row(new, failures.get(new.job_id), now) for new in jobs]
    session.execute(insert(Job.__table__), rows)
    session.execute(
        insert(StageRun.__table__),
        [
            _stage_row(new.job_id, i, spec, spec.name in first and new.job_id not in failures, now)
            for new in jobs
            for i, spec in enumerate(pipeline.stages)
        ],
    )
    return [new.job_id for new in jobs if new.job_id not in failures]


def _job_row(new: NewJob, error: FarmError | None, now: datetime) -> dict:
    return {
        "id": new.job_id,
        "pipeline": new.pipeline,
        "params": new.params,
        "status": JobStatus.FAILED if error else JobStatus.QUEUED,
        "priority": new.priority,
        "batch_id": new.batch_id,
        "input_name": new.input_name,
        "input_key": new.input_key,
        "idempotency_key": new.idempotency_key,
        "error_code": error.code if error else None,
        "error_message": error.message if error else None,
        "finished_at": now if error else None,
    }


def _stage_row(job_id: str, position: int, spec, queued: bool, now: datetime) -> dict:
    return {
        "job_id": job_id,
        "stage": spec.name,
        "position": position,
        "queue": spec.queue,
        "status": StageStatus.QUEUED if queued else StageStatus.PENDING,
        "attempts": 0,
        "lost_runs": 0,
        "queued_at": now if queued else None,
    }


def get_job(session: Session, job_id: str, *, lock: bool = False) -> Job:
    """The job with its stage records, in one query (``lock``: the job row FOR UPDATE)."""
    query = select(Job).where(Job.id == job_id).options(joinedload(Job.stage_runs))
    if lock:
        query = query.with_for_update(of=Job)
    job = session.scalars(query).unique().one_or_none()
    if job is None:
        raise JobNotFound(f"No job with id {job_id!r}.")
    return job


def find_by_idempotency_key(session: Session, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.idempotency_key == key)).one_or_none()


def stage_run(session: Session, job_id: str, stage: str, *, lock: bool = False) -> StageRun:
    query = select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == stage)
    return session.scalars(query.with_for_update() if lock else query).one()


def _run_of(job: Job, stage: str) -> StageRun:
    return next(run for run in job.stage_runs if run.stage == stage)


def done_stages(job: Job) -> set[str]:
    return {run.stage for run in job.stage_runs if run.status == StageStatus.DONE}


def queued_and_ready(job: Job) -> list[str]:
    """Stages recorded as queued whose inputs are done: their messages may have been lost."""
    ready = {spec.name for spec in get_pipeline(job.pipeline).ready(done_stages(job))}
    return [r.stage for r in job.stage_runs if r.status == StageStatus.QUEUED and r.stage in ready]


def mark_queued(session: Session, job: Job, stages: list[str]) -> None:
    """Record that these stages' messages are about to be sent."""
    for run in job.stage_runs:
        if run.stage in stages:
            run.status = StageStatus.QUEUED
            run.queued_at = func.now()
            run.error_code = run.error_message = None


@dataclass(frozen=True)
class Begin:
    """The outcome of trying to start a stage delivery."""

    action: str  # "run", "skip" (done / job over), or "crashed" (poison guard tripped)
    attempt: int = 0
    job: Job | None = None


def begin_stage(
    session: Session, job_id: str, stage: str, worker: str, max_lost: int, retry: bool = False
) -> Begin:
    """Take the stage for this delivery (attempt + 1) unless it is done or the job is over.
    ``retry``: this delivery is Celery's retry after a transient fault, not a redelivery."""
    job = get_job(session, job_id, lock=True)  # stage records change under the job's lock
    run = _run_of(job, stage)
    if run.status == StageStatus.DONE or job.status in TERMINAL:
        return Begin("skip", job=job)
    if run.status == StageStatus.RUNNING and not retry:
        # The previous delivery started and never finished: its worker died.
        run.lost_runs += 1
    if run.lost_runs >= max_lost:
        return Begin("crashed", attempt=run.attempts, job=job)
    run.attempts += 1
    run.status = StageStatus.RUNNING
    run.worker = worker
    run.started_at = run.heartbeat_at = func.now()
    run.finished_at = run.duration_s = None
    job.status = JobStatus.RUNNING
    job.current_stage = stage
    job.started_at = job.started_at or func.now()
    return Begin("run", attempt=run.attempts, job=job)


def heartbeat(session: Session, job_id: str, stage: str, attempt: int) -> bool:
    """Extend the stage's liveness; False when another delivery has taken it over."""
    result = session.execute(
        update(StageRun).where(_fenced(job_id, stage, attempt)).values(heartbeat_at=func.now())
    )
    return result.rowcount == 1


@dataclass(frozen=True)
class Checkpoint:
    """What a finished stage wrote."""

    key: str
    size: int
    checksum: str
    duration_s: float


def complete_stage(
    session: Session, job_id: str, stage: str, attempt: int, checkpoint: Checkpoint
) -> list[str] | None:
    """Commit the stage as done; return the stages to enqueue next ([] when the job finished),
    or None when this delivery no longer holds the stage (fenced out) or the job was stopped."""
    job = get_job(session, job_id, lock=True)
    result = session.execute(
        update(StageRun)
        .where(_fenced(job_id, stage, attempt))
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
        return None
    # Mirror what the UPDATE wrote without making the ORM write it again.
    set_committed_value(_run_of(job, stage), "status", StageStatus.DONE)
    if job.status in TERMINAL:
        return None  # cancelled while this stage ran: keep its checkpoint, go no further
    return _advance(session, job, get_pipeline(job.pipeline), checkpoint.key)


def _advance(session: Session, job: Job, pipeline: Pipeline, last_key: str) -> list[str]:
    done = done_stages(job)
    if len(done) == len(pipeline.stages):
        job.status = JobStatus.DONE
        job.output_key = last_key
        job.current_stage = None
        job.finished_at = func.now()
        return []
    ready = [s.name for s in pipeline.ready(done)]
    queued_or_running = {
        r.stage for r in job.stage_runs if r.status in (StageStatus.QUEUED, StageStatus.RUNNING)
    }
    to_send = [name for name in ready if name not in queued_or_running]
    mark_queued(session, job, to_send)
    return to_send


def fail_stage(
    session: Session, job_id: str, stage: str, attempt: int | None, code: str, message: str
) -> None:
    """Fail the stage and its job with a stable code; nothing is retried after this."""
    job = get_job(session, job_id, lock=True)  # stage records change under the job's lock
    run = _run_of(job, stage)
    if attempt is not None and run.attempts != attempt:
        return  # a newer delivery owns the stage now
    run.status = StageStatus.FAILED
    run.finished_at = func.now()
    run.error_code, run.error_message = code, message
    if job.status not in TERMINAL:
        job.status = JobStatus.FAILED
        job.error_code, job.error_message = code, message
        job.finished_at = func.now()


def requeue_stage(session: Session, job_id: str, stage: str, attempt: int, reason: str) -> None:
    """A transient fault: the stage goes back to queued and its retry message is on the way."""
    session.execute(
        update(StageRun)
        .where(_fenced(job_id, stage, attempt))
        .values(
            status=StageStatus.QUEUED,
            queued_at=func.now(),
            error_code="TRANSIENT",
            error_message=reason,
        )
    )


def cancel_stage(session: Session, job_id: str, stage: str, attempt: int) -> None:
    session.execute(
        update(StageRun)
        .where(_fenced(job_id, stage, attempt))
        .values(status=StageStatus.CANCELLED, finished_at=func.now())
    )
    mark_cancelled(session, job_id)


def mark_cancelled(session: Session, job_id: str) -> bool:
    """Cancel the job unless it already ended; True if it is cancelled now."""
    job = get_job(session, job_id, lock=True)
    if job.status in TERMINAL:
        return job.status == JobStatus.CANCELLED
    job.status = JobStatus.CANCELLED
    job.error_code, job.error_message = "JOB_CANCELLED", "Cancelled by request."
    job.finished_at = func.now()
    for run in job.stage_runs:
        if run.status in (StageStatus.PENDING, StageStatus.QUEUED):
            run.status = StageStatus.CANCELLED
    return True


def prepare_resume(session: Session, job_id: str) -> tuple[Job, list[str]]:
    """Reopen a failed or cancelled job: every stage not done goes back to pending, and the
    ready ones are returned to enqueue. Done stages keep their records and are not re-run."""
    job = get_job(session, job_id, lock=True)
    if job.status == JobStatus.DONE:
        return job, []
    for run in job.stage_runs:
        if run.status != StageStatus.DONE:
            run.status = StageStatus.PENDING
            run.lost_runs = 0
    job.status = JobStatus.QUEUED
    job.error_code = job.error_message = job.finished_at = None
    pipeline = get_pipeline(job.pipeline)
    ready = [spec.name for spec in pipeline.ready(done_stages(job))]
    mark_queued(session, job, ready)
    return job, ready


def expire_stale_stages(session: Session, ttl_s: float) -> list[tuple[Job, str]]:
    """Stages whose worker stopped beating (database clock): back to queued, counted as lost.
    Returns (job, stage) pairs to re-enqueue."""
    cutoff = func.now() - timedelta(seconds=ttl_s)
    rows = session.execute(
        update(StageRun)
        .where(StageRun.status == StageStatus.RUNNING, StageRun.heartbeat_at < cutoff)
        .where(StageRun.job_id.in_(select(Job.id).where(Job.status == JobStatus.RUNNING)))
        .values(status=StageStatus.QUEUED, lost_runs=StageRun.lost_runs + 1, queued_at=func.now())
        .returning(StageRun.job_id, StageRun.stage)
    ).all()
    jobs = _jobs_by_id(session, [job_id for job_id, _ in rows])
    return [(jobs[job_id], stage) for job_id, stage in rows]


def _jobs_by_id(session: Session, job_ids: list[str]) -> dict[str, Job]:
    if not job_ids:
        return {}
    return {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(job_ids)))}


def _fenced(job_id: str, stage: str, attempt: int):
    return (
        (StageRun.job_id == job_id)
        & (StageRun.stage == stage)
        & (StageRun.attempts == attempt)
        & (StageRun.status == StageStatus.RUNNING)
    )


def stale_queued_stages(session: Session, grace_s: float) -> list[tuple[Job, str]]:
    """Stages of active jobs recorded as queued for longer than ``grace_s``: their message is
    either still waiting in the broker or was lost with it (the reconciler checks which)."""
    cutoff = func.now() - timedelta(seconds=grace_s)
    rows = session.execute(
        select(StageRun.job_id, StageRun.stage)
        .join(Job, Job.id == StageRun.job_id)
        .where(StageRun.status == StageStatus.QUEUED, StageRun.queued_at < cutoff)
        .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
    ).all()
    jobs = _jobs_by_id(session, [job_id for job_id, _ in rows])
    return [(jobs[job_id], stage) for job_id, stage in rows]


def touch_queued(session: Session, pairs: list[tuple[str, str]]) -> None:
    """Record that these stages' messages were just sent again."""
    for job_id, stage in pairs:
        session.execute(
            update(StageRun)
            .where(StageRun.job_id == job_id, StageRun.stage == stage)
            .where(StageRun.status == StageStatus.QUEUED)
            .values(queued_at=func.now())
        )
