"""The local stack starts real Redis, Postgres and SeaweedFS servers: no mocks anywhere."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import psutil
import psycopg2
import pytest
import redis
from botocore.exceptions import ClientError
from redis.backoff import NoBackoff
from redis.retry import Retry

from farm.local import LocalStack, StackInfo

SERVER_NAMES = ("redis-server", "postgres", "weed")
NO_RETRY = Retry(NoBackoff(), 0)


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, StackInfo]]:
    local = LocalStack(tmp_path_factory.mktemp("local-stack"))
    try:
        yield local, local.up(migrate=False)
    finally:
        local.down()


def _pids(local: LocalStack) -> dict[str, int]:
    state = json.loads((local.data_dir / "stack.json").read_text())
    return {name: state[name]["pid"] for name in ("redis", "postgres", "s3")}


def _server_tree(pids: dict[str, int]) -> list[psutil.Process]:
    """Every server process and its children (Postgres forks a process per job)."""
    procs = [psutil.Process(pid) for pid in pids.values()]
    return procs + [child for proc in procs for child in proc.children(recursive=True)]


def _gone(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _s3(info: StackInfo, secret: str | None = None) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=info.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=info.s3_access_key,
        aws_secret_access_key=secret or info.s3_secret_key,
    )


def _pg_dsn(info: StackInfo) -> str:
    return info.database_url.replace("postgresql+psycopg2://", "postgresql://")


def test_redis_answers_only_with_the_password(local_stack: tuple[LocalStack, StackInfo]) -> None:
    _, info = local_stack
    assert redis.Redis.from_url(info.redis_url).ping()
    port = int(info.redis_url.rsplit(":", 1)[1].split("/")[0])
    for password in (None, "wrong"):
        # no retries: redis-py retries auth errors with backoff (seconds) by default
        client = redis.Redis(host="127.0.0.1", port=port, password=password, retry=NO_RETRY)
        with pytest.raises(redis.AuthenticationError):
            client.ping()


def test_postgres_farm_role_owns_farm_database(local_stack: tuple[LocalStack, StackInfo]) -> None:
    _, info = local_stack
    with psycopg2.connect(_pg_dsn(info)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT 1, current_user, pg_get_userbyid(datdba) FROM pg_database"
            " WHERE datname = current_database()"
        )
        assert cur.fetchone() == (1, "farm", "farm")
    conn.close()
    wrong = _pg_dsn(info).replace("//farm:", "//farm:x", 1)  # a wrong password
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(wrong)


def test_s3_put_get_and_credentials_are_checked(local_stack: tuple[LocalStack, StackInfo]) -> None:
    _, info = local_stack
    s3 = _s3(info)
    s3.put_object(Bucket=info.s3_bucket, Key="probe/hello.bin", Body=b"\x00farm" * 1000)
    body = s3.get_object(Bucket=info.s3_bucket, Key="probe/hello.bin")["Body"].read()
    assert body == b"\x00farm" * 1000
    with pytest.raises(ClientError) as err:
        _s3(info, secret="not-the-secret").get_object(Bucket=info.s3_bucket, Key="probe/hello.bin")
    assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_second_up_reuses_the_running_servers(local_stack: tuple[LocalStack, StackInfo]) -> None:
    local, info = local_stack
    pids = _pids(local)
    again = LocalStack(local.data_dir)  # a new handle, as a second `farm up` would make
    assert again.up(migrate=False) == info
    assert _pids(again) == pids
    assert again.is_running() and again.info() == info


def test_env_and_state_files_are_private(local_stack: tuple[LocalStack, StackInfo]) -> None:
    local, info = local_stack
    env_file = local.data_dir / "farm.env"
    for path in (env_file, local.data_dir / "stack.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = env_file.read_text().splitlines()
    assert lines == [f"{key}={value}" for key, value in info.env().items()]
    assert info.env()["FARM_BROKER_URL"] == info.redis_url
    assert info.env()["FARM_STORAGE"] == "s3"


def test_restart_service_keeps_port_and_data(tmp_path: Path) -> None:
    local = LocalStack(tmp_path)
    try:
        info = local.up(migrate=False)
        redis.Redis.from_url(info.redis_url).set("kept", "yes")
        old_pid = _pids(local)["redis"]
        local.restart_service("redis")
        assert _pids(local)["redis"] != old_pid
        assert redis.Redis.from_url(info.redis_url).get("kept") == b"yes"  # from the AOF
        assert local.info() == info
    finally:
        local.down()


def test_some_servers_alone_answer_with_their_addresses(tmp_path: Path) -> None:
    local = LocalStack(tmp_path)
    assert local.addresses() is None  # nothing was ever started here
    try:
        local.start_service("redis")
        assert local.info() is None  # not the whole stack
        info = local.addresses()
        assert redis.Redis.from_url(info.redis_url).ping()
    finally:
        local.down()


def test_down_leaves_no_process_and_up_again_keeps_urls(tmp_path: Path) -> None:
    local = LocalStack(tmp_path)
    try:
        info = local.up(migrate=False)
        procs = _server_tree(_pids(local))
        assert {p.name() for p in procs} >= set(SERVER_NAMES)
        local.down()
        assert all(_gone(p) for p in procs), [p for p in procs if not _gone(p)]
        assert not local.is_running() and local.info() is None
        assert not (tmp_path / "farm.env").exists()
        local.down()  # idempotent
        assert local.up(migrate=False) == info  # same ports and secrets: the data keeps them
    finally:
        local.down()
