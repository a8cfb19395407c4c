"""Start worker processes in the background (``farm up``, ``farm render``, the test suite).

Each worker is the same ``celery -A farm.tasks worker`` a production node runs; the role's
settings come from ``worker_configs/ROLE.py`` through FARM_WORKER_ROLE.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from farm.errors import FarmError
from farm.storage.metadata import Metadata

ROLES = ("cpu", "gpu")


@dataclass
class WorkerProcess:
    """A worker subprocess and where its log goes."""

    role: str
    name: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the whole worker (pool children too): what a crash looks like."""
        _signal_group(self.process, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown; SIGKILL if it does not finish in time."""
        if self.process.poll() is not None:
            return
        _signal_group(self.process, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def worker_command(name: str, loglevel: str = "INFO") -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "farm.tasks",
        "worker",
        "-n",
        name,
        "--loglevel",
        loglevel,
        "-E",
    ]


def start_worker(role: str, env: dict[str, str], log_dir: Path) -> WorkerProcess:
    """Start one worker of ``role`` with the farm settings in ``env``."""
    if role not in ROLES:
        raise FarmError(f"unknown worker role {role!r}; choose cpu or gpu", code="CONFIG_INVALID")
    name = f"{role}-{uuid.uuid4().hex[:6]}@{os.uname().nodename}"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"worker-{name.split('@')[0]}.log"
    full_env = {**os.environ, **env, "FARM_WORKER_ROLE": role, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            worker_command(name),
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return WorkerProcess(role, name, process, log_path)


def wait_ready(meta: Metadata, workers: list[WorkerProcess], timeout: float = 90) -> None:
    """Block until every worker publishes its heartbeat (model warmed for GPU workers)."""
    deadline = time.monotonic() + timeout
    pending = {w.name: w for w in workers}
    while pending:
        beating = {w["name"] for w in meta.workers()}
        for name in list(pending):
            if name in beating:
                del pending[name]
            elif pending[name].process.poll() is not None:
                raise FarmError(
                    f"worker {name} exited; see {pending[name].log_path}", code="WORKER_FAILED"
                )
        if pending and time.monotonic() > deadline:
            logs = ", ".join(str(w.log_path) for w in pending.values())
            raise FarmError(
                f"workers not ready after {timeout} s; see {logs}", code="WORKER_FAILED"
            )
        time.sleep(0.2)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    _kill_group(process.pid, sig)


# -- background workers of `farm up` ------------------------------------------------------------

STATE_FILE = "workers.json"


def start_background(data_dir: Path, env: dict[str, str], roles=ROLES) -> list[WorkerProcess]:
    """Start one worker per role, detached, and remember them in DATA/workers.json."""
    started = [start_worker(role, env, data_dir / "logs") for role in roles]
    state = [
        {"role": w.role, "name": w.name, "pid": w.pid, "log": str(w.log_path)} for w in started
    ]
    (data_dir / STATE_FILE).write_text(json.dumps(state))
    return started


def background_workers(data_dir: Path) -> list[dict]:
    """The workers `farm up` started that are still alive."""
    path = data_dir / STATE_FILE
    if not path.is_file():
        return []
    return [w for w in json.loads(path.read_text()) if _alive(w["pid"])]


def stop_background(data_dir: Path, timeout: float = 20) -> int:
    """Warm-stop the workers `farm up` started (SIGKILL after ``timeout``); returns how many."""
    alive = background_workers(data_dir)
    for worker in alive:
        _kill_group(worker["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(w["pid"]) for w in alive) and time.monotonic() < deadline:
        time.sleep(0.2)
    for worker in alive:
        _kill_group(worker["pid"], signal.SIGKILL)
    (data_dir / STATE_FILE).unlink(missing_ok=True)
    return len(alive)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return True


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
