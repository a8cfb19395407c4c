"""What a user following the farm sees of a fault: `farm render` rides out a server killed
under it and finishes every output; a stage waiting on a full store says so.

Real servers, real workers, the real CLI in a subprocess (README, Reliability)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from farm.db.models import Batch as BatchRow
from farm.db.models import Job as JobRow
from farm.db.session import session_scope
from farm.tasks import faults
from tests.helpers import sample_png, wait_until

pytestmark = pytest.mark.slow

SERVICE_NAMES = {"postgres": "Postgres", "redis": "Redis", "s3": "storage"}
RENDER = ["--size", "64", "--steps", "12", "--strength", "0.8"]


def folder_of(tmp_path: Path, count: int, first_hue: int) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(count):
        (folder / f"img{i}.png").write_bytes(sample_png(64, hue=first_hue + i))
    return folder


@contextmanager
def rendering(farm_env: dict[str, str], folder: Path, out: Path, *options: str):
    """`farm render` as a user runs it, following the batch; yields the process and the file
    its output goes to (readable after a timeout too)."""
    log = out.with_suffix(".log")
    with open(log, "w") as sink:
        render = subprocess.Popen(
            [sys.executable, "-m", "farm", "render", str(folder), "-o", str(out), *options],
            env={**os.environ, **farm_env},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            yield render, log
        finally:
            render.kill()
            render.wait()


def denoising(farm) -> bool:
    return any(job.current_stage == "denoise" for job in farm.jobs(status="running"))


def finish(render: subprocess.Popen, log: Path) -> str:
    try:
        render.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"farm render did not finish:\n{log.read_text()}")
    return log.read_text()


@pytest.mark.timeout(600)  # eight renders on a shared machine, an outage, the recovery
@pytest.mark.parametrize("service", ["postgres", "redis", "s3"])
def test_render_rides_out_a_server_killed_under_it(
    service, farm, meta, farm_env, running, local_stack, tmp_path
) -> None:
    hue = {"postgres": 150, "redis": 160, "s3": 170}[service]  # no input rendered before
    folder, out = folder_of(tmp_path, 8, hue), tmp_path / "out"
    # The gpu worker batches the eight, so they finish together: the server dies while they
    # denoise, each tick slowed so that the denoise outlasts the outage.
    faults.arm_engine(meta, "stall:1")
    try:
        with rendering(farm_env, folder, out, *RENDER, "--seed", str(hue)) as (render, log):
            wait_until(lambda: denoising(farm), 120, "the batch to denoise")
            local_stack.kill_service(service)
            time.sleep(8)
            local_stack.start_service(service)
            faults.disarm_engine(meta)
            output = finish(render, log)
    finally:
        faults.disarm_engine(meta)
    assert render.returncode == 0, output
    assert sorted(p.name for p in out.iterdir()) == [f"img{i}.png" for i in range(8)]
    name = SERVICE_NAMES[service]
    # it said what it waited on: the service it could not reach itself, or the one the
    # workers' stages waited on
    assert re.search(rf"waiting (for|on) {name}", output), output
    assert "8 inputs: 8 done" in output


def test_wait_and_result_ride_out_postgres_killed_under_them(
    farm, running, local_stack, tmp_path, caplog
) -> None:
    batch = farm.submit_folder(folder_of(tmp_path, 2, 190), size=64, steps=12, seed=190)
    job = farm.get(batch.jobs()[0].id)
    local_stack.kill_service("postgres")
    restart = threading.Timer(8, local_stack.start_service, args=("postgres",))
    restart.start()
    try:
        with caplog.at_level(logging.WARNING, logger="farm.waiting"):
            assert batch.wait(timeout=240).done == 2
    finally:
        restart.join()
    assert job.wait(timeout=60).status == "done"
    assert job.result().startswith(b"\x89PNG")
    assert "waiting for Postgres" in caplog.text
    assert "Postgres is back after" in caplog.text


def job_of(farm, folder: Path) -> JobRow | None:
    """The job submitted from ``folder`` (its batch's source), once recorded."""
    query = (
        select(JobRow)
        .join(BatchRow, BatchRow.id == JobRow.batch_id)
        .where(BatchRow.source == str(folder.resolve()))
    )
    with session_scope(farm.ctx.db_url) as s:
        return s.scalars(query).first()


@pytest.mark.timeout(600)  # eighty denoise steps on a shared machine, a few retries
def test_a_stage_waiting_on_a_full_store_says_so(farm, farm_env, running, meta, tmp_path) -> None:
    folder, out = folder_of(tmp_path, 1, 180), tmp_path / "out"
    slow = [*RENDER, "--steps", "80", "--strength", "1.0", "--seed", "180"]  # time to arm
    with rendering(farm_env, folder, out, *slow) as (render, log):
        wait_until(lambda: job_of(farm, folder) is not None, 120, "the job to be recorded")
        job = farm.get(job_of(farm, folder).id)
        faults.arm(meta, job.id, "postprocess", "upload", "full")
        wait_until(lambda: job.info().waiting_on == "storage", 240, "the stage to wait")
        status = subprocess.run(
            [sys.executable, "-m", "farm", "status", job.id],
            env={**os.environ, **farm_env, "COLUMNS": "200"},  # the stage table on one line
            capture_output=True,
            text=True,
            timeout=120,
        )
        faults.disarm(meta, job.id, "postprocess", "upload")
        output = finish(render, log)
    assert "waiting on storage: injected at postprocess/upload: the disk is full" in status.stdout
    assert re.search(r"postprocess .*queued, waiting on storage", status.stdout), status.stdout
    assert "img0.png: waiting on storage: injected at postprocess/upload" in output
    assert render.returncode == 0, output
    assert (out / "img0.png").is_file()
    info = job.info()
    assert (info.status, info.waiting_on, info.waiting_reason) == ("done", None, None)
