"""Reads checked against their record.

A stage records the size and sha256 of the checkpoint it wrote (``stage_runs``); every later
read of that checkpoint, or of a job's output, is checked against the record before it is
used, so an object that was overwritten, truncated or swapped with another job's is never
taken for the right one. sha256 costs about 2 ms per MB here, against seconds of model work
per stage (benchmarks/README.md, e2e). A worker's in-memory cache holds only what that process
wrote itself, so its hits need no check.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from farm.errors import ArtifactCorrupt, ArtifactMissing
from farm.storage.base import ArtifactStore
from farm.storage.cache import CachedStore


def sha256_hex(data: bytes) -> str:
    """The checksum recorded for every checkpoint and output."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Recorded:
    """An object as the record of the stage that wrote it describes it."""

    job_id: str
    stage: str
    key: str
    size: int | None
    checksum: str | None

    def __str__(self) -> str:
        return f"the {self.stage} checkpoint of job {self.job_id}"


def read_recorded(store: ArtifactStore, obj: Recorded) -> bytes:
    """The object's bytes, if they are the ones its record describes. ``ArtifactMissing`` when
    it is gone, ``ArtifactCorrupt`` when its size or checksum differ; both name job and stage."""
    if isinstance(store, CachedStore):
        cached = store.cached(obj.key)
        if cached is not None:
            return cached
    try:
        data = store.get(obj.key)
    except ArtifactMissing as exc:
        raise ArtifactMissing(f"{str(obj).capitalize()} is gone from the store.") from exc
    check(obj, data)
    return data


def check(obj: Recorded, data: bytes) -> None:
    """``ArtifactCorrupt`` unless ``data`` has the recorded size and checksum."""
    if obj.size is not None and len(data) != obj.size:
        raise ArtifactCorrupt(
            f"{str(obj).capitalize()} is {len(data)} bytes, not the {obj.size} recorded: "
            "it was changed after it was written."
        )
    if obj.checksum is not None and sha256_hex(data) != obj.checksum:
        raise ArtifactCorrupt(
            f"{str(obj).capitalize()} does not match its recorded sha256: "
            "it was changed after it was written."
        )
