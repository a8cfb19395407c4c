"""Start worker processes (``farm render``'s embedded farm, the supervisor, the test suite).

Each worker is the same ``celery -A farm.tasks worker`` a production node runs; the role's
settings come from ``worker_configs/ROLE.py`` through FARM_WORKER_ROLE.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from farm.errors import ConfigError, WorkerFailed
from farm.local.procs import kill_group
from farm.storage.metadata import Metadata
from farm.tasks.app import WORKER_ROLES

ROLES = WORKER_ROLES
# A one-machine farm (farm render's embedded one, farm up's) has no node of its own for the
# queues pipelines add for CPU nodes, so its cpu worker serves them too (narrated's speech).
ONE_MACHINE_QUEUES = {"cpu": ("cpu", "audio"), "gpu": ()}


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
        kill_group(self.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown; SIGKILL if it does not finish in time."""
        if self.process.poll() is not None:
            return
        kill_group(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def worker_command(name: str, loglevel: str = "INFO", queues: Sequence[str] = ()) -> list[str]:
    """``queues``: what it consumes instead of its role's own queue (``-Q``)."""
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
        *(["-Q", ",".join(queues)] if queues else []),
    ]


def start_worker(
    role: str, env: dict[str, str], log_dir: Path, queues: Sequence[str] = ()
) -> WorkerProcess:
    """Start one worker of ``role`` with the farm settings in ``env``, consuming ``queues``
    (default: the role's own)."""
    if role not in ROLES:
        raise ConfigError(f"unknown worker role {role!r}; choose cpu or gpu")
    name = f"{role}-{uuid.uuid4().hex[:6]}@{os.uname().nodename}"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"worker-{name.split('@')[0]}.log"
    full_env = {**os.environ, **env, "FARM_WORKER_ROLE": role, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            worker_command(name, queues=queues),
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
                raise WorkerFailed(f"worker {name} exited; see {pending[name].log_path}")
        if pending and time.monotonic() > deadline:
            logs = ", ".join(str(w.log_path) for w in pending.values())
            raise WorkerFailed(f"workers not ready after {timeout} s; see {logs}")
        time.sleep(0.2)
