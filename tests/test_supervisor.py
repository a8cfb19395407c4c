"""`farm up` / `farm down` as a user runs them: supervised workers, reuse, a full stop.

Real servers, a real supervisor and real Celery workers; HOME and XDG_DATA_HOME point into the
test's temp dir so the default data dir (and its active-data-dir record) is never the user's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from farm.local import fleet
from farm.storage.metadata import Metadata
from tests.helpers import wait_until

FARM = [sys.executable, "-m", "farm"]


def run_farm(
    args: list[str], home: Path, timeout: float = 180, check: bool = True
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(
        HOME=str(home),
        XDG_DATA_HOME=str(home / "share"),
        HF_HUB_OFFLINE="1",
        COLUMNS="250",
        NO_COLOR="1",
    )
    result = subprocess.run(
        [*FARM, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0 or not check, result.stdout + result.stderr
    return result


def _state(data: Path) -> dict:
    return json.loads((data / "workers.json").read_text())


def _worker(data: Path, role: str) -> dict:
    [worker] = [w for w in _state(data)["workers"] if w["role"] == role]
    return worker


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _beating(data: Path, name: str) -> bool:
    env = dict(line.split("=", 1) for line in (data / "farm.env").read_text().splitlines())
    return name in {w["name"] for w in Metadata(env["FARM_REDIS_URL"]).workers()}


@pytest.mark.slow
def test_up_reuses_supervises_and_down_stops_everything(tmp_path: Path) -> None:
    home, data = tmp_path / "home", tmp_path / "farm-x"
    try:
        _up_reuse_restart_adopt_down(home, data)
    finally:
        run_farm(["down", "--data-dir", str(data)], home, check=False)  # after a failure


def _up_reuse_restart_adopt_down(home: Path, data: Path) -> None:
    first = run_farm(["up", "--data-dir", str(data)], home)
    assert f"export FARM_DATA_DIR={data}" in first.stdout
    servers = {s["pid"] for s in json.loads((data / "stack.json").read_text()).values()}
    seen = {_state(data)["supervisor"]} | servers
    assert sorted(w["role"] for w in _state(data)["workers"]) == ["cpu", "gpu"]

    # plain commands, no FARM_DATA_DIR: they find the farm of `farm up --data-dir`
    second = run_farm(["up"], home)
    reused = next(line for line in second.stdout.splitlines() if "reused" in line)
    for role in ("cpu", "gpu"):
        worker = _worker(data, role)
        seen.add(worker["pid"])
        assert f"{worker['name']} (pid {worker['pid']})" in reused
    assert f"supervisor (pid {_state(data)['supervisor']})" in reused
    assert "redis (pid" in reused and "postgres (pid" in reused and "s3 (pid" in reused
    assert len(_state(data)["workers"]) == 2
    assert f"FARM_DATA_DIR={data}" in run_farm(["config"], home).stdout

    # a worker that dies is restarted by the supervisor: a new pid that heartbeats
    cpu = _worker(data, "cpu")
    os.killpg(cpu["pid"], signal.SIGKILL)
    wait_until(lambda: _worker(data, "cpu")["pid"] not in (None, cpu["pid"]), 30, "restart")
    restarted = _worker(data, "cpu")
    seen.add(restarted["pid"])
    assert restarted["restarts"] == 1 and restarted["name"] != cpu["name"]
    wait_until(lambda: _beating(data, restarted["name"]), 90, "heartbeat of the restarted worker")

    # a supervisor that crashes leaves its workers running: the next `farm up` adopts them
    os.kill(_state(data)["supervisor"], signal.SIGKILL)
    third = run_farm(["up"], home)
    assert restarted["name"] in third.stdout.split("reused", 1)[1]
    seen.add(_state(data)["supervisor"])

    down = run_farm(["down"], home)
    assert "2 worker(s) stopped" in down.stdout
    wait_until(lambda: not any(_alive(p) for p in seen), 10, "every pid gone")
    assert not (data / "workers.json").exists() and not (data / "farm.env").exists()
    assert not (home / "share" / "farm" / "active-data-dir").exists()


def _sleeper(name: str) -> subprocess.Popen:
    """A process whose command line carries a worker's name, as a celery worker's does."""
    code = "import time; time.sleep(120)"
    return subprocess.Popen([sys.executable, "-c", code, name], start_new_session=True)


def test_down_stops_orphans_an_older_farm_left_and_spares_reused_pids(tmp_path: Path) -> None:
    orphan = _sleeper("cpu-old@host")
    bystander = _sleeper("not-a-worker")
    try:
        # the format an older `farm up` wrote: a bare list, no supervisor
        records = [
            {"role": "cpu", "name": "cpu-old@host", "pid": orphan.pid, "log": ""},
            {"role": "gpu", "name": "gpu-gone@host", "pid": bystander.pid, "log": ""},
        ]
        (tmp_path / "workers.json").write_text(json.dumps(records))
        assert fleet.stop(tmp_path, timeout=5) == 1
        assert orphan.wait(10) == -signal.SIGTERM
        time.sleep(0.2)
        assert bystander.poll() is None  # its pid was recorded, but it is another process
        assert not (tmp_path / "workers.json").exists()
    finally:
        for proc in (orphan, bystander):
            proc.kill()
            proc.wait()


def test_quick_crashes_back_off_to_30_s_and_are_called_a_crash_loop(tmp_path: Path) -> None:
    from farm.local.supervisor import Slot, Supervisor

    supervisor, slot = Supervisor(tmp_path, ["cpu"]), Slot("cpu", "cpu-x@host", pid=1)
    delays, now = [], 1000.0
    for _ in range(7):
        slot.pid, slot.started = 1, now
        supervisor._crashed(slot, now + 2)
        delays.append(slot.restart_at - (now + 2))
        now = slot.restart_at
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert slot.crash_looping(now) and slot.record(now)["crash_looping"]
    slot.pid, slot.started = 1, now
    supervisor._crashed(slot, now + 120)  # it ran two minutes: backoff starts afresh
    assert slot.restart_at - (now + 120) == 1
    assert not slot.crash_looping(now + 1000)  # quiet for a while: no longer a crash loop
