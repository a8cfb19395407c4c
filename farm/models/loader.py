"""Load a local diffusers Stable Diffusion folder once per process, never from the network.

The tiny demo model goes through the same path: it is built once, saved under the data dir and
loaded from there like any real checkpoint. Nothing here touches CUDA before ``load_model`` is
called, so a Celery prefork parent can import this module safely.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME
from transformers import CLIPTextModel, CLIPTokenizer

from farm.errors import ModelError
from farm.models.tiny import build_tiny_pipeline, tiny_build_digest

# "-2": weights made by farm.models.tiny_weights; a data dir holding the random ones rebuilds.
TINY_MODEL_SUBDIR = Path("models") / "tiny-sd-2"
COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
# A tokenizer loaded offline from a hub name silently degrades to a 2-token vocabulary.
MIN_VOCAB_SIZE = 100
MAX_TOKENS = 4096  # the degraded tokenizer reports model_max_length = 1e30


@dataclass(frozen=True, eq=False)
class ModelBundle:
    """The loaded components of one model on one device; shared by every job in the process."""

    path: Path
    device: torch.device
    dtype: torch.dtype
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: Mapping[str, Any]  # schedulers keep per-job state: make one per job
    vae_scale_factor: int


def ensure_tiny_model(data_dir: Path) -> Path:
    """Save the tiny model under ``data_dir`` unless it is there; return its folder.

    Building it trains its UNet for about a minute, so a built copy is kept in the user's cache
    (``$XDG_CACHE_HOME/farm``, keyed by a hash of the code that builds it) and copied into
    every new data dir; the model is then loaded from the data dir like any real checkpoint."""
    target = Path(data_dir) / TINY_MODEL_SUBDIR
    if not _is_complete(target):
        cached = _build_cached()
        stage_and_publish(
            target, lambda staging: shutil.copytree(cached, staging, dirs_exist_ok=True)
        )
    return target


def tiny_model_cache() -> Path:
    """Where the built tiny model is cached: its name changes with the code that builds it."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "farm" / f"tiny-sd-{tiny_build_digest()[:12]}"


def _build_cached() -> Path:
    cached = tiny_model_cache()
    if not _is_complete(cached):
        stage_and_publish(cached, lambda staging: build_tiny_pipeline().save_pretrained(staging))
    return cached


def stage_and_publish(
    target: Path,
    fill: Callable[[Path], object],
    is_complete: Callable[[Path], bool] | None = None,
) -> None:
    """``fill`` a staging folder beside ``target``, then rename it into place. A racer that
    published first wins if its folder ``is_complete`` (by default: a diffusers pipeline)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-sd-", dir=target.parent))
    try:
        fill(staging)
        _publish(staging, target, is_complete)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(
    staging: Path, target: Path, is_complete: Callable[[Path], bool] | None = None
) -> None:
    """Rename the finished folder into place: atomic, so a racing process sees all or nothing."""
    try:
        staging.rename(target)
    except OSError as exc:
        if not (is_complete or _is_complete)(target):  # not just a racer that finished first
            raise ModelError(f"{target} exists but is not a complete model; remove it") from exc


def _is_complete(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() and all(
        (folder / name).is_dir() for name in COMPONENTS
    )


def resolve_device(device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA in float16 (what SD-1.x checkpoints ship and run in) when present, else CPU float32."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(name)
    return resolved, torch.float16 if resolved.type == "cuda" else torch.float32


def load_model(model_path: Path | None, data_dir: Path, device: str | None = None) -> ModelBundle:
    """The model at ``model_path`` (the tiny model when None), loaded once per process."""
    path = Path(model_path) if model_path is not None else ensure_tiny_model(data_dir)
    resolved, dtype = resolve_device(device)
    return _load_cached(path.expanduser().resolve(), resolved, dtype)


@functools.cache
def _load_cached(path: Path, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    os.environ["HF_HUB_OFFLINE"] = "1"
    _check_folder(path)
    try:
        bundle = _load_components(path, device, dtype)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"could not load the model at {path}: {exc}") from exc
    _check_tokenizer(bundle)
    return bundle


def _check_folder(path: Path) -> None:
    hint = "FARM_MODEL must name a local diffusers folder (a pipeline saved with save_pretrained)"
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist; {hint}")
    missing = [name for name in COMPONENTS if not (path / name).is_dir()]
    if missing:
        raise ModelError(f"model folder {path} lacks {', '.join(missing)}; {hint}")


def _load_components(path: Path, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    local = {"local_files_only": True}
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **local)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **local)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype, **local)
    return ModelBundle(
        path=path,
        device=device,
        dtype=dtype,
        vae=vae.to(device).eval(),
        unet=unet.to(device).eval(),
        text_encoder=text_encoder.to(device).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer", **local),
        scheduler_config=_read_json(path / "scheduler" / SCHEDULER_CONFIG_NAME),
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
    )


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as file:
        return json.load(file)


def _check_tokenizer(bundle: ModelBundle) -> None:
    tokenizer, size = bundle.tokenizer, len(bundle.tokenizer)
    if size <= MIN_VOCAB_SIZE or tokenizer.model_max_length > MAX_TOKENS:
        raise ModelError(
            f"tokenizer degraded: {size} tokens, model_max_length {tokenizer.model_max_length} "
            f"in {bundle.path / 'tokenizer'}; save the pipeline's tokenizer with save_pretrained"
        )
    if size > bundle.text_encoder.config.vocab_size:
        raise ModelError(
            f"tokenizer has {size} tokens but the text encoder only "
            f"{bundle.text_encoder.config.vocab_size} embeddings; the folder mixes two models"
        )
