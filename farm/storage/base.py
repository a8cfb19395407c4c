"""The artifact store interface every backend implements, and the key rules they share.

An artifact is an immutable blob under a key such as ``jobs/{job_id}/encode.safetensors.zst``
(see ``farm.storage.keys``). Stores are used from many worker threads and processes at once, so
every implementation guarantees:

- ``put`` is atomic: a reader sees the old object, the new one, or none, never a partial one;
- ``get`` of an absent key raises ``ArtifactMissing`` (permanent), while an unreachable or failing
  backend raises ``StorageError`` (transient unless its ``retryable`` says otherwise);
- ``list`` yields keys in sorted order, whatever order the backend returns them in.

The contract is pinned by ``tests/test_storage.py``, one test class run against every backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from farm.errors import ArtifactMissing

# S3's limit on a key's UTF-8 length; the file system store keeps it too so keys stay portable.
MAX_KEY_BYTES = 1024


@runtime_checkable
class ArtifactStore(Protocol):
    """Where stages put their checkpoints and the farm puts inputs and outputs."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any object already there."""
        ...

    def put_file(self, key: str, path: Path) -> None:
        """Store the file at ``path`` under ``key`` without reading it all into memory."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes; ``ArtifactMissing`` if there is none."""
        ...

    def get_range(self, key: str, offset: int, size: int) -> bytes:
        """``size`` bytes of the object from ``offset``; ``ArtifactMissing`` if there is none
        or it is shorter than that."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        ...

    def size(self, key: str) -> int:
        """The object's length in bytes; ``ArtifactMissing`` if there is none."""
        ...

    def modified(self, key: str) -> float:
        """When the object was last written (Unix time); ``ArtifactMissing`` if there is none."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; removing an absent key is not an error."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with ``prefix``; returns how many."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, sorted."""
        ...

    def check(self) -> None:
        """Raise unless the store answers and takes our credentials (a submit asks before it
        records anything)."""
        ...

    def abort_incomplete_uploads(self, prefix: str = "", older_than: float = 0.0) -> int:
        """Abort uploads under ``prefix`` started more than ``older_than`` seconds ago and never
        finished (a worker killed mid-upload); returns how many. Stores whose writes cannot be
        left half-done return 0."""
        ...


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ``ValueError``.

    Keys are built by ``farm.storage.keys`` from UUIDs and stage names, never from user input; this
    check is defence in depth, so that a bug can neither escape the file system store's root nor
    create keys that one backend accepts and another maps elsewhere (``a//b`` is one S3 key but
    the same file as ``a/b``).
    """
    if not isinstance(key, str) or not key:
        raise ValueError("an artifact key must be a non-empty string")
    _check_chars(key)
    if key.startswith("/"):
        raise ValueError(f"artifact key {key!r} must be relative, not start with '/'")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"artifact key {key!r} has an empty, '.' or '..' segment")
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it could begin a valid key (``""`` and a trailing ``/`` allowed)."""
    if prefix:
        validate_key(prefix.removesuffix("/"))
    return prefix


def _check_chars(key: str) -> None:
    if "\\" in key:
        raise ValueError(f"artifact key {key!r} contains a backslash")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise ValueError(f"artifact key {key!r} contains a control character")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"artifact key {key!r} is not valid Unicode") from None
    if len(encoded) > MAX_KEY_BYTES:
        raise ValueError(f"artifact key is longer than {MAX_KEY_BYTES} bytes")


def check_range(key: str, data: bytes, size: int) -> bytes:
    """A range read must return exactly what was asked for: a shorter object is not the one
    the record points to."""
    if len(data) != size:
        raise ArtifactMissing(f"artifact {key!r} holds {len(data)} of the {size} bytes recorded")
    return data
