"""``upscale``: one image rendered larger by many gpu workers at once.

``split`` (cpu) resizes the input up by ``scale``; one ``tile-i`` stage (gpu) per tile re-renders
its part at low strength; ``blend`` (cpu) joins them, feathered (farm.tiling). How many tiles
depends on the image, so the DAG is built at submit from the input's header: a 64 px image at
scale 4 on the tiny model (128 px tiles, 32 px overlap) is 9 tiles. The tiles are independent
stages, so every gpu worker takes some, a killed worker's tile is the only one sent again, and
adding GPUs renders one image faster.

The tile side is the render's ``size``, which defaults to the model's native size; its other
render parameters (prompt, steps, strength, guidance, scheduler, seed) apply to every tile.
"""

from __future__ import annotations

from farm.errors import InvalidParameter
from farm.image_checks import MAX_PIXELS, header_size
from farm.pipelines import CPU, GPU, SD_MODEL, Pipeline, Stage, StageSpec, lazy
from farm.schema import Param, RenderSchema
from farm.tiling import ALIGN, MAX_TILES, tile_count

SCALES = (2, 4)
DEFAULT_OVERLAP = 32


_STAGES = "farm.stages.upscale"
OPS = {
    "split": Stage("split", lazy(_STAGES, "split"), writes="png", reads=("input",)),
    "tile": Stage("tile", lazy(_STAGES, "tile"), reads=("png",), model=SD_MODEL),
    "blend": Stage("blend", lazy(_STAGES, "blend"), writes="png", join=True),
}


def scaled_size(width: int, height: int, scale: int) -> tuple[int, int]:
    """The output's size: ``scale`` times the input's, each side rounded to a multiple of
    ALIGN so every tile starts on the latent grid (a 65 px side at scale 2 gives 128)."""
    return (_align(width * scale), _align(height * scale))


def _align(side: int) -> int:
    return max(ALIGN, round(side / ALIGN) * ALIGN)


def expand(params, data: bytes | None) -> list[StageSpec]:
    width, height = scaled_size(*header_size(data or b""), params.scale)  # header only
    if width * height > MAX_PIXELS:
        raise InvalidParameter(
            f"upscale: {width}x{height} px is over the {MAX_PIXELS:,} pixels an output may have; "
            "use a smaller scale or image"
        )
    count = tile_count(width, height, params.size, params.overlap)
    if count > MAX_TILES:
        raise InvalidParameter(
            f"upscale: {width}x{height} px needs {count} tiles of {params.size} px, over the "
            f"cap of {MAX_TILES} per job; use a smaller scale or image, or a larger size"
        )
    return _dag(count)


def _dag(count: int) -> list[StageSpec]:
    tiles = [StageSpec(f"tile-{i}", GPU, "tile", ("split",)) for i in range(count)]
    blend = StageSpec("blend", CPU, "blend", tuple(spec.name for spec in tiles))
    return [StageSpec("split", CPU, "split"), *tiles, blend]


def _check(params) -> None:
    if params.scale not in SCALES:
        raise InvalidParameter(f"scale must be 2 or 4, got {params.scale}")
    if params.width is not None or params.height is not None:
        raise InvalidParameter("upscale's tiles are square: give size (the tile side), not width")
    if params.overlap % ALIGN:
        raise InvalidParameter(f"overlap must be a multiple of {ALIGN} px, got {params.overlap}")
    if params.overlap * 2 > params.size:
        raise InvalidParameter(
            f"overlap must be at most half the tile side ({params.size // 2} px), "
            f"got {params.overlap}"
        )


PARAMS = RenderSchema(
    img2img=True,
    extra=(
        Param("scale", int, 2, "How many times larger: 2 or 4 (3 is refused).", 2, 4),
        Param("overlap", int, DEFAULT_OVERLAP, "Pixels neighbouring tiles share.", ALIGN, 1024),
    ),
    defaults={"strength": 0.3, "steps": 20},
    help={
        "strength": "0-1: how far each tile may move from the enlarged input (0.3).",
        "steps": "Denoising steps, 1-500 (20).",
        "size": "Tile side in px (default: the model's native size); width and height: refused.",
    },
    check=_check,
)

UPSCALE = Pipeline(
    "upscale",
    stages=tuple(_dag(4)),
    ops=OPS,
    params=PARAMS,
    expand=expand,
    help="One image made 2x or 4x larger, its tiles re-rendered on every gpu worker at once.",
)
