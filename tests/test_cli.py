"""The `farm` command as a user runs it: a subprocess, against the real stack and workers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image

from farm.cli.render import RENDER_OPTIONS
from farm.db import job_records
from farm.db.models import StageRun
from farm.db.session import session_scope
from farm.errors import FarmError
from farm.follower import output_names
from farm.pipelines import get_pipeline
from farm.tasks import faults
from tests.helpers import sample_png, wait_until

FARM = [sys.executable, "-m", "farm"]
FAST = ["--size", "64", "--steps", "6", "--seed", "2", "--prompt", "a quiet harbour"]


def user_env(env: dict[str, str]) -> dict[str, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    full_env.update(env, COLUMNS="200", NO_COLOR="1")
    return full_env


def run_farm(args: list[str], env: dict[str, str], timeout: float = 240):
    return subprocess.run(
        [*FARM, *args],
        env=user_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def job_ids(env: dict[str, str]) -> set[str]:
    listed = run_farm(["jobs", "--limit", "100000", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    return {j["id"] for j in json.loads(listed.stdout)}


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.png")}


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


def test_rerender_leaves_matching_outputs_alone_and_rewrites_changed_ones(
    farm_env, running, tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    for i, name in enumerate(["dune.png", "reef.png"]):
        (tmp_path / "in" / name).write_bytes(sample_png(64, hue=60 + 40 * i))
    out = tmp_path / "out"
    render = ["render", str(tmp_path / "in"), "-o", str(out), *FAST]
    assert run_farm(render, farm_env).returncode == 0
    first, good = mtimes(out), (out / "reef.png").read_bytes()

    again = run_farm(render, farm_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert mtimes(out) == first  # nothing rendered, nothing rewritten
    assert "done dune.png -> dune.png (unchanged)" in again.stdout

    (out / "reef.png").write_bytes(b"edited by hand")
    assert run_farm(render, farm_env).returncode == 0
    assert (out / "reef.png").read_bytes() == good
    assert mtimes(out)["dune.png"] == first["dune.png"]


def test_output_that_is_a_file_is_refused_before_anything_is_submitted(
    farm_env, running, folder: Path, tmp_path: Path
) -> None:
    before = job_ids(farm_env)
    taken = tmp_path / "out.png"
    taken.write_bytes(b"not a folder")
    result = run_farm(["render", str(folder), "-o", str(taken), *FAST], farm_env)
    assert result.returncode == 2
    assert "CONFIG_INVALID" in result.stderr and "is a file" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert job_ids(farm_env) == before


def test_render_without_a_terminal_prints_plain_lines(farm_env, running, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one.png").write_bytes(sample_png(64, hue=210))
    (tmp_path / "in" / "two.txt.png").write_text("not a picture")
    result = run_farm(
        ["render", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *FAST], farm_env
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("batch ") and len(lines[0].split()[1]) == 32
    assert re.search(r"^\[[12]/2\] failed two.txt.png  INPUT_NOT_IMAGE: ", result.stdout, re.M)
    assert re.search(r"^\[[12]/2\] done one.png -> one.png$", result.stdout, re.M)
    assert "rendering" not in result.stdout  # no progress bar drawn into a log


def test_ctrl_c_tells_how_to_cancel_or_reattach(farm_env, running, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "slow.png").write_bytes(sample_png(64, hue=230))
    slow = [*FAST[:-2], "--steps", "400", "--strength", "1.0"]
    render = [*FARM, "render", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *slow]
    proc = subprocess.Popen(
        render,
        env=user_env(farm_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        # A shell starts background commands with SIGINT ignored, and Python keeps an ignored
        # SIGINT ignored: a suite run with `&` would see Ctrl-C do nothing. A user's terminal
        # delivers it, so the render gets the default disposition, as it would there.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("batch "), first + proc.stderr.read()
        batch_id = first.split()[1]
        proc.send_signal(signal.SIGINT)
        out, errors = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert f"farm cancel --batch {batch_id}" in errors and "re-run the same `farm render`" in errors
    assert "Traceback" not in out + errors
    assert "cancelled 1 job" in run_farm(["cancel", "--batch", batch_id], farm_env).stdout


def test_a_worker_lost_mid_stage_is_told_by_render_and_status(
    farm, farm_env, running, workers, meta, tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "mill.png").write_bytes(sample_png(64, hue=140))
    # The same input and parameters as the render below, which re-attaches to this job.
    batch = farm.submit_folder(tmp_path / "in", size=64, steps=6, seed=2, prompt="a quiet harbour")
    (job,) = batch.jobs()
    gpu = workers.of("gpu")[0]
    faults.arm(meta, job.id, "encode", "start", "kill")  # SIGKILLs the gpu worker mid-stage
    wait_until(lambda: gpu.process.poll() is not None, 120, "the kill")
    workers.kill(gpu)
    workers.start("gpu")

    rendered = run_farm(
        ["render", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *FAST], farm_env
    )
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    assert "mill.png: a worker died during encode (1x); the stage was sent again" in rendered.stdout
    status = run_farm(["status", job.id[:12]], farm_env).stdout
    assert "encode: its worker died 1 time(s) mid-stage" in status
    stages = json.loads(run_farm(["status", job.id, "--json"], farm_env).stdout)["stages"]
    assert [s["lost_runs"] for s in stages if s["name"] == "encode"] == [1]


def test_render_all_good_exits_zero(farm_env, running, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one.png").write_bytes(sample_png(64, hue=200))
    result = run_farm(
        ["render", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *FAST], farm_env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 done" in result.stdout


def test_result_downloads_a_done_jobs_output(farm, farm_env, running, tmp_path: Path) -> None:
    job_id = run_farm(["submit", "--pipeline", "txt2img", *FAST], farm_env).stdout.strip()
    assert farm.get(job_id).wait(timeout=120).status == "done"
    saved = run_farm(["result", job_id[:10], "-o", str(tmp_path / "r.png")], farm_env)
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert (tmp_path / "r.png").read_bytes() == farm.get(job_id).result()


def test_submit_status_jobs_cancel_and_resume(farm_env, running, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(sample_png(64, hue=33))
    submitted = run_farm(
        ["submit", str(image), *FAST[:-2], "--steps", "400", "--strength", "1.0"], farm_env
    )
    job_id = submitted.stdout.strip()
    assert len(job_id) == 32, submitted.stdout + submitted.stderr

    cancelled = run_farm(["cancel", job_id[:8]], farm_env)  # a prefix, as users type
    assert "cancelled 1 job" in cancelled.stdout
    status = json.loads(run_farm(["status", job_id, "--json"], farm_env).stdout)
    assert status["status"] == "cancelled"
    assert status["stages"][0]["name"] == "preprocess"
    no_output = run_farm(["result", job_id, "-o", str(tmp_path / "r.png")], farm_env)
    assert no_output.returncode == 2 and "NOT_DONE" in no_output.stderr
    assert len(no_output.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.png").exists()

    listed = json.loads(run_farm(["jobs", "--status", "cancelled", "--json"], farm_env).stdout)
    assert job_id in {j["id"] for j in listed}
    env80 = {**farm_env, "COLUMNS": "80"}
    assert job_id in run_farm(["jobs", "--status", "cancelled"], env80).stdout  # pasteable
    assert f"resumed {job_id}" in run_farm(["resume", job_id[:12]], farm_env).stdout
    table = run_farm(["status", job_id[:6]], farm_env).stdout
    assert "denoise" in table and "attempts" in table and "lost" in table
    run_farm(["cancel", job_id], farm_env)
    unknown = run_farm(["status", "f" * 32], farm_env)
    assert unknown.returncode == 2 and "JOB_NOT_FOUND" in unknown.stderr


def recorded_job(url: str, stats: dict[str, tuple[int, float]]) -> str:
    """A txt2img job recorded failed at submit (nothing is ever sent), its stages then written
    done by hand, ``stats`` giving some of them batched model calls: no GPU engine needed."""
    new = job_records.NewJob(pipeline="txt2img", params={}, job_id=job_records.new_id())
    failed = {new.job_id: FarmError("recorded by hand")}
    with session_scope(url) as s:
        job_records.insert_jobs(s, get_pipeline("txt2img"), [new], failures=failed)
        s.execute(sa.update(StageRun).where(StageRun.job_id == new.job_id).values(status="done"))
        for stage, (calls, per_call) in stats.items():
            s.execute(
                sa.update(StageRun)
                .where(StageRun.job_id == new.job_id, StageRun.stage == stage)
                .values(model_calls=calls, jobs_per_call=per_call)
            )
    return new.job_id


def test_status_shows_the_gpu_calls_a_job_shared_only_when_it_made_any(stack, farm_env) -> None:
    shared = recorded_job(stack.database_url, {"denoise": (12, 3.4), "decode": (1, 2.0)})
    table = run_farm(["status", shared], farm_env).stdout
    assert "GPU calls" in table
    assert re.search(r"denoise\W+gpu\W+done.*12 \N{MULTIPLICATION SIGN} 3\.4 jobs", table), table
    assert re.search(r"decode\W.*1 \N{MULTIPLICATION SIGN} 2\.0 jobs", table), table
    stages = json.loads(run_farm(["status", shared, "--json"], farm_env).stdout)["stages"]
    by_name = {s["name"]: (s["model_calls"], s["jobs_per_call"]) for s in stages}
    assert by_name["denoise"] == (12, 3.4) and by_name["noise"] == (None, None)

    alone = run_farm(["status", recorded_job(stack.database_url, {})], farm_env).stdout
    assert "denoise" in alone and "GPU calls" not in alone
    assert "\N{MULTIPLICATION SIGN}" not in alone


def test_errors_are_one_clear_line_not_a_traceback(farm_env) -> None:
    result = run_farm(["submit", "/no/such/file.png"], farm_env)
    assert result.returncode == 2
    assert "INPUT_UNREADABLE" in result.stderr and "Traceback" not in result.stderr
    bad = run_farm(["submit", "--pipeline", "txt2img", "--strength", "nan"], farm_env)
    assert bad.returncode == 2 and "INVALID_PARAM" in bad.stderr


def test_render_and_submit_take_every_render_parameter_and_help_shows_no_placeholders() -> None:
    flags = ["--pipeline", "--priority", *(o.flags[0] for o in RENDER_OPTIONS.values())]
    for name in ("--saturation", "--contrast", "--brightness", "--width", "--height", "--fit"):
        assert name in flags
    for command in ("render", "submit"):
        shown = run_farm([command, "--help"], {})
        assert shown.returncode == 0, shown.stderr
        assert all(flag in shown.stdout for flag in flags), shown.stdout
        assert "<bool>" not in shown.stdout


def test_output_names_never_collide_nor_double_the_suffix() -> None:
    names = ["x.png", "x.jpg", "sub/y.webp", "a.jpg", "a.webp", "c.png", "c.jpg", "c.jpg.png"]
    out = output_names(names)
    assert out["x.png"] == "x.png" and out["x.jpg"] == "x.jpg.png"
    assert out["sub/y.webp"] == "sub/y.png"
    assert (out["a.jpg"], out["a.webp"]) == ("a.jpg.png", "a.webp.png")
    assert (out["c.jpg.png"], out["c.jpg"]) == ("c.jpg.png", "c.jpg (2).png")
    assert len(set(out.values())) == len(names)
    assert not any(name.endswith(".png.png") for name in out.values())
    assert output_names(list(reversed(names))) == out


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
