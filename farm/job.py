"""Read-side handles on jobs: what a user sees of one job, and the queries behind it.

A ``Job`` is a handle, not a copy: every call reads the current state from Postgres (the record)
or Redis (live progress).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from farm.db.job_records import get_job
from farm.db.models import TERMINAL, BatchJob, JobStatus, StageRun, StageStatus
from farm.db.models import Job as JobRow
from farm.db.session import session_scope
from farm.errors import (
    TRANSIENT_CODES,
    ArtifactCorrupt,
    ArtifactMissing,
    JobNotFound,
    NotDone,
    TransientError,
    service_of,
)
from farm.storage.base import ArtifactStore
from farm.storage.verified import Recorded, read_recorded
from farm.tasks.context import Context
from farm.waiting import Outage, Patience, log_outage, on_change, poll_until

ID_LENGTH = 32  # uuid4().hex
_HEX = frozenset("0123456789abcdef")


class NoWorkerWarning(UserWarning):
    """A job needs a queue that no live worker consumes."""


@dataclass(frozen=True)
class StageInfo:
    """One stage's record, as a user sees it."""

    name: str
    queue: str
    status: str
    attempts: int
    lost_runs: int  # deliveries whose worker died mid-stage; the stage was sent again
    rebuilds: int  # times it ran again, once done, because its checkpoint was gone or changed
    worker: str | None
    duration_s: float | None
    artifact_key: str | None
    artifact_size: int | None
    error_code: str | None
    error_message: str | None
    waiting_on: str | None  # the service its retry waits on ("storage", "Postgres"...)
    after: tuple[str, ...] = ()  # the stages it reads, as its job's DAG stores them
    queued_at: datetime | None = None  # when its message was last sent
    started_at: datetime | None = None  # of its last attempt
    finished_at: datetime | None = None
    # Batched model calls its last successful attempt took part in, and the mean number of
    # jobs per call; None when it made none (a cpu stage, a worker without the GPU engine).
    model_calls: int | None = None
    jobs_per_call: float | None = None


@dataclass(frozen=True)
class JobInfo:
    """A snapshot of a job's record."""

    id: str
    pipeline: str
    status: str
    current_stage: str | None
    params: dict
    priority: int
    batch_id: str | None
    input_name: str | None
    output_key: str | None
    error_code: str | None
    error_message: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # A stage of the unfinished job is queued for a retry because a service failed (down,
    # out of space): which one, and what it answered.
    waiting_on: str | None
    waiting_reason: str | None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class Progress:
    """Live progress from Redis (may lag the record by a step)."""

    status: str
    stage: str | None
    step: int
    steps: int


class Job:
    """A handle on one job; every call reads the current state."""

    def __init__(self, ctx: Context, job_id: str) -> None:
        self.ctx, self.id = ctx, job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def info(self) -> JobInfo:
        with session_scope(self.ctx.db_url) as s:
            return job_infos(s, [get_job(s, self.id)])[0]

    def status(self) -> str:
        return self.info().status

    def stages(self) -> list[StageInfo]:
        with session_scope(self.ctx.db_url) as s:
            return [_stage_info(run) for run in get_job(s, self.id).stage_runs]

    def progress(self) -> Progress:
        live = self.ctx.meta.state(self.id)
        return Progress(
            status=live.get("status", "queued"),
            stage=live.get("stage"),
            step=int(live.get("step", 0)),
            steps=int(live.get("steps", 0)),
        )

    def wait(
        self,
        timeout: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        poll: float = 0.25,
    ) -> JobInfo:
        """Block until the job is done, failed or cancelled; TimeoutError after ``timeout``.
        ``on_progress`` hears of each change of the live progress (not of every poll).
        Warns (NoWorkerWarning) when no live worker consumes a queue the job needs. Rides out
        an outage of Postgres or Redis of up to ``FARM_OUTAGE_TIMEOUT`` seconds (logged)."""
        warn_if_no_workers(self.ctx, job_id=self.id)
        live = patience(self.ctx)  # progress is best-effort: it never holds up the wait
        changed = on_change(on_progress) if on_progress is not None else None

        def report(info: JobInfo) -> None:
            if changed is None or info.finished:
                return
            progress = live.try_call(self.progress, None)
            if progress is not None:
                changed(progress)

        return poll_until(
            self.info,
            lambda info: info.finished,
            timeout=timeout,
            poll=poll,
            patience=patience(self.ctx),
            report=report,
            what=f"job {self.id}",
        )

    def result(self) -> bytes:
        """The output PNG's bytes, checked against its record; NotDone if the job is not done,
        ArtifactMissing or ArtifactCorrupt if the stored output is gone or was changed. Rides
        out an outage of Postgres or S3, as ``wait`` does."""
        records = patience(self.ctx)
        info = records.call(self.info)
        record = records.call(partial(output_records, self.ctx, [self.id])).get(self.id)
        if info.status != JobStatus.DONE or record is None:
            raise NotDone(f"job {self.id} is {info.status}, it has no output")
        return records.call(partial(read_output, self.ctx.store, record))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.result())
        return path


def patience(ctx: Context, on_wait: Callable[[Outage], None] = log_outage) -> Patience:
    """How long this client rides out an outage: ``FARM_OUTAGE_TIMEOUT``."""
    return Patience(ctx.settings.outage_timeout, on_wait)


def resolve_id(ctx: Context, id_or_prefix: str) -> str:
    """The full id of the one job whose id is or starts with ``id_or_prefix``; JobNotFound
    when none does, or when the prefix matches several jobs."""
    prefix = id_or_prefix.strip().lower()
    if not prefix or not set(prefix) <= _HEX or len(prefix) > ID_LENGTH:
        raise JobNotFound(f"No job with id {id_or_prefix!r} (ids are hexadecimal).")
    # A range the primary key's index answers (ids are hex: every id with the prefix sorts
    # below prefix + "g"), rather than LIKE, which Postgres scans for in most collations.
    match = (JobRow.id >= prefix) & (JobRow.id < prefix + "g")
    with session_scope(ctx.db_url) as s:
        found = s.scalars(select(JobRow.id).where(match).limit(2)).all()
        if len(found) > 1:
            count = s.scalar(select(func.count()).select_from(JobRow).where(match))
            raise JobNotFound(
                f"Ambiguous prefix {id_or_prefix!r}: it matches {count} jobs; give more of the id."
            )
    if not found:
        raise JobNotFound(f"No job with id {id_or_prefix!r}.")
    return found[0]


def list_jobs(
    ctx: Context, status: str | None = None, batch: str | None = None, limit: int | None = 1000
) -> list[JobInfo]:
    """Job snapshots, newest first, optionally filtered by status and batch."""
    query = select(JobRow).order_by(JobRow.created_at.desc()).limit(limit)
    if status:
        query = query.where(JobRow.status == status)
    if batch:
        return _batch_jobs(ctx, query, batch)
    with session_scope(ctx.db_url) as s:
        return job_infos(s, s.scalars(query).all())


def _batch_jobs(ctx: Context, query, batch: str) -> list[JobInfo]:
    """The batch's jobs as this batch sees them: named as its folder names their inputs, and
    with its id (another batch may have submitted the same bytes first, under another name)."""
    query = query.join(BatchJob, BatchJob.job_id == JobRow.id).where(BatchJob.batch_id == batch)
    with session_scope(ctx.db_url) as s:
        rows = s.execute(query.add_columns(BatchJob.input_path)).all()
        infos = job_infos(s, [row for row, _ in rows])
    # shown as jobs.input_name is stored: bytes that are not UTF-8 as U+FFFD
    names = [path.decode("utf-8", "replace") for _, path in rows]
    pairs = zip(infos, names, strict=True)
    return [replace(info, input_name=name, batch_id=batch) for info, name in pairs]


def batch_input_paths(ctx: Context, batch: str) -> dict[str, bytes]:
    """Job id -> its input's path in the batch's folder, as the file system's bytes."""
    query = select(BatchJob.job_id, BatchJob.input_path).where(BatchJob.batch_id == batch)
    with session_scope(ctx.db_url) as s:
        return dict(s.execute(query).all())


def output_records(ctx: Context, job_ids: list[str]) -> dict[str, Recorded]:
    """Each done job's output as the record of the stage that wrote it describes it."""
    query = (
        select(
            StageRun.job_id,
            StageRun.stage,
            StageRun.artifact_key,
            StageRun.artifact_size,
            StageRun.checksum,
        )
        .join(JobRow, JobRow.id == StageRun.job_id)
        .where(StageRun.job_id.in_(job_ids), StageRun.artifact_key == JobRow.output_key)
    )
    with session_scope(ctx.db_url) as s:
        return {row.job_id: Recorded(*row) for row in s.execute(query)}


def read_output(store: ArtifactStore, record: Recorded) -> bytes:
    """A job's output, if it is the one recorded; the errors say how to get it back."""
    try:
        return read_recorded(store, record)
    except (ArtifactMissing, ArtifactCorrupt) as exc:
        hint = f" `farm resume {record.job_id}` renders it again."
        raise type(exc)(exc.message + hint) from exc


def lost_runs(ctx: Context, job_ids: list[str]) -> dict[str, dict[str, int]]:
    """For each of these jobs that lost a worker mid-stage: stage -> deliveries lost."""
    query = select(StageRun.job_id, StageRun.stage, StageRun.lost_runs).where(
        StageRun.job_id.in_(job_ids), StageRun.lost_runs > 0
    )
    found: dict[str, dict[str, int]] = {}
    with session_scope(ctx.db_url) as s:
        for job_id, stage, lost in s.execute(query.order_by(StageRun.position)):
            found.setdefault(job_id, {})[stage] = lost
    return found


def queues_of(ctx: Context, *, job_id: str | None = None, batch: str | None = None) -> set[str]:
    """The queues a job (or every unfinished job of a batch) still needs: those of its stages
    not done, as its stored DAG names them."""
    query = (
        select(StageRun.queue)
        .distinct()
        .join(JobRow, JobRow.id == StageRun.job_id)
        .where(StageRun.status != StageStatus.DONE, JobRow.status.not_in(TERMINAL))
    )
    if job_id:
        query = query.where(StageRun.job_id == job_id)
    else:
        query = query.join(BatchJob, BatchJob.job_id == StageRun.job_id).where(
            BatchJob.batch_id == batch
        )
    with session_scope(ctx.db_url) as s:
        return set(s.scalars(query).all())


def running_stages(ctx: Context) -> dict[str, list[tuple[str, str]]]:
    """Worker name -> the (job id, stage) its records say it is running now."""
    query = (
        select(StageRun.worker, StageRun.job_id, StageRun.stage)
        .where(StageRun.status == StageStatus.RUNNING, StageRun.worker.is_not(None))
        .order_by(StageRun.started_at)
    )
    found: dict[str, list[tuple[str, str]]] = {}
    with session_scope(ctx.db_url) as s:
        for worker, job_id, stage in s.execute(query):
            found.setdefault(worker, []).append((job_id, stage))
    return found


def missing_queues(ctx: Context, queues: set[str]) -> set[str]:
    """Queues no live worker consumes (from the workers' Redis heartbeats)."""
    return set(queues) - ctx.meta.live_queues()


def warn_if_no_workers(ctx: Context, **which: str) -> None:
    """Warn (NoWorkerWarning) when no live worker consumes a queue the job (``job_id=``) or
    the batch (``batch=``) needs; nothing while Postgres or Redis is down: a warning is no
    reason to wait."""
    try:
        missing = missing_queues(ctx, queues_of(ctx, **which))
    except TransientError:
        return
    if missing:
        names = ", ".join(sorted(missing))
        warnings.warn(
            f"No worker is consuming queue(s) {names}: jobs will wait until one starts "
            f"(farm worker --queues {','.join(sorted(missing))}, or farm up).",
            NoWorkerWarning,
            stacklevel=3,
        )


def job_infos(s: Session, rows: Sequence[JobRow]) -> list[JobInfo]:
    """Snapshots of these jobs, each with the service it waits on, if any (one query)."""
    waits = _waiting_stages(s, [row.id for row in rows if row.status not in TERMINAL])
    return [_job_info(row, waits.get(row.id)) for row in rows]


def _waiting_stages(s: Session, job_ids: list[str]) -> dict[str, StageRun]:
    """Per job, its first stage queued for a retry after a transient fault."""
    if not job_ids:
        return {}
    query = (
        select(StageRun)
        .where(
            StageRun.job_id.in_(job_ids),
            StageRun.status == StageStatus.QUEUED,
            StageRun.error_code.in_(TRANSIENT_CODES),
        )
        .order_by(StageRun.position.desc())
    )
    return {run.job_id: run for run in s.scalars(query)}  # the first position wins


def _job_info(row: JobRow, waiting: StageRun | None) -> JobInfo:
    return JobInfo(
        id=row.id,
        pipeline=row.pipeline,
        status=row.status,
        current_stage=row.current_stage,
        params=dict(row.params),
        priority=row.priority,
        batch_id=row.batch_id,
        input_name=row.input_name,
        output_key=row.output_key,
        error_code=row.error_code,
        error_message=row.error_message,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        waiting_on=service_of(waiting.error_code) if waiting else None,
        waiting_reason=waiting.error_message if waiting else None,
    )


def _waiting_on(run: StageRun) -> str | None:
    return service_of(run.error_code) if run.status == StageStatus.QUEUED else None


def _stage_info(run: StageRun) -> StageInfo:
    return StageInfo(
        name=run.stage,
        queue=run.queue,
        status=run.status,
        attempts=run.attempts,
        lost_runs=run.lost_runs,
        rebuilds=run.rebuilds,
        worker=run.worker,
        duration_s=run.duration_s,
        artifact_key=run.artifact_key,
        artifact_size=run.artifact_size,
        error_code=run.error_code,
        error_message=run.error_message,
        waiting_on=_waiting_on(run),
        after=tuple(run.after_stages),
        queued_at=run.queued_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        model_calls=run.model_calls,
        jobs_per_call=run.jobs_per_call,
    )
