"""The background workers of ``farm up``: start, find and stop their supervisor.

One supervisor per data dir (``farm.local.supervisor``) owns the workers; ``DATA/workers.json``
is its state. ``farm up`` reuses a live supervisor; ``farm down`` stops it (it warm-stops its
workers) and then any recorded worker still running (orphans of a crashed supervisor, or of an
older farm that started workers without one).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.errors import WorkerFailed
from farm.local.procs import child_running, kill_group, log_tail, running_with, spawn, wait_until
from farm.local.supervisor import MODULE, STATE_FILE, STOP_TIMEOUT, live_workers, read_state
from farm.local.workers import ROLES

START_TIMEOUT = 30.0  # for the supervisor to start its first workers and say so


@dataclass(frozen=True)
class Fleet:
    """The supervisor of a data dir and its workers, as ``farm up`` left them."""

    supervisor: int
    reused: bool  # the supervisor was running already
    workers: list[dict[str, Any]]
    log_path: Path


def supervisor_log(data_dir: Path) -> Path:
    return data_dir / "logs" / "supervisor.log"


def supervisor_pid(data_dir: Path) -> int | None:
    """The live supervisor of ``data_dir`` (checked by its command line: pids get reused)."""
    pid = read_state(data_dir / STATE_FILE)["supervisor"]
    return pid if running_with(pid, MODULE, str(data_dir)) else None


def ensure(data_dir: Path, env: dict[str, str], roles: tuple[str, ...] = ROLES) -> Fleet:
    """Reuse the running supervisor of ``data_dir`` or start one for ``roles``."""
    with open(data_dir / ".fleet.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `farm up` must not start two supervisors
        pid = supervisor_pid(data_dir)
        if pid is None:
            return _start(data_dir, env, roles)
        workers = read_state(data_dir / STATE_FILE)["workers"]
        return Fleet(pid, True, workers, supervisor_log(data_dir))


def _start(data_dir: Path, env: dict[str, str], roles: tuple[str, ...]) -> Fleet:
    log_path = supervisor_log(data_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", MODULE, str(data_dir), *roles]
    pid = spawn(args, Path.cwd(), log_path, {**os.environ, **env, "PYTHONUNBUFFERED": "1"})

    def started() -> bool:
        state = read_state(data_dir / STATE_FILE)
        workers = {w["role"] for w in state["workers"] if w.get("pid")}
        return state["supervisor"] == pid and workers >= set(roles)

    ok = wait_until(lambda: started() or not child_running(pid), time.monotonic() + START_TIMEOUT)
    if not (ok and started()):
        kill_group(pid, signal.SIGKILL)
        _stop_orphans(live_workers(read_state(data_dir / STATE_FILE)), 5)
        raise WorkerFailed(
            f"the worker supervisor did not start; see {log_path}:\n{log_tail(log_path)}"
        )
    return Fleet(pid, False, read_state(data_dir / STATE_FILE)["workers"], log_path)


def stop(data_dir: Path, timeout: float = STOP_TIMEOUT) -> int:
    """Stop the supervisor and every recorded worker still running; returns how many workers
    were running."""
    path = data_dir / STATE_FILE
    workers = live_workers(read_state(path))
    pid = supervisor_pid(data_dir)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # it warm-stops its workers, then exits
        if not wait_until(lambda: not running_with(pid, MODULE), time.monotonic() + timeout + 10):
            kill_group(pid, signal.SIGKILL)
    _stop_orphans(live_workers({"workers": workers}), timeout)
    path.unlink(missing_ok=True)
    return len(workers)


def _stop_orphans(workers: list[dict[str, Any]], timeout: float) -> None:
    for worker in workers:
        kill_group(worker["pid"], signal.SIGTERM)
    wait_until(lambda: not live_workers({"workers": workers}), time.monotonic() + timeout, 0.2)
    for worker in live_workers({"workers": workers}):
        kill_group(worker["pid"], signal.SIGKILL)
