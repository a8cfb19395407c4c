"""farm.media.video: a still image with a slow pan/zoom over a speech WAV, as an MP4.

The WAVs are what eSpeak writes (22050 Hz mono 16-bit), here a sine tone; every check decodes
the MP4 with PyAV rather than trusting what the encoder was told.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import subprocess
import sys
import wave
from functools import cache
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageDraw

from farm.errors import ArtifactCorrupt, FarmError, InvalidParameter, StageFailed
from farm.media import video
from farm.media.video import make_video, probe

TONE_AMPLITUDE = 0.25  # of full scale
ROOT = Path(__file__).resolve().parents[1]


def tone_wav(seconds: float, rate: int = 22050) -> bytes:
    """A 440 Hz sine as 16-bit mono PCM, the format eSpeak writes."""
    count = round(seconds * rate)
    phase = 2 * math.pi * 440 * np.arange(count) / rate
    samples = (TONE_AMPLITUDE * 32767 * np.sin(phase)).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return buffer.getvalue()


@cache
def picture_png() -> bytes:
    """A smooth 4:3 picture with shapes: motion shows, yet neighbouring frames stay alike."""
    y, x = np.mgrid[0:240, 0:320]
    pixels = np.stack([x * 255 / 320, y * 255 / 240, 128 + 90 * np.sin(x / 25 + y / 40)], -1)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((90, 50, 230, 190), fill=(250, 220, 40))
    draw.rectangle((20, 150, 80, 220), fill=(30, 30, 160))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@cache
def clip(seconds: float, fps: int = 24) -> bytes:
    """The MP4 of the test picture over a tone, made once per test session."""
    return make_video(picture_png(), tone_wav(seconds), fps=fps)


def decoded_frames(mp4: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(mp4)) as container:
        return [
            frame.to_ndarray(format="rgb24").astype(np.float32)
            for frame in container.decode(video=0)
        ]


def difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference, in 8-bit levels."""
    return float(np.abs(a - b).mean())


@pytest.mark.parametrize(("seconds", "fps"), [(0.7, 24), (2.3, 24), (2.3, 60), (0.2, 1)])
def test_streams_last_as_long_as_the_wav(seconds: float, fps: int) -> None:
    mp4 = clip(seconds, fps)
    with av.open(io.BytesIO(mp4)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
        picture, sound = container.streams.video[0], container.streams.audio[0]
        assert picture.codec_context.name == "h264"
        assert picture.codec_context.pix_fmt == "yuv420p"
        assert sound.codec_context.name == "aac"
        assert sound.codec_context.sample_rate == 48000
        assert picture.start_time == sound.start_time == 0
        durations = {
            "container": container.duration / av.time_base,
            "video": float(picture.duration * picture.time_base),
            "audio": float(sound.duration * sound.time_base),
        }
    # frames are round(duration * fps), at least one: 0.2 s at 1 fps is one 1 s frame
    frames = max(1, round(seconds * fps))
    assert durations["video"] == pytest.approx(frames / fps)
    for name, duration in durations.items():
        assert abs(duration - seconds) <= 1 / fps, name


def test_probe_reports_the_clip() -> None:
    mp4 = make_video(picture_png(), tone_wav(0.5), fps=12, size=(192, 108))
    assert probe(mp4) == {
        "duration": pytest.approx(0.5, abs=1 / 12),
        "video": "h264",
        "audio": "aac",
        "width": 192,
        "height": 108,
        "fps": 12.0,
        "frames": 6,
    }


def test_probe_refuses_what_is_not_an_mp4() -> None:
    with pytest.raises(ArtifactCorrupt, match="not a readable MP4"):
        probe(tone_wav(0.1))


# The child runs on one CPU or on all of them: encoders that size their thread pools by the CPU
# count would give different bytes.
_CHILD = """
import hashlib, os, sys
from pathlib import Path
if sys.argv[2] == "one-cpu":
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from farm.media.video import make_video
folder = Path(sys.argv[1])
mp4 = make_video((folder / "picture.png").read_bytes(), (folder / "speech.wav").read_bytes())
print(hashlib.sha256(mp4).hexdigest())
"""


def test_same_inputs_give_the_same_bytes_in_fresh_processes(tmp_path: Path) -> None:
    (tmp_path / "picture.png").write_bytes(picture_png())
    (tmp_path / "speech.wav").write_bytes(tone_wav(0.7))
    here = hashlib.sha256(clip(0.7)).hexdigest()
    assert hashlib.sha256(make_video(picture_png(), tone_wav(0.7))).hexdigest() == here
    for cpus in ("one-cpu", "all-cpus"):
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tmp_path), cpus],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert child.stdout.strip() == here


def test_the_camera_moves_slowly() -> None:
    frames = decoded_frames(clip(2.3))
    assert len(frames) == 55
    whole_move = difference(frames[0], frames[-1])
    steps = [difference(a, b) for a, b in itertools.pairwise(frames)]
    assert whole_move > 15
    # the move is spread over the clip: no step comes near the whole move, and none stands still
    assert max(steps) < whole_move / 8
    assert min(steps) > 0.05


def test_the_first_frame_shows_the_whole_picture_cropped_to_fit() -> None:
    # 4:3 into a square: the middle 240x240 of the picture, scaled to 256x256
    expected = Image.open(io.BytesIO(picture_png())).crop((40, 0, 280, 240)).resize((256, 256))
    first = decoded_frames(clip(0.7))[0]
    assert difference(first, np.asarray(expected, dtype=np.float32)) < 4


def test_the_speech_is_heard() -> None:
    with av.open(io.BytesIO(clip(0.7))) as container:
        samples = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    rms = float(np.sqrt(np.mean(samples**2)))
    assert rms == pytest.approx(TONE_AMPLITUDE / math.sqrt(2), rel=0.1)


def empty_wav() -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(22050)
    return buffer.getvalue()


def assert_one_line(error: FarmError) -> None:
    assert "\n" not in str(error)
    assert "0x" not in str(error)  # no object addresses


@pytest.mark.parametrize(
    "options",
    [
        {"fps": 0},
        {"fps": 61},
        {"fps": 24.0},
        {"fps": True},
        {"size": (255, 256)},
        {"size": (256, 2048)},
        {"size": (8, 8)},
        {"size": (256,)},
        {"size": "256x256"},
    ],
)
def test_bad_parameters_are_refused(options: dict) -> None:
    with pytest.raises(InvalidParameter) as caught:
        make_video(picture_png(), tone_wav(0.1), **options)
    assert caught.value.code == "INVALID_PARAM"
    assert_one_line(caught.value)


@pytest.mark.parametrize(
    ("image", "wav", "message"),
    [
        (picture_png(), b"RIFF but not really a wave file", "not a readable WAV"),
        (picture_png(), b"", "not a readable WAV"),
        (picture_png(), picture_png(), "not a readable WAV"),
        (picture_png(), empty_wav(), "holds no samples"),
        (b"not an image", tone_wav(0.1), "no format Pillow can read"),
        (picture_png()[:300], tone_wav(0.1), "cannot be decoded"),
    ],
    ids=[
        "garbage-wav",
        "empty-bytes-wav",
        "png-as-wav",
        "no-samples",
        "garbage-image",
        "cut-image",
    ],
)
def test_unreadable_inputs_are_corrupt_artifacts(image: bytes, wav: bytes, message: str) -> None:
    with pytest.raises(ArtifactCorrupt, match=message) as caught:
        make_video(image, wav)
    assert caught.value.code == "ARTIFACT_CORRUPT"
    assert_one_line(caught.value)


def test_an_encoder_failure_is_a_farm_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video, "_X264_OPTIONS", {**video._X264_OPTIONS, "preset": "warp"})
    with pytest.raises(StageFailed, match="encoding the video failed") as caught:
        make_video(picture_png(), tone_wav(0.1))
    assert isinstance(caught.value.__cause__, av.error.FFmpegError)
    assert_one_line(caught.value)
