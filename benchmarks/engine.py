"""The GPU engine alone, without the farm around it: the e2e workload in one process.

e2e measures the whole farm on 2 cores, where the servers, the cpu worker and every stage's
checkpoint and record compete with the model for the same cores. This one isolates what the
engine itself does to throughput: the same 16 renders (e2e's inputs, parameters and seeds) by

  (a) diffusers' ``StableDiffusionImg2ImgPipeline`` in a loop (batch 1),
  (b) the same pipeline hand-batched, 8 images, prompts and generators per call,
  (c) the farm's stage functions, each job on its own thread, every model call through an
      engine batching up to 8 jobs (as a gpu worker's threads run them; artifacts go through
      safetensors between stages, as through the store, but nothing is stored or recorded).

Order: loop, batched, engine, engine, batched, loop, so a drift in the machine's load reaches
every side. Goal: the engine at parity with hand-batching (≥ 0.9), which is what a CPU allows
(compute-bound at any batch); the gain on a GPU is benchmarks/gpu.py's to measure.
"""

from __future__ import annotations

import time

from benchmarks.batch_bound import render_together
from benchmarks.e2e import BATCH, PARAMS, load_pipeline, render_batched, render_loop, warm_up
from benchmarks.harness import Bench, Row, ratio, sample_png, set_torch_threads
from farm import engine
from farm.models import ensure_tiny_model, load_model
from farm.params import RenderParams

NAME = "engine"
GOAL_RATIO = 0.9
JOBS = 16


def run(bench: Bench) -> dict:
    set_torch_threads(bench.torch_threads)
    model = ensure_tiny_model(bench.data_dir)
    pipe, bundle = load_pipeline(model), load_model(None, bench.data_dir, device="cpu")
    inputs = [sample_png(PARAMS["size"], i) for i in range(JOBS)]
    jobs = [(data, RenderParams.from_dict({**PARAMS, "seed": i})) for i, data in enumerate(inputs)]
    warm_up(pipe, inputs[0])
    seconds: dict[str, list[float]] = {"loop": [], "batched": [], "engine": []}
    running = engine.start(BATCH, None)
    try:
        render_together(jobs[:BATCH], bundle)  # untimed: the engine's first calls
        for side in ("loop", "batched", "engine", "engine", "batched", "loop"):
            seconds[side].append(_timed(side, pipe, inputs, jobs, bundle))
        stats = running.stats()
    finally:
        engine.stop()
    return _summarise(seconds, stats)


def _timed(side: str, pipe, inputs: list[bytes], jobs: list, bundle) -> float:
    started = time.perf_counter()
    if side == "loop":
        render_loop(pipe, inputs, range(JOBS))
    elif side == "batched":
        render_batched(pipe, inputs, range(JOBS))
    else:
        render_together(jobs, bundle)
    return time.perf_counter() - started


def _summarise(seconds: dict[str, list[float]], stats: dict) -> dict:
    rate = {side: JOBS * len(runs) / sum(runs) for side, runs in seconds.items()}
    vs_batched = ratio(rate["engine"], rate["batched"])
    met = vs_batched >= GOAL_RATIO
    return {
        "parameters": {"jobs": JOBS, "batch": BATCH, **PARAMS},
        "seconds": seconds,
        "images_per_s": rate,
        "engine": stats,
        "goal": f"engine images/s >= {GOAL_RATIO} x diffusers hand-batched ({BATCH} per call)",
        "met": met,
        "rows": [
            Row(NAME, "images/s, engine vs diffusers batch 8", rate["engine"], rate["batched"],
                vs_batched, f">= {GOAL_RATIO}", met),
            Row(NAME, "images/s, engine vs diffusers loop", rate["engine"], rate["loop"],
                ratio(rate["engine"], rate["loop"]), "info", None),
        ],
    }  # fmt: skip
