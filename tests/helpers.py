"""Small shared helpers for the integration tests (images, waiting on progress)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

from PIL import Image, ImageDraw


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
