"""The ``farm`` command: a thin layer over farm.api, farm.local and the workers."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Column, Table

from farm.api import Farm
from farm.config import ENV_FILE_NAME, Settings, data_dir_from_env, is_configured
from farm.errors import ConfigError, FarmError

if TYPE_CHECKING:
    from farm.local import LocalStack, StackInfo
    from farm.local.fleet import Fleet

app = typer.Typer(
    help="A render farm for AI image generation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Click's plain help: typer's rich panels print a "<bool>" placeholder after every flag.
    rich_markup_mode=None,
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")
console = Console()
err = Console(stderr=True)

DataDir = typer.Option(None, "--data-dir", help="Where the local stack keeps its data.")


def _data_dir(value: Path | None) -> Path:
    path = (value or data_dir_from_env()).expanduser().resolve()
    os.environ["FARM_DATA_DIR"] = str(path)  # so Settings find DIR/farm.env
    return path


@app.command()
def up(
    data_dir: Path | None = DataDir,
    no_workers: bool = typer.Option(False, "--no-workers", help="Servers only."),
) -> None:
    """Start a local Redis, Postgres and S3 server and a supervisor keeping one cpu and one gpu
    worker alive (whatever already runs is reused)."""
    from farm.local import LocalStack, fleet

    root = _data_dir(data_dir)
    started = time.perf_counter()
    stack = LocalStack(root)
    info = stack.up()
    running = fleet.supervisor_pid(root)
    workers = None if no_workers and running is None else fleet.ensure(root, info.env())
    console.print(f"[green]farm is up[/] in {time.perf_counter() - started:.1f} s ({root})")
    _print_servers(stack, info)
    if workers is not None:
        _print_workers(workers)
    _print_reused(stack, workers)
    console.print(f"  settings  {info.data_dir / ENV_FILE_NAME}")
    if data_dir is not None:
        _remember(root)


def _print_servers(stack: LocalStack, info: StackInfo) -> None:
    pids = stack.pids()
    console.print(f"  redis     {info.redis_url.split('@')[-1]}  pid {pids.get('redis')}")
    console.print(f"  postgres  {info.database_url.split('@')[-1]}  pid {pids.get('postgres')}")
    console.print(f"  s3        {info.s3_endpoint}  bucket {info.s3_bucket}  pid {pids.get('s3')}")


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
    role: str = typer.Option(..., "--role", help="cpu or gpu"),
    loglevel: str = typer.Option("INFO", "--loglevel"),
    name: str | None = typer.Option(None, "--name", help="Celery node name (default ROLE@host)"),
) -> None:
    """Run one worker in the foreground (one per GPU: set CUDA_VISIBLE_DEVICES)."""
    from farm.local.workers import ROLES, worker_command

    if role not in ROLES:
        raise ConfigError(f"--role must be cpu or gpu, not {role!r}")
    Settings.from_env()  # fail fast, naming the missing variable
    os.environ["FARM_WORKER_ROLE"] = role
    command = worker_command(name or f"{role}@%h", loglevel)
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


# -- rendering ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderOption:
    """One render parameter as a command-line option."""

    kind: type
    flags: tuple[str, ...]
    help: str


# Every RenderParams parameter (README "Python API"), for `farm render` and `farm submit` alike.
RENDER_OPTIONS: dict[str, RenderOption] = {
    "prompt": RenderOption(str, ("--prompt", "-p"), "What to render."),
    "negative_prompt": RenderOption(str, ("--negative-prompt",), "What to avoid."),
    "strength": RenderOption(float, ("--strength",), "0-1: how far from the input (0.75)."),
    "steps": RenderOption(int, ("--steps",), "Denoising steps, 1-500 (30)."),
    "guidance": RenderOption(float, ("--guidance",), "Classifier-free guidance, 0-50 (7.5)."),
    "seed": RenderOption(int, ("--seed",), "Random seed (0)."),
    "size": RenderOption(
        str,
        ("--size",),
        "Long side in px, keeping the input's aspect (default: the model's native size), or WxH.",
    ),
    "width": RenderOption(
        int,
        ("--width",),
        "Output width in px: with --height exactly that size (see --fit); alone, the height "
        "follows the input's aspect.",
    ),
    "height": RenderOption(
        int,
        ("--height",),
        "Output height in px: with --width exactly that size (see --fit); alone, the width "
        "follows the input's aspect.",
    ),
    "fit": RenderOption(
        str, ("--fit",), "With --width/--height: cover (crop, default), contain (pad), stretch."
    ),
    "scheduler": RenderOption(str, ("--scheduler",), "pndm, ddim, euler, euler_a or dpm."),
    "sharpen": RenderOption(float, ("--sharpen",), "Unsharp-mask amount, 0-5 (0)."),
    "saturation": RenderOption(float, ("--saturation",), "Colour saturation, 0-5 (1)."),
    "contrast": RenderOption(float, ("--contrast",), "Contrast, 0-5 (1)."),
    "brightness": RenderOption(float, ("--brightness",), "Brightness, 0-5 (1)."),
}


@dataclass(frozen=True)
class RenderArgs:
    """What a rendering command was asked: the pipeline, the priority, and the render
    parameters given (RenderParams fills in the rest with its defaults)."""

    pipeline: str
    priority: int
    params: dict


def render_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` the --pipeline and --priority options and every render option; it
    receives them as one ``render: RenderArgs`` argument."""
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "render"]
    added = [
        _keyword("pipeline", str, typer.Option("img2img", help="img2img or txt2img.")),
        _keyword("priority", int, typer.Option(5, help="0-9, higher runs first.")),
        *(
            _keyword(name, o.kind, typer.Option(None, *o.flags, help=o.help))
            for name, o in RENDER_OPTIONS.items()
        ),
    ]

    @functools.wraps(command)
    def with_render_args(**kwargs: object) -> None:
        given = {name: kwargs.pop(name) for name in RENDER_OPTIONS}
        params = {name: value for name, value in given.items() if value is not None}
        render = RenderArgs(kwargs.pop("pipeline"), kwargs.pop("priority"), params)
        command(**kwargs, render=render)

    with_render_args.__signature__ = inspect.Signature([*own, *added])  # what typer reads
    return with_render_args


def _keyword(name: str, kind: type, option: object) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)


@contextmanager
def _farm(data_dir: Path | None = None) -> Iterator[Farm]:
    """The configured farm; with none configured, an embedded one for the duration:
    the local stack plus one cpu and one gpu worker, all stopped afterwards."""
    if is_configured() and data_dir is None:
        yield Farm.from_env()
        return
    from farm.local import LocalStack
    from farm.local.workers import ROLES, start_worker, wait_ready

    root = _data_dir(data_dir)
    stack = LocalStack(root)
    err.print(f"[dim]no farm configured: starting an embedded one in {root}[/]")
    info = stack.up()
    env = info.env()
    os.environ.update(env)
    farm = Farm(Settings.from_env())
    workers = [start_worker(role, env, root / "logs") for role in ROLES]
    try:
        wait_ready(farm.ctx.meta, workers)
        yield farm
    finally:
        for w in workers:
            w.stop()
        stack.down()


@app.command()
@render_options
def render(
    input_dir: Path = typer.Argument(..., help="Folder of images."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the outputs."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Include sub-folders."),
    data_dir: Path | None = DataDir,
    *,
    render: RenderArgs,
) -> None:
    """Render every image of a folder into OUTPUT (<input stem>.png); exits 1 if any failed.
    Re-running the same command skips what is done and follows what is still running."""
    from farm.follower import Follower, summary

    _output_folder(output)  # before anything is submitted
    embedded = data_dir is not None or not is_configured()  # as _farm decides
    batch = None
    try:
        with _farm(data_dir) as farm:
            batch = farm.submit_folder(
                input_dir,
                recursive,
                pipeline=render.pipeline,
                priority=render.priority,
                **render.params,
            )
            console.print(f"batch {batch.id}", highlight=False)
            _warn_missing(farm, batch)
            jobs = Follower(farm, batch, output, console).run()
    except KeyboardInterrupt:
        err.print(_interrupted(batch, embedded=embedded), soft_wrap=True, highlight=False)
        raise typer.Exit(130) from None
    console.print(summary(jobs, batch.skipped))
    console.print(f"outputs in {output.resolve()}  (batch {batch.id})", highlight=False)
    if any(j.status != "done" for j in jobs):
        raise typer.Exit(1)


def _output_folder(output: Path) -> None:
    """Create the output folder, or say in one line why it cannot be."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; give a folder (it is created if new)")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--output {output}: cannot create it ({exc.strerror})") from exc


def _interrupted(batch, *, embedded: bool) -> str:
    """What Ctrl-C leaves behind, and how to go on from there."""
    again = "\n  to continue: re-run the same `farm render` (it skips what is done)"
    if batch is None:
        return f"interrupted while submitting{again}"
    if embedded:
        return f"interrupted: the embedded farm stopped, batch {batch.id} unfinished{again}"
    return (
        f"interrupted: batch {batch.id} goes on rendering on the farm{again}"
        f"\n  to stop it:  farm cancel --batch {batch.id}"
    )


def _warn_missing(farm: Farm, batch) -> None:
    missing = farm.missing_queues(farm.queues_of(batch=batch.id))
    if missing:
        err.print(
            f"[yellow]warning[/] no worker consumes {', '.join(sorted(missing))}: "
            "jobs wait until one starts (farm up, or farm worker --role ...)"
        )


@app.command()
@render_options
def submit(
    image: Path | None = typer.Argument(None, help="Input image (none for txt2img)."),
    *,
    render: RenderArgs,
) -> None:
    """Submit one job and print its id."""
    farm = Farm.from_env()
    job = farm.submit(image, pipeline=render.pipeline, priority=render.priority, **render.params)
    console.print(job.id)


# -- inspecting and steering --------------------------------------------------------------------


JobId = typer.Argument(..., help="A job id as `farm jobs` shows it, or a prefix of it.")


@app.command()
def status(job_id: str = JobId, as_json: bool = typer.Option(False, "--json")) -> None:
    """A job's status and its stage table (status, attempts, lost runs, worker, duration)."""
    job = Farm.from_env().get(job_id)
    info, stages = job.info(), job.stages()
    if as_json:
        payload = {
            **_jsonable(asdict(info)),
            "stages": [asdict(s) for s in stages],
            "progress": asdict(job.progress()),
        }
        console.print_json(json.dumps(payload))
        return
    console.print(f"job {info.id}  [bold]{info.status}[/]  pipeline {info.pipeline}")
    if info.error_code:
        console.print(f"[red]{info.error_code}[/]: {info.error_message}")
    for s in stages:
        if s.lost_runs:
            console.print(
                f"[yellow]{s.name}[/]: its worker died {s.lost_runs} time(s) mid-stage; "
                "the stage was sent again"
            )
    table = Table("stage", "queue", "status", "attempts", "lost", "worker", "duration", "artifact")
    for s in stages:
        duration = f"{s.duration_s:.2f} s" if s.duration_s is not None else ""
        size = f"{s.artifact_size:,} B" if s.artifact_size else ""
        row = (s.name, s.queue, s.status, str(s.attempts), str(s.lost_runs), s.worker or "")
        table.add_row(*row, duration, size)
    console.print(table)


@app.command()
def result(
    job_id: str = JobId,
    output: Path = typer.Option(..., "--output", "-o", help="File to write the PNG to."),
) -> None:
    """Download a done job's output PNG (NOT_DONE if it has none yet)."""
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name")
    saved = Farm.from_env().get(job_id).save(output)
    console.print(f"saved {saved}", highlight=False)


@app.command()
def jobs(
    status_: str | None = typer.Option(None, "--status", help="queued, running, done, ..."),
    batch: str | None = typer.Option(None, "--batch", help="Only this batch."),
    limit: int = typer.Option(50, "--limit"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List jobs, newest first (ids in full, for status, result, resume and cancel)."""
    found = Farm.from_env().jobs(status=status_, batch=batch, limit=limit)
    if as_json:
        console.print_json(json.dumps([_jsonable(asdict(j)) for j in found]))
        return
    whole_id = Column("id", no_wrap=True, min_width=32)  # never cut short: users paste it
    table = Table(whole_id, "status", "stage", "input", "error", "created")
    for j in found:
        table.add_row(
            j.id,
            j.status,
            j.current_stage or "",
            j.input_name or "",
            j.error_code or "",
            f"{j.created_at:%Y-%m-%d %H:%M:%S}",
        )
    console.print(table)


@app.command()
def resume(
    job_id: str | None = typer.Argument(None, help="A job id, or a prefix of it."),
    failed: bool = typer.Option(False, "--failed", help="Resume every failed job."),
    cancelled: bool = typer.Option(
        False, "--cancelled", help="With --failed: resume cancelled jobs too."
    ),
    batch: str | None = typer.Option(None, "--batch", help="With --failed: only this batch."),
) -> None:
    """Resume a failed or cancelled job (or every --failed one) from its first stage that is
    not done. A queued, running or done job is refused (NOT_RESUMABLE)."""
    farm = Farm.from_env()
    if failed:
        resumed = farm.resume_failed(batch, cancelled=cancelled)
        console.print(f"resumed {len(resumed)} job(s)")
    elif job_id:
        job = farm.resume(farm.get(job_id).id)
        console.print(f"resumed {job.id}")
    else:
        raise ConfigError("give a JOB id or --failed")


@app.command()
def cancel(
    job_id: str | None = typer.Argument(None, help="A job id, or a prefix of it."),
    batch: str | None = typer.Option(None, "--batch", help="Cancel every unfinished job."),
) -> None:
    """Cancel a job or a batch; a running stage stops at its next step."""
    farm = Farm.from_env()
    if not (job_id or batch):
        raise ConfigError("give a JOB id or --batch ID")
    count = farm.cancel(batch=batch) if batch else farm.cancel(farm.get(job_id))
    console.print(f"cancelled {count} job(s)")


@app.command("debug-run")
def debug_run(job_id: str = JobId) -> None:
    """Run a job's remaining stages in this process, without Celery, to see a failure in the
    foreground (a failed or cancelled job is reopened first, as resume does)."""
    from farm.db.job_records import prepare_resume
    from farm.db.session import transaction
    from farm.tasks.inline import run_job_inline

    farm = Farm.from_env()
    logging.getLogger("farm").setLevel(logging.INFO)
    job_id = farm.get(job_id).id  # a prefix, as for status
    if farm.get(job_id).status() in ("failed", "cancelled"):
        with transaction(farm.ctx.db_url) as conn:
            prepare_resume(conn, job_id)
        farm.ctx.meta.clear_cancel(job_id)
    for stage, outcome in run_job_inline(farm.ctx, job_id):
        console.print(f"{stage:<12} {outcome}")
    info = farm.get(job_id).info()
    console.print(f"job {job_id}  [bold]{info.status}[/]")
    if info.error_code:
        console.print(f"[red]{info.error_code}[/]: {info.error_message}")


@app.command()
def flower(
    port: int = typer.Option(5555, "--port"),
    address: str = typer.Option(
        "127.0.0.1", "--address", help="Keep it private: /metrics answers without auth."
    ),
) -> None:
    """Run Flower (Celery monitoring) with basic auth from FARM_FLOWER_USER/PASSWORD."""
    settings = Settings.from_env()
    password = settings.flower_password.get_secret_value() if settings.flower_password else None
    if not password:
        password = secrets.token_urlsafe(12)
        err.print(f"FARM_FLOWER_PASSWORD is not set; this run's password: {password}")
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
    err.print(f"Flower on http://{address}:{port} (user {settings.flower_user})")
    os.execv(command[0], command)


def _jsonable(data: dict) -> dict:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in data.items()}


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except FarmError as exc:
        err.print(f"[red]error[/] {exc.code}: {exc.message}")
        sys.exit(2)
