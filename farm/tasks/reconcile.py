"""The reconciler: re-enqueue work that would otherwise never finish.

1. Dead workers. A running stage beats every lease_ttl/3 seconds, in Postgres and (its lease)
   in Redis. When its Postgres beats stop for lease_ttl seconds (database clock, so worker
   clock skew does not matter) and its Redis lease has lapsed too, its worker is presumed dead
   and the stage is sent again, without waiting for the broker's visibility timeout. A lease
   still held means a live delivery that cannot reach Postgres for a while: it is left alone.
2. Lost messages. A stage recorded as queued for a while whose message the broker no longer
   holds (Redis restarted without persistence, a publish failed half-way, a RabbitMQ queue
   purged) is sent again. Redis is read message by message; RabbitMQ only queue by queue, so
   there a lost message is sent again once its queue has no message ready
   (farm.tasks.broker_scan). Duplicates are harmless: a stage already running or done
   ignores a second message.

Workers run a pass every reconcile_interval seconds, one at a time across the farm (Redis
lock); ``farm reconcile`` runs one pass by hand.
"""

from __future__ import annotations

import logging

from farm.db import reconcile_queries as queries
from farm.db.session import session_scope, transaction
from farm.errors import MetadataError
from farm.metrics import worker as metrics
from farm.pipelines import all_queues
from farm.storage import keys
from farm.tasks.broker_scan import held
from farm.tasks.context import Context
from farm.tasks.dispatch import BrokerSender, Sender, send_or_leave

log = logging.getLogger(__name__)


def reconcile(ctx: Context, sender: Sender | None = None) -> list[tuple[str, str]]:
    """One pass; returns the (job_id, stage) pairs it re-enqueued."""
    sender = sender or BrokerSender()
    close_stopped(ctx)
    return requeue_dead(ctx, sender) + resend_lost(ctx, sender)


def close_stopped(ctx: Context) -> list[tuple[str, str]]:
    """Running stages of jobs already failed or cancelled whose worker died (a branch's worker
    lost while another branch failed the job): no delivery will ever record them, and while
    one shows running its job cannot be resumed. They end cancelled."""
    ttl = ctx.settings.lease_ttl
    with session_scope(ctx.db_url) as s:
        stale = queries.stale_stages(s, ttl, queries.STOPPED)
    if not stale:
        return []
    alive = _leases_held(ctx, [(job_id, stage) for job_id, stage, _ in stale])
    with session_scope(ctx.db_url) as s:
        closed = queries.close_stages(s, ttl, [r for r in stale if (r[0], r[1]) not in alive])
    for job_id, stage in closed:
        log.warning("%s/%s: its worker died after the job stopped; marked cancelled", job_id, stage)
    return closed


def requeue_dead(ctx: Context, sender: Sender) -> list[tuple[str, str]]:
    ttl = ctx.settings.lease_ttl
    with session_scope(ctx.db_url) as s:
        stale = queries.stale_stages(s, ttl)
    if not stale:
        return []
    alive = _leases_held(ctx, [(job_id, stage) for job_id, stage, _ in stale])
    with session_scope(ctx.db_url) as s:
        dead = queries.expire_stages(s, ttl, [r for r in stale if (r[0], r[1]) not in alive])
    for ref in dead:  # recorded queued now: one the broker cannot take is sent on a later pass
        log.warning("re-enqueueing %s/%s: its worker stopped beating", ref.job_id, ref.stage)
        with metrics.never_failing():
            metrics.RECONCILER_RESENDS.labels("dead_worker").inc()
            metrics.STAGES.labels(ref.pipeline, ref.spec.op, ref.spec.queue, "lost").inc()
        send_or_leave(sender, ref.job_id, [ref.spec], ref.priority)
    return [(ref.job_id, ref.stage) for ref in dead]


def _leases_held(ctx: Context, stages: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Stages whose delivery still renews its Redis lease; none known when Redis is down
    (the Postgres heartbeat alone decides then, as it must when Redis is gone for good)."""
    try:
        return ctx.meta.held_leases(stages)
    except MetadataError as exc:
        log.warning("cannot read stage leases (%s); judging by Postgres heartbeats alone", exc)
        return set()


def resend_lost(ctx: Context, sender: Sender) -> list[tuple[str, str]]:
    grace = 3 * ctx.settings.reconcile_interval
    with session_scope(ctx.db_url) as s:
        waiting = queries.stale_queued_stages(s, grace)
    if not waiting:
        return []
    queues = all_queues() | {ref.spec.queue for ref in waiting}
    broker = held(ctx, queues, taken_within=grace)
    lost = [ref for ref in waiting if not broker.holds(ref.job_id, ref.stage, ref.spec.queue)]
    for ref in lost:
        log.warning("re-sending %s/%s: the broker lost its message", ref.job_id, ref.stage)
        with metrics.never_failing():
            metrics.RECONCILER_RESENDS.labels("lost_message").inc()
        sender.send(ref.job_id, [ref.spec], ref.priority)
    with transaction(ctx.db_url) as conn:
        queries.touch_queued(conn, lost)
    return [(ref.job_id, ref.stage) for ref in lost]


def reconcile_once_across_farm(ctx: Context) -> list[tuple[str, str]]:
    """Run a pass unless another worker is running one right now."""
    ttl = max(10, ctx.settings.reconcile_interval * 2)
    with ctx.meta.try_lock(keys.RECONCILE_LOCK, ttl) as got:
        return reconcile(ctx) if got else []
