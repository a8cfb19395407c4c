"""The schedulers a job may name, each made fresh from the model's scheduler config.

A scheduler carries per-job state (PNDM's ``ets`` history, Euler's step index), so the stages
build one per job instead of sharing the model's.
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
)

from farm.errors import InvalidParameter
from farm.models.loader import ModelBundle

# Keys match farm.params.SCHEDULER_NAMES (a test checks); "euler_a" is ancestral: it draws noise
# on every step, so the generator state must travel between stages.
SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm": DPMSolverMultistepScheduler,
}


# What the SD pipelines' __init__ rewrites in an outdated scheduler config (with a
# FutureWarning); applied here so a stage's scheduler is the one the pipeline would run.
PIPELINE_CONFIG_FIXES = {"steps_offset": 1, "clip_sample": False}


def make_scheduler(bundle: ModelBundle, name: str) -> SchedulerMixin:
    """A new scheduler of kind ``name`` configured like the model's own."""
    try:
        scheduler_class = SCHEDULERS[name]
    except KeyError:
        choices = ", ".join(SCHEDULERS)
        raise InvalidParameter(f"scheduler must be one of {choices}; got {name!r}") from None
    scheduler = scheduler_class.from_config(bundle.scheduler_config)
    config = scheduler.config
    fixes = {k: v for k, v in PIPELINE_CONFIG_FIXES.items() if k in config and config[k] != v}
    # As keyword arguments: from_config drops keys of the dict that were defaults before.
    return scheduler_class.from_config(bundle.scheduler_config, **fixes) if fixes else scheduler
