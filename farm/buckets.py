"""Aspect buckets: the few aspect ratios an output takes when its aspect comes from the input.

Why: the GPU engine batches the denoise steps of different jobs into one UNet call, and jobs
share a call only when their latents have the same shape. Were every output to keep its input's
exact aspect, a folder of photos would give as many shapes as it has aspect ratios and nothing
would batch. Snapping the aspect to the nearest of ``BUCKETS`` (as SDXL's aspect buckets do)
leaves at most ``len(BUCKETS)`` shapes per long side.

What it costs: the picture is fitted to the bucket by the job's ``fit`` (see
farm.stages.preprocess), so ``cover``, the default, crops the difference, centred. Photos in
one of the formats below lose nothing but the multiple-of-8 rounding; the worst case within
2:1 is an input halfway (in log-aspect) between two neighbours, which loses up to 8.1% of the
picture, or 10.6% between 1:1 and 5:4 (an input of about 1.12:1). An input wider than 2:1 (or
taller than 1:2) snaps to 2:1 and loses more: a 4:1 panorama keeps its middle half.
"""

from __future__ import annotations

import math

# Formats pictures come in, so that most inputs land on a bucket exactly: 1:1 square, 5:4 the
# 8x10 print and Instagram's 4:5 portrait, 4:3 phones and compacts, 3:2 35 mm and DSLRs, 16:9
# video frames and screens. 2:1 is the widest: it takes panoramas and phone screenshots
# (19.5:9 loses 8%), and stopping there keeps the short side at least half the long one, the
# pixel count between N² and N²/2 for a long side N. Each but 1:1 also serves portrait, mirrored.
_LANDSCAPE = ((1, 1), (5, 4), (4, 3), (3, 2), (16, 9), (2, 1))

# (width, height) ratios, tallest first: the 6 landscape ones and their 5 portrait mirrors.
BUCKETS: tuple[tuple[int, int], ...] = tuple(
    sorted({*_LANDSCAPE, *((h, w) for w, h in _LANDSCAPE)}, key=lambda ratio: ratio[0] / ratio[1])
)


def snap_aspect(aspect: float) -> float:
    """The bucket's width / height nearest ``aspect`` in log-aspect, in which 2:1 and 1:2 are
    equally far from 1:1."""
    target = math.log(aspect)
    width, height = min(BUCKETS, key=lambda ratio: abs(math.log(ratio[0] / ratio[1]) - target))
    return width / height
