"""Tiles of one big image: where they lie, how they are joined again, and how seams are measured.

The ``upscale`` pipeline renders an image too big for one model call as overlapping tiles, each
on whichever gpu worker takes it, and joins them here. Three decisions live in this module:

- **Layout** (``tile_boxes``): per axis, the fewest tiles of the model's native size that
  overlap by at least ``overlap`` pixels, spread evenly from edge to edge. The layout is a pure
  function of the image's size, so the submitter (which names one stage per tile), each tile
  stage (which cuts its own) and the blend agree without passing it around. A rotated image has
  the same number of tiles, so counting them from an image header before EXIF orientation is
  safe.
- **Join** (``blend``): each tile weighs its pixels with a window that ramps linearly from 0 to
  1 across the overlap on every side it shares with a neighbour (and stays 1 at the image's
  border), and every output pixel is the weighted mean of the tiles covering it. Two tiles that
  disagree a little in their overlap fade into each other over ``overlap`` pixels instead of
  meeting at a line.
- **Seam measure** (``seam_ratio``): the mean absolute step between neighbouring pixels across
  every line where a tile begins or ends, divided by the same mean over the image's other lines
  on the ALIGN grid. A seam makes steps there larger than elsewhere, so the ratio rises above
  1; a joined image without seams has about 1. The tests hold the output to ``SEAM_BOUND``.

Numpy only: the client imports the layout to count tiles at submit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

ALIGN = 8  # tile sides are multiples of this: the VAE downsampling of SD models (2 for tiny)
MAX_TILES = 64  # per job: a DAG of hundreds of stages is a folder of jobs in disguise
# seam_ratio of a blended upscale stays under this: measured 0.92-1.20 on the tiny model,
# where the same tiles pasted without blending measure 1.8-2.6 (README "Upscale").
SEAM_BOUND = 1.3


class Box(NamedTuple):
    """A tile's place: left, top, right, bottom, in pixels (right and bottom exclusive)."""

    left: int
    top: int
    right: int
    bottom: int


def tile_boxes(width: int, height: int, tile: int, overlap: int) -> list[Box]:
    """The tiles covering a ``width`` x ``height`` image, row by row. Every length is a multiple
    of ALIGN, so tiles start on the latent grid."""
    if any(n % ALIGN for n in (width, height, tile, overlap)):
        raise ValueError(f"tile layout: sizes must be multiples of {ALIGN}")
    tw, th = _side(tile, width), _side(tile, height)
    return [
        Box(x, y, x + tw, y + th)
        for y in _starts(height, th, overlap)
        for x in _starts(width, tw, overlap)
    ]


def tile_count(width: int, height: int, tile: int, overlap: int) -> int:
    return len(tile_boxes(width, height, tile, overlap))


def _side(tile: int, length: int) -> int:
    """The tile side along an axis: the model's size, or the image's where that is smaller."""
    return min(tile, length)


def _starts(length: int, side: int, overlap: int) -> list[int]:
    """Evenly spread starts of the fewest tiles of ``side`` that overlap by >= ``overlap``.
    In units of ALIGN, starts are rounded means, so no gap exceeds ``side - overlap``."""
    if length <= side:
        return [0]
    span, stride = (length - side) // ALIGN, max(1, (side - overlap) // ALIGN)
    count = math.ceil(span / stride) + 1
    return [round(i * span / (count - 1)) * ALIGN for i in range(count)]


def blend(tiles: list[tuple[Box, np.ndarray]], width: int, height: int) -> np.ndarray:
    """The feathered join of ``(box, HxWx3 uint8 pixels)`` tiles: a uint8 image."""
    total = np.zeros((height, width, 3), dtype=np.float32)  # 16 bytes a pixel, with weight
    weight = np.zeros((height, width, 1), dtype=np.float32)
    boxes = [box for box, _ in tiles]
    for box, pixels in tiles:
        window = _window(box, boxes)[..., None]
        total[box.top : box.bottom, box.left : box.right] += pixels * window
        weight[box.top : box.bottom, box.left : box.right] += window
    return np.clip(np.round(total / weight), 0, 255).astype(np.uint8)


def _window(box: Box, boxes: list[Box]) -> np.ndarray:
    """Weights over ``box``: ramps across what it shares with each neighbour, 1 elsewhere.
    Tiles form a grid, so a vertical neighbour has the same left, a horizontal one the same top."""
    above_below = [(b.top, b.bottom) for b in boxes if b.left == box.left and b.top != box.top]
    either_side = [(b.left, b.right) for b in boxes if b.top == box.top and b.left != box.left]
    return np.outer(
        _ramp(box.top, box.bottom, above_below), _ramp(box.left, box.right, either_side)
    )


def _ramp(start: int, end: int, neighbours: list[tuple[int, int]]) -> np.ndarray:
    """1-D weights over [start, end): rising across the part shared with an earlier neighbour,
    falling across the part shared with a later one. Never 0, so every pixel has weight."""
    centres = np.arange(start, end) + 0.5
    ramp = np.ones(end - start)
    for other_start, other_end in neighbours:
        if other_start < start < other_end:
            ramp = np.minimum(ramp, (centres - start) / (other_end - start))
        elif other_start < end < other_end:
            ramp = np.minimum(ramp, (end - centres) / (end - other_start))
    return np.clip(ramp, 0.0, 1.0)


def seam_ratio(pixels: np.ndarray, boxes: list[Box]) -> float:
    """Mean |step| between neighbouring pixels across the tiles' inner edges, over the mean
    |step| across the other lines of the ALIGN grid: ~1 without seams.

    Both sides of the ratio sit on the same grid because a model leaves its own faint
    pattern there (its layers downsample in blocks that start at each tile's corner)."""
    image = pixels.astype(np.float64)
    height, width = image.shape[:2]
    at_edges, elsewhere = [], []
    for axis, length, edges in (
        (1, width, {e for b in boxes for e in (b.left, b.right)}),
        (0, height, {e for b in boxes for e in (b.top, b.bottom)}),
    ):
        steps = np.abs(np.diff(image, axis=axis)).mean(axis=(1 - axis, 2))  # [i]: i | i+1
        for line in range(ALIGN, length, ALIGN):
            (at_edges if line in edges else elsewhere).append(steps[line - 1])
    if not at_edges or not elsewhere or np.mean(elsewhere) == 0:
        return 1.0
    return float(np.mean(at_edges) / np.mean(elsewhere))
