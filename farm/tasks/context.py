"""What a stage needs from its process: settings, artifact store, Redis metadata, database URL.

Built once per worker process (after fork) and reused by every task it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import redis

from farm.config import Settings
from farm.storage import ArtifactStore, make_store
from farm.storage.cache import CachedStore
from farm.storage.metadata import Metadata


@dataclass
class Context:
    settings: Settings
    cache_artifacts: bool = False  # workers only: a submitter would just hold its inputs

    @cached_property
    def store(self) -> ArtifactStore:
        store = make_store(self.settings)
        # Consecutive stages of a job on one worker re-read what it just wrote.
        return CachedStore(store) if self.cache_artifacts else store

    @cached_property
    def meta(self) -> Metadata:
        return Metadata(self.settings.redis_url.get_secret_value())

    @cached_property
    def broker_redis(self) -> redis.Redis | None:
        """A client on the broker itself, when the broker is Redis (else None)."""
        url = self.settings.broker_url.get_secret_value()
        if not url.startswith(("redis://", "rediss://")):
            return None
        return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)

    @property
    def db_url(self) -> str:
        return self.settings.database_url.get_secret_value()


_current: Context | None = None


def current() -> Context:
    """This process's context, read from the environment the first time."""
    global _current
    if _current is None:
        _current = Context(Settings.from_env(), cache_artifacts=True)
    return _current


def reset() -> None:
    """Forget the context (a forked child must not reuse its parent's sockets)."""
    global _current
    _current = None
