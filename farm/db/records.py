"""Job-record operations: every state change of jobs and stage runs, each one transaction.

The attempt number taken in ``begin_stage`` is the fencing token: a delivery may commit its
stage only while the record still carries its attempt, so a delivery that lost its lease can
never overwrite the work of the one that replaced it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.orm import Session, joinedload

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
    input_offset: int | None = None  # a packed input's byte range in ``input_key``
    input_size: int | None = None


def create_batch(session: Session, source: str | None, params: dict) -> Batch:
    batch = Batch(id=new_id(), source=source, params=params)
    session.add(batch)
    return batch


def insert_jobs(
    session: Connection | Session,
    pipeline: Pipeline,
    jobs: list[NewJob],
    failures: dict[str, FarmError],
) -> list[str]:
    """Insert jobs of one pipeline, each with one record per stage, in two statements (jobs,
    then their stage records). Jobs in ``failures`` are recorded as failed at submit; the
    others get their first stages queued. Returns the ids of the jobs to enqueue. Core
    statements: the ORM's per-object bookkeeping would cost more than the database itself."""
    if not jobs:
        return []
    # The database's clock, as everywhere else (the reconciler compares queued_at with it).
    now = session.execute(select(func.now())).scalar_one()
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
        "input_offset": new.input_offset,
        "input_size": new.input_size,
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
    """The job with its stage records (``lock``: the job row FOR UPDATE first)."""
    if lock:
        _lock_job(session, job_id, _jobs.c.id)
    query = select(Job).where(Job.id == job_id).options(joinedload(Job.stage_runs))
    job = session.scalars(query).unique().one_or_none()
    if job is None:
        raise JobNotFound(f"No job with id {job_id!r}.")
    return job


def _lock_job(conn: Connection | Session, job_id: str, *columns):
    """Take the job's row lock, under which its stage records change, and return ``columns``
    of it. Its own statement on purpose: a FOR UPDATE that waits for the lock re-reads the
    locked row only, so stage rows joined into it would be the ones from before the wait
    (READ COMMITTED); a statement after it sees what the previous holder committed."""
    row = conn.execute(select(*columns).where(_jobs.c.id == job_id).with_for_update()).first()
    if row is None:
        raise JobNotFound(f"No job with id {job_id!r}.")
    return row


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


@dataclass(frozen=True)
class Begin:
    """The outcome of trying to start a stage delivery."""

    action: str  # "run", "skip" (done / job over), or "crashed" (poison guard tripped)
    attempt: int = 0
    job: JobRow | None = None


# Begin and complete run on every stage, so they are Core statements on the tables (they
# also accept an ORM Session): the ORM's identity map and flush cost more than the SQL.
_jobs, _runs = Job.__table__, StageRun.__table__
_JOB_COLUMNS = tuple(_jobs.c[name] for name in JobRow.__dataclass_fields__)


def begin_stage(
    conn: Connection | Session,
    job_id: str,
    stage: str,
    worker: str,
    max_lost: int,
    retry: bool = False,
) -> Begin:
    """Take the stage for this delivery (attempt + 1) unless it is done or the job is over.
    ``retry``: this delivery is Celery's retry after a transient fault, not a redelivery."""
    job = JobRow(*_lock_job(conn, job_id, *_JOB_COLUMNS))
    row = conn.execute(
        select(_runs.c.status.label("run_status"), _runs.c.attempts, _runs.c.lost_runs).where(
            _stage_is(job_id, stage)
        )
    ).one_or_none()
    if row is None:
        raise JobNotFound(f"Job {job_id!r} has no stage {stage!r}.")
    if row.run_status == StageStatus.DONE or job.status in TERMINAL:
        return Begin("skip", job=job)
    lost = row.lost_runs
    if row.run_status == StageStatus.RUNNING and not retry:
        lost += 1  # the previous delivery started and never finished: its worker died
    if lost >= max_lost:
        conn.execute(update(_runs).where(_stage_is(job_id, stage)).values(lost_runs=lost))
        return Begin("crashed", attempt=row.attempts, job=job)
    attempt = row.attempts + 1
    conn.execute(
        update(_runs)
        .where(_stage_is(job_id, stage))
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
    _update_job(
        conn,
        job_id,
        status=JobStatus.RUNNING,
        current_stage=stage,
        started_at=func.coalesce(_jobs.c.started_at, func.now()),
    )
    return Begin("run", attempt=attempt, job=job)


def heartbeat(session: Connection | Session, job_id: str, stage: str, attempt: int) -> bool:
    """Extend the stage's liveness; False when another delivery has taken it over."""
    result = session.execute(
        update(_runs).where(_fenced(job_id, stage, attempt)).values(heartbeat_at=func.now())
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
    conn: Connection | Session, job_id: str, stage: str, attempt: int, checkpoint: Checkpoint
) -> list[str] | None:
    """Commit the stage as done; return the stages to enqueue next ([] when the job finished),
    or None when this delivery no longer holds the stage (fenced out) or the job was stopped."""
    job_status, pipeline_name = _lock_job(conn, job_id, _jobs.c.status, _jobs.c.pipeline)
    statuses = dict(
        conn.execute(select(_runs.c.stage, _runs.c.status).where(_runs.c.job_id == job_id)).all()
    )
    result = conn.execute(
        update(_runs)
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
    if result.rowcount != 1 or job_status in TERMINAL:
        return None  # fenced out, or cancelled while it ran: keep its checkpoint, go no further
    statuses[stage] = StageStatus.DONE
    return _advance(conn, job_id, get_pipeline(pipeline_name), statuses, checkpoint.key)


def _advance(
    conn: Connection | Session, job_id: str, pipeline: Pipeline, statuses: dict, last_key: str
) -> list[str]:
    done = {name for name, status in statuses.items() if status == StageStatus.DONE}
    if len(done) == len(pipeline.stages):
        _update_job(
            conn,
            job_id,
            status=JobStatus.DONE,
            output_key=last_key,
            current_stage=None,
            finished_at=func.now(),
        )
        return []
    waiting = (StageStatus.QUEUED, StageStatus.RUNNING)
    to_send = [s.name for s in pipeline.ready(done) if statuses[s.name] not in waiting]
    _mark_queued(conn, job_id, to_send)
    return to_send


def _mark_queued(conn: Connection | Session, job_id: str, stages: list[str]) -> None:
    """Record that these stages' messages are about to be sent."""
    if stages:
        conn.execute(
            update(_runs)
            .where(_runs.c.job_id == job_id, _runs.c.stage.in_(stages))
            .values(
                status=StageStatus.QUEUED,
                queued_at=func.now(),
                error_code=None,
                error_message=None,
            )
        )


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
        update(_runs)
        .where(_fenced(job_id, stage, attempt))
        .values(
            status=StageStatus.QUEUED,
            queued_at=func.now(),
            error_code="TRANSIENT",
            error_message=reason,
        )
    )


def cancel_stage(session: Session, job_id: str, stage: str, attempt: int) -> None:
    _lock_job(session, job_id, _jobs.c.id)  # the job first, as everywhere (no lock cycles)
    session.execute(
        update(_runs)
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
    session.flush()  # the ORM's changes above first: the Core update below must come after
    _mark_queued(session, job_id, ready)
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


def _update_job(conn: Connection | Session, job_id: str, **values) -> None:
    conn.execute(update(_jobs).where(_jobs.c.id == job_id).values(**values))


def _stage_is(job_id: str, stage: str):
    return (_runs.c.job_id == job_id) & (_runs.c.stage == stage)


def _fenced(job_id: str, stage: str, attempt: int):
    return (
        _stage_is(job_id, stage)
        & (_runs.c.attempts == attempt)
        & (_runs.c.status == StageStatus.RUNNING)
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
    for job_id in sorted({job_id for job_id, _ in pairs}):  # jobs first, in one order
        _lock_job(session, job_id, _jobs.c.id)
    for job_id, stage in pairs:
        session.execute(
            update(StageRun)
            .where(StageRun.job_id == job_id, StageRun.stage == stage)
            .where(StageRun.status == StageStatus.QUEUED)
            .values(queued_at=func.now())
        )
