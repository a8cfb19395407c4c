"""Flower sees a busy gpu worker: online, and its running stage listed as active."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from farm.tasks import faults
from tests.helpers import http, running_flower, sample_png, wait_for_step, wait_until

AUTH = "farm:flower-test-pw"
GPU_STAGES = ("encode", "noise", "denoise", "decode")
# Celery workers beat every 2 s; Flower calls one offline after 4 s without a beat.
QUIET_WINDOW_S = 10


@pytest.fixture
def flower(farm_env, tmp_path) -> Iterator[str]:
    """`farm flower` with basic auth; yields its base URL."""
    with running_flower(farm_env, AUTH.split(":", 1)[1], tmp_path / "flower.log") as (base, _):
        yield base


def api(base: str, path: str) -> dict:
    status, body = http(base + path, auth=AUTH)
    assert status == 200, f"{path} answered {status}"
    return json.loads(body)


def active_on(base: str, worker: str, job_id: str) -> list[dict]:
    """The job's gpu tasks the worker itself reports as active (Flower asks it: inspect).
    Flower fetches task lists only when one worker is named."""
    reply = api(base, f"/api/workers?refresh=1&workername={worker}").get(worker, {})
    active = reply.get("active") or []
    return [t for t in active if t["name"] == "farm.gpu.run_stage" and job_id in str(t["args"])]


def started_task(base: str, worker: str, job_id: str) -> dict | None:
    """The job's gpu task Flower knows as STARTED on the worker (from task events)."""
    tasks = api(base, "/api/tasks?taskname=farm.gpu.run_stage").values()
    mine = [t for t in tasks if t["worker"] == worker and job_id in t["args"]]
    return next((t for t in mine if t["state"] == "STARTED"), None)


def online(base: str, worker: str) -> bool:
    """Whether the worker's heartbeat events keep arriving (Flower's online/offline)."""
    return api(base, "/api/workers?status=true").get(worker) is True


def in_gpu_stage(job) -> bool:
    progress = job.progress()
    return progress.status == "running" and progress.stage in GPU_STAGES


def test_busy_gpu_worker_is_online_with_its_task_active(farm, running, flower, meta) -> None:
    gpu = running.of("gpu")[0].name
    wait_until(lambda: online(flower, gpu), 30, "the gpu worker to show online")
    job = farm.submit(sample_png(hue=33), size=64, steps=20, strength=1.0)
    # A long gpu stage whatever the model's speed: denoise stalls after its first step.
    faults.arm(meta, job.id, "denoise", "step", f"sleep:{QUIET_WINDOW_S + 8}")
    try:
        wait_for_step(job, "denoise", 1)
        wait_until(lambda: active_on(flower, gpu, job.id), 30, "the gpu task among active ones")
        wait_until(lambda: started_task(flower, gpu, job.id), 30, "the task-started event")
        # A worker counts as offline once its heartbeats have been silent for two intervals:
        # keep looking until the task has run well past that.
        started = started_task(flower, gpu, job.id)["started"]
        while time.time() < started + QUIET_WINDOW_S:
            assert online(flower, gpu), "the busy gpu worker shows offline"
            time.sleep(0.5)
        assert active_on(flower, gpu, job.id)
        assert in_gpu_stage(job), "the gpu stage ended before Flower was read"
    finally:
        farm.cancel(job.id)
        # the stalled step ends only after its sleep: let it, so that its last model call and
        # outcome are not counted by the next test's metrics
        wait_until(lambda: all(s.status != "running" for s in job.stages()), 60, "the stage")
