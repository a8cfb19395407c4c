"""The one shape every stage has, and the helpers the model stages share.

A stage is a plain function ``run(artifact, params, model, hooks) -> artifact``. Artifacts are
dicts of CPU, contiguous tensors (so any of them can be written with safetensors) or raw bytes
(the user's input image, the output PNG). Floating-point tensors are float32 whatever the
model's dtype: widening float16 is exact, so a GPU stage that narrows them again loses nothing.
Integer tensors (timesteps of some schedulers, ``t_start``) and the generator state (uint8)
keep their own dtypes. Model stages compute 4-D tensors in channels-last, as diffusers' img2img
does (see ``to_model``); that is what makes the staged run bit-exact with the pipeline.
"""

from __future__ import annotations

import torch

from farm.errors import ArtifactMissing, ModelError
from farm.models import ModelBundle
from farm.params import RenderParams
from farm.pipelines import StageHooks as StageHooks  # where stages have always found it

Tensors = dict[str, torch.Tensor]
Artifact = Tensors | bytes


class NoHooks:
    """Hooks that do nothing, for running stages by hand."""

    stage = ""

    def on_step(self, step: int, total: int) -> None:
        return None


def tensors_of(artifact: Artifact | None, stage: str, *keys: str) -> Tensors:
    """The tensors a stage reads, or ArtifactMissing naming what is not there."""
    have = artifact if isinstance(artifact, dict) else {}
    missing = [key for key in keys if key not in have]
    if missing:
        raise ArtifactMissing(f"stage {stage} needs tensors {', '.join(missing)} in its input")
    return have


def model_of(model: ModelBundle | None, stage: str) -> ModelBundle:
    """The model a stage needs, or ModelError."""
    if model is None:
        raise ModelError(f"stage {stage} needs a model and was given none")
    return model


def to_model(tensor: torch.Tensor, model: ModelBundle) -> torch.Tensor:
    """A float artifact tensor on the model's device, in its dtype (and layout, if 4-D)."""
    if tensor.dim() != 4:
        return tensor.to(device=model.device, dtype=model.dtype)
    # diffusers' img2img computes in channels-last: VaeImageProcessor turns the HWC pixel array
    # into NCHW with a transpose, not a copy, and every later tensor inherits that layout. The
    # layout picks the conv kernels and so the rounding; safetensors stores only the logical
    # order, so each stage restores channels-last to stay bit-exact with the pipeline.
    return tensor.to(device=model.device, dtype=model.dtype, memory_format=torch.channels_last)


def to_artifact(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor fit for an artifact: CPU, contiguous, float32 if it is floating point."""
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.detach().to("cpu").contiguous()


def new_generator(seed: int) -> torch.Generator:
    """The job's one generator; CPU like the pipeline's, so any device draws the same numbers."""
    return torch.Generator("cpu").manual_seed(seed)


def restore_generator(state: torch.Tensor) -> torch.Generator:
    """The generator exactly where the previous stage left it."""
    generator = torch.Generator("cpu")
    generator.set_state(state)
    return generator


def use_guidance(params: RenderParams) -> bool:
    """Classifier-free guidance, as the pipeline decides it (guidance_scale > 1)."""
    return params.guidance > 1.0
