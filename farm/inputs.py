"""Finding and reading the images of a folder, safely.

The user's file names are kept as metadata only; nothing under the folder is followed outside
it (a symlink to /etc/passwd is reported, never read).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from farm.errors import FarmError, InvalidImage, InvalidParameter

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_INPUT_BYTES = 50 * 1024 * 1024  # larger files are rejected before upload


@dataclass(frozen=True)
class InputFile:
    """One image file of a folder: its name relative to the folder, and what reading it gave."""

    name: str
    path: Path
    data: bytes | None = None
    error: FarmError | None = None

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.data or self.name.encode()).hexdigest()


def scan_folder(root: str | Path, recursive: bool = False) -> list[InputFile]:
    """Image files under ``root`` (by suffix), sorted by name; hidden files are skipped."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise InvalidParameter(f"{base} is not a folder.")
    base = base.resolve()
    found = [InputFile(_relative(path, base), path) for path in _walk(base, recursive)]
    return sorted(found, key=lambda f: f.name)


def _walk(base: Path, recursive: bool) -> Iterator[Path]:
    entries = base.rglob("*") if recursive else base.iterdir()
    for path in entries:
        rel = path.relative_to(base)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and (path.is_file() or path.is_symlink()):
            yield path


def _relative(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def read_input(file: InputFile, base: Path) -> InputFile:
    """Read the file's bytes, or record why it cannot be used."""
    try:
        return InputFile(file.name, file.path, data=read_image_bytes(file.path, base))
    except FarmError as exc:
        return InputFile(file.name, file.path, error=exc)


def read_image_bytes(path: Path, base: Path | None = None) -> bytes:
    """The file's bytes, after the checks that need no decoding (size, location, emptiness)."""
    if base is not None and not path.resolve().is_relative_to(base.resolve()):
        raise InvalidImage(f"{path.name} points outside the input folder.", code="INPUT_OUTSIDE")
    if not path.is_file():
        raise InvalidImage(f"{path} is not a readable file.", code="INPUT_UNREADABLE")
    if path.stat().st_size > MAX_INPUT_BYTES:
        raise InvalidImage(f"{path.name} is larger than 50 MB.", code="INPUT_TOO_LARGE")
    try:
        data = path.read_bytes()
    except OSError as exc:
        message = f"Cannot read {path.name}: {exc.strerror}"
        raise InvalidImage(message, code="INPUT_UNREADABLE") from None
    check_bytes(data, path.name)
    return data


def check_bytes(data: bytes, name: str | None = None) -> None:
    if not data:
        raise InvalidImage(f"{name or 'The input'} is empty (0 bytes).", code="INPUT_NOT_IMAGE")
    if len(data) > MAX_INPUT_BYTES:
        raise InvalidImage(f"{name or 'The input'} is larger than 50 MB.", code="INPUT_TOO_LARGE")
