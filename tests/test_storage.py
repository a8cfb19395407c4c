"""The ArtifactStore contract, run against every backend (S3 on a real SeaweedFS, and files).

``TestArtifactStore`` is the contract; the classes after it cover what only one backend has.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from farm.config import Settings
from farm.errors import ArtifactMissing, ConfigError, StorageError, StorageRefused, TransientError
from farm.local import StackInfo
from farm.storage import ArtifactStore, FilesystemStore, S3Store, make_store
from farm.storage.cache import CachedStore
from farm.storage.filesystem import TMP_PREFIX

MiB = 1024 * 1024
# Small pages and a low multipart threshold make a few keys and 20 MiB exercise both paths.
PAGE_SIZE = 7
PART_SIZE = 5 * MiB
UNSAFE_KEYS = ["", "../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "a/", "a\\b", "a\x00b"]


@pytest.fixture
def s3_store(stack: StackInfo) -> S3Store:
    return S3Store(
        stack.s3_endpoint,
        stack.s3_bucket,
        stack.s3_access_key,
        stack.s3_secret_key,
        "us-east-1",
        page_size=PAGE_SIZE,
        multipart_threshold=PART_SIZE,
        multipart_chunksize=PART_SIZE,
    )


@pytest.fixture
def fs_store(tmp_path: Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "artifacts")


@pytest.fixture
def cached_s3_store(s3_store: S3Store) -> CachedStore:
    return CachedStore(s3_store, max_bytes=64 * 1024 * 1024)


@pytest.fixture(params=["s3", "fs", "cached_s3"])
def store(request: pytest.FixtureRequest) -> ArtifactStore:
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def prefix(store: ArtifactStore) -> Iterator[str]:
    """A prefix no other test uses (the S3 bucket lives for the whole session)."""
    unique = f"test/{uuid.uuid4().hex}/"
    yield unique
    store.delete_prefix(unique)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class TestArtifactStore:
    def test_implements_the_protocol(self, store: ArtifactStore) -> None:
        assert isinstance(store, ArtifactStore)

    @pytest.mark.parametrize("data", [b"", b"\x00\xff" * 50_000])
    def test_put_then_get_round_trips(self, store: ArtifactStore, prefix: str, data: bytes) -> None:
        store.put(prefix + "blob", data)
        assert store.get(prefix + "blob") == data
        assert store.size(prefix + "blob") == len(data)

    def test_get_range_reads_part_of_an_object(self, store: ArtifactStore, prefix: str) -> None:
        store.put(prefix + "packed", b"0123456789")
        assert store.get_range(prefix + "packed", 3, 4) == b"3456"
        assert store.get_range(prefix + "packed", 0, 10) == b"0123456789"
        with pytest.raises(ArtifactMissing, match="holds 2 of the 4 bytes"):
            store.get_range(prefix + "packed", 8, 4)  # the object is shorter than recorded
        with pytest.raises(ArtifactMissing):
            store.get_range(prefix + "packed", 20, 4)  # starts past the end
        with pytest.raises(ArtifactMissing):
            store.get_range(prefix + "absent", 0, 1)

    def test_put_overwrites(self, store: ArtifactStore, prefix: str) -> None:
        store.put(prefix + "k", b"first, longer value")
        store.put(prefix + "k", b"second")
        assert store.get(prefix + "k") == b"second"
        assert list(store.list(prefix)) == [prefix + "k"]

    def test_modified_is_the_write_time(self, store: ArtifactStore, prefix: str) -> None:
        before = time.time()
        store.put(f"{prefix}stamped", b"x")
        assert before - 5 <= store.modified(f"{prefix}stamped") <= time.time() + 5
        with pytest.raises(ArtifactMissing):
            store.modified(f"{prefix}absent")

    def test_check_passes_on_a_store_that_answers(self, store: ArtifactStore) -> None:
        store.check()

    def test_missing_key_is_artifact_missing(self, store: ArtifactStore, prefix: str) -> None:
        assert not store.exists(prefix + "nope")
        for read in (store.get, store.size):
            with pytest.raises(ArtifactMissing) as info:
                read(prefix + "nope")
            assert info.value.code == "ARTIFACT_MISSING"
            assert not info.value.retryable

    def test_a_prefix_of_keys_is_not_an_object(self, store: ArtifactStore, prefix: str) -> None:
        store.put(prefix + "dir/file", b"x")
        assert not store.exists(prefix + "dir")
        with pytest.raises(ArtifactMissing):
            store.get(prefix + "dir")

    def test_delete_removes_and_ignores_absent_keys(
        self, store: ArtifactStore, prefix: str
    ) -> None:
        store.put(prefix + "k", b"x")
        store.delete(prefix + "k")
        store.delete(prefix + "k")
        store.delete(prefix + "never/was")
        assert not store.exists(prefix + "k")
        assert list(store.list(prefix)) == []

    def test_delete_prefix_removes_only_that_prefix(
        self, store: ArtifactStore, prefix: str
    ) -> None:
        for key in ("job1/a", "job1/sub/b", "job10/a", "job2/a"):
            store.put(prefix + key, b"x")
        assert store.delete_prefix(prefix + "job1/") == 2
        assert list(store.list(prefix)) == [prefix + "job10/a", prefix + "job2/a"]
        assert store.delete_prefix(prefix + "job1/") == 0

    def test_delete_prefix_refuses_to_empty_the_store(self, store: ArtifactStore) -> None:
        with pytest.raises(ValueError, match="non-empty prefix"):
            store.delete_prefix("")

    def test_list_is_sorted_and_matches_string_prefixes(
        self, store: ArtifactStore, prefix: str
    ) -> None:
        # '-' and '.' sort before '/', so a directory walk would put "a/b" first.
        names = ["b", "a/b", "a-c", "a/a/z", "a.b", "a0", "ab/c", "é"]
        for name in names:
            store.put(prefix + name, b"x")
        assert list(store.list(prefix)) == sorted(prefix + n for n in names)
        assert list(store.list(prefix + "a/")) == [prefix + "a/a/z", prefix + "a/b"]
        assert list(store.list(prefix + "a")) == sorted(
            prefix + n for n in names if n.startswith("a")
        )
        assert list(store.list(prefix + "zzz")) == []

    def test_list_reads_every_page(self, store: ArtifactStore, prefix: str) -> None:
        keys = [f"{prefix}{i:03d}" for i in range(3 * PAGE_SIZE + 1)]
        for key in keys:
            store.put(key, b"x")
        assert list(store.list(prefix)) == keys

    def test_nothing_half_written_is_left_to_abort(self, store: ArtifactStore, prefix: str) -> None:
        store.put(prefix + "whole", b"x")
        assert store.abort_incomplete_uploads(prefix) == 0
        assert store.get(prefix + "whole") == b"x"

    def test_large_object_round_trips(self, store: ArtifactStore, prefix: str) -> None:
        data = os.urandom(4 * PART_SIZE + 123)
        store.put(prefix + "big", data)
        assert sha256(store.get(prefix + "big")) == sha256(data)

    def test_put_file_round_trips(self, store: ArtifactStore, prefix: str, tmp_path: Path) -> None:
        source = tmp_path / "upload.bin"
        for size in (10, 2 * PART_SIZE + 7):
            source.write_bytes(os.urandom(size))
            store.put_file(prefix + f"file-{size}", source)
            assert sha256(store.get(prefix + f"file-{size}")) == sha256(source.read_bytes())

    @pytest.mark.parametrize("key", UNSAFE_KEYS)
    def test_rejects_unsafe_keys(self, store: ArtifactStore, key: str) -> None:
        operations = [
            lambda: store.put(key, b"x"),
            lambda: store.get(key),
            lambda: store.exists(key),
            lambda: store.delete(key),
            lambda: store.get_range(key, 0, 1),
        ]
        for operation in operations:
            with pytest.raises(ValueError):
                operation()

    def test_readers_never_see_a_partial_object(self, store: ArtifactStore, prefix: str) -> None:
        key = prefix + "contended"
        values = [bytes([n]) * MiB for n in range(4)]
        store.put(key, values[0])
        stop = threading.Event()
        seen: set[bytes] = set()

        def read() -> None:
            while not stop.is_set():
                seen.add(store.get(key))

        reader = threading.Thread(target=read)
        reader.start()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda v: [store.put(key, v) for _ in range(3)], values))
        stop.set()
        reader.join()
        assert seen <= set(values)

    @pytest.mark.slow
    def test_more_keys_than_one_s3_page_or_delete_batch(
        self, store: ArtifactStore, prefix: str
    ) -> None:
        # S3 answers at most 1000 keys per list and deletes at most 1000 per request.
        keys = [f"{prefix}{i:04d}" for i in range(1100)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda key: store.put(key, b"x"), keys))
        assert list(store.list(prefix)) == keys
        assert store.delete_prefix(prefix) == 1100
        assert list(store.list(prefix)) == []


class TestS3Store:
    def test_wrong_secret_is_an_auth_error_that_hides_the_secret(self, stack: StackInfo) -> None:
        secret = "wrong-secret-" + uuid.uuid4().hex
        bad = S3Store(stack.s3_endpoint, stack.s3_bucket, stack.s3_access_key, secret)
        for operation in (
            lambda: bad.get("k"),
            lambda: bad.put("k", b"x"),
            lambda: bad.exists("k"),
        ):
            with pytest.raises(StorageRefused) as info:
                operation()
            err = info.value
            assert err.code == "STORAGE_AUTH"
            assert not err.retryable
            assert "FARM_S3_SECRET_KEY" in err.message
            assert secret not in f"{err} {err!r} {err.__cause__} {bad!r}"

    def test_check_names_a_refused_key_and_a_missing_bucket(self, stack: StackInfo) -> None:
        endpoint, key, secret = stack.s3_endpoint, stack.s3_access_key, stack.s3_secret_key
        with pytest.raises(StorageRefused) as refused:
            S3Store(endpoint, stack.s3_bucket, key, "wrong").check()
        with pytest.raises(StorageRefused) as missing:
            S3Store(endpoint, "no-such-bucket", key, secret).check()
        assert (refused.value.code, missing.value.code) == ("STORAGE_AUTH", "STORAGE_NO_BUCKET")

    def test_unknown_access_key_is_an_auth_error(self, stack: StackInfo) -> None:
        bad = S3Store(stack.s3_endpoint, stack.s3_bucket, "no-such-key", stack.s3_secret_key)
        with pytest.raises(StorageRefused) as info:
            bad.get("k")
        assert info.value.code == "STORAGE_AUTH"

    def test_unreachable_server_is_transient_and_quick(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            closed_port = sock.getsockname()[1]
        store = S3Store(f"http://127.0.0.1:{closed_port}", "farm", "k", "s", max_attempts=2)
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            store.get("k")
        assert time.monotonic() - started < 5
        assert info.value.code == "STORAGE_UNAVAILABLE"
        assert info.value.retryable

    def test_missing_bucket_is_named_and_ensure_bucket_creates_it(self, stack: StackInfo) -> None:
        bucket = f"test-{uuid.uuid4().hex[:12]}"
        store = S3Store(stack.s3_endpoint, bucket, stack.s3_access_key, stack.s3_secret_key)
        with pytest.raises(StorageRefused) as info:
            store.get("k")
        assert info.value.code == "STORAGE_NO_BUCKET"
        assert "FARM_S3_BUCKET" in info.value.message
        store.ensure_bucket()
        store.ensure_bucket()
        store.put("k", b"x")
        assert store.get("k") == b"x"
        store.delete("k")

    @pytest.mark.parametrize(("size", "parts"), [(PART_SIZE - 1, ""), (4 * PART_SIZE, "4")])
    def test_multipart_only_above_the_threshold(
        self, s3_store: S3Store, stack: StackInfo, size: int, parts: str
    ) -> None:
        key = f"test/{uuid.uuid4().hex}"
        s3_store.put(key, os.urandom(size))
        etag = raw_client(stack).head_object(Bucket=stack.s3_bucket, Key=key)["ETag"]
        s3_store.delete(key)
        # A multipart object's ETag is "<md5 of part md5s>-<number of parts>".
        assert etag.strip('"').partition("-")[2] == parts

    def test_abort_incomplete_uploads(self, s3_store: S3Store, stack: StackInfo) -> None:
        prefix = f"test/{uuid.uuid4().hex}/"
        client = raw_client(stack)
        upload = client.create_multipart_upload(Bucket=stack.s3_bucket, Key=prefix + "crashed")
        client.upload_part(
            Bucket=stack.s3_bucket,
            Key=prefix + "crashed",
            UploadId=upload["UploadId"],
            PartNumber=1,
            Body=b"x" * 1024,
        )
        assert [u.key for u in s3_store.list_incomplete_uploads(prefix)] == [prefix + "crashed"]
        assert s3_store.abort_incomplete_uploads(prefix, older_than=3600) == 0
        assert s3_store.abort_incomplete_uploads(prefix) == 1
        assert list(s3_store.list_incomplete_uploads(prefix)) == []
        assert not s3_store.exists(prefix + "crashed")

    def test_a_forked_child_gets_a_working_client(self, s3_store: S3Store) -> None:
        key = f"test/{uuid.uuid4().hex}"
        s3_store.put(key, b"parent")  # the parent's client now holds pooled connections
        child = multiprocessing.get_context("fork").Process(
            target=s3_store.put, args=(key, b"child")
        )
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert s3_store.get(key) == b"child"
        s3_store.delete(key)


class TestFilesystemStore:
    def test_check_fails_when_the_root_is_gone(self, fs_store: FilesystemStore) -> None:
        fs_store.root.rmdir()  # an unmounted share
        with pytest.raises(StorageError):
            fs_store.check()

    def test_temporary_files_are_never_listed(self, fs_store: FilesystemStore) -> None:
        fs_store.put("job/a", b"x")
        (fs_store.root / "job" / f"{TMP_PREFIX}leftover").write_bytes(b"half")
        assert list(fs_store.list()) == ["job/a"]
        with pytest.raises(ValueError):
            fs_store.put(f"job/{TMP_PREFIX}x", b"x")

    def test_a_put_leaves_only_the_object(self, fs_store: FilesystemStore) -> None:
        fs_store.put("job/a", b"x")
        fs_store.put("job/a", b"y")
        assert os.listdir(fs_store.root / "job") == ["a"]

    def test_keys_cannot_escape_the_root_through_a_symlink(
        self, fs_store: FilesystemStore, tmp_path: Path
    ) -> None:
        (tmp_path / "outside").mkdir()
        (fs_store.root / "link").symlink_to(tmp_path / "outside")
        with pytest.raises(ValueError, match="outside"):
            fs_store.put("link/x", b"x")
        assert not (tmp_path / "outside" / "x").exists()

    def test_delete_prefix_removes_emptied_directories(self, fs_store: FilesystemStore) -> None:
        fs_store.put("jobs/1/a/b", b"x")
        fs_store.put("jobs/2/a", b"x")
        fs_store.delete_prefix("jobs/1/")
        assert sorted(os.listdir(fs_store.root / "jobs")) == ["2"]

    def test_a_key_below_an_object_is_a_permanent_error(self, fs_store: FilesystemStore) -> None:
        fs_store.put("a", b"x")
        with pytest.raises(StorageRefused) as info:
            fs_store.put("a/b", b"y")
        assert info.value.code == "STORAGE_REJECTED"
        assert not info.value.retryable and not isinstance(info.value, TransientError)

    def test_a_killed_writers_temporary_file_is_aborted(self, fs_store: FilesystemStore) -> None:
        fs_store.put("jobs/1/a", b"x")
        leftover = fs_store.root / "jobs" / "1" / f"{TMP_PREFIX}half"
        leftover.write_bytes(b"half")
        assert fs_store.abort_incomplete_uploads("jobs/", older_than=3600) == 0
        assert fs_store.abort_incomplete_uploads("jobs/") == 1
        assert not leftover.exists() and fs_store.get("jobs/1/a") == b"x"


class TestMakeStore:
    def settings(self, **values: Any) -> Settings:
        urls = {
            "broker_url": "redis://h",
            "redis_url": "redis://h",
            "database_url": "postgresql+psycopg2://h",
        }
        return Settings(_env_file=None, **urls, **values)

    def test_fs_settings_make_a_filesystem_store(self, tmp_path: Path) -> None:
        store = make_store(self.settings(storage="fs", fs_root=tmp_path))
        assert isinstance(store, FilesystemStore)
        assert store.root == tmp_path.resolve()

    def test_fs_without_a_root_is_a_config_error(self) -> None:
        with pytest.raises(ConfigError, match="FARM_FS_ROOT"):
            make_store(self.settings(storage="fs"))

    def test_s3_settings_make_an_s3_store(self) -> None:
        settings = self.settings(
            storage="s3",
            s3_endpoint="http://s3:8333",
            s3_bucket="b",
            s3_access_key="k",
            s3_secret_key="very-secret",
        )
        store = make_store(settings)
        assert isinstance(store, S3Store)
        assert (store.endpoint, store.bucket) == ("http://s3:8333", "b")
        assert "very-secret" not in repr(store)

    def test_importing_storage_does_not_import_torch(self) -> None:
        code = "import sys, farm.storage; assert 'torch' not in sys.modules"
        subprocess.run([sys.executable, "-c", code], check=True)


def raw_client(stack: StackInfo) -> Any:
    """A plain boto3 client, to look at or set up what the store itself won't."""
    return boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        aws_access_key_id=stack.s3_access_key,
        aws_secret_access_key=stack.s3_secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )


class TestCachedStore:
    def test_reads_what_it_wrote_from_memory_and_still_stores_it(self, s3_store, prefix) -> None:
        cached = CachedStore(s3_store)
        cached.put(f"{prefix}a", b"checkpoint")
        assert cached.get(f"{prefix}a") == b"checkpoint" and cached.hits == 1
        assert s3_store.get(f"{prefix}a") == b"checkpoint"  # the store has it too

    def test_stays_within_its_byte_budget(self, fs_store, prefix) -> None:
        cached = CachedStore(fs_store, max_bytes=100)
        for i in range(10):
            cached.put(f"{prefix}{i}", bytes(20))
        assert cached._size <= 100
        assert cached.get(f"{prefix}0") == bytes(20)  # evicted from memory, read from the store
        assert cached.hits == 0
