"""Prometheus metrics, scraped over HTTP from real workers and a real `farm metrics` during
real renders, parsed with prometheus-client's own parser."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import free_port, http, sample_png, wait_until

PARAMS = {"size": 64, "steps": 4, "strength": 0.75, "prompt": "metrics"}


def scrape(address: str, auth: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an endpoint: (name, labels) -> value."""
    status, text = http(f"http://{address}/metrics", auth)
    assert status == 200, status
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def endpoints(meta, role: str) -> list[str]:
    return [w["metrics"] for w in meta.workers() if w.get("role") == role and w.get("metrics")]


@pytest.fixture
def auth(settings) -> str:
    return f"{settings.flower_user}:{settings.flower_password.get_secret_value()}"


def test_worker_counts_rise_by_the_jobs_rendered(farm, running, meta, settings, auth) -> None:
    (cpu,), (gpu,) = endpoints(meta, "cpu"), endpoints(meta, "gpu")
    before_cpu, before_gpu = scrape(cpu, auth), scrape(gpu, auth)
    jobs = [farm.submit(sample_png(hue=40 + i), seed=i, **PARAMS) for i in range(3)]
    assert all(job.wait(timeout=180).status == "done" for job in jobs)
    after_cpu, after_gpu = scrape(cpu, auth), scrape(gpu, auth)

    def rise(before: dict, after: dict, name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    done = {"outcome": "done", "pipeline": "img2img"}
    assert rise(before_gpu, after_gpu, "farm_stages_total", stage="denoise", **done) == 3
    assert rise(before_gpu, after_gpu, "farm_stages_total", stage="denoise", outcome="started") == 3
    # outcome done: a stage an earlier test cancelled may end (and be timed) in this window
    assert (
        rise(before_gpu, after_gpu, "farm_stage_duration_seconds_count", stage="denoise", **done)
        == 3
    )
    # preprocess and postprocess ran in the cpu worker's prefork children: counted in their
    # own files, summed by the parent's endpoint (multiprocess mode)
    for stage in ("preprocess", "postprocess"):
        assert rise(before_cpu, after_cpu, "farm_stages_total", stage=stage, **done) == 3
    # every job in a UNet call is one of its denoise steps, as its stage record counts them
    steps = rise(before_gpu, after_gpu, "farm_model_call_jobs_sum", component="unet")
    assert steps == sum(s.model_calls for job in jobs for s in job.stages() if s.name == "denoise")
    assert rise(before_gpu, after_gpu, "farm_model_calls_total", component="unet") >= 3
    assert rise(before_gpu, after_gpu, "farm_model_call_jobs_count", component="unet") >= 3
    # encode, noise, denoise, decode: one checkpoint each, one record commit each
    assert rise(before_gpu, after_gpu, "farm_checkpoint_seconds_count", op="write") == 12
    assert rise(before_gpu, after_gpu, "farm_checkpoint_bytes_total", op="write") > 0
    assert rise(before_gpu, after_gpu, "farm_record_commit_seconds_count", op="complete") == 12
    assert rise(before_cpu, after_cpu, "farm_checkpoint_seconds_count", op="input") == 3
    assert total(after_gpu, "farm_engine_batch_limit") == settings.gpu_batch
    assert total(after_gpu, "farm_engine_busy_seconds_total") > 0


def test_endpoints_refuse_requests_without_the_password(running, meta, settings) -> None:
    for address in endpoints(meta, "cpu") + endpoints(meta, "gpu"):
        assert http(f"http://{address}/metrics")[0] == 401
        assert http(f"http://{address}/metrics", f"{settings.flower_user}:wrong")[0] == 401
        assert http(f"http://{address}/", f"{settings.flower_user}:wrong")[0] == 401


def test_a_lost_delivery_is_counted_by_the_one_after_it(farm, running, workers, meta, auth):
    from farm.tasks import faults

    lost = {"stage": "denoise", "outcome": "lost"}
    # The counts of workers that outlive this test (the cpu worker's reconciler may be the one
    # that finds the stage dead): earlier tests' losses are in them already.
    before = sum(
        total(scrape(a, auth), "farm_stages_total", **lost) for a in endpoints(meta, "cpu")
    )
    job = farm.submit(sample_png(hue=90), seed=90, **PARAMS)
    faults.arm(meta, job.id, "denoise", "start", "sleep:60")
    wait_until(lambda: job.info().current_stage == "denoise", 120, "denoise to start")
    (gpu,) = workers.of("gpu")
    workers.kill(gpu)
    faults.disarm(meta, job.id, "denoise", "start")
    workers.start("gpu")
    assert job.wait(timeout=180).status == "done"
    # counted by whoever found it lost: the reconciler in any worker, or the next delivery
    counted = [scrape(a, auth) for a in endpoints(meta, "cpu") + endpoints(meta, "gpu")]
    assert sum(total(samples, "farm_stages_total", **lost) for samples in counted) - before == 1


@contextmanager
def farm_metrics(farm_env: dict[str, str], log_path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, **farm_env, "FARM_METRICS_PORT": str(port)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "farm", "metrics"], env=env, stdout=log, stderr=log
        )
    address = f"127.0.0.1:{port}"
    try:
        wait_until(lambda: _listens(address), 60, "farm metrics to listen")
        yield address
    finally:
        proc.terminate()
        proc.wait(10)


def _listens(address: str) -> bool:
    try:
        return http(f"http://{address}/metrics")[0] == 401
    except OSError:
        return False


def test_farm_wide_queue_depth_falls_as_the_batch_drains(
    farm, running, workers, farm_env, auth, tmp_path
) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(4):
        (folder / f"in-{i}.png").write_bytes(sample_png(hue=120 + i))
    for worker in workers.of("gpu"):
        workers.kill(worker)  # each job's gpu stages wait in the gpu queue until one starts
    with farm_metrics(farm_env, tmp_path / "metrics.log") as address:
        assert http(f"http://{address}/metrics")[0] == 401
        batch = farm.submit_folder(folder, **PARAMS)

        def gpu_depth() -> float:
            return total(scrape(address, auth), "farm_queue_messages", queue="gpu")

        wait_until(lambda: gpu_depth() == 4, 120, "every job's encode to wait in the gpu queue")
        first = scrape(address, auth)
        assert total(first, "farm_queue_messages", queue="gpu", priority="5") == 4
        assert (
            total(first, "farm_jobs", status="queued") + total(first, "farm_jobs", status="running")
            >= 4
        )
        assert total(first, "farm_batches_in_flight") >= 1
        assert total(first, "farm_workers", role="gpu") == 0
        assert total(first, "farm_source_up") == 3
        workers.start("gpu")
        depths = []

        def drained() -> bool:
            depths.append(gpu_depth())
            return batch.counts().finished

        wait_until(drained, 240, "the batch to drain")
        last = scrape(address, auth)
    assert depths[-1] == 0 and depths == sorted(depths, reverse=True), depths
    assert total(last, "farm_workers", role="gpu") == 1
    assert total(last, "farm_batches_in_flight") == 0
    assert batch.counts().done == 4


def test_a_source_that_is_down_is_left_out_of_the_scrape_not_the_rest(settings) -> None:
    from pydantic import SecretStr

    from farm.metrics.farm_wide import FarmCollector
    from farm.tasks.context import Context

    nowhere = SecretStr(f"redis://:pw@127.0.0.1:{free_port()}/0")
    ctx = Context(settings.model_copy(update={"broker_url": nowhere}))
    families = {family.name: family for family in FarmCollector(ctx).collect()}
    up = {s.labels["source"]: s.value for s in families["farm_source_up"].samples}
    assert up == {"broker": 0, "database": 1, "redis": 1}
    assert "farm_queue_messages" not in families and "farm_jobs" in families


@pytest.mark.parametrize("port", ["65536", "70000"])
def test_a_port_out_of_range_is_one_line(farm_env, port) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "farm", "metrics", "--port", port],
        env={**os.environ, **farm_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error CONFIG_INVALID: ")
    assert "Traceback" not in done.stderr
