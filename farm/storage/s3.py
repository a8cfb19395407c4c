"""The artifact store on any S3 API (AWS, MinIO, SeaweedFS, R2) through boto3.

botocore errors never leave this module: ``_boundary`` maps them to ``ArtifactMissing`` or
``StorageError`` with a stable code and a message that names the setting to fix.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from farm import tls
from farm.errors import (
    ArtifactMissing,
    BucketMissing,
    FarmError,
    StorageAuthError,
    StorageError,
    StorageRejected,
)
from farm.storage.base import check_range, validate_key, validate_prefix

if TYPE_CHECKING:
    from datetime import datetime

    from farm.config import Settings

MiB = 1024 * 1024
# DeleteObjects takes at most this many keys per request (S3 API limit).
DELETE_BATCH = 1000

_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AuthorizationHeaderMalformed",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
    }
)
_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed"}
)
_AUTH_HINT = (
    "check FARM_S3_ACCESS_KEY and FARM_S3_SECRET_KEY (and that this key may use the bucket)"
)


class IncompleteUpload(NamedTuple):
    """A multipart upload that was started but neither completed nor aborted."""

    key: str
    upload_id: str
    initiated: datetime


class S3Store:
    """Artifacts as objects in one S3 bucket.

    One boto3 client serves every thread of a process (clients are thread-safe, sessions are
    not). A process forked after the store was built gets its own client on first use, because
    the parent's pooled sockets must not be shared with a child (Celery prefork).
    """

    def __init__(
        self,
        endpoint: str | None,
        bucket: str,
        access_key: str | None,
        secret_key: str | None,
        region: str = "us-east-1",
        *,
        max_attempts: int = 5,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        multipart_threshold: int = 8 * MiB,
        multipart_chunksize: int = 8 * MiB,
        page_size: int = 1000,
        ca_bundle: Path | None = None,
    ) -> None:
        # None for endpoint/keys means boto3's defaults: AWS itself, credentials from the
        # environment or an instance role.
        self.endpoint = endpoint
        self.bucket = bucket
        self.region = region
        self.page_size = page_size
        self._client_kwargs = _client_kwargs(
            endpoint, access_key, secret_key, region, max_attempts, connect_timeout, read_timeout
        )
        if ca_bundle is not None:  # else boto3's own bundle (certifi) verifies https
            self._client_kwargs["verify"] = str(ca_bundle)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize
        )
        self._lock = threading.Lock()
        self._pid = -1
        self._s3: Any = None

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> S3Store:
        """The store that ``FARM_S3_*`` settings describe; ``options`` go to the constructor."""
        return cls(
            settings.s3_endpoint,
            settings.s3_bucket,
            _reveal(settings.s3_access_key),
            _reveal(settings.s3_secret_key),
            settings.s3_region,
            ca_bundle=settings.s3_ca_bundle,
            **options,
        )

    def __repr__(self) -> str:
        return f"S3Store(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    # -- the ArtifactStore interface -----------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        validate_key(key)
        with self._boundary(key):
            if len(data) < self._transfer.multipart_threshold:
                # One PutObject: atomic, and no transfer-manager thread pool for small objects.
                self._client().put_object(Bucket=self.bucket, Key=key, Body=data)
            else:
                self._upload(key, io.BytesIO(data))

    def put_file(self, key: str, path: Path) -> None:
        validate_key(key)
        with open(path, "rb") as fileobj, self._boundary(key):
            self._upload(key, fileobj)

    def get(self, key: str) -> bytes:
        validate_key(key)
        with self._boundary(key):
            response = self._client().get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read()

    def get_range(self, key: str, offset: int, size: int) -> bytes:
        validate_key(key)
        with self._boundary(key):
            response = self._client().get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + size - 1}"
            )
            data = response["Body"].read()
        return check_range(key, data, size)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ArtifactMissing:
            return False
        return True

    def size(self, key: str) -> int:
        validate_key(key)
        with self._boundary(key):
            return self._client().head_object(Bucket=self.bucket, Key=key)["ContentLength"]

    def modified(self, key: str) -> float:
        validate_key(key)
        with self._boundary(key):
            head = self._client().head_object(Bucket=self.bucket, Key=key)
        return head["LastModified"].timestamp()

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._boundary(key):
            self._client().delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str) -> int:
        if not validate_prefix(prefix):
            raise ValueError("refusing to delete every artifact: give a non-empty prefix")
        keys = list(self.list(prefix))
        for start in range(0, len(keys), DELETE_BATCH):
            self._delete_batch(keys[start : start + DELETE_BATCH])
        return len(keys)

    def list(self, prefix: str = "") -> Iterator[str]:
        # Some S3 servers (SeaweedFS) list "a/b" before "a-c", unlike AWS's byte order, so the
        # keys are sorted here: the contract promises one order on every backend.
        return iter(sorted(self._list_unordered(validate_prefix(prefix))))

    def check(self) -> None:
        with self._boundary(""):
            self._client().head_bucket(Bucket=self.bucket)

    # -- S3 housekeeping -----------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (the embedded stack and first runs need this)."""
        with self._boundary(""):
            try:
                self._client().head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if _status(exc) != 404:
                    raise
            self._create_bucket()

    def list_incomplete_uploads(self, prefix: str = "") -> Iterator[IncompleteUpload]:
        """Multipart uploads left open, e.g. by a worker killed mid-upload; they cost storage."""
        validate_prefix(prefix)
        pages = self._client().get_paginator("list_multipart_uploads")
        with self._boundary(""):
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Uploads", []):
                    yield IncompleteUpload(item["Key"], item["UploadId"], item["Initiated"])

    def abort_incomplete_uploads(self, prefix: str = "", older_than: float = 0.0) -> int:
        """Abort open multipart uploads started more than ``older_than`` seconds ago.

        Aborting an upload that a live worker is still sending makes that put fail (and be
        retried), so pass an ``older_than`` beyond the longest upload when workers are running.
        """
        cutoff = time.time() - older_than
        stale = [u for u in self.list_incomplete_uploads(prefix) if _started(u) <= cutoff]
        for upload in stale:
            with self._boundary(upload.key):
                self._client().abort_multipart_upload(
                    Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id
                )
        return len(stale)

    # -- internals -----------------------------------------------------------------------------

    def _client(self) -> Any:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._s3 = boto3.session.Session().client("s3", **self._client_kwargs)
                    self._pid = os.getpid()
        return self._s3

    def _upload(self, key: str, fileobj: Any) -> None:
        # The transfer manager switches to a multipart upload above the threshold; S3 makes
        # the object visible only when CompleteMultipartUpload succeeds, so it stays atomic.
        self._client().upload_fileobj(fileobj, self.bucket, key, Config=self._transfer)

    def _list_unordered(self, prefix: str) -> Iterator[str]:
        pages = self._client().get_paginator("list_objects_v2")
        config = {"PageSize": self.page_size}
        with self._boundary(prefix):
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix, PaginationConfig=config):
                for item in page.get("Contents", []):
                    yield item["Key"]

    def _delete_batch(self, keys: Sequence[str]) -> None:
        request = {"Objects": [{"Key": key} for key in keys], "Quiet": True}
        with self._boundary(keys[0]):
            response = self._client().delete_objects(Bucket=self.bucket, Delete=request)
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise StorageError(
                f"could not delete {len(errors)} of {len(keys)} objects in bucket "
                f"{self.bucket!r}, e.g. {first.get('Key')!r}: {first.get('Code')}"
            )

    def _create_bucket(self) -> None:
        # us-east-1 is the one region that rejects an explicit LocationConstraint.
        extra: dict[str, Any] = {}
        if self.region != "us-east-1":
            extra["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client().create_bucket(Bucket=self.bucket, **extra)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    @contextmanager
    def _boundary(self, key: str) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            raise self._map_error(exc, key) from exc

    def _map_error(self, exc: ClientError | BotoCoreError, key: str) -> FarmError:
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageAuthError(f"no S3 credentials were found: {_AUTH_HINT}")
        if tls.verify_failed(exc):
            return tls.untrusted("S3", self._where(), "FARM_S3_CA_BUNDLE")
        if isinstance(exc, BotoCoreError):
            # Connection refused/reset, timeouts, a body cut off mid-read: all worth a retry.
            return StorageError(f"cannot reach S3 at {self._where()}: {exc}")
        return self._map_client_error(exc, key)

    def _map_client_error(self, exc: ClientError, key: str) -> FarmError:
        code, status = _code(exc), _status(exc)
        # A bucket request (no key) answered "not found": a HEAD carries no error code.
        if code == "NoSuchBucket" or (not key and code in _MISSING_CODES):
            return BucketMissing(
                f"bucket {self.bucket!r} does not exist at {self._where()}: check "
                "FARM_S3_BUCKET, or create the bucket (`farm up` does)"
            )
        if code in _MISSING_CODES:
            return ArtifactMissing(f"artifact {key!r} is not in bucket {self.bucket!r}")
        if code == "InvalidRange":  # a range read past the object's end
            return ArtifactMissing(f"artifact {key!r} is shorter than the range recorded")
        if code in _AUTH_CODES or status == 403:
            return StorageAuthError(
                f"S3 at {self._where()} refused the credentials ({code}): {_AUTH_HINT}"
            )
        message = f"S3 at {self._where()} answered {status} {code} for {key!r}"
        if status >= 500 or status == 429 or code in _THROTTLE_CODES:
            return StorageError(message)
        return StorageRejected(message)

    def _where(self) -> str:
        return self.endpoint or f"AWS ({self.region})"


def _client_kwargs(
    endpoint: str | None,
    access_key: str | None,
    secret_key: str | None,
    region: str,
    max_attempts: int,
    connect_timeout: float,
    read_timeout: float,
) -> dict[str, Any]:
    config = Config(
        region_name=region,
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    return {
        "endpoint_url": endpoint,
        "aws_access_key_id": access_key,
        "aws_secret_access_key": secret_key,
        "config": config,
    }


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _started(upload: IncompleteUpload) -> float:
    return upload.initiated.timestamp()


def _reveal(secret: Any) -> str | None:
    return None if secret is None else secret.get_secret_value()
