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
from farm.params import RenderParams, output_size
from farm.stages.base import Artifact, StageHooks

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
MAX_PIXELS = 40_000_000  # below Pillow's own bomb limit (~89 MP), so ours decides
MIN_SIDE = 8
MAX_ASPECT = 20  # long side / short side
_FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP or TIFF"
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\0", b"MM\0*")
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
        message = f"The file is empty (0 bytes); submit a {_FORMAT_NAMES} image instead."
        raise InvalidImage(message, code="INPUT_NOT_IMAGE")
    with _decoding():
        # 1. decode the first frame, refusing bombs and odd shapes before any pixel is decoded
        image = _open(data)
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
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_large("over Pillow's decompression-bomb limit") from exc
        except MemoryError as exc:
            raise _too_large("it does not fit in memory") from exc
        except Exception as exc:  # decoders raise OSError, SyntaxError, struct.error, ...
            raise _corrupt(_detail(exc)) from exc


def _open(data: bytes) -> Image.Image:
    """Pillow's lazy open (header only). A failure here means "not an image" unless the bytes
    start with the signature of a format we read: then the header is damaged."""
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise
    except Exception as exc:  # UnidentifiedImageError, or what a plugin raised on a bad header
        if _looks_like_image(data):
            detail = "its header is cut short" if isinstance(exc, UnidentifiedImageError) else None
            raise _corrupt(detail or _detail(exc)) from exc
        message = f"The file is not a {_FORMAT_NAMES} image; export it in one of those formats."
        raise InvalidImage(message, code="INPUT_NOT_IMAGE") from exc


def check_size(size: tuple[int, int]) -> None:
    """INPUT_TOO_LARGE, INPUT_TOO_SMALL or INPUT_BAD_ASPECT for a picture of this size."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise _too_large(f"{width}x{height} is {width * height:,} pixels")
    if min(width, height) < MIN_SIDE:
        message = (
            f"The image is only {width}x{height} pixels; "
            f"use one at least {MIN_SIDE} pixels on each side."
        )
        raise InvalidImage(message, code="INPUT_TOO_SMALL")
    long, short = max(width, height), min(width, height)
    if long > MAX_ASPECT * short:
        message = (
            f"The image is {width}x{height}, its long side more than {MAX_ASPECT} times its "
            f"short side; crop it to at most {MAX_ASPECT}:1 and resubmit it."
        )
        raise InvalidImage(message, code="INPUT_BAD_ASPECT")


def _looks_like_image(data: bytes) -> bool:
    """Starts with the signature of an allowed format (BMP's two letters are too common)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return data.startswith(_SIGNATURES)


def _corrupt(detail: str) -> InvalidImage:
    message = f"The image is damaged or incomplete ({detail}); export or copy it again."
    return InvalidImage(message, code="INPUT_CORRUPT")


def _too_large(detail: str) -> InvalidImage:
    message = (
        f"The image is too large ({detail}); "
        f"scale it down to at most {MAX_PIXELS:,} pixels and resubmit it."
    )
    return InvalidImage(message, code="INPUT_TOO_LARGE")


def _detail(exc: BaseException) -> str:
    """Pillow's reason, short and on one line (it may quote file offsets, never our paths)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 80 else text[:77] + "..."


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
