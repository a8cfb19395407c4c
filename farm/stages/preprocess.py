"""Preprocess: the user's image bytes -> an upright RGB tensor of the requested size.

Decoding is defensive because the bytes come from users and this is the one place that parses
them (the submitting process only checks sizes and paths, see farm.inputs). Every refusal is an
``InvalidImage`` with a stable code and a one-sentence message that says what to do:

=================  ================================================================================
INPUT_NOT_IMAGE    empty, not an image, or a format outside ``FORMATS``: ICO, PSD, PDF, SVG, ... are
                   refused even where Pillow could read them (fewer decoders, fewer CVEs)
INPUT_CORRUPT      truncated or damaged, header or pixels (a PNG/JPEG/GIF/WebP/TIFF signature
                   followed by garbage is damaged, not "not an image");
                   ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set
INPUT_TOO_LARGE    over ``MAX_PIXELS``, judged from the header before any pixel is decoded; Pillow's
                   own DecompressionBombWarning is turned into this error too
INPUT_TOO_SMALL    a side under ``MIN_SIDE`` pixels (1x1, 4000x2)
INPUT_BAD_ASPECT   the long side over ``MAX_ASPECT`` (20) times the short one (50000x10): the cover
                   crop would keep under a twentieth of the picture, so it is refused, not cropped
INPUT_UNSUPPORTED  pixels with no faithful 8-bit rendering: floating-point images, and 32-bit
                   integer images whose values leave the 16-bit range
=================  ================================================================================

Checks run in that order (a 4000x2 image is too small before it is too narrow).

What is accepted, and how it is normalized:

- **Animated** GIF, WebP, APNG (and multi-page TIFF): the **first frame** is rendered, the others
  are never decoded (so a frame bomb further on cannot hurt).
- **EXIF orientation** (all 8 values) is applied first: the output is upright as a viewer shows it.
- **16-bit greyscale** is scaled onto 8 bits (``v / 257``, rounded), not clipped as Pillow's
  ``convert`` would; 16-bit RGB(A) PNGs arrive as 8-bit from Pillow (it keeps the high byte).
- **Transparency** (RGBA, LA, PA, palette with tRNS) is composited on white.
- **CMYK**, YCbCr, LAB and palette images are converted by Pillow; ICC profiles are not applied.
- The output size comes from ``farm.params.output_size`` on the upright picture, so an
  EXIF-rotated portrait stays a portrait. By default (``size``, the long side) the aspect ratio
  snaps to the nearest bucket of farm.buckets and the sides to multiples of 8, so that mixed
  inputs batch: a 4:3 or 3:2 photo loses a few pixels at most, an aspect between two buckets up
  to about a tenth of the picture, a panorama wider than 2:1 more.
- Where the aspects differ (a bucket's, or ``width`` and ``height`` both given), ``fit`` decides:
  ``cover`` fills the output and crops the overflow evenly from both sides, ``contain`` fits the
  whole picture inside and pads the rest evenly with ``PAD_COLOUR``, ``stretch`` resizes to the
  output and distorts.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageOps

from farm.errors import InvalidImage
from farm.image_checks import (
    FORMAT_NAMES,
    check_size,
    decoding,
    open_lazily,
)
from farm.models import ModelBundle
from farm.params import RenderParams, output_size
from farm.stages.base import Artifact, StageHooks

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT = 65535
# Mid-grey is 0 in the model's [-1, 1] pixel range: bars that bias the render's colours least
# (white, what transparency becomes, would brighten every padded render).
PAD_COLOUR = (128, 128, 128)


def run(
    artifact: Artifact | None, params: RenderParams, model: ModelBundle | None, hooks: StageHooks
) -> Artifact:
    """Decode, orient, flatten to RGB, fit to the output size, scale to [-1, 1]."""
    if not isinstance(artifact, bytes | bytearray):
        message = "The job has no input image bytes; submit it again with an image."
        raise InvalidImage(message, code="INPUT_NOT_IMAGE")
    return {"image": to_tensor(prepare_image(bytes(artifact), params))}


def prepare_image(data: bytes, params: RenderParams) -> Image.Image:
    """The RGB picture the model will see, before it becomes a tensor."""
    image = decode_image(data)
    # 3. fit the output size, which follows the upright picture's aspect unless given
    return fit_image(image, output_size(params, image.size), params.fit)


def decode_image(data: bytes) -> Image.Image:
    """The upright RGB picture in ``data``; InvalidImage with an INPUT_* code if it is none."""
    if not data:
        message = f"The file is empty (0 bytes); submit a {FORMAT_NAMES} image instead."
        raise InvalidImage(message, code="INPUT_NOT_IMAGE")
    with decoding():
        # 1. decode the first frame, refusing bombs and odd shapes before any pixel is decoded
        image = open_lazily(data)
        check_size(image.size)
        image.load()
        # 2. orient as the camera meant, flatten to RGB
        return to_rgb(ImageOps.exif_transpose(image))


def fit_image(image: Image.Image, size: tuple[int, int], fit: str) -> Image.Image:
    """``image`` resized to ``size`` by cover (crop centred), contain (pad) or stretch."""
    method = Image.Resampling.LANCZOS
    if fit == "contain":
        return ImageOps.pad(image, size, method=method, color=PAD_COLOUR)
    if fit == "stretch":
        return image.resize(size, method)
    return ImageOps.fit(image, size, method=method)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1], exactly as diffusers' VaeImageProcessor.preprocess."""
    pixels = VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy(image))
    return VaeImageProcessor.normalize(pixels).contiguous()


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit scaled (not clipped), transparency composited on white."""
    if image.mode.startswith("I") or image.mode == "F":
        return _wide_to_rgb(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit greyscale to 8 bits by scaling 0..65535 onto 0..255; Pillow's convert would clip.

    "I;16*" modes are 16-bit by definition. "I" (32-bit) is how older Pillows opened 16-bit
    PNGs, and TIFFs may use it: it is taken as 16-bit when its values fit, refused otherwise,
    as are float ("F") images, whose range no file states."""
    values = np.asarray(image)
    if image.mode == "F" or (values.size and (values.min() < 0 or values.max() > _SIXTEEN_BIT)):
        kind = "floating-point" if image.mode == "F" else "32-bit integer"
        message = (
            f"The image has {kind} pixels, which have no faithful 8-bit rendering; "
            "export it as an 8- or 16-bit PNG or as a JPEG."
        )
        raise InvalidImage(message, code="INPUT_UNSUPPORTED")
    scaled = np.round(values.astype(np.float64) / 257.0).astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")
