"""What each URL setting must look like, checked when the settings are read.

A malformed URL fails at once as one ``CONFIG_INVALID`` line naming its variable, instead of a
library's traceback at first use (SQLAlchemy's ``ArgumentError``, a missing MySQL driver,
redis-py's and botocore's ``ValueError``). Each check raises ``ValueError`` with a message that
never repeats the URL, which may hold a password.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from redis.connection import parse_url
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

DATABASE_EXAMPLE = "postgresql+psycopg2://USER:PASSWORD@HOST:5432/DATABASE"
REDIS_EXAMPLE = "redis://:PASSWORD@HOST:6379/0 (rediss:// for TLS)"
# Kombu transports the farm is built for: Redis and RabbitMQ (farm.tasks.app sets up each).
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


def check_database_url(url: str) -> None:
    """A PostgreSQL URL whose driver is installed and synchronous."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ValueError(f"not a database URL; give {DATABASE_EXAMPLE}") from None
    backend = parsed.get_backend_name()
    if backend != "postgresql":
        raise ValueError(f"the farm needs PostgreSQL, not {backend}; give {DATABASE_EXAMPLE}")
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise ValueError(f"no such driver {parsed.drivername!r}; give {DATABASE_EXAMPLE}") from None
    try:
        dialect.import_dbapi()
    except ImportError:  # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3
        raise ValueError(
            f"{parsed.drivername}:// needs the {dialect.driver} package, which is not "
            f"installed; install it or give {DATABASE_EXAMPLE}"
        ) from None
    if dialect.is_async:
        raise ValueError(f"{parsed.drivername!r} is an asyncio driver; give {DATABASE_EXAMPLE}")


def check_redis_url(url: str) -> None:
    """A URL redis-py can connect with (redis://, rediss:// or unix://)."""
    try:
        parse_url(url)
    except ValueError as exc:
        raise ValueError(f"not a Redis URL ({exc}); give {REDIS_EXAMPLE}") from None


def check_broker_url(url: str) -> None:
    """A Redis URL, or an AMQP one for RabbitMQ."""
    scheme = urlsplit(url).scheme  # letters, digits and "+-." only: safe to repeat
    if scheme in AMQP_SCHEMES:
        return
    if scheme not in ("redis", "rediss"):
        got = f"not {scheme}://" if scheme else "and this URL has no scheme"
        raise ValueError(
            f"the broker must be Redis or RabbitMQ, {got}; give {REDIS_EXAMPLE} "
            "or amqp://USER:PASSWORD@HOST:5672//"
        )
    check_redis_url(url)


def check_s3_endpoint(url: str) -> None:
    """An http:// or https:// address with a host (and a numeric port, if any)."""
    if not _is_http_url(url):
        raise ValueError(
            "not an http:// or https:// URL; give the S3 API's address, "
            "e.g. https://s3.example.com or http://127.0.0.1:8333"
        )


def check_otlp_endpoint(url: str) -> None:
    """An OTLP/HTTP collector: http:// or https:// with a host."""
    if not _is_http_url(url):
        raise ValueError(
            "not an http:// or https:// URL; give the collector's OTLP/HTTP address, "
            "e.g. http://collector:4318"
        )


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 -- reading it checks it
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)
