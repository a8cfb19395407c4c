"""A stage that holds its worker for ``params.hold_ms`` milliseconds and does nothing else.

The ``sleep`` pipeline puts it on the gpu queue: a stand-in for a model call of a realistic
length that costs no CPU, so that many simulated GPU hosts fit on one small machine
(benchmarks/cluster.py). It carries its input through unchanged, like ``noop``.
"""

from __future__ import annotations

import time

from farm.stages.base import Artifact, StageHooks


def run(artifact: Artifact | None, params, model, hooks: StageHooks) -> Artifact:
    time.sleep(params.hold_ms / 1000)
    hooks.on_step(1, 1)
    return dict(artifact or {})
