"""Finding and reading the images of a folder, safely.

What is checked here, before anything is uploaded (the bytes are decoded only by the preprocess
stage, in a worker; see farm.stages.preprocess for the checks that need decoding):

================  ==================================================================================
INPUT_OUTSIDE     the file (a symlink, or a path with ``..``) resolves outside the input folder: it
                  is reported and never opened, so a link to /etc/passwd leaks nothing
INPUT_UNREADABLE  missing, a symlink loop, a directory, FIFO or device, or the OS refuses to open it
INPUT_TOO_LARGE   over ``MAX_INPUT_BYTES`` (50 MB), judged by ``fstat`` before reading
INPUT_NOT_IMAGE   empty (0 bytes)
================  ==================================================================================

A symlink that stays inside the folder is followed. The file is opened by its resolved path with
``O_NOFOLLOW`` and checked to be a regular file on the open descriptor, so swapping the file for
a link or a FIFO between the check and the read does not escape the folder or hang the reader.

The user's file names are kept as metadata only (object keys are made of job ids and stage
names): they are not normalized (NFC and NFD twins stay two inputs with their own names), and
bytes that are not UTF-8 become U+FFFD so that the name can be stored in Postgres.
"""

from __future__ import annotations

import hashlib
import os
import stat
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from farm.errors import FarmError, InvalidImage, InvalidParameter

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_INPUT_BYTES = 50 * 1024 * 1024  # larger files are rejected before upload
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


@dataclass(frozen=True)
class InputFile:
    """One image file of a folder: its name relative to the folder, and what reading it gave."""

    name: str
    path: Path
    data: bytes | None = None
    error: FarmError | None = None

    @property
    def content_hash(self) -> str:
        """The bytes' hash; for a file that could not be read, its full path's (so the same
        name rejected in two folders is two jobs, and a re-run finds the earlier record)."""
        source = self.data if self.data is not None else str(self.path).encode(errors="replace")
        return hashlib.sha256(source).hexdigest()


def display_name(name: str) -> str:
    """A file name as stored and shown: undecodable bytes (surrogate escapes) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _shown(name: str) -> str:
    """A name inside a one-line message: control characters (a newline in a name) become '?'."""
    return "".join("?" if unicodedata.category(char) == "Cc" else char for char in name)


class FolderListing(Sequence[InputFile]):
    """A folder's image files, sorted by name. Only their relative names are held; each
    ``InputFile`` is made when asked for, so a folder of many files costs memory for its names
    alone (about 90 bytes a file rather than ~500 for a Path object and its parts)."""

    def __init__(self, base: Path, names: list[str]) -> None:
        self.base, self._names = base, names

    def __len__(self) -> int:
        return len(self._names)

    @overload
    def __getitem__(self, index: int) -> InputFile: ...
    @overload
    def __getitem__(self, index: slice) -> list[InputFile]: ...
    def __getitem__(self, index: int | slice) -> InputFile | list[InputFile]:
        if isinstance(index, slice):
            return [self._file(name) for name in self._names[index]]
        return self._file(self._names[index])

    def _file(self, name: str) -> InputFile:
        return InputFile(display_name(name), self.base / name)


def scan_folder(root: str | Path, recursive: bool = False) -> FolderListing:
    """Image files under ``root`` (by suffix), sorted by name; hidden files are skipped.
    Symlinked folders are not descended into."""
    base = Path(root).expanduser()
    if not base.is_dir():
        shown = _shown(display_name(str(base)))
        raise InvalidParameter(f"{shown} is not a folder; give the path of a folder of images.")
    base = base.resolve()
    try:
        names = [path.relative_to(base).as_posix() for path in _walk(base, recursive)]
    except OSError as exc:
        where = _shown(display_name(str(exc.filename or base)))
        message = f"Cannot list {where} ({exc.strerror}); check that you may read the folder."
        raise InvalidParameter(message) from None
    return FolderListing(base, sorted(names, key=display_name))


def _walk(base: Path, recursive: bool) -> Iterator[Path]:
    entries = base.rglob("*") if recursive else base.iterdir()
    for path in entries:
        rel = path.relative_to(base)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and (path.is_file() or path.is_symlink()):
            yield path


def read_input(file: InputFile, base: Path) -> InputFile:
    """Read the file's bytes, or record why it cannot be used."""
    try:
        return InputFile(file.name, file.path, data=read_image_bytes(file.path, base))
    except FarmError as exc:
        return InputFile(file.name, file.path, error=exc)


def read_image_bytes(path: Path, base: Path | None = None) -> bytes:
    """The file's bytes, after the checks that need no decoding (location, kind, size,
    emptiness). With ``base``, a file that resolves outside it is refused without being opened."""
    name = _shown(display_name(path.name))
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: RuntimeError before Python 3.13
        message = f'The file "{name}" is a link that cannot be followed (a loop?); replace it.'
        raise InvalidImage(message, code="INPUT_UNREADABLE") from None
    if base is not None and not target.is_relative_to(base.resolve()):
        message = (
            f'The file "{name}" leads outside the input folder, so it was not read; '
            "copy the image into the folder instead of linking to it."
        )
        raise InvalidImage(message, code="INPUT_OUTSIDE")
    data = _read_regular_file(target, name)
    check_bytes(data, name)
    return data


def _read_regular_file(target: Path, name: str) -> bytes:
    try:
        fd = os.open(target, _OPEN_FLAGS)
    except OSError as exc:
        message = f'Cannot open "{name}" ({exc.strerror}); check that it exists and is readable.'
        raise InvalidImage(message, code="INPUT_UNREADABLE") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            message = f"{_subject(name)} is {kind}; submit an image file."
            raise InvalidImage(message, code="INPUT_UNREADABLE")
        if info.st_size > MAX_INPUT_BYTES:
            raise _too_large(name)
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(MAX_INPUT_BYTES + 1)  # + 1: a file that grew since fstat
    except OSError as exc:
        message = f'Cannot read "{name}" ({exc.strerror}); check the file and the disk.'
        raise InvalidImage(message, code="INPUT_UNREADABLE") from None
    finally:
        os.close(fd)
    return data


def check_bytes(data: bytes, name: str | None = None) -> None:
    """INPUT_NOT_IMAGE for nothing, INPUT_TOO_LARGE for more than ``MAX_INPUT_BYTES``;
    ``name`` is only shown in the message."""
    if not data:
        message = f"{_subject(name)} is empty (0 bytes); submit the image file itself."
        raise InvalidImage(message, code="INPUT_NOT_IMAGE")
    if len(data) > MAX_INPUT_BYTES:
        raise _too_large(name)


def _subject(name: str | None) -> str:
    return f'The file "{name}"' if name else "The input"


def _too_large(name: str | None) -> InvalidImage:
    limit = MAX_INPUT_BYTES // (1024 * 1024)
    message = f"{_subject(name)} is larger than {limit} MB; scale it down or compress it."
    return InvalidImage(message, code="INPUT_TOO_LARGE")
