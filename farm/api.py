"""The Python API: ``Farm`` submits, inspects, resumes and cancels jobs.

from farm import Farm
farm = Farm.from_env()
job = farm.submit("cat.png", prompt="a watercolor cat", strength=0.6, seed=7)
job.wait(on_progress=print)
job.save("cat-out.png")
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from farm.batch import Batch, submit_folder
from farm.config import Settings
from farm.db import records
from farm.db.models import TERMINAL, JobStatus
from farm.db.models import Job as JobRow
from farm.db.session import session_scope, transaction
from farm.errors import FarmError, InvalidParameter, is_input_error
from farm.inputs import check_bytes, display_name, read_image_bytes
from farm.native_size import native_size
from farm.params import RenderParams
from farm.pipelines import get_pipeline
from farm.storage import keys
from farm.tasks.app import configure
from farm.tasks.context import Context
from farm.tasks.dispatch import send_stages
from farm.waiting import poll_until


class NoWorkerWarning(UserWarning):
    """A job needs a queue that no live worker consumes."""


@dataclass(frozen=True)
class StageInfo:
    """One stage's record, as a user sees it."""

    name: str
    queue: str
    status: str
    attempts: int
    worker: str | None
    duration_s: float | None
    artifact_key: str | None
    artifact_size: int | None
    error_code: str | None
    error_message: str | None


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

    def __init__(self, farm: Farm, job_id: str) -> None:
        self.farm, self.id = farm, job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def info(self) -> JobInfo:
        with session_scope(self.farm.ctx.db_url) as s:
            return _job_info(records.get_job(s, self.id))

    def status(self) -> str:
        return self.info().status

    def stages(self) -> list[StageInfo]:
        with session_scope(self.farm.ctx.db_url) as s:
            return [_stage_info(run) for run in records.get_job(s, self.id).stage_runs]

    def progress(self) -> Progress:
        live = self.farm.ctx.meta.state(self.id)
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
        Warns (NoWorkerWarning) when no live worker consumes a queue the job needs."""
        self.farm.warn_if_no_workers(self.farm.queues_of(job_id=self.id))

        def report(info: JobInfo) -> None:
            if on_progress is not None and not info.finished:
                on_progress(self.progress())

        return poll_until(
            self.info,
            lambda info: info.finished,
            timeout=timeout,
            poll=poll,
            report=report,
            what=f"job {self.id}",
        )

    def result(self) -> bytes:
        """The output PNG's bytes; FarmError if the job is not done."""
        info = self.info()
        if info.status != JobStatus.DONE or not info.output_key:
            raise FarmError(f"job {self.id} is {info.status}, it has no output", code="NOT_DONE")
        return self.farm.ctx.store.get(info.output_key)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.result())
        return path


class Farm:
    """A connection to a farm: its broker, database, artifact store and Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = Context(settings)
        configure(settings)

    @classmethod
    def from_env(cls) -> Farm:
        """Settings from FARM_* variables, ./.env or the data dir's farm.env (farm up)."""
        return cls(Settings.from_env())

    def submit(
        self,
        image: str | Path | bytes | None = None,
        *,
        pipeline: str = "img2img",
        priority: int = 5,
        idempotency_key: str | None = None,
        **params: object,
    ) -> Job:
        """Validate, upload the input, record the job and enqueue its first stage.

        ``params`` are RenderParams fields: prompt, negative_prompt, strength, steps,
        guidance, seed, size (or width/height, and fit), sharpen, saturation, contrast,
        brightness, scheduler. Bad values raise InvalidParameter before anything is stored."""
        spec = get_pipeline(pipeline)
        render = RenderParams.from_dict(self._default_size(params))
        if spec.needs_input:
            render.img2img_steps()
        _check_priority(priority)
        data, name = _read_input(image) if spec.needs_input else (None, None)
        if idempotency_key and (existing := self._find(idempotency_key)):
            return existing
        job_id = records.new_id()
        input_key = None
        if data is not None:
            input_key = keys.input_key(job_id)
            self.ctx.store.put(input_key, data)
        new = records.NewJob(
            pipeline=spec.name,
            params=render.to_dict(),
            priority=priority,
            input_name=name,
            input_key=input_key,
            idempotency_key=idempotency_key,
            job_id=job_id,
        )
        return self._record_and_send(new)

    def _record_and_send(self, new: records.NewJob) -> Job:
        pipeline = get_pipeline(new.pipeline)
        first = [spec.name for spec in pipeline.ready(())]
        with transaction(self.ctx.db_url) as conn:  # the job and its stage records, first queued
            records.insert_jobs(conn, pipeline, [new], failures={})
        self.ctx.meta.set_state(new.job_id, status="queued", stage=first[0], step=0)
        send_stages(new.job_id, new.pipeline, first, new.priority)
        return Job(self, new.job_id)

    def _find(self, idempotency_key: str) -> Job | None:
        with session_scope(self.ctx.db_url) as s:
            row = records.find_by_idempotency_key(s, idempotency_key)
            return Job(self, row.id) if row else None

    def get(self, job_id: str) -> Job:
        """A handle on an existing job; JobNotFound if there is none."""
        with session_scope(self.ctx.db_url) as s:
            records.get_job(s, job_id)
        return Job(self, job_id)

    def resume(self, job_id: str) -> Job:
        """Re-enqueue a failed or cancelled job from its first stage that is not done."""
        self.ctx.meta.clear_cancel(job_id)
        with session_scope(self.ctx.db_url) as s:
            job, ready = records.prepare_resume(s, job_id)
            pipeline, priority = job.pipeline, job.priority
        if ready:
            self.ctx.meta.set_state(job_id, status="queued", stage=ready[0], step=0)
            send_stages(job_id, pipeline, ready, priority)
        return Job(self, job_id)

    def cancel(self, job: str | Job | None = None, *, batch: str | Batch | None = None) -> int:
        """Stop a job, or every unfinished job of a batch: queued stages are skipped, a
        running one stops at its next step. Returns how many jobs were cancelled."""
        if batch is not None:
            batch_id = batch.id if isinstance(batch, Batch) else batch
            ids = [j.id for j in self.jobs(batch=batch_id, limit=None) if not j.finished]
        else:
            ids = [job.id if isinstance(job, Job) else job]
        return sum(self._cancel_one(job_id) for job_id in ids)

    def _cancel_one(self, job_id: str) -> bool:
        self.ctx.meta.request_cancel(job_id)
        with session_scope(self.ctx.db_url) as s:
            cancelled = records.mark_cancelled(s, job_id)
        if cancelled:
            self.ctx.meta.finish(job_id, "cancelled")
        return cancelled

    def submit_folder(
        self,
        path: str | Path,
        recursive: bool = False,
        *,
        pipeline: str = "img2img",
        priority: int = 5,
        **params: object,
    ) -> Batch:
        """Submit every image file of a folder as one batch (see farm.batch). Inputs already
        rendered with the same parameters and model are skipped, not rendered again."""
        _check_priority(priority)
        return submit_folder(self, path, recursive, pipeline, priority, self._default_size(params))

    def _default_size(self, params: dict) -> dict:
        """No size given: the model's native one, stored in the params (and idempotency key)."""
        if any(params.get(side) is not None for side in ("size", "width", "height")):
            return params
        return {**params, "size": native_size(self.settings.model)}

    def batch(self, batch_id: str) -> Batch:
        return Batch(self, batch_id)

    def resume_failed(self, batch_id: str | None = None) -> list[Job]:
        """Resume every failed or cancelled job (of one batch, or all) whose input was fine."""
        stopped = self.jobs(status=JobStatus.FAILED, batch=batch_id, limit=None)
        stopped += self.jobs(status=JobStatus.CANCELLED, batch=batch_id, limit=None)
        return [self.resume(j.id) for j in stopped if not is_input_error(j.error_code)]

    @property
    def model_id(self) -> str:
        """What the idempotency key calls the model: its folder, or the built-in tiny one."""
        return str(self.settings.model.resolve()) if self.settings.model else "builtin:tiny-sd"

    def queues_of(self, *, job_id: str | None = None, batch: str | None = None) -> set[str]:
        query = select(JobRow.pipeline).distinct()
        query = (
            query.where(JobRow.id == job_id) if job_id else query.where(JobRow.batch_id == batch)
        )
        with session_scope(self.ctx.db_url) as s:
            names = s.scalars(query).all()
        return {queue for name in names for queue in get_pipeline(name).queues()}

    def missing_queues(self, queues: set[str]) -> set[str]:
        """Queues no live worker consumes (from the workers' Redis heartbeats)."""
        return set(queues) - self.ctx.meta.live_queues()

    def warn_if_no_workers(self, queues: set[str]) -> None:
        missing = self.missing_queues(queues)
        if missing:
            names = ", ".join(sorted(missing))
            warnings.warn(
                f"No worker is consuming queue(s) {names}: jobs will wait until one starts "
                f"(farm worker --role {sorted(missing)[0]}, or farm up).",
                NoWorkerWarning,
                stacklevel=3,
            )

    def jobs(
        self, status: str | None = None, batch: str | None = None, limit: int | None = 1000
    ) -> list[JobInfo]:
        """Job snapshots, newest first, optionally filtered by status and batch."""
        query = select(JobRow).order_by(JobRow.created_at.desc()).limit(limit)
        if status:
            query = query.where(JobRow.status == status)
        if batch:
            query = query.where(JobRow.batch_id == batch)
        with session_scope(self.ctx.db_url) as s:
            return [_job_info(row) for row in s.scalars(query)]


def _read_input(image: str | Path | bytes | None) -> tuple[bytes, str | None]:
    if image is None:
        raise InvalidParameter("This pipeline needs an input image.")
    if isinstance(image, bytes):
        check_bytes(image)
        return image, None
    path = Path(image).expanduser()
    return read_image_bytes(path), display_name(path.name)


def _check_priority(priority: object) -> None:
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
        raise InvalidParameter(f"priority must be an integer from 0 to 9, got {priority!r}.")


def _job_info(row: JobRow) -> JobInfo:
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
    )


def _stage_info(run) -> StageInfo:
    return StageInfo(
        name=run.stage,
        queue=run.queue,
        status=run.status,
        attempts=run.attempts,
        worker=run.worker,
        duration_s=run.duration_s,
        artifact_key=run.artifact_key,
        artifact_size=run.artifact_size,
        error_code=run.error_code,
        error_message=run.error_message,
    )
