"""Celery task events as a stopwatch that treats the farm and bare Celery alike.

Workers run with ``-E``, so each task reports received / started / succeeded (with its
``runtime``) on the broker's event channel. Both sides of the overhead benchmark send tasks
whose arguments are ``(tag, stage)``: the farm's stage tasks by design (job id, stage), the bare
ping chains because the benchmark gives them the same shape. So one collector times both, with
the same clock (the worker's ``time.time()`` in each event), and no result backend is needed:
the farm stores no results, and turning one on only for the baseline would make the two sides
differ in exactly what is being measured.
"""

from __future__ import annotations

import ast
import threading
import time
from dataclasses import dataclass

from celery import Celery
from celery.events.receiver import EventReceiver

READY_TIMEOUT_S = 10


@dataclass
class TaskTimes:
    """What the events said about one task."""

    name: str
    tag: str
    stage: str
    received: float | None = None
    started: float | None = None
    succeeded: float | None = None
    runtime: float | None = None  # seconds the task function ran, measured by the worker


class _Receiver(EventReceiver):
    """Tells when its consumer is subscribed, so no event sent after that is missed."""

    def __init__(self, *args, ready: threading.Event, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ready = ready

    def on_consume_ready(self, *args, **kwargs) -> None:
        super().on_consume_ready(*args, **kwargs)
        self.ready.set()


class TaskEvents:
    """Collects task events in a background thread while the ``with`` block runs."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.tasks: dict[str, TaskTimes] = {}
        self._pending: dict[str, dict] = {}  # events that arrived before their task-received
        self._succeeded: dict[str, dict[str, float]] = {}  # stage -> tag -> when
        self._lock = threading.Condition()
        self._ready = threading.Event()
        self._receiver: _Receiver | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TaskEvents:
        connection = self.app.connection_for_read()
        handlers = {"task-received": self._on_received, "*": self._on_other}
        self._receiver = _Receiver(connection, handlers=handlers, app=self.app, ready=self._ready)
        self._thread = threading.Thread(target=self._capture, daemon=True, name="bench-events")
        self._thread.start()
        if not self._ready.wait(READY_TIMEOUT_S):
            raise RuntimeError("the Celery event receiver did not subscribe in time")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._receiver is not None and self._thread is not None
        self._receiver.should_stop = True  # checked at least once a second by kombu's loop
        self._thread.join(5)
        self._receiver.connection.release()

    def _capture(self) -> None:
        assert self._receiver is not None
        self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on_received(self, event: dict) -> None:
        tag, stage = _tag_and_stage(event.get("args"))
        times = TaskTimes(event["name"], tag, stage, received=event["timestamp"])
        with self._lock:
            self.tasks[event["uuid"]] = times
            for early in self._pending.pop(event["uuid"], {}).values():
                self._apply(times, early)

    def _on_other(self, event: dict) -> None:
        if event["type"] not in ("task-started", "task-succeeded"):
            return
        with self._lock:
            times = self.tasks.get(event["uuid"])
            if times is None:  # events from different processes may arrive out of order
                self._pending.setdefault(event["uuid"], {})[event["type"]] = event
            else:
                self._apply(times, event)

    def _apply(self, times: TaskTimes, event: dict) -> None:
        """Record one event (the lock is held); wake ``wait`` when a task succeeded."""
        if event["type"] == "task-started":
            times.started = event["timestamp"]
        elif event["type"] == "task-succeeded":
            times.succeeded = event["timestamp"]
            times.runtime = event.get("runtime")
            self._succeeded.setdefault(times.stage, {})[times.tag] = times.succeeded
            self._lock.notify_all()

    def select(self, tags: set[str]) -> list[TaskTimes]:
        with self._lock:
            return [t for t in self.tasks.values() if t.tag in tags]

    def wait(self, tags: set[str], stage: str, timeout: float) -> dict[str, float]:
        """Block until every tag's ``stage`` task has succeeded; returns their finish times.
        Woken by the event handler, so waiting costs no CPU the workers could use."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                seen = self._succeeded.get(stage, {})
                done = {tag: seen[tag] for tag in tags if tag in seen}
                if len(done) == len(tags):
                    return done
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = len(tags) - len(done)
                    raise TimeoutError(f"{missing} of {len(tags)} {stage!r} tasks not done in time")
                self._lock.wait(min(left, 1.0))


def _tag_and_stage(args: object) -> tuple[str, str]:
    """Events carry the task's positional arguments as their repr: ``"('tag', 'stage')"``."""
    try:
        value = ast.literal_eval(args) if isinstance(args, str) else args
    except (ValueError, SyntaxError):
        return "", ""
    if isinstance(value, tuple | list) and len(value) == 2:
        return str(value[0]), str(value[1])
    return "", ""
