"""The GPU engine: in a gpu worker, every job's model calls go through one thread that batches
them, so the GPU runs one call for many jobs instead of batch 1.

Stages do not know about it. A stage that runs inside ``joined`` gets a model bundle whose UNet,
VAE and text encoder hand each call to the engine and wait for their rows of a batched call
(farm.engine.calls); everything else a stage does (its scheduler, its generator, its progress)
stays its own. Outside a gpu worker there is no engine and a stage calls the model directly.

This module imports no torch: the runner asks it on every stage, in clients too.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from farm.engine.core import Engine, Member
    from farm.storage.metadata import Metadata

# The largest difference, in 8-bit levels of any pixel channel, between a job rendered in a
# batch and the same job alone: batched kernels round differently. Measured by
# benchmarks/batch_bound.py (README, "GPU batching", Reproducibility); tests compare within it.
PIXEL_BOUND = 2

_engine: Engine | None = None
_lock = threading.Lock()


def start(cap: int, meta: Metadata | None) -> Engine:
    """Start this process's engine (once): at most ``cap`` jobs per model call."""
    global _engine
    from farm.engine.core import Engine

    with _lock:
        if _engine is None:
            _engine = Engine(cap, meta)
            _engine.start()
        return _engine


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error (torch.OutOfMemoryError), told without importing torch."""
    return any(
        cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("torch")
        for cls in type(exc).__mro__
    )


def current() -> Engine | None:
    return _engine


def stop() -> None:
    global _engine
    with _lock:
        if _engine is not None:
            _engine.stop()
        _engine = None


@contextlib.contextmanager
def joined(job_id: str, stage: str, model: Any) -> Iterator[tuple[Any, Member | None]]:
    """The model as a stage of (job, stage) should call it, and its membership of the engine's
    batches (None when there is no engine, or the model is not one it batches)."""
    engine = _engine
    if engine is None or not engine.batches(model):
        yield model, None
        return
    with engine.member(job_id, stage) as member:
        yield engine.wrap(model), member
