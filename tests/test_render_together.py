"""Renders of one folder again after it was cancelled: the `farm` command as users run it, on
the real stack and workers."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import sample_png
from tests.test_cli import FARM, run_farm, user_env

SLOW = ["--size", "32", "--steps", "12", "--strength", "1.0", "--seed", "4"]


def images(folder: Path, count: int, hue: int) -> Path:
    folder.mkdir()
    for i in range(count):
        (folder / f"img{i:03d}.png").write_bytes(sample_png(16, hue=hue + i))
    return folder


def start_render(folder: Path, out: Path, options: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [*FARM, "render", str(folder), "-o", str(out), *options],
        env=user_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, errors = proc.communicate(timeout=timeout)
    return proc.returncode, out + errors


def assert_complete(code: int, output: str, out: Path, count: int) -> None:
    assert code == 0, output
    assert "Traceback" not in output
    assert f"{count} inputs: {count} done" in output, output
    assert len(list(out.glob("*.png"))) == count


def test_a_cancelled_folder_rendered_again_renders(farm, farm_env, running, tmp_path) -> None:
    count = 3
    folder = images(tmp_path / "in", count, hue=150)
    render = start_render(folder, tmp_path / "out", SLOW, farm_env)
    batch_line = render.stdout.readline()
    assert batch_line.startswith("batch "), batch_line
    cancelled = run_farm(["cancel", "--batch", batch_line.split()[1]], farm_env)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    code, output = finish(render)
    assert code == 1 and "cancelled" in output, output

    again = run_farm(["render", str(folder), "-o", str(tmp_path / "out"), *SLOW], farm_env)
    assert_complete(again.returncode, again.stdout + again.stderr, tmp_path / "out", count)
