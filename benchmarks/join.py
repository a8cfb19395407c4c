"""Join: what a fan-out and its join cost, against a linear pipeline of the same stage count.

Both sides are the built-in ``fanout`` pipeline, four stages with no model on the cpu queue:

- fan: ``split -> (branch-0 || branch-1) -> join``: split's commit makes two stages ready (one
  continues in its worker, the other is sent), and the join is decided under the job's row
  lock by whichever branch commits last, then reads two artifacts;
- chain: ``split -> branch-0 -> branch-1 -> join``: every stage continues in the worker that
  ran the one before it.

One cpu worker with one child (FARM_CPU_CONCURRENCY=1), so the branches cannot run at once
and the difference is the farm's own work for a DAG, not parallelism. Measured in one run,
sides alternating (ABBA) so drift in the shared machine's load hits both alike:

- latency: single jobs, submit to done, one at a time;
- throughput: rounds of N jobs submitted at once, N / (last done - first submit).
"""

from __future__ import annotations

import time

from benchmarks.harness import Bench, Row, ratio, spread, statuses, wait_finished
from farm import Farm

NAME = "join"
LATENCY_JOBS = 20
JOBS_PER_ROUND = 40
ORDER = ("chain", "fan", "fan", "chain")
TIMEOUT_S = 600
GOAL_RATIO = 1.5  # a join may cost at most half as much again as a chain of the same length
PARAMS = {"branches": 2, "steps": 1, "queue": "cpu"}


def run(bench: Bench) -> dict:
    farm = Farm(bench.settings())
    with bench.running(["cpu"], FARM_CPU_CONCURRENCY="1"):
        for shape in ("chain", "fan"):  # warm-up, untimed: connections, imports
            _one(farm, shape, seed=0)
        latency = {shape: [] for shape in ("chain", "fan")}
        for i in range(LATENCY_JOBS):
            for shape in ("chain", "fan") if i % 2 else ("fan", "chain"):
                latency[shape].append(_one(farm, shape, seed=i + 1))
        rounds = {shape: [] for shape in ("chain", "fan")}
        for shape in ORDER:
            rounds[shape].append(_round(farm, shape))
    return summarise(latency, rounds)


def _one(farm: Farm, shape: str, seed: int) -> float:
    started = time.perf_counter()
    job = farm.submit(pipeline="fanout", shape=shape, seed=seed, **PARAMS)
    finished = wait_finished(farm.ctx.db_url, [job.id], TIMEOUT_S)
    _expect_done(farm, [job.id])
    return finished - started


def _round(farm: Farm, shape: str) -> float:
    """Jobs per second of a round of JOBS_PER_ROUND submitted at once."""
    started = time.perf_counter()
    ids = [
        farm.submit(pipeline="fanout", shape=shape, seed=1000 + i, **PARAMS).id
        for i in range(JOBS_PER_ROUND)
    ]
    finished = wait_finished(farm.ctx.db_url, ids, TIMEOUT_S, poll=0.1)
    _expect_done(farm, ids)
    return JOBS_PER_ROUND / (finished - started)


def _expect_done(farm: Farm, ids: list[str]) -> None:
    found = statuses(farm.ctx.db_url, ids)
    if found != {"done": len(ids)}:
        raise RuntimeError(f"jobs not all done: {found}")


def summarise(latency: dict[str, list[float]], rounds: dict[str, list[float]]) -> dict:
    fan_s, chain_s = _median(latency["fan"]), _median(latency["chain"])
    fan_rate, chain_rate = _mean(rounds["fan"]), _mean(rounds["chain"])
    latency_ratio = ratio(fan_s, chain_s)
    # Throughput as time per job, so that for both rows lower is better and < goal is met.
    throughput_ratio = ratio(1 / fan_rate, 1 / chain_rate)
    return {
        "parameters": {
            **PARAMS,
            "latency_jobs": LATENCY_JOBS,
            "jobs_per_round": JOBS_PER_ROUND,
            "order": list(ORDER),
            "workers": "1 cpu (prefork, 1 child)",
        },
        "latency_s": {shape: spread(values) for shape, values in latency.items()},
        "jobs_per_s": rounds,
        "latency_ratio": latency_ratio,
        "time_per_job_ratio": throughput_ratio,
        "goal": f"fan/chain per-job latency and time per job under load < {GOAL_RATIO}",
        "rows": [
            Row(NAME, "latency s (fan vs chain)", fan_s, chain_s, latency_ratio,
                f"< {GOAL_RATIO}", latency_ratio < GOAL_RATIO),
            Row(NAME, "s per job, 40 at once", 1 / fan_rate, 1 / chain_rate, throughput_ratio,
                f"< {GOAL_RATIO}", throughput_ratio < GOAL_RATIO),
        ],
    }  # fmt: skip


def _median(values: list[float]) -> float:
    return spread(values)["median"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
