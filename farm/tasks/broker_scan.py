"""Which stage messages the broker holds right now (Redis broker only).

Used by the reconciler to tell a stage that is merely waiting in a long queue from one whose
message was lost (Redis restarted without persistence, or a publish failed). kombu keeps a
queue as one Redis list per priority step and the messages workers hold in an ``unacked`` hash.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Iterator

import redis

from farm.tasks.app import PRIORITY_STEPS

PRIORITY_SEP = "\x06\x16"  # kombu's separator between a queue name and its priority step
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"  # delivery tag -> when a worker took the message
PAGE = 1000


def queue_keys(queue: str) -> list[str]:
    return [queue] + [f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS if step]


def held_stages(
    client: redis.Redis, queues: Iterable[str], taken_within: float
) -> set[tuple[str, str]]:
    """(job_id, stage) of every stage message waiting in ``queues``, or taken by a worker
    less than ``taken_within`` seconds ago. A message taken earlier whose stage has still not
    started is as good as lost: its worker dropped it (connection lost right after it was
    fetched), and the broker would only restore it after the visibility timeout."""
    held = set()
    for queue in queues:
        for key in queue_keys(queue):
            held.update(filter(None, map(_stage_of, _list_items(client, key))))
    recent = client.zrangebyscore(UNACKED_INDEX, time.time() - taken_within, "+inf")
    for raw in client.hmget(UNACKED, recent) if recent else []:
        if raw is not None:
            held.add(_stage_of(json.loads(raw)[0]))
    held.discard(None)
    return held


def _list_items(client: redis.Redis, key: str) -> Iterator[bytes]:
    start = 0
    while batch := client.lrange(key, start, start + PAGE - 1):
        yield from batch
        start += PAGE


def _stage_of(message: bytes | str | dict) -> tuple[str, str] | None:
    try:
        payload = json.loads(message) if not isinstance(message, dict) else message
        if not payload["headers"].get("task", "").endswith(".run_stage"):
            return None
        args = json.loads(base64.b64decode(payload["body"]))[0]
        return str(args[0]), str(args[1])
    except (ValueError, KeyError, IndexError, TypeError):
        return None  # not one of ours, or not JSON: never resend on its account
