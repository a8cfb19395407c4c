"""The local farm: real Redis, Postgres and S3 servers from PyPI wheels, and its workers.

- ``stack``: ``LocalStack`` starts, reuses and stops the servers (``DATA/stack.json``) and
  writes ``farm.env`` from a ``StackInfo`` (``info``); one class per server (``redis_server``,
  ``postgres_server``, ``s3_server``, with ``pg_wheel``) behind the interface of
  ``server.Server``; ``procs`` holds the port, process and file helpers they share.
- ``workers``: start one ``celery worker`` subprocess of a role (tests, ``farm render``).
- ``supervisor``: the process ``farm up`` leaves running, which keeps the workers alive;
  ``fleet`` is how ``farm up``/``farm down`` start, find and stop it (``DATA/workers.json``).
"""

from farm.local.info import StackInfo
from farm.local.stack import SERVICES, LocalStack, Service

__all__ = ["SERVICES", "LocalStack", "Service", "StackInfo"]
