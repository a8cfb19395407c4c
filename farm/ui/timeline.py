"""A job's stages on a time axis: one lane per branch of its DAG, and per stage the wait for a
worker (queued -> started) before its run (started -> finished, or now while it runs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from farm.job import JobInfo, StageInfo


@dataclass(frozen=True)
class Bar:
    """One stage on the strip; positions are percentages of the job's span."""

    stage: StageInfo
    wait_left: float
    wait_width: float  # 0: no wait recorded, or none to speak of
    run_left: float
    run_width: float  # 0: not started
    wait_s: float | None
    run_s: float | None


@dataclass(frozen=True)
class Timeline:
    bars: list[Bar]  # in the job's stage order
    lanes: list[list[Bar]]
    span_s: float


def lanes_of(stages: Sequence[StageInfo]) -> list[list[StageInfo]]:
    """The DAG as rows: a stage continues the lane of the first stage it comes after, unless
    another stage took that lane's end already; then it starts a branch of its own."""
    lane_of: dict[str, int] = {}
    ends: list[str | None] = []  # the stage each lane ends with so far
    for stage in stages:
        parent = next((p for p in stage.after if p in lane_of), None)
        if parent is not None and ends[lane_of[parent]] == parent:
            lane_of[stage.name] = lane_of[parent]
            ends[lane_of[parent]] = stage.name
        else:
            lane_of[stage.name] = len(ends)
            ends.append(stage.name)
    rows: list[list[StageInfo]] = [[] for _ in ends]
    for stage in stages:
        rows[lane_of[stage.name]].append(stage)
    return rows


def timeline(job: JobInfo, stages: Sequence[StageInfo], now: datetime) -> Timeline:
    """Bars positioned between the job's creation and its end (or ``now`` while it runs)."""
    end = job.finished_at or now
    recorded = [t for s in stages for t in (s.finished_at, s.started_at, s.queued_at) if t]
    end = max([end, *recorded])
    span = max((end - job.created_at).total_seconds(), 1e-3)

    def pct(at: datetime) -> float:
        return round(100 * max((at - job.created_at).total_seconds(), 0) / span, 3)

    def bar(stage: StageInfo) -> Bar:
        started, queued = stage.started_at, stage.queued_at
        stop = stage.finished_at or (end if stage.status == "running" else started)
        wait_from = queued if queued and (started is None or queued <= started) else None
        wait_to = started or (end if stage.status == "queued" else wait_from)
        wait_s = (wait_to - wait_from).total_seconds() if wait_from and wait_to else None
        run_s = (stop - started).total_seconds() if started and stop else None
        return Bar(
            stage=stage,
            wait_left=pct(wait_from) if wait_from else 0.0,
            wait_width=round(100 * wait_s / span, 3) if wait_s else 0.0,
            run_left=pct(started) if started else 0.0,
            run_width=round(100 * run_s / span, 3) if run_s else 0.0,
            wait_s=wait_s,
            run_s=run_s,
        )

    bars = {stage.name: bar(stage) for stage in stages}
    lanes = [[bars[s.name] for s in lane] for lane in lanes_of(stages)]
    return Timeline(bars=list(bars.values()), lanes=lanes, span_s=span)
