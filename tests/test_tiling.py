"""The tile layout, the feathered join and the seam measure of farm.tiling, on synthetic tiles."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from farm.tiling import ALIGN, SEAM_BOUND, blend, seam_ratio, tile_boxes


@pytest.mark.parametrize(("width", "height"), [(256, 256), (512, 136), (40, 304), (1000, 1000)])
def test_tiles_cover_the_image_overlapping_on_the_grid(width, height) -> None:
    boxes = tile_boxes(width, height, 128, 32)
    covered = np.zeros((height, width), dtype=int)
    for box in boxes:
        assert box.right - box.left <= 128 and box.bottom - box.top <= 128
        assert box.left % ALIGN == 0 and box.top % ALIGN == 0
        covered[box.top : box.bottom, box.left : box.right] += 1
    assert covered.min() >= 1
    xs = sorted({b.left for b in boxes})
    side = boxes[0].right - boxes[0].left
    assert all(b - a <= side - 32 for a, b in itertools.pairwise(xs))  # overlap >= 32


def test_sizes_off_the_grid_are_refused() -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        tile_boxes(300, 300, 128, 30)


def test_a_small_image_is_one_tile_of_its_own_size() -> None:
    assert tile_boxes(64, 64, 128, 32) == [(0, 0, 64, 64)]


def test_tiles_that_agree_join_into_exactly_the_image() -> None:
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    boxes = tile_boxes(256, 256, 128, 32)
    tiles = [(b, image[b.top : b.bottom, b.left : b.right]) for b in boxes]
    assert np.array_equal(blend(tiles, 256, 256), image)


def test_the_seam_measure_sees_pasted_tiles_and_not_feathered_ones() -> None:
    """Tiles of a smooth picture, each off by its own colour shift (as renders of two tiles
    differ): pasted, their edges stand out; feathered, they do not."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:256, 0:256]
    picture = np.stack([xx * 0.8, yy * 0.8, (xx + yy) * 0.4], -1) + rng.normal(0, 3, (256, 256, 3))
    boxes = tile_boxes(256, 256, 128, 32)
    tiles = []
    for b in boxes:
        part = picture[b.top : b.bottom, b.left : b.right] + rng.normal(0, 12, 3)
        tiles.append((b, np.clip(part, 0, 255).astype(np.uint8)))
    pasted = np.zeros((256, 256, 3), dtype=np.uint8)
    for b, part in tiles:
        pasted[b.top : b.bottom, b.left : b.right] = part
    assert seam_ratio(pasted, boxes) > 1.5 * SEAM_BOUND
    assert seam_ratio(blend(tiles, 256, 256), boxes) < SEAM_BOUND
