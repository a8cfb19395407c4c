"""Polling until something is finished: the loop behind Job.wait and Batch.wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_NOTHING = object()


def poll_until(
    read: Callable[[], T],
    finished: Callable[[T], bool],
    *,
    timeout: float | None,
    poll: float,
    report: Callable[[T], None] | None = None,
    what: str = "it",
) -> T:
    """Call ``read`` every ``poll`` seconds until ``finished``; TimeoutError after ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        value = read()
        if report is not None:
            report(value)
        if finished(value):
            return value
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{what} unfinished after {timeout} s: {value}")
        time.sleep(poll)


def on_change(callback: Callable[[T], None]) -> Callable[[T], None]:
    """``callback``, called only with a value unequal to the one it was last called with: a
    progress callback hears of each change once, not of every poll."""
    last: object = _NOTHING

    def report(value: T) -> None:
        nonlocal last
        if value != last:
            last = value
            callback(value)

    return report
