"""The farm on simulated hosts (``netns.Hosts``): its servers on ``control`` behind TLS, workers
on the other hosts, a client that submits. The tests in this folder and
``benchmarks/cluster.py`` use it.

Everything runs as it would on separate machines: ``farm up --no-workers --listen ADDRESS`` on
the control host (servers on its own loopback, TLS on its 198.18 address), ``celery -A
farm.tasks worker`` on each worker host with the ``farm.env`` that wrote, and the client's
commands (``farm ...`` and ``tests.multihost.probe``) on the client host. This process, in the
root namespace, reaches none of them: it only starts processes inside the hosts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from farm.local.workers import worker_command
from tests.multihost.netns import Hosts

HOSTS = ("control", "gpu1", "gpu2", "cpu", "client")
FARM = [sys.executable, "-m", "farm"]
# Short liveness windows, as in the one-host fault tests: crash recovery in seconds.
KNOBS = {"FARM_LEASE_TTL": "4", "FARM_RECONCILE_INTERVAL": "2", "FARM_MAX_DELIVERIES": "3"}


class Cluster:
    """The farm across ``hosts``; ``root``: a folder for each host's data dir and the logs."""

    def __init__(self, hosts: Hosts, root: Path, knobs: dict[str, str] | None = None) -> None:
        self.hosts = hosts
        self.root = root
        self.knobs = KNOBS if knobs is None else knobs
        self.env: dict[str, str] = {}
        self.workers: dict[str, subprocess.Popen] = {}  # worker name -> its process

    # ---- servers -----------------------------------------------------------------------

    def start_servers(self) -> dict[str, str]:
        """``farm up`` on the control host; returns the FARM_* settings it wrote."""
        data = self.root / "control"
        args = [*FARM, "up", "--no-workers", "--data-dir", str(data)]
        done = self.hosts.run(
            "control",
            [*args, "--listen", self.hosts.address("control")],
            self._base_env(data),
            timeout=180,
        )
        if done.returncode != 0:
            raise RuntimeError(f"farm up on control failed:\n{done.stdout}\n{done.stderr}")
        self.env = read_env(data / "farm.env") | self.knobs
        return self.env

    def stop_servers(self) -> None:
        data = self.root / "control"
        self.hosts.run(
            "control", [*FARM, "down", "--data-dir", str(data)], self._base_env(data), timeout=120
        )

    # ---- workers -----------------------------------------------------------------------

    def start_worker(
        self, host: str, role: str, queues: Sequence[str] = (), extra: dict[str, str] | None = None
    ) -> str:
        """One worker of ``role`` on ``host``, named ``ROLE-HOST@HOST``; returns the name."""
        name = f"{role}-{host}@{host}"
        env = {
            **self.host_env(host),
            "FARM_WORKER_ROLE": role,
            "PYTHONUNBUFFERED": "1",
            **(extra or {}),
        }
        log = self.root / "logs" / f"{host}-{role}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.workers[name] = self.hosts.spawn(host, worker_command(name, queues=queues), env, log)
        return name

    def wait_ready(self, names: Sequence[str], timeout: float = 120) -> None:
        """Until every named worker beats (read from the client host)."""
        deadline = time.monotonic() + timeout
        while True:
            beating = set(self.probe("workers"))
            if set(names) <= beating:
                return
            for name in names:
                if self.workers[name].poll() is not None:
                    raise RuntimeError(f"worker {name} exited; see {self.root / 'logs'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(set(names) - beating)} not ready")
            time.sleep(0.5)

    # ---- the client --------------------------------------------------------------------

    def farm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A ``farm`` command on the client host."""
        return self.hosts.run("client", [*FARM, *args], self.host_env("client"), timeout=timeout)

    def probe(self, command: str, *args: str, timeout: float = 600) -> object:
        """``tests.multihost.probe COMMAND ARGS`` on the client host; its JSON answer."""
        argv = [sys.executable, "-m", "tests.multihost.probe", command, *args]
        done = self.hosts.run("client", argv, self.host_env("client"), timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"probe {command} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout)

    # ---- environments ------------------------------------------------------------------

    def host_env(self, host: str) -> dict[str, str]:
        """A host's environment: the farm's settings, its own data dir (model, logs)."""
        data = self.root / host
        return {**self._base_env(data), **self.env, "FARM_DATA_DIR": str(data)}

    def _base_env(self, data: Path) -> dict[str, str]:
        data.mkdir(parents=True, exist_ok=True)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
        # the checkout first: the probe module lives in tests/, not in the installed farm
        path = os.pathsep.join(filter(None, [str(Path.cwd()), clean.get("PYTHONPATH")]))
        return {**clean, "FARM_DATA_DIR": str(data), "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def read_env(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines, as ``farm up`` writes them (values hold ``&``: no shell here)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs}
