"""Denoise: the classifier-free-guided UNet loop, as in diffusers' img2img ``__call__``.

The expensive stage. It reports progress after every UNet call through ``hooks.on_step(step,
total)``, which is also where a cancelled job stops (the hook raises JobCancelled). ``total``
counts UNet calls: ``steps x strength`` of them, plus one for PNDM, which repeats a timestep.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SchedulerMixin

from farm.errors import ModelError
from farm.models import ModelBundle
from farm.params import RenderParams
from farm.stages.base import (
    Artifact,
    StageHooks,
    model_of,
    restore_generator,
    tensors_of,
    to_artifact,
    to_model,
    use_guidance,
)
from farm.stages.schedule import schedule, step_kwargs

INPUTS = ("latents", "prompt_embeds", "timesteps", "t_start", "rng_state")


@torch.no_grad()
def run(
    artifact: Artifact | None, params: RenderParams, model: ModelBundle | None, hooks: StageHooks
) -> Artifact:
    """{"latents", "prompt_embeds", "timesteps", "t_start", "rng_state"} -> {"latents", ...}."""
    bundle = model_of(model, "denoise")
    tensors = tensors_of(artifact, "denoise", *INPUTS)
    # 1. a fresh scheduler on exactly the noise stage's schedule
    scheduler, timesteps = schedule(bundle, params, int(tensors["t_start"]))
    _check_timesteps(timesteps, tensors["timesteps"])
    # 2. the job's generator, for schedulers that draw noise on each step
    generator = restore_generator(tensors["rng_state"])
    extra = step_kwargs(scheduler, generator)
    # 3. the loop
    latents = to_model(tensors["latents"], bundle)
    embeds = to_model(tensors["prompt_embeds"], bundle)
    for index, timestep in enumerate(timesteps):
        latents = _step(bundle, scheduler, params, latents, embeds, timestep, extra)
        hooks.on_step(index + 1, len(timesteps))
    return {"latents": to_artifact(latents), "rng_state": generator.get_state()}


def _step(
    bundle: ModelBundle,
    scheduler: SchedulerMixin,
    params: RenderParams,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    timestep: torch.Tensor,
    extra: dict[str, Any],
) -> torch.Tensor:
    """One denoising step: predict the noise (guided) and let the scheduler remove it."""
    guided = use_guidance(params)
    model_input = torch.cat([latents] * 2) if guided else latents
    model_input = scheduler.scale_model_input(model_input, timestep)
    noise = bundle.unet(model_input, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
    if guided:
        uncond, text = noise.chunk(2)
        noise = uncond + params.guidance * (text - uncond)
    return scheduler.step(noise, timestep, latents, **extra, return_dict=False)[0]


def _check_timesteps(timesteps: torch.Tensor, recorded: torch.Tensor) -> None:
    if not torch.equal(to_artifact(timesteps), recorded):
        raise ModelError(
            "the denoise schedule differs from the one the noise stage recorded; "
            "the model's scheduler config or diffusers changed in the middle of the job"
        )
