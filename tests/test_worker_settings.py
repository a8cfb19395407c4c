"""Importing farm configures nothing; a worker with bad settings says so in one line."""

from __future__ import annotations

import os
import subprocess
import sys


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    return subprocess.run(
        [sys.executable, *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_a_bad_worker_role_breaks_neither_import_nor_help(farm_env) -> None:
    env = {**farm_env, "FARM_WORKER_ROLE": "GPU"}
    assert run(["-c", "import farm, farm.tasks"], env).returncode == 0
    assert run(["-m", "farm", "--help"], env).returncode == 0


def test_a_worker_with_a_bad_role_exits_with_one_line(farm_env) -> None:
    env = {**farm_env, "FARM_WORKER_ROLE": "GPU"}
    done = run(["-m", "celery", "-A", "farm.tasks", "worker", "-n", "bad@x"], env)
    assert done.returncode == 2
    assert "CONFIG_INVALID: FARM_WORKER_ROLE must be cpu or gpu, not 'GPU'." in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_a_worker_with_no_farm_configured_names_what_is_missing(tmp_path) -> None:
    env = {"FARM_DATA_DIR": str(tmp_path), "HOME": str(tmp_path)}
    done = run(["-m", "celery", "-A", "farm.tasks", "worker", "-n", "none@x"], env)
    assert done.returncode == 2
    assert "FARM_BROKER_URL" in done.stderr and "Traceback" not in done.stderr


def test_importing_farm_configures_nothing(farm_env) -> None:
    code = "import farm, farm.tasks; from farm.tasks.app import app; assert not app.configured"
    assert run(["-c", code], farm_env).returncode == 0
