"""Aspect buckets: a short table, symmetric between landscape and portrait."""

from __future__ import annotations

import itertools
import math

import pytest

from farm.buckets import BUCKETS, snap_aspect


def test_the_table_is_landscape_and_its_portrait_mirrors() -> None:
    assert len(BUCKETS) == 11
    assert BUCKETS[:6] == ((1, 2), (9, 16), (2, 3), (3, 4), (4, 5), (1, 1))
    assert {(h, w) for w, h in BUCKETS} == set(BUCKETS)


@pytest.mark.parametrize(("width", "height"), BUCKETS)
def test_a_bucket_snaps_to_itself(width: int, height: int) -> None:
    assert snap_aspect(width / height) == width / height


@pytest.mark.parametrize("aspect", [1.05, 1.118, 1.2, 1.41, 1.7, 1.9, 2.5, 20.0])
def test_portrait_snaps_as_its_landscape_mirror(aspect: float) -> None:
    assert snap_aspect(1 / aspect) == pytest.approx(1 / snap_aspect(aspect))


def test_the_cover_crop_loses_at_most_a_tenth_within_two_to_one() -> None:
    # An input halfway in log-aspect between neighbours a < b keeps sqrt(a / b) of its picture.
    aspects = [width / height for width, height in BUCKETS]
    lost = sorted(1 - math.sqrt(a / b) for a, b in itertools.pairwise(aspects))
    # The documented worst cases: 3:2 to 16:9 and 1:1 to 5:4, landscape and portrait.
    assert lost[-4:] == pytest.approx([0.081, 0.081, 0.106, 0.106], abs=5e-4)
