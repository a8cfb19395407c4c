"""A model's native image size, read from its config files without importing torch.

The API and CLI processes resolve a render's default size with this at submit time, so they
stay free of torch and diffusers (importing them costs seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

# The tiny demo model (farm.models.tiny): a 64x64 latent, its VAE downsampling by 2.
TINY_NATIVE_SIZE = 128
FALLBACK_SIZE = 512  # SD-1.x, when a model folder does not say


def native_size(model: Path | None) -> int:
    """Pixels per side the model was trained at: the UNet's ``sample_size`` times the VAE's
    downsampling (2 per VAE block after the first). The tiny model's size when ``model`` is
    None, 512 when the folder's configs are unreadable."""
    if model is None:
        return TINY_NATIVE_SIZE
    try:
        unet = _read(Path(model) / "unet" / "config.json")
        vae = _read(Path(model) / "vae" / "config.json")
        sample = unet["sample_size"]
        blocks = len(vae["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return FALLBACK_SIZE
    if isinstance(sample, list | tuple):  # some configs give (height, width)
        sample = max(sample)
    if not isinstance(sample, int) or sample < 1 or blocks < 1:
        return FALLBACK_SIZE
    return sample * 2 ** (blocks - 1)


def _read(path: Path) -> dict:
    with path.open(encoding="utf-8") as file:
        return json.load(file)
