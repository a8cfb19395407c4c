"""Small shared helpers for the integration tests (images, waiting on progress)."""

from __future__ import annotations

import base64
import io
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from farm.engine import PIXEL_BOUND
from farm.local.workers import start_worker, wait_ready


def sample_png(size: int = 64, hue: int = 0) -> bytes:
    """A small synthetic picture with structure (gradient + shapes), deterministic."""
    image = Image.new("RGB", (size, size))
    pixels = image.load()
    for y in range(size):
        for x in range(size):
            pixels[x, y] = ((x * 4 + hue) % 256, (y * 4) % 256, (x + y + hue) % 256)
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(250, 220, 40))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def wait_until(condition: Callable[[], bool], timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_step(job, stage: str, step: int, timeout: float = 60) -> None:
    """Until the job's live progress shows ``stage`` at ``step`` or later."""

    def reached() -> bool:
        p = job.progress()
        return p.stage == stage and p.step >= step

    wait_until(reached, timeout, f"{job.id} to reach {stage} step {step}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    url: str, auth: str | None = None, method: str = "GET", ca: Path | None = None
) -> tuple[int, str]:
    """(status, body); an https URL is verified against ``ca`` only (not the system's)."""
    request = urllib.request.Request(url, method=method)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    context = ssl.create_default_context(cafile=ca) if ca else None
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


@contextmanager
def running_console(
    args: list[str], env: dict[str, str], log_path: Path, url: str, ca: Path | None = None
) -> Iterator[subprocess.Popen]:
    """`farm ARGS` (a console) with ``env`` added to this process's, as a user starts it:
    yields the process once ``url`` answers (over https trusting ``ca`` only), stops it after."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "farm", *args],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: proc.poll() is not None or _answers(url, ca), 60, f"{args[0]} to listen")
        assert proc.poll() is None, f"farm {args[0]} exited: {log_path.read_text()}"
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def running_flower(
    farm_env: dict[str, str], password: str, log_path: Path, ca: Path | None = None
) -> Iterator[tuple]:
    """`farm flower` with basic auth (user farm): yields (base URL, the process). With ``ca``,
    ``farm_env`` holds the consoles' TLS settings and Flower answers over https."""
    port = free_port()
    base = f"{'https' if ca else 'http'}://127.0.0.1:{port}"
    env = {**farm_env, "FARM_FLOWER_PASSWORD": password}
    with running_console(["flower", "--port", str(port)], env, log_path, base + "/", ca) as proc:
        yield base, proc


def _answers(url: str, ca: Path | None = None) -> bool:
    try:
        return http(url, ca=ca)[0] in (200, 401)
    except OSError:
        return False


def pixels(png: bytes) -> np.ndarray:
    """RGB pixels, signed, so that two pictures can be subtracted."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def within_bound(a: np.ndarray, b: np.ndarray) -> bool:
    """The same picture up to batching: same size, every channel within farm.engine.PIXEL_BOUND
    (a job rendered in a batch and alone round differently; alone they are bit-exact)."""
    return a.shape == b.shape and int(np.abs(a - b).max()) <= PIXEL_BOUND


def same_render(png: bytes, reference: bytes) -> bool:
    return within_bound(pixels(png), pixels(reference))


class ExtraWorkers:
    """Workers beside the session's, of one role and the queues given (its own by default),
    with ``env`` added to the session's settings, stopped after the test."""

    def __init__(
        self, pool, role: str, queues: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> None:
        self.pool, self.role, self.queues, self.started = pool, role, queues, []
        self.env = {**pool.env, **(env or {})}

    def start(self, count: int = 1) -> None:
        new = [
            start_worker(self.role, self.env, self.pool.log_dir, self.queues) for _ in range(count)
        ]
        self.started += new
        wait_ready(self.pool.meta, new)

    def named(self, name: str):
        return next(w for w in self.started if w.name == name)

    def kill(self, worker) -> None:
        worker.kill()
        self.pool.meta.forget_worker(worker.name)

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()
            self.pool.meta.forget_worker(worker.name)
