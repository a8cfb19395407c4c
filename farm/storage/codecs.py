"""Bytes for the artifact store: tensor checkpoints, PNG images and checksums.

A tensor checkpoint is ``MAGIC`` followed by one zstd frame (with its content checksum) holding a
safetensors file. safetensors never unpickles, so a checkpoint cannot run code when loaded; the
magic and the frame checksum let ``decode_tensors`` tell a damaged or foreign object from a
checkpoint and fail with ``ARTIFACT_CORRUPT`` instead of a library traceback.

This module imports torch; ``farm.storage`` itself does not, so light processes stay light.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping

import torch
import zstandard
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from farm.errors import FarmError

# "farm tensors, format 1": bump the digit if the layout after it ever changes.
MAGIC = b"FARMT\x00\x01\n"
ZSTD_LEVEL = 3
# zlib level for PNGs: fixed so the same image always encodes to the same bytes.
PNG_COMPRESS_LEVEL = 6
_PNG_MODES = frozenset({"L", "LA", "RGB", "RGBA"})
CORRUPT = "ARTIFACT_CORRUPT"


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Checkpoint bytes for named tensors (any device, layout or view)."""
    raw = save_safetensors(_prepare(tensors))
    frame = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(raw)
    return MAGIC + frame


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """The CPU tensors an ``encode_tensors`` checkpoint holds; ``ARTIFACT_CORRUPT`` if damaged."""
    if not data.startswith(MAGIC):
        raise FarmError("artifact is not a farm tensor checkpoint (bad header)", code=CORRUPT)
    try:
        raw = zstandard.ZstdDecompressor().decompress(data[len(MAGIC) :])
    except zstandard.ZstdError as exc:
        raise FarmError(f"tensor checkpoint is damaged: {exc}", code=CORRUPT) from exc
    try:
        return load_safetensors(raw)
    except (SafetensorError, ValueError) as exc:
        raise FarmError(f"tensor checkpoint is unreadable: {exc}", code=CORRUPT) from exc


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of the pixels alone: no text, EXIF or ICC chunks, same image -> same bytes."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    # A fresh image from the raw pixels carries none of the source's ``info`` metadata.
    pixels = Image.frombytes(image.mode, image.size, image.tobytes())
    out = io.BytesIO()
    pixels.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def decode_png(data: bytes) -> Image.Image:
    """The image in PNG ``data``, fully loaded; ``ARTIFACT_CORRUPT`` if it isn't a whole PNG."""
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise FarmError(f"PNG artifact is unreadable: {exc}", code=CORRUPT) from exc
    return image


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``, for recording and checking artifacts end to end."""
    return hashlib.sha256(data).hexdigest()


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prepared: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"checkpoint entry {name!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses two entries on one storage (e.g. the same tensor under two
        # names); a copy costs little and keeps callers from caring.
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        prepared[name] = tensor
    return prepared


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or "transparency" in image.info
