"""GPU: a Stable-Diffusion-1.5-architecture model at 512x512, fp16, on one CUDA device.

``python -m benchmarks.gpu`` measures images/s for
  (a) a naive loop: diffusers' ``StableDiffusionPipeline`` called once per image, 30 steps;
  (b) the same pipeline called with batches of 8 and of 16 prompts;
  (c) the farm with one job per model call (FARM_GPU_BATCH=1): one gpu-queue worker (plus one
      cpu worker for postprocess) draining 64 txt2img jobs of 30 steps;
  (d) a mixed-steps workload (steps drawn from 10-50, the same for both sides): the naive loop
      over 32 of its jobs, and the farm draining 64 of them with the GPU engine batching up to
      8 and up to 16 jobs per model call (FARM_GPU_BATCH=8, 16), each job at its own step;
and writes benchmarks/results/gpu.json with the device, versions and every number, including
each farm run's GPU-busy fraction (time inside model calls over wall time between two
heartbeats while jobs still wait in the gpu queue).

The model is SD-1.5's architecture (UNet block_out 320/640/1280/1280, cross-attention 768; the
SD VAE; a 12-layer, 768-wide CLIP text encoder) built from config dicts here with fixed-seed
random weights and saved with ``save_pretrained``, so nothing is downloaded; the tokenizer is
the farm's in-memory one. Random weights make meaningless pictures, not slower ones.

Where it runs: a CUDA machine with this repo and its venv (torch with CUDA). Redis and
Postgres come from the local-stack wheels (``pip install -e '.[local]'``); artifacts go to the
filesystem store (FARM_STORAGE=fs) so no S3 server is needed there. Without CUDA it refuses;
``--dry-run`` runs every step on the CPU with tiny shapes (64 px, 4 steps; mixed 2-6 steps,
batches of 2 and 4) as a smoke test.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import (
    Bench,
    EngineBeats,
    Row,
    print_table,
    ratio,
    wait_finished,
    write_result,
)

NAME = "gpu"
GOAL_RATIO = 0.9  # the farm should keep the GPU as busy as a naive loop does (as e2e)
GOAL_BUSY = 0.97  # batching, with checkpoints off the critical path
PROMPT = "a photo of a cat"


@dataclass(frozen=True)
class Shape:
    """Model size and workload; FULL is SD-1.5 at 512 px, SMOKE a tiny stand-in for CPUs."""

    unet_channels: tuple[int, ...]
    unet_layers: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    text_vocab: int
    size: int
    steps: int
    naive_images: int
    batch_sizes: tuple[int, ...]
    batch_images: int
    farm_jobs: int
    mixed_steps: tuple[int, int]  # lowest and highest, drawn uniformly with a fixed seed
    mixed_images: int  # the naive loop's share of the mixed workload (the farm gets it twice)
    farm_batches: tuple[int, ...]  # FARM_GPU_BATCH of the mixed farm runs


FULL = Shape(
    unet_channels=(320, 640, 1280, 1280),
    unet_layers=2,
    vae_channels=(128, 256, 512, 512),
    vae_layers=2,
    text_hidden=768,
    text_layers=12,
    text_heads=12,
    text_intermediate=3072,
    text_vocab=49408,
    size=512,
    steps=30,
    naive_images=32,
    batch_sizes=(8, 16),
    batch_images=32,
    farm_jobs=64,
    mixed_steps=(10, 50),
    mixed_images=32,
    farm_batches=(8, 16),
)
SMOKE = Shape(
    unet_channels=(32, 32, 64, 64),
    unet_layers=1,
    vae_channels=(32, 32, 64, 64),
    vae_layers=1,
    text_hidden=32,
    text_layers=2,
    text_heads=4,
    text_intermediate=37,
    text_vocab=1000,
    size=64,
    steps=4,
    naive_images=4,
    batch_sizes=(2, 4),
    batch_images=4,
    farm_jobs=4,
    mixed_steps=(2, 6),
    mixed_images=4,
    farm_batches=(2, 4),
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "benchmarks.gpu needs a CUDA device and torch built with CUDA "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). "
            "Run it on a GPU machine, or use --dry-run for a tiny CPU smoke test.",
            file=sys.stderr,
        )
        return 2
    _quiet()
    shape, name = (SMOKE, "gpu_dry_run") if args.dry_run else (FULL, NAME)
    started = time.perf_counter()
    result = run(shape, "cpu" if args.dry_run else "cuda")
    path = write_result(name, result, started)
    print(f"{path}")
    print_table(result["rows"])
    return 0


def _quiet() -> None:
    """Random weights and the small vocabulary make diffusers and transformers warn about
    things that do not matter here (dtype casts, token ids); keep errors only."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU: checks the code paths"
    )
    return parser


def run(shape: Shape, device: str) -> dict:
    dtype = torch.float16 if device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory(prefix="farm-gpu-bench-") as tmp:
        root = Path(tmp)
        model = save_model(build_pipeline(shape), root / "model", dtype)
        pipe = load_pipeline(model, device, dtype)
        naive = run_naive(pipe, shape)
        batched = {bs: run_batched(pipe, shape, bs) for bs in shape.batch_sizes}
        naive_mixed = run_naive_mixed(pipe, mixed_steps(shape), shape)
        del pipe
        if device == "cuda":
            torch.cuda.empty_cache()  # the worker processes get the device's memory
        farms = run_farms(root, model, shape)
    return summarise(shape, device, naive, batched, naive_mixed, farms)


def mixed_steps(shape: Shape) -> list[int]:
    """The mixed workload's steps, one per image: fixed, so every run renders the same."""
    low, high = shape.mixed_steps
    return [int(n) for n in np.random.default_rng(0).integers(low, high + 1, shape.mixed_images)]


# -- the model -----------------------------------------------------------------------------------


def build_pipeline(shape: Shape):
    """SD-1.5's three networks from config, seeded random weights, in eval mode."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from farm.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    unet, vae, text = build_unet(shape), build_vae(shape), build_text_encoder(shape, tokenizer)
    # SD-1.5's own scheduler config (PNDM, scaled-linear betas).
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_unet(shape: Shape):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=shape.size // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=shape.unet_layers,
        block_out_channels=shape.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=shape.text_hidden,
        attention_head_dim=8,
    )


def build_vae(shape: Shape):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=shape.vae_channels,
        layers_per_block=shape.vae_layers,
        latent_channels=4,
        sample_size=shape.size,
        scaling_factor=0.18215,
    )


def build_text_encoder(shape: Shape, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    # Token ids from the in-memory tokenizer, not SD's 49406/49407 (its vocabulary is smaller).
    config = CLIPTextConfig(
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_intermediate,
        num_attention_heads=shape.text_heads,
        num_hidden_layers=shape.text_layers,
        max_position_embeddings=77,
        vocab_size=shape.text_vocab,
        hidden_act="quick_gelu",
        projection_dim=shape.text_hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return CLIPTextModel(config)


def save_model(pipe, folder: Path, dtype: torch.dtype) -> Path:
    """A diffusers folder, in the dtype it will run in (halves fp16's disk and load time)."""
    pipe.to(dtype=dtype).save_pretrained(folder)
    return folder


def load_pipeline(folder: Path, device: str, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# -- (a) and (b): the pipeline in this process ---------------------------------------------------


def generate(pipe, shape: Shape, batch: int, seed: int, steps: int | None = None) -> None:
    generator = torch.Generator("cpu").manual_seed(seed)
    pipe(
        [PROMPT] * batch,
        height=shape.size,
        width=shape.size,
        num_inference_steps=steps or shape.steps,
        generator=generator,
    )
    _sync()


def run_naive(pipe, shape: Shape) -> dict:
    generate(pipe, shape, 1, seed=10_000)  # warm-up: kernels, allocator, autotuning
    _reset_peak()
    started = time.perf_counter()
    for seed in range(shape.naive_images):
        generate(pipe, shape, 1, seed)
    return _throughput(shape.naive_images, time.perf_counter() - started)


def run_batched(pipe, shape: Shape, batch: int) -> dict:
    generate(pipe, shape, batch, seed=10_000)
    _reset_peak()
    calls = max(1, shape.batch_images // batch)
    started = time.perf_counter()
    for seed in range(calls):
        generate(pipe, shape, batch, seed)
    seconds = time.perf_counter() - started
    return {"batch": batch, "steps_per_image": shape.steps, **_throughput(calls * batch, seconds)}


def run_naive_mixed(pipe, steps: list[int], shape: Shape) -> dict:
    """The mixed workload one image per call, each at its own steps (already warm)."""
    _reset_peak()
    started = time.perf_counter()
    for seed, count in enumerate(steps):
        generate(pipe, shape, 1, seed, count)
    return {**_throughput(len(steps), time.perf_counter() - started), "steps": sum(steps)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _throughput(images: int, seconds: float) -> dict:
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"images": images, "wall_s": seconds, "images_per_s": images / seconds, "peak_gib": peak}


# -- (c): the farm ------------------------------------------------------------------------------


@contextmanager
def redis_and_postgres(root: Path) -> Iterator[Bench]:
    """Redis and Postgres from the local-stack wheels; no S3 server (the fs store is used)."""
    from farm.db.migrate import upgrade_head
    from farm.local import LocalStack

    local = LocalStack(root / "stack")
    try:
        for service in ("redis", "postgres"):
            local.start_service(service)
        info = local.addresses()  # info() answers only when all three servers run
        upgrade_head(info.database_url)
        bench = Bench(root=root, stack=info, torch_threads=torch.get_num_threads())
        bench.data_dir.mkdir(exist_ok=True)
        yield bench
    finally:
        local.down()


def run_farms(root: Path, model: Path, shape: Shape) -> dict[str, dict]:
    """One stack and cpu worker; a fresh gpu worker for each FARM_GPU_BATCH: batch 1 on the
    uniform workload (30 steps each), then each of ``farm_batches`` on the mixed one."""
    from farm import Farm

    fs = {
        "FARM_STORAGE": "fs",
        "FARM_FS_ROOT": str(root / "artifacts"),
        "FARM_MODEL": str(model),
        "FARM_CPU_CONCURRENCY": "2",  # postprocess only; a GPU box has many cores to spare
    }
    mixed = mixed_steps(shape) * (shape.farm_jobs // shape.mixed_images)
    with redis_and_postgres(root) as bench, bench.running(["cpu"], **fs):
        farm = Farm(bench.settings(**fs))
        runs = {"batch_1": run_farm(bench, farm, fs, 1, [shape.steps] * shape.farm_jobs, shape)}
        for batch in shape.farm_batches:
            runs[f"mixed_batch_{batch}"] = run_farm(bench, farm, fs, batch, mixed, shape)
    return runs


def run_farm(bench: Bench, farm, fs: dict, batch: int, steps: list[int], shape: Shape) -> dict:
    """One gpu worker at FARM_GPU_BATCH=batch draining a job per entry of ``steps``, after a
    warm-up of ``batch`` jobs at once; its heartbeats give the GPU-busy fraction."""
    params = {"pipeline": "txt2img", "size": shape.size, "prompt": PROMPT}
    with bench.running(["gpu"], **fs, FARM_GPU_BATCH=str(batch)) as gpu:
        warm = [farm.submit(**params, steps=min(steps), seed=10_000 + i).id for i in range(batch)]
        wait_finished(farm.ctx.db_url, warm, 1800)
        beats = EngineBeats(bench, gpu[0].name)
        beats.start()
        started = time.perf_counter()
        try:
            ids = [farm.submit(**params, steps=n, seed=i).id for i, n in enumerate(steps)]
            finished = wait_finished(farm.ctx.db_url, ids, 3600, poll=0.2)
        finally:
            engine = beats.stop()
        done = sum(1 for job_id in ids if farm.get(job_id).status() == "done")
    return {
        **_throughput(len(steps), finished - started),
        "batch": batch,
        "steps": sum(steps),
        "done": done,
        "peak_gib": None,
        "engine": engine,
    }


# -- results -------------------------------------------------------------------------------------


def summarise(
    shape: Shape, device: str, naive: dict, batched: dict, naive_mixed: dict, farms: dict
) -> dict:
    base, alone = naive["images_per_s"], farms["batch_1"]
    r = ratio(alone["images_per_s"], base)
    return {
        "parameters": {
            **asdict(shape),
            "prompt": PROMPT,
            "pipeline": "txt2img",
            "mixed_steps_drawn": mixed_steps(shape),
        },
        "device": _device(device),
        "naive": naive,
        "batched": {str(bs): run for bs, run in batched.items()},
        "naive_mixed": naive_mixed,
        "farm": farms,
        "ratio": r,
        "goal": f"farm (batch 1) images/s >= {GOAL_RATIO} x the naive loop; GPU-busy fraction "
        f">= {GOAL_BUSY} when batching",
        "met": r >= GOAL_RATIO,
        "rows": rows(shape, naive, batched, naive_mixed, farms),
    }


def rows(shape: Shape, naive: dict, batched: dict, naive_mixed: dict, farms: dict) -> list[Row]:
    base, mixed_base = naive["images_per_s"], naive_mixed["images_per_s"]
    alone = farms["batch_1"]["images_per_s"]
    out = [Row(NAME, "images/s naive loop", base, None, None, "-", None)]
    for bs, run in batched.items():
        ips = run["images_per_s"]
        out.append(Row(NAME, f"images/s batch {bs}", ips, base, ratio(ips, base), "info", None))
    out += [
        Row(NAME, f"images/s farm batch 1 ({shape.farm_jobs} jobs)", alone, base,
            ratio(alone, base), f">= {GOAL_RATIO}", ratio(alone, base) >= GOAL_RATIO),
        Row(NAME, "images/s naive loop, mixed steps", mixed_base, None, None, "-", None),
    ]  # fmt: skip
    for batch in shape.farm_batches:
        out += mixed_rows(batch, farms[f"mixed_batch_{batch}"], naive_mixed, batched.get(batch))
    busy = farms["batch_1"]["engine"]["busy_fraction"]
    out.append(Row(NAME, "GPU-busy fraction, farm batch 1", _nan(busy), None, None, "info", None))
    return out


def mixed_rows(batch: int, farm: dict, naive_mixed: dict, pipeline: dict | None) -> list[Row]:
    """The farm at ``batch`` on the mixed workload: images/s against the naive loop on it;
    denoising steps/s against the pipeline hand-batched at ``batch`` on the uniform workload
    (which cannot mix steps in one call); its GPU-busy fraction."""
    ips, base = farm["images_per_s"], naive_mixed["images_per_s"]
    busy = farm["engine"]["busy_fraction"]
    out = [
        Row(NAME, f"images/s farm batch {batch}, mixed steps", ips, base, ratio(ips, base),
            "info", None),
        Row(NAME, f"GPU-busy fraction, farm batch {batch}, mixed", _nan(busy), None, None,
            f">= {GOAL_BUSY}", None if busy is None else busy >= GOAL_BUSY),
    ]  # fmt: skip
    if pipeline is not None:
        steps_s = farm["steps"] / farm["wall_s"]
        hand = pipeline["images_per_s"] * pipeline["steps_per_image"]
        out.append(
            Row(NAME, f"steps/s farm batch {batch} mixed vs pipeline batch {batch}", steps_s,
                hand, ratio(steps_s, hand), "info", None)
        )  # fmt: skip
    return out


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _device(device: str) -> dict:
    facts = {"kind": device, "torch_cuda": torch.version.cuda, "host": platform.node()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        facts |= {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cudnn": torch.backends.cudnn.version(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
    return facts


if __name__ == "__main__":
    sys.exit(main())
