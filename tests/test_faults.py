"""Fault injection on the real stack: kill workers, restart servers, duplicate messages.

After every fault the invariants hold (DESIGN invariants; README, Reliability):
  I1 one done record per (job, stage);  I2 every job terminal;  I3 no orphaned objects or
  unfinished uploads;  I4 outputs identical to a fault-free run with the same seed;
  I5 no secret in any log (test at the end of this module).
"""

from __future__ import annotations

import signal
import time
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import select

from farm.db.models import Batch as BatchRow
from farm.db.models import Job
from farm.db.session import session_scope
from farm.local.procs import kill_group
from farm.pipelines import get_pipeline
from farm.storage import keys
from farm.tasks import faults
from farm.tasks.context import Context
from farm.tasks.dispatch import send_stage
from farm.tasks.gc import orphaned_jobs, orphaned_packs, sweep
from tests.brokers import on_each_broker, per_broker
from tests.helpers import same_render, sample_png, wait_for_step, wait_until

PARAMS = {"size": 64, "steps": 12, "strength": 0.8, "prompt": "a windmill", "seed": 21}
SLOW = {**PARAMS, "steps": 80, "strength": 1.0}  # seconds of denoise to kill into
_references: dict[tuple, bytes] = {}

pytestmark = pytest.mark.slow
# the tests marked on_each_broker run on RabbitMQ too, each on that broker's farm
farm, workers, meta = per_broker("farm"), per_broker("workers"), per_broker("meta")


def reference(farm, hue: int, params: dict) -> bytes:
    """The output of a fault-free run of the same input and parameters (cached)."""
    key = (hue, tuple(sorted(params.items())))
    if key not in _references:
        job = farm.submit(sample_png(hue=hue), **params)
        assert job.wait(timeout=240).status == "done"
        _references[key] = job.result()
    return _references[key]


def assert_invariants(farm, jobs, expected: dict[str, bytes]) -> None:
    for job in jobs:
        info = job.wait(timeout=240)
        assert info.status == "done", (info.error_code, info.error_message)  # I2
        runs = job.stages()
        assert [r.name for r in runs] == [s.name for s in get_pipeline(info.pipeline).stages]
        assert all(r.status == "done" for r in runs)  # I1 (UNIQUE(job_id, stage) does the rest)
        assert same_render(job.result(), expected[job.id])  # I4
        wanted = {keys.input_key(job.id)} | {r.artifact_key for r in runs}
        assert set(farm.ctx.store.list(keys.job_prefix(job.id))) == wanted  # I3
    assert list(farm.ctx.store.list_incomplete_uploads(keys.JOBS_PREFIX)) == []


def stage_of(job, name: str):
    return next(s for s in job.stages() if s.name == name)


@on_each_broker
def test_gpu_worker_killed_mid_denoise(farm, running, workers) -> None:
    expected = reference(farm, 90, SLOW)
    job = farm.submit(sample_png(hue=90), **SLOW)
    wait_for_step(job, "denoise", 3, timeout=120)
    workers.kill(workers.of("gpu")[0])
    workers.start("gpu")
    assert_invariants(farm, [job], {job.id: expected})
    assert stage_of(job, "denoise").attempts == 2


@on_each_broker
def test_cpu_worker_killed_mid_postprocess(farm, running, workers, meta) -> None:
    expected = reference(farm, 91, PARAMS)
    job = farm.submit(sample_png(hue=91), **PARAMS)
    faults.arm(meta, job.id, "postprocess", "start", "sleep:30")
    wait_until(lambda: stage_of(job, "postprocess").status == "running", 120, "postprocess")
    workers.kill(workers.of("cpu")[0])
    workers.start("cpu")
    assert_invariants(farm, [job], {job.id: expected})
    assert stage_of(job, "postprocess").attempts == 2


def is_running(job, stage: str, attempt: int) -> bool:
    run = stage_of(job, stage)
    return (run.attempts, run.status) == (attempt, "running")


def freeze(worker, seconds_past_takeover: float, job) -> None:
    """SIGSTOP the whole worker until the reconciler has taken its stage for dead, then
    continue it: a GC pause, a VM migration, a laptop lid."""
    kill_group(worker.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: stage_of(job, "denoise").status == "queued", 60, "the takeover")
        time.sleep(seconds_past_takeover)
    finally:
        kill_group(worker.pid, signal.SIGCONT)


def test_three_stalls_past_the_lease_are_not_a_crash(farm, running, workers, meta) -> None:
    expected = reference(farm, 92, SLOW)
    job = farm.submit(sample_png(hue=92), **SLOW)
    # every step of every delivery: 80 steps outlast any stall below (none may finish early)
    faults.arm(meta, job.id, "denoise", "step", "stall:0.5")
    gpu = workers.of("gpu")[0]
    for stall in range(3):  # the crash limit of the test settings (FARM_MAX_DELIVERIES=3)
        running_attempt = partial(is_running, job, "denoise", stall + 1)
        wait_until(running_attempt, 120, f"denoise attempt {stall + 1}")
        freeze(gpu, 1.0, job)
    wait_until(lambda: stage_of(job, "denoise").attempts == 4, 60, "the fourth delivery")
    faults.disarm(meta, job.id, "denoise", "step")
    assert_invariants(farm, [job], {job.id: expected})
    denoise = stage_of(job, "denoise")
    assert (denoise.attempts, denoise.lost_runs) == (4, 0)  # taken over thrice, never lost


def test_a_postgres_outage_longer_than_the_lease_leaves_a_running_stage_alone(
    farm, running, meta, local_stack, settings
) -> None:
    expected = reference(farm, 93, SLOW)
    job = farm.submit(sample_png(hue=93), **SLOW)
    # 80 steps of 0.5 s: denoise is still running when Postgres is back (were it to finish
    # during the outage, its commit would fail and its retry be a second attempt, rightly)
    faults.arm(meta, job.id, "denoise", "step", "stall:0.5")
    wait_until(lambda: stage_of(job, "denoise").status == "running", 120, "denoise")
    local_stack.stop_service("postgres")
    time.sleep(2 * settings.lease_ttl)  # its Postgres heartbeat is stale; its Redis lease is not
    local_stack.start_service("postgres")
    time.sleep(3 * settings.reconcile_interval)  # passes of the reconciler
    faults.disarm(meta, job.id, "denoise", "step")
    assert_invariants(farm, [job], {job.id: expected})
    denoise = stage_of(job, "denoise")
    assert (denoise.attempts, denoise.lost_runs) == (1, 0)


@on_each_broker
@pytest.mark.parametrize("point", ["upload", "commit"])
def test_worker_killed_around_an_artifact_upload(farm, running, workers, meta, point) -> None:
    expected = reference(farm, 92, PARAMS)
    job = farm.submit(sample_png(hue=92), **PARAMS)
    gpu = workers.of("gpu")[0]
    faults.arm(meta, job.id, "encode", point, "kill")  # SIGKILLs the gpu worker right there
    wait_until(lambda: gpu.process.poll() is not None, 120, "the kill")
    assert stage_of(job, "encode").status == "running"  # nothing committed
    workers.kill(gpu)
    workers.start("gpu")
    assert_invariants(farm, [job], {job.id: expected})
    assert stage_of(job, "encode").attempts == 2


def run_batch_through(farm, fault, hues=(93, 94, 95, 96)) -> None:
    expected = {}
    jobs = []
    for hue in hues:
        out = reference(farm, hue, PARAMS)
        job = farm.submit(sample_png(hue=hue), **PARAMS)
        jobs.append(job)
        expected[job.id] = out
    wait_until(lambda: any(j.status() == "running" for j in jobs), 60, "the batch to start")
    fault()
    assert_invariants(farm, jobs, expected)


def test_redis_restarted_with_persistence(farm, running, local_stack) -> None:
    run_batch_through(farm, lambda: local_stack.restart_service("redis"))


def test_redis_restarted_without_persistence(farm, running, local_stack) -> None:
    def wipe_and_restart() -> None:
        local_stack.stop_service("redis")
        for path in (local_stack.data_dir / "redis").rglob("*"):
            if path.is_file():
                path.unlink()
        local_stack.start_service("redis")

    run_batch_through(farm, wipe_and_restart, hues=(97, 98, 99, 100))


def test_postgres_restarted_mid_batch(farm, running, local_stack) -> None:
    run_batch_through(farm, lambda: local_stack.restart_service("postgres"), (101, 102, 103))


def test_s3_down_for_twenty_seconds(farm, running, local_stack) -> None:
    def outage() -> None:
        local_stack.stop_service("s3")
        time.sleep(20)
        local_stack.start_service("s3")

    run_batch_through(farm, outage, hues=(104, 105))


def test_duplicate_delivery_is_a_no_op(farm, running) -> None:
    expected = reference(farm, 106, SLOW)
    job = farm.submit(sample_png(hue=106), **SLOW)
    stage = get_pipeline("img2img").stage
    send_stage(job.id, stage("preprocess"), 5)  # a second copy of a queued message
    wait_for_step(job, "denoise", 2, timeout=120)
    send_stage(job.id, stage("denoise"), 5)  # and of a running one
    send_stage(job.id, stage("encode"), 5)  # and of a finished one
    assert_invariants(farm, [job], {job.id: expected})
    assert all(s.attempts == 1 for s in job.stages())


def test_transient_fault_in_a_continued_stage_is_retried_as_its_own_message(
    farm, running, meta
) -> None:
    expected = reference(farm, 108, PARAMS)
    job = farm.submit(sample_png(hue=108), **PARAMS)
    # noise runs in the delivery that ran encode; its retry must not spend encode's retries
    faults.arm(meta, job.id, "noise", "start", "transient")
    assert_invariants(farm, [job], {job.id: expected})
    attempts = {s.name: s.attempts for s in job.stages()}
    assert attempts == {**dict.fromkeys(attempts, 1), "noise": 2}


def test_stage_longer_than_visibility_timeout_never_runs_twice_at_once(
    farm, running, workers, meta
) -> None:
    short = workers.replace_all("gpu", count=2, FARM_VISIBILITY_TIMEOUT="10")
    try:
        expected = reference(farm, 107, PARAMS)
        job = farm.submit(sample_png(hue=107), **PARAMS)
        faults.arm(meta, job.id, "denoise", "start", "sleep:25")  # > 2 x the timeout
        assert_invariants(farm, [job], {job.id: expected})
        assert stage_of(job, "denoise").attempts == 1
        logs = "".join(w.log_path.read_text() for w in short)
        # The broker did redeliver the message that started the gpu stages (encode; noise and
        # denoise continued in that worker): encode is done, so the redelivery is a no-op.
        # (A second message for the running stage itself meets its lease: see the test above.)
        assert "'skipped'" in logs
    finally:
        workers.replace_all("gpu")


def test_submitter_killed_half_way_then_run_again(farm, farm_env, settings, tmp_path) -> None:
    import subprocess
    import sys

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(250):
        (folder / f"img{i:03}.png").write_bytes(sample_png(16, hue=i))
    # The submitter stalls after its first chunk, so the kill lands half-way every time (a
    # fast machine recorded all 250 before a poll saw 64 of them).
    script = (
        "import sys, time; from farm import Farm; from farm.folder import FolderSubmission\n"
        "chunk = FolderSubmission._submit_chunk\n"
        "def stall_after(self, files, pool):\n"
        "    chunk(self, files, pool)\n"
        "    time.sleep(600)\n"
        "FolderSubmission._submit_chunk = stall_after\n"
        "Farm.from_env().submit_folder(sys.argv[1], size=16, steps=2, strength=1.0)"
    )
    env = {**farm_env, "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder)], env=env)
    ctx = Context(settings)
    wait_until(lambda: len(jobs_of(farm, folder)) >= 64, 60, "some jobs to be recorded")
    proc.kill()
    proc.wait()
    first = len(jobs_of(farm, folder))
    assert 0 < first < 250
    farm.submit_folder(folder, size=16, steps=2, strength=1.0)
    names = [j.input_name for j in jobs_of(farm, folder)]
    assert len(names) == len(set(names)) == 250  # no duplicates, nothing lost
    farm.cancel(batch=jobs_of(farm, folder)[0].batch_id)
    # The kill may have left uploads with no record: gc removes exactly those.
    orphans = orphaned_jobs(ctx, grace_s=0)
    recorded = {j.id for j in farm.jobs(limit=None)}
    assert not set(orphans) & recorded
    sweep(ctx, grace_s=0)
    assert orphaned_jobs(ctx, grace_s=0) == {}
    assert orphaned_packs(ctx, grace_s=0) == []
    # every input a job points to survived the sweep, packed or not
    referenced = {j.input_key for j in _job_rows(farm) if j.input_key}
    assert referenced and all(ctx.store.exists(key) for key in referenced)


def _job_rows(farm):
    with session_scope(farm.ctx.db_url) as s:
        return s.scalars(select(Job)).all()


def jobs_of(farm, folder: Path):
    """The jobs submitted from ``folder`` (their batch's source), whichever run recorded them."""
    query = (
        select(Job.id)
        .join(BatchRow, BatchRow.id == Job.batch_id)
        .where(BatchRow.source == str(folder.resolve()))
    )
    with session_scope(farm.ctx.db_url) as s:
        ids = set(s.scalars(query))
    return [j for j in farm.jobs(limit=None) if j.id in ids]


def test_no_secret_appears_in_any_log(stack, workers, local_stack) -> None:
    secrets = [
        stack.s3_secret_key,
        stack.redis_url.split(":")[2].split("@")[0],
        stack.database_url.split(":")[2].split("@")[0],
    ]
    logs = list(workers.log_dir.glob("*.log")) + list((local_stack.data_dir / "logs").glob("*"))
    assert logs
    for path in logs:
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {path.name}"
