"""The kombu Redis-transport bug that killed a worker when Redis restarted, on the real Redis.

A channel closed a second time after its transport was closed, with a message delivered and
not acked, raised AttributeError (not a connection error) out of the consumer's reconnect path:
"Unrecoverable error: AttributeError('NoneType' object has no attribute 'hostname')".
"""

from __future__ import annotations

import kombu
import pytest
from kombu.transport import redis as kombu_redis

from farm.tasks import kombu_fixes

QUEUE = kombu.Queue(
    "kombu-fix-test", kombu.Exchange("kombu-fix-test"), routing_key="kombu-fix-test"
)


def close_with_an_unacked_message(url: str) -> None:
    """What Celery 5.7's consumer does on a lost connection: collect() closes the transport
    after a first close of the channel that stopped half-way, then close() runs it again."""
    connection = kombu.Connection(url)
    channel = connection.default_channel
    QUEUE(channel).declare()
    kombu.Producer(channel).publish({"n": 1}, exchange=QUEUE.exchange, routing_key=QUEUE.name)
    assert QUEUE(channel).get(no_ack=False) is not None  # delivered, not acked
    connection._do_close_transport()
    connection._do_close_self()


def test_unpatched_kombu_raises_attribute_error(stack, monkeypatch) -> None:
    # If this stops failing, kombu fixed it upstream: drop farm/tasks/kombu_fixes.py.
    monkeypatch.setattr(kombu_redis.Channel, "_connparams", kombu_fixes._original)
    with pytest.raises(AttributeError, match="hostname"):
        close_with_an_unacked_message(stack.redis_url)


def test_with_the_fix_the_close_is_a_connection_error_kombu_ignores(stack, monkeypatch) -> None:
    monkeypatch.setattr(kombu_redis.Channel, "_connparams", kombu_fixes._connparams)
    close_with_an_unacked_message(stack.redis_url)  # no exception


def test_the_worker_process_applies_the_fix() -> None:
    import farm.tasks.worker  # noqa: F401 -- what every worker process imports

    assert kombu_redis.Channel._connparams is kombu_fixes._connparams
