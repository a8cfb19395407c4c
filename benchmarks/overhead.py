"""Overhead: the farm's ``noop`` pipeline against a bare Celery chain of six no-op tasks.

Both sides run on the same broker and the same two worker processes (one cpu worker, prefork
with one child per core, and one gpu-queue worker, solo pool), with the same queue order
(cpu, gpu, gpu, gpu, gpu, cpu):

- farm: ``Farm.submit(1 KiB, pipeline="noop")``; every stage takes a lease, records its start
  and end in Postgres, reads and writes a small artifact in S3, publishes progress in Redis and
  enqueues the next stage (the real wrapper, with a stage function that does nothing);
- bare: ``chain(farm.cpu.ping.si(tag, stage), farm.gpu.ping.si(...), ...)``: six immutable
  signatures, the next link travelling in the message as Celery chains do.

What is measured (all from Celery task events, see events.py, so both sides share one clock):

- throughput: rounds of N jobs submitted at once, in the order bare, farm, farm, bare so drift
  in the shared machine's load hits both sides alike; jobs/s = N / (last final-stage success
  - first submit);
- per-stage span, unloaded: single jobs, one at a time, alternating sides; a stage's span is
  from the previous stage's success to its own (the broker hop plus the task), stages 2-6;
- in-task runtime under load: the worker's own ``runtime`` of each task (the farm's wrapper
  versus a function returning "pong");
- CPU seconds per job, summed over every process of the run (workers, servers, this one):
  on a 2-core machine this, not latency, bounds throughput;
- from the farm's stage_runs: ``duration_s`` (reading the input artifact plus the stage
  function) and proof that every stage ran once;
- where a stage's time goes (stage_cost.py): the same stages run in this process, before the
  workers start, with a stopwatch on each kind of I/O.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from celery import chain
from sqlalchemy import select

from benchmarks import stage_cost
from benchmarks.events import TaskEvents, TaskTimes
from benchmarks.harness import Bench, CpuClock, Row, cpu_delta, percentile, ratio
from farm import Farm
from farm.builtin import NOOP
from farm.db.models import StageRun
from farm.db.session import session_scope
from farm.tasks.app import app

NAME = "overhead"
GOAL_RATIO = 0.5
JOBS_PER_ROUND = 100
ORDER = ("bare", "farm", "farm", "bare")  # ABBA: a linear drift in load costs both sides alike
WARMUP_JOBS = 4  # opens every process's connections (DB pool, S3 client) before timing
LATENCY_JOBS = 20
PROFILE_JOBS = 30
ROUND_TIMEOUT_S = 600
STAGES = [(spec.name, spec.queue) for spec in NOOP.stages]
FINAL = STAGES[-1][0]
PAYLOAD = bytes(range(256)) * 4  # the "small artifact": 1 KiB carried through every stage
PARAMETERS = {
    "jobs_per_round": JOBS_PER_ROUND,
    "order": list(ORDER),
    "latency_jobs": LATENCY_JOBS,
    "payload_bytes": len(PAYLOAD),
    "workers": "1 cpu (prefork, 1 child per core) + 1 gpu queue (solo)",
    "stages": [f"{stage}@{queue}" for stage, queue in STAGES],
}

Submit = Callable[[int], set[str]]


@dataclass(frozen=True)
class Round:
    side: str
    jobs: int
    submit_s: float
    wall_s: float
    cpu_s: dict[str, float]  # by process: benchmark, workers, redis-server, postgres, weed
    tags: frozenset[str]


def bare_submit(count: int) -> set[str]:
    """Six ping tasks per chain, routed like the noop pipeline; the tag names the chain."""
    tags = set()
    for _ in range(count):
        tag = uuid.uuid4().hex
        links = [
            app.signature(f"farm.{queue}.ping", args=(tag, stage), queue=queue, immutable=True)
            for stage, queue in STAGES
        ]
        chain(*links).apply_async()
        tags.add(tag)
    return tags


def farm_submitter(farm: Farm) -> Submit:
    def submit(count: int) -> set[str]:
        return {farm.submit(PAYLOAD, pipeline="noop").id for _ in range(count)}

    return submit


@dataclass
class Runner:
    events: TaskEvents
    cpu: CpuClock
    sides: dict[str, Submit]

    def round(self, side: str, count: int) -> Round:
        cpu_before = self.cpu.by_process()
        started = time.time()  # wall clock: the events carry the workers' time.time()
        tags = self.sides[side](count)
        submitted = time.time()
        finished = self.events.wait(tags, FINAL, ROUND_TIMEOUT_S)
        wall = max(finished.values()) - started
        cpu = cpu_delta(cpu_before, self.cpu.by_process())
        return Round(side, count, submitted - started, wall, cpu, frozenset(tags))


def run(bench: Bench) -> dict:
    farm = Farm(bench.settings())
    # Before any worker consumes the queues: these stages run in this process.
    breakdown = stage_cost.measure(farm, PROFILE_JOBS, PAYLOAD)
    sides = {"bare": bare_submit, "farm": farm_submitter(farm)}
    with bench.running(["cpu", "gpu"]) as workers, TaskEvents(app) as events:
        runner = Runner(events, CpuClock(bench, workers), sides)
        for side in ("bare", "farm"):
            runner.round(side, WARMUP_JOBS)
        rounds = [runner.round(side, JOBS_PER_ROUND) for side in ORDER]
        latency = [runner.round(side, 1) for _ in range(LATENCY_JOBS) for side in ("bare", "farm")]
        result = summarise(events, rounds, latency, farm)
    return {**result, "farm_stage_breakdown_in_process": breakdown}


# -- analysis ------------------------------------------------------------------------------------


def summarise(events: TaskEvents, rounds: list[Round], latency: list[Round], farm: Farm) -> dict:
    def of(group: list[Round], side: str) -> list[Round]:
        return [r for r in group if r.side == side]

    sides = ("farm", "bare")
    throughput = {side: jobs_per_s(of(rounds, side)) for side in sides}
    spans = {
        "farm": _p50_p95(record_spans(farm, of(latency, "farm"))),
        "bare": _p50_p95(stage_spans(events, of(latency, "bare"))),
    }
    cpu_ms = {side: cpu_ms_per_job(of(rounds, side)) for side in sides}
    jobs_ratio = ratio(throughput["farm"], throughput["bare"])
    return {
        "parameters": PARAMETERS,
        "rounds": [_round_dict(r) for r in rounds],
        "jobs_per_s": throughput,
        "ratio": jobs_ratio,
        "per_stage_span_ms": {
            **spans,
            "overhead": {q: spans["farm"][q] - spans["bare"][q] for q in ("p50", "p95")},
        },
        # a farm delivery runs its stage and any next ones on the same queue (noop2-5: one)
        "task_runtime_ms": {s: _p50_p95(task_runtimes(events, of(rounds, s))) for s in sides},
        "broker_messages_per_job": {s: messages_per_job(events, of(rounds, s)) for s in sides},
        "cpu_ms_per_job": cpu_ms,
        "cpu_ms_per_job_by_process": {s: cpu_by_process(of(rounds, s)) for s in sides},
        # unloaded, submit to done: the submit call itself plus six hops and six tasks
        "job_latency_ms": {s: _p50_p95([1000 * r.wall_s for r in of(latency, s)]) for s in sides},
        "farm_stage_records": farm_records(farm, of(rounds, "farm")),
        "goal": f"jobs/s ratio >= {GOAL_RATIO}",
        "met": jobs_ratio >= GOAL_RATIO,
        "rows": summary_rows(throughput, spans, cpu_ms),
    }


def summary_rows(throughput: dict, spans: dict, cpu_ms: dict) -> list[Row]:
    jobs_ratio = ratio(throughput["farm"], throughput["bare"])
    goal = f">= {GOAL_RATIO}"
    out = [Row(NAME, "jobs/s", throughput["farm"], throughput["bare"], jobs_ratio, goal,
               jobs_ratio >= GOAL_RATIO)]  # fmt: skip
    for q in ("p50", "p95"):
        farm, bare = spans["farm"][q], spans["bare"][q]
        out.append(Row(NAME, f"stage span {q} ms", farm, bare, ratio(farm, bare), "info", None))
    farm, bare = cpu_ms["farm"], cpu_ms["bare"]
    out.append(Row(NAME, "CPU ms per job", farm, bare, ratio(farm, bare), "info", None))
    return out


def jobs_per_s(rounds: list[Round]) -> float:
    return sum(r.jobs for r in rounds) / sum(r.wall_s for r in rounds)


def cpu_ms_per_job(rounds: list[Round]) -> float:
    return 1000 * sum(sum(r.cpu_s.values()) for r in rounds) / sum(r.jobs for r in rounds)


def cpu_by_process(rounds: list[Round]) -> dict[str, float]:
    jobs = sum(r.jobs for r in rounds)
    labels = {label for r in rounds for label in r.cpu_s}
    return {
        label: round(1000 * sum(r.cpu_s.get(label, 0.0) for r in rounds) / jobs, 2)
        for label in sorted(labels)
    }


def _by_tag(events: TaskEvents, tags: set[str]) -> dict[str, dict[str, TaskTimes]]:
    out: dict[str, dict[str, TaskTimes]] = {}
    for times in events.select(tags):
        out.setdefault(times.tag, {})[times.stage] = times
    return out


def stage_spans(events: TaskEvents, rounds: list[Round]) -> list[float]:
    """ms from each stage's predecessor succeeding to the stage succeeding (stages 2..6)."""
    tags = {tag for r in rounds for tag in r.tags}
    names = [stage for stage, _ in STAGES]
    spans = []
    for stages in _by_tag(events, tags).values():
        for before, after in itertools.pairwise(names):
            spans.append(1000 * (stages[after].succeeded - stages[before].succeeded))
    return spans


def record_spans(farm: Farm, rounds: list[Round]) -> list[float]:
    """The same spans from the farm's own records (a stage that continued in the worker
    that ran the one before it sends no task event): ms between consecutive stages'
    ``finished_at``."""
    ids = [tag for r in rounds for tag in r.tags]
    query = (
        select(StageRun.job_id, StageRun.finished_at)
        .where(StageRun.job_id.in_(ids))
        .order_by(StageRun.job_id, StageRun.position)
    )
    with session_scope(farm.ctx.db_url) as s:
        rows = s.execute(query).all()
    spans = []
    for _, group in itertools.groupby(rows, key=lambda row: row.job_id):
        finished = [row.finished_at for row in group]
        spans += [1000 * (b - a).total_seconds() for a, b in itertools.pairwise(finished)]
    return spans


def messages_per_job(events: TaskEvents, rounds: list[Round]) -> float:
    tags = {tag for r in rounds for tag in r.tags}
    return len(events.select(tags)) / len(tags)


def task_runtimes(events: TaskEvents, rounds: list[Round]) -> list[float]:
    """ms each task's function ran, as its worker measured it."""
    tags = {tag for r in rounds for tag in r.tags}
    return [1000 * t.runtime for t in events.select(tags) if t.runtime is not None]


def farm_records(farm: Farm, rounds: list[Round]) -> dict:
    """From Postgres: every stage done exactly once, and what the stage itself took."""
    ids = [tag for r in rounds for tag in r.tags]
    query = select(StageRun.status, StageRun.attempts, StageRun.duration_s).where(
        StageRun.job_id.in_(ids)
    )
    with session_scope(farm.ctx.db_url) as s:
        rows = s.execute(query).all()
    return {
        "stage_runs": len(rows),
        "all_done_once": all(status == "done" and n == 1 for status, n, _ in rows),
        "input_read_plus_stage_fn_ms": _p50_p95([1000 * d for _, _, d in rows if d is not None]),
    }


def _p50_p95(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "n": len(values)}


def _round_dict(r: Round) -> dict:
    return {
        "side": r.side,
        "jobs": r.jobs,
        "submit_s": round(r.submit_s, 3),
        "wall_s": round(r.wall_s, 3),
        "cpu_s": r.cpu_s,
        "jobs_per_s": round(r.jobs / r.wall_s, 2),
    }
