"""One job as a terminal shows it: its status line, its error, what it waits on, and a table
with one row per stage of its DAG, the running stage's steps drawn as a bar. `farm status`
prints it, `farm status --watch` keeps it live, `farm render` of one input shows it above its
bars."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from functools import partial

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from farm.cli.app import TIMES
from farm.job import Job, JobInfo, Progress, StageInfo, patience
from farm.waiting import Patience

BAR_WIDTH = 24


@dataclass(frozen=True)
class JobView:
    """A job read at one moment, as a rich renderable."""

    info: JobInfo
    stages: list[StageInfo]
    progress: Progress | None = None  # of an unfinished job whose Redis answered

    @classmethod
    def read(cls, job: Job, live: Patience | None = None) -> JobView:
        """The job now. Its live progress is best-effort: while Redis is down (``live`` rides
        the outage out) the view has none, and a finished job needs none."""
        info, stages = job.info(), job.stages()
        if info.finished:
            return cls(info, stages)
        return cls(info, stages, (live or patience(job.ctx)).try_call(job.progress, None))

    def __rich__(self) -> Group:
        return Group(*self._lines(), stage_table(self.stages, self.progress))

    def _lines(self) -> list[Text]:
        info = self.info
        lines = [f"job {info.id}  [bold]{info.status}[/]  pipeline {info.pipeline}"]
        if info.error_code:
            lines.append(f"[red]{info.error_code}[/]: {escape(info.error_message or '')}")
        if info.waiting_on:
            # the reason is the service's own words: never read as markup
            lines.append(f"[yellow]waiting on {info.waiting_on}[/]: {escape(info.waiting_reason)}")
        for s in self.stages:
            if s.lost_runs:
                lines.append(
                    f"[yellow]{s.name}[/]: its worker died {s.lost_runs} time(s) mid-stage; "
                    "the stage was sent again"
                )
            if s.rebuilds:
                lines.append(
                    f"[yellow]{s.name}[/]: ran again {s.rebuilds} time(s) after it was done, "
                    "because a later stage found its checkpoint gone or changed"
                )
        return [Text.from_markup(line) for line in lines]


def watch(job: Job, console: Console, interval: float) -> JobInfo:
    """Show the job's view, read again every ``interval`` seconds, until it is finished; its
    last record. On a terminal the view is redrawn in place; into a file or a pipe, rich's
    Live writes only the last one. Rides out an outage of Postgres (or Redis, without
    progress meanwhile) as ``Job.wait`` does."""
    records = patience(job.ctx)
    read = partial(JobView.read, job, patience(job.ctx))
    view = records.call(read)
    with Live(view, console=console, auto_refresh=False) as screen:
        while not view.info.finished:
            time.sleep(interval)
            view = records.call(read)
            screen.update(view, refresh=True)
    return view.info


def stage_table(stages: list[StageInfo], progress: Progress | None = None) -> Table:
    """One row per stage; a DAG that is not a chain also shows what each stage comes after,
    which is where its branches part and join, and a job whose stages shared batched model
    calls with other jobs shows how many calls and how full they were. Given the live
    ``progress`` of an unfinished job, a steps column draws its running stage's steps."""
    branched = not _is_chain(stages)
    batched = any(s.model_calls is not None for s in stages)
    after = ("after",) if branched else ()
    steps = ("steps",) if progress is not None else ()
    calls = ("GPU calls",) if batched else ()
    table = Table("stage", "queue", *after, "status", *steps, "attempts", "lost", "worker",
                  "duration", *calls, "artifact")  # fmt: skip
    for s in stages:
        duration = f"{s.duration_s:.2f} s" if s.duration_s is not None else ""
        size = f"{s.artifact_size:,} B" if s.artifact_size else ""
        state = f"{s.status}, waiting on {s.waiting_on}" if s.waiting_on else s.status
        dag = (", ".join(s.after),) if branched else ()
        bar = (_steps(s, progress),) if progress is not None else ()
        shared = (_model_calls(s),) if batched else ()
        row = (s.name, s.queue, *dag, state, *bar, str(s.attempts), str(s.lost_runs))
        table.add_row(*row, s.worker or "", duration, *shared, size)
    return table


def _steps(stage: StageInfo, progress: Progress) -> Table | str:
    """The stage's steps as a bar and ``step/steps``, if it is the one reporting them."""
    if stage.status != "running" or progress.stage != stage.name or not progress.steps:
        return ""
    cell = Table.grid(padding=(0, 1))
    bar = ProgressBar(total=progress.steps, completed=progress.step, width=BAR_WIDTH)
    cell.add_row(bar, f"{progress.step}/{progress.steps}")
    return cell


def _model_calls(stage: StageInfo) -> str:
    """The batched model calls and the mean number of jobs in each: ``12 TIMES 3.4 jobs``."""
    if stage.model_calls is None:  # recorded together with jobs_per_call
        return ""
    return f"{stage.model_calls} {TIMES} {stage.jobs_per_call:.1f} jobs"


def _is_chain(stages: list[StageInfo]) -> bool:
    """Each stage after the one listed before it: a linear pipeline (img2img, txt2img)."""
    first_reads_input = not stages or not stages[0].after
    return first_reads_input and all(s.after == (p.name,) for p, s in itertools.pairwise(stages))
