"""What the farm accepts as an image, judged from its bytes before any model is near.

Pillow only: the submitting process (upscale counts tiles from an input's header) and the
preprocess stage (which decodes the pixels) refuse the same files with the same INPUT_* codes.
See farm.stages.preprocess for the table of codes and what is accepted.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, UnidentifiedImageError

from farm.errors import InvalidImage

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
MAX_PIXELS = 40_000_000  # below Pillow's own bomb limit (~89 MP), so ours decides
MIN_SIDE = 8
MAX_ASPECT = 20  # long side / short side
FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP or TIFF"
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\0", b"MM\0*")


def header_size(data: bytes) -> tuple[int, int]:
    """The stored width and height of the image in ``data``, read from its header alone;
    InvalidImage with the code preprocess would give for what the header already shows."""
    with decoding(), open_lazily(data) as image:
        check_size(image.size)
        return image.size


@contextmanager
def decoding() -> Iterator[None]:
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


def open_lazily(data: bytes) -> Image.Image:
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
        message = f"The file is not a {FORMAT_NAMES} image; export it in one of those formats."
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
