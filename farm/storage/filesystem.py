"""The artifact store on a shared disk (NFS, a cluster file system, or one machine's disk).

Each key is a file under ``root``. A put writes a temporary file next to its target, fsyncs it
and renames it into place, so readers on any host see the old file or the new one, never half.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from farm.errors import ArtifactMissing, FarmError, StorageAuthError, StorageError, StorageRejected
from farm.storage.base import check_range, validate_key, validate_prefix

# Temporary files start with this; list() hides them and keys may not use the name.
TMP_PREFIX = ".farm-tmp-"
_NOT_A_FILE = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
# Read once (os.umask can only be read by setting it) so artifacts get the mode any new file
# would; mkstemp's 0600 would hide them from the other farm users of a shared disk.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class FilesystemStore:
    """Artifacts as files under one root directory."""

    def __init__(self, root: Path) -> None:
        root = Path(root).expanduser()
        with _boundary(str(root)):
            root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()

    def __repr__(self) -> str:
        return f"FilesystemStore(root={str(self.root)!r})"

    # -- the ArtifactStore interface -----------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        self._write(key, lambda out: out.write(data))

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as source:
            self._write(key, lambda out: shutil.copyfileobj(source, out))

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with _boundary(key), _missing_as(key):
            return path.read_bytes()

    def get_range(self, key: str, offset: int, size: int) -> bytes:
        path = self._path(key)
        with _boundary(key), _missing_as(key), open(path, "rb") as file:
            file.seek(offset)
            data = file.read(size)
        return check_range(key, data, size)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        with _boundary(key):
            return path.is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        with _boundary(key), _missing_as(key):
            if not path.is_file():
                raise FileNotFoundError(path)
            return path.stat().st_size

    def modified(self, key: str) -> float:
        path = self._path(key)
        with _boundary(key), _missing_as(key):
            if not path.is_file():
                raise FileNotFoundError(path)
            return path.stat().st_mtime

    def delete(self, key: str) -> None:
        path = self._path(key)
        # A "directory" key holds no object, and S3 ignores absent keys too.
        with _boundary(key), suppress(IsADirectoryError, NotADirectoryError):
            path.unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        if not validate_prefix(prefix):
            raise ValueError("refusing to delete every artifact: give a non-empty prefix")
        keys = list(self.list(prefix))
        for key in keys:
            self.delete(key)
        self._prune_dirs(prefix)
        return len(keys)

    def list(self, prefix: str = "") -> Iterator[str]:
        # Walk only the deepest directory the prefix names, then filter by the string prefix
        # as S3 does ("jobs/ab" matches "jobs/abc/x").
        base = self._dir_of(validate_prefix(prefix))
        with _boundary(prefix):
            keys = [key for key in self._walk(base) if key.startswith(prefix)]
        return iter(sorted(keys))

    def check(self) -> None:
        with _boundary(str(self.root)):
            self.root.stat()  # gone (an unmounted share): StorageError
            if not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self.root))

    def abort_incomplete_uploads(self, prefix: str = "", older_than: float = 0.0) -> int:
        # A write goes to a temporary file renamed into place, so no key is ever half-written;
        # what a killed writer leaves is its temporary file, removed here.
        cutoff = time.time() - older_than
        base = self._dir_of(validate_prefix(prefix))
        removed = 0
        with _boundary(prefix):
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    path = Path(dirpath) / name
                    if name.startswith(TMP_PREFIX) and path.stat().st_mtime <= cutoff:
                        path.unlink(missing_ok=True)
                        removed += 1
        return removed

    # -- internals -----------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.rsplit("/", 1)[-1].startswith(TMP_PREFIX):
            raise ValueError(f"artifact key {key!r} uses the reserved name {TMP_PREFIX!r}")
        path = (self.root / key).resolve()
        # resolve() follows symlinks, so a link planted inside root can't lead outside it.
        if not path.is_relative_to(self.root):
            raise ValueError(f"artifact key {key!r} leads outside the store root")
        return path

    def _dir_of(self, prefix: str) -> Path:
        directory = prefix.rpartition("/")[0]
        return self.root / directory if directory else self.root

    def _walk(self, base: Path) -> Iterator[str]:
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if not name.startswith(TMP_PREFIX):
                    yield name if rel == "." else f"{rel}/{name}"

    def _write(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        path = self._path(key)
        with _boundary(key):
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, write)

    def _prune_dirs(self, prefix: str) -> None:
        # Deleted jobs should not leave a forest of empty directories behind.
        for dirpath, _dirs, _files in os.walk(self._dir_of(prefix), topdown=False):
            rel = Path(dirpath).relative_to(self.root).as_posix() + "/"
            # A directory still holding files (or a concurrent writer's new one) stays.
            if rel.startswith(prefix):
                with suppress(OSError):
                    os.rmdir(dirpath)


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk too.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _missing_as(key: str) -> Iterator[None]:
    try:
        yield
    except _NOT_A_FILE:
        raise ArtifactMissing(f"artifact {key!r} is not in the store") from None


@contextmanager
def _boundary(key: str) -> Iterator[None]:
    try:
        yield
    except FarmError:
        raise
    except OSError as exc:
        raise _map_os_error(exc, key) from exc


def _map_os_error(exc: OSError, key: str) -> FarmError:
    if isinstance(exc, PermissionError):
        return StorageAuthError(
            f"permission denied on artifact {key!r} ({exc.filename}): check that this user may "
            "read and write FARM_FS_ROOT"
        )
    if isinstance(exc, (FileExistsError, IsADirectoryError, NotADirectoryError)):
        return StorageRejected(
            f"artifact {key!r} clashes with another key: a file system store cannot hold both "
            "'a' and 'a/b'"
        )
    # A full disk, a stale NFS handle, an I/O error: maybe gone on the next attempt.
    return StorageError(f"cannot access artifact {key!r} under the store root: {exc}")
