"""Session fixtures: the real local stack (Redis, Postgres, S3) and real worker processes.

The servers start once per test session through the same launcher as ``farm up``; workers are
``celery -A farm.tasks worker`` subprocesses, exactly what a production node runs. The farm
they make uses the stack's Redis as its broker; tests parametrized over the brokers
(tests/brokers.py) also run on a second farm on the same servers with RabbitMQ as its broker,
and skip there, in one line, where RabbitMQ is absent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from farm.config import Settings
from farm.local import LocalStack, StackInfo
from farm.local.workers import WorkerProcess, start_worker, wait_ready
from farm.storage.metadata import Metadata
from tests import brokers

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
    return brokers.settings_of(farm_env)


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


@dataclass
class Site:
    """One farm the tests drive: the environment its processes get, its settings, its Redis
    metadata, its worker processes and a client."""

    env: dict[str, str]
    settings: Settings
    meta: Metadata
    workers: Workers
    farm: object  # farm.Farm, imported late (it loads the whole farm)


@contextmanager
def site_of(env: dict[str, str], log_dir: Path) -> Iterator[Site]:
    from farm import Farm

    settings = brokers.settings_of(env)
    meta = Metadata(settings.redis_url.get_secret_value())
    pool = Workers(env, meta, log_dir)
    try:
        yield Site(env, settings, meta, pool, Farm(settings))
    finally:
        pool.stop_all()


@pytest.fixture(scope="session")
def redis_site(farm_env, tmp_path_factory) -> Iterator[Site]:
    """The session's farm, the stack's Redis its broker."""
    with site_of(farm_env, tmp_path_factory.mktemp("logs")) as site:
        yield site


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """RabbitMQ for the tests (FARM_TEST_RABBITMQ_URL, else guest on 127.0.0.1:5672)."""
    url = os.environ.get("FARM_TEST_RABBITMQ_URL", brokers.DEFAULT_URL)
    if reason := brokers.absent(url):
        pytest.skip(reason)
    return url


@pytest.fixture
def rabbitmq(rabbitmq_url: str) -> Iterator[str]:
    """A broker URL on a vhost of this test's own (tests/brokers.py)."""
    with brokers.vhost_of_its_own(rabbitmq_url) as url:
        yield url


@pytest.fixture(scope="session")
def amqp_site(farm_env, rabbitmq_url, tmp_path_factory) -> Iterator[Site]:
    """A second farm on the session's servers, RabbitMQ its broker (tests/brokers.py)."""
    with brokers.vhost_of_its_own(rabbitmq_url) as url:
        env = brokers.separate_farm(farm_env, url, "farm-amqp")
        with site_of(env, tmp_path_factory.mktemp("amqp-logs")) as site:
            yield site


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> str:
    """This test's broker: Redis, unless it is parametrized with brokers.on_each_broker."""
    return getattr(request, "param", "redis")


@pytest.fixture
def site(broker: str, tiny_model, settings, request) -> Iterator[Site]:
    """This test's farm on its broker. The Celery app is one per process: it sends to this
    farm's broker during the test, and to the session's Redis again afterwards."""
    from farm.tasks.app import configure

    chosen = request.getfixturevalue(f"{broker}_site")
    configure(chosen.settings)
    try:
        yield chosen
    finally:
        configure(settings)


@pytest.fixture(scope="session")
def meta(redis_site: Site) -> Metadata:
    return redis_site.meta


@pytest.fixture(scope="session")
def workers(redis_site: Site, tiny_model) -> Workers:
    return redis_site.workers


@pytest.fixture
def running(workers: Workers) -> Workers:
    """One live cpu and one live gpu worker for this test."""
    workers.ensure("cpu", "gpu")
    return workers


@pytest.fixture(scope="session")
def farm(redis_site: Site):
    return redis_site.farm
