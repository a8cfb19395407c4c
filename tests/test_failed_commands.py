"""A command that fails leaves nothing behind and says in one line what is wrong (issue 17,
items 6 and 7): each case breaks one setting as a user would, against the session's real
servers, and checks that no job, batch or uploaded input was recorded."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import redis
from PIL import Image
from pydantic import SecretStr
from sqlalchemy import func, select

from farm import Farm
from farm.db.models import Batch as BatchRow
from farm.db.models import Job as JobRow
from farm.db.session import session_scope
from farm.errors import AuthFailed, BrokerUnavailable
from farm.local.redis_server import RedisServer
from farm.storage import keys
from farm.tasks.app import configure
from tests.helpers import free_port, sample_png, wait_until
from tests.test_cli import FAST, run_farm

SUBMIT = {"size": 64, "steps": 6, "seed": 2}


class Case(NamedTuple):
    """One setting broken as a user would break it, and the error that must say so."""

    broken: Callable[[dict[str, str]], dict[str, str]]  # the session's env -> overrides
    code: str
    names: str  # what the message must name


def with_password(url: str, password: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", rf"\g<1>{password}@", url)


# Settings that cannot work: refused before any server is asked.
SETTINGS_CASES = {
    "http-redis-url": Case(
        lambda env: {"FARM_REDIS_URL": "http://127.0.0.1:6379/0"},
        "CONFIG_INVALID",
        "FARM_REDIS_URL",
    ),
    "database-url-not-a-url": Case(
        lambda env: {"FARM_DATABASE_URL": "not a url"}, "CONFIG_INVALID", "FARM_DATABASE_URL"
    ),
    "mysql-database-url": Case(
        lambda env: {"FARM_DATABASE_URL": "mysql://farm:pw@127.0.0.1/farm"},
        "CONFIG_INVALID",
        "FARM_DATABASE_URL",
    ),
    "s3-endpoint-not-a-url": Case(
        lambda env: {"FARM_S3_ENDPOINT": "not a url"}, "CONFIG_INVALID", "FARM_S3_ENDPOINT"
    ),
}
# Servers that refuse us or are not there: found by the check before anything is written.
SERVER_CASES = {
    "wrong-redis-password": Case(
        lambda env: {"FARM_REDIS_URL": with_password(env["FARM_REDIS_URL"], "wrong")},
        "REDIS_AUTH_FAILED",
        "FARM_REDIS_URL",
    ),
    "wrong-broker-password": Case(
        lambda env: {"FARM_BROKER_URL": with_password(env["FARM_BROKER_URL"], "wrong")},
        "BROKER_AUTH_FAILED",
        "FARM_BROKER_URL",
    ),
    "closed-broker-port": Case(
        lambda env: {"FARM_BROKER_URL": f"redis://:pw@127.0.0.1:{free_port()}/0"},
        "BROKER_UNAVAILABLE",
        "Connection refused",
    ),
    "wrong-database-password": Case(
        lambda env: {"FARM_DATABASE_URL": with_password(env["FARM_DATABASE_URL"], "wrong")},
        "DATABASE_AUTH_FAILED",
        "FARM_DATABASE_URL",
    ),
    "wrong-s3-secret": Case(
        lambda env: {"FARM_S3_SECRET_KEY": "wrong"}, "STORAGE_AUTH", "FARM_S3_SECRET_KEY"
    ),
}


class Recorded(NamedTuple):
    jobs: int
    batches: int
    inputs: frozenset[str]


def recorded(farm: Farm) -> Recorded:
    """What submits leave: job and batch rows, uploaded inputs (single and packed)."""
    with session_scope(farm.ctx.db_url) as s:
        jobs = s.scalar(select(func.count()).select_from(JobRow))
        batches = s.scalar(select(func.count()).select_from(BatchRow))
    store = farm.ctx.store
    singles = (k for k in store.list(keys.JOBS_PREFIX) if k.endswith("/input"))
    return Recorded(jobs, batches, frozenset([*singles, *store.list(keys.BATCHES_PREFIX)]))


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "small.png").write_bytes(sample_png(64, hue=90))
    # noise does not compress: over the packing limit, so uploaded as an object of its own
    Image.frombytes("RGB", (320, 320), os.urandom(320 * 320 * 3)).save(folder / "large.png")
    return folder


def command(name: str, photos: Path, tmp_path: Path) -> list[str]:
    if name == "submit":
        return ["submit", str(photos / "small.png"), *FAST]
    return ["render", str(photos), "-o", str(tmp_path / "out"), *FAST]


def assert_one_line_and_nothing_left(result, case: Case, before: Recorded, farm: Farm) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error {case.code}: ") and case.names in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert recorded(farm) == before


@pytest.mark.parametrize("name", SETTINGS_CASES)
def test_a_malformed_url_is_one_line_naming_its_variable(
    name: str, farm, farm_env, photos: Path, tmp_path: Path
) -> None:
    case = SETTINGS_CASES[name]
    before = recorded(farm)
    env = {**farm_env, **case.broken(farm_env)}
    result = run_farm(command("render", photos, tmp_path), env, timeout=60)
    assert_one_line_and_nothing_left(result, case, before, farm)


@pytest.mark.parametrize("cli", ["submit", "render"])
@pytest.mark.parametrize("name", SERVER_CASES)
def test_a_refusing_or_absent_server_fails_before_anything_is_recorded(
    name: str, cli: str, farm, farm_env, photos: Path, tmp_path: Path
) -> None:
    case = SERVER_CASES[name]
    before = recorded(farm)
    env = {**farm_env, **case.broken(farm_env)}
    result = run_farm(command(cli, photos, tmp_path), env, timeout=60)
    assert_one_line_and_nothing_left(result, case, before, farm)


@pytest.mark.parametrize(
    "name", ["wrong-redis-password", "wrong-broker-password", "wrong-database-password"]
)
def test_refused_credentials_are_not_retried(name: str, farm, farm_env, settings) -> None:
    overrides = SERVER_CASES[name].broken(farm_env)
    values = {k.removeprefix("FARM_").lower(): SecretStr(v) for k, v in overrides.items()}
    try:
        with pytest.raises(AuthFailed) as info:
            Farm(settings.model_copy(update=values)).submit(sample_png(), **SUBMIT)
    finally:
        configure(settings)  # the Celery app is one per process: back to the session's broker
    assert info.value.code == SERVER_CASES[name].code and not info.value.retryable


@pytest.fixture
def full_broker(tmp_path: Path) -> Iterator[str]:
    """A second real Redis as the broker: it takes connections but, out of memory, refuses
    every message, so a submit fails after its checks passed and it recorded the job."""
    server = RedisServer(tmp_path, RedisServer.new_state(set()))
    pid = server.launch()
    try:
        wait_until(server.probe, 30, "the broker to answer")
        client = redis.Redis(port=server.main_port(), password=server.st["password"])
        with client:
            client.config_set("maxmemory", "1")
        yield server.url()
    finally:
        server.kill(pid)


@pytest.fixture
def farm_with_full_broker(settings, full_broker: str) -> Iterator[Farm]:
    try:
        yield Farm(settings.model_copy(update={"broker_url": SecretStr(full_broker)}))
    finally:
        configure(settings)


def test_a_job_that_cannot_be_sent_is_withdrawn(farm, farm_with_full_broker: Farm) -> None:
    before = recorded(farm)
    with pytest.raises(BrokerUnavailable) as info:
        farm_with_full_broker.submit(sample_png(64, hue=92), **SUBMIT)
    assert "maxmemory" in info.value.message and "nothing was submitted" in info.value.message
    assert recorded(farm) == before


def test_a_folder_that_cannot_be_sent_is_withdrawn(
    farm, farm_with_full_broker: Farm, photos: Path
) -> None:
    before = recorded(farm)
    with pytest.raises(BrokerUnavailable) as info:
        farm_with_full_broker.submit_folder(photos, **SUBMIT)
    assert info.value.message.endswith("nothing was submitted")
    assert recorded(farm) == before
