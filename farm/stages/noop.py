"""A stage that does no work: it carries its input through unchanged.

The ``noop`` pipeline is six of these; it measures what the farm itself costs per stage
(message, artifact read and write, records, progress) with no model in the way.
"""

from __future__ import annotations

import torch

from farm.models import ModelBundle
from farm.params import RenderParams
from farm.stages.base import Artifact, StageHooks


def run(
    artifact: Artifact | None, params: RenderParams, model: ModelBundle | None, hooks: StageHooks
) -> Artifact:
    if isinstance(artifact, bytes):  # the first stage wraps the submitted bytes
        return {"payload": torch.frombuffer(bytearray(artifact), dtype=torch.uint8)}
    hooks.on_step(1, 1)
    return dict(artifact or {})
