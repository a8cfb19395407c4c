"""What each page shows, read through the Python API: plain data the templates lay out."""

from __future__ import annotations

import mimetypes
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from farm.api import Farm
from farm.batch import BatchCounts, BatchInfo
from farm.job import Job, JobInfo, Progress, StageInfo
from farm.ui.timeline import Timeline, timeline


@dataclass(frozen=True)
class BatchRow:
    info: BatchInfo
    counts: BatchCounts


@dataclass(frozen=True)
class BatchView:
    info: BatchInfo
    counts: BatchCounts
    jobs: list[JobInfo]
    failed: list[JobInfo]
    done: float  # jobs finished, plus the running ones' share of their stages
    elapsed_s: float
    eta_s: float | None  # None until something finished, and once all has


@dataclass(frozen=True)
class JobView:
    info: JobInfo
    stages: list[StageInfo]
    progress: Progress
    share: float  # of its stages done, the running one counted by its steps
    timeline: Timeline
    output: str | None  # "image", "video" or "file" once done


@dataclass(frozen=True)
class WorkerRow:
    name: str
    role: str
    queues: list[str]
    running: list[tuple[str, str]]  # (job id, stage) from the stage records
    beat_age_s: float
    engine: dict | None


def now() -> datetime:
    return datetime.now(UTC)


def recent_batches(farm: Farm, limit: int = 50) -> list[BatchRow]:
    return [BatchRow(info, farm.batch(info.id).counts()) for info in farm.batches(limit)]


def batch_view(farm: Farm, batch_id: str) -> BatchView | None:
    batch = farm.batch(batch_id)
    info = batch.info()
    if info is None:
        return None
    counts, jobs, failed = batch.counts(), batch.jobs(), batch.failed()
    done = sum(_share(farm, job) for job in jobs)
    finished = [job.finished_at for job in jobs if job.finished_at]
    end = max(finished) if counts.finished and finished else now()
    elapsed = max((end - info.created_at).total_seconds(), 0.0)
    return BatchView(info, counts, jobs, failed, done, elapsed, eta(elapsed, done, counts.total))


def eta(elapsed_s: float, done: float, total: int) -> float | None:
    """Seconds left if the rest goes at the pace so far."""
    if not 0 < done < total:
        return None
    return elapsed_s * (total - done) / done


def job_view(farm: Farm, job_id: str) -> JobView:
    job = farm.get(job_id)
    info, stages = job.info(), job.stages()
    # A finished job's record says all; Redis (live steps) is only read while it runs.
    progress = Progress(info.status, None, 0, 0) if info.finished else job.progress()
    return JobView(
        info=info,
        stages=stages,
        progress=progress,
        share=stage_share(info, stages, progress),
        timeline=timeline(info, stages, now()),
        output=output_kind(info),
    )


def _share(farm: Farm, info: JobInfo) -> float:
    """How much of one job is done: 1 once finished, 0 before it starts."""
    if info.finished or info.status != "running":
        return 1.0 if info.finished else 0.0
    job = Job(farm.ctx, info.id)
    return stage_share(info, job.stages(), job.progress())


def stage_share(info: JobInfo, stages: list[StageInfo], progress: Progress) -> float:
    if info.finished:
        return 1.0
    done = sum(stage.status == "done" for stage in stages)
    running = {stage.name for stage in stages if stage.status == "running"}
    if progress.stage in running and progress.steps:
        done += min(progress.step / progress.steps, 1.0)
    return done / max(len(stages), 1)


def output_kind(info: JobInfo) -> str | None:
    if info.status != "done" or not info.output_key:
        return None
    kind = content_type(info.output_key).split("/")[0]
    return kind if kind in ("image", "video") else "file"


def content_type(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


def workers(farm: Farm) -> list[WorkerRow]:
    running = farm.running_stages()
    return [
        WorkerRow(
            name=beat["name"],
            role=str(beat.get("role", "")),
            queues=list(beat.get("queues", [])),
            running=running.get(beat["name"], []),
            beat_age_s=max(time.time() - beat["at"], 0.0),
            engine=beat.get("engine"),
        )
        for beat in sorted(farm.workers(), key=lambda beat: beat["name"])
    ]
