"""The Python API: ``Farm`` submits, inspects, resumes and cancels jobs.

from farm import Farm
farm = Farm.from_env()
job = farm.submit("cat.png", prompt="a watercolor cat", strength=0.6, seed=7)
job.wait(on_progress=print)
job.save("cat-out.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from farm import job as job_queries
from farm import tracing
from farm.batch import Batch, BatchInfo, recent_batches
from farm.config import Settings
from farm.db import job_records
from farm.db.models import JobStatus
from farm.db.session import session_scope, transaction
from farm.errors import (
    ArtifactCorrupt,
    ArtifactMissing,
    DuplicateJob,
    InvalidParameter,
    NotResumable,
    is_input_error,
)
from farm.folder import submit_folder
from farm.inputs import check_bytes, display_name, read_image_bytes
from farm.job import Job, JobInfo
from farm.native_size import native_size
from farm.pipelines import Pipeline, StageSpec, get_pipeline, ready
from farm.schema import RenderSchema
from farm.storage import keys
from farm.tasks.app import configure
from farm.tasks.context import Context
from farm.tasks.dispatch import BrokerSender
from farm.withdrawal import Withdrawal, check_servers, tell


class Farm:
    """A connection to a farm: its broker, database, artifact store and Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = Context(settings)
        configure(settings)
        tracing.setup(settings, "farm-client")
        self._servers_checked = False

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
        """Validate, upload the input, record the job and enqueue its first stages.

        ``params`` are the pipeline's own (``farm pipelines`` lists them). For img2img and
        txt2img: prompt, negative_prompt, strength, steps, guidance, seed, size (or
        width/height, and fit), sharpen, saturation, contrast, brightness, scheduler; with no
        size, the model's native one. Bad values raise InvalidParameter before anything is
        stored. A second submit with the same ``idempotency_key`` (even at the same moment
        from another process) returns the first one's job.

        With tracing on, the submit is the root span of the job's trace."""
        with tracing.span("submit", **{"farm.pipeline": pipeline}):
            job = self._submit(image, pipeline, priority, idempotency_key, params)
            tracing.annotate(**{"farm.job_id": job.id})
        return job

    def _submit(
        self,
        image: str | Path | bytes | None,
        pipeline: str,
        priority: int,
        idempotency_key: str | None,
        params: dict,
    ) -> Job:
        spec = get_pipeline(pipeline)
        canonical = spec.params.validate(self._default_size(spec, params))
        _check_priority(priority)
        if image is not None and not spec.needs_input:
            raise InvalidParameter(f"Pipeline {spec.name!r} takes no input; submit it without one.")
        data, name = _read_input(image) if spec.needs_input else (None, None)
        dag = spec.dag(spec.params.bind(canonical), data)
        # Before the first write, so a wrong setting leaves nothing. Once per Farm: it costs
        # about as much as a submit, and a server failing later is caught by the withdrawal.
        if not self._servers_checked:
            self.check_servers()
        if idempotency_key and (existing := self._find(idempotency_key)):
            return existing
        job_id = job_records.new_id()
        input_key = keys.input_key(job_id) if data is not None else None
        new = job_records.NewJob(
            pipeline=spec.name,
            params=canonical,
            stages=dag,
            priority=priority,
            input_name=name,
            input_key=input_key,
            idempotency_key=idempotency_key,
            job_id=job_id,
        )
        written = Withdrawal(self.ctx)
        try:
            self._write(new, data, written)
        except DuplicateJob:  # another submitter recorded the same key first: theirs wins
            written.take_back()  # what is left, if anything, is an input for `farm gc`
            return self._find(idempotency_key)
        except Exception as exc:
            tell(exc, written.take_back() or "nothing was submitted")
            raise
        return Job(self.ctx, job_id)

    def _write(self, new: job_records.NewJob, data: bytes | None, written: Withdrawal) -> None:
        """Upload the input, record the job and its stage records (first ones queued), send."""
        pipeline = get_pipeline(new.pipeline)
        first = ready(new.stages, ())
        if new.input_key:
            written.keys.append(new.input_key)
            self.ctx.store.put(new.input_key, data)
        with transaction(self.ctx.db_url) as conn:  # the job and its stage records, first queued
            if not job_records.insert_jobs(conn, pipeline, [new], failures={}):
                raise DuplicateJob("a job with this idempotency key was recorded meanwhile")
        written.job_ids.append(new.job_id)
        self.ctx.meta.set_state(new.job_id, status="queued", stage=first[0].name, step=0)
        BrokerSender().send(new.job_id, first, new.priority)

    def check_servers(self) -> None:
        """Raise unless Postgres, Redis, the broker and the artifact store each answer and
        take our credentials (the first one that does not raises its error)."""
        check_servers(self.ctx)
        self._servers_checked = True

    def _find(self, idempotency_key: str) -> Job | None:
        with session_scope(self.ctx.db_url) as s:
            row = job_records.find_by_idempotency_key(s, idempotency_key)
            return Job(self.ctx, row.id) if row else None

    def get(self, job_id: str) -> Job:
        """A handle on an existing job, by its id or an unambiguous prefix of it (as
        ``farm jobs`` shows them); JobNotFound if no single job matches."""
        return Job(self.ctx, job_queries.resolve_id(self.ctx, job_id))

    def resume(self, job_id: str) -> Job:
        """Re-enqueue a failed or cancelled job from its first stage that is not done, or a
        done job whose stored output is gone or was changed from the stage that wrote it.
        NotResumable for a job that is queued or running (resuming it would throw its running
        stage's work away), or done with its output intact."""
        job = Job(self.ctx, job_id)
        if job.status() == JobStatus.DONE:
            return self._render_output_again(job)
        with transaction(self.ctx.db_url) as conn:
            priority, reopened = job_records.reopen(conn, self.ctx.meta, job_id)
        return self._send_reopened(job, priority, reopened)

    def _render_output_again(self, job: Job) -> Job:
        try:
            job.result()
        except (ArtifactMissing, ArtifactCorrupt) as exc:
            with transaction(self.ctx.db_url) as conn:
                reopened = job_records.reopen_output(conn, self.ctx.meta, job.id, exc)
            return self._send_reopened(job, *reopened)
        raise NotResumable(f"job {job.id} is done; there is nothing to resume.")

    def _send_reopened(self, job: Job, priority: int, stages: list[StageSpec]) -> Job:
        if stages:
            self.ctx.meta.set_state(job.id, status="queued", stage=stages[0].name, step=0)
            with tracing.span("resume", **{"farm.job_id": job.id}):
                BrokerSender().send(job.id, stages, priority)
        return job

    def resume_failed(self, batch_id: str | None = None, *, cancelled: bool = False) -> list[Job]:
        """Resume every failed job (of one batch, or all) whose input was fine; with
        ``cancelled``, the cancelled ones too."""
        statuses = [JobStatus.FAILED] + ([JobStatus.CANCELLED] if cancelled else [])
        stopped = [j for status in statuses for j in self.jobs(status, batch_id, limit=None)]
        return [self.resume(j.id) for j in stopped if not is_input_error(j.error_code)]

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
        with transaction(self.ctx.db_url) as conn:
            cancelled = job_records.mark_cancelled(conn, job_id)
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
        """Submit every image file of a folder as one batch (see farm.folder). Inputs already
        rendered with the same parameters and model are skipped, not rendered again."""
        _check_priority(priority)
        spec = get_pipeline(pipeline)
        with tracing.span("submit folder", **{"farm.pipeline": pipeline}):
            batch = submit_folder(
                self, path, recursive, pipeline, priority, self._default_size(spec, params)
            )
            tracing.annotate(**{"farm.batch_id": batch.id})
        return batch

    def _default_size(self, pipeline: Pipeline, params: dict) -> dict:
        """A Stable Diffusion pipeline given no size: the model's native one, stored in the
        params (and idempotency key)."""
        if not isinstance(pipeline.params, RenderSchema):
            return params
        if any(params.get(side) is not None for side in ("size", "width", "height")):
            return params
        return {**params, "size": native_size(self.settings.model)}

    def batch(self, batch_id: str) -> Batch:
        return Batch(self.ctx, batch_id)

    def batches(self, limit: int = 50) -> list[BatchInfo]:
        """Batch records, newest first."""
        return recent_batches(self.ctx, limit)

    @property
    def model_id(self) -> str:
        """What the idempotency key calls the model: its folder, or the built-in tiny one."""
        return str(self.settings.model.resolve()) if self.settings.model else "builtin:tiny-sd"

    def queues_of(self, *, job_id: str | None = None, batch: str | None = None) -> set[str]:
        return job_queries.queues_of(self.ctx, job_id=job_id, batch=batch)

    def missing_queues(self, queues: set[str]) -> set[str]:
        """Queues no live worker consumes (from the workers' Redis heartbeats)."""
        return job_queries.missing_queues(self.ctx, queues)

    def workers(self) -> list[dict[str, Any]]:
        """The live workers' heartbeats: name, role, queues, pid, ``at`` (the beat's time) and,
        for a gpu worker, ``engine``: its model calls, jobs per call, batch cap, OOMs, busy time."""
        return self.ctx.meta.workers()

    def running_stages(self) -> dict[str, list[tuple[str, str]]]:
        """Worker name -> the (job id, stage) its records say it is running now."""
        return job_queries.running_stages(self.ctx)

    def jobs(
        self, status: str | None = None, batch: str | None = None, limit: int | None = 1000
    ) -> list[JobInfo]:
        """Job snapshots, newest first, optionally filtered by status and batch."""
        return job_queries.list_jobs(self.ctx, status, batch, limit)


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
