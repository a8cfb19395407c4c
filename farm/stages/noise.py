"""Noise ("noise injection"): latents at the first timestep, plus the prompt embeddings.

``run`` noises the image latents for img2img; ``run_txt2img`` starts from pure noise drawn from
the seed and runs the full schedule. Both encode the prompt with diffusers' own
``encode_prompt``, so tokenization, truncation and classifier-free guidance match the pipeline.
txt2img computes in channels-last like img2img, so it equals ``StableDiffusionPipeline`` given
the same noise in channels-last (with its default contiguous noise, pixels differ by up to 1).
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from farm.models import ModelBundle
from farm.params import RenderParams, output_size
from farm.stages.base import (
    Artifact,
    StageHooks,
    Tensors,
    model_of,
    new_generator,
    restore_generator,
    tensors_of,
    to_artifact,
    to_model,
    use_guidance,
)
from farm.stages.schedule import img2img_start, schedule


@torch.no_grad()
def run(
    artifact: Artifact | None, params: RenderParams, model: ModelBundle | None, hooks: StageHooks
) -> Artifact:
    """{"init_latents", "rng_state"} -> {"latents", "prompt_embeds", "timesteps", ...}."""
    bundle = model_of(model, "noise")
    tensors = tensors_of(artifact, "noise", "init_latents", "rng_state")
    init_latents = to_model(tensors["init_latents"], bundle)
    # 1. the schedule, shortened by strength
    t_start = img2img_start(params)
    scheduler, timesteps = schedule(bundle, params, t_start)
    # 2. noise the image latents to the first timestep, continuing the job's generator
    generator = restore_generator(tensors["rng_state"])
    noise = randn_tensor(
        init_latents.shape, generator=generator, device=bundle.device, dtype=bundle.dtype
    )
    latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(1))
    # 3. the prompt, for guidance
    embeds = encode_prompt(bundle, params)
    return _artifact(latents, embeds, timesteps, t_start, generator)


@torch.no_grad()
def run_txt2img(
    artifact: Artifact | None, params: RenderParams, model: ModelBundle | None, hooks: StageHooks
) -> Artifact:
    """Nothing -> the same keys as ``run``, from pure noise over the full schedule."""
    bundle = model_of(model, "noise_txt2img")
    # 1. the full schedule
    scheduler, timesteps = schedule(bundle, params, t_start=0)
    # 2. pure noise from the seed, scaled for the scheduler
    generator = new_generator(params.seed)
    scale = bundle.vae_scale_factor
    width, height = output_size(params)  # no input: size N is N x N
    shape = (1, bundle.unet.config.in_channels, height // scale, width // scale)
    noise = randn_tensor(shape, generator=generator, device=bundle.device, dtype=bundle.dtype)
    latents = noise * scheduler.init_noise_sigma
    # 3. the prompt, for guidance
    embeds = encode_prompt(bundle, params)
    return _artifact(latents, embeds, timesteps, 0, generator)


class _PromptEncoder:
    """Just enough of a pipeline to borrow diffusers' documented ``encode_prompt``."""

    encode_prompt = StableDiffusionImg2ImgPipeline.encode_prompt

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder


def encode_prompt(bundle: ModelBundle, params: RenderParams) -> torch.Tensor:
    """[negative; positive] embeddings with guidance, else the positive ones alone."""
    guided = use_guidance(params)
    encoder = _PromptEncoder(bundle.tokenizer, bundle.text_encoder)
    positive, negative = encoder.encode_prompt(
        params.prompt, bundle.device, 1, guided, params.negative_prompt
    )
    return torch.cat([negative, positive]) if guided else positive


def _artifact(
    latents: torch.Tensor,
    embeds: torch.Tensor,
    timesteps: torch.Tensor,
    t_start: int,
    generator: torch.Generator,
) -> Tensors:
    return {
        "latents": to_artifact(latents),
        "prompt_embeds": to_artifact(embeds),
        "timesteps": to_artifact(timesteps),
        "t_start": torch.tensor(t_start, dtype=torch.int64),
        "rng_state": generator.get_state(),
    }
