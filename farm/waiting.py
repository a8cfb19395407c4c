"""Waiting on the farm: polling until something is finished (the loop behind Job.wait and
Batch.wait), and riding out an outage of Postgres, Redis or S3 on the way, as workers do."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from farm.errors import TransientError

T = TypeVar("T")
_NOTHING = object()
# Between tries of a blocking call while its service is down: a refused connection costs
# nothing, and a client that notices the service back within a second finishes sooner.
RETRY_S = 1.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outage:
    """A service a client is waiting for: ``began`` on its first failed try, ``lasts`` on
    each later one, ``over`` once a call went through again."""

    service: str
    reason: str
    seconds: float  # since the first failed try
    phase: Literal["began", "lasts", "over"]

    def __str__(self) -> str:
        if self.phase == "over":
            return f"{self.service} is back after {self.seconds:.0f} s"
        if self.phase == "began":
            return f"waiting for {self.service}: {self.reason}"
        return f"waiting for {self.service} (unavailable for {self.seconds:.0f} s): {self.reason}"


def log_outage(outage: Outage) -> None:
    """What an API caller hears of an outage: one line when it begins, one when it is over."""
    if outage.phase != "lasts":
        log.warning("%s", outage)


class Patience:
    """Rides out an outage for a client: a call that fails with a TransientError is tried
    again until it goes through, for up to ``limit_s`` seconds of one outage (then the error is
    raised). ``on_wait`` hears of every failed try and of the end of the outage.

    Use one per kind of call (records, live progress): a call going through ends the outage."""

    def __init__(self, limit_s: float, on_wait: Callable[[Outage], None] = log_outage) -> None:
        self.limit_s, self.on_wait = limit_s, on_wait
        self.outage: Outage | None = None
        self._since = 0.0
        self._last: TransientError | None = None  # the error of the current outage

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, tried again every RETRY_S seconds while its service is down."""
        while True:
            value = self.try_call(fn, _NOTHING)
            if value is not _NOTHING:
                return value
            time.sleep(RETRY_S)

    def try_call(self, fn: Callable[[], T], default: T) -> T:
        """``fn()``, or ``default`` if its service is down (for what can wait a poll)."""
        try:
            value = fn()
        except TransientError as exc:
            if self._failed(exc).seconds > self.limit_s:
                raise
            return default
        if self.outage is not None:
            self.outage = None
            self.on_wait(self._outage(self._last, "over"))
        return value

    def _failed(self, exc: TransientError) -> Outage:
        began = self.outage is None or self.outage.service != exc.service
        if began:
            self._since = time.monotonic()
        self._last = exc
        self.outage = self._outage(exc, "began" if began else "lasts")
        self.on_wait(self.outage)
        return self.outage

    def _outage(self, exc: TransientError, phase: Literal["began", "lasts", "over"]) -> Outage:
        return Outage(exc.service, exc.message, time.monotonic() - self._since, phase)


def poll_until(
    read: Callable[[], T],
    finished: Callable[[T], bool],
    *,
    timeout: float | None,
    poll: float,
    patience: Patience,
    report: Callable[[T], None] | None = None,
    what: str = "it",
) -> T:
    """Call ``read`` every ``poll`` seconds until ``finished``; TimeoutError after ``timeout``.
    A read that fails while a service is down is tried again at the next poll (``patience``)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        value = patience.try_call(read, _NOTHING)
        if value is not _NOTHING:
            if report is not None:
                report(value)
            if finished(value):
                return value
        if deadline is not None and time.monotonic() > deadline:
            state = patience.outage or value
            raise TimeoutError(f"{what} unfinished after {timeout} s: {state}")
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
