"""What a multi-host test asks the farm, run on the client host (``Cluster.probe``): one
command per call, its answer as JSON on stdout. It uses the public API and the same checks as
the one-host fault tests, through the client's TLS settings.

    workers                       names of the workers beating
    submit COUNT PARAMS HUE       submit COUNT jobs (hues HUE, HUE+1, ...); their ids
    stage JOB STAGE               that stage's record: status, attempts, worker
    report JOB...                 wait for each job; its status, stages, output and extra objects
    gc                            `farm gc` with no grace, then what is still orphaned
    counters                      Postgres commits and Redis commands so far (server-wide)
    round COUNT PARAMS            submit COUNT small jobs (PARAMS: submit's keywords, the
                                  pipeline among them), wait for all; times and counters
"""

from __future__ import annotations

import base64
import json
import sys
import time
from dataclasses import asdict

from sqlalchemy import func, select, text

from farm import Farm
from farm.db.models import TERMINAL, Job
from farm.db.session import session_scope
from farm.storage import keys
from farm.tasks.gc import orphaned_jobs, orphaned_packs, sweep
from tests.helpers import sample_png


def workers(farm: Farm) -> list[str]:
    return [w["name"] for w in farm.workers()]


def submit(farm: Farm, count: str, params: str, hue: str) -> list[str]:
    return [
        farm.submit(sample_png(hue=int(hue) + i), **json.loads(params)).id
        for i in range(int(count))
    ]


def stage(farm: Farm, job_id: str, name: str) -> dict:
    record = next(s for s in farm.get(job_id).stages() if s.name == name)
    return {"status": record.status, "attempts": record.attempts, "worker": record.worker}


def report(farm: Farm, *job_ids: str) -> dict:
    out = {}
    for job_id in job_ids:
        job = farm.get(job_id)
        info = job.wait(timeout=300)
        runs = job.stages()
        wanted = {keys.input_key(job_id)} | {r.artifact_key for r in runs}
        stored = set(farm.ctx.store.list(keys.job_prefix(job_id)))
        out[job_id] = {
            "status": info.status,
            "error": info.error_code,
            "stages": [asdict(r) for r in runs],
            "output": base64.b64encode(job.result()).decode() if info.status == "done" else None,
            "extra_objects": sorted(stored - wanted),
        }
    return out


def gc(farm: Farm) -> dict:
    deleted = sweep(farm.ctx, grace_s=0)
    incomplete = list(farm.ctx.store.list_incomplete_uploads(keys.JOBS_PREFIX))
    return {
        "deleted": deleted,
        "orphaned_jobs": sorted(orphaned_jobs(farm.ctx, grace_s=0)),
        "orphaned_packs": orphaned_packs(farm.ctx, grace_s=0),
        "incomplete_uploads": len(incomplete),
    }


def counters(farm: Farm) -> dict:
    """The farm database's committed and rolled back transactions and the Redis server's
    commands, by command (the broker and the metadata share one server here). Reading them
    costs one transaction and two INFO commands."""
    query = text(
        "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()"
    )
    with session_scope(farm.ctx.db_url) as s:
        commit, rollback = s.execute(query).one()
    client = farm.ctx.meta.redis
    stats = client.info("commandstats")
    total = client.info("stats")["total_commands_processed"]
    commands = {key.removeprefix("cmdstat_"): value["calls"] for key, value in stats.items()}
    return {
        "at": time.time(),
        "pg_commits": commit,
        "pg_rollbacks": rollback,
        "redis_commands": total,
        "redis_by_command": commands,
    }


def round_(farm: Farm, count: str, params: str) -> dict:
    """COUNT jobs submitted at once, waited for by polling Postgres every 0.25 s (one
    transaction a poll, counted in ``polls``); their submit and finish times (unix seconds)."""
    before = counters(farm)
    payload = bytes(range(256)) * 4
    submitted, ids = [], []
    for _ in range(int(count)):
        ids.append(farm.submit(payload, **json.loads(params)).id)
        submitted.append(time.time())
    done = select(func.count()).where(Job.id.in_(ids), Job.status.in_(list(TERMINAL)))
    polls = 0
    while True:
        polls += 1
        with session_scope(farm.ctx.db_url) as s:
            if s.scalar(done) == len(ids):
                break
        time.sleep(0.25)
    after = counters(farm)
    query = select(Job.status, Job.created_at, Job.finished_at).where(Job.id.in_(ids))
    with session_scope(farm.ctx.db_url) as s:
        rows = s.execute(query).all()
    return {
        "submitted": submitted,
        "finished": sorted(row.finished_at.timestamp() for row in rows),
        "statuses": sorted({row.status for row in rows}),
        "polls": polls,
        "before": before,
        "after": after,
    }


COMMANDS = {
    "workers": workers,
    "submit": submit,
    "stage": stage,
    "report": report,
    "gc": gc,
    "counters": counters,
    "round": round_,
}


def main() -> None:
    command, *args = sys.argv[1:]
    answer = COMMANDS[command](Farm.from_env(), *args)
    json.dump(answer, sys.stdout, default=str)


if __name__ == "__main__":
    main()
