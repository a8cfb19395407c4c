"""The `farm` command as a user runs it: a subprocess, against the real stack and workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import sample_png

FARM = [sys.executable, "-m", "farm"]
FAST = ["--size", "64", "--steps", "6", "--seed", "2", "--prompt", "a quiet harbour"]


def run_farm(args: list[str], env: dict[str, str], timeout: float = 240):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    full_env.update(env, COLUMNS="200", NO_COLOR="1")
    return subprocess.run(
        [*FARM, *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "beach.png").write_bytes(sample_png(64, hue=10))
    (root / "sub" / "forest.png").write_bytes(sample_png(64, hue=80))
    (root / "broken.png").write_bytes(sample_png(64)[:120])  # truncated
    (root / "letter.jpg").write_text("Dear farm, this is not a JPEG.")
    return root


def test_render_folder_writes_outputs_summarises_failures_and_skips_on_rerun(
    farm_env, running, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = run_farm(["render", str(folder), "-o", str(out), "--recursive", *FAST], farm_env)
    assert first.returncode == 1, first.stdout + first.stderr
    assert Image.open(out / "beach.png").size == (64, 64)
    assert (out / "sub" / "forest.png").is_file()
    assert not (out / "broken.png").exists()
    assert "broken.png" in first.stdout and "INPUT_CORRUPT" in first.stdout
    assert "letter.jpg" in first.stdout and "INPUT_NOT_IMAGE" in first.stdout
    assert "Traceback" not in first.stdout + first.stderr

    second = run_farm(["render", str(folder), "-o", str(out), "--recursive", *FAST], farm_env)
    assert second.returncode == 1
    assert "2 already rendered, skipped" in second.stdout


def test_render_all_good_exits_zero(farm_env, running, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one.png").write_bytes(sample_png(64, hue=200))
    result = run_farm(
        ["render", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *FAST], farm_env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 done" in result.stdout


def test_submit_status_jobs_cancel_and_resume(farm_env, running, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(sample_png(64, hue=33))
    submitted = run_farm(
        ["submit", str(image), *FAST[:-2], "--steps", "400", "--strength", "1.0"], farm_env
    )
    job_id = submitted.stdout.strip()
    assert len(job_id) == 32, submitted.stdout + submitted.stderr

    cancelled = run_farm(["cancel", job_id], farm_env)
    assert "cancelled 1 job" in cancelled.stdout
    status = json.loads(run_farm(["status", job_id, "--json"], farm_env).stdout)
    assert status["status"] == "cancelled"
    assert status["stages"][0]["name"] == "preprocess"

    listed = json.loads(run_farm(["jobs", "--status", "cancelled", "--json"], farm_env).stdout)
    assert job_id in {j["id"] for j in listed}
    assert "resumed" in run_farm(["resume", job_id], farm_env).stdout
    table = run_farm(["status", job_id], farm_env).stdout
    assert "denoise" in table and "attempts" in table
    run_farm(["cancel", job_id], farm_env)


def test_errors_are_one_clear_line_not_a_traceback(farm_env) -> None:
    result = run_farm(["submit", "/no/such/file.png"], farm_env)
    assert result.returncode == 2
    assert "INPUT_UNREADABLE" in result.stderr and "Traceback" not in result.stderr
    bad = run_farm(["submit", "--pipeline", "txt2img", "--strength", "nan"], farm_env)
    assert bad.returncode == 2 and "INVALID_PARAM" in bad.stderr


def test_missing_setting_is_named(tmp_path: Path) -> None:
    env = {"FARM_DATA_DIR": str(tmp_path), "FARM_BROKER_URL": "redis://127.0.0.1:1/0"}
    result = run_farm(["jobs"], env)
    assert result.returncode == 2
    assert "FARM_REDIS_URL and FARM_DATABASE_URL are not set" in result.stderr


@pytest.mark.slow
def test_render_with_nothing_configured_runs_an_embedded_farm(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(sample_png(64, hue=5))
    env = {"FARM_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    result = run_farm(["render", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *FAST], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting an embedded one" in result.stderr
    assert (tmp_path / "out" / "x.png").is_file()
    assert not (tmp_path / "data" / "farm.env").exists()  # stopped afterwards


def test_up_and_down(tmp_path: Path) -> None:
    env = {"FARM_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    up = run_farm(["up"], env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        for word in ("redis", "postgres", "s3", "worker"):
            assert word in up.stdout
        again = run_farm(["up", "--no-workers"], env)
        assert again.returncode == 0
    finally:
        down = run_farm(["down"], env)
    assert down.returncode == 0 and "2 worker(s) stopped" in down.stdout
    assert not (tmp_path / "data" / "workers.json").exists()
