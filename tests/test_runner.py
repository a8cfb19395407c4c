"""The stage runner without Celery: the in-process runner (``run_job_inline``) against the real
Postgres, Redis and S3, and what the runner does with records a worker cannot use."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from contextlib import ExitStack
from datetime import timedelta

import pytest
from pydantic import SecretStr
from sqlalchemy import func, select, update

from farm.db import job_records, stage_records
from farm.db.models import Job as JobRow
from farm.db.models import StageRun as RunRow
from farm.db.session import session_scope, transaction
from farm.errors import NotResumable, is_input_error
from farm.pipelines import get_pipeline
from farm.storage import keys
from farm.tasks import faults
from farm.tasks.context import Context
from farm.tasks.dispatch import InlineSender
from farm.tasks.inline import run_job_inline
from farm.tasks.reconcile import close_stopped, requeue_dead
from farm.tasks.runner import LeaseKeeper, StageRun
from tests.helpers import same_render, sample_png, wait_until

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


@pytest.fixture
def no_reconciler(farm):
    """Hold the farm-wide reconciler lock, so the session's workers leave this test's jobs be
    (their reconciler would send a stage recorded queued and never sent to the broker). A
    worker may be in a pass, or have been killed in one by an earlier test, its lock then
    held until its TTL (10 s here) runs out: wait for it."""
    with ExitStack() as stack:

        def taken() -> bool:
            return stack.enter_context(farm.ctx.meta.try_lock(keys.RECONCILE_LOCK, ttl=60))

        wait_until(taken, timeout=30, what="the reconciler lock")
        yield


def test_inline_run_renders_what_the_workers_render(farm, running, tiny_model) -> None:
    reference = farm.submit(sample_png(hue=40), **PARAMS)
    assert reference.wait(timeout=120).status == "done"
    _inline_matches(farm, reference)


def _inline_matches(farm, reference) -> None:
    with farm.ctx.meta.try_lock(keys.RECONCILE_LOCK, ttl=60) as got:
        assert got  # the session's workers' reconciler leaves this job alone meanwhile
        job_id = record_job(farm.ctx, PARAMS)
        ran = run_job_inline(farm.ctx, job_id)
    assert ran == [(stage.name, "done") for stage in get_pipeline("img2img").stages]
    job = farm.get(job_id)
    assert job.status() == "done"
    assert all(s.attempts == 1 and s.worker.startswith("inline@") for s in job.stages())
    assert same_render(job.result(), reference.result())


def test_stored_parameters_that_fail_validation_fail_the_stage_at_once(
    farm, tiny_model, no_reconciler
) -> None:
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


def test_live_progress_is_skipped_when_redis_refuses_the_password(settings, tiny_model) -> None:
    refused = re.sub(r"(://:)[^@]*@", r"\1wrong@", settings.redis_url.get_secret_value())
    ctx = Context(settings.model_copy(update={"redis_url": SecretStr(refused)}))
    job_id = record_job(Context(settings), PARAMS)
    run = StageRun(ctx, job_id, "preprocess", "w")
    assert run._live("set_state", job_id, status="running", stage="preprocess", step=0) is None


def test_the_reconciler_sends_a_dead_workers_stage_again(farm, tiny_model, no_reconciler) -> None:
    job_id = record_job(farm.ctx, PARAMS)
    with transaction(farm.ctx.db_url) as conn:  # a worker took the stage, then died
        stage_records.begin_stage(conn, job_id, "preprocess", "dead@host", max_lost=3)
        long_ago = func.now() - timedelta(hours=1)
        conn.execute(update(RunRow).where(RunRow.job_id == job_id).values(heartbeat_at=long_ago))
    sender = InlineSender()
    assert (job_id, "preprocess") in requeue_dead(farm.ctx, sender)
    assert list(sender.pending) == ["preprocess"]
    run_job_inline(farm.ctx, job_id)
    first = farm.get(job_id).stages()[0]
    assert (first.status, first.attempts, first.lost_runs) == ("done", 2, 1)
    assert farm.get(job_id).status() == "done"


def test_a_dead_workers_stage_of_a_stopped_job_is_closed_so_it_can_resume(
    farm, tiny_model, no_reconciler
) -> None:
    """A branch's worker died while another branch failed the job: nothing would ever record
    that stage, and while it shows running the job could not be resumed."""
    job_id = record_job(farm.ctx, PARAMS)
    with transaction(farm.ctx.db_url) as conn:
        stage_records.begin_stage(conn, job_id, "preprocess", "dead@host", max_lost=3)
        long_ago = func.now() - timedelta(hours=1)
        conn.execute(update(RunRow).where(RunRow.job_id == job_id).values(heartbeat_at=long_ago))
        stage_records.fail_stage(conn, job_id, "encode", None, "STAGE_FAILED", "a branch failed")
    with pytest.raises(NotResumable, match="still stopping"):
        farm.resume(job_id)
    assert (job_id, "preprocess") in close_stopped(farm.ctx)
    first = farm.get(job_id).stages()[0]
    assert (first.name, first.status) == ("preprocess", "cancelled")
    assert farm.get(job_id).info().error_code == "STAGE_FAILED"  # the failure stays the job's
    assert farm.resume(job_id).wait(timeout=120).status == "done"


def test_a_job_whose_pipeline_this_worker_lacks_fails_saying_so_not_as_bad_input(
    farm, no_reconciler
) -> None:
    job_id = job_records.new_id()
    new = job_records.NewJob(pipeline="uninstalled", params={}, job_id=job_id)
    with transaction(farm.ctx.db_url) as conn:  # as a client with the plugin recorded it
        job_records.insert_jobs(conn, get_pipeline("fanout"), [new], failures={})
    run_job_inline(farm.ctx, job_id)
    info = farm.get(job_id).info()
    assert (info.status, info.error_code) == ("failed", "PIPELINE_INVALID")
    assert "has no pipeline 'uninstalled'" in info.error_message
    assert not is_input_error(info.error_code)  # resume_failed retries it once installed


def test_debug_run_reproduces_a_failure_in_the_foreground(farm, farm_env, running, meta) -> None:
    job = farm.submit(sample_png(hue=41), **PARAMS)
    faults.arm(meta, job.id, "postprocess", "start", "fail")
    assert job.wait(timeout=120).error_code == "STAGE_FAILED"
    faults.arm(meta, job.id, "postprocess", "start", "fail")  # it fails again, in the foreground
    env = {k: v for k, v in farm_env.items()}
    done = subprocess.run(
        [sys.executable, "-m", "farm", "debug-run", job.id[:10]],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "postprocess  failed" in done.stdout and "injected failure" in done.stdout
    assert job.stages()[-1].attempts == 2  # the earlier stages were not run again
    assert all(s.attempts == 1 for s in job.stages()[:-1])
