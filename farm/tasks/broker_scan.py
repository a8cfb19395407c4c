"""Which stage messages the broker holds right now.

Used by the reconciler to tell a stage that is merely waiting in a long queue from one whose
message was lost (Redis restarted without persistence, a publish failed, a queue was purged).

- Redis: message by message. kombu keeps a queue as one Redis list per priority step and the
  messages workers hold in an ``unacked`` hash.
- RabbitMQ: queue by queue. It cannot list messages without taking them, so a queue with
  any message ready may hold any of its stages; one with none ready holds none of them but
  those its consumers took unacked, and a stage taken that way starts at once (late acks,
  prefetch 1). So a stage still queued on a queue with no message ready has lost its message
  or sits in a worker not yet started (a retry's countdown); sending it again is harmless.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import redis

from farm.tasks import rabbitmq
from farm.tasks.app import PRIORITY_STEPS
from farm.tasks.context import Context

PRIORITY_SEP = "\x06\x16"  # kombu's separator between a queue name and its priority step
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"  # delivery tag -> when a worker took the message
PAGE = 1000


@dataclass(frozen=True)
class Held:
    """What the broker may still deliver: stages seen in it (Redis), and queues whose
    messages cannot be told apart (RabbitMQ: any stage of such a queue may be in it)."""

    stages: frozenset[tuple[str, str]] = frozenset()
    queues: frozenset[str] = frozenset()

    def holds(self, job_id: str, stage: str, queue: str) -> bool:
        return queue in self.queues or (job_id, stage) in self.stages


def held(ctx: Context, queues: Iterable[str], taken_within: float) -> Held:
    """What the farm's broker holds of ``queues``, whichever broker it is."""
    if ctx.broker_redis is not None:
        return Held(stages=frozenset(held_stages(ctx.broker_redis, queues, taken_within)))
    counts = rabbitmq.ready_counts(ctx.settings.broker_url.get_secret_value(), queues)
    return Held(queues=frozenset(queue for queue, (ready, _) in counts.items() if ready))


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
