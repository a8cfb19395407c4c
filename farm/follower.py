"""The terminal follower of `farm render`: progress bars, outputs written as jobs finish, a
summary at the end."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path, PurePosixPath

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from farm.api import Farm
from farm.batch import Batch
from farm.db.models import JobStatus
from farm.job import Job, JobInfo

POLL_S = 0.5
SHOWN_RUNNING = 4  # per-job lines under the overall bar


def output_names(names: list[str]) -> dict[str, str]:
    """``sub/cat.jpg`` -> ``sub/cat.png``; when two inputs share a stem, keep the extension
    (``cat.jpg.png``, ``cat.webp.png``) so neither overwrites the other."""
    stems = Counter(str(PurePosixPath(n).with_suffix("")) for n in names)
    out = {}
    for name in names:
        stem = str(PurePosixPath(name).with_suffix(""))
        out[name] = f"{name}.png" if stems[stem] > 1 else f"{stem}.png"
    return out


class Follower:
    """Polls a batch, draws progress, and saves each output as soon as its job is done."""

    def __init__(self, farm: Farm, batch: Batch, out_dir: Path, console: Console) -> None:
        self.farm, self.batch, self.out_dir, self.console = farm, batch, out_dir, console
        self.saved: set[str] = set()

    def run(self) -> list[JobInfo]:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console, transient=False) as bars:
            overall = bars.add_task("rendering", total=None)
            lines = [bars.add_task("", total=None, visible=False) for _ in range(SHOWN_RUNNING)]
            while True:
                jobs = self.batch.jobs()
                self._save_done(jobs)
                finished = sum(1 for j in jobs if j.finished)
                bars.update(overall, total=len(jobs), completed=finished)
                self._show_running(bars, lines, jobs)
                if finished == len(jobs):
                    return jobs
                time.sleep(POLL_S)

    def _save_done(self, jobs: list[JobInfo]) -> None:
        names = output_names([j.input_name or j.id for j in jobs])
        for job in jobs:
            if job.status == JobStatus.DONE and job.id not in self.saved:
                target = self.out_dir / names[job.input_name or job.id]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self.farm.ctx.store.get(job.output_key))
                self.saved.add(job.id)

    def _show_running(self, bars: Progress, lines: list, jobs: list[JobInfo]) -> None:
        running = [j for j in jobs if j.status == JobStatus.RUNNING][: len(lines)]
        for line, job in zip(lines, running, strict=False):
            p = Job(self.farm.ctx, job.id).progress()
            text = f"  {job.input_name}: {p.stage or '…'}"
            total = p.steps if p.stage == "denoise" and p.steps else None
            bars.update(line, description=text, total=total, completed=p.step, visible=True)
        for line in lines[len(running) :]:
            bars.update(line, visible=False)


def summary(jobs: list[JobInfo], skipped: list[str]) -> RenderableType:
    """One row per input that did not render, then the totals; just the totals if all did."""
    counts = Counter(j.status for j in jobs)
    totals = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    caption = f"{len(jobs)} inputs: {totals}"
    if skipped:
        caption += f" ({len(skipped)} already rendered, skipped)"
    failed = sorted(
        (j for j in jobs if j.status != JobStatus.DONE), key=lambda j: j.input_name or ""
    )
    if not failed:
        return Text(caption)
    table = Table("input", "status", "code", "message", title="farm render", caption=caption)
    for job in failed:
        table.add_row(job.input_name, job.status, job.error_code or "", job.error_message or "")
    return table
