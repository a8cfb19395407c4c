"""Inspecting and steering jobs: status, jobs, result, resume, cancel, debug-run."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import typer
from rich.table import Column, Table

from farm.api import Farm
from farm.cli.app import JobId, app, console, err
from farm.cli.job_view import JobView, watch
from farm.errors import ConfigError


@app.command()
def status(
    job_id: str = JobId,
    as_json: bool = typer.Option(False, "--json"),
    watching: bool = typer.Option(
        False, "--watch", help="Redraw the view until the job is done, failed or cancelled."
    ),
    interval: float = typer.Option(0.5, "--interval", help="Seconds between redraws (--watch)."),
) -> None:
    """A job's status and its stage table (status, attempts, lost runs, worker, duration, the
    running stage's steps, and the batched GPU calls its stages shared with other jobs, when
    they made any)."""
    if watching and as_json:
        raise ConfigError("--watch draws a live table, not JSON; drop one of --watch and --json")
    if interval <= 0:
        raise ConfigError(f"--interval {interval}: give a number of seconds above 0")
    job = Farm.from_env().get(job_id)
    if as_json:
        payload = {
            **_jsonable(asdict(job.info())),
            "stages": [_jsonable(asdict(s)) for s in job.stages()],
            "progress": asdict(job.progress()),
        }
        console.print_json(json.dumps(payload))
    elif not watching:
        console.print(JobView.read(job))
    else:
        try:
            watch(job, console, interval)
        except KeyboardInterrupt:
            err.print(f"stopped watching job {job.id}; it goes on", highlight=False)
            raise typer.Exit(130) from None


@app.command()
def result(
    job_id: str = JobId,
    output: Path = typer.Option(..., "--output", "-o", help="File to write the output to."),
) -> None:
    """Download a done job's output (NOT_DONE if it has none yet): a PNG, or what its
    pipeline's last stage writes (JSON for fanout)."""
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
            j.error_code or (f"waiting on {j.waiting_on}" if j.waiting_on else ""),
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
    from farm.db.job_records import reopen
    from farm.db.session import transaction
    from farm.tasks.inline import run_job_inline

    farm = Farm.from_env()
    logging.getLogger("farm").setLevel(logging.INFO)
    job_id = farm.get(job_id).id  # a prefix, as for status
    if farm.get(job_id).status() in ("failed", "cancelled"):
        with transaction(farm.ctx.db_url) as conn:
            reopen(conn, farm.ctx.meta, job_id)
    for stage, outcome in run_job_inline(farm.ctx, job_id):
        console.print(f"{stage:<12} {outcome}")
    info = farm.get(job_id).info()
    console.print(f"job {job_id}  [bold]{info.status}[/]")
    if info.error_code:
        console.print(f"[red]{info.error_code}[/]: {info.error_message}")


def _jsonable(data: dict) -> dict:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in data.items()}
