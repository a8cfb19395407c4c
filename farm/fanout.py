"""``fanout``: a built-in probe of the DAG engine, with no model and no input.

``split`` -> N x ``branch-i`` -> ``join``, N from the ``branches`` parameter (the DAG is built
at submit). Each branch "works" for ``steps`` x ``step_seconds``, reporting every step (so it
can be cancelled, or stopped when another branch fails, between steps); the join checks it got
every branch's artifact. ``shape=chain`` runs the same stages one after another instead: the
linear pipeline of the same stage count that benchmarks/overhead.py compares a join with.
Operators use it to see a new farm run branches in parallel before any model is installed.
"""

from __future__ import annotations

import hashlib
import time

from farm.errors import ArtifactCorrupt, InvalidParameter
from farm.pipelines import CPU, Pipeline, StageSpec, is_queue_name, stage
from farm.schema import Param, Params, Schema


@stage(writes="json", reads=())
def split(_artifact, params, _model, _hooks) -> dict:
    return {"branches": params.branches, "seed": params.seed}


@stage(writes="json", reads=("json",))
def branch(artifact, params, _model, hooks) -> dict:
    """One branch's work: a digest chained ``steps`` times from the seed and its own name,
    added to the values of the branches before it (a chain's)."""
    value = hashlib.sha256(f"{artifact['seed']}:{hooks.stage}".encode()).hexdigest()
    for step in range(1, params.steps + 1):
        value = hashlib.sha256(value.encode()).hexdigest()
        if params.step_seconds:
            time.sleep(params.step_seconds)
        hooks.on_step(step, params.steps)
    return {"seed": artifact["seed"], "values": {**artifact.get("values", {}), hooks.stage: value}}


@stage(writes="json", reads=("json",), join=True)
def join(artifacts, params, _model, _hooks) -> dict:
    """Every branch's value, by branch: the integration stage of the fan-out."""
    values = {name: v for artifact in artifacts.values() for name, v in artifact["values"].items()}
    if len(values) != params.branches:
        raise ArtifactCorrupt(f"join got {len(values)} branches' values, not {params.branches}")
    return {"branches": dict(sorted(values.items()))}


def expand(params, _data: bytes | None) -> list[StageSpec]:
    branches = [f"branch-{i}" for i in range(params.branches)]
    dag = [StageSpec("split", CPU, "split")]
    previous = ("split",)
    for name in branches:
        dag.append(StageSpec(name, params.queue, "branch", previous))
        if params.shape == "chain":
            previous = (name,)
    last = previous if params.shape == "chain" else tuple(branches)
    dag.append(StageSpec("join", CPU, "join", last))
    return dag


def _check_queue(params: Params) -> None:
    if not is_queue_name(params.queue):
        raise InvalidParameter(
            f"queue must be a-z, 0-9, '_', '.', '-', at most 32 of them; got {params.queue[:40]!r}"
        )


PARAMS = Schema(
    (
        Param("branches", int, 2, "How many branches run between split and join.", 1, 64),
        Param("steps", int, 1, "Steps each branch reports (it can stop between them).", 1, 10_000),
        Param("step_seconds", float, 0.0, "Seconds each step sleeps: simulated work.", 0, 60),
        Param("queue", str, CPU, "The queue the branches run on (any: probe a worker's)."),
        Param(
            "shape",
            str,
            "fan",
            "fan: branches in parallel; chain: one after another.",
            choices=("fan", "chain"),
        ),
        Param("seed", int, 0, "Seeds every branch's value.", 0, 2**32 - 1),
    ),
    check=_check_queue,
)

FANOUT = Pipeline(
    "fanout",
    stages=tuple(expand(PARAMS.bind(PARAMS.validate({})), None)),
    ops={op.name: op for op in (split, branch, join)},
    params=PARAMS,
    needs_input=False,
    expand=expand,
    help="split -> N branches -> join, no model: shows the farm runs a DAG's branches at once.",
)
