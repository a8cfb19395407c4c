"""What every benchmark shares: the real local stack, worker processes, timing and result files.

A benchmark module exposes ``run(bench: Bench) -> dict``; the dict is written to
``benchmarks/results/<name>.json`` together with the machine facts, and its ``rows`` feed the
summary table. Every goal is a ratio against a baseline measured in the same run, because the
machines these run on are small and shared: absolute timings drift between runs, ratios much less.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import psutil
import redis
from PIL import Image
from sqlalchemy import func, select

from farm.config import Settings
from farm.db.models import TERMINAL, Job
from farm.db.session import session_scope
from farm.local import LocalStack, StackInfo
from farm.local.workers import WorkerProcess, start_worker, wait_ready
from farm.storage.metadata import Metadata
from farm.tasks.broker_scan import queue_keys

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Every benchmark's workers and baselines run torch with this many threads unless told otherwise
# (FARM_BENCH_TORCH_THREADS): one thread stands in for "one accelerator", so the farm's own
# orchestration runs beside it on the other core the way a GPU host's CPU runs beside its GPU.
DEFAULT_TORCH_THREADS = 1
COLUMNS = ("name", "metric", "farm", "baseline", "ratio", "goal", "met")
VERSIONED = ("torch", "diffusers", "transformers", "celery", "kombu", "redis", "sqlalchemy")


class Skipped(Exception):
    """Raised by a benchmark that cannot run on this machine; its message is the reason."""


@dataclass(frozen=True)
class Row:
    """One line of the summary table."""

    name: str
    metric: str
    farm: float
    baseline: float | None
    ratio: float | None
    goal: str
    met: bool | None


@dataclass
class Bench:
    """One benchmark's throwaway local stack: its environment, settings and worker processes."""

    root: Path
    stack: StackInfo
    torch_threads: int

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def env(self, **extra: str) -> dict[str, str]:
        """The FARM_* environment workers get (plus identical torch thread settings)."""
        threads = str(self.torch_threads)
        return {
            **self.stack.env(),
            "FARM_DATA_DIR": str(self.data_dir),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            **extra,
        }

    def settings(self, **extra: str) -> Settings:
        values = {
            k.removeprefix("FARM_").lower(): v
            for k, v in self.env(**extra).items()
            if k.startswith("FARM_") and k != "FARM_FAULT_INJECTION"
        }
        return Settings(**values)

    @property
    def meta(self) -> Metadata:
        return Metadata(self.stack.redis_url)

    @contextmanager
    def running(self, roles: Iterable[str], **extra: str) -> Iterator[list[WorkerProcess]]:
        """Start one worker per role (``extra`` in their environment), stop them after."""
        log_dir = self.root / "logs"
        started = [start_worker(role, self.env(**extra), log_dir) for role in roles]
        try:
            wait_ready(self.meta, started, timeout=180)
            yield started
        finally:
            for worker in started:
                worker.stop()
                self.meta.forget_worker(worker.name)


@contextmanager
def bench_session(torch_threads: int | None = None) -> Iterator[Bench]:
    """A fresh local stack in a temp dir, torn down and deleted afterwards."""
    threads = torch_threads or int(
        os.environ.get("FARM_BENCH_TORCH_THREADS", DEFAULT_TORCH_THREADS)
    )
    root = Path(tempfile.mkdtemp(prefix="farm-bench-"))
    local = LocalStack(root / "stack")
    failed = False
    try:
        info = local.up()
        bench = Bench(root=root, stack=info, torch_threads=threads)
        bench.data_dir.mkdir(exist_ok=True)
        yield bench
    except BaseException:
        failed = True  # keep the worker and server logs for whoever reads the traceback
        print(f"benchmark failed; logs kept under {root}", file=sys.stderr)
        raise
    finally:
        _forget_broker()
        local.down()
        if not failed:
            shutil.rmtree(root, ignore_errors=True)


def _forget_broker() -> None:
    """Drop the Celery app's cached broker connections. The app is module-global and keeps its
    pools across ``configure()``, so without this the next session would publish to this
    session's (stopped) Redis. The same reset Celery itself does after a fork."""
    from farm.tasks.app import app

    if app._pool is not None:
        app._pool.force_close_all()
    app._pool = None
    if "amqp" in app.__dict__:
        app.amqp._producer_pool = None


def set_torch_threads(threads: int) -> None:
    """Give this process the torch threads the workers get (see DEFAULT_TORCH_THREADS)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


# -- inputs ------------------------------------------------------------------------------------


def sample_png(size: int, variant: int) -> bytes:
    """A deterministic picture with structure (gradients and a disc), different per variant."""
    y, x = np.mgrid[0:size, 0:size]
    scale = 256 // size or 1
    r = (x * scale + variant * 37) % 256
    g = (y * scale + variant * 11) % 256
    b = ((x + y) * scale // 2 + variant * 5) % 256
    pixels = np.stack([r, g, b], axis=-1).astype(np.uint8)
    disc = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 4 + variant % 7) ** 2
    pixels[disc] = (250, 220 - variant % 50, 40 + variant % 90)
    return png_bytes(pixels)


def noise_png(size: int, variant: int) -> bytes:
    """A tiny random picture, distinct per variant: thousands are made in about a second."""
    pixels = np.random.default_rng(variant).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return png_bytes(pixels)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# -- waiting and timing --------------------------------------------------------------------------


def wait_finished(db_url: str, job_ids: list[str], timeout: float, poll: float = 0.02) -> float:
    """Poll Postgres until every job is terminal; returns time.perf_counter() at that moment.

    20 ms by default, for sub-second jobs (Job.wait polls every 250 ms); long runs poll less
    often, since each poll costs CPU the workers on a 2-core machine would use."""
    deadline = time.monotonic() + timeout
    query = select(func.count()).where(Job.id.in_(job_ids), Job.status.in_(list(TERMINAL)))
    while True:
        with session_scope(db_url) as s:
            finished = s.scalar(query)
        if finished == len(job_ids):
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(job_ids) - finished} of {len(job_ids)} jobs unfinished")
        time.sleep(poll)


def statuses(db_url: str, job_ids: list[str]) -> dict[str, int]:
    query = select(Job.status, func.count()).where(Job.id.in_(job_ids)).group_by(Job.status)
    with session_scope(db_url) as s:
        return {str(status): n for status, n in s.execute(query).all()}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max of repeated measurements, for the results file."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


class CpuClock:
    """CPU seconds (user + system) spent by this run's processes: this one, the workers with
    their pool children, and the stack's servers (Postgres backends included).

    On a 2-core machine shared with other work, wall time says how busy the neighbours were;
    CPU time per job says what the farm itself costs, and bounds its throughput (cores / cost)."""

    def __init__(self, bench: Bench, workers: list[WorkerProcess]) -> None:
        marker = str(bench.root)  # every server's command line names its data dir under it
        self.roots: dict[int, str] = {w.pid: f"{w.role} worker" for w in workers}
        for proc in psutil.process_iter(["cmdline", "name"]):
            if any(marker in part for part in proc.info["cmdline"] or ()):
                self.roots.setdefault(proc.pid, proc.info["name"])  # postgres, weed
        for proc in _children(psutil.Process(), recursive=False):  # redis-server renames itself
            with contextlib.suppress(psutil.Error):
                self.roots.setdefault(proc.pid, proc.name())
        # Last: the servers and workers are this process's children too, but count as their own.
        self.roots[os.getpid()] = "benchmark process"

    def by_process(self) -> dict[str, float]:
        """CPU seconds so far per root process (with its descendants), by label."""
        seen: set[int] = set()
        out: dict[str, float] = {}
        for pid, label in self.roots.items():
            try:
                root = psutil.Process(pid)
            except psutil.Error:
                continue
            for proc in [root, *_children(root)]:
                if proc.pid not in seen:
                    seen.add(proc.pid)
                    out[label] = out.get(label, 0.0) + _cpu(proc)
        return out

    def seconds(self) -> float:
        return sum(self.by_process().values())


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {label: round(after[label] - before.get(label, 0.0), 3) for label in after}


def _children(proc: psutil.Process, recursive: bool = True) -> list[psutil.Process]:
    try:
        return proc.children(recursive=recursive)
    except psutil.Error:
        return []


def _cpu(proc: psutil.Process) -> float:
    """Own CPU plus that of reaped children, so a pool child that exits is not lost."""
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system + t.children_user + t.children_system


class EngineBeats(threading.Thread):
    """A gpu worker's engine counters from its heartbeats (one every 5 s), each with the length
    of the gpu queue in the broker around the beat, for the GPU-busy fraction.

    A beat counts as "queue full" when the queue held messages at the poll before the beat and
    at the poll that saw it: the worker's threads (FARM_GPU_BATCH of them, prefetch 1) all held
    a job then, so time the engine spent outside model calls was the farm's, not a lack of work.
    Busy fraction = Δbusy_s / Δat between the first and the last such beat."""

    def __init__(self, bench: Bench, worker: str, queue: str = "gpu", poll: float = 0.25) -> None:
        super().__init__(daemon=True, name="engine-beats")
        self.meta, self.worker, self.poll = bench.meta, worker, poll
        self.broker = redis.Redis.from_url(bench.env()["FARM_BROKER_URL"])
        self.keys = queue_keys(queue)
        self.beats: list[dict] = []  # {"at", "queued_before", "queued", "engine"}
        self._halt = threading.Event()

    def run(self) -> None:
        before = 0
        while not self._halt.is_set():
            queued = self._queued()
            beat = next((w for w in self.meta.workers() if w["name"] == self.worker), None)
            if beat and "engine" in beat and (not self.beats or beat["at"] > self.beats[-1]["at"]):
                self.beats.append(
                    {"at": beat["at"], "queued_before": before, "queued": queued,
                     "engine": beat["engine"]}
                )  # fmt: skip
            before = queued
            self._halt.wait(self.poll)

    def _queued(self) -> int:
        pipe = self.broker.pipeline(transaction=False)
        for key in self.keys:
            pipe.llen(key)
        return sum(pipe.execute())

    def stop(self) -> dict:
        """Stop sampling; the busy fraction over the full-queue beats, and every beat seen."""
        self._halt.set()
        self.join(10)
        self.broker.close()
        full = [b for b in self.beats if b["queued_before"] and b["queued"]]
        window = busy_window(full[0], full[-1]) if len(full) >= 2 else {"busy_fraction": None}
        return {**window, "full_queue_beats": len(full), "beats": self.beats}


def busy_window(first: dict, last: dict) -> dict:
    """Between two beats: seconds, seconds inside model calls, their ratio, calls, jobs/call."""
    a, b = first["engine"], last["engine"]
    seconds, busy = last["at"] - first["at"], b["busy_s"] - a["busy_s"]
    calls = b["model_calls"] - a["model_calls"]
    jobs = b["jobs_per_call"] * b["model_calls"] - a["jobs_per_call"] * a["model_calls"]
    return {
        "busy_fraction": busy / seconds,
        "window_s": seconds,
        "busy_s": busy,
        "model_calls": calls,
        "jobs_per_call": jobs / calls if calls else None,
    }


# -- results -------------------------------------------------------------------------------------


def machine_facts() -> dict:
    versions = {}
    for package in VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": _cpu_model(),
        "versions": versions,
        "farm_commit": _farm_commit(),
    }


def _farm_commit() -> str | None:
    """The commit measured, "+dirty" when farm/ had uncommitted changes; None outside git."""
    repo = RESULTS_DIR.parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "farm", "worker_configs"],
            cwd=repo,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return f"{head}+dirty" if head and dirty else head or None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_result(name: str, result: dict, started: float) -> Path:
    """benchmarks/results/<name>.json: name, time, machine, then what the benchmark returned."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    document = {
        "name": name,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 2),
        "machine": machine_facts(),
        **result,
        "rows": [asdict(row) for row in result.get("rows", [])],
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def ratio(farm: float, baseline: float) -> float:
    return farm / baseline if baseline else float("nan")


def print_table(rows: list[Row]) -> None:
    cells = [COLUMNS, *(tuple(_cell(v) for v in asdict(row).values()) for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    for index, line in enumerate(cells):
        print("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return _number(value)
    return str(value)


def _number(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
