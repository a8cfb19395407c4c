"""End to end on the tiny model: 32 img2img renders through the farm against the same 32 renders
by diffusers' monolithic ``StableDiffusionImg2ImgPipeline`` in a loop in one process.

Both sides load the same tiny-model folder, render the same inputs with the same parameters and
seeds, and run torch with the same thread count (``--torch-threads``, default 1, set through
OMP_NUM_THREADS/MKL_NUM_THREADS for the workers and ``torch.set_num_threads`` here). One thread
stands in for one accelerator: the farm's CPU-side work (the cpu worker, the servers, the
orchestration) runs on the machine's other core as a GPU host's CPU would beside its GPU. With
2 threads on 2 cores both sides oversubscribe the cores and time is mostly contention.

Order: half the baseline renders, the farm batch, the other half, so a drift in the shared
machine's load reaches both sides. The staged farm run is bit-exact with the pipeline (see
tests/test_pipeline.py), so the outputs are compared pixel for pixel too: proof that both sides
did the same work.
"""

from __future__ import annotations

import io
import statistics
import time

import numpy as np
import torch
from PIL import Image
from sqlalchemy import select

from benchmarks.harness import (
    Bench,
    CpuClock,
    Row,
    png_pixels,
    ratio,
    sample_png,
    set_torch_threads,
    statuses,
    wait_finished,
)
from farm import Farm, FarmError
from farm.db.models import StageRun
from farm.db.session import session_scope
from farm.models import ensure_tiny_model
from farm.storage.verified import sha256_hex

NAME = "e2e"
GOAL_RATIO = 0.9
JOBS = 32
PARAMS = {"size": 64, "steps": 20, "strength": 0.75, "guidance": 7.5, "prompt": "a cat"}
TIMEOUT_S = 1800
POLL_S = 0.2  # at most 0.6 % of a ~35 s run; faster polling would steal the workers' CPU


def run(bench: Bench) -> dict:
    model = ensure_tiny_model(bench.data_dir)  # before the gpu worker races to build it
    set_torch_threads(bench.torch_threads)
    pipe = load_pipeline(model)
    inputs = [sample_png(PARAMS["size"], i) for i in range(JOBS)]
    farm = Farm(bench.settings())
    with bench.running(["cpu", "gpu"]) as workers:
        cpu = CpuClock(bench, workers)
        warm_up(farm, pipe, inputs[0])
        half = JOBS // 2
        first = render_baseline(pipe, inputs, range(half), cpu)
        farm_run = render_farm(farm, inputs, cpu)
        second = render_baseline(pipe, inputs, range(half, JOBS), cpu)
    return summarise(farm, farm_run, [first, second])


def load_pipeline(model):
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def warm_up(farm: Farm, pipe, image: bytes) -> None:
    """One render each, untimed: first calls pay for lazy imports, pools and allocator growth."""
    render_one(pipe, image, seed=10_000)
    job = farm.submit(image, **PARAMS, seed=10_000)
    wait_finished(farm.ctx.db_url, [job.id], TIMEOUT_S)


def render_one(pipe, image: bytes, seed: int) -> bytes:
    """What a one-process script does per image: decode, run the pipeline, encode a PNG."""
    picture = Image.open(io.BytesIO(image)).convert("RGB")
    generator = torch.Generator("cpu").manual_seed(seed)
    output = pipe(
        PARAMS["prompt"],
        image=picture,
        strength=PARAMS["strength"],
        num_inference_steps=PARAMS["steps"],
        guidance_scale=PARAMS["guidance"],
        generator=generator,
    ).images[0]
    buffer = io.BytesIO()
    output.save(buffer, format="PNG")
    return buffer.getvalue()


def render_baseline(pipe, inputs: list[bytes], indices: range, cpu: CpuClock) -> dict:
    cpu_before, started = cpu.seconds(), time.perf_counter()
    outputs = {i: render_one(pipe, inputs[i], seed=i) for i in indices}
    return {
        "images": len(outputs),
        "wall_s": time.perf_counter() - started,
        "cpu_s": cpu.seconds() - cpu_before,
        "outputs": outputs,
    }


def render_farm(farm: Farm, inputs: list[bytes], cpu: CpuClock) -> dict:
    """Submit all jobs at once and time until the last one is done (the queue drains)."""
    cpu_before, started = cpu.seconds(), time.perf_counter()
    jobs = [farm.submit(image, **PARAMS, seed=i) for i, image in enumerate(inputs)]
    submitted = time.perf_counter()
    finished = wait_finished(farm.ctx.db_url, [j.id for j in jobs], TIMEOUT_S, POLL_S)
    return {
        "images": len(jobs),
        "submit_s": submitted - started,
        "wall_s": finished - started,
        "cpu_s": cpu.seconds() - cpu_before,
        "jobs": jobs,
    }


def summarise(farm: Farm, farm_run: dict, baseline_runs: list[dict]) -> dict:
    base_images = sum(r["images"] for r in baseline_runs)
    base_wall = sum(r["wall_s"] for r in baseline_runs)
    base_ips, farm_ips = base_images / base_wall, farm_run["images"] / farm_run["wall_s"]
    r = ratio(farm_ips, base_ips)
    ids = [j.id for j in farm_run["jobs"]]
    reference = {i: out for run in baseline_runs for i, out in run["outputs"].items()}
    return {
        "parameters": {**PARAMS, "jobs": JOBS, "order": "baseline 16, farm 32, baseline 16"},
        "farm": {
            "images_per_s": farm_ips,
            "wall_s": farm_run["wall_s"],
            "submit_s": farm_run["submit_s"],
            "cpu_s_per_image": farm_run["cpu_s"] / farm_run["images"],
            "statuses": statuses(farm.ctx.db_url, ids),
            "stage_duration_ms_median": stage_durations(farm, ids),
            "gpu_worker_ms_per_image": gpu_time_account(farm, ids),
            "checksum_check": checksum_cost(farm, ids, farm_run["wall_s"]),
        },
        "baseline": {
            "images_per_s": base_ips,
            "wall_s": base_wall,
            "halves_images_per_s": [r["images"] / r["wall_s"] for r in baseline_runs],
            "cpu_s_per_image": sum(r["cpu_s"] for r in baseline_runs) / base_images,
        },
        "ratio": r,
        "identical_outputs": identical_outputs(farm_run["jobs"], reference),
        "goal": f"images/s ratio >= {GOAL_RATIO}",
        "met": r >= GOAL_RATIO,
        "rows": [Row(NAME, "images/s", farm_ips, base_ips, r, f">= {GOAL_RATIO}", r >= GOAL_RATIO)],
    }


def stage_durations(farm: Farm, ids: list[str]) -> dict[str, float]:
    """Median ``duration_s`` per stage: input read plus the stage function, in ms."""
    query = select(StageRun.stage, StageRun.duration_s).where(StageRun.job_id.in_(ids))
    with session_scope(farm.ctx.db_url) as s:
        rows = s.execute(query).all()
    by_stage: dict[str, list[float]] = {}
    for stage, duration in rows:
        if duration is not None:
            by_stage.setdefault(stage, []).append(1000 * duration)
    return {stage: statistics.median(values) for stage, values in by_stage.items()}


def gpu_time_account(farm: Farm, ids: list[str]) -> dict[str, float]:
    """Where the gpu-queue worker's time went, per image, from the stage records (database
    clock): the stage functions with their input reads (``duration_s``); the rest of each
    stage's record span (begin, checkpoint upload, commit); and the time between stages."""
    query = select(StageRun.started_at, StageRun.finished_at, StageRun.duration_s).where(
        StageRun.job_id.in_(ids), StageRun.queue == "gpu"
    )
    with session_scope(farm.ctx.db_url) as s:
        rows = s.execute(query).all()
    busy = (max(r.finished_at for r in rows) - min(r.started_at for r in rows)).total_seconds()
    spans = sum((r.finished_at - r.started_at).total_seconds() for r in rows)
    stage_fn = sum(r.duration_s for r in rows)
    per_image = 1000 / len(ids)
    return {
        "stage_functions": stage_fn * per_image,
        "checkpoint_and_records": (spans - stage_fn) * per_image,
        "between_stages": (busy - spans) * per_image,
        "first_start_to_last_finish": busy * per_image,
    }


def checksum_cost(farm: Farm, ids: list[str], wall_s: float) -> dict[str, float]:
    """What checking reads against their recorded sha256 costs (farm/storage/verified.py):
    sha256 timed here over every checkpoint and output these jobs wrote, each read once by
    the next stage or the client. An upper bound: a gpu worker's cache hits are not checked."""
    query = select(StageRun.artifact_key).where(StageRun.job_id.in_(ids))
    with session_scope(farm.ctx.db_url) as s:
        blobs = [farm.ctx.store.get(key) for key in s.scalars(query)]
    started = time.perf_counter()
    for blob in blobs:
        sha256_hex(blob)
    per_image_ms = 1000 * (time.perf_counter() - started) / len(ids)
    return {
        "bytes_per_image": sum(map(len, blobs)) / len(ids),
        "ms_per_image": per_image_ms,
        "share_of_farm_time": per_image_ms / (1000 * wall_s / len(ids)),
    }


def identical_outputs(jobs: list, reference: dict[int, bytes]) -> str:
    """How many farm outputs equal the baseline's picture pixel for pixel."""
    same = sum(_same(job, reference[i]) for i, job in enumerate(jobs))
    return f"{same}/{len(jobs)}"


def _same(job, reference: bytes) -> bool:
    try:
        return np.array_equal(png_pixels(job.result()), png_pixels(reference))
    except FarmError:  # not done: counted as different, its status is in the results
        return False
