"""Bytes for the artifact store: tensor checkpoints.

A tensor checkpoint is ``MAGIC`` followed by one zstd frame (with its content checksum) holding a
safetensors file. safetensors never unpickles, so a checkpoint cannot run code when loaded; the
magic and the frame checksum let ``decode_tensors`` tell a damaged or foreign object from a
checkpoint and fail with ``ARTIFACT_CORRUPT`` instead of a library traceback.

This module imports torch; ``farm.storage`` itself does not, so light processes stay light.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import zstandard
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from farm.errors import ArtifactCorrupt

# "farm tensors, format 1": bump the digit if the layout after it ever changes.
MAGIC = b"FARMT\x00\x01\n"
ZSTD_LEVEL = 3


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Checkpoint bytes for named tensors (any device, layout or view)."""
    raw = save_safetensors(_prepare(tensors))
    frame = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(raw)
    return MAGIC + frame


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """The CPU tensors an ``encode_tensors`` checkpoint holds; ``ARTIFACT_CORRUPT`` if damaged."""
    if not data.startswith(MAGIC):
        raise ArtifactCorrupt("artifact is not a farm tensor checkpoint (bad header)")
    try:
        raw = zstandard.ZstdDecompressor().decompress(data[len(MAGIC) :])
    except zstandard.ZstdError as exc:
        raise ArtifactCorrupt(f"tensor checkpoint is damaged: {exc}") from exc
    try:
        return load_safetensors(raw)
    except (SafetensorError, ValueError) as exc:
        raise ArtifactCorrupt(f"tensor checkpoint is unreadable: {exc}") from exc


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
