"""The deployment files in deploy/, checked without systemd running: the FARM_* variables
every file names, and the worker unit (``systemd-analyze verify``, the role and GPU each
instance name gives).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup

from farm.cli import app
from farm.config import Settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "farm-worker@.service"
WORKER_ENV = DEPLOY / "systemd" / "farm.env.example"
UNIT_FARM = "/opt/farm/venv/bin/farm"


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as compose and systemd read them (no quotes in ours)."""
    lines = (line.strip() for line in path.read_text().splitlines())
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def parse_farm_args(args: list[str]) -> None:
    """Parse ``farm ARGS`` as the CLI does, without running it: an unknown command or option,
    or a bad value, raises (a usage error of the click that typer carries)."""
    command = typer.main.get_command(app)
    words = list(args)
    while isinstance(command, TyperGroup):
        name = words.pop(0)
        found = command.commands.get(name)
        assert found is not None, f"farm has no command {name!r} (in farm {' '.join(args)})"
        command = found
    command.make_context(command.name, words)


def farm_variables(text: str) -> set[str]:
    return set(re.findall(r"\bFARM_[A-Z0-9_]+\b", text))


def test_every_farm_variable_named_in_deploy_is_a_setting() -> None:
    settings = {f"FARM_{name.upper()}" for name in Settings.model_fields}
    files = [UNIT, WORKER_ENV]
    named = {path.name: farm_variables(path.read_text()) for path in files}
    assert {name: sorted(found - settings) for name, found in named.items()} == {
        path.name: [] for path in files
    }


def settings_from(variables: dict[str, str]) -> Settings:
    """Settings from these FARM_* values alone (not the test's environment or env files)."""
    fields = {key.removeprefix("FARM_").lower(): value for key, value in variables.items()}
    settings = Settings(_env_file=None, **fields)
    settings.check_storage()
    return settings


def test_the_worker_example_makes_settings_the_farm_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in [key for key in os.environ if key.startswith("FARM_")]:
        monkeypatch.delenv(key)
    worker = settings_from(env_file(WORKER_ENV))
    assert worker.broker_url.get_secret_value().startswith("redis://")


def unit_settings() -> dict[str, str]:
    """The unit's KEY=value lines, continuation lines joined (the last of a key wins)."""
    text = UNIT.read_text().replace("\\\n", " ")
    lines = (line.strip() for line in text.splitlines())
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def test_stopping_a_worker_waits_as_long_as_the_broker_would() -> None:
    unit = unit_settings()
    timeout = int(unit["TimeoutStopSec"])
    assert timeout == Settings.model_fields["visibility_timeout"].default
    assert timeout == int(env_file(WORKER_ENV)["FARM_VISIBILITY_TIMEOUT"])
    assert (unit["KillSignal"], unit["KillMode"]) == ("SIGTERM", "mixed")


def run_instance(instance: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The unit's ExecStart for ``instance``, with a stub in place of farm that prints the
    GPUs it would see and its arguments."""
    stub = tmp_path / "farm"
    stub.write_text('#!/bin/sh\necho "${CUDA_VISIBLE_DEVICES-all}"\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    line = unit_settings()["ExecStart"].replace("%i", instance).replace("%H", "host1")
    argv = shlex.split(line.replace("$$", "$").replace(UNIT_FARM, str(stub)))
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=10)


@pytest.mark.parametrize(
    ("instance", "gpus", "role"),
    [("gpu0", "0", "gpu"), ("gpu3", "3", "gpu"), ("cpu", "all", "cpu"), ("cpu2", "all", "cpu")],
)
def test_a_worker_instance_runs_the_role_and_gpu_it_names(
    instance: str, gpus: str, role: str, tmp_path: Path
) -> None:
    done = run_instance(instance, tmp_path)
    assert done.returncode == 0, done.stderr
    seen, *args = done.stdout.splitlines()
    assert seen == gpus
    assert args == ["worker", "--role", role, "--name", f"{instance}@host1"]
    parse_farm_args(args)


def test_a_worker_instance_of_no_role_is_refused(tmp_path: Path) -> None:
    done = run_instance("gpu", tmp_path)
    assert done.returncode == 2
    assert "name the instance gpuN" in done.stderr


@pytest.mark.skipif(
    not shutil.which("systemd-analyze"),
    reason="systemd-analyze is not installed: unit not verified",
)
@pytest.mark.parametrize("instance", ["gpu0", "cpu"])
def test_worker_unit_passes_systemd_analyze_verify(instance: str, tmp_path: Path) -> None:
    """verify warns about unknown keys and bad values but exits 0 for them: any line about
    the unit is a failure."""
    shutil.copy(UNIT, tmp_path / UNIT.name)
    (tmp_path / f"farm-worker@{instance}.service").symlink_to(UNIT.name)
    done = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(tmp_path / f"farm-worker@{instance}.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    about_unit = [
        line for line in (done.stdout + done.stderr).splitlines() if "farm-worker" in line
    ]
    assert (done.returncode, about_unit) == (0, [])
