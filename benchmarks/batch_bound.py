"""The reproducibility bound of batching: how far a job rendered through the GPU engine, in
batched model calls with other jobs, lands from the same job rendered alone.

In this process, on the tiny model: a mixed workload of img2img jobs (steps 4-30, strengths,
every scheduler, guidance on and off, different prompts and seeds, two output sizes) is rendered
(i) one job at a time, the stage functions called directly with no engine, and (ii) all at once,
each job on its own thread as a gpu worker's threads run them, every stage inside
``farm.engine.joined`` of an engine batching up to 8 jobs per model call. Between stages each
artifact goes through safetensors, as it does through the store. The largest difference of any
pixel channel in 8-bit levels is the bound ``farm.engine.PIXEL_BOUND`` states; the engine's
model calls are counted against the calls the jobs make alone (forward hooks on the UNet, VAE
encoder and decoder and text encoder) and against the sum of their denoising steps.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image
from safetensors.torch import load, save

from benchmarks.harness import Bench, Row, png_bytes, ratio, set_torch_threads
from farm import engine
from farm.engine import PIXEL_BOUND
from farm.models import ModelBundle, load_model
from farm.params import SCHEDULER_NAMES, RenderParams
from farm.stages import STAGES, Artifact, NoHooks

NAME = "batch_bound"
CAP = 8  # the default FARM_GPU_BATCH
JOBS = 16  # two per call at least, on each of the two sizes
SIZES = (64, 96)  # output long side, from 96x64 inputs: 64x40 and 96x64
STRENGTHS = (0.3, 0.5, 0.6, 0.75, 0.8, 0.9, 1.0)
GUIDANCE = (7.5, 1.0, 3.0, 7.5, 1.0, 5.0, 7.5, 2.0)  # 1.0: no guidance, one UNet row
IMG2IMG = ("preprocess", "encode", "noise", "denoise", "decode", "postprocess")
TIMEOUT_S = 600


@dataclass
class Pass:
    """One way of rendering the workload: the pictures, the model calls, the wall time."""

    images: list[np.ndarray]
    calls: Counter
    seconds: float


def run(bench: Bench) -> dict:
    set_torch_threads(bench.torch_threads)
    bundle = load_model(None, bench.data_dir, device="cpu")
    jobs = mixed_jobs()
    render(*jobs[0], bundle)  # untimed: first calls pay for lazy imports and allocations
    alone = timed(bundle, lambda: [render(data, job, bundle) for data, job in jobs])
    running = engine.start(CAP, None)
    try:
        together = timed(bundle, lambda: render_together(jobs, bundle))
        stats = running.stats()
    finally:
        engine.stop()
    return summarise(jobs, alone, together, stats)


def timed(bundle: ModelBundle, render_all: Callable[[], list[np.ndarray]]) -> Pass:
    with counted_calls(bundle) as calls:
        started = time.perf_counter()
        images = render_all()
        return Pass(images, calls, time.perf_counter() - started)


def mixed_jobs() -> list[tuple[bytes, RenderParams]]:
    """Different steps, strengths, every scheduler, guidance on and off, prompts, seeds and
    two sizes; fixed, so every run renders the same workload."""
    rng = np.random.default_rng(0)
    return [
        (
            photo(96, 64, i),
            RenderParams.from_dict(
                {
                    "prompt": f"a picture of thing {i}, {'sunny' if i % 3 else 'at night'}",
                    "steps": int(rng.integers(4, 31)),
                    "strength": STRENGTHS[i % len(STRENGTHS)],
                    "scheduler": SCHEDULER_NAMES[i % len(SCHEDULER_NAMES)],
                    "guidance": GUIDANCE[i % len(GUIDANCE)],
                    "seed": 1000 + 7 * i,
                    "size": SIZES[i % len(SIZES)],
                }
            ),
        )
        for i in range(JOBS)
    ]


def photo(width: int, height: int, seed: int) -> bytes:
    """A gradient with noise on it, different per seed."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    return png_bytes((base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8))


def render(data: bytes, job: RenderParams, bundle: ModelBundle, job_id: str = "") -> np.ndarray:
    """The job's stages in order; with an engine running each joins it as the runner's do,
    without one ``joined`` hands the stage the bundle itself (the stage calls it directly)."""
    artifact: Artifact = data
    for name in IMG2IMG:
        stage = STAGES[name]
        with engine.joined(job_id, name, bundle if stage.model else None) as (model, _):
            artifact = stage.run(artifact, job, model, NoHooks())
        if not isinstance(artifact, bytes):  # what the next stage reads from the store
            artifact = load(save(artifact))
    return np.asarray(Image.open(io.BytesIO(artifact)).convert("RGB")).astype(np.int16)


def render_together(jobs: list, bundle: ModelBundle) -> list[np.ndarray]:
    """Every job on its own thread at once, as a gpu worker's threads run them."""
    results: list[np.ndarray | BaseException | None] = [None] * len(jobs)

    def one(index: int) -> None:
        try:
            results[index] = render(*jobs[index], bundle, job_id=f"job-{index}")
        except BaseException as exc:  # raised below, on the benchmark's thread
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    for result in results:
        if not isinstance(result, np.ndarray):
            raise RuntimeError(f"a job rendered through the engine did not finish: {result!r}")
    return results  # type: ignore[return-value]


@contextmanager
def counted_calls(bundle: ModelBundle) -> Iterator[Counter]:
    """Forward calls of each model component while the block runs (batched or not, one call
    is one forward of the module)."""
    counts: Counter = Counter()
    modules = {
        "unet": bundle.unet,
        "vae.encode": bundle.vae.encoder,
        "vae.decode": bundle.vae.decoder,
        "text_encoder": bundle.text_encoder,
    }
    hooks = [
        module.register_forward_hook(lambda *_, name=name: counts.update([name]))
        for name, module in modules.items()
    ]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


def summarise(jobs: list, alone: Pass, together: Pass, stats: dict) -> dict:
    per_job = [
        _difference(job, a, b)
        for (_, job), a, b in zip(jobs, alone.images, together.images, strict=True)
    ]
    largest = max(j["max_difference"] for j in per_job)
    differing = sum(j["differing_pixels"] for j in per_job) / sum(j["pixels"] for j in per_job)
    steps = sum(job.img2img_steps() for _, job in jobs)
    calls, solo = stats["model_calls"], sum(alone.calls.values())
    met = largest <= PIXEL_BOUND
    return {
        "parameters": {"jobs": JOBS, "cap": CAP, "sizes": SIZES, "pixel_bound": PIXEL_BOUND},
        "max_difference": largest,
        "differing_pixel_fraction": differing,
        "identical_jobs": sum(j["max_difference"] == 0 for j in per_job),
        "jobs": per_job,
        "engine": stats,
        "model_calls": {
            "alone": dict(alone.calls),
            "through_engine": dict(together.calls),
            "sum_of_steps": steps,
        },
        "wall_s": {"alone": alone.seconds, "through_engine": together.seconds},
        "goal": f"largest difference <= PIXEL_BOUND ({PIXEL_BOUND} levels)",
        "met": met,
        "rows": [
            Row(NAME, "max pixel difference, 8-bit levels", largest, None, None,
                f"<= {PIXEL_BOUND}", met),
            Row(NAME, "pixels that differ, fraction", differing, None, None, "info", None),
            Row(NAME, "model calls, engine vs sum of steps", calls, steps, ratio(calls, steps),
                "info", None),
            Row(NAME, "model calls, engine vs alone", calls, solo, ratio(calls, solo), "info",
                None),
            Row(NAME, "wall s, engine vs alone", together.seconds, alone.seconds,
                ratio(together.seconds, alone.seconds), "info", None),
        ],
    }  # fmt: skip


def _difference(job: RenderParams, alone: np.ndarray, together: np.ndarray) -> dict:
    difference = np.abs(alone - together)
    return {
        "size": f"{alone.shape[1]}x{alone.shape[0]}",
        "steps": job.steps,
        "strength": job.strength,
        "scheduler": job.scheduler,
        "guidance": job.guidance,
        "max_difference": int(difference.max()),
        "differing_pixels": int(difference.any(axis=-1).sum()),
        "pixels": alone.shape[0] * alone.shape[1],
    }
