"""Draw the example inputs in examples/inputs/ (procedural, so free of any licence).

python examples/make_inputs.py
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).parent / "inputs"
SIZE = 256


def landscape() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    for y in range(SIZE):  # sky fading to the horizon
        draw.line([(0, y), (SIZE, y)], fill=(40 + y // 3, 90 + y // 4, 200 - y // 4))
    draw.ellipse((170, 40, 220, 90), fill=(255, 210, 90))
    draw.polygon(
        [(0, 200), (70, 110), (140, 190), (200, 120), (256, 180), (256, 256), (0, 256)],
        fill=(60, 90, 60),
    )
    return image


def circles() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (245, 240, 230))
    draw = ImageDraw.Draw(image)
    for i, radius in enumerate(range(120, 0, -15)):
        colour = (200 - i * 20, 60 + i * 20, 120 + i * 15)
        draw.ellipse((128 - radius, 128 - radius, 128 + radius, 128 + radius), fill=colour)
    return image


def house() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (170, 210, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 190, SIZE, SIZE), fill=(90, 160, 70))
    draw.rectangle((70, 120, 190, 200), fill=(200, 80, 60))
    draw.polygon([(60, 120), (130, 60), (200, 120)], fill=(110, 60, 40))
    draw.rectangle((115, 150, 145, 200), fill=(70, 40, 30))
    return image


def clouds() -> Image.Image:
    rng = random.Random(7)
    small = Image.new("L", (16, 16))
    small.putdata([rng.randrange(256) for _ in range(256)])
    soft = small.resize((SIZE, SIZE), Image.BICUBIC).filter(ImageFilter.GaussianBlur(6))
    return Image.merge(
        "RGB", (soft, soft.point(lambda v: v // 2 + 100), Image.new("L", soft.size, 230))
    )


def stripes() -> Image.Image:
    image = Image.new("RGB", (SIZE, 192))  # not square: preprocess crops to the requested size
    draw = ImageDraw.Draw(image)
    for x in range(0, SIZE, 16):
        draw.rectangle((x, 0, x + 8, 192), fill=(30 + x % 200, 40, 200 - x % 180))
    return image


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    landscape().save(OUT / "landscape.png")
    circles().save(OUT / "circles.png")
    house().save(OUT / "house.jpg", quality=90)
    clouds().save(OUT / "clouds.webp", quality=90)
    stripes().save(OUT / "stripes.png")
    print(f"wrote {len(list(OUT.iterdir()))} images to {OUT}")


if __name__ == "__main__":
    main()
