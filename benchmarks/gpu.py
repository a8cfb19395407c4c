"""GPU: a Stable-Diffusion-1.5-architecture model at 512x512, 30 steps, fp16, on one CUDA device.

``python -m benchmarks.gpu`` measures images/s for
  (a) a naive loop: diffusers' ``StableDiffusionPipeline`` called once per image;
  (b) the same pipeline called with batches of 8 and of 16 prompts;
  (c) the farm: one gpu-queue worker (plus one cpu worker for postprocess) draining 64
      txt2img jobs, one job at a time, as it does today;
and writes benchmarks/results/gpu.json with the device, versions and every number.

The model is SD-1.5's architecture (UNet block_out 320/640/1280/1280, cross-attention 768; the
SD VAE; a 12-layer, 768-wide CLIP text encoder) built from config dicts here with fixed-seed
random weights and saved with ``save_pretrained``, so nothing is downloaded; the tokenizer is
the farm's in-memory one. Random weights make meaningless pictures, not slower ones.

Where it runs: a CUDA machine with this repo and its venv (torch with CUDA). Redis and
Postgres come from the local-stack wheels (``pip install -e '.[local]'``); artifacts go to the
filesystem store (FARM_STORAGE=fs) so no S3 server is needed there. Without CUDA it refuses;
``--dry-run`` runs every step on the CPU with tiny shapes (64 px, 4 steps) as a smoke test.
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

import torch

from benchmarks.harness import Bench, Row, print_table, ratio, wait_finished, write_result

NAME = "gpu"
GOAL_RATIO = 0.9  # the farm should keep the GPU as busy as a naive loop does (as e2e)
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
        del pipe
        if device == "cuda":
            torch.cuda.empty_cache()  # the worker process gets the device's memory
        farm = run_farm(root, model, shape)
    return summarise(shape, device, naive, batched, farm)


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


def generate(pipe, shape: Shape, batch: int, seed: int) -> None:
    generator = torch.Generator("cpu").manual_seed(seed)
    pipe(
        [PROMPT] * batch,
        height=shape.size,
        width=shape.size,
        num_inference_steps=shape.steps,
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
    return {"batch": batch, **_throughput(calls * batch, time.perf_counter() - started)}


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


def run_farm(root: Path, model: Path, shape: Shape) -> dict:
    from farm import Farm

    fs = {
        "FARM_STORAGE": "fs",
        "FARM_FS_ROOT": str(root / "artifacts"),
        "FARM_MODEL": str(model),
        "FARM_CPU_CONCURRENCY": "2",  # postprocess only; a GPU box has many cores to spare
    }
    params = {"size": shape.size, "steps": shape.steps, "prompt": PROMPT}
    with redis_and_postgres(root) as bench, bench.running(["cpu", "gpu"], **fs):
        farm = Farm(bench.settings(**fs))
        warm = farm.submit(pipeline="txt2img", **params, seed=10_000)
        wait_finished(farm.ctx.db_url, [warm.id], 1800)
        started = time.perf_counter()
        ids = [farm.submit(pipeline="txt2img", **params, seed=i).id for i in range(shape.farm_jobs)]
        finished = wait_finished(farm.ctx.db_url, ids, 3600, poll=0.2)
        done = sum(1 for job_id in ids if farm.get(job_id).status() == "done")
    return {**_throughput(shape.farm_jobs, finished - started), "done": done, "peak_gib": None}


# -- results -------------------------------------------------------------------------------------


def summarise(shape: Shape, device: str, naive: dict, batched: dict, farm: dict) -> dict:
    base = naive["images_per_s"]
    r = ratio(farm["images_per_s"], base)
    rows = [Row(NAME, "images/s naive loop", base, None, None, "-", None)]
    for bs, run in batched.items():
        ips = run["images_per_s"]
        rows.append(Row(NAME, f"images/s batch {bs}", ips, base, ratio(ips, base), "info", None))
    rows.append(
        Row(NAME, f"images/s farm ({shape.farm_jobs} jobs)", farm["images_per_s"], base, r,
            f">= {GOAL_RATIO}", r >= GOAL_RATIO)
    )  # fmt: skip
    return {
        "parameters": {**asdict(shape), "prompt": PROMPT, "pipeline": "txt2img"},
        "device": _device(device),
        "naive": naive,
        "batched": {str(bs): run for bs, run in batched.items()},
        "farm": farm,
        "ratio": r,
        "goal": f"farm images/s >= {GOAL_RATIO} x the naive loop",
        "met": r >= GOAL_RATIO,
        "rows": rows,
    }


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
