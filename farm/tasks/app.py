"""The Celery app: JSON only, late acks, one message in flight per worker process.

Importing this module configures nothing. ``Farm`` configures the app from its ``Settings``
(``configure``); ``celery -A farm.tasks worker`` gets its settings from the environment the
first time Celery reads its configuration (``_worker_defaults``), and each worker role adds its
own (``worker_configs/ROLE.py``, chosen by FARM_WORKER_ROLE). Stage state lives in Postgres,
so Celery keeps no results. What differs between the brokers (Redis, RabbitMQ) is set here
and nowhere else: ``redis_config``, ``amqp_config``, ``celery_priority``.
"""

from __future__ import annotations

import os
import ssl
import sys
from importlib import import_module
from urllib.parse import urlsplit

from amqp.exceptions import AMQPError
from celery import Celery, signals
from kombu import Exchange, Queue
from kombu.exceptions import KombuError

from farm.config import Settings
from farm.errors import ConfigError
from farm.metrics import multiproc
from farm.pipelines import QUEUES
from farm.tasks import rabbitmq
from farm.urls import AMQP_SCHEMES

TASK_FOR_QUEUE = {"cpu": "farm.cpu.run_stage", "gpu": "farm.gpu.run_stage"}
# The stages of any other queue a pipeline names (audio, ...): the queue travels as the
# message's routing key, so one task serves them all.
ANY_QUEUE_TASK = "farm.run_stage"
WORKER_ROLES = ("cpu", "gpu")  # each has a settings module worker_configs/ROLE.py
# Redis lists one queue per priority step; kombu pops step 0 first.
PRIORITY_STEPS = list(range(10))
# RabbitMQ: the x-max-priority of every queue the farm declares; a message of a higher
# priority is delivered first (farm priorities 0..9 map onto 0..9 unchanged).
MAX_PRIORITY = 10


def make_queue(name: str) -> Queue:
    """A queue with its own direct exchange, so a message for one queue never lands in another."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


app = Celery("farm", include=["farm.tasks.stage_tasks", "farm.tasks.ping", "farm.tasks.worker"])


def transport_of(broker_url: str) -> str:
    """``amqp`` for RabbitMQ, else ``redis``: the two brokers farm.urls accepts."""
    return "amqp" if urlsplit(broker_url).scheme in AMQP_SCHEMES else "redis"


def celery_config(settings: Settings) -> dict:
    """Everything the farm needs from Celery, for clients and workers alike."""
    url = settings.broker_url.get_secret_value()
    broker = amqp_config() if transport_of(url) == "amqp" else redis_config(settings)
    return {
        "broker_url": url,
        **broker,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_queues": [make_queue(name) for name in QUEUES],
        "task_default_queue": "cpu",
        "task_default_exchange": "cpu",
        "task_default_routing_key": "cpu",
        "task_routes": {"farm.cpu.*": {"queue": "cpu"}, "farm.gpu.*": {"queue": "gpu"}},
        "worker_send_task_events": True,
        "worker_hijack_root_logger": False,
        "broker_pool_limit": 10,
    }


def redis_config(settings: Settings) -> dict:
    """Redis: an unacked message comes back after the visibility timeout; priorities are
    one list per step."""
    vt = settings.visibility_timeout
    transport = {
        "visibility_timeout": vt,
        "queue_order_strategy": "priority",
        "priority_steps": PRIORITY_STEPS,
        # kombu sweeps for unacked messages past the timeout every interval x throttle
        # seconds (100 s by default); keep the sweep well inside a short timeout too.
        "unacked_restore_interval": max(1, min(10, vt // 10)),
        "unacked_restore_throttle": 1 if vt < 600 else 10,
    }
    return {
        "broker_transport_options": transport,
        "visibility_timeout": vt,
        "task_queue_max_priority": None,  # priorities are lists, not a queue argument
        **_verified_tls(settings.broker_url.get_secret_value()),
    }


def _verified_tls(url: str) -> dict:
    """A rediss:// broker URL that says nothing of certificates is verified against the
    system's CAs, as redis-py does: kombu alone would skip the check, with a warning."""
    if urlsplit(url).scheme != "rediss" or "ssl_cert_reqs" in urlsplit(url).query:
        return {}
    return {"broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_REQUIRED}}


def amqp_config() -> dict:
    """RabbitMQ: classic durable queues with x-max-priority (Celery adds it to every queue
    it declares, a worker's -Q ones included), persistent messages, confirmed publishes.

    Not quorum queues: they take no x-max-priority on RabbitMQ 3.x and know two priorities
    on 4.x, where the farm has ten. An unacked message comes back when its consumer's
    connection closes, so the visibility timeout means nothing here; its counterpart is the
    server's consumer_timeout (README, "RabbitMQ")."""
    return {
        "task_queue_max_priority": MAX_PRIORITY,
        # a send returns once RabbitMQ has the message, as an LPUSH does on Redis
        "broker_transport_options": {"confirm_publish": True},
    }


def signing_config(settings: Settings) -> dict:
    """Celery's ``auth`` serializer: every message signed with our key, JSON inside; a
    message without a valid signature from a trusted certificate is refused."""
    return {
        "task_serializer": "auth",
        "accept_content": ["auth"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "security_key": str(settings.signing_key),
        "security_certificate": str(settings.signing_cert),
        "security_cert_store": f"{settings.signing_cert_store}/*",
        "security_digest": "sha256",
        "security_key_password": None,
    }


def role_config(role: str) -> dict:
    """A worker role's own Celery settings (worker_configs/ROLE.py)."""
    if role not in WORKER_ROLES:
        choices = " or ".join(WORKER_ROLES)
        raise ConfigError(f"FARM_WORKER_ROLE must be {choices}, not {role[:40]!r}.")
    return import_module(f"worker_configs.{role}").CELERY


def farm_config(settings: Settings, role: str | None = None) -> dict:
    conf = celery_config(settings)
    if settings.signing:
        conf.update(signing_config(settings))
    if role:
        conf.update(role_config(role))
    if role == "gpu":  # one thread per job the engine may batch (worker_configs/gpu.py)
        conf["worker_concurrency"] = settings.gpu_batch
    return conf


def configure(settings: Settings, role: str | None = None) -> Celery:
    """Point the app at this farm; a worker role's module (worker_configs/ROLE.py) adds to it."""
    conf = farm_config(settings, role)
    if app.conf.broker_url and app.conf.broker_url != conf["broker_url"]:
        _forget_connections()
    app.conf.update(conf)
    if settings.signing:
        _setup_signing()
    return app


def _setup_signing() -> None:
    # Events stay JSON (Flower reads them); task messages are accepted only signed.
    app.setup_security(allowed_serializers=["json"], serializer="json", digest="sha256")


def _forget_connections() -> None:
    """The app caches its broker pools and, in its AMQP helper, the queue declarations it
    made from the old settings (RabbitMQ's x-max-priority among them): pointing it at another
    broker must drop both, or sends keep going to the old one, declared the old way. The pools
    themselves live on in kombu's registry, keyed by broker, and are handed back if the app is
    pointed at that broker again, so they must not be closed here."""
    app._pool = None
    app.__dict__.pop("amqp", None)  # a cached property: rebuilt from the new settings


def task_for(queue: str) -> str:
    """The task name a stage message on ``queue`` carries (Flower shows it)."""
    return TASK_FOR_QUEUE.get(queue, ANY_QUEUE_TASK)


def celery_priority(priority: int, transport: str) -> int:
    """Farm priority 0..9 (higher runs first) -> the message priority of ``transport``:
    RabbitMQ delivers a higher number first, kombu's Redis transport a lower one."""
    priority = max(0, min(9, priority))
    return priority if transport == "amqp" else 9 - priority


startup_error: ConfigError | None = None  # what _worker_defaults could not read
_signing_from_env = False  # _worker_defaults found signing settings
_serves_metrics = False  # _worker_defaults found a metrics port (FARM_WORKER_METRICS_PORT)


def _worker_defaults() -> dict:
    """The settings `celery -A farm.tasks worker` runs with, read from the environment when
    Celery first reads its configuration (never at import). A bad setting is kept, not raised
    here: the worker reports it as one line and exits (farm.tasks.worker)."""
    global startup_error, _signing_from_env, _serves_metrics
    try:
        settings = Settings.from_env()
        conf = farm_config(settings, os.environ.get("FARM_WORKER_ROLE") or None)
        _signing_from_env = settings.signing
        _serves_metrics = bool(settings.worker_metrics_port)
    except ConfigError as exc:
        startup_error = exc
        return {}
    return conf


app.add_defaults(_worker_defaults)


@app.on_after_configure.connect
def _sign_if_asked(**_: object) -> None:
    """Signing needs its serializer registered as soon as the environment's settings load
    (a worker checks its accepted content before any other start-up hook runs)."""
    if _signing_from_env:
        _setup_signing()


@signals.celeryd_init.connect
def _refuse_bad_settings(options: dict | None = None, **_: object) -> None:
    """A worker whose settings are bad says so in one line and exits. Connected here, in the
    module ``-A farm.tasks`` loads, because the worker's task modules load after this signal;
    and SystemExit, because Celery only logs an Exception raised by a signal handler."""
    app.conf.broker_url  # noqa: B018 -- reading the configuration loads it
    error = startup_error or _queue_mismatch((options or {}).get("queues"))
    if error is not None:
        print(f"error {error.code}: {error.message}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    if _serves_metrics:  # before the pool forks: its children count into the folder
        multiproc.prepare()


def _queue_mismatch(names: list[str] | str | None) -> ConfigError | None:
    """A RabbitMQ queue this worker is to consume that the server holds declared otherwise
    (Celery would die of it with a traceback). A broker out of reach is not an error here:
    Celery keeps trying to connect, as it does on Redis."""
    if transport_of(app.conf.broker_url) != "amqp":
        return None
    if isinstance(names, str):
        names = names.split(",")
    names = names or [queue.name for queue in app.conf.task_queues]
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            rabbitmq.declare(conn, [app.amqp.queues[name] for name in names])
    except ConfigError as exc:
        return exc
    except (OSError, KombuError, AMQPError):
        return None
    return None
