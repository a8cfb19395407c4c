"""The models stages run with, loaded once per worker process.

A stage names a loader of its pipeline (``Stage.model``); ``sd`` is the Stable Diffusion
bundle of FARM_MODEL (or the tiny built-in one), which farm.models caches itself. Any other
loader runs once per process and pipeline, under a lock, since a threads-pool worker may start
two stages at once; what it returns stays warm for every later stage.
"""

from __future__ import annotations

import threading
from typing import Any

from farm.config import Settings
from farm.errors import FarmError, ModelError
from farm.pipelines import SD_MODEL, Pipeline

_loaded: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


def load(pipeline: Pipeline, name: str, settings: Settings) -> Any:
    if name == SD_MODEL:
        from farm.models import load_model  # torch + diffusers: only where a stage needs them

        with _lock:  # the first stages of a threads-pool worker may ask at the same moment
            return load_model(settings.model, settings.data_dir)
    key = (pipeline.name, name)
    with _lock:
        if key not in _loaded:
            _loaded[key] = _run_loader(pipeline, name, settings)
        return _loaded[key]


def _run_loader(pipeline: Pipeline, name: str, settings: Settings) -> Any:
    try:
        return pipeline.models[name](settings)
    except FarmError:
        raise
    except Exception as exc:  # a plugin's loader: its own code, its own failures
        raise ModelError(
            f"pipeline {pipeline.name}: model {name!r} failed to load: {type(exc).__name__}: {exc}"
        ) from exc
