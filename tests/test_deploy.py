"""The deployment files in deploy/, checked without Docker or systemd running: the compose file
against the Compose Specification's JSON schema, the farm commands and FARM_* variables every
file names, the consoles published on loopback only, the image's build, and the worker unit
(``systemd-analyze verify``, the role and GPU each instance name gives).

The schema is the one check-jsonschema ships (``vendor.compose-spec``, a dev dependency), so no
test reaches the network.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import typer
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from typer.core import TyperGroup

from farm.cli import app
from farm.config import Settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_ENV = DEPLOY / "compose.env.example"
UNIT = DEPLOY / "systemd" / "farm-worker@.service"
WORKER_ENV = DEPLOY / "systemd" / "farm.env.example"
DOCKERFILE = DEPLOY / "Dockerfile"
FARM_SERVICES = {"migrate", "flower", "ui", "metrics"}
CONSOLES = {"flower", "ui", "metrics"}
UNIT_FARM = "/opt/farm/venv/bin/farm"
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME; $$ is a $.
INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as compose and systemd read them (no quotes in ours)."""
    lines = (line.strip() for line in path.read_text().splitlines())
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


def interpolate(value: object, env: dict[str, str]) -> object:
    """What compose makes of the file with ``env`` as its .env; an unset variable without a
    default fails, as a ``:?`` one does in compose."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match[0] == "$$":
            return "$"
        name, op, arg = match[1] or match[4], match[2] or "", match[3]
        given = env.get(name)
        if given is not None and (given or not op.startswith(":")):
            return given
        if op.endswith("-"):
            return arg
        raise KeyError(f"{name} is not set ({arg or 'no default'})")

    return INTERPOLATION.sub(substitute, value)


class ComposeLoader(yaml.SafeLoader):
    """YAML as compose reads it: a key given twice in one mapping is an error, where PyYAML
    would keep the last (keys a ``<<`` merge brings in may be given again: that overrides)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        own = [key.value for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"]
        if twice := sorted({key for key in own if own.count(key) > 1}):
            raise yaml.MarkedYAMLError(problem=f"{twice} given twice", problem_mark=node.start_mark)
        return super().construct_mapping(node, deep)


def example_env() -> dict[str, str]:
    """compose.env.example with its passwords set, as the operator sets them."""
    return {key: value or f"{key.lower()}-0f3a" for key, value in env_file(COMPOSE_ENV).items()}


def compose(env: dict[str, str] | None = None) -> dict:
    env = example_env() if env is None else env
    return interpolate(yaml.load(COMPOSE.read_text(), ComposeLoader), env)


def schema_errors(document: dict) -> list[str]:
    schema = get_builtin_schema("vendor.compose-spec")
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    errors = validator(schema).iter_errors(document)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_file_follows_the_compose_specification() -> None:
    assert schema_errors(compose()) == []


def test_a_key_given_twice_is_refused_as_compose_refuses_it() -> None:
    with pytest.raises(yaml.MarkedYAMLError, match="'ports'"):
        yaml.load("ui:\n  ports: [1]\n  ports: [2]\n", ComposeLoader)
    merged = "x: &x {restart: always}\nui:\n  <<: *x\n  restart: 'no'\n"
    assert yaml.load(merged, ComposeLoader)["ui"] == {"restart": "no"}


def test_compose_refuses_to_start_until_each_password_is_set() -> None:
    unset = sorted(key for key, value in env_file(COMPOSE_ENV).items() if not value)
    assert unset == ["CONSOLE_PASSWORD", "POSTGRES_PASSWORD", "REDIS_PASSWORD", "S3_SECRET_KEY"]
    for key in unset:
        with pytest.raises(KeyError, match=key):
            compose({**example_env(), key: ""})


def test_the_schema_check_catches_a_wrong_compose_file() -> None:
    broken = copy.deepcopy(compose())
    broken["services"]["ui"]["depends_on"]["migrate"]["condition"] = "service_finished"
    broken["services"]["flower"]["restart_policy"] = "always"
    errors = schema_errors(broken)
    assert any(e.startswith("services/ui/depends_on") for e in errors), errors
    assert any("restart_policy" in e for e in errors), errors


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


def test_compose_runs_real_farm_commands() -> None:
    services = compose()["services"]
    farm_image = services["migrate"]["image"]
    runs_farm = {name for name, service in services.items() if service["image"] == farm_image}
    assert runs_farm == FARM_SERVICES
    for name in sorted(runs_farm):
        parse_farm_args(services[name]["command"])


def test_other_services_start_when_migrations_are_done() -> None:
    services = compose()["services"]
    for name in sorted(FARM_SERVICES - {"migrate"}):
        needs = services[name]["depends_on"]
        assert needs["migrate"] == {"condition": "service_completed_successfully"}, name
    assert services["migrate"]["restart"] == "no"


def host_address(port: object) -> str:
    """Where one ``ports`` entry is published on the host: "" when it names no address, which
    Docker takes as every interface."""
    if isinstance(port, dict):
        return str(port.get("host_ip", ""))
    parts = str(port).split("/")[0].rsplit(":", 2)  # [ADDRESS:]PUBLISHED:TARGET[/PROTOCOL]
    return parts[0] if len(parts) == 3 else ""


@pytest.mark.parametrize("consoles_address", ["from compose.env.example", "left unset"])
def test_nothing_is_published_on_every_interface_and_consoles_only_on_loopback(
    consoles_address: str,
) -> None:
    env = example_env()
    if consoles_address == "left unset":
        del env["CONSOLES_ADDRESS"]
    for name, service in compose(env)["services"].items():
        for port in service.get("ports", []):
            address = host_address(port)
            assert address not in ("", "0.0.0.0", "::", "[::]"), f"{name}: {port}"
            if name in CONSOLES:
                assert address == "127.0.0.1", f"{name}: {port}"
    assert all(compose(env)["services"][name].get("ports") for name in CONSOLES)


def farm_variables(text: str) -> set[str]:
    return set(re.findall(r"\bFARM_[A-Z0-9_]+\b", text))


def test_every_farm_variable_named_in_deploy_is_a_setting() -> None:
    settings = {f"FARM_{name.upper()}" for name in Settings.model_fields}
    files = [COMPOSE, COMPOSE_ENV, UNIT, WORKER_ENV, DOCKERFILE]
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


def test_the_examples_make_settings_the_farm_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [key for key in os.environ if key.startswith("FARM_")]:
        monkeypatch.delenv(key)
    worker = settings_from(env_file(WORKER_ENV))
    assert worker.broker_url.get_secret_value().startswith("redis://")
    services = compose()["services"]
    for name in sorted(FARM_SERVICES):
        service = settings_from(services[name]["environment"])
        assert service.s3_endpoint == "http://s3:8333"
        assert f"-bucket={service.s3_bucket}" in services["s3"]["command"]  # weed creates it


def makefile_torch() -> str:
    (pin,) = set(re.findall(r"torch==([\w.]+)", (REPO / "Makefile").read_text()))
    return pin


def test_the_image_pins_the_cpu_torch_the_makefile_pins() -> None:
    dockerfile = DOCKERFILE.read_text()
    assert re.findall(r"torch==([\w.]+)", dockerfile) == [makefile_torch()]
    assert "download.pytorch.org/whl/cpu" in dockerfile


@pytest.mark.slow
def test_the_image_builds_the_farm_from_what_it_copies(tmp_path: Path) -> None:
    """The Dockerfile's COPY lines bring all `pip install` needs: a wheel builds from them
    alone, with the migrations in it."""
    source = tmp_path / "src"
    source.mkdir()
    lines = [line.split() for line in DOCKERFILE.read_text().splitlines()]
    for name in [name for words in lines if words[:1] == ["COPY"] for name in words[1:-1]]:
        if (REPO / name).is_dir():
            skip = shutil.ignore_patterns("__pycache__")
            shutil.copytree(REPO / name, source / name, symlinks=True, ignore=skip)
        else:
            shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, "-w", str(tmp_path), str(source)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("farm-*.whl")
    listing = subprocess.run(
        [sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True
    ).stdout
    assert "farm/migrations/versions/" in listing and "farm/alembic.ini" in listing


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


def test_a_failing_worker_is_restarted_for_as_long_as_it_takes() -> None:
    """systemd gives up on a unit started 5 times within 10 s (its defaults, left alone here):
    restarts RestartSec apart must never come that close."""
    unit = unit_settings()
    assert unit["Restart"] == "on-failure"
    assert not {"StartLimitIntervalSec", "StartLimitBurst"} & unit.keys()
    assert int(unit["RestartSec"].removesuffix("s")) * (5 - 1) > 10


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
