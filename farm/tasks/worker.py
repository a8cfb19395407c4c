"""Worker lifecycle: warm the model, beat, and reconcile in the background."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from celery import signals

from farm import engine, tracing
from farm.db.session import dispose_engines
from farm.errors import ConfigError, FarmError
from farm.metrics import http, multiproc
from farm.metrics import worker as worker_metrics
from farm.pipelines import all_pipelines
from farm.storage import keys
from farm.tasks import context, kombu_fixes
from farm.tasks.reconcile import reconcile_once_across_farm

log = logging.getLogger(__name__)
kombu_fixes.apply()  # this module loads in every worker process, before it consumes
METRICS_PORTS = 32  # several workers on one host: each takes the next free port from the first


class Beat(threading.Thread):
    """Publishes this worker's heartbeat and runs the reconciler now and then."""

    def __init__(self, name: str, queues: list[str], metrics: http.MetricsServer | None) -> None:
        super().__init__(daemon=True, name="farm-beat")
        self.worker_name, self.queues, self.metrics = name, queues, metrics
        self.stop_event = threading.Event()

    def run(self) -> None:
        ctx = context.current()
        info = {
            "queues": self.queues,
            "pid": os.getpid(),
            "role": os.environ.get("FARM_WORKER_ROLE", ",".join(self.queues)),
            # host:port of its endpoint (a Prometheus target), None when it serves none, and
            # the scheme to scrape it with: https with the consoles' TLS
            "metrics": self.metrics.address if self.metrics else None,
            "metrics_scheme": self.metrics.scheme if self.metrics else None,
        }
        next_reconcile = time.monotonic() + ctx.settings.reconcile_interval
        while not self.stop_event.is_set():
            try:
                ctx.meta.beat(self.worker_name, {**info, **_engine_stats()})
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + ctx.settings.reconcile_interval
                    reconcile_once_across_farm(ctx)
            except Exception:  # this loop must outlive any outage it reports
                log.exception("heartbeat/reconcile pass failed")
            self.stop_event.wait(keys.WORKER_BEAT_INTERVAL)

    def stop(self) -> None:
        self.stop_event.set()
        with contextlib.suppress(FarmError):
            context.current().meta.forget_worker(self.worker_name)


_beat: Beat | None = None
_metrics_server = None


@signals.worker_init.connect
def _load_pipelines(**_: object) -> None:
    """Every pipeline, the plugins' included, loaded before the pool forks: the children
    inherit them, and a plugin that fails to load is reported once, as the worker starts."""
    log.info("pipelines: %s", ", ".join(sorted(all_pipelines())))


@signals.worker_process_init.connect
def _after_fork(**_: object) -> None:
    # A prefork child must not share its parent's database or Redis sockets.
    dispose_engines()
    context.reset()
    _trace(context.current().settings)


@signals.worker_process_shutdown.connect
def _child_stops(**_: object) -> None:
    tracing.shutdown()  # export what it buffered


@signals.worker_ready.connect
def _start(sender, **_: object) -> None:
    global _beat
    settings = context.current().settings
    _trace(settings)  # solo and thread pools run stages in this process
    queues = sorted(sender.app.amqp.queues.consume_from)
    _beat = Beat(sender.hostname, queues, _serve_metrics(settings))
    _beat.start()
    if "gpu" in queues:
        _warm_model()
        pool = sender.pool  # its threads are the jobs it batches (worker_configs/gpu.py)
        if type(pool).__module__ == "celery.concurrency.thread":
            ctx = context.current()
            engine.start(pool.limit or ctx.settings.gpu_batch, ctx.meta)


@signals.worker_shutdown.connect
def _stop(**_: object) -> None:
    if _beat is not None:
        _beat.stop()
    engine.stop()
    if _metrics_server is not None:
        _metrics_server.shutdown()
    tracing.shutdown()
    multiproc.remove()


def _trace(settings) -> None:
    """Tracing on in this process if asked for; a span file it cannot write turns it off here,
    in one line, rather than failing every stage."""
    service = f"farm-worker-{os.environ.get('FARM_WORKER_ROLE') or 'any'}"
    try:
        tracing.setup(settings, service)
    except ConfigError as exc:
        log.error("tracing off: %s", exc.message)


def _serve_metrics(settings) -> http.MetricsServer | None:
    """This worker's metrics endpoint (every pool process's counts, its engine's state), on
    the first free port from FARM_WORKER_METRICS_PORT; None when off."""
    global _metrics_server
    if not settings.worker_metrics_port:
        return None
    registry = worker_metrics.registry(lambda: _engine_stats().get("engine"))
    try:
        _metrics_server = http.serve(
            registry, settings, settings.worker_metrics_port, tries=METRICS_PORTS
        )
    except ConfigError as exc:
        log.warning("no metrics endpoint: %s", exc.message)
        return None
    log.info("metrics on %s", _metrics_server.url)
    return _metrics_server


def _engine_stats() -> dict[str, dict[str, int | float]]:
    """The engine's model calls and jobs per call, for `farm workers` and the benchmarks."""
    running = engine.current()
    return {"engine": running.stats()} if running else {}


def _warm_model() -> None:
    """Load the model once, before the first job, so no job pays for it."""
    from farm.models import load_model

    settings = context.current().settings
    started = time.perf_counter()
    try:
        load_model(settings.model, settings.data_dir)
    except FarmError as exc:
        log.error("model not loaded: %s", exc)
        return
    log.info("model ready in %.1f s", time.perf_counter() - started)
