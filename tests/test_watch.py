"""The live per-stage view: `farm status --watch` and `farm render` of one input, as a user runs
them, in a pipe and in a terminal (a pseudo-terminal: rich's Live only redraws on one)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from farm.pipelines import get_pipeline
from farm.tasks import faults
from tests.helpers import sample_png
from tests.test_cli import FARM, FAST, run_farm, user_env

PARAMS = {"size": 64, "steps": 6, "seed": 2, "prompt": "a quiet harbour"}
STAGES = [s.name for s in get_pipeline("img2img").stages]
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """A `farm` command whose stdin, stdout and stderr are a pseudo-terminal; what it drew is
    ``text``, its escape codes taken out."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, child = os.openpty()
        self.proc = subprocess.Popen(
            [*FARM, *args],
            env={**user_env(env), "TERM": "xterm-256color"},
            stdin=child,
            stdout=child,
            stderr=child,
            # as in test_cli: a suite run with `&` starts us with SIGINT ignored
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        os.close(child)
        self.raw = b""

    @property
    def text(self) -> str:
        return ESCAPE.sub("", self.raw.decode(errors="replace"))

    def read_until(self, seen, timeout: float, what: str) -> None:
        """Read what it draws until ``seen(text)``, or until it closes the terminal."""
        deadline = time.monotonic() + timeout
        while not seen(self.text):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}: {self.text}")
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: every end of the terminal's child side is closed
                    chunk = b""
                if not chunk:
                    return
                self.raw += chunk

    def finish(self, timeout: float = 120) -> int:
        try:
            self.read_until(lambda _: False, timeout, "the command to exit")
            return self.proc.wait(timeout)
        finally:
            self.proc.kill()
            os.close(self.master)


def rows(text: str) -> dict[str, str]:
    """The last row drawn for each stage of the stage table."""
    found = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if cells and cells[0] in STAGES:
            found[cells[0]] = line
    return found


def assert_all_done(text: str) -> None:
    drawn = rows(text)
    assert sorted(drawn) == sorted(STAGES), text
    assert all(re.search(r"\bdone\b", row) for row in drawn.values()), text


def test_watch_in_a_pipe_prints_the_finished_table_once_and_exits_zero(
    farm, farm_env, running
) -> None:
    job = farm.submit(sample_png(64, hue=61), **PARAMS)
    watched = run_farm(["status", job.id[:10], "--watch", "--interval", "0.2"], farm_env)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert_all_done(watched.stdout)
    assert watched.stdout.count(f"job {job.id}  done") == 1, watched.stdout  # not every frame
    assert "\x1b" not in watched.stdout
    assert farm.get(job.id).status() == "done"


def test_watch_in_a_terminal_draws_the_running_stage_steps_until_done(
    farm, farm_env, running, meta
) -> None:
    job = farm.submit(sample_png(64, hue=62), **PARAMS)
    faults.arm(meta, job.id, "denoise", "step", "stall:0.3")  # every step: a bar worth seeing
    try:
        terminal = Terminal(["status", job.id, "--watch", "--interval", "0.1"], farm_env)
        assert terminal.finish() == 0, terminal.text
    finally:
        faults.disarm(meta, job.id, "denoise", "step")
    assert "\x1b[" in terminal.raw.decode()  # redrawn in place, not printed frame after frame
    steps = set(re.findall(r"denoise.*running.*? (\d+)/\d+ ", terminal.text))
    assert len(steps) >= 2, terminal.text
    assert_all_done(terminal.text.rpartition(f"job {job.id}")[2])


def test_watch_of_a_failing_job_ends_with_its_code(farm, farm_env, running, meta) -> None:
    job = farm.submit(sample_png(64, hue=63), **PARAMS)
    faults.arm(meta, job.id, "denoise", "start", "fail")  # reached after preprocess, encode
    watched = run_farm(["status", job.id, "--watch", "--interval", "0.2"], farm_env)
    assert f"job {job.id}  failed" in watched.stdout, watched.stdout + watched.stderr
    assert "STAGE_FAILED: injected failure at denoise/start" in watched.stdout
    assert re.search(r"denoise\W+gpu\W+failed", watched.stdout), watched.stdout
    # the rule of `farm status`: the job was shown, whatever its state; exit 2 is for errors
    assert watched.returncode == 0, watched.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--watch", "--json"], "CONFIG_INVALID"),
        (["--watch", "--interval", "0"], "CONFIG_INVALID"),
        (["--watch"], "JOB_NOT_FOUND"),
    ],
)
def test_watch_refusals_are_one_line(farm_env, args: list[str], code: str) -> None:
    refused = run_farm(["status", "f" * 32, *args], farm_env)
    assert refused.returncode == 2 and code in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not refused.stdout


def test_ctrl_c_stops_watching_without_a_traceback(farm, farm_env, running, meta) -> None:
    job = farm.submit(sample_png(64, hue=64), **{**PARAMS, "steps": 400, "strength": 1.0})
    faults.arm(meta, job.id, "denoise", "step", "stall:0.1")  # unfinished while watched
    try:
        terminal = Terminal(["status", job.id, "--watch"], farm_env)
        terminal.read_until(lambda text: "attempts" in text, 60, "the first frame")
        terminal.proc.send_signal(signal.SIGINT)
        assert terminal.finish() == 130, terminal.text
    finally:
        farm.cancel(job)
        faults.disarm(meta, job.id, "denoise", "step")
    assert f"stopped watching job {job.id}" in terminal.text
    assert "Traceback" not in terminal.text


def test_render_of_one_input_in_a_terminal_shows_its_stages(
    farm_env, running, tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one.png").write_bytes(sample_png(64, hue=65))
    args = ["render", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *FAST]
    terminal = Terminal(args, farm_env)
    assert terminal.finish() == 0, terminal.text
    assert "1 inputs: 1 done" in terminal.text
    header = re.findall(r"job [0-9a-f]{32}  done  pipeline img2img", terminal.text)
    assert header, terminal.text
    assert_all_done(terminal.text.rpartition(header[-1])[2])
    assert (tmp_path / "out" / "one.png").is_file()


def test_render_of_a_folder_in_a_terminal_shows_a_running_jobs_stages(
    farm_env, running, tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.png").write_bytes(sample_png(64, hue=70 + i))
    args = ["render", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *FAST]
    terminal = Terminal(args, farm_env)
    assert terminal.finish() == 0, terminal.text
    assert "3 inputs: 3 done" in terminal.text
    assert re.search(r"job [0-9a-f]{32}  running  pipeline img2img", terminal.text), terminal.text
