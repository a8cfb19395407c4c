"""The denoising schedule, rebuilt identically by every stage that needs it.

Schedulers keep per-job state, so the noise and denoise stages each make a fresh one from the
same parameters; denoise checks that it arrived at the timesteps the noise stage recorded.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import SchedulerMixin

from farm.models import ModelBundle, make_scheduler
from farm.params import RenderParams


def img2img_start(params: RenderParams) -> int:
    """Steps skipped for ``strength`` (diffusers' ``get_timesteps`` arithmetic)."""
    return params.steps - params.img2img_steps()


def schedule(
    bundle: ModelBundle, params: RenderParams, t_start: int
) -> tuple[SchedulerMixin, torch.Tensor]:
    """A fresh scheduler and the timesteps it will run, from step ``t_start`` on."""
    scheduler = make_scheduler(bundle, params.scheduler)
    scheduler.set_timesteps(params.steps, device=bundle.device)
    begin = t_start * scheduler.order
    # Euler/DPM-type schedulers index their sigmas from here (add_noise and step both use it).
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler, scheduler.timesteps[begin:]


def step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator) -> dict[str, Any]:
    """``eta`` and ``generator`` for the schedulers whose ``step`` takes them, as diffusers does."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs
