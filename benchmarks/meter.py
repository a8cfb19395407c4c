"""A stopwatch per category of calls, installed by swapping attributes for timed wrappers.

The benchmarks use it to say where the farm's time goes without editing farm/: a wrapper
around the store's put, the runner's database transactions, a Redis client's commands...
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any


class Meter:
    """Milliseconds and calls per category, filled by the wrappers it hands out."""

    def __init__(self) -> None:
        self.ms: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()  # wrappers may run in a thread pool (uploads)

    def add(self, category: str, ms: float) -> None:
        with self._lock:
            self.ms[category] += ms
            self.calls[category] += 1

    def timed(self, category: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(category, 1000 * (time.perf_counter() - started))

        return wrapper

    def timed_scope(
        self, category: str, scope: Callable[..., AbstractContextManager]
    ) -> Callable[..., AbstractContextManager]:
        @contextmanager
        def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            started = time.perf_counter()
            try:
                with scope(*args, **kwargs) as value:
                    yield value
            finally:
                self.add(category, 1000 * (time.perf_counter() - started))

        return wrapper

    def count_statement(self, *_: Any) -> None:
        """A SQLAlchemy ``before_cursor_execute`` listener (the pool's pre-ping is not seen)."""
        with self._lock:
            self.calls["sql statements"] += 1

    def per(self, count: int, total_ms: float, timed: tuple[str, ...]) -> dict:
        """ms and calls per unit (stage, job) by category; ``rest`` is the wall time left once
        the ``timed`` categories (those that ran one after another on this thread) are out."""
        out: dict[str, dict] = {
            name: {
                "ms": self.ms[name] / count if name in self.ms else None,  # None: counted only
                "calls": self.calls[name] / count,
            }
            for name in sorted(set(self.ms) | set(self.calls))
        }
        rest = total_ms - sum(self.ms[name] for name in timed)
        out["rest"] = {"ms": rest / count, "calls": None}
        return out


def swap(undo: ExitStack, owner: object, name: str, value: object) -> None:
    """Set ``owner.name = value`` until ``undo`` closes (classes, modules and instances)."""
    if isinstance(owner, type) or name in vars(owner):
        undo.callback(setattr, owner, name, vars(owner)[name])
    else:  # an instance using its class's attribute: drop the instance's copy afterwards
        undo.callback(delattr, owner, name)
    setattr(owner, name, value)
