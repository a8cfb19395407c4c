"""Bare tasks with no farm machinery: a liveness probe per queue, and the baseline the
overhead benchmark compares the farm's own stages against (same broker, same workers)."""

from __future__ import annotations

from farm.tasks.app import app


@app.task(name="farm.cpu.ping")
def cpu_ping(*_: object) -> str:
    return "pong"


@app.task(name="farm.gpu.ping")
def gpu_ping(*_: object) -> str:
    return "pong"
