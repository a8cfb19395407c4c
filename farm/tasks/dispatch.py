"""What runs next, and sending it: the one place that decides.

When a stage commits, ``farm.db.stage_records.complete_stage`` works out under the job's row
lock which stages became ready and marks them queued, so a join stage becomes ready for exactly
one committer. This module decides what happens to those stages:

- **continue**: at most one of them, on the worker's own queue, runs straight away in the
  worker that ran the stage before (no broker hop; encode -> noise -> denoise -> decode stay in
  one GPU process). Only one, so branches that could run in parallel go to other workers;
- **send**: the others get a message carrying (job_id, stage) and nothing else;
- **leave to the reconciler**: a message that cannot be sent (the broker is down) stays
  recorded as queued; the reconciler sends it once the broker holds no copy of it.

``Sender`` is how messages leave: ``BrokerSender`` through Celery, ``InlineSender`` into a local
queue for the in-process runner (farm.tasks.inline).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import redis
from amqp.exceptions import AccessRefused, PreconditionFailed
from kombu.exceptions import KombuError, OperationalError

from farm import tls, tracing
from farm.config import mask_url
from farm.db.job_records import get_job, queued_and_ready
from farm.db.models import JobStatus
from farm.db.session import session_scope
from farm.errors import BrokerAuthError, BrokerUnavailable, FarmError, TransientError
from farm.pipelines import StageSpec, all_queues
from farm.tasks import rabbitmq
from farm.tasks.app import app, celery_priority, task_for, transport_of
from farm.tasks.context import Context

log = logging.getLogger(__name__)

# What kombu may raise when the broker is unreachable or refuses a message (a Redis out of
# memory, or whose last save failed): its own error, or the transport's.
_BROKER_DOWN = (OperationalError, redis.ConnectionError, redis.TimeoutError, ConnectionError)
# The transports' word for refused credentials (Redis, RabbitMQ), wherever kombu wraps it.
_AUTH_REFUSED = (redis.AuthenticationError, AccessRefused)
# How long a send or a check rides out a broker blip: about 4 s over 5 retries.
RETRY_POLICY = {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1}


@dataclass(frozen=True)
class Next:
    """What a committed stage leads to."""

    continue_with: StageSpec | None = None  # run now, in this worker
    send: tuple[StageSpec, ...] = ()  # give to the broker


def plan(ready: Sequence[StageSpec], serves: str | None) -> Next:
    """Of the stages that just became ready, continue the first one on ``serves`` (the queue
    of the worker that committed) and send the rest: parallel branches go to other workers,
    even of this queue, and each branch keeps continuing in the worker that runs it."""
    here = next((spec for spec in ready if spec.queue == serves), None)
    return Next(here, tuple(spec for spec in ready if spec != here))


class Sender(Protocol):
    def send(
        self,
        job_id: str,
        stages: Iterable[StageSpec],
        priority: int,
        countdown: float | None = None,
    ) -> None:
        """Hand these stages of the job to whatever runs them next (after ``countdown`` s)."""


class BrokerSender:
    """Messages through the Celery broker."""

    def send(
        self,
        job_id: str,
        stages: Iterable[StageSpec],
        priority: int,
        countdown: float | None = None,
    ) -> None:
        for spec in stages:
            send_stage(job_id, spec, priority, countdown=countdown)


@dataclass
class InlineSender:
    """Stages to run in this process, in the order they became ready."""

    pending: deque[str] = field(default_factory=deque)

    def send(
        self,
        job_id: str,
        stages: Iterable[StageSpec],
        priority: int,
        countdown: float | None = None,
    ) -> None:
        # in order; a backoff means nothing in one process
        self.pending.extend(spec.name for spec in stages)


def send_stage(
    job_id: str,
    spec: StageSpec,
    priority: int,
    producer=None,
    countdown: float | None = None,
) -> None:
    """A message for one stage, on the queue its job's DAG names. ``producer``: reuse one
    broker connection across many sends (a folder's chunk). ``countdown``: seconds before a
    worker may run it (a retry's backoff). The current trace context rides in the headers."""
    try:
        app.send_task(
            task_for(spec.queue),
            args=(job_id, spec.name),
            headers=tracing.carrier() or None,
            queue=spec.queue,
            priority=celery_priority(priority, transport_of(app.conf.broker_url)),
            producer=producer,
            countdown=countdown,
            retry=True,
            retry_policy=RETRY_POLICY,
        )
    except PreconditionFailed as exc:
        raise rabbitmq.mismatch(exc) from exc
    except _BROKER_DOWN as exc:
        raise _broker_error(exc) from exc


def check_broker() -> None:
    """Connect to the broker (riding out a blip, not a refused password), so that a submit
    fails before it records anything; on RabbitMQ, declare the farm's queues too (a queue
    the server holds declared otherwise is a ConfigError naming it)."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(errback=_stop_if_refused, **RETRY_POLICY)
            if transport_of(app.conf.broker_url) == "amqp":
                rabbitmq.declare(conn, [app.amqp.queues[name] for name in sorted(all_queues())])
    except _BROKER_DOWN as exc:
        raise _broker_error(exc) from exc


def _stop_if_refused(exc: Exception, _interval: float) -> None:
    if _refused(exc) or tls.verify_failed(exc):
        raise exc


def _broker_error(exc: BaseException) -> FarmError:
    """The farm's error for a failed connect or send: an untrusted certificate, refused
    credentials, else unavailable."""
    if tls.verify_failed(exc):
        return tls.untrusted("the broker", "FARM_BROKER_URL's host", "its ssl_ca_certs")
    if _refused(exc):
        return BrokerAuthError(
            "the broker refused the credentials of FARM_BROKER_URL; check its user and password"
        )
    return BrokerUnavailable(f"the broker is unreachable or refused the message ({_reason(exc)})")


def _refused(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an error it was raised from is a refused login."""
    while exc is not None:
        if isinstance(exc, _AUTH_REFUSED):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _reason(exc: BaseException) -> str:
    said = mask_url(str(exc))  # the transport's words ("Connection refused", "OOM ..."), no secret
    return f"{type(exc).__name__}: {said}" if said else type(exc).__name__


def send_many(jobs: list[tuple[str, list[StageSpec]]], priority: int) -> None:
    """Many jobs' first messages over one connection, in one pipelined round trip. Should
    the batch fail (delivery of its messages is then uncertain), they are sent again one by
    one with the usual retries: a message that arrives twice is a no-op by design."""
    try:
        with app.producer_or_acquire() as producer, producer.batch():
            for job_id, stages in jobs:
                for spec in stages:
                    send_stage(job_id, spec, priority, producer)
    except (KombuError, BrokerUnavailable, *_BROKER_DOWN) as exc:
        log.warning("batched send of %d jobs failed (%s); sending one by one", len(jobs), exc)
        for job_id, stages in jobs:
            BrokerSender().send(job_id, stages, priority)


def resend_ready(ctx: Context, job_id: str, sender: Sender) -> list[StageSpec]:
    """Send again the stages of an active job recorded as queued whose inputs are done;
    returns them."""
    with session_scope(ctx.db_url) as s:
        job = get_job(s, job_id)
        if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            return []
        ready, priority = queued_and_ready(job), job.priority
    sender.send(job_id, ready, priority)
    return ready


def send_or_leave(
    sender: Sender, job_id: str, stages: Iterable[StageSpec], priority: int, **kw
) -> bool:
    """Send, or leave the stages to the reconciler if the broker is down or refuses this
    process's login (they stay recorded as queued; nothing after a commit may fail its stage).
    True if sent."""
    stages = list(stages)
    try:
        sender.send(job_id, stages, priority, **kw)
    except (TransientError, BrokerAuthError) as exc:
        names = [spec.name for spec in stages]
        log.warning("%s %s not sent (%s); the reconciler will send them", job_id, names, exc)
        return False
    return True
