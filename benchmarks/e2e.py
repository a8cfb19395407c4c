"""End to end on the tiny model: 32 img2img renders through the farm, with the GPU engine
batching up to 8 jobs per model call (FARM_GPU_BATCH=8, the default) and with one job per call
(FARM_GPU_BATCH=1), against the same 32 renders by diffusers' ``StableDiffusionImg2ImgPipeline``
in one process: in a naive loop (one image per call) and hand-batched (8 images per call: lists
of 8 images, prompts and generators, each generator seeded as the farm seeds its job).

All sides load the same tiny-model folder, render the same inputs with the same parameters and
seeds, and run torch with the same thread count (``--torch-threads``, default 1, set through
OMP_NUM_THREADS/MKL_NUM_THREADS for the workers and ``torch.set_num_threads`` here). One thread
stands in for one accelerator: the farm's CPU-side work (the cpu worker, the servers, the
orchestration) runs on the machine's other core as a GPU host's CPU would beside its GPU. With
2 threads on 2 cores both sides oversubscribe the cores and time is mostly contention. A CPU
is compute-bound at any batch size, so on one batching buys nothing: the batched sides are
expected at parity with the loop here, and only a GPU shows what batching gains.

Order: half of the loop, half of the hand-batched renders, the farm at batch 8, the farm at
batch 1 (its gpu worker restarted with FARM_GPU_BATCH=1), the other halves in reverse, so a
drift in the shared machine's load reaches every side. At batch 1 the farm is bit-exact with
the pipeline (tests/test_pipeline.py), so its outputs are compared pixel for pixel; batched
kernels round differently, so at batch 8 the outputs are compared within farm.engine's
PIXEL_BOUND and the largest difference is reported. While jobs still wait in the gpu queue, the
gpu worker's heartbeats give the share of its time spent inside model calls (GPU-busy fraction).
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from sqlalchemy import select

from benchmarks.harness import (
    Bench,
    CpuClock,
    EngineBeats,
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
from farm.engine import PIXEL_BOUND
from farm.models import ensure_tiny_model
from farm.storage.verified import sha256_hex

NAME = "e2e"
GOAL_RATIO = 0.9
GOAL_BUSY = 0.97  # with checkpoints off the critical path
JOBS = 32
BATCH = 8  # the farm's default FARM_GPU_BATCH, and the hand-batched pipeline's batch
PARAMS = {"size": 64, "steps": 20, "strength": 0.75, "guidance": 7.5, "prompt": "a cat"}
TIMEOUT_S = 1800
POLL_S = 0.2  # at most 0.6 % of a ~35 s run; faster polling would steal the workers' CPU

Render = Callable[..., dict[int, bytes]]


def run(bench: Bench) -> dict:
    model = ensure_tiny_model(bench.data_dir)  # before the gpu worker races to build it
    set_torch_threads(bench.torch_threads)
    pipe = load_pipeline(model)
    inputs = [sample_png(PARAMS["size"], i) for i in range(JOBS)]
    first, second = range(JOBS // 2), range(JOBS // 2, JOBS)
    farm = Farm(bench.settings())
    loop, batched, farm_runs = [], [], {}
    with bench.running(["cpu"]) as cpu_worker:
        for batch in (BATCH, 1):
            with bench.running(["gpu"], FARM_GPU_BATCH=str(batch)) as gpu:
                clock = CpuClock(bench, cpu_worker + gpu)
                if batch == BATCH:
                    warm_up(pipe, inputs[0])
                    loop.append(render_baseline(render_loop, pipe, inputs, first, clock))
                    batched.append(render_baseline(render_batched, pipe, inputs, first, clock))
                warm_up_farm(farm, inputs[0])
                farm_runs[batch] = render_farm(bench, farm, inputs, gpu[0].name, clock)
                if batch == 1:
                    batched.append(render_baseline(render_batched, pipe, inputs, second, clock))
                    loop.append(render_baseline(render_loop, pipe, inputs, second, clock))
    return summarise(farm, farm_runs, loop, batched)


def load_pipeline(model):
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def warm_up(pipe, image: bytes) -> None:
    """Untimed: first calls pay for lazy imports and allocator growth (a batch of 8 more)."""
    render_loop(pipe, [image], [0])
    render_batched(pipe, [image] * BATCH, range(BATCH), steps=4)


def warm_up_farm(farm: Farm, image: bytes) -> None:
    job = farm.submit(image, **PARAMS, seed=10_000)
    wait_finished(farm.ctx.db_url, [job.id], TIMEOUT_S)


def render_loop(pipe, inputs: list[bytes], indices) -> dict[int, bytes]:
    """What a one-process script does per image: decode, run the pipeline, encode a PNG."""
    outputs = {}
    for i in indices:
        generator = torch.Generator("cpu").manual_seed(i)
        image = _call(pipe, [inputs[i]], generator, PARAMS["steps"])[0]
        outputs[i] = _png(image)
    return outputs


def render_batched(pipe, inputs: list[bytes], indices, steps: int = 0) -> dict[int, bytes]:
    """The same renders BATCH images per call: lists of images and prompts, and one generator
    per image seeded as the farm seeds that job (diffusers draws each image's latents and noise
    from its own generator, as the farm's stages do)."""
    indices, outputs = list(indices), {}
    for start in range(0, len(indices), BATCH):
        chunk = indices[start : start + BATCH]
        generators = [torch.Generator("cpu").manual_seed(i) for i in chunk]
        images = _call(pipe, [inputs[i] for i in chunk], generators, steps or PARAMS["steps"])
        outputs |= {i: _png(image) for i, image in zip(chunk, images, strict=True)}
    return outputs


def _call(pipe, images: list[bytes], generator, steps: int) -> list[Image.Image]:
    pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    single = len(pictures) == 1  # exactly the call a one-image script makes
    return pipe(
        PARAMS["prompt"] if single else [PARAMS["prompt"]] * len(pictures),
        image=pictures[0] if single else pictures,
        strength=PARAMS["strength"],
        num_inference_steps=steps,
        guidance_scale=PARAMS["guidance"],
        generator=generator,
    ).images


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render_baseline(render: Render, pipe, inputs: list[bytes], indices, clock: CpuClock) -> dict:
    cpu_before, started = clock.seconds(), time.perf_counter()
    outputs = render(pipe, inputs, indices)
    return {
        "images": len(outputs),
        "wall_s": time.perf_counter() - started,
        "cpu_s": clock.seconds() - cpu_before,
        "outputs": outputs,
    }


def render_farm(bench: Bench, farm: Farm, inputs: list[bytes], gpu: str, clock: CpuClock) -> dict:
    """Submit all jobs at once and time until the last one is done (the queue drains), with
    the gpu worker's heartbeats sampled meanwhile for its busy fraction."""
    beats = EngineBeats(bench, gpu)
    beats.start()
    cpu_before, started = clock.seconds(), time.perf_counter()
    try:
        jobs = [farm.submit(image, **PARAMS, seed=i) for i, image in enumerate(inputs)]
        submitted = time.perf_counter()
        finished = wait_finished(farm.ctx.db_url, [j.id for j in jobs], TIMEOUT_S, POLL_S)
    finally:
        engine = beats.stop()
    return {
        "images": len(jobs),
        "submit_s": submitted - started,
        "wall_s": finished - started,
        "cpu_s": clock.seconds() - cpu_before,
        "engine": engine,
        "jobs": jobs,
    }


def summarise(farm: Farm, farm_runs: dict[int, dict], loop: list[dict], batched: list[dict]):
    loop_ips, batched_ips = _images_per_s(loop), _images_per_s(batched)
    reference = {i: out for half in loop for i, out in half["outputs"].items()}
    farms = {batch: farm_summary(farm, run, reference) for batch, run in farm_runs.items()}
    batched_pixels = compare({i: o for h in batched for i, o in h["outputs"].items()}, reference)
    main = farms[BATCH]
    r = ratio(main["images_per_s"], loop_ips)
    return {
        "parameters": {
            **PARAMS,
            "jobs": JOBS,
            "batch": BATCH,
            "order": "loop 16, batched 16, farm batch 8 (32), farm batch 1 (32), "
            "batched 16, loop 16",
            "pixel_bound": PIXEL_BOUND,
        },
        "farm": {str(batch): summary for batch, summary in farms.items()},
        "baseline": _baseline_summary(loop),
        "batched": {**_baseline_summary(batched), "pixels_vs_loop": batched_pixels},
        "ratio": r,
        "goal": f"images/s ratio (farm at batch {BATCH} vs loop) >= {GOAL_RATIO}",
        "met": r >= GOAL_RATIO,
        "rows": rows(farms, loop_ips, batched_ips),
    }


def farm_summary(farm: Farm, run: dict, reference: dict[int, bytes]) -> dict:
    ids = [j.id for j in run["jobs"]]
    return {
        "images_per_s": run["images"] / run["wall_s"],
        "wall_s": run["wall_s"],
        "submit_s": run["submit_s"],
        "cpu_s_per_image": run["cpu_s"] / run["images"],
        "statuses": statuses(farm.ctx.db_url, ids),
        "stage_duration_ms_median": stage_durations(farm, ids),
        "shared_calls": shared_calls(farm, ids),
        "gpu_worker_ms_per_image": gpu_time_account(farm, ids),
        "checksum_check": checksum_cost(farm, ids, run["wall_s"]),
        "pixels_vs_loop": compare(farm_outputs(run["jobs"]), reference),
        "engine": run["engine"],
    }


def rows(farms: dict[int, dict], loop_ips: float, batched_ips: float) -> list[Row]:
    ips, alone_ips = farms[BATCH]["images_per_s"], farms[1]["images_per_s"]
    r_loop, r_alone = ratio(ips, loop_ips), ratio(alone_ips, loop_ips)
    pixels, exact = farms[BATCH]["pixels_vs_loop"], farms[1]["pixels_vs_loop"]
    busy, busy_alone = (farms[b]["engine"]["busy_fraction"] for b in (BATCH, 1))
    b = f"batch {BATCH}"
    return [
        Row(NAME, f"images/s, farm {b} vs loop", ips, loop_ips, r_loop, f">= {GOAL_RATIO}",
            r_loop >= GOAL_RATIO),
        Row(NAME, f"images/s, farm {b} vs diffusers {b}", ips, batched_ips,
            ratio(ips, batched_ips), "info", None),
        Row(NAME, f"images/s, diffusers {b} vs loop", batched_ips, loop_ips,
            ratio(batched_ips, loop_ips), "info", None),
        Row(NAME, "images/s, farm batch 1 vs loop", alone_ips, loop_ips, r_alone,
            f">= {GOAL_RATIO}", r_alone >= GOAL_RATIO),
        Row(NAME, f"max pixel difference, farm {b} vs loop", pixels["max_difference"], None,
            None, f"<= {PIXEL_BOUND}", pixels["within_bound"]),
        Row(NAME, "pixel-identical outputs, farm batch 1", exact["identical"], JOBS, None,
            f"{JOBS}/{JOBS}", exact["identical"] == JOBS),
        Row(NAME, f"GPU-busy fraction, farm {b}, queue full", _nan(busy), None, None,
            f">= {GOAL_BUSY}", None if busy is None else busy >= GOAL_BUSY),
        Row(NAME, "GPU-busy fraction, farm batch 1, queue full", _nan(busy_alone), None, None,
            "info", None),
    ]  # fmt: skip


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _images_per_s(halves: list[dict]) -> float:
    return sum(h["images"] for h in halves) / sum(h["wall_s"] for h in halves)


def _baseline_summary(halves: list[dict]) -> dict:
    images = sum(h["images"] for h in halves)
    return {
        "images_per_s": _images_per_s(halves),
        "wall_s": sum(h["wall_s"] for h in halves),
        "halves_images_per_s": [h["images"] / h["wall_s"] for h in halves],
        "cpu_s_per_image": sum(h["cpu_s"] for h in halves) / images,
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


def shared_calls(farm: Farm, ids: list[str]) -> dict[str, dict[str, float]]:
    """Per gpu stage, from its records: model calls per job and mean jobs per call."""
    query = select(StageRun.stage, StageRun.model_calls, StageRun.jobs_per_call).where(
        StageRun.job_id.in_(ids), StageRun.model_calls.is_not(None)
    )
    with session_scope(farm.ctx.db_url) as s:
        rows = s.execute(query).all()
    by_stage: dict[str, list[tuple[int, float]]] = {}
    for stage, calls, jobs_per_call in rows:
        by_stage.setdefault(stage, []).append((calls, jobs_per_call))
    return {
        stage: {
            "model_calls_per_job": sum(c for c, _ in pairs) / len(pairs),
            "jobs_per_call": sum(c * j for c, j in pairs) / sum(c for c, _ in pairs),
        }
        for stage, pairs in by_stage.items()
    }


def gpu_time_account(farm: Farm, ids: list[str]) -> dict[str, float]:
    """Where the gpu-queue worker's time went, per image, from the stage records (database
    clock): the stage functions with their input reads (``duration_s``); the rest of each
    stage's record span (begin, checkpoint upload, commit); and the time between stages.
    With more than one job in the worker at once the spans overlap, so "between_stages" goes
    negative: the account is a sequence of stages only at FARM_GPU_BATCH=1."""
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


def farm_outputs(jobs: list) -> dict[int, bytes | None]:
    """Each job's output PNG; None for a job that is not done (its status is in the results)."""
    outputs: dict[int, bytes | None] = {}
    for i, job in enumerate(jobs):
        try:
            outputs[i] = job.result()
        except FarmError:
            outputs[i] = None
    return outputs


def compare(outputs: dict[int, bytes | None], reference: dict[int, bytes]) -> dict:
    """How far outputs are from the reference renders: identical pictures, the largest
    difference of any channel in 8-bit levels, and the share of pixels that differ at all."""
    identical, largest, differing, pixels = 0, 0, 0, 0
    for i, data in outputs.items():
        if data is None:
            continue
        a, b = png_pixels(data).astype(np.int16), png_pixels(reference[i]).astype(np.int16)
        difference = np.abs(a - b)
        identical += not difference.any()
        largest = max(largest, int(difference.max()))
        differing += int(difference.any(axis=-1).sum())
        pixels += difference.shape[0] * difference.shape[1]
    rendered = sum(data is not None for data in outputs.values())
    return {
        "identical": identical,
        "compared": rendered,
        "of": len(outputs),
        "max_difference": largest,
        "differing_pixel_fraction": differing / pixels if pixels else None,
        "within_bound": rendered == len(outputs) and largest <= PIXEL_BOUND,
    }
