"""The thin wrapper around a stage: load inputs -> run the stage -> store the checkpoint -> record.

Order matters for exactly-once effect on an at-least-once broker: the checkpoint object is
written first (deterministic key, so a rerun overwrites it), then the record commits, fenced by
the attempt number; only then does farm.tasks.dispatch hand on what became ready.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator

from farm import engine, tracing
from farm.db import stage_records
from farm.db.session import transaction
from farm.db.stage_records import BeginAction, Checkpoint, InputRecord, JobRow, Outcome, Rebuild
from farm.errors import (
    ArtifactCorrupt,
    ArtifactMissing,
    FarmError,
    GpuMemoryShort,
    InputMissing,
    JobCancelled,
    LeaseLost,
    MetadataError,
    PipelineInvalid,
    RedisAuthError,
    StageCrashed,
    StageFailed,
    UnknownPipeline,
)
from farm.metrics import worker as metrics
from farm.pipelines import Pipeline, Stage, StageSpec, get_pipeline
from farm.plugins import plugin_errors
from farm.storage import keys
from farm.storage.kinds import KINDS, kind_of
from farm.storage.verified import Recorded, read_recorded, sha256_hex
from farm.tasks import dispatch, faults, models
from farm.tasks.context import Context

log = logging.getLogger(__name__)


class InputLost(Exception):
    """The checkpoint of ``producer``, which this stage reads, is gone or was changed."""

    def __init__(self, producer: str, error: ArtifactMissing | ArtifactCorrupt) -> None:
        super().__init__(str(error))
        self.producer, self.error = producer, error


class LeaseKeeper(threading.Thread):
    """Renews the stage's Redis lease and beats its Postgres heartbeat while the stage runs.

    The two are independent: Redis being down must not stop the Postgres heartbeat (the
    reconciler would take the stage for dead and send it again), and a Postgres outage must
    not stop the lease."""

    def __init__(self, ctx: Context, job_id: str, stage: str, token: str, attempt: int):
        super().__init__(daemon=True, name=f"lease-{job_id[:8]}-{stage}")
        self.ctx, self.job_id, self.stage = ctx, job_id, stage
        self.token, self.attempt = token, attempt
        self.lost = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        ttl = self.ctx.settings.lease_ttl
        while not self._stop_event.wait(ttl / 3):
            self._renew_lease(ttl)
            self._beat()

    def _renew_lease(self, ttl: float) -> None:
        try:
            if not self.ctx.meta.renew_lease(self.job_id, self.stage, self.token, ttl):
                self.lost = True  # another delivery holds it now
        except FarmError as exc:
            log.warning("lease renewal for %s/%s failed: %s", self.job_id, self.stage, exc)

    def _beat(self) -> None:
        try:
            with transaction(self.ctx.db_url) as conn:
                ours = stage_records.heartbeat(conn, self.job_id, self.stage, self.attempt)
        except FarmError as exc:
            log.warning("heartbeat for %s/%s failed: %s", self.job_id, self.stage, exc)
            return
        if not ours:
            self.lost = True  # the record moved on: another attempt owns the stage

    def stop(self) -> None:
        self._stop_event.set()


class StageRun:
    """One delivery of one (job, stage).

    ``serves``: the queue of the worker running it; dispatch may leave a next stage on that
    queue in ``continue_with`` for this worker to run straight away. A continued stage is
    recorded as queued like any other, so every guarantee of a separate delivery holds: its own
    lease, attempt, checkpoint and record, and a dead worker's stage is found by its stale
    heartbeat and sent again. ``sender``: how the other next stages leave (the broker, or the
    in-process runner's queue).
    """

    def __init__(
        self,
        ctx: Context,
        job_id: str,
        stage: str,
        worker: str,
        retry: bool = False,
        serves: str | None = None,
        sender: dispatch.Sender | None = None,
    ) -> None:
        self.ctx, self.job_id, self.stage, self.worker = ctx, job_id, stage, worker
        self.retry = retry  # Celery's retry after a transient fault, not a redelivery
        self.serves = serves
        self.sender = sender or dispatch.BrokerSender()
        self.token = uuid.uuid4().hex
        self.attempt: int | None = None
        self.keeper: LeaseKeeper | None = None
        self.continue_with: StageSpec | None = None
        self.job: JobRow | None = None  # once begun
        self.spec: StageSpec | None = None  # once begun: the stage as its job stored it
        self.inputs: tuple[InputRecord, ...] = ()  # once begun: the checkpoints it reads
        self.member: engine.Member | None = None  # while it calls the model through the engine
        self.trace_headers: dict[str, str] = {}  # its span, for a stage continued after it
        self._cancelled = False

    def execute(self) -> str:
        """Run the stage unless it is done, taken, or its job is over. Returns what happened:
        also the ``outcome`` of its metrics. An exception escaping it is ``retried`` when
        Celery retries the stage (a service was down), else ``failed``."""
        started, outcome = time.perf_counter(), "failed"
        ids = {"farm.job_id": self.job_id, "farm.stage": self.stage, "farm.worker": self.worker}
        with tracing.span("stage", **ids):
            try:
                outcome = self._execute()
                return outcome
            except FarmError as exc:
                outcome = "retried" if exc.retryable else "failed"
                raise
            finally:
                tracing.annotate(**{"farm.outcome": outcome})
                self._count(outcome, time.perf_counter() - started)

    def _count(self, outcome: str, seconds: float) -> None:
        """The delivery's outcome and wall time, labelled by what its job's DAG says it is."""
        labels = (self.job.pipeline if self.job else "", *self._stage_labels())
        with metrics.never_failing():
            metrics.STAGES.labels(*labels, outcome).inc()
            metrics.STAGE_SECONDS.labels(*labels, outcome).observe(seconds)

    def _execute(self) -> str:
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
        action = self._begin()
        if action == BeginAction.CRASHED:
            return "crashed"
        if action == BeginAction.SKIP:
            # A redelivered, finished stage: its first delivery may have died between commit
            # and send, so its successors' messages go out again (a duplicate is a no-op).
            dispatch.resend_ready(self.ctx, self.job_id, self.sender)
            return "skipped"
        try:
            return self._run_and_commit()
        except JobCancelled:
            self._record_cancel()
            return "cancelled"
        except InputLost as lost:
            return self._rebuild(lost)
        except LeaseLost as exc:
            log.warning("%s/%s: %s; dropping this delivery", self.job_id, self.stage, exc)
            self._came_back()
            return "lease-lost"
        except FarmError as exc:
            if exc.retryable:  # a service is down: back to queued, Celery retries with backoff
                self._requeue(exc)
                raise
            self._fail(exc.code, exc.message)
            return "failed"
        except Exception as exc:
            log.exception("%s/%s crashed", self.job_id, self.stage)
            self._fail(StageFailed.code, f"{self.stage} failed: {type(exc).__name__}: {exc}")
            return "failed"

    def _run_and_commit(self) -> str:
        pipeline = self._pipeline()
        # The stored parameters are checked again here, so that a record written by another
        # version fails this stage with INVALID_PARAM instead of crashing the delivery.
        params = pipeline.params.bind(self.job.params)
        faults.maybe_inject(self.ctx.meta, self.job_id, self.stage, "start")
        if self._cancelled:
            raise JobCancelled("cancelled by request")
        self._check_lease()
        op = pipeline.op(self.spec.op)
        started = time.perf_counter()
        output = self._run_op(pipeline, op, params)
        return self._commit(op, output, time.perf_counter() - started)

    def _pipeline(self) -> Pipeline:
        """The job's pipeline, or PIPELINE_INVALID (not the input's fault, so `farm resume`
        may retry it) when this worker lacks it: its plugin is not installed here, or failed
        to load."""
        try:
            return get_pipeline(self.job.pipeline)
        except UnknownPipeline as exc:
            left_out = plugin_errors()
            why = f" (plugins left out here: {left_out})" if left_out else ""
            raise PipelineInvalid(
                f"worker {self.worker} has no pipeline {self.job.pipeline!r}{why}; install its "
                f"plugin on every worker serving {self.spec.queue}, then `farm resume`"
            ) from exc

    # 1. take the stage in Postgres (attempt + 1), start heartbeating
    def _begin(self) -> BeginAction:
        with _measured("record begin", "begin"), transaction(self.ctx.db_url) as conn:
            max_lost = self.ctx.settings.max_deliveries
            begin = stage_records.begin_stage(
                conn, self.job_id, self.stage, self.worker, max_lost, retry=self.retry
            )
        self.job, self.spec, self.inputs = begin.job, begin.spec, begin.inputs
        self._describe(begin)
        if begin.action == BeginAction.CRASHED:
            crash = StageCrashed(
                f"{self.stage} killed its worker {begin.attempt} times; giving up. "
                "Check the worker logs (out of memory?), then `farm resume`."
            )
            self._fail(crash.code, crash.message)
        if begin.action == BeginAction.RUN:
            self.attempt = begin.attempt
            self.keeper = LeaseKeeper(self.ctx, self.job_id, self.stage, self.token, begin.attempt)
            self.keeper.start()
            # publish the start and read the cancel flag in one round trip
            started = {"status": "running", "stage": self.stage, "step": 0}
            self._cancelled = bool(self._live("report_step", self.job_id, **started))
        return begin.action

    def _describe(self, begin: stage_records.Begin) -> None:
        """What the stage's span and metrics say of it, once its record is read."""
        job, spec = begin.job, begin.spec
        if spec is not None:
            tracing.rename(f"stage {spec.op}")
        tracing.annotate(
            **{
                "farm.pipeline": job.pipeline if job else None,
                "farm.batch_id": job.batch_id if job else None,
                "farm.op": spec.op if spec else None,
                "farm.queue": spec.queue if spec else None,
                "farm.attempt": begin.attempt,
            }
        )
        # A delivery that died counts nothing: the one after it counts it lost (or the
        # reconciler, when it found it dead first: farm.tasks.reconcile).
        with metrics.never_failing():
            if begin.lost:
                metrics.STAGES.labels(job.pipeline, *self._stage_labels(), "lost").inc()
            if begin.action == BeginAction.RUN:
                metrics.STAGES.labels(job.pipeline, *self._stage_labels(), "started").inc()

    def _stage_labels(self) -> tuple[str, str]:
        """Stage function and queue; before the record is read (a duplicate delivery), only
        the queue this worker took it from."""
        if self.spec is None:
            return "", self.serves or ""
        return self.spec.op, self.spec.queue

    # 2. load inputs, run the plain stage function
    def _run_op(self, pipeline: Pipeline, op: Stage, params):
        with tracing.span("input read"):
            inputs = self._load_inputs(op)
        model = models.load(pipeline, op.model, self.ctx.settings) if op.model else None
        with engine.joined(self.job_id, self.stage, model) as (model, self.member):
            try:
                with tracing.span("model call" if op.model else "compute"):
                    return op.run(inputs, params, model, Hooks(self))
            except Exception as exc:
                if self.member is not None and engine.is_out_of_memory(exc):
                    # Out of memory in the job's own work (its scheduler step) while the
                    # batch beside it held the GPU: not this job's fault; it runs again.
                    raise GpuMemoryShort(
                        f"{self.stage} ran out of GPU memory beside a batch"
                    ) from exc
                raise

    def _load_inputs(self, op: Stage):
        """The submitted input (first stages), the one artifact a stage reads, or, for a join,
        every artifact it reads by the name of the stage that wrote it."""
        if not self.spec.after:
            return self._submitted_input()
        artifacts = {
            record.stage: kind_of(record.content_type).decode(self._read_checkpoint(record))
            for record in self.inputs
        }
        return artifacts if op.join else artifacts[self.spec.after[0]]

    def _submitted_input(self) -> bytes | None:
        """The user's input: its own object or a range of a packed one. The one artifact the
        farm cannot rebuild: when it is gone the job fails, saying so."""
        store, job = self.ctx.store, self.job
        if job.input_key is None:
            return None
        try:
            with _measured(None, "input") as measure:
                if job.input_size is None:
                    data = store.get(job.input_key)
                else:
                    data = store.get_range(job.input_key, job.input_offset or 0, job.input_size)
                measure.bytes = len(data)
            return data
        except ArtifactMissing as exc:
            raise InputMissing(
                f"The input of job {self.job_id} ({job.input_key}) is gone from the store; "
                "submit the file again."
            ) from exc

    def _read_checkpoint(self, record: InputRecord) -> bytes:
        key = record.key or keys.artifact_key(self.job_id, record.stage)
        recorded = Recorded(self.job_id, record.stage, key, record.size, record.checksum)
        try:
            with _measured(None, "read") as measure:
                data = read_recorded(self.ctx.store, recorded)
                measure.bytes = len(data)
            return data
        except (ArtifactMissing, ArtifactCorrupt) as exc:
            raise InputLost(record.stage, exc) from exc

    # 3. write the checkpoint, then commit the record (fenced), then hand on what is next
    def _commit(self, op: Stage, output, duration: float) -> str:
        self._check_lease()
        kind = KINDS[op.writes]
        data, key = kind.encode(output), keys.artifact_key(self.job_id, self.stage, kind.suffix)
        faults.maybe_inject(self.ctx.meta, self.job_id, self.stage, "upload")
        with _measured("checkpoint write", "write") as measure:
            self.ctx.store.put(key, data)
            measure.bytes = len(data)
        faults.maybe_inject(self.ctx.meta, self.job_id, self.stage, "commit")
        checkpoint = Checkpoint(
            key, len(data), sha256_hex(data), duration, kind.content_type, *self._shared_calls()
        )
        with _measured("record commit", "complete"), transaction(self.ctx.db_url) as conn:
            done = stage_records.complete_stage(
                conn, self.job_id, self.stage, self.attempt, checkpoint
            )
        if done.outcome == Outcome.FENCED_OUT:
            raise LeaseLost("another delivery took over this stage while it ran")
        if done.outcome == Outcome.JOB_STOPPED:
            log.info("%s/%s done, but its job was stopped meanwhile", self.job_id, self.stage)
            return "stopped"
        if done.outcome == Outcome.FINISHED:
            self._live("finish", self.job_id, "done")
            return "done"
        self._hand_on(done.ready)
        return "done"

    def _shared_calls(self) -> tuple[int | None, float | None]:
        """How many batched model calls the stage took part in, and the mean jobs per call."""
        member = self.member
        if member is None or not member.calls:
            return None, None
        return member.calls, member.jobs_per_call

    def _hand_on(self, ready: tuple[StageSpec, ...]) -> None:
        """The record is committed: nothing after this may fail the stage. Stages that cannot
        be sent now stay recorded as queued, for the reconciler."""
        if not ready:  # the rest waits on another branch still running
            return
        nxt = dispatch.plan(ready, self.serves)
        self.continue_with = nxt.continue_with
        self.trace_headers = tracing.carrier()
        dispatch.send_or_leave(self.sender, self.job_id, nxt.send, self.job.priority)
        if not self.continue_with:  # a continued stage publishes its own start
            self._live("set_state", self.job_id, status="running", stage=ready[0].name, step=0)

    def _rebuild(self, lost: InputLost) -> str:
        """Re-run the stage that wrote the lost checkpoint; this one runs again after it (and
        so on up the pipeline, should that stage find its own input lost too)."""
        log.warning("%s/%s: %s; running %s again", self.job_id, self.stage, lost, lost.producer)
        with transaction(self.ctx.db_url) as conn:
            rebuild, producer = stage_records.reopen_producer(
                conn, self.job_id, self.stage, self.attempt, lost.producer, lost.error
            )
        if rebuild == Rebuild.GIVE_UP:
            message = (
                f"{lost.error.message} It was rebuilt {stage_records.MAX_REBUILDS} times and "
                "lost again: check the object store, then `farm resume`."
            )
            self._fail(lost.error.code, message)
            return "failed"
        if rebuild == Rebuild.SEND:
            self._hand_on((producer,))
        return "rebuild"

    def _live(self, method: str, *args, **kwargs):
        """Live metadata is best-effort: Redis holds nothing Postgres cannot rebuild, so a
        Redis outage, or a Redis that stopped taking our password, must not fail a render."""
        try:
            return getattr(self.ctx.meta, method)(*args, **kwargs)
        except (MetadataError, RedisAuthError) as exc:
            log.debug("live metadata skipped (%s): %s", method, exc)
            return None

    def _check_lease(self) -> None:
        if self.keeper and self.keeper.lost:
            raise LeaseLost("another delivery took over this stage")

    def _record_cancel(self) -> None:
        """Stopped between steps: the job was cancelled, or another branch failed it (its
        status and error stay the failing branch's)."""
        with _measured("record cancel", "cancel"), transaction(self.ctx.db_url) as conn:
            cancelled = stage_records.cancel_stage(conn, self.job_id, self.stage, self.attempt)
        if cancelled:
            self._live("finish", self.job_id, "cancelled")

    def _came_back(self) -> None:
        """This delivery stalled and was taken for dead; it was not: un-count it, so that
        stalls never add up to the crash limit (farm.db.stage_records.came_back)."""
        try:
            with transaction(self.ctx.db_url) as conn:
                stage_records.came_back(conn, self.job_id, self.stage, self.attempt)
        except FarmError as exc:
            log.warning("%s/%s: could not un-count a stall: %s", self.job_id, self.stage, exc)

    def _requeue(self, exc: FarmError) -> None:
        """Back to queued, recording which service it waits on and why (users see it)."""
        try:
            with transaction(self.ctx.db_url) as conn:
                stage_records.requeue_stage(
                    conn, self.job_id, self.stage, self.attempt, exc.code, exc.message
                )
        except FarmError:
            pass  # the database itself is down; the retry will find the record as it was

    def _fail(self, code: str, message: str) -> None:
        log.warning("%s/%s failed: %s: %s", self.job_id, self.stage, code, message)
        with _measured("record fail", "fail"), transaction(self.ctx.db_url) as conn:
            failed = stage_records.fail_stage(
                conn, self.job_id, self.stage, self.attempt, code, message
            )
            if failed:
                # The job's other branches still running stop at their next step, at the
                # cancel flag they check. Set under the job's lock, so that a resume (which
                # clears the flag under it) can only come after.
                self._live("request_cancel", self.job_id)
        if failed:
            self._live("finish", self.job_id, "failed")


class _Measure:
    bytes = 0  # what the measured read or write moved, when it moves bytes


@contextlib.contextmanager
def _measured(span: str | None, op: str) -> Iterator[_Measure]:
    """A child span named ``span`` (none if None), and the latency of ``op``: a record's
    transaction (begin, complete, cancel, fail), or a checkpoint's write or read, or the
    submitted input's read, whose bytes count too."""
    measure, started = _Measure(), time.perf_counter()
    with tracing.span(span) if span else contextlib.nullcontext():
        yield measure
    took = time.perf_counter() - started
    with metrics.never_failing():
        if op in ("write", "read", "input"):
            metrics.CHECKPOINT_SECONDS.labels(op).observe(took)
            metrics.CHECKPOINT_BYTES.labels(op).inc(measure.bytes)
        else:
            metrics.RECORD_COMMIT_SECONDS.labels(op).observe(took)


class Hooks:
    """What a stage may call back into while it runs: progress, cancel, lease checks."""

    def __init__(self, run: StageRun) -> None:
        self.run = run
        self.stage = run.stage  # which stage of the job's DAG: a branch, a tile

    def on_step(self, step: int, total: int) -> None:
        run = self.run
        progress = {"stage": run.stage, "step": step, "steps": total}
        if run.member is not None:  # in the engine: one round trip per tick for all its jobs
            cancelled = run.member.report(progress)
        else:
            cancelled = run._live("report_step", run.job_id, **progress)
        if cancelled:
            raise JobCancelled("cancelled by request")
        faults.maybe_inject(run.ctx.meta, run.job_id, run.stage, "step")
        run._check_lease()
