"""Reads checked against their record: a changed object is refused, naming job and stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.errors import ArtifactCorrupt, ArtifactMissing
from farm.storage import FilesystemStore
from farm.storage.cache import CachedStore
from farm.storage.verified import Recorded, read_recorded, sha256_hex

KEY = "jobs/j1/decode.safetensors.zst"


@pytest.fixture
def store(tmp_path: Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "artifacts")


def recorded(data: bytes) -> Recorded:
    return Recorded("j1", "decode", KEY, len(data), sha256_hex(data))


def test_sha256_hex() -> None:
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_the_recorded_bytes_are_returned(store: FilesystemStore) -> None:
    store.put(KEY, b"latents")
    assert read_recorded(store, recorded(b"latents")) == b"latents"


def test_same_size_other_bytes_is_corrupt_naming_job_and_stage(store: FilesystemStore) -> None:
    store.put(KEY, b"LATENTS")  # another job's valid checkpoint would look like this
    with pytest.raises(ArtifactCorrupt, match=r"decode checkpoint of job j1 .*sha256"):
        read_recorded(store, recorded(b"latents"))


def test_other_size_is_corrupt(store: FilesystemStore) -> None:
    store.put(KEY, b"late")
    with pytest.raises(ArtifactCorrupt, match="4 bytes, not the 7 recorded"):
        read_recorded(store, recorded(b"latents"))


def test_gone_is_missing_naming_job_and_stage(store: FilesystemStore) -> None:
    with pytest.raises(ArtifactMissing, match="decode checkpoint of job j1 is gone"):
        read_recorded(store, recorded(b"latents"))


def test_a_cache_hit_is_what_this_process_wrote_and_needs_no_check(
    store: FilesystemStore,
) -> None:
    cached = CachedStore(store)
    cached.put(KEY, b"latents")
    store.put(KEY, b"LATENTS")  # changed behind the cache's back: the cache still holds ours
    assert read_recorded(cached, recorded(b"latents")) == b"latents"
    assert cached.hits == 1


def test_a_cache_miss_is_checked(store: FilesystemStore) -> None:
    store.put(KEY, b"LATENTS")
    with pytest.raises(ArtifactCorrupt):
        read_recorded(CachedStore(store), recorded(b"latents"))
