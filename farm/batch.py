"""The read-side handle on a batch: the jobs of one submitted folder, counted and followed (a
job belongs to every batch that submitted its input)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from farm.db.models import Batch as BatchRow
from farm.db.models import BatchJob, JobStatus
from farm.db.models import Job as JobRow
from farm.db.session import session_scope
from farm.job import JobInfo, list_jobs, patience, warn_if_no_workers
from farm.tasks.context import Context
from farm.waiting import on_change, poll_until


@dataclass(frozen=True)
class BatchCounts:
    """How many of a batch's jobs are in each state."""

    total: int = 0
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def finished(self) -> bool:
        return self.queued + self.running == 0


@dataclass(frozen=True)
class BatchInfo:
    """A batch's record: what was submitted, and when."""

    id: str
    source: str | None  # the folder, as the submitter named it
    created_at: datetime


class Batch:
    """A handle on a submitted folder."""

    def __init__(self, ctx: Context, batch_id: str, skipped: Iterable[str] = ()) -> None:
        self.ctx, self.id = ctx, batch_id
        self.skipped = list(skipped)  # inputs already rendered by an earlier run

    def __repr__(self) -> str:
        return f"Batch({self.id!r})"

    def info(self) -> BatchInfo | None:
        """Its record; None when no batch has this id."""
        with session_scope(self.ctx.db_url) as s:
            row = s.get(BatchRow, self.id)
            return _batch_info(row) if row else None

    def jobs(self) -> list[JobInfo]:
        return list_jobs(self.ctx, batch=self.id, limit=None)

    def failed(self) -> list[JobInfo]:
        """Failed jobs with their error code and message."""
        return [job for job in self.jobs() if job.status == JobStatus.FAILED]

    def counts(self) -> BatchCounts:
        query = (
            select(JobRow.status, func.count())
            .join(BatchJob, BatchJob.job_id == JobRow.id)
            .where(BatchJob.batch_id == self.id)
            .group_by(JobRow.status)
        )
        with session_scope(self.ctx.db_url) as s:
            by_status = dict(s.execute(query).all())
        return BatchCounts(total=sum(by_status.values()), **by_status)

    def wait(
        self,
        timeout: float | None = None,
        on_progress: Callable[[BatchCounts], None] | None = None,
        poll: float = 0.5,
    ) -> BatchCounts:
        """Block until every job of the batch has finished; TimeoutError after ``timeout``.
        ``on_progress`` hears of each change of the counts (not of every poll). Rides out an
        outage of Postgres or Redis of up to ``FARM_OUTAGE_TIMEOUT`` seconds (logged)."""
        warn_if_no_workers(self.ctx, batch=self.id)
        return poll_until(
            self.counts,
            lambda counts: counts.finished,
            timeout=timeout,
            poll=poll,
            patience=patience(self.ctx),
            report=on_change(on_progress) if on_progress is not None else None,
            what=f"batch {self.id}",
        )


def recent_batches(ctx: Context, limit: int = 50) -> list[BatchInfo]:
    """Batch records, newest first."""
    query = select(BatchRow).order_by(BatchRow.created_at.desc()).limit(limit)
    with session_scope(ctx.db_url) as s:
        return [_batch_info(row) for row in s.scalars(query)]


def _batch_info(row: BatchRow) -> BatchInfo:
    return BatchInfo(id=row.id, source=row.source, created_at=row.created_at)
