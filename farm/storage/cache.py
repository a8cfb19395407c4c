"""A write-through, in-process cache in front of an artifact store.

A GPU worker runs encode -> noise -> denoise -> decode of a job back to back, each stage
reading the checkpoint the previous one wrote a moment ago in the same process. Every write
still goes to the store (it is the checkpoint); reads of what this process wrote recently are
served from memory. Keys are deterministic and stages are reproducible, so a cached object is
byte-identical to the stored one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from farm.storage.base import ArtifactStore

DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # SD-1.5 checkpoints are at most ~3 MB each


class CachedStore:
    """``ArtifactStore`` that remembers the last objects it wrote (LRU, bounded in bytes)."""

    def __init__(self, store: ArtifactStore, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.store, self.max_bytes = store, max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0

    def put(self, key: str, data: bytes) -> None:
        self.store.put(key, data)
        self._remember(key, data)

    def get(self, key: str) -> bytes:
        data = self.cached(key)
        return data if data is not None else self.store.get(key)

    def cached(self, key: str) -> bytes | None:
        """What this process wrote under ``key``, if it still remembers it."""
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                self.hits += 1
            return data

    def get_range(self, key: str, offset: int, size: int) -> bytes:
        return self.store.get_range(key, offset, size)  # packed inputs: read once, not cached

    def delete(self, key: str) -> None:
        self._forget(key)
        self.store.delete(key)

    def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            for key in [k for k in self._items if k.startswith(prefix)]:
                self._size -= len(self._items.pop(key))
        return self.store.delete_prefix(prefix)

    def put_file(self, key: str, path: Path) -> None:
        self._forget(key)
        self.store.put_file(key, path)

    def exists(self, key: str) -> bool:
        return self.store.exists(key)

    def size(self, key: str) -> int:
        return self.store.size(key)

    def modified(self, key: str) -> float:
        return self.store.modified(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.store.list(prefix)

    def check(self) -> None:
        self.store.check()

    def abort_incomplete_uploads(self, prefix: str = "", older_than: float = 0.0) -> int:
        return self.store.abort_incomplete_uploads(prefix, older_than)

    def _remember(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes // 4:
            return
        with self._lock:
            if key in self._items:
                self._size -= len(self._items.pop(key))
            self._items[key] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                self._size -= len(self._items.popitem(last=False)[1])

    def _forget(self, key: str) -> None:
        with self._lock:
            if key in self._items:
                self._size -= len(self._items.pop(key))
