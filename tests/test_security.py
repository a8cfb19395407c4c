"""Secure defaults: JSON only, optional signing, Flower behind auth, loopback-only servers,
no secret in messages or monitoring."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from farm.local.certs import builder
from farm.local.workers import start_worker, wait_ready
from farm.tasks.app import app
from tests.helpers import http, running_flower, sample_png, wait_until


class Pwned:
    """Unpickling this creates a file: proof that pickle content was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def worker_logs(workers, role: str) -> str:
    return "".join(w.log_path.read_text() for w in workers.running if w.role == role)


def test_pickle_message_is_refused_and_nothing_runs(farm, running, workers, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with app.connection_for_write() as conn:
        conn.Producer().publish(
            ((Pwned(marker),), {}, {}),
            serializer="pickle",
            exchange="cpu",
            routing_key="cpu",
            headers={"task": "farm.cpu.ping", "id": str(uuid.uuid4()), "lang": "py"},
        )
    wait_until(lambda: "ContentDisallowed" in worker_logs(workers, "cpu"), 30, "the refusal")
    time.sleep(1)
    assert not marker.exists()


def make_signing_files(root: Path) -> dict[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "farm-test")])
    cert = builder(name, name, key).sign(key, hashes.SHA256())
    (root / "store").mkdir(parents=True)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (root / "farm.crt").write_bytes(pem)
    (root / "store" / "farm.crt").write_bytes(pem)
    (root / "farm.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {
        "FARM_SIGNING_KEY": str(root / "farm.key"),
        "FARM_SIGNING_CERT": str(root / "farm.crt"),
        "FARM_SIGNING_CERT_STORE": str(root / "store"),
    }


def send_ping(env: dict[str, str], tag: str) -> None:
    code = (
        "from farm.tasks.app import app; "
        f"app.send_task('farm.cpu.ping', args=({tag!r},), queue='cpu')"
    )
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True, timeout=60)


def test_signed_messages_run_and_unsigned_ones_are_refused(
    stack, farm_env, meta, tmp_path: Path
) -> None:
    # A broker of its own (Redis database 1) so the session's workers are not involved.
    isolated = {**farm_env, "FARM_BROKER_URL": stack.redis_url.rsplit("/", 1)[0] + "/1"}
    signed = {**isolated, **make_signing_files(tmp_path / "pki")}
    worker = start_worker("cpu", signed, tmp_path / "logs")
    try:
        wait_ready(meta, [worker])
        send_ping(signed, "signed-ping")
        send_ping(isolated, "unsigned-ping")
        wait_until(lambda: "succeeded" in worker.log_path.read_text(), 30, "the signed ping")
        wait_until(lambda: "ContentDisallowed" in worker.log_path.read_text(), 30, "a refusal")
        assert worker.log_path.read_text().count("succeeded") == 1
    finally:
        worker.stop()


def test_flower_requires_auth_and_shows_no_secret(stack, farm_env, farm, running, tmp_path):
    with running_flower(farm_env, "flower-sentinel-pw", tmp_path / "flower.log") as (base, proc):
        job = farm.submit(sample_png(hue=17), size=64, steps=4)
        job.wait(timeout=120)
        assert http(base + "/")[0] == 401
        assert http(base + f"/api/task/revoke/{uuid.uuid4()}", method="POST")[0] == 401
        assert http(base + "/", auth="farm:wrong")[0] == 401
        status, workers_json = http(base + "/api/workers?refresh=1", auth="farm:flower-sentinel-pw")
        assert status == 200
        wait_until(
            lambda: job.id in http(base + "/api/tasks", "farm:flower-sentinel-pw")[1],
            30,
            "flower to see the job's tasks",
        )
        tasks_json = http(base + "/api/tasks", auth="farm:flower-sentinel-pw")[1]
        for secret in secrets_of(stack):
            assert secret not in workers_json + tasks_json
        assert "flower-sentinel-pw" not in " ".join(proc.args)  # not visible in `ps`


def secrets_of(stack) -> list[str]:
    def password(url: str) -> str:
        return url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]

    return [stack.s3_secret_key, password(stack.redis_url), password(stack.database_url)]


def test_stage_messages_carry_ids_only(farm, meta) -> None:
    from farm.tasks.broker_scan import queue_keys

    job = farm.submit(pipeline="txt2img", size=64, steps=400)  # its noise stage is queued
    broker = farm.ctx.broker_redis
    raw = [m for key in queue_keys("gpu") for m in broker.lrange(key, 0, -1)]
    mine = [json.loads(m) for m in raw if job.id.encode() in m]
    farm.cancel(job.id)
    for message in mine:
        args = json.loads(base64.b64decode(message["body"]))[0]
        assert args == [job.id, "noise"]


def listening_addresses(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                found.add(fields[1].split(":")[0])
    return found


def test_local_stack_listens_on_loopback_only(local_stack) -> None:
    state = json.loads((local_stack.data_dir / "stack.json").read_text())
    pids = [state[s]["pid"] for s in ("redis", "postgres", "s3") if state[s].get("pid")]
    addresses = listening_addresses(pids)
    assert addresses, "no listening socket found"
    assert addresses <= {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


@pytest.mark.parametrize("url", ["rediss://:pw@redis.example:6380/0?ssl_cert_reqs=required"])
def test_tls_redis_urls_configure_ssl(url: str) -> None:
    from farm.storage.metadata import Metadata

    pool = Metadata(url).redis.connection_pool
    assert pool.connection_class.__name__ == "SSLConnection"
