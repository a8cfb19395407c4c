"""Pipeline specs as data: named stages, each with its queue, its operation and what it reads.

A stage reads the artifacts of the stages in its ``after``; a stage becomes ready when all of
them are done. Today's pipelines are linear, but the same spec carries parallel branches joined
by a final stage (``after=("image", "audio")``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from farm.errors import UnknownPipeline

CPU = "cpu"
GPU = "gpu"
QUEUES = (CPU, GPU)


@dataclass(frozen=True)
class StageSpec:
    """One step of a pipeline."""

    name: str  # unique within the pipeline; the stage_runs record name
    queue: str  # which worker role runs it
    op: str  # key into farm.stages.STAGES (the plain function that does the work)
    after: tuple[str, ...] = ()  # stages whose artifacts this one reads


@dataclass(frozen=True)
class Pipeline:
    """An ordered set of stages; the first stage reads the submitted input."""

    name: str
    stages: tuple[StageSpec, ...]
    needs_input: bool = True

    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise KeyError(f"pipeline {self.name!r} has no stage {name!r}")

    def queues(self) -> set[str]:
        return {spec.queue for spec in self.stages}

    def ready(self, done: Iterable[str]) -> list[StageSpec]:
        """Stages not done whose inputs are all done: what to enqueue next."""
        done = set(done)
        return [s for s in self.stages if s.name not in done and set(s.after) <= done]


def linear(name: str, steps: list[tuple[str, str, str]], *, needs_input: bool = True) -> Pipeline:
    """Chain ``(stage, queue, op)`` triples, each stage reading the one before it."""
    specs, previous = [], ()
    for stage, queue, op in steps:
        specs.append(StageSpec(stage, queue, op, previous))
        previous = (stage,)
    return Pipeline(name, tuple(specs), needs_input)


IMG2IMG = linear(
    "img2img",
    [
        ("preprocess", CPU, "preprocess"),
        ("encode", GPU, "encode"),  # feature extraction
        ("noise", GPU, "noise"),  # noise injection
        ("denoise", GPU, "denoise"),
        ("decode", GPU, "decode"),
        ("postprocess", CPU, "postprocess"),
    ],
)

TXT2IMG = linear(
    "txt2img",
    [
        ("noise", GPU, "noise_txt2img"),  # pure noise from the seed, full schedule
        ("denoise", GPU, "denoise"),
        ("decode", GPU, "decode"),
        ("postprocess", CPU, "postprocess"),
    ],
    needs_input=False,
)

# Six stages that only carry a small artifact along the same queues as img2img: what the farm's
# own machinery costs per stage (benchmarks/overhead.py).
NOOP = linear(
    "noop",
    [(f"noop{i}", queue, "noop") for i, queue in enumerate([CPU, GPU, GPU, GPU, GPU, CPU], 1)],
)

PIPELINES: dict[str, Pipeline] = {p.name: p for p in (IMG2IMG, TXT2IMG, NOOP)}


def get_pipeline(name: object) -> Pipeline:
    """Look a pipeline up by name; anything not in the registry is rejected, never imported."""
    if isinstance(name, str) and name in PIPELINES:
        return PIPELINES[name]
    known = ", ".join(sorted(PIPELINES))
    raise UnknownPipeline(f"Unknown pipeline {str(name)[:60]!r}. Choose one of: {known}.")
