"""Job-record operations of the submitting side: record, find, resume and cancel jobs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import delete, exists, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, joinedload

from farm.db.models import TERMINAL, Batch, BatchJob, Job, JobStatus, StageStatus
from farm.db.rows import (
    SPEC_COLUMNS,
    Conn,
    job_dag,
    jobs,
    lock_job,
    mark_queued,
    queue_rebuild,
    runs,
    spec_of,
    stage_statuses,
    update_job,
)
from farm.errors import FarmError, JobNotFound, NotResumable
from farm.pipelines import Pipeline, StageSpec, ready

if TYPE_CHECKING:
    from farm.storage.metadata import Metadata


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
    # The DAG the pipeline built for this job (``Pipeline.dag``); None: its fixed one.
    stages: tuple[StageSpec, ...] | None = None


def create_batch(session: Session, source: str | None, params: dict) -> Batch:
    batch = Batch(id=new_id(), source=source, params=params)
    session.add(batch)
    return batch


def join_batch(conn: Conn, batch_id: str, paths: dict[str, bytes]) -> None:
    """Make these jobs (job id -> its input's path in the folder) members of the batch."""
    if paths:
        rows = [
            {"batch_id": batch_id, "job_id": job_id, "input_path": path}
            for job_id, path in sorted(paths.items())
        ]
        conn.execute(pg_insert(BatchJob.__table__).on_conflict_do_nothing(), rows)


def insert_jobs(
    conn: Conn, pipeline: Pipeline, new_jobs: list[NewJob], failures: dict[str, FarmError]
) -> set[str]:
    """Insert jobs of one pipeline, each with one record per stage of its DAG, in two
    statements (jobs, then their stage records). Jobs in ``failures`` are recorded as failed
    at submit; the others get their first stages queued. A job whose idempotency key is
    recorded already (another submitter's, maybe committed just now) is not inserted.
    Returns the ids of the jobs inserted. Core statements: the ORM's per-object bookkeeping
    would cost more than the database itself."""
    if not new_jobs:
        return set()
    # The database's clock, as everywhere else (the reconciler compares queued_at with it).
    now = conn.execute(select(func.now())).scalar_one()
    # Keys in one order, so two submitters inserting the same keys wait on each other, never
    # deadlock; a key taken meanwhile waits for its holder's commit, then is skipped.
    rows = sorted(
        (_job_row(new, failures.get(new.job_id), now) for new in new_jobs),
        key=lambda row: row["idempotency_key"] or "",
    )
    statement = (
        pg_insert(jobs)
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(jobs.c.id)
    )
    inserted = set(conn.execute(statement, rows).scalars())
    if inserted:
        # Table-level inserts: one multi-row statement (the ORM would split rows by shape).
        conn.execute(
            insert(runs),
            [
                row
                for new in new_jobs
                if new.job_id in inserted
                for row in _stage_rows(new, new.stages or pipeline.stages, failures, now)
            ],
        )
    return inserted


def delete_jobs(conn: Conn, job_ids: list[str]) -> None:
    """Remove jobs a failed submit recorded but never sent (their stage records cascade)."""
    conn.execute(delete(jobs).where(jobs.c.id.in_(job_ids)))


def drop_batch_if_empty(conn: Conn, batch_id: str) -> int:
    """How many jobs the batch holds; a batch that holds none is removed."""
    member = BatchJob.batch_id == batch_id
    count = conn.execute(select(func.count()).select_from(BatchJob).where(member)).scalar_one()
    if not count:
        holds_none = ~exists().where(member)  # none joined meanwhile
        conn.execute(delete(Batch).where(Batch.id == batch_id, holds_none))
    return count


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


def _stage_rows(
    new: NewJob, dag: tuple[StageSpec, ...], failures: dict[str, FarmError], now: datetime
) -> list[dict]:
    """The job's DAG as its stage records; the first stages queued unless it failed at submit."""
    first = set() if new.job_id in failures else {spec.name for spec in ready(dag, ())}
    return [_stage_row(new.job_id, i, spec, spec.name in first, now) for i, spec in enumerate(dag)]


def _stage_row(job_id: str, position: int, spec: StageSpec, queued: bool, now: datetime) -> dict:
    return {
        "job_id": job_id,
        "stage": spec.name,
        "position": position,
        "queue": spec.queue,
        "op": spec.op,
        "after_stages": list(spec.after),
        "status": StageStatus.QUEUED if queued else StageStatus.PENDING,
        "attempts": 0,
        "lost_runs": 0,
        "rebuilds": 0,
        "queued_at": now if queued else None,
    }


def get_job(session: Session, job_id: str) -> Job:
    """The job with its stage records."""
    query = select(Job).where(Job.id == job_id).options(joinedload(Job.stage_runs))
    job = session.scalars(query).unique().one_or_none()
    if job is None:
        raise JobNotFound(f"No job with id {job_id!r}.")
    return job


def find_by_idempotency_key(session: Session, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.idempotency_key == key)).one_or_none()


def done_stages(job: Job) -> set[str]:
    return {run.stage for run in job.stage_runs if run.status == StageStatus.DONE}


def mark_cancelled(conn: Conn, job_id: str) -> bool:
    """Cancel the job unless it already ended; True if it is cancelled now."""
    (status,) = lock_job(conn, job_id, jobs.c.status)
    if status in TERMINAL:
        return status == JobStatus.CANCELLED
    update_job(
        conn,
        job_id,
        status=JobStatus.CANCELLED,
        error_code="JOB_CANCELLED",
        error_message="Cancelled by request.",
        finished_at=func.now(),
    )
    conn.execute(
        update(runs)
        .where(runs.c.job_id == job_id)
        .where(runs.c.status.in_([StageStatus.PENDING, StageStatus.QUEUED]))
        .values(status=StageStatus.CANCELLED)
    )
    return True


def reopen(conn: Conn, meta: Metadata, job_id: str) -> tuple[int, list[StageSpec]]:
    """Reopen a failed or cancelled job: every stage not done, in every branch, goes back to
    pending, and the ready ones are marked queued and returned, with the job's priority. Done
    stages keep their records and are not re-run. NotResumable for any other job: resuming a
    running one would throw its running stage's work away.

    The one way every path (resume, a folder rendered again, debug-run) reopens a job, because
    each must also clear the job's cancel flag, or its first stage would find the old flag and
    cancel it again. Cleared under the job's lock, before the commit, so no delivery of the
    reopened job can find the old flag."""
    status, priority = lock_job(conn, job_id, jobs.c.status, jobs.c.priority)
    _check_resumable(job_id, status, stage_statuses(conn, job_id))
    conn.execute(
        update(runs)
        .where(runs.c.job_id == job_id, runs.c.status != StageStatus.DONE)
        .values(status=StageStatus.PENDING, lost_runs=0)
    )
    # A store that kept losing a checkpoint failed the job; once the user fixed it, its
    # rebuilds start from zero again, or the first loss would give up at once.
    conn.execute(update(runs).where(runs.c.job_id == job_id).values(rebuilds=0))
    update_job(
        conn,
        job_id,
        status=JobStatus.QUEUED,
        error_code=None,
        error_message=None,
        finished_at=None,
    )
    dag = job_dag(conn, job_id)
    done = {name for name, state in dag.items() if state.status == StageStatus.DONE}
    now_ready = ready([state.spec for state in dag.values()], done)
    mark_queued(conn, job_id, [spec.name for spec in now_ready])
    meta.clear_cancel(job_id)
    return priority, now_ready


def reopen_output(
    conn: Conn, meta: Metadata, job_id: str, error: FarmError
) -> tuple[int, list[StageSpec]]:
    """A done job whose stored output is gone or changed: the stage that wrote it goes back to
    queued (and reads its own input, rebuilding further up if that is lost too). Returns the
    priority and the stage to send. NotResumable if the job is no longer done
    (another client reopened it first). Clears the cancel flag as ``reopen`` does (a cancel
    asked for after the job was done still set it)."""
    status, priority, output_key = lock_job(
        conn, job_id, jobs.c.status, jobs.c.priority, jobs.c.output_key
    )
    if status != JobStatus.DONE:
        raise NotResumable(f"job {job_id} is {status}; its output is being rendered again.")
    query = select(*SPEC_COLUMNS).where(runs.c.job_id == job_id, runs.c.artifact_key == output_key)
    spec = spec_of(conn.execute(query).one())
    stage = spec.name
    queue_rebuild(conn, job_id, stage, error)
    update_job(
        conn,
        job_id,
        status=JobStatus.QUEUED,
        output_key=None,
        current_stage=stage,
        finished_at=None,
    )
    meta.clear_cancel(job_id)
    return priority, [spec]


def _check_resumable(job_id: str, status: str, stages: dict[str, str]) -> None:
    if status == JobStatus.DONE:
        raise NotResumable(f"job {job_id} is done; there is nothing to resume.")
    if status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise NotResumable(
            f"job {job_id} is {status}; resume takes failed or cancelled jobs "
            f"(wait for it, or `farm cancel {job_id}` first)."
        )
    running = [stage for stage, s in stages.items() if s == StageStatus.RUNNING]
    if running:  # cancelled, but the stage stops only at its next step: resuming now would
        # reopen it under the delivery still running it, and that delivery's work would be lost
        raise NotResumable(
            f"job {job_id} is {status} but its {running[0]} stage is still stopping; "
            "try again in a few seconds."
        )


def queued_and_ready(job: Job) -> list[StageSpec]:
    """Stages recorded as queued whose inputs are done: the ones a message should be out for
    (the reconciler and a redelivered stage re-send them; the in-process runner runs them)."""
    queued = [spec_of(r) for r in job.stage_runs if r.status == StageStatus.QUEUED]
    return ready(queued, done_stages(job))
