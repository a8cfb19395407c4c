"""The engine's loop: gather the calls jobs are waiting on, run one model call per tick.

Each tick takes the oldest waiting call and every other waiting call that can share a model call
with it (same component, same shapes: ``Call.key``), up to ``cap`` jobs, and runs them as one
call. Jobs join between ticks as their stages start calling the model and leave when their stage
ends; no job waits for a batch to fill. The one wait: jobs in the middle of a denoise loop are
between two UNet calls (their scheduler step, their progress) when a tick could start, so the
tick waits for them up to half a tick's time; a straggler then misses one tick, never more.

Memory pressure shrinks the batch, never the job: a CUDA out-of-memory error halves ``cap``,
frees the cache and runs the same calls again in smaller ticks; the cap doubles back after
``GROW_AFTER`` good ticks. Only a job that runs out of memory alone fails (GPU_OUT_OF_MEMORY).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from farm.engine import calls
from farm.engine.calls import Call
from farm.engine.progress import Reporter
from farm.errors import GpuOutOfMemory, WorkerStopping
from farm.metrics import worker as metrics
from farm.models import ModelBundle
from farm.storage.metadata import Metadata
from farm.tasks import faults

log = logging.getLogger(__name__)

GROW_AFTER = 32  # good ticks in a row before a cap halved by an OOM doubles again
MAX_STRAGGLER_WAIT_S = 0.05


@dataclass(eq=False)
class Member:
    """One job's stage while it calls the model through the engine."""

    job_id: str
    stage: str
    reporter: Reporter
    calls: int = 0  # batched model calls it took part in
    jobs_in_calls: int = 0  # jobs in those calls, summed (itself included)
    looping: bool = False  # between two UNet calls of a denoise loop
    last: tuple = ()  # (component, key) of its last answered call
    waiting: Call | None = field(default=None, repr=False)

    @property
    def jobs_per_call(self) -> float | None:
        return self.jobs_in_calls / self.calls if self.calls else None

    def report(self, fields: dict[str, str | int | float]) -> bool:
        """Progress for the next round trip; True when the job was cancelled."""
        return self.reporter.report(self.job_id, fields)


class Engine(threading.Thread):
    def __init__(self, cap: int, meta: Metadata | None) -> None:
        super().__init__(daemon=True, name="farm-engine")
        self.limit = self.cap = cap
        self.meta = meta
        self.reporter = Reporter(meta)
        self.model_calls = 0  # since start: batched calls, and jobs in them summed
        self.jobs_in_calls = 0
        self.unet_calls = 0
        self.busy_s = 0.0  # inside model calls: over wall time, how busy it kept the GPU
        self.started_at = time.time()
        self.out_of_memory = 0  # ticks that ran out of memory
        self.lowest_cap = cap
        self._cond = threading.Condition()
        self._waiting: list[Call] = []  # oldest first
        self._members: set[Member] = set()
        self._local = threading.local()
        self._wrapped: dict[int, ModelBundle] = {}
        self._good_ticks = 0
        self._tick_s = 0.0  # a running mean of a tick's time
        self._stopped = False

    # -- what stages and the runner call -----------------------------------------------------

    def batches(self, model: Any) -> bool:
        return isinstance(model, ModelBundle)

    def wrap(self, bundle: ModelBundle) -> ModelBundle:
        """The bundle with its model components calling through this engine."""
        with self._cond:
            if id(bundle) not in self._wrapped:
                self._wrapped[id(bundle)] = calls.wrap(bundle, self)
            return self._wrapped[id(bundle)]

    @contextlib.contextmanager
    def member(self, job_id: str, stage: str) -> Iterator[Member]:
        member = Member(job_id, stage, self.reporter)
        with self._cond:
            self._members.add(member)
        self.reporter.watch(job_id)
        self._local.member = member
        try:
            yield member
        finally:
            self._local.member = None
            self.reporter.forget(job_id)
            with self._cond:
                self._members.discard(member)
                self._cond.notify_all()

    def submit(self, call: Call) -> Any:
        """Queue ``call`` for a tick and wait for its answer (from a job's thread)."""
        call.member = getattr(self._local, "member", None) or Member("", "", self.reporter)
        with self._cond:
            if self._stopped:
                raise _stopping()
            call.member.waiting = call
            self._waiting.append(call)
            self._cond.notify_all()
        return call.wait()

    def stats(self) -> dict[str, int | float]:
        jobs_per_call = self.jobs_in_calls / self.model_calls if self.model_calls else 0.0
        return {
            "model_calls": self.model_calls,
            "unet_calls": self.unet_calls,
            "jobs_per_call": round(jobs_per_call, 3),
            "batch_cap": self.cap,
            "batch_limit": self.limit,
            "out_of_memory": self.out_of_memory,
            "lowest_cap": self.lowest_cap,
            "busy_s": round(self.busy_s, 4),
            "started_at": self.started_at,
        }

    def stop(self) -> None:
        """Stop after the current tick; calls waiting then, or later, fail with the retryable
        WORKER_STOPPING (their stages run again)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._fail_waiting()
        self.reporter.stop()

    def _fail_waiting(self) -> None:
        with self._cond:
            left, self._waiting = self._waiting, []
        for call in left:
            call.fail(_stopping())

    # -- the loop ------------------------------------------------------------------------------

    def waiting(self) -> int:
        """Calls waiting for a tick."""
        with self._cond:
            return len(self._waiting)

    def run(self) -> None:
        self.reporter.start()
        try:
            while (tick := self._next_tick()) is not None:
                self._run_safely(tick)
        finally:  # however the loop ends, no job is left waiting for it
            with self._cond:
                self._stopped = True
            self._fail_waiting()

    def _run_safely(self, tick: list[Call]) -> None:
        try:
            self._run(tick)
        except Exception as exc:  # the loop outlives any tick: no job waits forever
            log.exception("engine tick failed")
            for call in tick:
                if not call.settled:
                    call.fail(exc)

    def _next_tick(self) -> list[Call] | None:
        with self._cond:
            while not self._waiting and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            deadline = time.monotonic() + min(MAX_STRAGGLER_WAIT_S, self._tick_s / 2)
            while self._stragglers() and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return self._take() if self._waiting else None

    def _stragglers(self) -> bool:
        """Jobs in a denoise loop that have not yet asked for their next call, which could
        share the coming tick (same component and shapes, and room under the cap)."""
        oldest = self._waiting[0] if self._waiting else None
        if oldest is None or sum(oldest.shares_with(c) for c in self._waiting) >= self.cap:
            return False
        coming = (oldest.name, oldest.key)
        return any(m.looping and m.waiting is None and m.last == coming for m in self._members)

    def _take(self) -> list[Call]:
        oldest = self._waiting[0]
        tick = [c for c in self._waiting if oldest.shares_with(c)][: self.cap]
        for call in tick:
            self._waiting.remove(call)
            call.member.waiting = None
        return tick

    def _run(self, tick: list[Call]) -> None:
        self.reporter.tick()  # last tick's progress goes out while this one computes
        out_of_memory = False
        try:
            self._inject_faults(tick)
            started = time.perf_counter()
            with torch.no_grad():
                answers = calls.run(tick)
            if torch.cuda.is_available():  # the call's real time: its answers are needed next
                torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            out_of_memory = True  # handled below, once the failed call's tensors are freed
        except Exception as exc:
            if len(tick) == 1:
                tick[0].fail(exc)
                return
            log.exception("a batched %s call failed; running its calls one by one", tick[0].name)
            for call in tick:
                self._run([call])
            return
        if out_of_memory:
            self._out_of_memory(tick)
            return
        took = time.perf_counter() - started
        self.busy_s += took
        self._tick_s = 0.8 * self._tick_s + 0.2 * took
        self._count(tick, took)
        for call, answer in zip(tick, answers, strict=True):
            call.answer(answer)

    def _count(self, tick: list[Call], took: float) -> None:
        self.model_calls += 1
        self.unet_calls += tick[0].name == "unet"
        self.jobs_in_calls += len(tick)
        metrics.observe_model_call(tick[0].name, len(tick), took)
        for call in tick:
            call.member.calls += 1
            call.member.jobs_in_calls += len(tick)
            call.member.looping = call.loops
            call.member.last = (call.name, call.key)
        self._good_ticks += 1
        if self.cap < self.limit and self._good_ticks >= GROW_AFTER:
            self.cap, self._good_ticks = min(self.limit, self.cap * 2), 0
            log.info("batch cap back up to %d", self.cap)

    def _out_of_memory(self, tick: list[Call]) -> None:
        """Halve the cap and put the calls back to run again in smaller ticks; a call alone
        that does not fit fails its job, saying what to lower."""
        self._good_ticks = 0
        self.out_of_memory += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(tick) == 1:
            tick[0].fail(GpuOutOfMemory(calls.out_of_memory_message(tick[0])))
            return
        self.cap = max(1, len(tick) // 2)
        self.lowest_cap = min(self.lowest_cap, self.cap)
        log.warning("GPU out of memory with %d jobs in a call; cap now %d", len(tick), self.cap)
        with self._cond:
            for call in tick:
                call.member.waiting = call
            self._waiting[:0] = tick  # still the oldest: they run next
            stopped = self._stopped
        if stopped:  # stop() emptied the queue before they came back
            self._fail_waiting()

    def _inject_faults(self, tick: list[Call]) -> None:
        """Test hooks (FARM_FAULT_INJECTION=1), comma-separated: ``oom:N`` raises CUDA's
        out-of-memory error in any tick of more than N jobs; ``stall:S`` slows every tick by S
        seconds."""
        if not faults.ENABLED or self.meta is None:
            return
        for action in faults.engine_action(self.meta).split(","):
            if action.startswith("oom:") and len(tick) > int(action[4:]):
                raise torch.OutOfMemoryError(f"injected: {len(tick)} jobs in one call")
            if action.startswith("stall:"):
                time.sleep(float(action[6:]))


def _stopping() -> WorkerStopping:
    return WorkerStopping("the gpu worker is shutting down; the stage runs again")
