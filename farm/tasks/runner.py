"""The thin wrapper around a stage: load inputs -> run the stage -> store the checkpoint -> record.

Order matters for exactly-once effect on an at-least-once broker: the checkpoint object is
written first (deterministic key, so a rerun overwrites it), then the record commits, fenced by
the attempt number; only then are the next stages enqueued.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import botocore.exceptions
import kombu.exceptions
import redis
import sqlalchemy.exc

from farm import stages as stage_ops
from farm.db import records
from farm.db.models import JobStatus
from farm.db.session import session_scope, transaction
from farm.errors import (
    FarmError,
    JobCancelled,
    LeaseLost,
    MetadataError,
    StageCrashed,
    TransientError,
)
from farm.params import RenderParams
from farm.pipelines import StageSpec, get_pipeline
from farm.storage import keys
from farm.storage.codecs import decode_tensors, encode_tensors, sha256_hex
from farm.tasks import faults
from farm.tasks.context import Context
from farm.tasks.dispatch import send_stages

log = logging.getLogger(__name__)

# Connection trouble with Redis, Postgres, S3 or the broker: retried, never a job failure.
TRANSIENT_ERRORS = (
    ConnectionError,
    TimeoutError,
    redis.ConnectionError,
    redis.TimeoutError,
    kombu.exceptions.OperationalError,
    sqlalchemy.exc.OperationalError,
    botocore.exceptions.ConnectionError,
)


class LeaseKeeper(threading.Thread):
    """Renews the stage's Redis lease and Postgres heartbeat while the stage runs."""

    def __init__(self, ctx: Context, job_id: str, stage: str, token: str, attempt: int):
        super().__init__(daemon=True, name=f"lease-{job_id[:8]}-{stage}")
        self.ctx, self.job_id, self.stage = ctx, job_id, stage
        self.token, self.attempt = token, attempt
        self.lost = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        ttl = self.ctx.settings.lease_ttl
        while not self._stop_event.wait(ttl / 3):
            try:
                self._renew(ttl)
            except FarmError as exc:
                log.warning("lease renewal for %s/%s failed: %s", self.job_id, self.stage, exc)

    def _renew(self, ttl: float) -> None:
        held = self.ctx.meta.renew_lease(self.job_id, self.stage, self.token, ttl)
        with transaction(self.ctx.db_url) as conn:
            ours = records.heartbeat(conn, self.job_id, self.stage, self.attempt)
        if not (held and ours):
            self.lost = True

    def stop(self) -> None:
        self._stop_event.set()


class StageRun:
    """One delivery of one (job, stage).

    ``serves``: the queue of the worker running it. A next stage on that same queue is not
    sent through the broker but left in ``continue_with`` for this worker to run straight
    away (encode -> noise -> denoise -> decode stay in one GPU process, and a job finishes
    before the next one starts rather than all jobs advancing a stage at a time). It is
    recorded as queued like any other, so every guarantee of a separate delivery holds: its
    own lease, attempt, checkpoint and record, and a dead worker's stage is found by its
    stale heartbeat and sent again.
    """

    def __init__(
        self,
        ctx: Context,
        job_id: str,
        stage: str,
        worker: str,
        retry: bool = False,
        serves: str | None = None,
    ) -> None:
        self.ctx, self.job_id, self.stage, self.worker = ctx, job_id, stage, worker
        self.retry = retry  # Celery's retry after a transient fault, not a redelivery
        self.serves = serves
        self.token = uuid.uuid4().hex
        self.attempt: int | None = None
        self.keeper: LeaseKeeper | None = None
        self.continue_with: str | None = None
        self.job: records.JobRow | None = None  # once begun
        self._cancelled = False

    def execute(self) -> str:
        """Run the stage unless it is done, taken, or its job is over. Returns what happened."""
        meta = self.ctx.meta
        if not meta.acquire_lease(self.job_id, self.stage, self.token, self.ctx.settings.lease_ttl):
            return "duplicate"  # another delivery is running this stage right now
        try:
            return self._execute_with_lease()
        finally:
            if self.keeper:
                self.keeper.stop()
            self._live("release_lease", self.job_id, self.stage, self.token)

    def _execute_with_lease(self) -> str:
        begin = self._begin()
        if begin.action == "skip":
            self._resend_lost()
            return "skip"
        pipeline = get_pipeline(begin.job.pipeline)
        params = RenderParams.from_dict(begin.job.params)
        try:
            faults.maybe_inject(self.ctx.meta, self.job_id, self.stage, "start")
            if self._cancelled:
                raise JobCancelled("cancelled by request")
            self._check_lease()
            spec = pipeline.stage(self.stage)
            op = stage_ops.STAGES[spec.op]
            started = time.perf_counter()
            output = self._run_op(spec, op, params, begin.job)
            self._commit(
                op, pipeline.name, begin.job.priority, output, time.perf_counter() - started
            )
            return "done"
        except JobCancelled:
            self._record_cancel()
            return "cancelled"
        except LeaseLost:
            log.warning("%s/%s: lease lost, dropping this delivery", self.job_id, self.stage)
            return "lease-lost"
        except FarmError as exc:
            if exc.retryable:  # a service is down: back to queued, Celery retries with backoff
                self._requeue(str(exc))
                raise
            self._fail(exc.code, exc.message)
            return "failed"
        except TRANSIENT_ERRORS as exc:  # a library error that escaped its boundary mapping
            self._requeue(f"{type(exc).__name__}: {exc}")
            raise TransientError(f"{self.stage}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            log.exception("%s/%s crashed", self.job_id, self.stage)
            self._fail("STAGE_FAILED", f"{self.stage} failed: {type(exc).__name__}: {exc}")
            return "failed"

    # 1. take the stage in Postgres (attempt + 1), start heartbeating
    def _begin(self) -> records.Begin:
        with transaction(self.ctx.db_url) as conn:
            max_lost = self.ctx.settings.max_deliveries
            begin = records.begin_stage(
                conn, self.job_id, self.stage, self.worker, max_lost, retry=self.retry
            )
        self.job = begin.job
        if begin.action == "crashed":
            crash = StageCrashed(
                f"{self.stage} killed its worker {begin.attempt} times; giving up. "
                "Check the worker logs (out of memory?), then `farm resume`."
            )
            self._fail(crash.code, crash.message)
            return records.Begin("skip", job=begin.job)
        if begin.action == "run":
            self.attempt = begin.attempt
            self.keeper = LeaseKeeper(self.ctx, self.job_id, self.stage, self.token, begin.attempt)
            self.keeper.start()
            # publish the start and read the cancel flag in one round trip
            started = {"status": "running", "stage": self.stage, "step": 0}
            self._cancelled = bool(self._live("report_step", self.job_id, **started))
        return begin

    def _resend_lost(self) -> None:
        """A redelivered, finished stage: make sure its successors' messages went out (the
        first delivery may have died between commit and send). Duplicates are no-ops."""
        with session_scope(self.ctx.db_url) as s:
            job = records.get_job(s, self.job_id)
            if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
                return
            lost, pipeline, priority = records.queued_and_ready(job), job.pipeline, job.priority
        send_stages(self.job_id, pipeline, lost, priority)

    # 2. load inputs, run the plain stage function
    def _run_op(self, spec: StageSpec, op, params: RenderParams, job: records.JobRow):
        inputs = self._load_inputs(spec, job)
        model = self._model() if op.needs_model else None
        return op.run(inputs, params, model, Hooks(self))

    def _load_inputs(self, spec: StageSpec, job: records.JobRow):
        store = self.ctx.store
        if not spec.after:  # the submitted input: its own object or a range of a packed one
            if job.input_key is None:
                return None
            if job.input_size is None:
                return store.get(job.input_key)
            return store.get_range(job.input_key, job.input_offset or 0, job.input_size)
        merged: dict = {}
        for dep in spec.after:
            merged.update(decode_tensors(store.get(keys.artifact_key(self.job_id, dep))))
        return merged

    def _model(self):
        from farm.models import load_model  # torch + diffusers: GPU role only

        return load_model(self.ctx.settings.model, self.ctx.settings.data_dir)

    # 3. write the checkpoint, then commit the record (fenced), then enqueue what is next
    def _commit(self, op, pipeline: str, priority: int, output, duration: float) -> None:
        self._check_lease()
        if op.output == "png":
            data, key = output, keys.artifact_key(self.job_id, self.stage, "png")
        else:
            data, key = encode_tensors(output), keys.artifact_key(self.job_id, self.stage)
        faults.maybe_inject(self.ctx.meta, self.job_id, self.stage, "upload")
        self.ctx.store.put(key, data)
        faults.maybe_inject(self.ctx.meta, self.job_id, self.stage, "commit")
        checkpoint = records.Checkpoint(key, len(data), sha256_hex(data), duration)
        with transaction(self.ctx.db_url) as conn:
            nxt = records.complete_stage(conn, self.job_id, self.stage, self.attempt, checkpoint)
        if nxt is None:
            raise LeaseLost("the record moved on while this delivery ran")
        if not nxt:
            self._live("finish", self.job_id, "done")
            return
        spec = get_pipeline(pipeline).stage
        self.continue_with = next((s for s in nxt if spec(s).queue == self.serves), None)
        send_stages(self.job_id, pipeline, [s for s in nxt if s != self.continue_with], priority)
        if not self.continue_with:  # a continued stage publishes its own start
            self._live("set_state", self.job_id, status="running", stage=nxt[0], step=0)

    def _live(self, method: str, *args, **kwargs):
        """Live metadata is best-effort: Redis holds nothing Postgres cannot rebuild, so a
        Redis outage must not fail a render."""
        try:
            return getattr(self.ctx.meta, method)(*args, **kwargs)
        except MetadataError as exc:
            log.debug("live metadata skipped (%s): %s", method, exc)
            return None

    def _check_lease(self) -> None:
        if self.keeper and self.keeper.lost:
            raise LeaseLost("another delivery took over this stage")

    def _record_cancel(self) -> None:
        with session_scope(self.ctx.db_url) as s:
            records.cancel_stage(s, self.job_id, self.stage, self.attempt)
        self._live("finish", self.job_id, "cancelled")

    def _requeue(self, reason: str) -> None:
        try:
            with session_scope(self.ctx.db_url) as s:
                records.requeue_stage(s, self.job_id, self.stage, self.attempt, reason)
        except FarmError:
            pass  # the database itself is down; the retry will find the record as it was

    def _fail(self, code: str, message: str) -> None:
        log.warning("%s/%s failed: %s: %s", self.job_id, self.stage, code, message)
        with session_scope(self.ctx.db_url) as s:
            records.fail_stage(s, self.job_id, self.stage, self.attempt, code, message)
        self._live("finish", self.job_id, "failed")


class Hooks:
    """What a stage may call back into while it runs: progress, cancel, lease checks."""

    def __init__(self, run: StageRun) -> None:
        self.run = run

    def on_step(self, step: int, total: int) -> None:
        run = self.run
        if run._live("report_step", run.job_id, stage=run.stage, step=step, steps=total):
            raise JobCancelled("cancelled by request")
        faults.maybe_inject(run.ctx.meta, run.job_id, run.stage, "step")
        run._check_lease()
