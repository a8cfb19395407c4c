"""RabbitMQ at run time: declaring the farm's queues, and counting what they hold.

RabbitMQ cannot list a queue's messages without taking them, so the farm reads what a passive
``queue.declare`` answers: how many messages wait ready in the queue (those a consumer holds
unacked are not among them) and how many consumers it has.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from amqp.exceptions import AMQPError, NotFound, PreconditionFailed
from kombu import Connection, Queue

from farm.errors import BrokerUnavailable, ConfigError

CONNECT_TIMEOUT = 5  # seconds; a pass of the reconciler or a scrape must not hang on it
_QUEUE_NAMED = re.compile(r"for queue '([^']*)'")


def declare(conn: Connection, queues: Iterable[Queue]) -> None:
    """Declare ``queues`` (exchange, queue, binding) as the farm does. A queue RabbitMQ
    already holds with other arguments raises ConfigError naming it and what to do."""
    for queue in queues:
        try:
            queue(conn.default_channel).declare()
        except PreconditionFailed as exc:
            raise mismatch(exc) from exc


def mismatch(exc: PreconditionFailed) -> ConfigError:
    """The one line for RabbitMQ's PRECONDITION_FAILED on declaring one of our queues."""
    found = _QUEUE_NAMED.search(str(exc))
    name = found.group(1) if found else "?"
    said = str(exc.reply_text or exc).split(" - ", 1)[-1]
    return ConfigError(
        f"RabbitMQ holds queue {name!r} declared otherwise than the farm declares it ({said}); "
        f"delete it once it is empty (rabbitmqctl delete_queue {name} -p VHOST) "
        "or give FARM_BROKER_URL another vhost"
    )


def ready_counts(url: str, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(messages ready, consumers) of each queue, by passive declare; a queue that does not
    exist holds nothing: (0, 0). BrokerUnavailable if RabbitMQ cannot be asked."""
    try:
        with Connection(url, connect_timeout=CONNECT_TIMEOUT) as conn:
            return {name: _counts(conn, name) for name in names}
    except (OSError, AMQPError) as exc:
        raise BrokerUnavailable(f"cannot count RabbitMQ's messages ({exc})") from exc


def _counts(conn: Connection, name: str) -> tuple[int, int]:
    channel = conn.channel()
    try:
        _, ready, consumers = channel.queue_declare(name, passive=True)
    except NotFound:  # RabbitMQ closed the channel on saying so
        return 0, 0
    channel.close()
    return ready, consumers
