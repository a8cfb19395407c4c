"""What a worker measures. Every process that runs stages counts here: in a worker, into its
multiprocess folder (``farm.metrics.multiproc``); anywhere else (the in-process runner, a
benchmark), in memory, unserved."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from farm.metrics import multiproc

log = logging.getLogger(__name__)
STAGE = ("pipeline", "stage", "queue")
# Stage functions take milliseconds (noop) to minutes (a real model's denoise).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
IO_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

STAGES = Counter(
    "farm_stages",
    "Stage deliveries by outcome: started; done, failed, cancelled, stopped (its job ended "
    "meanwhile); retried (a service was down: Celery retries it); lost (the delivery before "
    "this one stopped beating: died, or stalled and came back); skipped (done already); "
    "duplicate (another delivery holds it); rebuild (an input was lost: its producer runs "
    "again); lease-lost; crashed (killed its worker too often).",
    [*STAGE, "outcome"],
)
STAGE_SECONDS = Histogram(
    "farm_stage_duration_seconds",
    "A delivery's wall time, from taking the stage to its outcome.",
    [*STAGE, "outcome"],
    buckets=STAGE_BUCKETS,
)
CHECKPOINT_BYTES = Counter(
    "farm_checkpoint_bytes", "Checkpoint bytes written to and read from the store.", ["op"]
)
CHECKPOINT_SECONDS = Histogram(
    "farm_checkpoint_seconds",
    "Latency of one checkpoint write (put) or read (get, checksum checked).",
    ["op"],
    buckets=IO_BUCKETS,
)
RECORD_COMMIT_SECONDS = Histogram(
    "farm_record_commit_seconds",
    "Latency of a stage record's transaction in Postgres (begin, complete, fail, cancel).",
    ["op"],
    buckets=IO_BUCKETS,
)
RECONCILER_RESENDS = Counter(
    "farm_reconciler_resends",
    "Stages the reconciler sent again: its worker stopped beating (dead_worker), or the "
    "broker lost its message (lost_message).",
    ["reason"],
)
MODEL_CALLS = Counter(
    "farm_model_calls", "Batched model calls of the gpu engine, by component.", ["component"]
)
MODEL_CALL_JOBS = Histogram(
    "farm_model_call_jobs",
    "Jobs in one batched model call (the engine's batch occupancy). For the unet, each job "
    "in a call is one denoise step: rate() of its _sum is steps per second.",
    ["component"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)
MODEL_CALL_SECONDS = Histogram(
    "farm_model_call_seconds",
    "Latency of one batched model call.",
    ["component"],
    buckets=IO_BUCKETS,
)


class EngineCollector:
    """The gpu engine's state when scraped: its batch cap now and at most, and how long it
    has spent inside model calls (``busy_seconds`` over wall time: how busy it keeps the GPU).
    ``stats`` returns the running engine's ``stats()``, or None without one."""

    def __init__(self, stats: Callable[[], dict | None]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        if not stats:
            return
        yield GaugeMetricFamily(
            "farm_engine_batch_cap", "Jobs the engine puts in one call now.", stats["batch_cap"]
        )
        yield GaugeMetricFamily(
            "farm_engine_batch_limit",
            "The most jobs per call (FARM_GPU_BATCH).",
            stats["batch_limit"],
        )
        yield CounterMetricFamily(
            "farm_engine_busy_seconds", "Seconds inside model calls.", stats["busy_s"]
        )
        yield CounterMetricFamily(
            "farm_engine_out_of_memory",
            "Model calls that ran out of GPU memory (the cap halves).",
            stats["out_of_memory"],
        )


def registry(engine_stats: Callable[[], dict | None]) -> CollectorRegistry:
    """What a worker's endpoint serves: every process's counts (summed from the multiprocess
    folder when the worker has one) and its engine's state."""
    if multiproc.active():
        served = CollectorRegistry()
        MultiProcessCollector(served)
    else:
        served = REGISTRY
    served.register(EngineCollector(engine_stats))
    return served


@contextlib.contextmanager
def never_failing() -> Iterator[None]:
    """Counting must not fail what it counts: in multiprocess mode a count is a write to a
    file, and a full disk there costs a log line, not a stage whose record just committed."""
    try:
        yield
    except Exception as exc:
        log.warning("a metric was not recorded: %s: %s", type(exc).__name__, exc)


def observe_model_call(component: str, jobs: int, seconds: float) -> None:
    with never_failing():
        MODEL_CALLS.labels(component).inc()
        MODEL_CALL_JOBS.labels(component).observe(jobs)
        MODEL_CALL_SECONDS.labels(component).observe(seconds)
