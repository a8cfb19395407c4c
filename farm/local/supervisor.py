"""The supervisor ``farm up`` leaves running: it keeps one worker per role alive.

``python -m farm.local.supervisor DATA_DIR ROLE...`` runs in its own session (started by
``farm.local.fleet``), takes the farm settings from its environment, runs the workers as its
children and restarts one that exits (backoff doubling from 1 s to 30 s). Its state goes to
``DATA/workers.json`` atomically after every change. SIGTERM warm-stops the workers (SIGKILL
after a timeout) and ends it. Live workers of an earlier, crashed supervisor (or an older farm
that left them unsupervised) are adopted rather than doubled.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.errors import FarmError
from farm.local.procs import kill_group, running_with, wait_until, write_private
from farm.local.workers import ONE_MACHINE_QUEUES, ROLES, WorkerProcess, start_worker

log = logging.getLogger("farm.supervisor")

STATE_FILE = "workers.json"
LOCK_FILE = ".supervisor.lock"
MODULE = "farm.local.supervisor"
BACKOFF_START, BACKOFF_MAX = 1.0, 30.0  # seconds before a restart, doubling per quick crash
STEADY_AFTER = 60.0  # a worker that ran this long before it died starts its backoff afresh
LOOP_CRASHES, LOOP_WINDOW = 5, 300.0  # this many crashes in this many seconds: a crash loop
STOP_TIMEOUT = 20.0  # warm shutdown of a worker (its running task finishes) before SIGKILL
POLL = 0.2


@dataclass
class Slot:
    """One role's worker: the process now running (if any) and its crash history."""

    role: str
    name: str = ""
    pid: int | None = None
    log_path: str = ""
    process: WorkerProcess | None = None  # None for an adopted worker: not our child
    adopted: bool = False
    restarts: int = 0
    quick_crashes: int = 0  # crashes in a row, each soon after its start: sets the backoff
    crashes: list[float] = field(default_factory=list)  # monotonic times, within LOOP_WINDOW
    started: float = 0.0
    restart_at: float = 0.0

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.process.poll() is None
        return running_with(self.pid, self.name)

    def crash_looping(self, now: float) -> bool:
        return sum(now - t < LOOP_WINDOW for t in self.crashes) >= LOOP_CRASHES

    def record(self, now: float) -> dict[str, Any]:
        return {
            "role": self.role,
            "name": self.name,
            "pid": self.pid,
            "log": self.log_path,
            "restarts": self.restarts,
            "adopted": self.adopted,
            "crash_looping": self.crash_looping(now),
        }


class Supervisor:
    """Keeps one worker per role running for the farm in ``data_dir``."""

    def __init__(self, data_dir: Path, roles: list[str]) -> None:
        self.data_dir = data_dir
        self.roles = roles
        self.state_path = data_dir / STATE_FILE
        self.slots: list[Slot] = []
        self.stopping = False
        self.saved: list[dict[str, Any]] | None = None  # what workers.json holds now

    def run(self) -> int:
        with open(self.data_dir / LOCK_FILE, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.error("another supervisor runs for %s; exiting", self.data_dir)
                return 1
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            try:
                self._begin()
                while not self.stopping:
                    self._tick(time.monotonic())
                    time.sleep(POLL)
            finally:
                self._stop_all()
        return 0

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("got %s: stopping the workers", signal.Signals(signum).name)
        self.stopping = True

    def _begin(self) -> None:
        log.info("supervisor pid %d for %s, roles %s", os.getpid(), self.data_dir, self.roles)
        self.slots = [s for s in adoptable(self.state_path) if s.role in self.roles]
        for slot in self.slots:
            log.info("adopted %s worker %s (pid %s)", slot.role, slot.name, slot.pid)
        have = {s.role for s in self.slots}
        self.slots += [Slot(role) for role in self.roles if role not in have]
        for slot in self.slots:
            if slot.pid is None:
                self._start(slot, time.monotonic())
        self._save()

    def _tick(self, now: float) -> None:
        for slot in self.slots:
            if slot.pid is not None and not slot.alive():
                self._crashed(slot, now)
            elif slot.pid is None and now >= slot.restart_at:
                slot.restarts += 1
                self._start(slot, now)
        self._save()  # when something changed: a crash loop also ends by time passing

    def _start(self, slot: Slot, now: float) -> None:
        try:
            queues = ONE_MACHINE_QUEUES[slot.role]
            worker = start_worker(slot.role, {}, self.data_dir / "logs", queues)
        except (OSError, FarmError) as exc:  # could not even start it: a crash like any other
            log.error("could not start a %s worker: %s", slot.role, exc)
            slot.started = now
            self._crashed(slot, now)
            return
        slot.process, slot.adopted, slot.started = worker, False, now
        slot.name, slot.pid, slot.log_path = worker.name, worker.pid, str(worker.log_path)
        log.info("started %s worker %s (pid %d)", slot.role, slot.name, slot.pid)

    def _crashed(self, slot: Slot, now: float) -> None:
        how = f"exited with {slot.process.process.returncode}" if slot.process else "exited"
        slot.quick_crashes = 1 if now - slot.started >= STEADY_AFTER else slot.quick_crashes + 1
        slot.crashes = [t for t in slot.crashes if now - t < LOOP_WINDOW] + [now]
        delay = min(BACKOFF_MAX, BACKOFF_START * 2 ** (slot.quick_crashes - 1))
        log.warning(
            "%s worker %s (pid %s) %s; restarting in %.0f s (see %s)",
            *(slot.role, slot.name, slot.pid, how, delay, slot.log_path),
        )
        if slot.crash_looping(now):
            log.error(
                "%s worker crash-looping: %d crashes in %.0f s; still retrying, see %s",
                *(slot.role, len(slot.crashes), LOOP_WINDOW, slot.log_path),
            )
        slot.pid, slot.process, slot.restart_at = None, None, now + delay

    def _stop_all(self) -> None:
        live = [s for s in self.slots if s.pid is not None and s.alive()]
        for slot in live:
            kill_group(slot.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        wait_until(lambda: not any(s.alive() for s in live), deadline, POLL)
        for slot in live:
            if slot.alive():
                log.warning("%s worker %s did not stop in time; killing it", slot.role, slot.name)
                kill_group(slot.pid, signal.SIGKILL)
        self.state_path.unlink(missing_ok=True)
        log.info("supervisor stopped %d worker(s)", len(live))

    def _save(self) -> None:
        records = [s.record(time.monotonic()) for s in self.slots]
        if records != self.saved:
            state = {"supervisor": os.getpid(), "workers": records}
            write_private(self.state_path, json.dumps(state, indent=2))
            self.saved = records


def read_state(path: Path) -> dict[str, Any]:
    """``workers.json`` as ``{"supervisor": pid or None, "workers": [...]}``; an older farm
    wrote a bare list of workers it did not supervise."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {"supervisor": None, "workers": []}
    if isinstance(data, list):
        return {"supervisor": None, "workers": data}
    return {"supervisor": data.get("supervisor"), "workers": data.get("workers", [])}


def live_workers(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The recorded workers still running (a pid reused by another process does not count)."""
    return [w for w in state["workers"] if running_with(w.get("pid"), w.get("name", "?"))]


def adoptable(path: Path) -> list[Slot]:
    """The workers recorded in ``path`` that still run: supervised from now on."""
    return [
        Slot(
            w["role"],
            w["name"],
            w["pid"],
            w.get("log", ""),
            adopted=True,
            restarts=int(w.get("restarts", 0)),
            started=time.monotonic(),
        )
        for w in live_workers(read_state(path))
    ]


def main(argv: list[str]) -> int:
    data_dir, roles = Path(argv[0]).resolve(), argv[1:] or list(ROLES)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return Supervisor(data_dir, roles).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
