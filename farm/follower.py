"""The terminal follower of `farm render`: progress (live bars on a terminal, plain lines in a
log), outputs written as jobs finish, a summary at the end."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path, PurePosixPath

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from farm.api import Farm
from farm.batch import Batch
from farm.db.models import JobStatus
from farm.errors import ArtifactCorrupt, ArtifactMissing, NotResumable
from farm.inputs import display_name
from farm.job import (
    Job,
    JobInfo,
    batch_input_paths,
    lost_runs,
    missing_queues,
    output_records,
    patience,
    queues_of,
)
from farm.job import Progress as JobProgress
from farm.storage.verified import read_recorded
from farm.waiting import Outage, Patience

POLL_S = 0.5
SHOWN_RUNNING = 4  # per-job lines under the overall bar
PLAIN_EVERY_S = 10.0  # without a terminal: a "n/N finished" line when nothing else was printed
NAME_MAX = 255  # bytes in one file name, on every common Linux and macOS file system
HASH_CHARS = 8  # of the sha256 that keeps a shortened name apart from the others
UNKNOWN = JobProgress(status="running", stage=None, step=0, steps=0)  # while Redis is down


def output_names(names: list[str], suffix: str = ".png") -> dict[str, str]:
    """Where each input's output goes under the output folder (README, "CLI"): ``sub/cat.jpg``
    -> ``sub/cat.png`` (``suffix``: the kind of the pipeline's output, ``.png`` in the rules
    below). Names are the file system's (undecodable bytes as surrogate escapes,
    kept as they are in the output's name). The rule, deterministic and never giving two
    inputs one output:

    1. An input named ``<stem>.png`` keeps its name.
    2. Another input whose ``<stem>.png`` no other input wants, and that is not a folder of
       inputs, gets it; otherwise it adds ``.png`` to its own name (``cat.jpg.png``).
    3. Should that be taken as well, the next in byte order gets `` (2)``, `` (3)``...
       before ``.png``.
    4. A file name over ``NAME_MAX`` bytes is cut, at a character, to fit with ``~`` and the
       first ``HASH_CHARS`` hex digits of the sha256 of the name it replaces."""
    wanted = {name: _stem(name) + suffix for name in names}
    claims = Counter(wanted.values())
    folders = {str(parent) for name in names for parent in PurePosixPath(name).parents}
    out = {name: name for name in names if wanted[name] == name}  # rule 1
    used = set(out.values()) | folders
    for name in sorted(set(names) - set(out), key=os.fsencode):
        alone = claims[wanted[name]] == 1 and wanted[name] not in folders
        base = _stem(wanted[name]) if alone else name
        target, number = _fit(base + suffix, suffix), 2
        while target in used:
            target, number = _fit(f"{base} ({number}){suffix}", suffix), number + 1
        out[name] = target
        used.add(target)
    return out


def _stem(name: str) -> str:
    return str(PurePosixPath(name).with_suffix(""))


def _fit(path: str, suffix: str) -> str:
    """``path`` with its file name cut to ``NAME_MAX`` bytes, if longer (rule 4)."""
    folder, _, name = path.rpartition("/")
    if len(os.fsencode(name)) <= NAME_MAX:
        return path
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:HASH_CHARS]
    tail = f"~{digest}{suffix}"
    stem = name.removesuffix(suffix)
    while len(os.fsencode(stem + tail)) > NAME_MAX:
        stem = stem[:-1]
    return f"{folder}/{stem}{tail}" if folder else stem + tail


def renamed(name: str, output: str, suffix: str = ".png") -> str | None:
    """The summary's line for an output that is not plainly ``<stem>.png`` (another input or
    a folder of inputs has that name: rules 2 and 3); None for one that is."""
    plain = _stem(name) + suffix
    if output == plain:
        return None
    return (
        f"renamed {display_name(name)} -> {display_name(output)} ({display_name(plain)} is taken)"
    )


def save_output(target: Path, checksum: str | None, fetch: Callable[[], bytes]) -> bool:
    """Write an output unless the file already holds it (its sha256 is the recorded checksum),
    so re-running a finished folder leaves its files and their mtimes alone. True if written."""
    if checksum and target.is_file():
        with target.open("rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() == checksum:
                return False
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(fetch())
    return True


def _name(job: JobInfo) -> str:
    return job.input_name or job.id


def _plan_outputs(farm: Farm, batch: Batch, suffix: str) -> tuple[dict[str, str], list[str]]:
    """Each job's output name (from its input's path in the batch's folder), and a line for
    every output that is not plainly ``<stem><suffix>``."""
    paths = {job: os.fsdecode(path) for job, path in batch_input_paths(farm.ctx, batch.id).items()}
    names = output_names(list(paths.values()), suffix)
    ordered = sorted(paths.values(), key=os.fsencode)
    lines = (renamed(path, names[path], suffix) for path in ordered)
    return {job: names[path] for job, path in paths.items()}, [line for line in lines if line]


class Follower:
    """Polls a batch, shows progress, and saves each output as soon as its job is done.

    It says what the farm waits on: a service this command cannot reach (and it tries again
    for up to FARM_OUTAGE_TIMEOUT seconds, as workers do), a service a job's stage waits on
    (out of space, say), or a queue no worker consumes."""

    def __init__(
        self,
        farm: Farm,
        batch: Batch,
        out_dir: Path,
        console: Console,
        suffix: str = ".png",
        view: Callable[[Job, Patience], RenderableType] | None = None,
    ) -> None:
        """``suffix``: of the output files, from the kind the pipeline's final stage writes.
        ``view(job, live)``: on a terminal, what to show above the bars of the batch's one job,
        or of the first of its jobs running now (nothing while none runs), read at each poll
        (farm.cli.job_view.JobView.read), ``live`` riding out an outage of Redis."""
        self.farm, self.batch, self.out_dir, self.console = farm, batch, out_dir, console
        self.view = view
        self.finished: set[str] = set()
        self.saved: dict[str, tuple[str, bool]] = {}  # done job -> its output, whether written
        self.outputs, self.renamed = _plan_outputs(farm, batch, suffix)
        self.records = patience(farm.ctx, self._tell_outage)  # Postgres, S3: needed to go on
        self.live = patience(farm.ctx, self._tell_outage)  # Redis: progress, live workers
        self.outage_told = 0.0  # when the current outage was last told
        self.waiting: dict[str, str] = {}  # job -> the service it was last told to wait on
        self.missing: set[str] | None = None  # queues no live worker consumes, as last told

    def run(self) -> list[JobInfo]:
        return self._run_bars() if self.console.is_terminal else self._run_plain()

    def _poll(self) -> tuple[list[JobInfo], list[JobInfo]]:
        jobs, new = self.records.call(self._poll_records)
        self._tell_waiting(jobs)
        self.live.try_call(partial(self._tell_missing_workers, jobs), None)
        return jobs, new

    def _poll_records(self) -> tuple[list[JobInfo], list[JobInfo]]:
        """The batch's jobs, and those that finished since the last poll (outputs saved).
        Tried again as a whole after an outage, so it skips the outputs it saved already."""
        jobs = self.batch.jobs()
        # a job resumed meanwhile (by anyone) is followed again, its output saved again
        reopened = {j.id for j in jobs if not j.finished}
        self.finished -= reopened
        for job_id in reopened & self.saved.keys():
            del self.saved[job_id]
        new = [j for j in jobs if j.finished and j.id not in self.finished]
        done = [j for j in new if j.status == JobStatus.DONE and j.id not in self.saved]
        rebuilding = self._save(done)
        if rebuilding:  # queued again now: seen as unfinished until they are done again
            jobs, new = self.batch.jobs(), [j for j in new if j.id not in rebuilding]
        self._tell_lost_runs(new)
        self.finished.update(j.id for j in new)
        return jobs, new

    def _run_bars(self) -> list[JobInfo]:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with _Bars(*columns, console=self.console, transient=False) as bars:
            overall = bars.add_task("rendering", total=None)
            lines = [bars.add_task("", total=None, visible=False) for _ in range(SHOWN_RUNNING)]
            while True:
                jobs, _ = self._poll()
                bars.update(overall, total=len(jobs), completed=len(self.finished))
                self._show_running(bars, lines, jobs)
                if self.view is not None:
                    bars.above = self._focus_view(jobs)
                if all(j.finished for j in jobs):
                    return jobs
                time.sleep(POLL_S)

    def _run_plain(self) -> list[JobInfo]:
        """For logs (CI, nohup): one line per finished job, and a count now and then."""
        quiet_since = time.monotonic()
        while True:
            jobs, new = self._poll()
            for count, job in enumerate(new, len(self.finished) - len(new) + 1):
                self._plain(f"[{count}/{len(jobs)}] {self._job_line(job)}")
            if all(j.finished for j in jobs):
                return jobs
            if new:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= PLAIN_EVERY_S:
                counts = Counter(j.status for j in jobs)
                counts.update(f"waiting on {j.waiting_on}" for j in jobs if j.waiting_on)
                states = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
                self._plain(f"[{len(self.finished)}/{len(jobs)}] finished; {states}")
                quiet_since = time.monotonic()
            time.sleep(POLL_S)

    def _plain(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _job_line(self, job: JobInfo) -> str:
        if job.status != JobStatus.DONE:
            error = f"  {job.error_code}: {job.error_message}" if job.error_code else ""
            return f"{job.status} {_name(job)}{error}"
        output, written = self.saved[job.id]
        return f"done {_name(job)} -> {display_name(output)}{'' if written else ' (unchanged)'}"

    def _save(self, done: list[JobInfo]) -> set[str]:
        """Write the outputs of these done jobs. Returns the ids of those whose stored output
        was gone or changed: they are rendering it again, and are followed until they are."""
        if not done:
            return set()
        records = output_records(self.farm.ctx, [j.id for j in done])
        store, rebuilding = self.farm.ctx.store, set()
        for job in done:
            output, record = self.outputs[job.id], records[job.id]
            fetch = partial(read_recorded, store, record)
            try:
                written = save_output(self.out_dir / output, record.checksum, fetch)
            except (ArtifactMissing, ArtifactCorrupt) as exc:
                self._plain(f"{_name(job)}: {exc.message} Rendering it again.")
                with contextlib.suppress(NotResumable):  # another client got there first
                    self.farm.resume(job.id)
                rebuilding.add(job.id)
                continue
            self.saved[job.id] = output, written
        return rebuilding

    def _tell_lost_runs(self, new: list[JobInfo]) -> None:
        """One line per job whose worker died mid-stage (the stage was sent again)."""
        lost = lost_runs(self.farm.ctx, [j.id for j in new]) if new else {}
        for job in (j for j in new if j.id in lost):
            stages = ", ".join(f"{stage} ({n}x)" for stage, n in lost[job.id].items())
            self.console.print(
                f"{_name(job)}: a worker died during {stages}; the stage was sent again "
                f"and the job is {job.status} (farm status {job.id})",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    def _tell_outage(self, outage: Outage) -> None:
        """One line when an outage begins or ends, and one every PLAIN_EVERY_S while it lasts."""
        if outage.phase == "lasts" and time.monotonic() - self.outage_told < PLAIN_EVERY_S:
            return
        self.outage_told = time.monotonic()
        self._plain(str(outage))

    def _tell_waiting(self, jobs: list[JobInfo]) -> None:
        """One line when a job starts waiting on a service (a full disk, an outage the
        workers ride out), with what the service answered."""
        waiting = {j.id: j for j in jobs if j.waiting_on}
        for job in waiting.values():
            if self.waiting.get(job.id) != job.waiting_on:
                self._plain(f"{_name(job)}: waiting on {job.waiting_on}: {job.waiting_reason}")
        self.waiting = {job_id: job.waiting_on for job_id, job in waiting.items()}

    def _tell_missing_workers(self, jobs: list[JobInfo]) -> None:
        """A line when the queues that no live worker consumes change (at the start too)."""
        unfinished = any(not j.finished for j in jobs)
        queues = queues_of(self.farm.ctx, batch=self.batch.id) if unfinished else set()
        if not queues:
            return  # all finished: nothing waits on a worker
        missing = missing_queues(self.farm.ctx, queues)
        if missing and missing != self.missing:
            self._plain(
                f"warning: no worker consumes {', '.join(sorted(missing))}: jobs wait until "
                "one starts (farm up, or farm worker --queues ...)"
            )
        elif self.missing and not missing:
            self._plain("every queue has a worker again")
        self.missing = missing

    def _show_running(self, bars: Progress, lines: list, jobs: list[JobInfo]) -> None:
        running = [j for j in jobs if j.status == JobStatus.RUNNING][: len(lines)]
        for line, job in zip(lines, running, strict=False):
            p = self.live.try_call(Job(self.farm.ctx, job.id).progress, UNKNOWN)
            text = f"  {job.input_name}: {p.stage or '…'}"
            if job.waiting_on:
                text += f" (waiting on {job.waiting_on})"
            total = p.steps if p.stage == "denoise" and p.steps else None
            bars.update(line, description=text, total=total, completed=p.step, visible=True)
        for line in lines[len(running) :]:
            bars.update(line, visible=False)

    def _focus_view(self, jobs: list[JobInfo]) -> RenderableType | None:
        shown = (
            jobs[0] if len(jobs) == 1 else next((j for j in jobs if j.status == "running"), None)
        )
        if shown is None:
            return None
        job = Job(self.farm.ctx, shown.id)
        return self.records.call(partial(self.view, job, self.live))


class _Bars(Progress):
    """Progress bars with something drawn above them (``above``), redrawn with them."""

    above: RenderableType | None = None

    def get_renderables(self) -> Iterable[RenderableType]:
        if self.above is not None:
            yield self.above
        yield from super().get_renderables()


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
