"""Decode: final latents -> 8-bit pixels.

The conversion to 8 bits happens here, on the model's device and in its dtype, exactly as
``VaeImageProcessor.postprocess(output_type="pil")`` does it, so the artifact is 4x smaller
than float pixels and postprocess reproduces the pipeline's picture bit for bit.
"""

from __future__ import annotations

import torch
from diffusers.image_processor import VaeImageProcessor

from farm.models import ModelBundle
from farm.params import RenderParams
from farm.stages.base import Artifact, StageHooks, model_of, tensors_of, to_model


@torch.no_grad()
def run(
    artifact: Artifact | None, params: RenderParams, model: ModelBundle | None, hooks: StageHooks
) -> Artifact:
    """{"latents"} -> {"image": uint8 (1, 3, H, W)}."""
    bundle = model_of(model, "decode")
    latents = to_model(tensors_of(artifact, "decode", "latents")["latents"], bundle)
    # 1. undo the latent scaling and decode
    image = bundle.vae.decode(latents / bundle.vae.config.scaling_factor, return_dict=False)[0]
    # 2. to 8 bits, as the pipeline's output_type="pil"
    return {"image": to_uint8(image)}


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 (N, 3, H, W) on the CPU, rounding like ``numpy_to_pil``."""
    array = VaeImageProcessor.pt_to_numpy(VaeImageProcessor.denormalize(image))
    pixels = (array * 255).round().astype("uint8")
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
