"""Fault injection for the test suite: off unless the worker runs with FARM_FAULT_INJECTION=1.

A test arms a fault in Redis for one (job, stage, point); the worker consumes it once:
``fail`` raises StageFailed, ``transient`` a retryable StorageError (a service hiccup),
``kill`` SIGKILLs the worker process, ``sleep:N`` stalls. ``stall:N`` stalls every time the
point is reached, by any delivery, until the test disarms it: a stage slowed down for as long
as a test needs it running. ``full`` raises the StorageError of a store whose disk is full
every time, until the test disarms it.

The GPU engine has one point of its own, every tick, armed with ``arm_engine`` until disarmed:
``oom:N`` raises CUDA's out-of-memory error in any tick of more than N jobs, ``stall:S`` slows
every tick by S seconds (farm.engine.core).
"""

from __future__ import annotations

import os
import signal
import time

import redis

from farm.errors import StageFailed, StorageError
from farm.storage.keys import REDIS_PREFIX
from farm.storage.metadata import Metadata

ENABLED = os.environ.get("FARM_FAULT_INJECTION") == "1"
POINTS = ("start", "step", "upload", "commit")
PERSISTENT = ("stall:", "full")  # armed until the test disarms them


def fault_key(job_id: str, stage: str, point: str) -> str:
    return f"{REDIS_PREFIX}fault:{job_id}:{stage}:{point}"


def arm(meta: Metadata, job_id: str, stage: str, point: str, action: str) -> None:
    """Called by tests: the next time the worker reaches ``point`` it performs ``action``."""
    meta.redis.set(fault_key(job_id, stage, point), action, ex=600)


def disarm(meta: Metadata, job_id: str, stage: str, point: str) -> None:
    meta.redis.delete(fault_key(job_id, stage, point))


ENGINE_KEY = f"{REDIS_PREFIX}fault:engine:tick"


def arm_engine(meta: Metadata, action: str) -> None:
    meta.redis.set(ENGINE_KEY, action, ex=600)


def disarm_engine(meta: Metadata) -> None:
    meta.redis.delete(ENGINE_KEY)


def engine_action(meta: Metadata) -> str:
    """What the engine's tick should do ("" for nothing); read only with injection enabled."""
    try:
        return meta.redis.get(ENGINE_KEY) or ""
    except redis.RedisError:
        return ""


def maybe_inject(meta: Metadata, job_id: str, stage: str, point: str) -> None:
    if not ENABLED:
        return
    try:
        key = fault_key(job_id, stage, point)
        action = meta.redis.get(key)
        if action and not action.startswith(PERSISTENT):
            action = meta.redis.getdel(key)  # one-shot; a racing reader may have taken it
    except redis.RedisError:
        return  # a test hook must never be the fault itself
    if action == "fail":
        raise StageFailed(f"injected failure at {stage}/{point}")
    if action == "transient":
        raise StorageError(f"injected transient fault at {stage}/{point}")
    if action == "full":  # a full disk stays full
        raise StorageError(f"injected at {stage}/{point}: the disk is full (no space left)")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action and action.startswith(("sleep:", "stall:")):
        time.sleep(float(action.split(":", 1)[1]))
