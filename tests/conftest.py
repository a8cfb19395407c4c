"""Session fixtures: the real local stack (Redis, Postgres, S3) and real worker processes.

The servers start once per test session through the same launcher as ``farm up``; workers are
``celery -A farm.tasks worker`` subprocesses, exactly what a production node runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from farm.config import Settings
from farm.local import LocalStack, StackInfo
from farm.local.workers import WorkerProcess, start_worker, wait_ready
from farm.storage.metadata import Metadata

# Short liveness windows so crash recovery happens in seconds, not a minute.
TEST_KNOBS = {"FARM_LEASE_TTL": "4", "FARM_RECONCILE_INTERVAL": "2", "FARM_MAX_DELIVERIES": "3"}


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The servers themselves, for tests that stop and restart them."""
    local = LocalStack(tmp_path_factory.mktemp("stack"))
    local.up()
    try:
        yield local
    finally:
        local.down()


@pytest.fixture(scope="session")
def stack(local_stack: LocalStack) -> StackInfo:
    return local_stack.info()


@pytest.fixture(scope="session")
def farm_env(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The FARM_* environment every worker and CLI subprocess of the session gets."""
    data_dir = tmp_path_factory.mktemp("data")
    return {
        **stack.env(),
        **TEST_KNOBS,
        "FARM_DATA_DIR": str(data_dir),
        "FARM_FAULT_INJECTION": "1",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="session")
def settings(farm_env: dict[str, str]) -> Settings:
    values = {
        k.removeprefix("FARM_").lower(): v
        for k, v in farm_env.items()
        if k.startswith("FARM_") and k != "FARM_FAULT_INJECTION"
    }
    return Settings(**values)


@pytest.fixture(scope="session")
def meta(settings: Settings) -> Metadata:
    return Metadata(settings.redis_url.get_secret_value())


@pytest.fixture(scope="session")
def tiny_model(settings: Settings) -> Path:
    """Build the tiny model once, before any worker races to."""
    from farm.models import ensure_tiny_model

    return ensure_tiny_model(settings.data_dir)


class Workers:
    """The session's worker processes; tests may kill and replace them."""

    def __init__(self, env: dict[str, str], meta: Metadata, log_dir: Path) -> None:
        self.env, self.meta, self.log_dir = env, meta, log_dir
        self.running: list[WorkerProcess] = []

    def start(self, role: str, **env: str) -> WorkerProcess:
        worker = start_worker(role, {**self.env, **env}, self.log_dir)
        self.running.append(worker)
        wait_ready(self.meta, [worker])
        return worker

    def of(self, role: str) -> list[WorkerProcess]:
        return [w for w in self.running if w.role == role and w.process.poll() is None]

    def ensure(self, *roles: str) -> None:
        for role in roles:
            if not self.of(role):
                self.start(role)

    def replace_all(self, role: str, count: int = 1, **env: str) -> list[WorkerProcess]:
        """Kill every worker of ``role`` and start ``count`` new ones with ``env`` added."""
        for worker in self.of(role):
            self.kill(worker)
        return [self.start(role, **env) for _ in range(count)]

    def kill(self, worker: WorkerProcess) -> None:
        worker.kill()
        self.running.remove(worker)
        self.meta.forget_worker(worker.name)

    def stop_all(self) -> None:
        for worker in self.running:
            worker.stop()
        self.running.clear()


@pytest.fixture(scope="session")
def workers(farm_env, meta, tiny_model, tmp_path_factory) -> Iterator[Workers]:
    pool = Workers(farm_env, meta, tmp_path_factory.mktemp("logs"))
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture
def running(workers: Workers) -> Workers:
    """One live cpu and one live gpu worker for this test."""
    workers.ensure("cpu", "gpu")
    return workers


@pytest.fixture(scope="session")
def farm(settings: Settings):
    from farm import Farm

    return Farm(settings)
