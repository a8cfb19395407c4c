"""Resume: a job that failed at decode, resumed, against a full render of the same job.

Workers run with FARM_FAULT_INJECTION=1; right after submit the benchmark arms a one-shot
failure at the start of decode. The job fails there, is resumed with ``Farm.resume``, and the
resume's wall time (resume call to done) is compared with a full render's (submit to done) of
the same input, parameters and seed. Repeats alternate which of the two goes first.

The proof that nothing before decode re-ran comes from Postgres: each earlier stage keeps
attempts == 1 and the very same started_at, finished_at and checksum it had before the resume;
decode has attempts == 2. The resumed output is compared with the full render's, pixel for pixel.
"""

from __future__ import annotations

import time

import numpy as np
from sqlalchemy import select

from benchmarks.harness import Bench, Row, png_pixels, sample_png, spread, wait_finished
from farm import Farm
from farm.db.models import StageRun
from farm.db.session import session_scope
from farm.models import ensure_tiny_model
from farm.tasks import faults

NAME = "resume"
REPEATS = 3
FAIL_AT = "decode"
PARAMS = {"size": 64, "steps": 20, "strength": 0.75, "prompt": "a cat"}
TIMEOUT_S = 600


def run(bench: Bench) -> dict:
    ensure_tiny_model(bench.data_dir)
    farm = Farm(bench.settings())
    image = sample_png(PARAMS["size"], 1)
    with bench.running(["cpu", "gpu"], FARM_FAULT_INJECTION="1"):
        full_render(farm, image, seed=99)  # warm-up, untimed
        trials = [trial(farm, image, seed=i, resume_first=i % 2 == 1) for i in range(REPEATS)]
    return summarise(trials)


def trial(farm: Farm, image: bytes, seed: int, resume_first: bool) -> dict:
    if resume_first:
        resumed = fail_then_resume(farm, image, seed)
        full = full_render(farm, image, seed)
    else:
        full = full_render(farm, image, seed)
        resumed = fail_then_resume(farm, image, seed)
    same = np.array_equal(png_pixels(full["output"]), png_pixels(resumed["output"]))
    return {
        "seed": seed,
        "full_s": full["wall_s"],
        "resume_s": resumed["wall_s"],
        "proof": resumed["proof"],
        "same_output_as_full_render": bool(same),
    }


def full_render(farm: Farm, image: bytes, seed: int) -> dict:
    started = time.perf_counter()
    job = farm.submit(image, **PARAMS, seed=seed)
    finished = wait_finished(farm.ctx.db_url, [job.id], TIMEOUT_S)
    _expect(job, "done")
    return {"wall_s": finished - started, "output": job.result()}


def fail_then_resume(farm: Farm, image: bytes, seed: int) -> dict:
    job = farm.submit(image, **PARAMS, seed=seed)
    faults.arm(farm.ctx.meta, job.id, FAIL_AT, "start", "fail")  # decode is 4 stages away
    wait_finished(farm.ctx.db_url, [job.id], TIMEOUT_S)
    _expect(job, "failed")
    before = stage_records(farm, job.id)
    started = time.perf_counter()
    farm.resume(job.id)
    finished = wait_finished(farm.ctx.db_url, [job.id], TIMEOUT_S)
    _expect(job, "done")
    after = stage_records(farm, job.id)
    return {"wall_s": finished - started, "output": job.result(), "proof": proof(before, after)}


def _expect(job, status: str) -> None:
    info = job.info()
    if info.status != status:
        raise RuntimeError(f"job {job.id} is {info.status}, expected {status}: {info}")


def stage_records(farm: Farm, job_id: str) -> dict[str, tuple]:
    query = select(
        StageRun.stage,
        StageRun.position,
        StageRun.attempts,
        StageRun.started_at,
        StageRun.finished_at,
        StageRun.checksum,
    ).where(StageRun.job_id == job_id)
    with session_scope(farm.ctx.db_url) as s:
        return {row.stage: tuple(row[1:]) for row in s.execute(query)}


def proof(before: dict[str, tuple], after: dict[str, tuple]) -> dict:
    """Stages before decode: untouched records, one attempt each. Decode: a second attempt."""
    cut = before[FAIL_AT][0]
    earlier = sorted((s for s in before if before[s][0] < cut), key=lambda s: before[s][0])
    untouched = all(before[s] == after[s] for s in earlier)
    once = all(after[s][1] == 1 for s in earlier)
    return {
        "attempts_after": {s: rec[1] for s, rec in sorted(after.items(), key=lambda x: x[1][0])},
        "earlier_stages": earlier,
        "earlier_records_unchanged": untouched,
        "earlier_attempts_all_1": once,
        "decode_attempts": after[FAIL_AT][1],
        "holds": untouched and once and after[FAIL_AT][1] == 2,
    }


def summarise(trials: list[dict]) -> dict:
    full = [t["full_s"] for t in trials]
    resumed = [t["resume_s"] for t in trials]
    r = sum(resumed) / sum(full)
    holds = all(t["proof"]["holds"] and t["same_output_as_full_render"] for t in trials)
    met = holds and r < 1
    return {
        "parameters": {**PARAMS, "repeats": REPEATS, "fail_at": f"{FAIL_AT}/start"},
        "trials": trials,
        "full_render_s": spread(full),
        "resume_s": spread(resumed),
        "ratio": r,
        "goal": "no stage before decode re-ran (records untouched, attempts 1), same output, "
        "resume faster than a full render",
        "met": met,
        "rows": [
            Row(NAME, "wall s (resume vs full)", sum(resumed) / len(resumed),
                sum(full) / len(full), r, "< 1 + proof", met),
        ],
    }  # fmt: skip
