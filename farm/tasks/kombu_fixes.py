"""A fix for a kombu 5.7 Redis-transport bug that killed workers when Redis restarted.

When a worker loses its broker connection, Celery's consumer first ``collect()``s the
connection (which closes the transport: ``transport.client = None``) and then ``close()``s it.
If the first close of the default channel stopped half-way (its pending BRPOP read raised on
the dead socket), the second one runs the channel's close again; with a message delivered but
not yet acked, that tries to restore the message, building a Redis client from the closed
transport: ``AttributeError: 'NoneType' object has no attribute 'hostname'`` in
``Channel._connparams``. It is not a connection error, so nothing catches it, and the worker
exits with "Unrecoverable error" right after "Restoring 1 unacknowledged message(s)".

The fix makes that case what it is, a connection error, which kombu's close path already
ignores. The message stays in kombu's ``unacked`` hash; the farm's reconciler sends its stage
again (it counts a message taken long ago and never started as lost), and the broker itself
restores it after the visibility timeout. Applied by the worker process at import.
"""

from __future__ import annotations

import functools

import redis
from kombu.transport import redis as kombu_redis

_original = kombu_redis.Channel._connparams


@functools.wraps(_original)
def _connparams(self, asynchronous: bool = False):
    if self.connection.client is None:  # the transport was closed under this channel
        raise redis.ConnectionError("the broker connection is closed")
    return _original(self, asynchronous=asynchronous)


def apply() -> None:
    """Install the fix (idempotent)."""
    kombu_redis.Channel._connparams = _connparams
