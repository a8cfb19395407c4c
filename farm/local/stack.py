"""The local stack: a real Redis, Postgres and S3 server (SeaweedFS), all from PyPI wheels.

``farm up`` runs a one-machine farm on them and the integration tests a throwaway one. Each
server runs in its own session so it outlives the Python process that started it;
``DATA/stack.json`` (mode 0600) remembers pids, ports and secrets so a later process can reuse
or stop the servers. The secrets stay there after ``down()`` because the data directories keep
them (Postgres stores its superuser password at initdb), so the next ``up()`` gets the same
ports and passwords back.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from farm.errors import LocalStackFailed
from farm.local.info import StackInfo
from farm.local.postgres_server import PostgresServer
from farm.local.procs import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    Json,
    fail,
    log_tail,
    wait_gone,
    write_private,
)
from farm.local.redis_server import RedisServer
from farm.local.s3_server import BUCKET, S3Server
from farm.local.server import Server
from farm.local.tls_front import TlsFront

log = logging.getLogger(__name__)

Service = Literal["redis", "postgres", "s3"]
SERVICES: tuple[Service, ...] = ("redis", "postgres", "s3")
SERVER_CLASSES: dict[str, type[Server]] = {
    "redis": RedisServer,
    "postgres": PostgresServer,
    "s3": S3Server,
}


class LocalStack:
    """Start, reuse and stop the three servers whose files live under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.state_path = self.data_dir / "stack.json"
        self.env_path = self.data_dir / "farm.env"
        self.timings: dict[str, float] = {}  # seconds from up() to healthy, per server
        self.reused: dict[str, int] = {}  # server -> pid, of those the last start found running

    def up(
        self, migrate: bool = True, listen: str | None = None, local_only: bool = False
    ) -> StackInfo:
        """Start (or reuse) all three servers, prepare bucket and database, write farm.env.

        ``listen``: also serve them over TLS on this address, for workers on other machines
        (``tls_front``); kept for later starts until ``local_only``. The servers themselves
        stay on 127.0.0.1."""
        start = time.monotonic()
        with self._locked():
            state = self._load() or self._fresh_state()
            if local_only or (listen and state.get("tls", {}).get("address") != listen):
                self._stop_front(state)
                state.pop("tls", None)
            if listen:
                state.setdefault("tls", {"address": listen, "ports": {}, "pid": None})
            self._ensure_running(SERVICES, state, start)
            self._ensure_front(state)
            info = self._info(state)
            if migrate:
                from farm.db.migrate import upgrade_head

                upgrade_head(info.database_url)
            self._write_env(info)
        self.timings["total"] = time.monotonic() - start
        log.info("local stack up in %.2f s (%s)", self.timings["total"], self.data_dir)
        return info

    def down(self) -> None:
        """Stop all three servers; keeps data and secrets, removes farm.env. Idempotent."""
        with self._locked():
            state = self._load()
            if state is not None:
                self._stop_front(state)
                self._stop(SERVICES, state)
                self._save(state)
            # a farm.env pointing at stopped servers would make clients think a farm is up
            self.env_path.unlink(missing_ok=True)

    def info(self) -> StackInfo | None:
        state = self._load()
        if state is None or not all(s.alive() for s in self._servers(state, SERVICES)):
            return None
        front = self._front(state)
        return None if front and not front.alive() else self._info(state)

    def is_running(self) -> bool:
        return self.info() is not None

    def addresses(self) -> StackInfo | None:
        """The stack's URLs and credentials, also while only some servers run (a GPU box may
        start Redis and Postgres alone and keep artifacts on a shared disk)."""
        state = self._load()
        return None if state is None else self._info(state)

    def pids(self) -> dict[str, int]:
        """Server -> pid of the servers running now."""
        state = self._load() or {}
        servers = self._servers(state, tuple(s for s in SERVICES if s in state))
        front = self._front(state) if all(s in state for s in SERVICES) else None
        return {s.name: s.pid() for s in [*servers, *filter(None, [front])] if s.alive()}

    def stop_service(self, name: Service) -> None:
        with self._locked():
            state = self._load()
            if state is not None:
                self._stop((name,), state)
                self._save(state)

    def start_service(self, name: Service) -> None:
        with self._locked():
            state = self._load() or self._fresh_state()
            self._ensure_running((name,), state, time.monotonic())
            self._write_env(self._info(state))

    def kill_service(self, name: Service) -> None:
        """SIGKILL the server, as a crash would (fault tests); ``start_service`` brings it
        back on the same data and ports."""
        with self._locked():
            state = self._load()
            if state is not None:
                (server,) = self._servers(state, (name,))
                pid = server.pid()
                if pid and server.alive():
                    server.kill(pid)
                    _wait_gone(server, pid, time.monotonic() + STOP_TIMEOUT)
                server.st["pid"] = None
                server.after_stop()
                self._save(state)

    def restart_service(self, name: Service) -> None:
        self.stop_service(name)
        self.start_service(name)

    # ---- state -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / ".stack.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # two `farm up` on one data dir must not race
            yield

    def _load(self) -> Json | None:
        try:
            return dict(json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            return None

    def _save(self, state: Json) -> None:
        write_private(self.state_path, json.dumps(state, indent=2))

    def _fresh_state(self) -> Json:
        if (self.data_dir / "postgres" / "PG_VERSION").exists():
            raise fail(
                f"{self.state_path} is gone but the data it has the passwords of is not;"
                f" restore it, or delete {self.data_dir} to start afresh"
            )
        taken: set[int] = set()
        return {name: cls.new_state(taken) for name, cls in SERVER_CLASSES.items()}

    def _servers(self, state: Json, names: tuple[str, ...]) -> list[Server]:
        return [SERVER_CLASSES[name](self.data_dir, state[name]) for name in names]

    def _info(self, state: Json) -> StackInfo:
        s3 = S3Server(self.data_dir, state["s3"])
        front = self._front(state)
        tls_ca = front.ca() if front else None
        tls = {"address": front.address, "ca": tls_ca} if front else None
        return StackInfo(
            data_dir=self.data_dir,
            redis_url=RedisServer(self.data_dir, state["redis"]).url(tls),
            database_url=PostgresServer(self.data_dir, state["postgres"]).url(tls),
            s3_endpoint=s3.endpoint(tls),
            s3_access_key=s3.st["access_key"],
            s3_secret_key=s3.st["secret_key"],
            s3_bucket=BUCKET,
            console_password=self._console_password(),
            tls_ca=tls_ca,
        )

    def _front(self, state: Json) -> TlsFront | None:
        """The TLS front, when the stack listens on an address (``up(listen=...)``)."""
        if "tls" not in state:
            return None
        backends = {server.name: server.main_port() for server in self._servers(state, SERVICES)}
        return TlsFront(self.data_dir, state["tls"], backends)

    def _ensure_front(self, state: Json) -> None:
        front = self._front(state)
        if front is None or (front.alive() and front.probe()):
            return
        self._stop_front(state)
        front.st["pid"] = front.launch()
        self._save(state)
        try:
            self._wait_healthy([front], time.monotonic())
        except BaseException:
            self._stop_front(state)
            self._save(state)
            raise

    def _stop_front(self, state: Json) -> None:
        _stop_all(list(filter(None, [self._front(state)])))

    def _console_password(self) -> str:
        """One password for the consoles (Flower, farm ui, metrics), made once and kept,
        like the servers' secrets, beside stack.json."""
        path = self.data_dir / "console-password"
        if not path.exists():
            write_private(path, secrets.token_urlsafe(16))
        return path.read_text().strip()

    def _write_env(self, info: StackInfo) -> None:
        write_private(self.env_path, "".join(f"{k}={v}\n" for k, v in info.env().items()))

    # ---- processes ---------------------------------------------------------------------

    def _ensure_running(self, services: tuple[Service, ...], state: Json, start: float) -> None:
        servers = self._servers(state, services)
        dead = [s for s in servers if not s.alive()]
        self.reused = {s.name: s.pid() for s in servers if s not in dead}
        try:
            # Postgres last: its initdb and pg_ctl block while the other two boot meanwhile
            for server in sorted(dead, key=lambda s: s.name == "postgres"):
                self._launch(server, state)
                self._save(state)
            self._wait_healthy(servers, start)
            for server in servers:
                server.prepare()
        except BaseException:
            self._stop(tuple(s.name for s in dead), state)  # leave nothing half-started behind
            self._save(state)
            raise
        self._save(state)

    def _launch(self, server: Server, state: Json) -> None:
        if not server.ports_free():
            log.warning("%s: its old ports are taken now, picking new ones", server.name)
            taken = {p for s in self._servers(state, SERVICES) for p in s.ports()}
            server.st["ports"] = server.new_ports(taken)
        server.st["pid"] = server.launch()
        log.info("started %s on port %d (pid %d)", server.name, server.main_port(), server.pid())

    def _wait_healthy(self, servers: list[Server], start: float) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        pending = list(servers)
        while pending:
            for server in list(pending):
                if server.probe():
                    pending.remove(server)
                    self.timings[server.name] = time.monotonic() - start
                elif not server.alive():
                    raise _not_up(server, "exited")
            if pending and time.monotonic() > deadline:
                raise _not_up(pending[0], f"did not answer within {START_TIMEOUT:.0f} s")
            if pending:
                time.sleep(0.05)

    def _stop(self, services: tuple[str, ...], state: Json) -> None:
        _stop_all(self._servers(state, services))


def _stop_all(servers: list[Server]) -> None:
    """Ask every server to stop at once, then wait; SIGKILL whatever is left after 10 s."""
    pids = {s.name: s.pid() for s in servers}
    for server in servers:
        if server.alive():
            server.request_stop(pids[server.name])
    deadline = time.monotonic() + STOP_TIMEOUT
    for server in servers:
        pid = pids[server.name]
        if pid and not _wait_gone(server, pid, deadline):
            log.warning("%s (pid %d) did not stop in time; killing it", server.name, pid)
            server.kill(pid)
            _wait_gone(server, pid, time.monotonic() + 5)
        server.st["pid"] = None
        server.after_stop()


def _wait_gone(server: Server, pid: int, deadline: float) -> bool:
    return wait_gone(pid, server.process_name, deadline)


def _not_up(server: Server, why: str) -> LocalStackFailed:
    log_path = server.log_path()
    return fail(
        f"{server.name} (port {server.main_port()}) {why}; see {log_path}:\n{log_tail(log_path)}"
    )
