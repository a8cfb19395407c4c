"""The tests' second broker: RabbitMQ, and a farm that uses it beside the session's Redis one.

A test parametrized with ``on_each_broker`` runs once per broker; a module that runs tests
that way takes its ``farm``, ``workers`` and ``meta`` from ``per_broker`` (the ``site`` fixture
in conftest picks the farm). The RabbitMQ farm shares the session's servers but none of their
data: its own vhost, Postgres database, Redis database and bucket, so neither farm's
reconciler ever sees the other's stages.

Queue names are the pipelines' (cpu, gpu, ...), so a session keeps apart from other runs on the
same RabbitMQ by a vhost of its own, made with ``rabbitmqctl``. Where ``rabbitmqctl`` is missing
or refused, it uses the URL's vhost and deletes the farm's queues there before and after: two
such runs at once would share them.
"""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, unquote, urlsplit

import psycopg2
import pytest
from kombu import Connection
from sqlalchemy.engine import make_url

from farm.config import Settings
from farm.db.migrate import upgrade_head
from farm.pipelines import all_queues
from farm.storage.s3 import S3Store

BROKERS = ["redis", "amqp"]
# guest/guest on 127.0.0.1:5672, as the CI machine runs it; FARM_TEST_RABBITMQ_URL elsewhere
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
on_each_broker = pytest.mark.parametrize("broker", BROKERS, indirect=True)


def per_broker(name: str):
    """A fixture ``name`` that is the farm's ``name`` of this test's broker (``site``)."""

    @pytest.fixture(name=name)
    def fixture(site):
        return getattr(site, name)

    return fixture


def absent(url: str) -> str | None:
    """Why the tests cannot use RabbitMQ at ``url``, in one line; None when they can."""
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or 5672), timeout=2).close()
    except OSError as exc:
        return f"RabbitMQ is not reachable at {parts.hostname}:{parts.port or 5672} ({exc})"
    return None


@contextmanager
def vhost_of_its_own(url: str) -> Iterator[str]:
    """A broker URL on a new, empty vhost, deleted afterwards; where ``rabbitmqctl`` cannot
    make one, ``url`` itself, the farm's queues deleted before and after."""
    parts = urlsplit(url)
    name = f"farm-test-{uuid.uuid4().hex[:12]}"
    try:
        _rabbitmqctl("add_vhost", name)
    except (OSError, subprocess.SubprocessError):
        with _farm_queues_deleted(url):
            yield url
        return
    try:
        _rabbitmqctl("set_permissions", "-p", name, unquote(parts.username), ".*", ".*", ".*")
        yield parts._replace(path="/" + quote(name, safe="")).geturl()
    finally:
        _rabbitmqctl("delete_vhost", name)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextmanager
def _farm_queues_deleted(url: str) -> Iterator[None]:
    def delete() -> None:
        with Connection(url) as conn:
            for name in all_queues():
                conn.channel().queue_delete(name)

    delete()
    try:
        yield
    finally:
        delete()


def separate_farm(env: dict[str, str], broker_url: str, name: str) -> dict[str, str]:
    """``env`` with its broker at ``broker_url`` and a database, Redis database and bucket
    of its own, each named after ``name`` (created and migrated here)."""
    database = make_url(env["FARM_DATABASE_URL"])
    with _admin(database) as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    database_url = database.set(database=name).render_as_string(hide_password=False)
    upgrade_head(database_url)
    S3Store.from_settings(settings_of({**env, "FARM_S3_BUCKET": name})).ensure_bucket()
    redis_url = env["FARM_REDIS_URL"].rsplit("/", 1)[0] + "/1"
    return {
        **env,
        "FARM_BROKER_URL": broker_url,
        "FARM_DATABASE_URL": database_url,
        "FARM_REDIS_URL": redis_url,
        "FARM_S3_BUCKET": name,
    }


@contextmanager
def _admin(database) -> Iterator:
    conn = psycopg2.connect(
        host=database.host,
        port=database.port,
        user=database.username,
        password=database.password,
        dbname=database.database,
    )
    conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def settings_of(env: dict[str, str]) -> Settings:
    """The Settings a process started with ``env`` reads."""
    values = {
        k.removeprefix("FARM_").lower(): v
        for k, v in env.items()
        if k.startswith("FARM_") and k != "FARM_FAULT_INJECTION"
    }
    return Settings(**values)
