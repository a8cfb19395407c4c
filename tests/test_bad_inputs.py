"""The bad-input catalog (README, Reliability: bad inputs and their codes), one test a case.

Each case calls the code that judges it directly: the preprocess stage for what needs decoding
(worker side), farm.inputs for what is checked before upload (submit side), RenderParams and the
pipeline registry for parameters. tests/test_bad_inputs_folder.py renders all of it as one folder
through the real farm.
"""

from __future__ import annotations

import importlib
import io
import math
import os
import resource
import struct
import sys
import threading
import time
import unicodedata
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from farm import image_checks
from farm.errors import InvalidImage, InvalidParameter, UnknownPipeline
from farm.image_checks import MAX_ASPECT, MAX_PIXELS
from farm.inputs import (
    MAX_INPUT_BYTES,
    InputFile,
    check_bytes,
    read_image_bytes,
    read_input,
    scan_folder,
)
from farm.params import RenderParams
from farm.pipelines import all_pipelines, get_pipeline
from farm.stages import STAGES, NoHooks
from farm.stages.preprocess import prepare_image, to_rgb

# -- making bad files ------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise_image(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """Incompressible pixels, so that cutting the file cuts pixel data, not padding."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def raw_png(width: int, height: int, depth: int, colour: int, idat: bytes) -> bytes:
    """A PNG written by hand: any header, any (already compressed) pixel stream."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"".join(
        [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header), _chunk(b"IDAT", idat), _chunk(b"IEND", b"")]
    )


def crafted_png(width: int, height: int) -> bytes:
    """A 1-bit PNG whose header claims width x height; a few hundred bytes, no real pixels."""
    return raw_png(width, height, 1, 0, zlib.compress(b"\x00" * 64))


def bomb_png(side: int = 14000) -> bytes:
    """A genuine, complete side x side black greyscale PNG: ~190 KB that decode to side² bytes."""
    row = b"\x00" * (side + 1)  # filter byte + one byte per pixel
    packer = zlib.compressobj(1)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return raw_png(side, side, 8, 0, idat)


def sixteen_bit_png(colour: int, pixel: tuple[int, ...], size: int = 64) -> bytes:
    """A 16-bit-per-channel PNG of one colour (Pillow cannot write 16-bit colour PNGs)."""
    row = b"\x00" + struct.pack(f">{len(pixel)}H", *pixel) * size
    return raw_png(size, size, 16, colour, zlib.compress(row * size))


def params(**overrides: object) -> RenderParams:
    return RenderParams.from_dict({"size": 64, "steps": 4, **overrides})


def prepared(data: bytes, **overrides: object) -> np.ndarray:
    return np.asarray(prepare_image(data, params(**overrides)))


def preprocess_error(data: bytes, **overrides: object) -> InvalidImage:
    """What the worker-side stage raises for these bytes (it must raise InvalidImage)."""
    with pytest.raises(InvalidImage) as raised:
        STAGES["preprocess"].run(data, params(**overrides), None, NoHooks())
    assert_one_human_sentence(raised.value.message)
    return raised.value


def assert_one_human_sentence(message: str) -> None:
    """What a user sees: one line, a sentence that ends in what to do; no traceback or repr."""
    assert message and message[0].isupper() and message.endswith("."), message
    assert "\n" not in message and "Traceback" not in message, message
    assert "object at 0x" not in message and "Error:" not in message, message
    assert ";" in message, f"no advice after the problem: {message}"
    assert len(message) < 300, message


# -- zero bytes, not an image, formats outside the allowlist ------------------------------------


def test_zero_byte_file_is_not_an_image_at_submit_and_in_the_worker() -> None:
    with pytest.raises(InvalidImage) as raised:
        check_bytes(b"", "empty.png")
    assert raised.value.code == "INPUT_NOT_IMAGE"
    assert_one_human_sentence(raised.value.message)
    assert preprocess_error(b"").code == "INPUT_NOT_IMAGE"


@pytest.mark.parametrize(
    "data",
    [
        b"Dear farm, this is a letter, not a PNG.\n",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"<!doctype html><title>x</title>",
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
        b"BM not really a bitmap",
    ],
    ids=["text", "svg", "html", "pdf", "bm-text"],
)
def test_text_renamed_png_is_not_an_image(data: bytes) -> None:
    assert preprocess_error(data).code == "INPUT_NOT_IMAGE"


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX", "SGI", "DDS", "QOI"])
def test_formats_outside_the_allowlist_are_refused_even_if_pillow_reads_them(fmt: str) -> None:
    data = encode(Image.new("RGB", (64, 64), (10, 20, 30)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would decode it
    assert preprocess_error(data).code == "INPUT_NOT_IMAGE"


def test_no_other_module_turned_on_loading_truncated_images() -> None:
    for module in ("farm.models", "farm.tasks", "diffusers", "transformers"):  # a worker's
        importlib.import_module(module)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# -- truncated and damaged ----------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9])
def test_truncated_png_is_corrupt(fraction: float) -> None:
    data = encode(noise_image())
    assert preprocess_error(data[: int(len(data) * fraction)]).code == "INPUT_CORRUPT"


def test_png_cut_inside_its_header_is_corrupt_not_unknown() -> None:
    data = encode(noise_image())
    assert preprocess_error(data[:40]).code == "INPUT_CORRUPT"


@pytest.mark.parametrize("cut", [0.5, 0.9, "no-end-marker"])
def test_truncated_jpeg_is_corrupt(cut: float | str) -> None:
    data = encode(noise_image(), "JPEG", quality=90)
    data = data[:-2] if cut == "no-end-marker" else data[: int(len(data) * float(cut))]
    error = preprocess_error(data)
    assert error.code == "INPUT_CORRUPT"
    assert "truncated" in error.message


def test_garbage_inside_the_pixel_stream_is_corrupt() -> None:
    data = encode(noise_image())
    start = data.index(b"IDAT") + 8
    assert preprocess_error(data[:start] + bytes(300) + data[start + 300 :]).code == "INPUT_CORRUPT"


# -- decompression bombs and the pixel cap ------------------------------------------------------


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = bomb_png(14000)  # 196 megapixels
    assert len(bomb) < 1_000_000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    error = preprocess_error(bomb)
    assert error.code == "INPUT_TOO_LARGE"
    assert time.perf_counter() - started < 1.0
    # Decoding it would take 196 MB; the peak did not move by anything like that.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000


@pytest.mark.parametrize(
    "side",
    [20000, 10000, 7000],
    ids=["over-pillow-error-limit", "pillow-only-warns", "under-pillow-over-ours"],
)
def test_pixel_cap_from_the_header(side: int) -> None:
    error = preprocess_error(crafted_png(side, side))
    assert error.code == "INPUT_TOO_LARGE"
    assert f"{MAX_PIXELS:,}" in error.message


def test_pillow_bomb_warning_is_an_error_even_if_our_cap_allowed_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 100 MP: Pillow only warns (limit ~89 MP, error at twice that). With our cap lifted out of
    # the way, the warning itself must stop the decode.
    monkeypatch.setattr(image_checks, "MAX_PIXELS", 10**12)
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    assert preprocess_error(crafted_png(10000, 10000)).code == "INPUT_TOO_LARGE"


def test_cap_is_a_module_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_checks, "MAX_PIXELS", 64 * 64 - 1)
    assert preprocess_error(encode(noise_image())).code == "INPUT_TOO_LARGE"


# -- tiny and extreme shapes ----------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(1, 1), (7, 300), (4000, 2), (2, 4000)])
def test_too_small(width: int, height: int) -> None:
    assert preprocess_error(encode(Image.new("RGB", (width, height)))).code == "INPUT_TOO_SMALL"


@pytest.mark.parametrize(("width", "height"), [(50000, 10), (10, 50000), (168, 8)])
def test_extreme_aspect_ratio_is_refused(width: int, height: int) -> None:
    error = preprocess_error(encode(Image.new("RGB", (width, height))))
    assert error.code == "INPUT_BAD_ASPECT"
    assert f"{MAX_ASPECT}:1" in error.message


def test_aspect_ratio_at_the_limit_renders() -> None:
    wide = Image.new("RGB", (MAX_ASPECT * 8, 8), (0, 0, 0))
    wide.paste((255, 255, 255), (MAX_ASPECT * 4 - 12, 0, MAX_ASPECT * 4 + 12, 8))
    pixels = prepared(encode(wide), size="64x64")  # a square: the cover crop at its limit
    assert pixels.shape == (64, 64, 3) and pixels.min() > 200  # the centre square, upscaled


# -- animated -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"], ids=["gif", "webp", "apng"])
def test_animated_image_renders_its_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert tuple(prepared(data)[32, 32]) == (255, 0, 0)


# -- colour: CMYK, 16-bit, palette, alpha ---------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert tuple(prepared(data)[32, 32]) == (255, 0, 0)


def test_16_bit_greyscale_png_is_scaled_not_clipped() -> None:
    image = Image.fromarray(np.full((64, 64), 32896, dtype=np.uint16))  # 128 * 257: mid grey
    data = encode(image)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert tuple(prepared(data)[32, 32]) == (128, 128, 128)


def test_16_bit_greyscale_tiff_is_scaled_too() -> None:
    data = encode(Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)), "TIFF")
    assert tuple(prepared(data)[32, 32]) == (255, 255, 255)


def test_16_bit_colour_png_keeps_its_colour() -> None:
    data = sixteen_bit_png(2, (65535, 32896, 0))
    assert tuple(prepared(data)[32, 32]) == (255, 128, 0)


def test_16_bit_rgba_png_is_composited_on_white() -> None:
    assert tuple(prepared(sixteen_bit_png(6, (0, 0, 65535, 0)))[32, 32]) == (255, 255, 255)
    assert tuple(prepared(sixteen_bit_png(6, (0, 0, 65535, 65535)))[32, 32]) == (0, 0, 255)


def test_32_bit_integer_values_beyond_16_bits_are_unsupported() -> None:
    data = encode(Image.fromarray(np.full((64, 64), 10**6, dtype=np.int32)), "TIFF")
    assert preprocess_error(data).code == "INPUT_UNSUPPORTED"


def test_32_bit_integer_image_within_16_bits_is_scaled() -> None:
    image = Image.fromarray(np.full((8, 8), 257 * 200, dtype=np.int32))
    assert image.mode == "I"  # how older Pillows opened 16-bit PNGs
    assert tuple(np.asarray(to_rgb(image))[0, 0]) == (200, 200, 200)


def test_floating_point_image_is_unsupported() -> None:
    data = encode(Image.fromarray(np.full((64, 64), 0.5, dtype=np.float32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert preprocess_error(data).code == "INPUT_UNSUPPORTED"


def test_palette_with_transparency_is_composited_on_white() -> None:
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.paste(0, (0, 32, 64, 64))  # bottom half: opaque black
    for fmt in ("PNG", "GIF"):
        pixels = prepared(encode(palette, fmt, transparency=1))
        assert tuple(pixels[10, 32]) == (255, 255, 255), fmt
        assert tuple(pixels[60, 32]) == (0, 0, 0), fmt


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode: str) -> None:
    half = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    half.paste((0, 0, 255, 255), (0, 32, 64, 64))
    image = half.convert(mode)
    pixels = prepared(encode(image))
    assert tuple(pixels[5, 32]) == (255, 255, 255)  # transparent: white, not the hidden red
    opaque = tuple(np.asarray(image.convert("RGB"))[60, 32])
    assert tuple(pixels[60, 32]) == opaque


# -- EXIF orientation ---------------------------------------------------------------------------

# Stored picture: 80x48, blue, a red marker in its top-left corner and a green one top-right.
# Where a viewer shows each marker for every EXIF orientation (TIFF/EXIF spec, tag 0x0112).
ORIENTATIONS = {
    1: ("top-left", "top-right"),
    2: ("top-right", "top-left"),  # mirrored left-right
    3: ("bottom-right", "bottom-left"),  # rotated 180°
    4: ("bottom-left", "bottom-right"),  # mirrored top-bottom
    5: ("top-left", "bottom-left"),  # mirrored along the main diagonal
    6: ("top-right", "bottom-right"),  # shown rotated 90° clockwise
    7: ("bottom-right", "top-right"),  # mirrored along the other diagonal
    8: ("bottom-left", "top-left"),  # shown rotated 90° counter-clockwise
}
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def marker_photo(orientation: int, fmt: str = "JPEG") -> bytes:
    stored = Image.new("RGB", (80, 48), BLUE)
    stored.paste(RED, (0, 0, 16, 16))
    stored.paste(GREEN, (64, 0, 80, 16))
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {}
    return encode(stored, fmt, exif=exif, **options)


def colour_at(pixels: np.ndarray, corner: str) -> tuple[int, int, int]:
    height, width = pixels.shape[:2]
    row = 6 if corner.startswith("top") else height - 7
    col = 6 if corner.endswith("left") else width - 7
    return tuple(int(v) for v in pixels[row, col])


def near(colour: tuple[int, int, int], expected: tuple[int, int, int]) -> bool:
    return all(abs(a - b) < 40 for a, b in zip(colour, expected, strict=True))


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_gives_an_upright_picture(orientation: int) -> None:
    upright = "80x48" if orientation <= 4 else "48x80"  # 5..8 swap the sides
    pixels = prepared(marker_photo(orientation), size=upright)
    red_at, green_at = ORIENTATIONS[orientation]
    assert near(colour_at(pixels, red_at), RED), (orientation, colour_at(pixels, red_at))
    assert near(colour_at(pixels, green_at), GREEN), (orientation, colour_at(pixels, green_at))
    corners = {"top-left", "top-right", "bottom-left", "bottom-right"} - {red_at, green_at}
    assert all(near(colour_at(pixels, corner), BLUE) for corner in corners)


def test_exif_orientation_in_a_png_is_applied_too() -> None:
    pixels = prepared(marker_photo(6, "PNG"), size="48x80")
    assert colour_at(pixels, "top-right") == RED and colour_at(pixels, "bottom-right") == GREEN


# -- submit side: sizes, symlinks, paths outside the folder ---------------------------------------

_OPENED: list[str] | None = None
_HOOKED = False


@contextmanager
def files_opened() -> Iterator[list[str]]:
    """Every path this process opens meanwhile (the interpreter's 'open' audit event)."""
    global _OPENED, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_record_open)  # audit hooks cannot be removed: it records only in here
        _HOOKED = True
    _OPENED = seen = []
    try:
        yield seen
    finally:
        _OPENED = None


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], str | bytes | Path):
        _OPENED.append(os.fsdecode(args[0]))


def submit_error(path: Path, base: Path | None) -> InvalidImage:
    with pytest.raises(InvalidImage) as raised:
        read_image_bytes(path, base)
    assert_one_human_sentence(raised.value.message)
    return raised.value


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    root.mkdir()
    (root / "good.png").write_bytes(encode(noise_image(16, 16)))
    (tmp_path / "secret.png").write_bytes(encode(noise_image(16, 16, seed=1)))
    return root


def test_file_over_50_mb_is_refused_at_submit_without_reading_it(folder: Path) -> None:
    huge = folder / "huge.png"
    with huge.open("wb") as sparse:
        sparse.truncate(MAX_INPUT_BYTES + 1)
    assert submit_error(huge, folder).code == "INPUT_TOO_LARGE"
    with pytest.raises(InvalidImage) as raised:
        check_bytes(b"x" * (MAX_INPUT_BYTES + 1))
    assert raised.value.code == "INPUT_TOO_LARGE"


def test_symlink_to_etc_passwd_is_outside_and_never_opened(folder: Path) -> None:
    (folder / "passwd.png").symlink_to("/etc/passwd")
    (file,) = [f for f in scan_folder(folder) if f.name == "passwd.png"]
    with files_opened() as opened:
        result = read_input(file, folder)
    assert result.data is None and result.error is not None
    assert result.error.code == "INPUT_OUTSIDE"
    assert_one_human_sentence(result.error.message)
    assert not [p for p in opened if "passwd" in p]


@pytest.mark.parametrize("link", ["absolute", "relative"])
def test_symlink_to_a_file_outside_the_folder_is_never_opened(folder: Path, link: str) -> None:
    secret = folder.parent / "secret.png"
    (folder / "x.png").symlink_to(secret if link == "absolute" else Path("..") / "secret.png")
    with files_opened() as opened:
        assert submit_error(folder / "x.png", folder).code == "INPUT_OUTSIDE"
    assert not [p for p in opened if "secret" in p]


@pytest.mark.parametrize("path", ["../secret.png", "sub/../../secret.png", "/etc/passwd"])
def test_paths_leading_outside_the_folder(folder: Path, path: str) -> None:
    # folder / "/etc/passwd" is "/etc/passwd": joining drops the base, the check must not.
    assert submit_error(folder / path, folder).code == "INPUT_OUTSIDE"


def test_dangling_symlink_outside_is_outside_inside_is_unreadable(folder: Path) -> None:
    (folder / "gone-out.png").symlink_to(folder.parent / "missing.png")
    (folder / "gone-in.png").symlink_to(folder / "missing.png")
    assert submit_error(folder / "gone-out.png", folder).code == "INPUT_OUTSIDE"
    assert submit_error(folder / "gone-in.png", folder).code == "INPUT_UNREADABLE"


def test_symlink_loop_is_unreadable_not_a_crash(folder: Path) -> None:
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "ping.png").symlink_to("pong.png")
    (folder / "pong.png").symlink_to("ping.png")
    read = {f.name: read_input(f, folder) for f in scan_folder(folder)}
    for name in ("loop.png", "ping.png", "pong.png"):
        assert read[name].error is not None and read[name].error.code == "INPUT_UNREADABLE"
    assert read["good.png"].data is not None


def test_symlink_inside_the_folder_is_followed(folder: Path) -> None:
    (folder / "alias.png").symlink_to("good.png")
    assert read_image_bytes(folder / "alias.png", folder) == (folder / "good.png").read_bytes()


@pytest.mark.timeout(20)
def test_fifo_is_skipped_and_a_link_to_it_does_not_hang(folder: Path) -> None:
    os.mkfifo(folder / "pipe.png")
    (folder / "to-pipe.png").symlink_to("pipe.png")
    names = [f.name for f in scan_folder(folder)]
    assert "pipe.png" not in names and "to-pipe.png" in names
    result: list[InputFile] = []
    reader = threading.Thread(
        target=lambda: result.append(
            read_input(InputFile("to-pipe.png", folder / "to-pipe.png"), folder)
        ),
        daemon=True,
    )
    reader.start()
    reader.join(5)
    assert result, "reading a link to a FIFO blocked"
    assert result[0].error is not None and result[0].error.code == "INPUT_UNREADABLE"


def test_directories_are_not_inputs(folder: Path) -> None:
    (folder / "album.png").mkdir()
    (folder / "album-link.png").symlink_to("album.png")
    names = [f.name for f in scan_folder(folder)]
    assert "album.png" not in names
    assert submit_error(folder / "album-link.png", folder).code == "INPUT_UNREADABLE"
    assert submit_error(folder / "album.png", None).code == "INPUT_UNREADABLE"


def test_symlinked_folder_outside_is_not_descended(folder: Path) -> None:
    outside = folder.parent / "elsewhere"
    outside.mkdir()
    (outside / "far.png").write_bytes(encode(noise_image(16, 16, seed=2)))
    (folder / "elsewhere").symlink_to(outside)
    (folder / "elsewhere.png").symlink_to(outside)
    found = {f.name: f for f in scan_folder(folder, recursive=True)}
    assert "elsewhere/far.png" not in found
    assert read_input(found["elsewhere.png"], folder).error.code == "INPUT_OUTSIDE"


def test_hidden_files_and_other_suffixes_are_skipped(folder: Path) -> None:
    (folder / ".hidden.png").write_bytes(b"x")
    (folder / "._good.png").write_bytes(b"x")  # macOS AppleDouble
    (folder / "notes.txt").write_text("x")
    assert [f.name for f in scan_folder(folder)] == ["good.png"]


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    assert submit_error(tmp_path / "nope.png", None).code == "INPUT_UNREADABLE"


def test_a_file_is_not_a_folder(folder: Path) -> None:
    with pytest.raises(InvalidParameter, match="not a folder"):
        scan_folder(folder / "good.png")


# -- unicode and odd names ----------------------------------------------------------------------


def test_unicode_names_are_kept_exactly_and_nfc_nfd_twins_stay_two(folder: Path) -> None:
    nfc = unicodedata.normalize("NFC", "café.png")
    nfd = unicodedata.normalize("NFD", "café.png")
    assert nfc != nfd
    names = [nfc, nfd, "🐱 cat  photo (1).png", "new\nline.png", "tab\there.png"]
    for i, name in enumerate(names):
        (folder / name).write_bytes(encode(noise_image(16, 16, seed=10 + i)))
    found = {f.name: read_input(f, folder) for f in scan_folder(folder)}
    assert set(names) <= set(found)
    assert all(found[name].data for name in names)


def test_names_that_are_not_utf8_are_stored_with_a_replacement_character(folder: Path) -> None:
    raw = os.path.join(os.fsencode(folder), b"caf\xe9 latin-1.png")
    with open(raw, "wb") as file:
        file.write(encode(noise_image(16, 16, seed=3)))
    (entry,) = [f for f in scan_folder(folder) if f.name != "good.png"]
    assert entry.name == "caf\ufffd latin-1.png"
    entry.name.encode("utf-8")  # storable in Postgres
    assert read_input(entry, folder).data == Path(os.fsdecode(raw)).read_bytes()


def test_error_messages_show_control_characters_in_names_as_question_marks(folder: Path) -> None:
    (folder / "bad\nname.png").write_bytes(b"")
    (entry,) = [f for f in scan_folder(folder) if f.name != "good.png"]
    error = read_input(entry, folder).error
    assert error is not None and error.code == "INPUT_NOT_IMAGE"
    assert entry.name == "bad\nname.png"  # the stored name is exact
    assert "bad?name.png" in error.message


# -- parameters ---------------------------------------------------------------------------------

BAD_PARAMS: list[tuple[dict[str, Any], str]] = [
    ({"prompt": "a cat\x00"}, "control character '\\x00'"),
    ({"prompt": "ring the bell\x07"}, "control character '\\x07'"),
    ({"negative_prompt": "esc \x1b[31m red"}, "control character '\\x1b'"),
    ({"prompt": "del \x7f"}, "control character"),
    ({"prompt": "x" * 100_000}, "100000 characters"),
    ({"strength": math.nan}, "strength must be a finite number"),
    ({"strength": -1}, "strength must be in (0, 1]"),
    ({"steps": 0}, "steps must be between 1 and 500"),
    ({"steps": 10**6}, "steps must be between 1 and 500"),
    ({"seed": -1}, "seed must be between 0 and 4294967295"),
    ({"seed": 2**70}, "seed must be between 0 and 4294967295"),
    ({"guidance": math.inf}, "guidance must be a finite number"),
    ({"guidance": -math.inf}, "guidance must be a finite number"),
    ({"steps": True}, "steps must be a number, got bool"),
    ({"strength": False}, "strength must be a number, got bool"),
    ({"seed": True}, "seed must be a number, got bool"),
    ({"size": True}, "size must be"),
    ({"size": "1" * 5000}, "size must be"),
    ({"size": "\u0661\u0662\u0668"}, "size must be"),  # Arabic-Indic digits
]


@pytest.mark.parametrize(("data", "message"), BAD_PARAMS, ids=lambda v: repr(v)[:30])
def test_bad_parameters_are_invalid_param(data: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParameter) as raised:
        RenderParams.from_dict(data)
    assert raised.value.code == "INVALID_PARAM"
    assert message in raised.value.message
    assert len(raised.value.message) < 300


def test_tab_newline_and_carriage_return_are_allowed_in_prompts() -> None:
    assert RenderParams.from_dict({"prompt": "a\tb\r\nc\n"}).prompt == "a\tb\r\nc\n"


@pytest.mark.parametrize("name", ["foo", "os.system", "farm.pipelines", "../img2img", "", None, 3])
def test_unknown_pipeline_is_rejected_without_importing_anything(name: object) -> None:
    all_pipelines()  # the registry itself loads once, on first use (run alone, this is it)
    modules = set(sys.modules)
    with pytest.raises(UnknownPipeline) as raised:
        get_pipeline(name)
    assert raised.value.code == "UNKNOWN_PIPELINE"
    assert set(sys.modules) == modules
