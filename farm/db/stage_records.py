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
    SPEC_COLUMNS,
    Conn,
    fenced,
    job_dag,
    jobs,
    lock_job,
    mark_queued,
    queue_rebuild,
    runs,
    spec_of,
    stage_in,
    stage_is,
    update_job,
)
from farm.errors import FarmError, JobNotFound
from farm.pipelines import StageSpec, ready
from farm.storage.kinds import KINDS

# A store that loses a rebuilt checkpoint this often is broken, not unlucky: fail the job then.
MAX_REBUILDS = 3


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
    batch_id: str | None  # the batch that first submitted it (traces carry it)


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
    spec: StageSpec | None = None  # the stage as its job's DAG stores it, when it runs
    inputs: tuple[InputRecord, ...] = ()  # what the stages it reads recorded, when it runs
    lost: bool = False  # the delivery before this one started and never finished


@dataclass(frozen=True)
class InputRecord:
    """The checkpoint of a stage this one reads, as its record describes it."""

    stage: str
    key: str
    size: int | None
    checksum: str | None
    content_type: str | None


def begin_stage(
    conn: Conn, job_id: str, stage: str, worker: str, max_lost: int, retry: bool = False
) -> Begin:
    """Take the stage for this delivery (attempt + 1) unless it is done or the job is over.
    ``retry``: this delivery is Celery's retry after a transient fault, not a redelivery."""
    job = JobRow(*lock_job(conn, job_id, *_JOB_COLUMNS))
    columns = (runs.c.status.label("run_status"), runs.c.attempts, runs.c.lost_runs)
    row = conn.execute(select(*columns, *SPEC_COLUMNS).where(stage_is(job_id, stage))).one_or_none()
    if row is None:
        raise JobNotFound(f"Job {job_id!r} has no stage {stage!r}.")
    if row.run_status == StageStatus.DONE or job.status in TERMINAL:
        return Begin(BeginAction.SKIP, job=job)
    spec = spec_of(row)
    inputs, inputs_done = input_records(conn, job_id, spec.after)
    if row.run_status == StageStatus.QUEUED and not inputs_done:
        # A stage it reads is being rebuilt (another reader found its checkpoint lost): wait
        # as pending; that stage's commit makes this one ready again, under this same lock.
        conn.execute(update(runs).where(stage_is(job_id, stage)).values(status=StageStatus.PENDING))
        return Begin(BeginAction.SKIP, job=job)
    lost = row.lost_runs
    if row.run_status == StageStatus.RUNNING and not retry:
        lost += 1  # the previous delivery started and never finished: its worker died
    was_lost = lost > row.lost_runs
    if lost >= max_lost:
        conn.execute(update(runs).where(stage_is(job_id, stage)).values(lost_runs=lost))
        return Begin(BeginAction.CRASHED, attempt=row.attempts, job=job, spec=spec, lost=was_lost)
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
            model_calls=None,
            jobs_per_call=None,
        )
    )
    started = func.coalesce(jobs.c.started_at, func.now())
    update_job(conn, job_id, status=JobStatus.RUNNING, current_stage=stage, started_at=started)
    return Begin(BeginAction.RUN, attempt, job, spec, inputs, lost=was_lost)


def input_records(
    conn: Conn, job_id: str, stages: tuple[str, ...]
) -> tuple[tuple[InputRecord, ...], bool]:
    """The recorded checkpoints of ``stages``, in that order, and whether all are done."""
    if not stages:
        return (), True
    query = select(
        runs.c.stage,
        runs.c.artifact_key,
        runs.c.artifact_size,
        runs.c.checksum,
        runs.c.content_type,
        runs.c.status,
    )
    rows = {row.stage: row for row in conn.execute(query.where(stage_in(job_id, stages)))}
    records = tuple(InputRecord(*rows[name][:-1]) for name in stages)
    return records, all(row.status == StageStatus.DONE for row in rows.values())


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
    content_type: str = KINDS["tensors"].content_type
    # The batched model calls it took part in and the mean number of jobs per call (a GPU
    # engine's); None: it made none.
    model_calls: int | None = None
    jobs_per_call: float | None = None


class Outcome(StrEnum):
    """What committing a finished stage led to."""

    ADVANCED = "advanced"  # recorded; ``Completed.ready`` are the stages to start next
    FINISHED = "finished"  # recorded, and it was the job's last stage
    FENCED_OUT = "fenced-out"  # another delivery owns the stage now: nothing recorded
    JOB_STOPPED = "job-stopped"  # recorded, but the job was cancelled or failed meanwhile


@dataclass(frozen=True)
class Completed:
    outcome: Outcome
    ready: tuple[StageSpec, ...] = ()


def complete_stage(
    conn: Conn, job_id: str, stage: str, attempt: int, checkpoint: Checkpoint
) -> Completed:
    """Commit the stage as done and decide, under the job's lock, which stages became ready
    (each marked queued here, so exactly one committer ever sends a join stage)."""
    (job_status,) = lock_job(conn, job_id, jobs.c.status)
    dag = job_dag(conn, job_id)
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
            content_type=checkpoint.content_type,
            model_calls=checkpoint.model_calls,
            jobs_per_call=checkpoint.jobs_per_call,
            error_code=None,
            error_message=None,
        )
    )
    if result.rowcount != 1:
        return Completed(Outcome.FENCED_OUT)
    if job_status in TERMINAL:
        return Completed(Outcome.JOB_STOPPED)  # keep its checkpoint, go no further
    done = {name for name, state in dag.items() if state.status == StageStatus.DONE} | {stage}
    if len(done) == len(dag):
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
    specs = [state.spec for state in dag.values()]
    now_ready = [s for s in ready(specs, done) if dag[s.name].status not in waiting]
    mark_queued(conn, job_id, [s.name for s in now_ready])
    return Completed(Outcome.ADVANCED, tuple(now_ready))


def fail_stage(
    conn: Conn, job_id: str, stage: str, attempt: int | None, code: str, message: str
) -> bool:
    """Fail the stage and its job with a stable code; nothing is retried after this.
    ``attempt`` None: fail it whoever owns it (the poison guard, a bad record). True if the
    job failed now (its other running branches should stop)."""
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
    if not failed.rowcount or job_status in TERMINAL:
        return False
    update_job(
        conn,
        job_id,
        status=JobStatus.FAILED,
        error_code=code,
        error_message=message,
        finished_at=func.now(),
    )
    return True


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


def cancel_stage(conn: Conn, job_id: str, stage: str, attempt: int) -> bool:
    """The running stage saw its job's cancel flag: it ends cancelled, and so does the job
    unless another branch failed it first. True if the job is cancelled."""
    cancelled = mark_cancelled(conn, job_id)  # takes the job's lock first, as everywhere
    conn.execute(
        update(runs)
        .where(fenced(job_id, stage, attempt))
        .values(status=StageStatus.CANCELLED, finished_at=func.now())
    )
    return cancelled


class Rebuild(StrEnum):
    """What reopening a stage whose checkpoint was lost led to."""

    SEND = "send"  # the producer is queued again: send it; the reader waits as pending
    WAIT = "wait"  # the producer is already queued or running again (another reader)
    GIVE_UP = "give-up"  # rebuilt too often: the store keeps losing it; fail the reader
    FENCED_OUT = "fenced-out"  # the reader's delivery no longer owns its stage: do nothing


def reopen_producer(
    conn: Conn, job_id: str, stage: str, attempt: int, producer: str, error: FarmError
) -> tuple[Rebuild, StageSpec]:
    """A running stage found ``producer``'s checkpoint gone or changed: the stage goes back to
    pending, and the producer, done until now, to queued so that it runs again. Its record
    keeps its attempts; ``rebuilds`` counts the reopenings (at most ``MAX_REBUILDS``).
    Returns what happened and the producer, as its job's DAG stores it."""
    lock_job(conn, job_id)
    row = conn.execute(
        select(runs.c.rebuilds, runs.c.status, *SPEC_COLUMNS).where(stage_is(job_id, producer))
    ).one()
    rebuilds, status, spec = row.rebuilds, row.status, spec_of(row)
    if status == StageStatus.DONE and rebuilds >= MAX_REBUILDS:
        return Rebuild.GIVE_UP, spec
    waiting = conn.execute(
        update(runs)
        .where(fenced(job_id, stage, attempt))
        .values(
            status=StageStatus.PENDING,
            error_code=error.code,
            error_message=f"{error.message} Waiting for {producer} to write it again.",
        )
    )
    if waiting.rowcount != 1:
        return Rebuild.FENCED_OUT, spec
    if status != StageStatus.DONE:
        return Rebuild.WAIT, spec
    queue_rebuild(conn, job_id, producer, error)
    update_job(conn, job_id, current_stage=producer)
    return Rebuild.SEND, spec


def came_back(conn: Conn, job_id: str, stage: str, attempt: int) -> bool:
    """A delivery that lost its stage (it stalled past its lease: SIGSTOP, a VM pause, a long
    outage) turns out to be alive, so its worker did not crash: it is no longer counted
    among the stage's lost deliveries. It was counted, exactly once, when the record moved on
    from its attempt (the reconciler's expiry, or the next delivery's start). True if it was."""
    lock_job(conn, job_id)
    still_ours = (runs.c.status == StageStatus.RUNNING) & (runs.c.attempts == attempt)
    result = conn.execute(
        update(runs)
        .where(stage_is(job_id, stage), runs.c.lost_runs > 0, ~still_ours)
        .values(lost_runs=runs.c.lost_runs - 1)
    )
    return result.rowcount == 1
