"""Outputs as the browser gets them: whole or by byte range (a video player seeks with Range
requests), and small thumbnails made here with Pillow."""

from __future__ import annotations

import io
import re
from collections.abc import Callable

from PIL import Image, UnidentifiedImageError
from starlette.requests import Request
from starlette.responses import Response

from farm.errors import ArtifactCorrupt

THUMBNAIL_SIDE = 320  # px, the longest side
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def ranged(
    request: Request,
    size: int,
    read_all: Callable[[], bytes],
    read_range: Callable[[int, int], bytes],
    media_type: str,
) -> Response:
    """An object of ``size`` bytes whole (200, ``read_all()``, checked against its record)
    or the one byte range asked for (206, ``read_range(offset, length)``: only those bytes
    leave the store, as a player seeking through a long video asks); 416 for a range past
    it."""
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": "inline"}
    asked = request.headers.get("range")
    if asked is None:
        return Response(read_all(), media_type=media_type, headers=headers)
    span = _span(asked, size)
    if span is None:
        headers["Content-Range"] = f"bytes */{size}"
        return Response(b"", status_code=416, headers=headers)
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    body = read_range(start, end - start + 1)
    return Response(body, 206, headers=headers, media_type=media_type)


def _span(header: str, size: int) -> tuple[int, int] | None:
    """The first (inclusive) byte range of a Range header; None if it cannot be served."""
    match = _RANGE.fullmatch(header.strip().split(",")[0].strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # the last N bytes
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    return (start, end) if start <= end and start < size else None


def thumbnail(data: bytes, media_type: str) -> bytes:
    """A PNG of at most ``THUMBNAIL_SIDE`` px a side: of the image, or a video's first frame."""
    if media_type == "video/mp4":
        from farm.media.video import poster_frame

        picture = poster_frame(data)
    else:
        try:
            picture = Image.open(io.BytesIO(data))
            picture.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise ArtifactCorrupt(f"the output is not an image Pillow reads ({exc})") from exc
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    out = io.BytesIO()
    picture.convert("RGB").save(out, format="PNG")
    return out.getvalue()
