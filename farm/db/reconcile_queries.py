"""The reconciler's queries: stages whose worker died, and queued stages whose message may
have been lost with the broker (see farm.tasks.reconcile)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from farm.db.models import Job, JobStatus, StageRun, StageStatus
from farm.db.rows import SPEC_COLUMNS, Conn, lock_job, spec_of
from farm.pipelines import StageSpec


@dataclass(frozen=True)
class StageRef:
    """A stage to send again, with what sending needs to know of its job."""

    job_id: str
    spec: StageSpec  # as the job's DAG stores it
    priority: int
    pipeline: str

    @property
    def stage(self) -> str:
        return self.spec.name


STOPPED = (JobStatus.FAILED, JobStatus.CANCELLED)


def stale_stages(
    session: Session, ttl_s: float, job_statuses: tuple[str, ...] = (JobStatus.RUNNING,)
) -> list[tuple[str, str, int]]:
    """Running stages of jobs in ``job_statuses`` that have not beaten for ``ttl_s``
    (database clock): (job_id, stage, attempt) of each."""
    cutoff = func.now() - timedelta(seconds=ttl_s)
    query = (
        select(StageRun.job_id, StageRun.stage, StageRun.attempts)
        .join(Job, Job.id == StageRun.job_id)
        .where(StageRun.status == StageStatus.RUNNING, StageRun.heartbeat_at < cutoff)
        .where(Job.status.in_(job_statuses))
    )
    return [tuple(row) for row in session.execute(query)]


def close_stages(
    session: Session, ttl_s: float, stale: list[tuple[str, str, int]]
) -> list[tuple[str, str]]:
    """Cancelled: those of these stages of stopped jobs that are still stale (a delivery that
    comes back finds its stage taken and drops its work)."""
    values = {"status": StageStatus.CANCELLED, "finished_at": func.now()}
    rows = _update_still_stale(session, ttl_s, stale, values, (StageRun.job_id, StageRun.stage))
    return [tuple(row) for row in rows]


def expire_stages(
    session: Session, ttl_s: float, stale: list[tuple[str, str, int]]
) -> list[StageRef]:
    """Back to queued, counted as lost: those of these stages that are still stale."""
    values = {
        "status": StageStatus.QUEUED,
        "lost_runs": StageRun.lost_runs + 1,
        "queued_at": func.now(),
    }
    return _refs(session, _update_still_stale(session, ttl_s, stale, values, _REF_COLUMNS))


def _update_still_stale(
    session: Session, ttl_s: float, stale: list[tuple[str, str, int]], values: dict, returning
) -> list:
    """Update each stage that is still the same attempt, running and not beating: fenced by
    all three, so a delivery that beat meanwhile keeps its stage."""
    cutoff = func.now() - timedelta(seconds=ttl_s)
    rows = []
    for job_id, stage, attempt in stale:
        rows += session.execute(
            update(StageRun)
            .where(StageRun.job_id == job_id, StageRun.stage == stage)
            .where(StageRun.attempts == attempt, StageRun.status == StageStatus.RUNNING)
            .where(StageRun.heartbeat_at < cutoff)
            .values(**values)
            .returning(*returning)
        ).all()
    return rows


def stale_queued_stages(session: Session, grace_s: float) -> list[StageRef]:
    """Stages of active jobs recorded as queued for longer than ``grace_s``: their message is
    either still waiting in the broker or was lost with it (the reconciler checks which)."""
    cutoff = func.now() - timedelta(seconds=grace_s)
    rows = session.execute(
        select(*_REF_COLUMNS)
        .join(Job, Job.id == StageRun.job_id)
        .where(StageRun.status == StageStatus.QUEUED, StageRun.queued_at < cutoff)
        .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
    ).all()
    return _refs(session, rows)


def touch_queued(conn: Conn, refs: list[StageRef]) -> None:
    """Record that these stages' messages were just sent again."""
    for job_id in sorted({ref.job_id for ref in refs}):  # jobs first, in one order
        lock_job(conn, job_id)
    for ref in refs:
        conn.execute(
            update(StageRun)
            .where(StageRun.job_id == ref.job_id, StageRun.stage == ref.stage)
            .where(StageRun.status == StageStatus.QUEUED)
            .values(queued_at=func.now())
        )


_REF_COLUMNS = (StageRun.job_id, *SPEC_COLUMNS)  # what a StageRef is built from


def _refs(session: Session, rows) -> list[StageRef]:
    job_ids = sorted({row.job_id for row in rows})
    if not job_ids:
        return []
    query = select(Job.id, Job.priority, Job.pipeline).where(Job.id.in_(job_ids))
    jobs = {job_id: (priority, pipeline) for job_id, priority, pipeline in session.execute(query)}
    return [StageRef(row.job_id, spec_of(row), *jobs[row.job_id]) for row in rows]
