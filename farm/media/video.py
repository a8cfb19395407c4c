"""Video: a still image slowly zooming and panning ("Ken Burns") over a speech WAV, as an MP4.

``make_video`` turns bytes into bytes (an MP4 with H.264 video and AAC audio, the pair every
browser and phone plays) and ``probe`` reads one back; neither touches the disk.

Design choices, and why:

* **The audio sets the length.** The clip has ``round(duration * fps)`` video frames (at least
  one), so the two streams end within half a frame of each other. The duration is counted from
  the decoded samples, not read from the WAV header: eSpeak writing to a pipe leaves the header's
  length at its maximum.
* **Audio at 48 kHz.** FFmpeg's AAC encoder primes with 1024 samples, which the MP4's edit list
  hides; at 48 kHz they last 21 ms, so even a player that ignores edit lists is off by less than
  a frame at the usual rates (up to 47 fps).
* **Smooth, slow motion.** Each frame is a crop of the image that Pillow resamples from a
  sub-pixel box, so the camera glides instead of stepping a whole pixel at a time. The zoom is
  geometric (the same ratio every frame), which the eye reads as constant speed; the pan is
  linear. The whole move takes the whole clip, so longer speech means slower motion. The image is
  shrunk once, beforehand, to the resolution the tightest crop needs: a large photo then costs
  no more per frame than a small one.
* **Deterministic bytes.** Equal inputs give equal MP4 bytes (with the same PyAV build; another
  FFmpeg or x264 version may encode differently), so artifacts can be compared by content. Each
  encoder runs on one thread, because x264's output depends on its thread count and PyAV's
  default is one per CPU; one thread per job is also what a worker running jobs side by side
  wants. The ``bitexact`` flags keep FFmpeg's version string out of the file and ask the encoders
  for their bit-exact code paths, and no creation time is written.
* **Odd sides are refused, not rounded.** yuv420p stores colour at half resolution, so both
  sides must be even: a job asking for 255 pixels gets ``INVALID_PARAM`` instead of a video of a
  size it did not ask for.
* **Colours are tagged.** Frames are converted with BT.709 and the stream says so; untagged,
  players guess BT.601 for small pictures and shift the colours.
* **The index is at the end.** The muxer's ``faststart`` (index first, for progressive download)
  needs a second pass over a named file, which an in-memory MP4 does not have; browsers fetch
  the index with a range request instead.
* **Errors at the boundary.** Unreadable input raises ``ArtifactCorrupt``, out-of-range
  parameters ``InvalidParameter`` and an FFmpeg failure while encoding ``StageFailed``, each with
  a one-line message: users never see a library traceback.

PyAV is imported only when a function runs (see ``farm.media``): workers without video
pipelines never load FFmpeg.
"""

from __future__ import annotations

import heapq
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps, UnidentifiedImageError

from farm.errors import ArtifactCorrupt, InvalidParameter, StageFailed

if TYPE_CHECKING:
    from av.audio.frame import AudioFrame
    from av.audio.stream import AudioStream
    from av.container import InputContainer, OutputContainer
    from av.packet import Packet
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

FPS_RANGE = (1, 60)
MIN_SIDE = 16  # one H.264 macroblock
MAX_SIDE = 1920  # 1080p's long side: ample for a still, and it bounds a job's encode time
AUDIO_RATE = 48_000
AUDIO_BIT_RATE = 96_000  # plenty for speech
ZOOM = 1.25  # the last frame shows 1/ZOOM of the first frame's width
# Where the last frame's crop sits in the room the zoom frees (0 = left/top, 1 = right/bottom):
# the camera drifts right and up, towards where faces usually are.
PAN_TO = (0.7, 0.3)
_X264_OPTIONS = {"preset": "medium", "crf": "23", "threads": "1"}
_BITEXACT = {"flags": "+bitexact"}

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class _Speech:
    """The decoded WAV: its frames as FFmpeg read them, and their length."""

    frames: list[AudioFrame]
    samples: int
    rate: int
    layout: str  # what the MP4 carries: mono stays mono, anything else becomes stereo

    @property
    def duration(self) -> Fraction:
        return Fraction(self.samples, self.rate)


def make_video(
    image: bytes, wav: bytes, *, fps: int = 24, size: tuple[int, int] = (256, 256)
) -> bytes:
    """An MP4 (H.264 + AAC) of ``image`` (PNG/any Pillow bytes) slowly zooming and panning, as
    long as ``wav``.

    ``fps`` is an int in ``FPS_RANGE``; ``size`` is (width, height), each side an even int from
    ``MIN_SIDE`` to ``MAX_SIDE`` (odd sides are refused, not rounded). The picture is cropped to
    the frame's shape, never letterboxed.
    """
    _check_fps(fps)
    _check_size(size)
    picture = _read_image(image)
    speech = _read_wav(wav)
    import av

    try:
        return _encode(picture, speech, fps, size)
    except av.error.FFmpegError as exc:
        raise StageFailed(f"encoding the video failed: {_one_line(exc)}") from exc


def probe(mp4: bytes) -> dict[str, Any]:
    """What an MP4 holds: {"duration": seconds, "video": codec name, "audio": codec name (None
    without an audio stream), "width", "height", "fps", "frames"}."""
    import av

    try:
        with av.open(io.BytesIO(mp4), format="mp4") as container:
            return _describe(container)
    except av.error.FFmpegError as exc:
        raise ArtifactCorrupt(f"the video is not a readable MP4: {_one_line(exc)}") from exc


def poster_frame(mp4: bytes) -> Image.Image:
    """The MP4's first video frame, as a picture (a player's poster)."""
    import av

    try:
        with av.open(io.BytesIO(mp4), format="mp4") as container:
            return next(container.decode(video=0)).to_image()
    except (av.error.FFmpegError, StopIteration) as exc:
        raise ArtifactCorrupt(f"the video has no readable frame: {_one_line(exc)}") from exc


def _check_fps(fps: int) -> None:
    low, high = FPS_RANGE
    # bool is an int to Python, but fps=True is a caller's bug, not one frame a second
    if not isinstance(fps, int) or isinstance(fps, bool) or not low <= fps <= high:
        raise InvalidParameter(f"fps must be an integer from {low} to {high}, not {fps!r}")


def _check_size(size: tuple[int, int]) -> None:
    sides = tuple(size) if isinstance(size, tuple | list) else ()
    if len(sides) != 2 or not all(_is_side(side) for side in sides):
        raise InvalidParameter(
            f"size must be (width, height), each an even integer from {MIN_SIDE} to "
            f"{MAX_SIDE}, not {size!r}"
        )


def _is_side(side: object) -> bool:
    return (
        isinstance(side, int)
        and not isinstance(side, bool)
        and MIN_SIDE <= side <= MAX_SIDE
        and side % 2 == 0
    )


def _read_image(data: bytes) -> Image.Image:
    """The picture as RGB, turned upright as its camera meant (EXIF orientation)."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            # exif_transpose loads the pixels, so a truncated file fails here, inside the try
            return ImageOps.exif_transpose(opened).convert("RGB")
    except UnidentifiedImageError as exc:
        # its message names a BytesIO object at some address: no use to anyone
        raise ArtifactCorrupt("the image is in no format Pillow can read") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ArtifactCorrupt(f"the image cannot be decoded: {_one_line(exc)}") from exc


def _read_wav(data: bytes) -> _Speech:
    """Every frame of the WAV, decoded by FFmpeg's WAV demuxer (so PCM of any width, float and
    WAVE_FORMAT_EXTENSIBLE all work, and bytes of any other format are refused)."""
    import av

    try:
        with av.open(io.BytesIO(data), format="wav") as container:
            # the WAV demuxer always makes exactly one audio stream
            stream = container.streams.audio[0]
            frames = list(container.decode(stream))
    except av.error.FFmpegError as exc:
        raise ArtifactCorrupt(f"the speech is not a readable WAV: {_one_line(exc)}") from exc
    samples = sum(frame.samples for frame in frames)
    if samples == 0:
        raise ArtifactCorrupt("the speech WAV holds no samples")
    layout = "mono" if stream.channels == 1 else "stereo"
    return _Speech(frames, samples, stream.rate, layout)


def _encode(picture: Image.Image, speech: _Speech, fps: int, size: tuple[int, int]) -> bytes:
    import av

    count = max(1, round(speech.duration * fps))
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        video = _add_video(container, fps, size)
        audio = _add_audio(container, speech.layout)
        pictures = _ken_burns(picture, size, count)
        # Merged by time, the two packet streams come out interleaved (a player reads the file
        # straight through) while only a few packets are held in memory at once.
        container.mux(
            heapq.merge(
                _packets(video, (_to_yuv(still, index) for index, still in enumerate(pictures))),
                _packets(audio, _resampled(speech)),
                key=_seconds,
            )
        )
    return buffer.getvalue()


def _add_video(container: OutputContainer, fps: int, size: tuple[int, int]) -> VideoStream:
    from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

    stream = container.add_stream("libx264", rate=fps, options={**_X264_OPTIONS, **_BITEXACT})
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    context = stream.codec_context
    context.time_base = Fraction(1, fps)  # one tick a frame: frame i has pts i
    context.thread_count = 1
    context.colorspace = Colorspace.ITU709
    context.color_primaries = ColorPrimaries.BT709
    context.color_trc = ColorTrc.BT709
    context.color_range = ColorRange.MPEG  # limited range, which _to_yuv writes
    return stream


def _add_audio(container: OutputContainer, layout: str) -> AudioStream:
    stream = container.add_stream("aac", rate=AUDIO_RATE, options=_BITEXACT)
    stream.layout = layout
    stream.bit_rate = AUDIO_BIT_RATE
    stream.codec_context.thread_count = 1
    return stream


def _packets(stream: VideoStream | AudioStream, frames: Iterable[Any]) -> Iterator[Packet]:
    for frame in frames:
        yield from stream.encode(frame)
    yield from stream.encode(None)  # flush what the encoder still holds


def _seconds(packet: Packet) -> Fraction:
    return packet.dts * packet.time_base


def _resampled(speech: _Speech) -> Iterator[AudioFrame]:
    """The speech as 48 kHz float planar (what the AAC encoder takes), stamped sample by sample
    from 0 so the audio starts with the video whatever the WAV's frames said."""
    import av

    resampler = av.AudioResampler(format="fltp", layout=speech.layout, rate=AUDIO_RATE)
    done = 0
    for source in [*speech.frames, None]:  # None flushes the resampler's tail
        for frame in resampler.resample(source):
            frame.pts, frame.time_base = done, Fraction(1, AUDIO_RATE)
            done += frame.samples
            yield frame


def _to_yuv(still: Image.Image, index: int) -> VideoFrame:
    import av

    frame = av.VideoFrame.from_image(still).reformat(
        format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG", threads=1
    )
    frame.pts = index
    return frame


def _ken_burns(picture: Image.Image, size: tuple[int, int], count: int) -> Iterator[Image.Image]:
    """``count`` frames of ``size``: the whole picture (cropped to the frame's shape) first,
    then closing in by ``ZOOM`` while drifting towards ``PAN_TO``."""
    picture = _shrink(picture, size)
    cover = _cover(picture.size, size)
    for index in range(count):
        progress = index / (count - 1) if count > 1 else 0.0
        yield picture.resize(size, Image.Resampling.BICUBIC, box=_crop(cover, progress))


def _shrink(picture: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The picture scaled down (never up) so that the last, tightest crop has the frame's own
    resolution."""
    _, _, cover_width, cover_height = _cover(picture.size, size)
    scale = ZOOM * max(size[0] / cover_width, size[1] / cover_height)
    if scale >= 1:
        return picture
    width, height = picture.size
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return picture.resize(target, Image.Resampling.LANCZOS)


def _cover(source: tuple[int, int], size: tuple[int, int]) -> Box:
    """(left, top, width, height) of the largest centred part of ``source`` with the frame's
    aspect ratio."""
    width, height = source
    aspect = size[0] / size[1]
    crop_width, crop_height = min(width, height * aspect), min(height, width / aspect)
    return (width - crop_width) / 2, (height - crop_height) / 2, crop_width, crop_height


def _crop(cover: Box, progress: float) -> Box:
    """The (left, top, right, bottom) box at ``progress`` (0 to 1) through the move: its size
    shrinks geometrically from the cover's to 1/ZOOM of it while its centre moves in a straight
    line to the last crop's. The room the zoom frees (1 - ZOOM**-progress) grows faster than the
    centre uses it, so the crop never leaves the picture."""
    left, top, width, height = cover
    room = 1 - 1 / ZOOM
    centre_x = left + width * (0.5 + progress * (PAN_TO[0] - 0.5) * room)
    centre_y = top + height * (0.5 + progress * (PAN_TO[1] - 0.5) * room)
    half_width, half_height = width * ZOOM**-progress / 2, height * ZOOM**-progress / 2
    return (
        centre_x - half_width,
        centre_y - half_height,
        centre_x + half_width,
        centre_y + half_height,
    )


def _describe(container: InputContainer) -> dict[str, Any]:
    if not container.streams.video:
        raise ArtifactCorrupt("the MP4 has no video stream")
    video = container.streams.video[0]
    audio = container.streams.audio[0] if container.streams.audio else None
    return {
        "duration": (container.duration or 0) / 1_000_000,  # FFmpeg counts in microseconds
        "video": video.codec_context.name,
        "audio": audio.codec_context.name if audio else None,
        "width": video.codec_context.width,
        "height": video.codec_context.height,
        "fps": float(video.average_rate or 0),
        "frames": video.frames,
    }


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line; FFmpeg's ``strerror`` leaves out the errno and the
    (made-up) file name its ``str`` adds."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())
