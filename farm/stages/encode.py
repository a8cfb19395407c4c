"""Encode ("feature extraction"): image tensor -> VAE latents, and the job's generator state.

The latent is *sampled* from the VAE's distribution with the job's generator, as diffusers'
img2img does; the generator's state travels on so the next stages continue the same stream.
"""

from __future__ import annotations

import torch

from farm.models import ModelBundle
from farm.params import RenderParams
from farm.stages.base import (
    Artifact,
    StageHooks,
    model_of,
    new_generator,
    tensors_of,
    to_artifact,
    to_model,
)


@torch.no_grad()
def run(
    artifact: Artifact | None, params: RenderParams, model: ModelBundle | None, hooks: StageHooks
) -> Artifact:
    """{"image"} -> {"init_latents", "rng_state"}."""
    bundle = model_of(model, "encode")
    image = to_model(tensors_of(artifact, "encode", "image")["image"], bundle)
    # 1. one CPU generator per job, seeded here and nowhere else
    generator = new_generator(params.seed)
    # 2. sample the latent distribution, scaled as the UNet expects
    latents = bundle.vae.encode(image).latent_dist.sample(generator)
    latents = bundle.vae.config.scaling_factor * latents
    return {"init_latents": to_artifact(latents), "rng_state": generator.get_state()}
