"""What a stage may write, and how each kind of artifact travels through the store.

A stage declares the kind it writes and the kinds it reads (farm.stages.base.Stage). The
checkpoint's bytes are the kind's encoding; its record keeps the content type, so a reader, a
client saving the job's output and ``farm gc`` all know what an object holds without opening
it. Tensors stay compressed (zstd, farm.storage.codecs); the others are stored as they are.

Torch is imported only to encode or decode tensors, so clients stay light.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from farm.errors import ArtifactCorrupt


def _encode_tensors(value: Any) -> bytes:
    from farm.storage.codecs import encode_tensors

    return encode_tensors(value)


def _decode_tensors(data: bytes) -> Any:
    from farm.storage.codecs import decode_tensors

    return decode_tensors(data)


def _encode_text(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"a text artifact must be str, got {type(value).__name__}")
    return value.encode("utf-8")


def _decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactCorrupt(f"text artifact is not UTF-8 ({exc.reason})") from exc


def _encode_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")


def _decode_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactCorrupt(f"JSON artifact does not parse ({exc})") from exc


def _encode_bytes(value: Any) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"this artifact must be bytes, got {type(value).__name__}")
    return bytes(value)


def _decode_bytes(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class Kind:
    """One kind of artifact: what a stage returns for it and how that is stored."""

    name: str
    content_type: str
    suffix: str  # of its object key and of an output file saved from it
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]


_RAW = (_encode_bytes, _decode_bytes)

KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(
            "tensors",
            "application/x-farm-tensors+zstd",
            "safetensors.zst",
            _encode_tensors,
            _decode_tensors,
        ),
        Kind("png", "image/png", "png", *_RAW),
        Kind("text", "text/plain; charset=utf-8", "txt", _encode_text, _decode_text),
        Kind("json", "application/json", "json", _encode_json, _decode_json),
        Kind("wav", "audio/wav", "wav", *_RAW),
        Kind("mp4", "video/mp4", "mp4", *_RAW),
        Kind("bytes", "application/octet-stream", "bin", *_RAW),
    )
}
# What a stage with no ``after`` reads: the submitted file's bytes (None without one).
INPUT = "input"


def kind_of(content_type: str | None) -> Kind:
    """The kind a record's content type names; records from before content types were kept
    hold tensors or, for the PNG a pipeline ends with, image/png (set by migration 0006)."""
    for kind in KINDS.values():
        if kind.content_type == content_type:
            return kind
    return KINDS["tensors"]
