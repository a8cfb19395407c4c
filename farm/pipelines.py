"""Pipelines: DAGs of stages, each stage on a queue, built at submit from the job's parameters.

This module is the public API for pipeline authors (README "Writing a pipeline"):

- a ``Stage`` is a plain function ``run(artifact, params, model, hooks) -> artifact`` that
  declares the kinds of artifact it reads and writes (farm.storage.kinds) and the model it
  needs, by the name of a loader its pipeline gives;
- a ``StageSpec`` places a stage in a pipeline: its name there, its queue, and the stages in
  its ``after`` whose artifacts it reads. A stage is ready when all of them are done; a stage
  with several gets their artifacts as a dict keyed by their names (the join of a fan-out);
- a ``Pipeline`` is a DAG of specs, its parameter schema and its model loaders. ``expand``,
  when given, builds the DAG from the job's parameters and input (N branches for N seeds or
  tiles); it runs once, at submit, and the job stores what it built (``stage_runs``), so
  workers, resume and the records never derive it again.

Pipelines come from this module (the built-in ones) and from the ``farm.pipelines``
entry-point group of installed packages (farm.plugins). A pipeline is looked up by name in
that registry and never imported from a message or a user string.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Protocol

from farm.errors import ConfigError, FarmError, PipelineInvalid, UnknownPipeline
from farm.schema import RenderSchema, Schema
from farm.storage.kinds import INPUT, KINDS

CPU = "cpu"
GPU = "gpu"
QUEUES = (CPU, GPU)  # the queues of the built-in pipelines; a plugin may name others
SD_MODEL = "sd"  # the loader of the Stable Diffusion bundle (FARM_MODEL, or the tiny one)
# Names that go into keys, queues and records: short, and nothing a path or a shell reads.
# Queue names fit stage_runs.queue (32 characters), the others 64.
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_QUEUE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_OP = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # a key of Pipeline.ops: a function's name, often


class StageHooks(Protocol):
    """What a stage may tell the code running it."""

    stage: str  # the name of the stage being run in its job's DAG (which branch, which tile)

    def on_step(self, step: int, total: int) -> None:
        """Report progress; raises JobCancelled when the job was cancelled or another branch
        failed, so a long stage should call it often (denoise does after every UNet call)."""


StageFn = Callable[[Any, Any, Any, StageHooks], Any]


@dataclass(frozen=True)
class Stage:
    """A plain function and what it declares: the kinds it reads (``"input"``: the submitted
    file's bytes; ``()``: nothing) and writes, and the model it needs, if any.

    A stage reading one stage gets that stage's artifact. A ``join`` stage gets a dict of
    artifacts keyed by the names of the stages in its ``after``, however many there are."""

    name: str
    run: StageFn
    writes: str = "tensors"
    reads: tuple[str, ...] = ("tensors",)
    model: str | None = None  # the name of a loader in its pipeline's ``models``
    join: bool = False

    def __post_init__(self) -> None:
        if self.writes not in KINDS:
            raise PipelineInvalid(f"stage {self.name} writes {self.writes!r}: not a kind")
        unknown = [kind for kind in self.reads if kind not in KINDS and kind != INPUT]
        if unknown:
            raise PipelineInvalid(f"stage {self.name} reads {unknown[0]!r}: not a kind")

    @property
    def needs_model(self) -> bool:
        return self.model is not None


def lazy(module: str, function: str = "run") -> StageFn:
    """``module.function`` as a stage function, imported on its first call: stage modules
    import torch and diffusers, which a client listing or submitting never needs."""

    def run(artifact, params, model, hooks):
        real = getattr(import_module(module), function)
        return real(artifact, params, model, hooks)

    run.__qualname__ = f"{module}.{function}"
    return run


def stage(
    *,
    writes: str = "tensors",
    reads: Iterable[str] = ("tensors",),
    model: str | None = None,
    join: bool = False,
) -> Callable[[StageFn], Stage]:
    """Declare a function a stage: ``@stage(writes="png", reads=("png",))``."""

    def declare(run: StageFn) -> Stage:
        return Stage(run.__name__, run, writes, tuple(reads), model, join)

    return declare


@dataclass(frozen=True)
class StageSpec:
    """One stage of a pipeline's DAG, as its job stores it."""

    name: str  # unique within the job; its stage_runs record and checkpoint key
    queue: str  # which workers run it
    op: str  # the name of its Stage in the pipeline's ``ops``
    after: tuple[str, ...] = ()  # stages whose artifacts this one reads


def ready(dag: Iterable[StageSpec], done: Iterable[str]) -> list[StageSpec]:
    """Stages not done whose inputs are all done: what may run next."""
    done = set(done)
    return [s for s in dag if s.name not in done and set(s.after) <= done]


# A model loader: called once per worker process with the farm's Settings; what it returns is
# handed to every stage of the pipeline that names it.
ModelLoader = Callable[[Any], Any]
Expand = Callable[[Any, bytes | None], Iterable[StageSpec]]


@dataclass(frozen=True)
class Pipeline:
    """A named DAG of stages with its parameters and models.

    ``stages``: the DAG; for a pipeline with ``expand``, the one its default parameters build
    (what ``farm pipelines`` shows). ``ops``: every Stage its DAGs may use, by name. Every
    DAG ends in one stage, whose artifact is the job's output. ``models``: loader name ->
    function of the farm's Settings, run once per worker process (farm.tasks.models).
    """

    name: str
    stages: tuple[StageSpec, ...]
    ops: Mapping[str, Stage]
    params: Schema | RenderSchema = field(default_factory=Schema)
    needs_input: bool = True
    expand: Expand | None = None
    models: Mapping[str, ModelLoader] = field(default_factory=dict)
    help: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise PipelineInvalid(f"pipeline name {self.name!r}: use a-z, 0-9, '_', '.', '-'")
        self.check(self.stages)

    def dag(self, params: Any, data: bytes | None) -> tuple[StageSpec, ...]:
        """The stages a job with these bound parameters and input runs, checked."""
        if self.expand is None:
            return self.stages
        try:
            dag = tuple(self.expand(params, data))
        except FarmError:
            raise
        except Exception as exc:  # the plugin's own code: a bug there is not the user's input
            raise PipelineInvalid(
                f"pipeline {self.name}: building its stages failed: {type(exc).__name__}: {exc}"
            ) from exc
        return self.check(dag)

    def check(self, dag: tuple[StageSpec, ...]) -> tuple[StageSpec, ...]:
        """A DAG this pipeline can run: names unique and safe, every ``after`` a stage of it,
        no cycle, every op known and fed the kinds it reads. Returned in a topological order."""
        check_dag(self.name, dag)
        by_name = {s.name: s for s in dag}
        for spec in dag:
            self._check_feeds(spec, by_name)
        return dag

    def _check_feeds(self, spec: StageSpec, by_name: Mapping[str, StageSpec]) -> None:
        op = self.op(spec.op)
        if len(spec.after) > 1 and not op.join:
            raise PipelineInvalid(
                f"pipeline {self.name}: stage {spec.name} reads {len(spec.after)} stages, but "
                f"{op.name} is not declared join=True (it would get only the first)"
            )
        fed = [self.op(by_name[name].op).writes for name in spec.after] or [INPUT]
        if spec.after or self.needs_input:
            wrong = [kind for kind in fed if kind not in op.reads]
        else:
            wrong = [] if not op.reads or INPUT in op.reads else [INPUT]
        if wrong:
            raise PipelineInvalid(
                f"pipeline {self.name}: stage {spec.name} ({op.name}) reads "
                f"{', '.join(op.reads) or 'nothing'}, but is given {wrong[0]}"
            )
        if op.model is not None and op.model != SD_MODEL and op.model not in self.models:
            raise PipelineInvalid(
                f"pipeline {self.name}: stage {spec.name} needs model {op.model!r}, "
                "which the pipeline has no loader for"
            )

    def op(self, name: str) -> Stage:
        try:
            return self.ops[name]
        except KeyError:
            raise PipelineInvalid(f"pipeline {self.name} has no stage function {name!r}") from None

    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise KeyError(f"pipeline {self.name!r} has no stage {name!r}")

    def queues(self) -> set[str]:
        return {spec.queue for spec in self.stages}

    @property
    def output_suffix(self) -> str:
        """The file suffix of its output (``.png``): the kind its final stage writes."""
        return "." + KINDS[self.op(self.stages[-1].op).writes].suffix


def check_dag(pipeline: str, dag: tuple[StageSpec, ...]) -> None:
    """Structure only: unique, safe names and queues; ``after`` names stages of the DAG
    listed before it, so stored positions are a topological order and no cycle can be
    written; one final stage, whose artifact is the job's output."""
    if not dag:
        raise PipelineInvalid(f"pipeline {pipeline} has no stages")
    seen: set[str] = set()
    for spec in dag:
        if not isinstance(spec, StageSpec) or not all(
            isinstance(v, str) for v in (spec.name, spec.op, spec.queue, *spec.after)
        ):
            raise PipelineInvalid(f"pipeline {pipeline}: {spec!r} is not a StageSpec of names")
        names = (("stage", spec.name, _NAME), ("op", spec.op, _OP), ("queue", spec.queue, _QUEUE))
        for what, name, pattern in names:
            if not pattern.match(name):
                raise PipelineInvalid(f"pipeline {pipeline}: {what} name {name!r} is not allowed")
        if spec.name in seen:
            raise PipelineInvalid(f"pipeline {pipeline}: two stages are named {spec.name}")
        unknown = [name for name in spec.after if name not in seen]
        if unknown:
            raise PipelineInvalid(
                f"pipeline {pipeline}: stage {spec.name} comes after {unknown[0]}, "
                "which is not a stage listed before it"
            )
        seen.add(spec.name)
    read = {name for spec in dag for name in spec.after}
    finals = [spec.name for spec in dag if spec.name not in read]
    if len(finals) != 1:
        raise PipelineInvalid(
            f"pipeline {pipeline} must end in one stage that joins the others; "
            f"{', '.join(finals)} are all final"
        )


def is_queue_name(text: str) -> bool:
    """Whether ``text`` may name a queue: a-z, 0-9, '_', '.', '-', at most 32 of them."""
    return bool(_QUEUE.match(text))


def check_queue_names(names: Iterable[str]) -> list[str]:
    """Queue names a worker was given (``--queues audio,cpu``), checked; ConfigError if not."""
    queues = [name.strip() for name in names if name.strip()]
    bad = [name for name in queues if not is_queue_name(name)]
    if bad or not queues:
        raise ConfigError(
            f"queue names are a-z, 0-9, '_', '.', '-', at most 32; got {bad[0] if bad else ''!r}"
        )
    return queues


def linear(
    name: str, steps: list[tuple[str, str, str]], ops: Mapping[str, Stage], **kw: Any
) -> Pipeline:
    """Chain ``(stage, queue, op)`` triples, each stage reading the one before it."""
    specs, previous = [], ()
    for stage_name, queue, op in steps:
        specs.append(StageSpec(stage_name, queue, op, previous))
        previous = (stage_name,)
    return Pipeline(name, tuple(specs), ops, **kw)


class _Registry:
    """Every pipeline by name: the built-in ones, then the installed plugins' (loaded once,
    on first use, so importing farm never runs a plugin's code)."""

    def __init__(self) -> None:
        self._pipelines: dict[str, Pipeline] | None = None

    def all(self) -> dict[str, Pipeline]:
        if self._pipelines is None:
            from farm.builtin import BUILTIN
            from farm.plugins import load_plugins

            pipelines = {p.name: p for p in BUILTIN}
            for pipeline in load_plugins(set(pipelines)):
                pipelines[pipeline.name] = pipeline
            self._pipelines = pipelines
        return self._pipelines

    def get(self, name: object) -> Pipeline:
        pipelines = self.all()
        if isinstance(name, str) and name in pipelines:
            return pipelines[name]
        known = ", ".join(sorted(pipelines))
        raise UnknownPipeline(f"Unknown pipeline {str(name)[:60]!r}. Choose one of: {known}.")


_REGISTRY = _Registry()


def get_pipeline(name: object) -> Pipeline:
    """A pipeline by name; anything not registered is refused (UNKNOWN_PIPELINE), never
    imported."""
    return _REGISTRY.get(name)


def all_pipelines() -> dict[str, Pipeline]:
    """Every registered pipeline by name: the built-in ones and the installed plugins'."""
    return dict(_REGISTRY.all())


def all_queues() -> set[str]:
    """Every queue a registered pipeline names."""
    return {queue for p in all_pipelines().values() for queue in p.queues()}
