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

from farm.errors import MetadataError, RedisAuthError
from farm.storage.metadata import Metadata

log = logging.getLogger(__name__)


class Reporter(threading.Thread):
    def __init__(self, meta: Metadata | None) -> None:
        super().__init__(daemon=True, name="farm-engine-progress")
        self.meta = meta
        self._lock = threading.Lock()
        self._reports: dict[str, dict[str, str | int | float]] = {}
        self._watched: set[str] = set()  # jobs with a stage in the engine
        self._cancelled: set[str] = set()
        self._wake = threading.Event()
        self._stopped = False

    def report(self, job_id: str, fields: dict[str, str | int | float]) -> bool:
        """Leave ``fields`` for the next round trip; whether the job was cancelled, as known."""
        with self._lock:
            self._reports[job_id] = fields
            self._watched.add(job_id)
            return job_id in self._cancelled

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._watched.discard(job_id)

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
            self._round_trip()

    def _round_trip(self) -> None:
        with self._lock:
            reports, self._reports = self._reports, {}
            watched = sorted(self._watched)
        if self.meta is None or not (reports or watched):
            return
        try:
            cancelled = self.meta.report_steps(reports, watched)
        except (MetadataError, RedisAuthError) as exc:
            log.debug("progress of %d jobs skipped: %s", len(reports), exc)
            return
        with self._lock:
            self._cancelled = cancelled
