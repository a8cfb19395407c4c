"""Pipelines from installed packages: the ``farm.pipelines`` entry-point group.

A package declares, in its pyproject.toml::

    [project.entry-points."farm.pipelines"]
    variants = "farm_variants:PIPELINE"

The object named is a ``Pipeline``, a list of them, or a function returning either. Workers
and clients load the group once, when a pipeline is first looked up; what is loaded is what
the operator installed, never a module a message or a user string names. A plugin that fails
to load, or would replace a pipeline already registered, is left out and its error kept for
``farm pipelines`` to show: one broken package must not stop a worker serving the others.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points

from farm.errors import PipelineInvalid
from farm.pipelines import Pipeline

log = logging.getLogger(__name__)

GROUP = "farm.pipelines"
# entry point name -> why it was left out
_errors: dict[str, str] = {}


def load_plugins(taken: set[str]) -> list[Pipeline]:
    """The pipelines of every installed plugin, each name once, none replacing ``taken``."""
    loaded: list[Pipeline] = []
    for point in sorted(entry_points(group=GROUP), key=lambda p: p.name):
        try:
            pipelines = list(_pipelines_of(point))
        except Exception as exc:  # a plugin's own code: anything may go wrong in it
            _left_out(point, f"{type(exc).__name__}: {exc}")
            continue
        for pipeline in pipelines:
            if pipeline.name in taken:
                _left_out(point, f"pipeline {pipeline.name!r} is registered already")
                continue
            taken.add(pipeline.name)
            loaded.append(pipeline)
    return loaded


def _pipelines_of(point: EntryPoint) -> Iterable[Pipeline]:
    found = point.load()
    if callable(found) and not isinstance(found, Pipeline):
        found = found()
    found = [found] if isinstance(found, Pipeline) else list(found)
    wrong = [type(p).__name__ for p in found if not isinstance(p, Pipeline)]
    if wrong:
        raise PipelineInvalid(f"{point.value} gives a {wrong[0]}, not a farm.pipelines.Pipeline")
    return found


def _left_out(point: EntryPoint, why: str) -> None:
    _errors[point.name] = why
    log.warning("pipeline plugin %s (%s) left out: %s", point.name, point.value, why)


def plugin_errors() -> dict[str, str]:
    """Plugins left out, by entry-point name, and why."""
    return dict(_errors)
