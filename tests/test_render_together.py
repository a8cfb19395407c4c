"""Renders of one folder by two users at once, or one while the other follows, and a cancelled
folder rendered again: the `farm` command as users run it, on the real stack and workers."""

from __future__ import annotations

import subprocess
from pathlib import Path

from farm.tasks import faults
from farm.tasks.gc import orphaned_packs
from tests.helpers import sample_png, wait_until
from tests.test_cli import FARM, run_farm, user_env

QUICK = ["--size", "16", "--steps", "1", "--strength", "1.0", "--seed", "3"]
STALL_S = 20  # longer than a cancel and a render's start
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


def batch_id(output: str) -> str:
    return output.splitlines()[0].split()[1]


def batch_jobs(farm, output: str) -> set[str]:
    return {j.id for j in farm.batch(batch_id(output)).jobs()}


def assert_complete(code: int, output: str, out: Path, count: int) -> None:
    assert code == 0, output
    assert "Traceback" not in output
    assert f"{count} inputs: {count} done" in output, output
    assert len(list(out.glob("*.png"))) == count


def test_two_renders_of_one_folder_at_once_both_write_every_output(
    farm, farm_env, running, tmp_path: Path
) -> None:
    count = 70  # more than one chunk of 64: the two submitters race on both
    folder = images(tmp_path / "in", count, hue=40)
    renders = [start_render(folder, tmp_path / f"out{i}", QUICK, farm_env) for i in range(2)]
    results = [finish(proc) for proc in renders]
    for i, (code, output) in enumerate(results):
        assert_complete(code, output, tmp_path / f"out{i}", count)
    first, second = (batch_jobs(farm, output) for _, output in results)
    assert first == second and len(first) == count  # one job per input, shared
    packs = {
        k for _, output in results for k in farm.ctx.store.list(f"batches/{batch_id(output)}/")
    }
    assert packs and not packs & set(orphaned_packs(farm.ctx, grace_s=0))  # the loser's went


def test_a_second_render_started_while_the_first_follows_leaves_it_complete(
    farm, farm_env, running, tmp_path: Path
) -> None:
    count = 4
    folder = images(tmp_path / "in", count, hue=90)
    first = start_render(folder, tmp_path / "out1", SLOW, farm_env)
    assert first.stdout.readline().startswith("batch ")  # submitted, now following
    second = start_render(folder, tmp_path / "out2", SLOW, farm_env)
    (code2, out2), (code1, out1) = finish(second), finish(first)
    assert_complete(code1, out1, tmp_path / "out1", count)
    assert_complete(code2, out2, tmp_path / "out2", count)


def test_a_cancelled_folder_rendered_again_renders(farm, farm_env, running, meta, tmp_path) -> None:
    count = 3
    folder = images(tmp_path / "in", count, hue=150)
    render = start_render(folder, tmp_path / "out", SLOW, farm_env)
    batch_line = render.stdout.readline()
    assert batch_line.startswith("batch "), batch_line
    jobs = [farm.get(j.id) for j in farm.batch(batch_line.split()[1]).jobs()]
    for job in jobs:  # the first to reach denoise stalls there, its stage still running
        faults.arm(meta, job.id, "denoise", "step", f"sleep:{STALL_S}")
    wait_until(lambda: any(_stalled(job) for job in jobs), 120, "a stalled denoise")
    cancelled = run_farm(["cancel", "--batch", batch_line.split()[1]], farm_env)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    code, output = finish(render)
    assert code == 1 and "cancelled" in output, output
    for job in jobs:  # the jobs cancelled before they reached denoise: no stall when rendered
        meta.redis.delete(faults.fault_key(job.id, "denoise", "step"))

    # At once, as a user would: the stalled stage is still stopping.
    again = run_farm(["render", str(folder), "-o", str(tmp_path / "out"), *SLOW], farm_env)
    assert_complete(again.returncode, again.stdout + again.stderr, tmp_path / "out", count)


def _stalled(job) -> bool:
    progress = job.progress()
    return progress.stage == "denoise" and progress.step >= 1
