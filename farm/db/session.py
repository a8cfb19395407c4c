"""Engines and sessions; database errors become ``DatabaseError`` (or ``DatabaseAuthError``)
here, at the boundary."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from farm import tls
from farm.errors import DatabaseAuthError, DatabaseError, DuplicateJob

# Errors that mean "the database is unreachable or restarting": worth a retry.
_TRANSIENT = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
# What libpq and the server say when they refuse the login, not the network: psycopg2 gives a
# failed connection no SQLSTATE (28P01, 28000), so the words are all there is to go on.
_AUTH_REFUSED = ("authentication failed", "no password supplied", "no pg_hba.conf entry")

_PG_TLS_HINT = "the sslrootcert in FARM_DATABASE_URL"

_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}
_lock = threading.Lock()


def get_engine(url: str) -> Engine:
    """One pooled engine per URL per process; pre-ping survives a Postgres restart."""
    with _lock:
        if url not in _engines:
            _engines[url] = create_engine(
                url,
                pool_pre_ping=True,
                pool_size=5,
                max_overflow=5,
                pool_recycle=1800,
                connect_args={"connect_timeout": 5},
            )
            _factories[url] = sessionmaker(_engines[url], expire_on_commit=False)
        return _engines[url]


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """An ORM transaction: committed on success, rolled back on error."""
    get_engine(url)
    session = _factories[url]()
    try:
        with _unreachable_is_transient():
            yield session
            session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def transaction(url: str) -> Iterator[Connection]:
    """A Core transaction, without the ORM's unit of work: what a stage's hot path uses
    (begin and complete run on every stage, and the ORM's bookkeeping would cost more
    CPU than the statements themselves)."""
    with _unreachable_is_transient(), get_engine(url).begin() as conn:
        yield conn


def check_database(url: str) -> None:
    """Log in and run one statement: ``DatabaseAuthError`` or ``DatabaseError`` if that fails."""
    with transaction(url) as conn:
        conn.execute(text("SELECT 1"))


# The one unique constraint two honest submitters can race on (naming convention in models).
IDEMPOTENCY_CONSTRAINT = "uq_jobs_idempotency_key"


@contextmanager
def _unreachable_is_transient() -> Iterator[None]:
    try:
        yield
    except _TRANSIENT as exc:
        if tls.verify_failed(exc):
            raise tls.untrusted("Postgres", "FARM_DATABASE_URL's host", _PG_TLS_HINT) from exc
        refused = _login_refused(exc)
        if refused:
            raise DatabaseAuthError(
                f"Postgres refused the login of FARM_DATABASE_URL ({refused}); check its user "
                "and password"
            ) from exc
        raise DatabaseError(_unavailable(exc)) from exc
    except sa_exc.IntegrityError as exc:
        diag = getattr(exc.orig, "diag", None)
        if getattr(diag, "constraint_name", None) == IDEMPOTENCY_CONSTRAINT:
            raise DuplicateJob("a job with this idempotency key was recorded meanwhile") from exc
        raise


def _login_refused(exc: sa_exc.DBAPIError) -> str | None:
    """The server's reason when it refused the login ("password authentication failed for user
    ..."), else None."""
    said = str(getattr(exc, "orig", None) or exc)
    if not any(words in said for words in _AUTH_REFUSED):
        return None
    return said.rpartition("FATAL:")[2].strip() or said.strip()


def _unavailable(exc: sa_exc.DBAPIError) -> str:
    """Why Postgres failed for now, in its own words when it answered (a full disk:
    "could not extend file ...: No space left on device"), else that it is unreachable."""
    orig = getattr(exc, "orig", None)
    reason = type(orig or exc).__name__
    said = getattr(getattr(orig, "diag", None), "message_primary", None)
    if said:
        return f"Postgres failed ({reason}): {said}; will retry"
    return f"Postgres is unreachable ({reason}); will retry"


def dispose_engines() -> None:
    """Drop every pooled connection (after a fork, so children never share sockets)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)
