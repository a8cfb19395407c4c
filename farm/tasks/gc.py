"""Garbage collection of artifacts no record points to.

A submitter uploads an input before it commits the job's record (so a record never points to
a missing input); if it dies in between, the upload has no owner. ``sweep`` deletes every
``jobs/<id>/`` prefix whose job id has no record, and every packed-input object
(``batches/<id>/inputs-N``) no job points to, once older than a grace period (a submitter may
be about to commit right now), and aborts stale multipart uploads.
"""

from __future__ import annotations

import logging
import math
import time
from itertools import groupby

from sqlalchemy import select

from farm.db.models import Job
from farm.db.session import session_scope
from farm.errors import ArtifactMissing
from farm.storage import keys
from farm.tasks.context import Context

log = logging.getLogger(__name__)
DEFAULT_GRACE_S = 3600
LOOKUP_BATCH = 1000  # keys per database lookup


def orphaned_jobs(ctx: Context, grace_s: float = DEFAULT_GRACE_S) -> dict[str, list[str]]:
    """Job ids with artifacts but no record, older than ``grace_s``, with their keys."""
    store = ctx.store
    by_job = {
        job_id: list(group)
        for job_id, group in groupby(store.list(keys.JOBS_PREFIX), key=_job_of)
        if job_id
    }
    with session_scope(ctx.db_url) as s:
        known = set(s.scalars(select(Job.id).where(Job.id.in_(list(by_job)))))
    cutoff = time.time() - grace_s
    return {
        job_id: found
        for job_id, found in by_job.items()
        if job_id not in known and max(store.modified(k) for k in found) < cutoff
    }


def orphaned_packs(ctx: Context, grace_s: float = DEFAULT_GRACE_S) -> list[str]:
    """Packed-input objects (folder submits) that no job points to, older than ``grace_s``."""
    found = list(ctx.store.list(keys.BATCHES_PREFIX))
    used: set[str] = set()
    with session_scope(ctx.db_url) as s:
        for start in range(0, len(found), LOOKUP_BATCH):
            batch = found[start : start + LOOKUP_BATCH]
            used.update(s.scalars(select(Job.input_key).where(Job.input_key.in_(batch))))
    cutoff = time.time() - grace_s
    return [key for key in found if key not in used and _modified(ctx, key) < cutoff]


def _modified(ctx: Context, key: str) -> float:
    try:
        return ctx.store.modified(key)
    except ArtifactMissing:  # deleted since it was listed (another sweep): nothing to do
        return math.inf


def sweep(ctx: Context, grace_s: float = DEFAULT_GRACE_S) -> int:
    """Delete orphaned artifacts and stale unfinished uploads; returns objects deleted."""
    deleted = 0
    for job_id in orphaned_jobs(ctx, grace_s):
        deleted += ctx.store.delete_prefix(keys.job_prefix(job_id))
        log.info("removed orphaned artifacts of %s", job_id)
    for key in orphaned_packs(ctx, grace_s):
        ctx.store.delete(key)  # deleting an absent key is not an error
        deleted += 1
        log.info("removed orphaned input pack %s", key)
    for prefix in (keys.JOBS_PREFIX, keys.BATCHES_PREFIX):
        ctx.store.abort_incomplete_uploads(prefix, older_than=grace_s)
    return deleted


def _job_of(key: str) -> str:
    rest = key[len(keys.JOBS_PREFIX) :]
    return rest.split("/", 1)[0] if "/" in rest else ""
