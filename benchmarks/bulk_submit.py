"""Bulk submit: ``Farm.submit_folder`` on folders of 1,000, 2,500 and 5,000 tiny PNGs.

Each submission runs in a fresh subprocess so its peak RSS (VmHWM) is its own: the rate is
files / seconds spent in ``submit_folder``, and memory is flat when the peak grows by (nearly)
nothing per extra file. The baseline, in its own fresh subprocess on the same folder just
before, does the least any submitter must: read each file and send one Celery message for it
(no object store, no database). No workers run: the queued messages are purged after each
submission. Every image is distinct (16x16 random pixels), so no idempotency key repeats.

Profile one submission with ``python -m benchmarks.bulk_submit --child farm FOLDER --profile``
(needs the FARM_* environment of a running farm, e.g. after ``farm up``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from sqlalchemy import event

from benchmarks.harness import Bench, CpuClock, Row, cpu_delta, noise_png, ratio
from benchmarks.meter import Meter, swap
from farm import Farm, Settings
from farm import folder as batch_module
from farm.db.session import get_engine
from farm.tasks import dispatch
from farm.tasks.app import app, configure

NAME = "bulk_submit"
SIZES = (1000, 2500, 5000)
GOAL_RATE = 500  # jobs/s, from the issue
# "Flat": the peak grows by less than this per extra file, far below one file's bytes (~850 B).
FLAT_BYTES_PER_FILE = 256
IMAGE_SIDE = 16
PARAMS = {"size": 64, "steps": 20}
CHILD_TIMEOUT_S = 900
REPO = Path(__file__).resolve().parents[1]
# Timed on submit_folder's own thread, one after another: what is left of the wall time is
# reading files, waiting for the upload pool, hashing and Python.
TIMED = ("postgres txn", "broker send", "redis command")


def run(bench: Bench) -> dict:
    farm = Farm(bench.settings())
    env = {**os.environ, **bench.env()}
    results = []
    offset = 0
    cpu = CpuClock(bench, [])  # the children are this process's: counted once reaped
    for size in SIZES:
        folder = make_folder(bench.root / "bulk" / f"n{size}", size, offset)
        offset += size
        pair = {side: run_child(side, folder, env, cpu) for side in ("bare", "farm")}
        app.control.purge()  # no workers here: drop what was queued
        results.append({"files": size, **pair})
    _check_counts(farm, results)
    return summarise(results)


def make_folder(folder: Path, count: int, offset: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"img{i:05d}.png").write_bytes(noise_png(IMAGE_SIDE, offset + i))
    return folder


def run_child(side: str, folder: Path, env: dict[str, str], cpu: CpuClock) -> dict:
    """One submission in a fresh process; CPU is the child's plus the servers' (its imports
    and start-up included, the same on both sides)."""
    command = [sys.executable, "-m", "benchmarks.bulk_submit", "--child", side, str(folder)]
    before = cpu.by_process()
    done = subprocess.run(
        command,
        cwd=REPO,  # where ``benchmarks`` is importable, wherever this was started from
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{side} submission failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["cpu_s_by_process"] = cpu_delta(before, cpu.by_process())
    return result


def _check_counts(farm: Farm, results: list[dict]) -> None:
    for result in results:
        counts = farm.batch(result["farm"]["batch_id"]).counts()
        result["farm"]["jobs_recorded"] = counts.total
        if counts.total != result["files"]:
            raise RuntimeError(f"batch recorded {counts.total} jobs for {result['files']} files")


def summarise(results: list[dict]) -> dict:
    largest = results[-1]
    farm_rate, bare_rate = largest["farm"]["jobs_per_s"], largest["bare"]["jobs_per_s"]
    slope = rss_slope(results)
    cpu_ms = {side: cpu_ms_per_extra_job(results, side) for side in ("farm", "bare")}
    flat = slope < FLAT_BYTES_PER_FILE
    met = farm_rate >= GOAL_RATE and flat
    return {
        "parameters": {"sizes": list(SIZES), "image": f"{IMAGE_SIDE}x{IMAGE_SIDE} PNG", **PARAMS},
        "results": results,
        "peak_rss_growth_bytes_per_file": slope,
        "cpu_ms_per_extra_job": cpu_ms,
        "ratio": ratio(farm_rate, bare_rate),
        "goal": f">= {GOAL_RATE} jobs/s and peak RSS flat "
        f"(< {FLAT_BYTES_PER_FILE} B per extra file)",
        "met": met,
        "rows": [
            Row(NAME, f"jobs/s ({largest['files']} files)", farm_rate, bare_rate,
                ratio(farm_rate, bare_rate), f">= {GOAL_RATE}/s", farm_rate >= GOAL_RATE),
            Row(NAME, "peak RSS MiB (1k -> 5k)", largest["farm"]["peak_rss_kib"] / 1024,
                results[0]["farm"]["peak_rss_kib"] / 1024, None,
                f"< {FLAT_BYTES_PER_FILE} B/file", flat),
        ],
    }  # fmt: skip


def cpu_ms_per_extra_job(results: list[dict], side: str) -> dict[str, float]:
    """CPU ms per job by process, from the smallest folder to the largest: the slope leaves
    out what every run pays once (interpreter start, imports, connections)."""
    first, last = results[0][side]["cpu_s_by_process"], results[-1][side]["cpu_s_by_process"]
    extra = results[-1]["files"] - results[0]["files"]
    split = {label: 1000 * (last[label] - first.get(label, 0.0)) / extra for label in last}
    return {**{k: round(v, 3) for k, v in split.items()}, "total": round(sum(split.values()), 3)}


def rss_slope(results: list[dict]) -> float:
    """Bytes of peak RSS per extra file, from the smallest folder to the largest."""
    first, last = results[0], results[-1]
    grown_kib = last["farm"]["peak_rss_kib"] - first["farm"]["peak_rss_kib"]
    return 1024 * grown_kib / (last["files"] - first["files"])


# -- the child processes -------------------------------------------------------------------------


def child(side: str, folder: Path, profile: bool) -> dict:
    settings = Settings.from_env()
    submit = _farm_submitter(settings) if side == "farm" else _bare_submitter(settings)
    rss_before = _status_kib("VmRSS")
    profiler = cProfile.Profile(time.process_time) if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    outcome = submit(folder)
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - started
    files = sum(1 for _ in folder.iterdir())
    out = {
        "side": side,
        "files": files,
        "seconds": elapsed,
        "jobs_per_s": files / elapsed,
        "rss_before_kib": rss_before,
        "peak_rss_kib": _status_kib("VmHWM"),
        **outcome,
    }
    if profiler:
        out["profile"] = _top(profiler)
    return out


def _farm_submitter(settings: Settings):
    farm = Farm(settings)

    def submit(folder: Path) -> dict:
        meter = Meter()
        with ExitStack() as undo:
            _install(meter, farm, undo)
            started = time.perf_counter()
            batch = farm.submit_folder(folder, **PARAMS)
            total_ms = 1000 * (time.perf_counter() - started)
        files = sum(1 for _ in folder.iterdir())
        return {"batch_id": batch.id, "ms_per_job": meter.per(files, total_ms, TIMED)}

    return submit


def _install(meter: Meter, farm: Farm, undo: ExitStack) -> None:
    """Stopwatches on what submit_folder does per chunk on its own thread (the database, the
    broker, Redis), and on each upload in the pool (those overlap: not part of ``rest``)."""
    for name in ("session_scope", "transaction"):
        scope = meter.timed_scope("postgres txn", getattr(batch_module, name))
        swap(undo, batch_module, name, scope)
    swap(undo, dispatch, "send_stage", meter.timed("broker send", dispatch.send_stage))
    client = farm.ctx.meta.redis
    swap(undo, client, "execute_command", meter.timed("redis command", client.execute_command))
    store = type(farm.ctx.store)
    swap(
        undo,
        store,
        "put",
        meter.timed(f"artifact put (in {batch_module.UPLOAD_THREADS} threads)", store.put),
    )
    engine = get_engine(farm.ctx.db_url)
    event.listen(engine, "before_cursor_execute", meter.count_statement)
    undo.callback(event.remove, engine, "before_cursor_execute", meter.count_statement)


def _bare_submitter(settings: Settings):
    configure(settings)

    def submit(folder: Path) -> dict:
        for path in sorted(folder.iterdir()):
            data = path.read_bytes()
            app.send_task("farm.cpu.ping", args=(path.name, len(data)), queue="cpu")
        return {}

    return submit


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmHWM: the peak resident set so far)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _top(profiler: cProfile.Profile, lines: int = 40) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(lines)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bulk_submit")
    parser.add_argument("--child", choices=("farm", "bare"), required=True)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--profile", action="store_true", help="cProfile the submission")
    args = parser.parse_args(argv)
    result = child(args.child, args.folder, args.profile)
    if "profile" in result:
        print(result.pop("profile"), file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
