"""Artifact storage: the ``ArtifactStore`` interface, its S3 and file system backends.

``make_store(settings)`` returns the backend ``FARM_STORAGE`` names. The tensor and image codecs
live in ``farm.storage.codecs`` and are not imported here, because they pull in torch and the
API, CLI and reconciler processes should not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from farm.errors import ConfigError
from farm.storage.base import ArtifactStore, validate_key, validate_prefix
from farm.storage.filesystem import FilesystemStore
from farm.storage.s3 import IncompleteUpload, S3Store

if TYPE_CHECKING:
    from farm.config import Settings

__all__ = [
    "ArtifactStore",
    "FilesystemStore",
    "IncompleteUpload",
    "S3Store",
    "make_store",
    "validate_key",
    "validate_prefix",
]


def make_store(settings: Settings) -> ArtifactStore:
    """The artifact store the settings describe (``FARM_STORAGE=s3`` or ``fs``)."""
    if settings.storage == "s3":
        return S3Store.from_settings(settings)
    if settings.fs_root is None:
        raise ConfigError("FARM_FS_ROOT is not set; FARM_STORAGE=fs needs a shared directory.")
    return FilesystemStore(settings.fs_root)
