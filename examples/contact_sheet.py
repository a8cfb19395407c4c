"""One picture of a demo run: the inputs in the top row, one row of outputs per folder below.

python examples/contact_sheet.py demo-output/contact-sheet.png examples/inputs \\
    "strength 0.3=demo-output/strength-0.3" "strength 0.75=demo-output"

Outputs are matched to inputs by file stem (``farm render`` writes ``OUT/<stem>.png``); a
missing one leaves its cell empty. Each cell shows the whole picture, scaled to fit.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

CELL = 128
LABEL_WIDTH = 110
BACKGROUND = (255, 255, 255)
INK = (40, 40, 40)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def contact_sheet(inputs: Path, rows: list[tuple[str, Path]]) -> Image.Image:
    files = sorted(p for p in inputs.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    lines = [("input", files)]
    lines += [(label, [folder / f"{p.stem}.png" for p in files]) for label, folder in rows]
    sheet = Image.new("RGB", (LABEL_WIDTH + CELL * len(files), CELL * len(lines)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for row, (label, paths) in enumerate(lines):
        draw.text((6, row * CELL + CELL // 2 - 6), label, fill=INK)
        for column, path in enumerate(paths):
            if path.is_file():
                cell = ImageOps.contain(_upright(path), (CELL - 4, CELL - 4))
                offset = ((CELL - cell.width) // 2, (CELL - cell.height) // 2)
                position = (LABEL_WIDTH + column * CELL + offset[0], row * CELL + offset[1])
                sheet.paste(cell, position)
    return sheet


def _upright(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.exit(__doc__)
    target, inputs, *specs = argv
    rows = [(label, Path(folder)) for label, _, folder in (s.partition("=") for s in specs)]
    sheet = contact_sheet(Path(inputs), rows)
    # 256 colours keep the sheet small enough to commit (docs/demo-contact-sheet.png).
    sheet.quantize(256, dither=Image.Dither.NONE).save(target, optimize=True)
    print(f"contact sheet: {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
