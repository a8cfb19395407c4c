"""The tables as Core objects, and the statements every record module shares.

Stage records change under their job's row lock (``lock_job``), taken first and in its own
statement, so two writers of one job never interleave and never deadlock. The one exception is
the reconciler's expiry of dead stages (farm.db.reconcile_queries), a single UPDATE of stage rows
whose owner stopped beating: every worker write is fenced by its attempt, so it cannot collide.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, func, select, update
from sqlalchemy.orm import Session

from farm.db.models import Job, StageRun, StageStatus
from farm.errors import FarmError, JobNotFound
from farm.pipelines import StageSpec

jobs, runs = Job.__table__, StageRun.__table__
Conn = Connection | Session  # Core statements run on either


def lock_job(conn: Conn, job_id: str, *columns):
    """Take the job's row lock, under which its stage records change, and return ``columns``
    of it. Its own statement on purpose: a FOR UPDATE that waits for the lock re-reads the
    locked row only, so stage rows joined into it would be the ones from before the wait
    (READ COMMITTED); a statement after it sees what the previous holder committed."""
    row = conn.execute(
        select(*(columns or (jobs.c.id,))).where(jobs.c.id == job_id).with_for_update()
    ).first()
    if row is None:
        raise JobNotFound(f"No job with id {job_id!r}.")
    return row


def stage_statuses(conn: Conn, job_id: str) -> dict[str, str]:
    """Every stage of the job and its status (read under the job's lock)."""
    query = select(runs.c.stage, runs.c.status).where(runs.c.job_id == job_id)
    return dict(conn.execute(query).all())


@dataclass(frozen=True)
class StageState:
    """One stage of a job's stored DAG and where it is."""

    spec: StageSpec
    status: str


# What a stage record holds of its job's DAG (``spec_of`` reads a row that has them).
SPEC_COLUMNS = (runs.c.stage, runs.c.queue, runs.c.op, runs.c.after_stages)


def job_dag(conn: Conn, job_id: str) -> dict[str, StageState]:
    """The DAG the job stored at submit, in its stages' order, with each stage's status (read
    under the job's lock when deciding what runs next)."""
    query = select(*SPEC_COLUMNS, runs.c.status)
    query = query.where(runs.c.job_id == job_id).order_by(runs.c.position)
    return {row.stage: StageState(spec_of(row), row.status) for row in conn.execute(query)}


def spec_of(row: StageRun) -> StageSpec:
    """A stage record (an ORM object, or a Core row with ``SPEC_COLUMNS``) as the StageSpec
    its job stored."""
    return StageSpec(row.stage, row.queue, row.op, tuple(row.after_stages))


def mark_queued(conn: Conn, job_id: str, stages: list[str]) -> None:
    """Record that these stages' messages are about to be sent."""
    if stages:
        conn.execute(
            update(runs)
            .where(stage_in(job_id, stages))
            .values(
                status=StageStatus.QUEUED,
                queued_at=func.now(),
                error_code=None,
                error_message=None,
            )
        )


def queue_rebuild(conn: Conn, job_id: str, stage: str, why: FarmError) -> None:
    """A done stage whose checkpoint was found gone or changed: queued to run again, the
    reason kept on its record, its rebuilds counted (its attempts go on from where they are)."""
    conn.execute(
        update(runs)
        .where(stage_is(job_id, stage))
        .values(
            status=StageStatus.QUEUED,
            queued_at=func.now(),
            rebuilds=runs.c.rebuilds + 1,
            error_code=why.code,
            error_message=why.message,
        )
    )


def update_job(conn: Conn, job_id: str, **values) -> None:
    conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))


def stage_is(job_id: str, stage: str):
    return (runs.c.job_id == job_id) & (runs.c.stage == stage)


def stage_in(job_id: str, stages: Iterable[str]):
    return (runs.c.job_id == job_id) & runs.c.stage.in_(stages)


def fenced(job_id: str, stage: str, attempt: int):
    """The stage, only while this delivery's attempt still owns it and it is running."""
    return (
        stage_is(job_id, stage)
        & (runs.c.attempts == attempt)
        & (runs.c.status == StageStatus.RUNNING)
    )
