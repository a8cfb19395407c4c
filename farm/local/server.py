"""The one interface every local server implements (Redis, Postgres, S3).

A server object wraps its own entry of ``stack.json`` (ports, secrets, pid): the stack reads
and saves the file, the server starts, probes and stops the process the entry describes.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import ClassVar

from farm.local.procs import Json, bindable, free_port, kill_group, running


class Server:
    """One server process of the local stack."""

    name: ClassVar[str]  # its key in stack.json
    process_name: ClassVar[str]  # what `ps` calls it: guards against pid reuse
    port_names: ClassVar[tuple[str, ...]] = ("main",)

    def __init__(self, data_dir: Path, st: Json) -> None:
        self.data_dir = data_dir
        self.st = st

    @classmethod
    def new_state(cls, taken: set[int]) -> Json:
        """A fresh stack.json entry: new ports and secrets, no pid."""
        return {"ports": cls.new_ports(taken), **cls.new_secrets(), "pid": None}

    @classmethod
    def new_ports(cls, taken: set[int]) -> dict[str, int]:
        return {name: free_port(taken) for name in cls.port_names}

    @classmethod
    def new_secrets(cls) -> Json:
        return {}

    # ---- the interface -------------------------------------------------------------------

    def ports(self) -> list[int]:
        """Every TCP port the server holds."""
        return [int(p) for p in self.st["ports"].values()]

    def main_port(self) -> int:
        return int(self.st["ports"]["main"])

    def launch(self) -> int:
        """Start the process; returns its pid (the server may still be booting)."""
        raise NotImplementedError

    def probe(self) -> bool:
        """Does it answer, with our credentials?"""
        raise NotImplementedError

    def prepare(self) -> None:
        """Once it answers: create what the farm needs on it (database, bucket)."""

    def pid(self) -> int | None:
        return self.st.get("pid")

    def request_stop(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def kill(self, pid: int) -> None:
        kill_group(pid)

    def after_stop(self) -> None:
        """Clean up what the stopped process left behind."""

    # ---- shared helpers ------------------------------------------------------------------

    def alive(self) -> bool:
        return running(self.pid(), self.process_name)

    def ports_free(self) -> bool:
        return all(bindable(p) for p in self.ports())

    def directory(self, name: str | None = None, mode: int = 0o700) -> Path:
        path = self.data_dir / (name or self.name)
        path.mkdir(mode=mode, exist_ok=True)
        return path

    def log_path(self) -> Path:
        # 0755: the unprivileged Postgres user must reach its own log file in here
        return self.directory("logs", 0o755) / f"{self.name}.log"
