"""Per-step progress and cancel flags of every job in the engine: one Redis round trip per tick.

A stage's step hook leaves its progress here and reads its job's cancel flag as of the last
round trip (so a cancel is seen a tick later than without the engine). When a tick starts the
engine wakes this thread, which writes every job's progress and reads every job's cancel flag in
one pipeline. Its own thread, so the GPU never waits for Redis; best-effort, like all live
state, so a Redis outage costs progress, never a render.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from farm.errors import MetadataError, RedisAuthError
from farm.storage.metadata import Metadata

log = logging.getLogger(__name__)


class Reporter(threading.Thread):
    def __init__(self, meta: Metadata | None) -> None:
        super().__init__(daemon=True, name="farm-engine-progress")
        self.meta = meta
        self._lock = threading.Lock()
        self._reports: dict[str, dict[str, str | int | float]] = {}
        self._watched: Counter[str] = Counter()  # jobs with stages in the engine: how many
        self._cancelled: set[str] = set()
        self._wake = threading.Event()
        self._stopped = False

    def report(self, job_id: str, fields: dict[str, str | int | float]) -> bool:
        """Leave ``fields`` for the next round trip; whether the job was cancelled, as known."""
        with self._lock:
            self._reports[job_id] = fields
            return job_id in self._cancelled

    def watch(self, job_id: str) -> None:
        """A stage of the job entered the engine: read its cancel flag on every round trip."""
        with self._lock:
            self._watched[job_id] += 1

    def forget(self, job_id: str) -> None:
        """A stage of the job left. When its last one has, its progress not yet written is
        dropped (the stage that follows writes its own) and so is what is known of its cancel
        flag (a resumed job starts afresh)."""
        with self._lock:
            self._watched[job_id] -= 1
            if self._watched[job_id] <= 0:
                del self._watched[job_id]
                self._reports.pop(job_id, None)
                self._cancelled.discard(job_id)

    def tick(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopped:
                return
            try:
                self._round_trip()
            except Exception:  # this thread must outlive any Redis answer: cancels depend on it
                log.exception("progress round trip failed")

    def _round_trip(self) -> None:
        with self._lock:
            reports, self._reports = self._reports, {}
            watched = sorted(self._watched)
            self._cancelled &= set(watched)
        if self.meta is None or not (reports or watched):
            return
        try:
            cancelled = self.meta.report_steps(reports, watched)
        except (MetadataError, RedisAuthError) as exc:
            log.debug("progress of %d jobs skipped: %s", len(reports), exc)
            return
        with self._lock:
            self._cancelled = cancelled & set(self._watched)
