"""Preprocess: the user's image bytes -> an upright RGB tensor of the requested size.

Decoding is defensive because the bytes come from users: only common formats, a pixel cap
checked from the header before any pixel is decoded, and every Pillow failure mapped to an
``InvalidImage`` code. Animated images (GIF, WebP, APNG, multi-page TIFF) use their first frame.
Transparent pixels are composited on white; ICC profiles are not applied.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageOps, UnidentifiedImageError

from farm.errors import InvalidImage
from farm.models import ModelBundle
from farm.params import RenderParams
from farm.stages.base import Artifact, StageHooks

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
MAX_PIXELS = 40_000_000  # below Pillow's own bomb limit (~89 MP), so ours decides
MIN_SIDE = 8
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def run(
    artifact: Artifact | None, params: RenderParams, model: ModelBundle | None, hooks: StageHooks
) -> Artifact:
    """Decode, orient, flatten to RGB, cover-resize to width x height, scale to [-1, 1]."""
    if not isinstance(artifact, bytes | bytearray):
        raise InvalidImage("preprocess needs the input image's bytes", code="INPUT_NOT_IMAGE")
    return {"image": to_tensor(prepare_image(bytes(artifact), params))}


def prepare_image(data: bytes, params: RenderParams) -> Image.Image:
    """The RGB picture the model will see, before it becomes a tensor."""
    if not data:
        raise InvalidImage("the input is empty (0 bytes)", code="INPUT_NOT_IMAGE")
    with _decoding():
        # 1. decode the first frame, refusing bombs before any pixel is decoded
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        _check_size(image.size)
        image.load()
        # 2. orient as the camera meant, flatten to RGB
        image = to_rgb(ImageOps.exif_transpose(image))
    # 3. cover the target size, cropping the overflow evenly
    size = (params.width, params.height)
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1], exactly as diffusers' VaeImageProcessor.preprocess."""
    pixels = VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy(image))
    return VaeImageProcessor.normalize(pixels).contiguous()


@contextmanager
def _decoding() -> Iterator[None]:
    """Map whatever Pillow raises on hostile bytes to an InvalidImage code."""
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice it; make that an error too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except InvalidImage:
            raise
        except UnidentifiedImageError as exc:
            kinds = ", ".join(FORMATS)
            raise InvalidImage(f"the input is not a {kinds} image", code="INPUT_NOT_IMAGE") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_large("over Pillow's decompression-bomb limit") from exc
        except Exception as exc:  # decoders raise OSError, SyntaxError, struct.error, ...
            raise InvalidImage(f"the image is damaged: {exc}", code="INPUT_CORRUPT") from exc


def _check_size(size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise _too_large(f"{width}x{height} is {width * height:,} pixels")
    if min(width, height) < MIN_SIDE:
        message = f"the image is {width}x{height}; each side needs at least {MIN_SIDE} pixels"
        raise InvalidImage(message, code="INPUT_TOO_SMALL")


def _too_large(detail: str) -> InvalidImage:
    message = f"the image is too large ({detail}); the limit is {MAX_PIXELS:,} pixels"
    return InvalidImage(message, code="INPUT_TOO_LARGE")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit scaled (not clipped), transparency composited on white."""
    if image.mode in _WIDE_MODES:
        return _wide_to_rgb(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit greyscale to 8 bits by scaling 0..65535 onto 0..255; Pillow's convert would clip."""
    values = np.asarray(image).astype(np.float64)
    scaled = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")
