"""Where one farm stage's time goes: noop stages run in this process with a stopwatch on each
kind of I/O the wrapper does.

The stage wrapper (farm.tasks.runner.StageRun) is run exactly as a worker runs it, but here, so
its calls can be timed without touching farm/: the artifact store's get/put, each Postgres
transaction, each Redis round trip (a pipeline counts once) and the broker send of the next
stage. What is left is Python in the wrapper itself (codecs, SQL building, lease thread).
Run it while no worker consumes the queues: the next-stage messages it sends are purged after.

It uses the API's context, which reads every input from the store. A worker's context keeps a
write-through cache, so there the read is skipped when the previous stage ran in the same
process (noop3-5 on the gpu worker; noise, denoise, decode of img2img): those stages cost one
store round trip less than measured here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import redis
from sqlalchemy import event

from benchmarks.meter import Meter, swap
from farm import Farm
from farm.builtin import NOOP
from farm.db.session import get_engine
from farm.tasks import dispatch, runner
from farm.tasks.app import app
from farm.tasks.runner import StageRun

WORKER_NAME = "bench-inprocess@local"
TIMED = ("artifact get", "artifact put", "postgres txn", "broker send", "redis round trip")


@contextmanager
def patched(meter: Meter, farm: Farm) -> Iterator[None]:
    """Install the stopwatches; everything is put back on exit."""
    store, redis_client = farm.ctx.store, farm.ctx.meta.redis
    with ExitStack() as undo:
        swap(undo, type(store), "get", meter.timed("artifact get", type(store).get))
        swap(undo, type(store), "put", meter.timed("artifact put", type(store).put))
        # every Postgres transaction of the wrapper (a redelivered stage's read is not timed)
        swap(undo, runner, "transaction", meter.timed_scope("postgres txn", runner.transaction))
        swap(undo, dispatch, "send_stage", meter.timed("broker send", dispatch.send_stage))
        swap(undo, redis_client, "execute_command",
              meter.timed("redis round trip", redis_client.execute_command))  # fmt: skip
        pipeline = redis.client.Pipeline  # several commands, one round trip
        swap(undo, pipeline, "execute", meter.timed("redis round trip", pipeline.execute))
        engine = get_engine(farm.ctx.db_url)
        event.listen(engine, "before_cursor_execute", meter.count_statement)
        undo.callback(event.remove, engine, "before_cursor_execute", meter.count_statement)
        yield


def measure(farm: Farm, jobs: int, payload: bytes, warmup: int = 3) -> dict:
    """Run ``jobs`` noop jobs' stages here, one after another; ms per stage by category."""
    for _ in range(warmup):
        _run_stages(farm, farm.submit(payload, pipeline="noop").id)
    # Submitted before the stopwatches go on: submit's own I/O is not a stage's.
    ids = [farm.submit(payload, pipeline="noop").id for _ in range(jobs)]
    meter = Meter()
    with patched(meter, farm):
        started = time.perf_counter()
        for job_id in ids:
            _run_stages(farm, job_id)
        total_ms = 1000 * (time.perf_counter() - started)
    app.control.purge()  # the next-stage messages nobody consumed
    return {
        **_per_stage(meter, total_ms, jobs * len(NOOP.stages)),
        "object_store_client_cpu_ms": client_cpu(farm, payload),
    }


def client_cpu(farm: Farm, payload: bytes, calls: int = 200) -> dict[str, float]:
    """CPU-ms this process spends per put and per get of the payload (boto3's share of an
    object store round trip; the server's is in the run's CPU by process)."""
    store, key = farm.ctx.store, "bench/client-cpu"
    out = {}
    for name, call in (("put", lambda: store.put(key, payload)), ("get", lambda: store.get(key))):
        call()  # warm
        started = time.process_time()
        for _ in range(calls):
            call()
        out[name] = 1000 * (time.process_time() - started) / calls
    store.delete(key)
    return out


def _run_stages(farm: Farm, job_id: str) -> None:
    for spec in NOOP.stages:
        outcome = StageRun(farm.ctx, job_id, spec.name, WORKER_NAME).execute()
        if outcome != "done":
            raise RuntimeError(f"in-process {spec.name} of {job_id} ended {outcome!r}")


def _per_stage(meter: Meter, total_ms: float, stages: int) -> dict:
    """ms and calls per stage by category; ``rest`` is Python in the wrapper itself."""
    return {
        "stages": stages,
        "ms_per_stage": total_ms / stages,
        "by_category": meter.per(stages, total_ms, TIMED),
    }
