"""Every Redis key and object-store key the farm uses, and their lifetimes.

Object keys are generated from job ids (UUIDs) and stage names only, never from user-supplied
file names, so a name like ``../../x.png`` can never steer where an artifact is written.
"""

from __future__ import annotations

# -- object store ------------------------------------------------------------------------------

JOBS_PREFIX = "jobs/"


def job_prefix(job_id: str) -> str:
    """Everything a job ever wrote lives under this prefix."""
    return f"{JOBS_PREFIX}{job_id}/"


def input_key(job_id: str) -> str:
    """The user's input image, exactly as submitted."""
    return f"{job_prefix(job_id)}input"


BATCHES_PREFIX = "batches/"


def input_pack_key(batch_id: str, pack: int) -> str:
    """Small inputs of a folder submit, packed into one object per chunk: one upload for many
    files. Each job records where its bytes are (``jobs.input_offset``, ``input_size``)."""
    return f"{BATCHES_PREFIX}{batch_id}/inputs-{pack:06d}"


def artifact_key(job_id: str, stage: str, ext: str = "safetensors.zst") -> str:
    """The checkpoint a stage writes; deterministic so a redelivered stage overwrites itself."""
    return f"{job_prefix(job_id)}{stage}.{ext}"


# -- Redis ---------------------------------------------------------------------------------------

REDIS_PREFIX = "farm:"

# Live state of a job (status, stage, step, steps); rebuilt from Postgres if lost.
JOB_STATE = REDIS_PREFIX + "job:{job_id}"
# A finished job's live state is kept this long for `farm status`, then expires (1 day).
FINISHED_JOB_TTL = 24 * 3600
# Set by cancel(); the running stage polls it between denoise steps (7 days, beyond any job).
CANCEL_FLAG = REDIS_PREFIX + "cancel:{job_id}"
CANCEL_FLAG_TTL = 7 * 24 * 3600
# Held by the one delivery allowed to run (job, stage); value is the holder's token.
STAGE_LEASE = REDIS_PREFIX + "lease:{job_id}:{stage}"
# A worker's heartbeat: JSON with role, queues, pid; expires when it stops beating.
WORKER_HEARTBEAT = REDIS_PREFIX + "worker:{name}"
WORKER_HEARTBEAT_PATTERN = REDIS_PREFIX + "worker:*"
# How often a worker beats, and how long its heartbeat outlives silence (3 missed beats).
WORKER_BEAT_INTERVAL = 5
WORKER_HEARTBEAT_TTL = 3 * WORKER_BEAT_INTERVAL
# Only one reconciler pass runs at a time across all workers.
RECONCILE_LOCK = REDIS_PREFIX + "reconcile-lock"


def job_state(job_id: str) -> str:
    return JOB_STATE.format(job_id=job_id)


def cancel_flag(job_id: str) -> str:
    return CANCEL_FLAG.format(job_id=job_id)


def stage_lease(job_id: str, stage: str) -> str:
    return STAGE_LEASE.format(job_id=job_id, stage=stage)


def worker_heartbeat(name: str) -> str:
    return WORKER_HEARTBEAT.format(name=name)
