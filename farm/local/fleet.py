"""The background workers of ``farm up``, remembered in DATA/workers.json."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from farm.local.procs import kill_group
from farm.local.workers import ROLES, WorkerProcess, start_worker

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
        kill_group(worker["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(w["pid"]) for w in alive) and time.monotonic() < deadline:
        time.sleep(0.2)
    for worker in alive:
        kill_group(worker["pid"], signal.SIGKILL)
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
