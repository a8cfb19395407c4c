"""What metrics and traces cost: the overhead benchmark's ``noop`` farm (six stages, cpu and
gpu queues, a 1 KiB artifact through S3, Postgres and Redis) run by the same two worker roles
under three settings, each on workers started for it:

- ``off``: FARM_WORKER_METRICS_PORT=0 (no endpoint, no multiprocess files; counters count in
  memory only) and no tracing;
- ``metrics``: the default: each worker's endpoint, prefork children counting in files;
- ``traced``: metrics, and every stage's spans exported over OTLP/HTTP (a batch processor, as
  in production) to a sink in this process that reads and drops them.

Rounds of 100 jobs in the order off, metrics, traced, traced, metrics, off, so a drift in the
shared machine's load reaches every setting alike. Reports jobs/s and CPU ms per job (every
process of the run: on 2 cores that bounds throughput) against ``off``; and, in this process,
what a stage's tracing calls cost when tracing is off (what ``metrics`` pays for it).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from benchmarks.events import TaskEvents
from benchmarks.harness import Bench, CpuClock, Row, ratio
from benchmarks.overhead import Round, Runner, cpu_ms_per_job, farm_submitter, jobs_per_s
from farm import Farm, tracing
from farm.tasks.app import app

NAME = "observe"
JOBS_PER_ROUND = 100
WARMUP_JOBS = 4
ORDER = ("off", "metrics", "traced", "traced", "metrics", "off")
GOAL = 0.95  # metrics on: at least 95 % of the jobs/s with everything off
OFF_CALLS = 100_000


class _Sink(BaseHTTPRequestHandler):
    spans_bytes = 0

    def do_POST(self) -> None:
        _Sink.spans_bytes += len(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def settings_env(setting: str, sink: str) -> dict[str, str]:
    if setting == "off":
        return {"FARM_WORKER_METRICS_PORT": "0"}
    if setting == "traced":
        return {"FARM_OTLP_ENDPOINT": sink}
    return {}


def run(bench: Bench) -> dict:
    farm = Farm(bench.settings())
    submit = {"farm": farm_submitter(farm)}
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}"
    rounds: list[tuple[str, Round]] = []
    try:
        with TaskEvents(app) as events:
            for setting in ORDER:
                env = settings_env(setting, endpoint)
                with bench.running(["cpu", "gpu"], **env) as workers:
                    runner = Runner(events, CpuClock(bench, workers), submit)
                    runner.round("farm", WARMUP_JOBS)
                    rounds.append((setting, runner.round("farm", JOBS_PER_ROUND)))
    finally:
        sink.shutdown()
    return summarise(rounds, _Sink.spans_bytes)


def summarise(rounds: list[tuple[str, Round]], spans_bytes: int) -> dict:
    settings = ("off", "metrics", "traced")
    of = {s: [r for name, r in rounds if name == s] for s in settings}
    jobs = {s: jobs_per_s(of[s]) for s in settings}
    cpu = {s: cpu_ms_per_job(of[s]) for s in settings}
    off_cost = tracing_off_cost_ns()
    rows = [
        Row(NAME, f"jobs/s {s} / off", jobs[s], jobs["off"], ratio(jobs[s], jobs["off"]),
            f">= {GOAL}" if s == "metrics" else "info",
            ratio(jobs[s], jobs["off"]) >= GOAL if s == "metrics" else None)
        for s in ("metrics", "traced")
    ] + [
        Row(NAME, f"CPU ms/job {s} / off", cpu[s], cpu["off"], ratio(cpu[s], cpu["off"]),
            "info", None)
        for s in ("metrics", "traced")
    ]  # fmt: skip
    met = ratio(jobs["metrics"], jobs["off"]) >= GOAL
    return {
        "parameters": {"jobs_per_round": JOBS_PER_ROUND, "order": list(ORDER)},
        "rounds": [{"setting": s, "jobs": r.jobs, "wall_s": r.wall_s} for s, r in rounds],
        "jobs_per_s": jobs,
        "cpu_ms_per_job": cpu,
        "otlp_bytes_received": spans_bytes,
        "tracing_off_ns_per_stage": off_cost,
        "goal": f"jobs/s with metrics >= {GOAL} x all off",
        "met": met,
        "rows": rows,
    }


def tracing_off_cost_ns() -> float:
    """What one stage's tracing calls cost with tracing off: the stage span and its five
    children, two annotations, a rename and a carrier (this process never turns it on)."""
    assert not tracing.enabled()
    started = time.perf_counter_ns()
    for _ in range(OFF_CALLS):
        for name in ("stage", "record begin", "input read", "compute", "checkpoint write", "x"):
            with tracing.span(name, a=1):
                pass
        tracing.annotate(a=1)
        tracing.annotate(b=2)
        tracing.rename("stage x")
        tracing.carrier()
    return (time.perf_counter_ns() - started) / OFF_CALLS
