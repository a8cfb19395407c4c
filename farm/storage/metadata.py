"""Live metadata in Redis: job progress, cancel flags, stage leases, worker heartbeats.

Nothing here is the source of truth — Postgres is — so all of it can be lost and rebuilt.
Redis errors become ``MetadataError`` (transient) at this boundary, a refused password
``RedisAuthError`` (permanent).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

import redis

from farm import tls
from farm.errors import MetadataError, RedisAuthError
from farm.storage import keys

T = TypeVar("T")
_REDIS_TLS_HINT = "the ssl_ca_certs in FARM_REDIS_URL"

# Renew a lease only while we hold it; re-take it if Redis lost it (restart), refuse if
# another delivery holds it. Returns 1 when the caller holds the lease afterwards.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] or not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _mapped(fn: Callable[..., T]) -> Callable[..., T]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except redis.AuthenticationError as exc:  # a ConnectionError to redis-py: test it first
            raise RedisAuthError(
                f"Redis refused the credentials of FARM_REDIS_URL ({exc}); check its password"
            ) from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if tls.verify_failed(exc):
                raise tls.untrusted("Redis", "FARM_REDIS_URL's host", _REDIS_TLS_HINT) from exc
            raise MetadataError(f"Redis is unreachable ({type(exc).__name__})") from exc

    return wrapper


class Metadata:
    """Typed access to the farm's Redis keys (names and TTLs in ``farm.storage.keys``)."""

    def __init__(self, url: str) -> None:
        self.redis = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)

    # -- job state and progress --------------------------------------------------------------

    @_mapped
    def set_state(self, job_id: str, **fields: str | int | float) -> None:
        fields["updated"] = round(time.time(), 3)
        self.redis.hset(keys.job_state(job_id), mapping=fields)

    @_mapped
    def set_states(self, states: dict[str, dict[str, str | int | float]]) -> None:
        """Many jobs' live state in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        now = round(time.time(), 3)
        for job_id, fields in states.items():
            pipe.hset(keys.job_state(job_id), mapping={**fields, "updated": now})
        pipe.execute()

    @_mapped
    def report_step(self, job_id: str, **fields: str | int | float) -> bool:
        """Record progress and learn whether the job was cancelled, in one round trip
        (a denoise loop calls this every step). Returns True if cancelled."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.job_state(job_id), mapping={**fields, "updated": round(time.time(), 3)})
        pipe.exists(keys.cancel_flag(job_id))
        return bool(pipe.execute()[1])

    @_mapped
    def report_steps(
        self, reports: dict[str, dict[str, str | int | float]], watched: list[str]
    ) -> set[str]:
        """``report_step`` for a whole batch of jobs in one round trip: record each job's
        progress, and return which of the ``watched`` jobs were cancelled."""
        pipe = self.redis.pipeline(transaction=False)
        now = round(time.time(), 3)
        for job_id, fields in reports.items():
            pipe.hset(keys.job_state(job_id), mapping={**fields, "updated": now})
        for job_id in watched:
            pipe.exists(keys.cancel_flag(job_id))
        flags = pipe.execute()[len(reports) :]
        return {job_id for job_id, flag in zip(watched, flags, strict=True) if flag}

    @_mapped
    def state(self, job_id: str) -> dict[str, str]:
        return self.redis.hgetall(keys.job_state(job_id))

    @_mapped
    def finish(self, job_id: str, status: str) -> None:
        """Record a terminal status and let the live keys expire."""
        pipe = self.redis.pipeline()
        pipe.hset(keys.job_state(job_id), mapping={"status": status, "updated": time.time()})
        pipe.expire(keys.job_state(job_id), keys.FINISHED_JOB_TTL)
        pipe.expire(keys.cancel_flag(job_id), keys.FINISHED_JOB_TTL)
        pipe.execute()

    @_mapped
    def forget_jobs(self, job_ids: list[str]) -> None:
        """Drop the live keys of jobs withdrawn before they were sent."""
        if job_ids:
            self.redis.delete(*(keys.job_state(job_id) for job_id in job_ids))

    # -- cancel --------------------------------------------------------------------------------

    @_mapped
    def request_cancel(self, job_id: str) -> None:
        self.redis.set(keys.cancel_flag(job_id), "1", ex=keys.CANCEL_FLAG_TTL)

    @_mapped
    def clear_cancel(self, job_id: str) -> None:
        self.redis.delete(keys.cancel_flag(job_id))

    # -- stage leases --------------------------------------------------------------------------

    @_mapped
    def acquire_lease(self, job_id: str, stage: str, token: str, ttl: float) -> bool:
        key = keys.stage_lease(job_id, stage)
        return bool(self.redis.set(key, token, nx=True, px=int(ttl * 1000)))

    @_mapped
    def renew_lease(self, job_id: str, stage: str, token: str, ttl: float) -> bool:
        key = keys.stage_lease(job_id, stage)
        return bool(self._renew(keys=[key], args=[token, int(ttl * 1000)]))

    @_mapped
    def release_lease(self, job_id: str, stage: str, token: str) -> None:
        self._release(keys=[keys.stage_lease(job_id, stage)], args=[token])

    @_mapped
    def held_leases(self, stages: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (job_id, stage) pairs a running delivery still holds the lease of."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id, stage in stages:
            pipe.exists(keys.stage_lease(job_id, stage))
        return {pair for pair, held in zip(stages, pipe.execute(), strict=True) if held}

    # -- workers -------------------------------------------------------------------------------

    @_mapped
    def beat(self, name: str, info: dict[str, Any]) -> None:
        payload = json.dumps({**info, "name": name, "at": time.time()})
        self.redis.set(keys.worker_heartbeat(name), payload, ex=keys.WORKER_HEARTBEAT_TTL)

    @_mapped
    def forget_worker(self, name: str) -> None:
        self.redis.delete(keys.worker_heartbeat(name))

    @_mapped
    def workers(self) -> list[dict[str, Any]]:
        """Workers that beat recently, with their role and queues."""
        names = sorted(self.redis.scan_iter(keys.WORKER_HEARTBEAT_PATTERN, count=500))
        values = self.redis.mget(names) if names else []
        return [json.loads(v) for v in values if v]

    def live_queues(self) -> set[str]:
        return {q for worker in self.workers() for q in worker.get("queues", [])}

    # -- locks ---------------------------------------------------------------------------------

    @contextmanager
    def try_lock(self, key: str, ttl: float) -> Iterator[bool]:
        """Yield True if this caller got the lock (released after), False if someone has it."""
        token = uuid.uuid4().hex
        got = _mapped(self.redis.set)(key, token, nx=True, px=int(ttl * 1000))
        try:
            yield bool(got)
        finally:
            if got:
                self.release_lock(key, token)

    @_mapped
    def release_lock(self, key: str, token: str) -> None:
        self._release(keys=[key], args=[token])

    @_mapped
    def ping(self) -> bool:
        return bool(self.redis.ping())
