"""`farm workers`: the live workers, from their Redis heartbeats, with each gpu engine's totals."""

from __future__ import annotations

import json
import time

import typer
from rich.table import Table

from farm.api import Farm
from farm.cli.app import TIMES, app, console


@app.command()
def workers(as_json: bool = typer.Option(False, "--json", help="The heartbeats as JSON.")) -> None:
    """Live workers: role, queues, heartbeat age; for a gpu worker its engine's model calls,
    mean jobs per call, batch cap (lowered by out-of-memory errors) and busy fraction."""
    beats = Farm.from_env().workers()
    if as_json:
        console.print_json(json.dumps(beats))
        return
    table = Table("worker", "role", "queues", "beat", "model calls", "cap", "busy")
    for beat in beats:
        engine = beat.get("engine") or {}
        table.add_row(
            beat["name"],
            str(beat.get("role", "")),
            ",".join(beat.get("queues", [])),
            f"{time.time() - beat['at']:.0f} s ago",
            *_engine_columns(engine, beat["at"]),
        )
    console.print(table)


def _engine_columns(engine: dict, at: float) -> tuple[str, str, str]:
    if not engine:
        return "", "", ""
    calls = f"{engine['model_calls']} {TIMES} {engine['jobs_per_call']:.1f} jobs"
    cap = f"{engine['batch_cap']}/{engine['batch_limit']}"
    if engine["out_of_memory"]:
        cap += f" ({engine['out_of_memory']} OOM)"
    wall = max(at - engine["started_at"], 1e-9)
    return calls, cap, f"{engine['busy_s'] / wall:.0%}"
