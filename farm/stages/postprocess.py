"""Postprocess: 8-bit pixels -> the finished PNG, with the finishing touches the job asked for.

Sharpening and colour changes run only when a parameter differs from its neutral default, so a
plain job's PNG holds exactly the pixels diffusers' pipeline would have returned.
"""

from __future__ import annotations

import io

from PIL import Image, ImageEnhance, ImageFilter

from farm.models import ModelBundle
from farm.params import RenderParams
from farm.stages.base import Artifact, StageHooks, tensors_of

UNSHARP_RADIUS = 2.0
UNSHARP_THRESHOLD = 3
_ENHANCERS = (
    ("saturation", ImageEnhance.Color),
    ("contrast", ImageEnhance.Contrast),
    ("brightness", ImageEnhance.Brightness),
)


def run(
    artifact: Artifact | None, params: RenderParams, model: ModelBundle | None, hooks: StageHooks
) -> Artifact:
    """{"image": uint8 (1, 3, H, W)} -> PNG bytes."""
    pixels = tensors_of(artifact, "postprocess", "image")["image"]
    # 1. the picture as the pipeline would hand it out
    image = Image.fromarray(pixels[0].permute(1, 2, 0).numpy())
    # 2. the finishing touches that were asked for
    image = finish(image, params)
    # 3. encode
    return to_png(image)


def finish(image: Image.Image, params: RenderParams) -> Image.Image:
    """Unsharp mask, then saturation, contrast and brightness, each only when not neutral."""
    if params.sharpen > 0:
        percent = round(params.sharpen * 100)
        mask = ImageFilter.UnsharpMask(UNSHARP_RADIUS, percent, UNSHARP_THRESHOLD)
        image = image.filter(mask)
    for name, enhancer in _ENHANCERS:
        amount = getattr(params, name)
        if amount != 1.0:
            image = enhancer(image).enhance(amount)
    return image


def to_png(image: Image.Image) -> bytes:
    """PNG bytes with no metadata chunks: equal pixels always give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
