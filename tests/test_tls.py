"""`farm up --listen`: the stack's servers behind TLS, clients that verify it, and the one-line
error a client with the wrong CA gets. Real servers, a real TLS front, the real CLI."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import redis

from farm.config import Settings
from farm.local import LocalStack, StackInfo, certs
from farm.tasks.app import celery_config
from tests.helpers import sample_png

# Loopback, but not 127.0.0.1 where the servers themselves listen in the clear.
ADDRESS = "127.0.0.2"
FARM = [sys.executable, "-m", "farm"]


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, StackInfo]]:
    local = LocalStack(tmp_path_factory.mktemp("tls-stack"))
    try:
        yield local, local.up(listen=ADDRESS)
    finally:
        local.down()


def farm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    return subprocess.run(
        [*FARM, *args], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


def wrong_ca_env(info: StackInfo, tmp_path: Path) -> dict[str, str]:
    """The stack's settings with another CA (a stack's of its own) in every place."""
    other = certs.ca_path(tmp_path)
    certs.server_pair(tmp_path, ADDRESS)  # makes that CA
    swap = {str(info.tls_ca): str(other), str(info.tls_ca).replace("/", "%2F"): str(other)}
    env = {}
    for key, value in info.env().items():
        for old, new in swap.items():
            value = value.replace(old, new)
        env[key] = value
    return env | {"FARM_DATA_DIR": str(tmp_path), "FARM_OUTAGE_TIMEOUT": "30"}


def test_the_urls_point_at_the_front_with_verification(tls_stack) -> None:
    _, info = tls_stack
    assert info.redis_url.startswith("rediss://:") and f"@{ADDRESS}:" in info.redis_url
    assert "ssl_cert_reqs=required" in info.redis_url
    assert "sslmode=verify-full" in info.database_url and f"@{ADDRESS}:" in info.database_url
    assert info.s3_endpoint.startswith(f"https://{ADDRESS}:")
    assert info.env()["FARM_S3_CA_BUNDLE"] == str(info.tls_ca)


def test_the_cli_works_over_tls(tls_stack, tmp_path: Path) -> None:
    """Redis (workers), Postgres (jobs), the broker, S3 and Postgres again (submit, status)."""
    _, info = tls_stack
    env = info.env()
    image = tmp_path / "in.png"
    image.write_bytes(sample_png())
    for args in (["workers"], ["jobs"], ["gc"]):
        done = farm(env, *args)
        assert done.returncode == 0, done.stderr
    submitted = farm(env, "submit", str(image), "--steps", "2")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split()[-1]
    status = farm(env, "status", job_id, "--json")
    assert status.returncode == 0 and '"queued"' in status.stdout, status.stderr


def test_the_listen_address_takes_no_plain_text(tls_stack) -> None:
    _, info = tls_stack
    settings = Settings(**{k.removeprefix("FARM_").lower(): v for k, v in info.env().items()})
    port = int(info.redis_url.split(f"{ADDRESS}:")[1].split("/")[0])
    plain = redis.Redis(host=ADDRESS, port=port, socket_timeout=3, socket_connect_timeout=3)
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    pg_url = settings.database_url.get_secret_value().replace("postgresql+psycopg2", "postgresql")
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(pg_url.split("?")[0] + "?sslmode=disable", connect_timeout=3)
    s3_port = int(info.s3_endpoint.rsplit(":", 1)[1])
    with socket.create_connection((ADDRESS, s3_port), timeout=3) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(3)
        assert not sock.recv(100).startswith(b"HTTP/")  # dropped, or a TLS alert


@pytest.mark.parametrize(
    "args", [["workers"], ["jobs"], ["gc"], ["submit", "IMAGE"]], ids=lambda a: a[0]
)
def test_a_client_with_the_wrong_ca_is_refused_in_one_line(
    tls_stack, tmp_path: Path, args: list[str]
) -> None:
    _, info = tls_stack
    image = tmp_path / "in.png"
    image.write_bytes(sample_png())
    args = [str(image) if a == "IMAGE" else a for a in args]
    done = farm(wrong_ca_env(info, tmp_path / "other"), *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error TLS_UNTRUSTED: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_up_again_keeps_the_front_until_local_only(tmp_path: Path) -> None:
    local = LocalStack(tmp_path / "farm")
    try:
        first = local.up(migrate=False, listen=ADDRESS)
        front = local.pids()["tls"]
        again = local.up(migrate=False)  # no --listen: the front stays
        assert again.redis_url == first.redis_url and local.pids()["tls"] == front
        local.down()
        assert "tls" not in local.pids()
        assert local.up(migrate=False).redis_url == first.redis_url  # back with the stack
        plain = local.up(migrate=False, local_only=True)
        assert plain.redis_url.startswith("redis://:") and plain.tls_ca is None
        assert "tls" not in local.pids() and "FARM_S3_CA_BUNDLE" not in plain.env()
    finally:
        local.down()


def test_a_rediss_broker_without_settings_verifies_certificates() -> None:
    """kombu alone would connect to a rediss:// URL without checking the certificate."""
    settings = Settings(
        broker_url="rediss://:pw@redis.example:6380/0",
        redis_url="rediss://:pw@redis.example:6380/0",
        database_url="postgresql+psycopg2://u:p@db.example/farm",
    )
    assert celery_config(settings)["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_a_server_restarted_behind_the_front_is_reached_again(tls_stack) -> None:
    """The relay closes a client's connection once its server is gone, so the client's next
    command reconnects instead of waiting on a dead relay."""
    local, info = tls_stack
    client = redis.Redis.from_url(info.redis_url, socket_timeout=5, socket_connect_timeout=5)
    assert client.ping()
    local.restart_service("redis")
    assert client.ping()  # redis-py retries once on a closed connection
    client.close()


def test_the_certificates_pass_strict_verification(tls_stack) -> None:
    """Python 3.13's default context verifies X.509 strictly (key identifiers, key usage):
    a client there must accept the stack's certificates too."""
    _, info = tls_stack
    context = ssl.create_default_context(cafile=str(info.tls_ca))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    port = int(info.s3_endpoint.rsplit(":", 1)[1])
    sock = socket.create_connection((ADDRESS, port), timeout=5)
    with context.wrap_socket(sock, server_hostname=ADDRESS) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
