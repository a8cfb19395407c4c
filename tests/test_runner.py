"""The stage runner without Celery: the in-process runner (``run_job_inline``) against the real
Postgres, Redis and S3, and what the runner does with records a worker cannot use."""

from __future__ import annotations

import time

from pydantic import SecretStr
from sqlalchemy import select, update

from farm.db import job_records, stage_records
from farm.db.models import Job as JobRow
from farm.db.models import StageRun as RunRow
from farm.db.session import session_scope, transaction
from farm.pipelines import get_pipeline
from farm.storage import keys
from farm.tasks.context import Context
from farm.tasks.inline import run_job_inline
from farm.tasks.runner import LeaseKeeper
from tests.helpers import sample_png, wait_until

PARAMS = {"size": 64, "steps": 6, "strength": 0.8, "prompt": "a lighthouse", "seed": 3}


def record_job(ctx: Context, params: dict, image: bytes | None = None) -> str:
    """Upload the input and record the job, as submit does, but send no message."""
    from farm.params import RenderParams

    job_id = job_records.new_id()
    ctx.store.put(keys.input_key(job_id), image or sample_png(hue=40))
    new = job_records.NewJob(
        pipeline="img2img",
        params=RenderParams.from_dict(params).to_dict(),
        input_key=keys.input_key(job_id),
        job_id=job_id,
    )
    with transaction(ctx.db_url) as conn:
        job_records.insert_jobs(conn, get_pipeline("img2img"), [new], failures={})
    return job_id


def test_inline_run_renders_what_the_workers_render(farm, running, tiny_model) -> None:
    reference = farm.submit(sample_png(hue=40), **PARAMS)
    assert reference.wait(timeout=120).status == "done"
    job_id = record_job(farm.ctx, PARAMS)
    ran = run_job_inline(farm.ctx, job_id)
    assert ran == [(stage.name, "done") for stage in get_pipeline("img2img").stages]
    job = farm.get(job_id)
    assert job.status() == "done"
    assert all(s.attempts == 1 and s.worker.startswith("inline@") for s in job.stages())
    assert job.result() == reference.result()


def test_stored_parameters_that_fail_validation_fail_the_stage_at_once(farm, tiny_model) -> None:
    job_id = record_job(farm.ctx, PARAMS)
    with session_scope(farm.ctx.db_url) as s:  # as if written by another version
        s.execute(update(JobRow).where(JobRow.id == job_id).values(params={"steps": "many"}))
    assert run_job_inline(farm.ctx, job_id) == [("preprocess", "failed")]
    info = farm.get(job_id).info()
    assert (info.status, info.error_code) == ("failed", "INVALID_PARAM")
    assert farm.get(job_id).stages()[0].status == "failed"  # not left running


def test_a_stage_finished_after_its_job_was_cancelled_is_not_a_lost_lease(farm) -> None:
    job_id = record_job(farm.ctx, PARAMS)
    with transaction(farm.ctx.db_url) as conn:
        begin = stage_records.begin_stage(conn, job_id, "preprocess", "w", max_lost=3)
        job_records.mark_cancelled(conn, job_id)
    checkpoint = stage_records.Checkpoint("k", 1, "0" * 64, 0.1)
    with transaction(farm.ctx.db_url) as conn:
        done = stage_records.complete_stage(conn, job_id, "preprocess", begin.attempt, checkpoint)
    assert done.outcome == stage_records.Outcome.JOB_STOPPED


def test_postgres_heartbeat_goes_on_while_redis_is_unreachable(settings, tiny_model) -> None:
    unreachable = settings.model_copy(
        update={"redis_url": SecretStr("redis://127.0.0.1:1/0"), "lease_ttl": 2}
    )
    ctx = Context(unreachable)
    job_id = record_job(Context(settings), PARAMS)
    with transaction(ctx.db_url) as conn:
        begin = stage_records.begin_stage(conn, job_id, "preprocess", "w", max_lost=3)
    keeper = LeaseKeeper(ctx, job_id, "preprocess", "token", begin.attempt)

    def heartbeat_at():
        with session_scope(ctx.db_url) as s:
            query = select(RunRow.heartbeat_at).where(RunRow.job_id == job_id)
            return s.scalars(query.where(RunRow.stage == "preprocess")).one()

    first = heartbeat_at()
    time.sleep(0.05)
    keeper.start()
    try:
        wait_until(lambda: heartbeat_at() > first, 10, "a Postgres heartbeat")
    finally:
        keeper.stop()
    assert not keeper.lost  # Redis being down is not another delivery taking over
