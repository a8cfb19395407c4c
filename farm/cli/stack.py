"""Commands for the local stack, workers, the database and other operator tasks."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from pydantic import SecretStr

from farm.config import ENV_FILE_NAME, Settings, data_dir_from_env
from farm.consoles import console_tls, scheme
from farm.errors import ConfigError

if TYPE_CHECKING:
    from farm.local import LocalStack, StackInfo
    from farm.local.fleet import Fleet

from farm.cli.app import DataDir, app, console, db_app, err


def _data_dir(value: Path | None) -> Path:
    path = (value or data_dir_from_env()).expanduser().resolve()
    os.environ["FARM_DATA_DIR"] = str(path)  # so Settings find DIR/farm.env
    return path


@app.command()
def up(
    data_dir: Path | None = DataDir,
    no_workers: bool = typer.Option(False, "--no-workers", help="Servers only."),
    listen: str | None = typer.Option(
        None,
        "--listen",
        metavar="ADDRESS",
        help="Also serve Redis, Postgres and S3 over TLS on this address, for workers on"
        " other machines (CA: DATA/tls/ca.pem; kept for later starts).",
    ),
    local_only: bool = typer.Option(
        False, "--local-only", help="Stop serving on the --listen address: 127.0.0.1 only."
    ),
) -> None:
    """Start a local Redis, Postgres and S3 server and a supervisor keeping one cpu and one gpu
    worker alive (whatever already runs is reused)."""
    from farm.local import LocalStack, fleet

    root = _data_dir(data_dir)
    started = time.perf_counter()
    stack = LocalStack(root)
    if listen and local_only:
        raise ConfigError("--listen and --local-only contradict each other; give one")
    info = stack.up(listen=_address(listen), local_only=local_only)
    running = fleet.supervisor_pid(root)
    workers = None if no_workers and running is None else fleet.ensure(root, info.env())
    console.print(f"[green]farm is up[/] in {time.perf_counter() - started:.1f} s ({root})")
    _print_servers(stack, info)
    if workers is not None:
        _print_workers(workers)
    _print_reused(stack, workers)
    console.print(f"  settings  {info.data_dir / ENV_FILE_NAME}")
    console.print(
        "  consoles  farm ui, farm flower, farm metrics and the workers' /metrics: user farm,"
        " password FARM_FLOWER_PASSWORD in that file"
    )
    if data_dir is not None:
        _remember(root)


def _address(listen: str | None) -> str | None:
    """A literal IP address or a host name (what the server certificate will name)."""
    if listen is None:
        return None
    try:
        return str(ipaddress.ip_address(listen))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", listen):
            raise ConfigError(f"--listen {listen!r} is not an IP address or a host name") from None
        return listen


def _print_servers(stack: LocalStack, info: StackInfo) -> None:
    pids = stack.pids()
    console.print(f"  redis     {info.redis_url.split('@')[-1]}  pid {pids.get('redis')}")
    console.print(f"  postgres  {info.database_url.split('@')[-1]}  pid {pids.get('postgres')}")
    console.print(f"  s3        {info.s3_endpoint}  bucket {info.s3_bucket}  pid {pids.get('s3')}")
    if info.tls_ca is not None:
        console.print(
            f"  tls       pid {pids.get('tls')}  CA {info.tls_ca} (copy it to the workers)"
        )


def _print_workers(workers: Fleet) -> None:
    console.print(f"  supervisor pid {workers.supervisor}  log {workers.log_path}")
    for w in workers.workers:
        pid = w["pid"] or "- (restarting)"
        line = f"  worker    {w['name']}  pid {pid}  log {w['log']}"
        if w.get("restarts"):
            line += f"  restarted {w['restarts']} time(s)"
        if w.get("crash_looping"):
            line += "  [red]crashing repeatedly[/]: see its log and the supervisor's"
        console.print(line)


def _print_reused(stack: LocalStack, workers: Fleet | None) -> None:
    reused = [f"{name} (pid {pid})" for name, pid in stack.reused.items()]
    if workers is not None and workers.reused:
        reused.append(f"supervisor (pid {workers.supervisor})")
    if workers is not None:
        reused += [
            f"worker {w['name']} (pid {w['pid']})"
            for w in workers.workers
            if workers.reused or w.get("adopted")
        ]
    if reused:
        console.print(f"  reused    {', '.join(reused)}")


def _remember(root: Path) -> None:
    """Let later commands without FARM_DATA_DIR find this farm, and say how to be explicit."""
    from farm.config import default_data_dir, remember_data_dir

    remember_data_dir(root)
    if root != default_data_dir().resolve():
        console.print(
            f"  later `farm` commands find this farm (recorded in {default_data_dir()});"
            f" to be explicit: export FARM_DATA_DIR={root}"
        )


@app.command()
def down(data_dir: Path | None = DataDir) -> None:
    """Stop what `farm up` started: the workers, their supervisor and the servers."""
    from farm.config import forget_data_dir
    from farm.local import LocalStack, fleet

    root = _data_dir(data_dir)
    stopped = fleet.stop(root)
    LocalStack(root).down()
    forget_data_dir(root)
    console.print(f"farm is down ({stopped} worker(s) stopped) in {root}")


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply migrations to FARM_DATABASE_URL."""
    from alembic import command

    from farm.db.migrate import alembic_config

    settings = Settings.from_env()
    command.upgrade(alembic_config(settings.database_url.get_secret_value()), revision)
    console.print(f"database at {revision}")


@app.command()
def worker(
    role: str | None = typer.Option(
        None, "--role", help="cpu (prefork pool) or gpu (one thread, the model kept warm)."
    ),
    queues: str | None = typer.Option(
        None,
        "--queues",
        "-Q",
        help="Queues to consume, comma-separated, e.g. audio,cpu (default: the role's own). "
        "The role defaults to gpu if gpu is among them, else cpu.",
    ),
    loglevel: str = typer.Option("INFO", "--loglevel"),
    name: str | None = typer.Option(None, "--name", help="Celery node name (default ROLE@host)"),
) -> None:
    """Run one worker in the foreground (one per GPU: set CUDA_VISIBLE_DEVICES)."""
    from farm.local.workers import ROLES, worker_command
    from farm.pipelines import check_queue_names

    wanted = check_queue_names(queues.split(",")) if queues else []
    role = role or ("gpu" if "gpu" in wanted else "cpu" if wanted else None)
    if role not in ROLES:
        raise ConfigError(f"--role must be cpu or gpu (or give --queues), not {role!r}")
    Settings.from_env()  # fail fast, naming the missing variable
    os.environ["FARM_WORKER_ROLE"] = role
    command = worker_command(name or f"{role}@%h", loglevel, wanted)
    os.execv(command[0], command)


@app.command()
def reconcile() -> None:
    """Re-enqueue stages whose worker stopped beating (workers also do this on their own)."""
    from farm.tasks.app import configure
    from farm.tasks.context import Context
    from farm.tasks.reconcile import reconcile as run_pass

    ctx = Context(Settings.from_env())
    configure(ctx.settings)
    requeued = run_pass(ctx)
    for job_id, stage in requeued:
        console.print(f"re-enqueued {job_id} {stage}")
    console.print(f"{len(requeued)} stage(s) re-enqueued")


@app.command()
def gc(
    grace: float = typer.Option(3600, "--grace", help="Only objects older than this (s)."),
) -> None:
    """Delete artifacts no job record points to (left by a submitter that died)."""
    from farm.tasks.context import Context
    from farm.tasks.gc import sweep

    deleted = sweep(Context(Settings.from_env()), grace)
    console.print(f"{deleted} orphaned object(s) deleted")


@app.command()
def config() -> None:
    """Print the settings in effect (secrets masked)."""
    for key, value in Settings.from_env().public_dict().items():
        console.print(f"FARM_{key.upper()}={value}")


@app.command()
def flower(
    port: int = typer.Option(5555, "--port"),
    address: str = typer.Option(
        "127.0.0.1", "--address", help="Keep it private: /metrics answers without auth."
    ),
) -> None:
    """Run Flower (Celery monitoring) with basic auth from FARM_FLOWER_USER/PASSWORD."""
    settings = with_password(Settings.from_env())
    tls = console_tls(settings)  # here, not in Flower: a bad pair is one line, not a traceback
    password = settings.flower_password.get_secret_value()
    # Credentials go through the environment, not argv, so `ps` does not show them.
    os.environ["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{password}"
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "farm.tasks",
        "flower",
        f"--address={address}",
        f"--port={port}",
    ]
    if tls:
        command += [f"--certfile={tls.cert}", f"--keyfile={tls.key}"]
    err.print(f"Flower on {scheme(tls)}://{address}:{port} (user {settings.flower_user})")
    os.execv(command[0], command)


def with_password(settings: Settings) -> Settings:
    """The settings, with a password for this run's basic auth when FARM_FLOWER_PASSWORD is
    not set (printed, so the operator can log in)."""
    if settings.flower_password and settings.flower_password.get_secret_value():
        return settings
    password = secrets.token_urlsafe(12)
    err.print(f"FARM_FLOWER_PASSWORD is not set; this run's password: {password}")
    return settings.model_copy(update={"flower_password": SecretStr(password)})


@app.command()
def metrics(
    port: int = typer.Option(None, "--port", help="Default: FARM_METRICS_PORT (9460)."),
    address: str = typer.Option(
        None, "--address", help="Default: FARM_METRICS_ADDRESS (127.0.0.1)."
    ),
) -> None:
    """Serve farm-wide metrics for Prometheus at /metrics: queue depth per queue and priority,
    jobs by status, batches in flight, live workers by role. Basic auth as Flower's."""
    from prometheus_client import CollectorRegistry

    from farm.metrics import http
    from farm.metrics.farm_wide import FarmCollector
    from farm.tasks.context import Context

    settings = with_password(Settings.from_env())
    chosen = {"metrics_port": port, "metrics_address": address}
    settings = settings.model_copy(update={k: v for k, v in chosen.items() if v is not None})
    registry = CollectorRegistry()
    registry.register(FarmCollector(Context(settings)))
    server = http.serve(registry, settings, settings.metrics_port)
    err.print(f"farm metrics on {server.url} (user {settings.flower_user})")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
