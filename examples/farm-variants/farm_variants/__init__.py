"""``variants``: an example farm pipeline plugin (README "Writing a pipeline").

    load -> variant-<filter> x N (in parallel) -> sheet

``load`` fits the input into a thumbnail; one branch per filter named in ``filters`` (the DAG
is built at submit from that parameter) applies it ``passes`` times, reporting each pass, so
a cancel or another branch's failure stops it between passes; ``sheet`` joins every variant
into one labelled contact sheet. The ``tone`` filter uses a model loaded once per worker
process: here a tone curve, standing in for the weights a real plugin would load.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFilter, ImageOps

from farm import InvalidParameter, Param, Pipeline, Schema, StageSpec, stage

FILTERS = {
    "blur": lambda im, _: im.filter(ImageFilter.GaussianBlur(2)),
    "contour": lambda im, _: im.filter(ImageFilter.CONTOUR),
    "edges": lambda im, _: im.filter(ImageFilter.FIND_EDGES),
    "emboss": lambda im, _: im.filter(ImageFilter.EMBOSS),
    "sharpen": lambda im, _: im.filter(ImageFilter.SHARPEN),
    "grayscale": lambda im, _: ImageOps.grayscale(im).convert("RGB"),
    "posterize": lambda im, _: ImageOps.posterize(im, 3),
    "mirror": lambda im, _: ImageOps.mirror(im),
    "tone": lambda im, curve: im.point(curve),
}
TONE_MODEL = "tone-curve"


def load_tone_curve(_settings) -> list[int]:
    """The pipeline's model: built once per worker process, then kept warm."""
    lift = [min(255, round(255 * (i / 255) ** 0.7)) for i in range(256)]
    return lift * 3  # one curve per RGB channel, as Image.point takes it


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@stage(reads=("input",), writes="png")
def load(data, params, _model, _hooks) -> bytes:
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    image.thumbnail((params.size, params.size))
    return _png(image)


@stage(reads=("png",), writes="png", model=TONE_MODEL)
def variant(data, params, model, hooks) -> bytes:
    """This branch's filter (its stage name says which), ``passes`` times."""
    name = hooks.stage.removeprefix("variant-")
    image = _image(data)
    for done in range(1, params.passes + 1):
        image = FILTERS[name](image, model)
        hooks.on_step(done, params.passes)
    return _png(image)


@stage(reads=("png",), writes="png", join=True)
def sheet(variants, params, _model, _hooks) -> bytes:
    """Every variant in a grid, labelled, in the order the filters were given."""
    tiles = [(name.removeprefix("variant-"), _image(data)) for name, data in variants.items()]
    width = max(t.width for _, t in tiles)
    height = max(t.height for _, t in tiles) + 16
    columns = min(params.columns, len(tiles))
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    draw = ImageDraw.Draw(grid)
    for i, (label, tile) in enumerate(tiles):
        x, y = (i % columns) * width, (i // columns) * height
        grid.paste(tile, (x, y + 16))
        draw.text((x + 4, y + 2), label, fill="black")
    return _png(grid)


def filter_names(params) -> list[str]:
    """The filters asked for: known, different, at least one (checked at submit)."""
    names = [name.strip() for name in params.filters.split(",") if name.strip()]
    unknown = [name for name in names if name not in FILTERS]
    if unknown or not names or len(set(names)) != len(names):
        raise InvalidParameter(
            f"filters must name different filters from {', '.join(FILTERS)}; got {params.filters!r}"
        )
    return names


def expand(params, _data: bytes | None) -> list[StageSpec]:
    """One branch per filter: the DAG depends on the job's parameters."""
    names = filter_names(params)
    branches = [StageSpec(f"variant-{name}", "cpu", "variant", ("load",)) for name in names]
    joined = tuple(b.name for b in branches)
    return [StageSpec("load", "cpu", "load"), *branches, StageSpec("sheet", "cpu", "sheet", joined)]


PARAMS = Schema(
    (
        Param("filters", str, "blur,edges,emboss", f"Comma-separated: {', '.join(FILTERS)}."),
        Param("passes", int, 1, "How many times each filter is applied.", 1, 200),
        Param("size", int, 256, "Long side of each variant, in pixels.", 16, 2048),
        Param("columns", int, 3, "Variants per row of the sheet.", 1, 16),
    ),
    check=filter_names,
)

PIPELINE = Pipeline(
    "variants",
    stages=tuple(expand(PARAMS.bind(PARAMS.validate({})), None)),
    ops={op.name: op for op in (load, variant, sheet)},
    params=PARAMS,
    expand=expand,
    models={TONE_MODEL: load_tone_curve},
    help="Filtered variants of the input, in parallel, joined into one contact sheet.",
)
