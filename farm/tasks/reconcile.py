"""The reconciler: re-enqueue stages whose worker died, without waiting for the broker.

A running stage beats every lease_ttl/3 seconds. When its beats stop for lease_ttl seconds
(database clock, so worker clock skew does not matter), its worker is presumed dead and the
stage is sent again. Workers run this every reconcile_interval seconds, one at a time across
the farm (Redis lock); ``farm reconcile`` runs one pass by hand.
"""

from __future__ import annotations

import logging

from farm.db import records
from farm.db.session import session_scope
from farm.storage import keys
from farm.tasks.context import Context
from farm.tasks.dispatch import send_stage

log = logging.getLogger(__name__)


def reconcile(ctx: Context) -> list[tuple[str, str]]:
    """One pass; returns the (job_id, stage) pairs it re-enqueued."""
    with session_scope(ctx.db_url) as s:
        stale = [
            (job.id, job.pipeline, stage, job.priority)
            for job, stage in records.expire_stale_stages(s, ctx.settings.lease_ttl)
        ]
    for job_id, pipeline, stage, priority in stale:
        log.warning("re-enqueueing %s/%s: its worker stopped beating", job_id, stage)
        send_stage(job_id, pipeline, stage, priority)
    return [(job_id, stage) for job_id, _, stage, _ in stale]


def reconcile_once_across_farm(ctx: Context) -> list[tuple[str, str]]:
    """Run a pass unless another worker is running one right now."""
    ttl = max(10, ctx.settings.reconcile_interval * 2)
    with ctx.meta.try_lock(keys.RECONCILE_LOCK, ttl) as got:
        return reconcile(ctx) if got else []
