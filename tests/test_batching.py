"""Batching across jobs on real workers: a gpu worker (FARM_GPU_BATCH=8, its engine batching
every model call of its threads), a cpu worker, the real stack, the tiny model.

The engine's test hook slows every tick (``stall``) so that jobs of a few milliseconds a step
overlap for as long as a test needs, and runs out of memory on demand (``oom``). Every output
is compared with the same job rendered alone in this process, within the documented bound.
"""

from __future__ import annotations

import json
import time

import pytest

from farm.models import load_model
from farm.params import RenderParams
from farm.tasks import faults
from tests.helpers import pixels, sample_png, wait_for_step, wait_until, within_bound
from tests.test_cli import run_farm
from tests.test_engine import mixed_jobs, render_alone

pytestmark = pytest.mark.slow
GPU_STAGES = ("encode", "noise", "denoise", "decode")


@pytest.fixture
def gpu(workers, meta):
    """A fresh gpu worker, so its engine counts from zero, and a cpu worker."""
    workers.ensure("cpu")
    worker = workers.replace_all("gpu")[0]
    yield worker
    faults.disarm_engine(meta)


@pytest.fixture(scope="module")
def bundle(settings):
    return load_model(None, settings.data_dir, device="cpu")


def assert_as_alone(job, data: bytes, params: dict, bundle) -> None:
    """Done, one done record per stage, and its pixels within the bound of a solo render."""
    info = job.wait(timeout=240)
    assert info.status == "done", (info.error_code, info.error_message)
    assert all(stage.status == "done" for stage in job.stages())
    alone = render_alone(data, RenderParams.from_dict(params), bundle)
    assert within_bound(pixels(job.result()), alone)


def all_preprocessed(jobs) -> bool:
    return all(stage_of(job, "preprocess").status == "done" for job in jobs)


def stage_of(job, name: str):
    return next(s for s in job.stages() if s.name == name)


def engine_stats(meta, worker, after: float) -> dict:
    """The worker's engine counters, from its first heartbeat after ``after`` that has them."""
    beats: list[dict] = []

    def fresh() -> bool:  # the worker beats before its model is warm and its engine runs
        beats[:] = [
            w
            for w in meta.workers()
            if w["name"] == worker.name and w["at"] > after and "engine" in w
        ]
        return bool(beats)

    wait_until(fresh, 30, "a heartbeat of the gpu worker")
    return beats[0]["engine"]


def test_mixed_jobs_share_model_calls_and_match_their_solo_renders(
    farm, gpu, workers, meta, bundle
) -> None:
    # The eight wait preprocessed for a gpu worker, which then takes them all at once: how much
    # they share must not depend on how fast the cpu worker got each one ready.
    workers.kill(gpu)
    faults.arm_engine(meta, "stall:0.02")
    jobs = [(data, params.to_dict()) for data, params in mixed_jobs()]
    submitted = [farm.submit(data, **params) for data, params in jobs]
    wait_until(lambda: all_preprocessed(submitted), 120, "the eight jobs preprocessed")
    gpu = workers.start("gpu")
    for job, (data, params) in zip(submitted, jobs, strict=True):
        assert_as_alone(job, data, params, bundle)
    joined = [stage_of(job, "denoise") for job in submitted]
    calls_alone = sum(stage.model_calls for stage in joined)  # one per step, per job
    stats = engine_stats(meta, gpu, after=time.time())
    assert stats["unet_calls"] < calls_alone / 2
    assert sum(stage.jobs_per_call > 1 for stage in joined) >= 6


def test_a_job_submitted_mid_denoise_joins_the_running_ticks(farm, gpu, meta, bundle) -> None:
    faults.arm_engine(meta, "stall:0.05")  # the first job's 100 steps take five seconds
    long = {"size": 64, "steps": 100, "strength": 1.0, "scheduler": "ddim", "prompt": "long"}
    late = {"size": 64, "steps": 8, "strength": 1.0, "scheduler": "ddim", "prompt": "late"}
    first = farm.submit(sample_png(hue=30), **long)
    wait_for_step(first, "denoise", 3, timeout=120)
    second = farm.submit(sample_png(hue=31), **late)
    assert second.wait(timeout=120).status == "done"
    assert first.progress().stage == "denoise"  # still rendering: the two shared its ticks
    shared = stage_of(second, "denoise")
    assert shared.model_calls == 8 and shared.jobs_per_call > 1.5
    faults.disarm_engine(meta)
    assert_as_alone(first, sample_png(hue=30), long, bundle)
    assert stage_of(first, "denoise").jobs_per_call > 1


def test_cancelling_one_job_mid_batch_leaves_the_others_running(farm, gpu, meta) -> None:
    faults.arm_engine(meta, "stall:0.05")
    params = {"size": 64, "steps": 40, "strength": 1.0, "prompt": "three at once"}
    jobs = [farm.submit(sample_png(hue=40 + i), seed=i, **params) for i in range(3)]
    for job in jobs:
        wait_for_step(job, "denoise", 2, timeout=120)
    farm.cancel(jobs[1])
    assert [job.wait(timeout=120).status for job in jobs] == ["done", "cancelled", "done"]
    assert stage_of(jobs[1], "denoise").status == "cancelled"


def test_gpu_worker_killed_mid_batch_with_uploads_pending(farm, gpu, workers, meta, bundle):
    faults.arm_engine(meta, "stall:0.05")
    short = {"size": 64, "steps": 6, "strength": 1.0, "prompt": "short", "scheduler": "ddim"}
    long = {**short, "steps": 60, "prompt": "long"}
    inputs = [(sample_png(hue=50 + i), params) for i, params in enumerate([short, short, long])]
    jobs = [farm.submit(data, **params) for data, params in inputs]
    for job in jobs[:2]:  # their denoise checkpoints wait to be uploaded when the worker dies
        faults.arm(meta, job.id, "denoise", "upload", "stall:60")
    for job in jobs:
        wait_for_step(job, "denoise", 3, timeout=120)
    wait_until(lambda: all(stage_of(j, "denoise").status == "running" for j in jobs), 30, "")
    time.sleep(1)  # the short jobs' last steps: done computing, their uploads pending
    workers.kill(gpu)
    for job in jobs[:2]:
        faults.disarm(meta, job.id, "denoise", "upload")
    faults.disarm_engine(meta)
    workers.start("gpu")
    for job, (data, params) in zip(jobs, inputs, strict=True):
        assert_as_alone(job, data, params, bundle)
        assert stage_of(job, "denoise").attempts == 2


def test_out_of_memory_halves_the_batch_and_every_job_finishes(farm, gpu, meta, bundle) -> None:
    faults.arm_engine(meta, "oom:2,stall:0.02")  # more than two jobs in a call do not fit
    params = {"size": 64, "steps": 20, "strength": 1.0, "prompt": "tight memory"}
    inputs = [(sample_png(hue=60 + i), {**params, "seed": i}) for i in range(6)]
    jobs = [farm.submit(data, **p) for data, p in inputs]
    for job, (data, p) in zip(jobs, inputs, strict=True):
        assert_as_alone(job, data, p, bundle)
    stats = engine_stats(meta, gpu, after=time.time())
    assert stats["out_of_memory"] >= 1 and stats["lowest_cap"] <= 2


def test_farm_workers_shows_each_gpu_engine(farm_env, gpu, meta) -> None:
    engine_stats(meta, gpu, after=time.time())  # a beat of the new worker, engine running
    shown = run_farm(["workers", "--json"], farm_env)
    assert shown.returncode == 0, shown.stderr
    [beat] = [w for w in json.loads(shown.stdout) if w["name"] == gpu.name]
    assert beat["role"] == "gpu" and beat["engine"]["batch_limit"] == 8
    table = run_farm(["workers"], farm_env)
    assert table.returncode == 0 and "8/8" in table.stdout, table.stdout + table.stderr
