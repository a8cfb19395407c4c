"""farm.media.speech: eSpeak NG through ctypes, on the real library espeakng-loader ships.

Each synthesis here takes tens of milliseconds; the fresh-process test pays for one interpreter
start (importing ``farm``), so the whole file runs in a few seconds.
"""

from __future__ import annotations

import hashlib
import io
import locale
import subprocess
import sys
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from farm.errors import InvalidParameter, ModelError
from farm.media import speech

NARRATION = (
    "The farm renders every picture in stages, checkpoints each one to storage, and records "
    "its progress, so a job that fails halfway resumes from the last finished stage instead "
    "of starting again."
)
WORDS = len(NARRATION.split())  # 32
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def narration() -> bytes:
    return speech.synthesize(NARRATION)


def samples(wav: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(wav)) as reader:
        return np.frombuffer(reader.readframes(reader.getnframes()), "<i2").astype(np.float64)


def header(wav: bytes) -> tuple[int, int, int]:
    """(channels, bytes a sample, sample rate)."""
    with wave.open(io.BytesIO(wav)) as reader:
        return reader.getnchannels(), reader.getsampwidth(), reader.getframerate()


def words_a_minute(wav: bytes, words: int) -> float:
    return words / speech.wav_duration(wav) * 60


# Real speech


def test_narration_is_a_loud_mono_wav_that_speaks_at_the_asked_rate(narration: bytes) -> None:
    assert narration[:4] == b"RIFF" and narration[8:12] == b"WAVE"
    assert header(narration) == (1, 2, 22050)
    pcm = samples(narration)
    assert np.sqrt(np.mean(pcm**2)) > 1000  # full-scale is 32767; silence would be 0
    # Speech pauses between words and phrases; a tone or noise never would.
    windows = pcm[: len(pcm) // 220 * 220].reshape(-1, 220)  # 10 ms each
    quiet = np.mean(np.sqrt(np.mean(windows**2, axis=1)) < 100)
    assert 0.03 < quiet < 0.5
    # 175 words a minute asked: the clip lasts as long as that many words take.
    assert 140 < words_a_minute(narration, WORDS) < 210


def test_a_longer_narration_gives_a_longer_wav(narration: bytes) -> None:
    short = speech.synthesize("The farm renders pictures.")
    assert speech.wav_duration(short) > 0.5
    assert speech.wav_duration(narration) > 4 * speech.wav_duration(short)


def test_a_faster_rate_gives_a_shorter_wav(narration: bytes) -> None:
    fast = speech.synthesize(NARRATION, rate=350)
    slow = speech.synthesize(NARRATION, rate=speech.RATE_RANGE[0])
    assert speech.wav_duration(fast) < 0.6 * speech.wav_duration(narration)
    assert speech.wav_duration(slow) > 1.7 * speech.wav_duration(narration)
    assert 280 < words_a_minute(fast, WORDS) < 420


def test_the_sample_rate_is_what_espeak_initialize_returned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = speech._initialize
    returned = []

    def initialize(lib, data):
        returned.append(original(lib, data))
        return returned[-1]

    monkeypatch.setattr(speech, "_initialize", initialize)
    wav = speech.synthesize("Hello there.")
    assert returned == [22050]
    assert header(wav)[2] == returned[0]


def test_a_language_and_its_voice_name_speak_alike() -> None:
    by_language = speech.synthesize("Guten Morgen.", voice="de")
    assert speech.synthesize("Guten Morgen.", voice="German") == by_language
    assert speech.synthesize("Guten Morgen.", voice="en") != by_language


# Determinism


def test_repeated_calls_give_identical_bytes(narration: bytes) -> None:
    speech.synthesize("Something else first.", voice="fr", rate=300)
    assert speech.synthesize(NARRATION) == narration
    speech.synthesize("And something else between.", voice="de", rate=100)
    assert speech.synthesize(NARRATION) == narration


def test_a_fresh_process_gives_identical_bytes(narration: bytes) -> None:
    code = (
        "import hashlib, sys\n"
        "from farm.media.speech import synthesize\n"
        "print(hashlib.sha256(synthesize(sys.argv[1])).hexdigest())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, NARRATION],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == hashlib.sha256(narration).hexdigest()


def test_one_library_instance_drifts_between_syntheses() -> None:
    """Why synthesize reloads libespeak-ng every call: one instance, speaking the same text
    twice, gives different samples. If this fails, eSpeak has stopped carrying state between
    syntheses and the reload could go."""
    with speech._LOCK, speech._engine() as (lib, _):
        assert speech._select(lib, "en", is_language=True)
        first = speech._speak(lib, NARRATION.encode(), 175)
        second = speech._speak(lib, NARRATION.encode(), 175)
    assert first != second


def test_threads_speaking_at_once_each_get_their_own_speech(narration: bytes) -> None:
    german = speech.synthesize("Guten Morgen, wie geht es?", voice="de", rate=200)
    jobs = {"english": (NARRATION, "en", 175), "german": ("Guten Morgen, wie geht es?", "de", 200)}
    results: dict[str, bytes] = {}
    start = threading.Barrier(len(jobs))

    def speak(key: str) -> None:
        text, voice, rate = jobs[key]
        start.wait()
        results[key] = speech.synthesize(text, voice=voice, rate=rate)

    threads = [threading.Thread(target=speak, args=(key,)) for key in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == {"english": narration, "german": german}


def test_the_callers_locale_is_kept_and_does_not_change_the_speech(narration: bytes) -> None:
    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
        assert speech.synthesize(NARRATION) == narration
        assert locale.setlocale(locale.LC_CTYPE) == "C"  # eSpeak set C.UTF-8 meanwhile
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)


# Voices


@pytest.mark.parametrize(
    ("voice", "canonical"),
    [
        ("en", "en"),
        ("EN_us", "en-us"),
        (" de ", "de"),
        ("english (america)", "English (America)"),
    ],
)
def test_check_voice_gives_espeaks_spelling(voice: str, canonical: str) -> None:
    assert speech.check_voice(voice) == canonical


@pytest.mark.parametrize("voice", ["xx-nope", "eng", "", "English (Mars)"])
def test_an_unknown_voice_is_refused_naming_some_languages(voice: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        speech.check_voice(voice)
    message = caught.value.message
    assert caught.value.code == "INVALID_PARAM"
    assert "\n" not in message
    assert repr(voice) in message and "languages include" in message
    # the suggestions are real languages: each one is accepted
    named = message.split("languages include ")[1].split(" (")[0].split(", ")
    assert named and all(speech.check_voice(language) == language for language in named)


def test_a_typo_is_answered_with_the_language_meant() -> None:
    with pytest.raises(InvalidParameter, match="languages include en"):
        speech.check_voice("eng")


def test_synthesize_refuses_an_unknown_voice() -> None:
    with pytest.raises(InvalidParameter, match="no language or voice 'klingon-x'"):
        speech.synthesize("Hello.", voice="klingon-x")


# Bad input


@pytest.mark.parametrize("text", ["", "   ", " \n\t ", None, b"bytes", "a\0b", "\ud800"])
def test_bad_text_is_refused(text: object) -> None:
    with pytest.raises(InvalidParameter) as caught:
        speech.synthesize(text)  # type: ignore[arg-type]
    assert caught.value.code == "INVALID_PARAM"
    assert "\n" not in caught.value.message


@pytest.mark.parametrize("rate", [79, 451, 0, -175, True, 175.0, "175"])
def test_a_rate_outside_the_range_is_refused(rate: object) -> None:
    with pytest.raises(InvalidParameter, match="rate must be an integer from 80 to 450"):
        speech.synthesize("Hello.", rate=rate)  # type: ignore[arg-type]


@pytest.mark.parametrize("rate", speech.RATE_RANGE)
def test_the_ends_of_the_rate_range_are_accepted(rate: int) -> None:
    assert speech.wav_duration(speech.synthesize("Hello there.", rate=rate)) > 0.2


# The library itself missing or broken


def test_the_voice_list_is_whole_while_other_threads_write_to_stderr() -> None:
    """eSpeak's complaints are caught on fd 2 while the list is built; a worker's other threads
    write there too, and must neither lose their lines nor make good voices look broken."""
    speech._catalogue.cache_clear()
    stop = threading.Event()

    def log() -> None:
        while not stop.is_set():
            print("another thread's log line", file=sys.stderr, flush=True)

    writer = threading.Thread(target=log)
    writer.start()
    try:
        assert speech.check_voice("en-us") == "en-us"
        assert {"en", "de", "fr"} <= set(speech._catalogue().languages)
    finally:
        stop.set()
        writer.join()


def _assert_one_line_model_error(caught: pytest.ExceptionInfo[ModelError]) -> None:
    assert caught.value.code == "MODEL_INVALID"
    assert "\n" not in str(caught.value)


def test_a_library_that_will_not_load_is_a_model_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    speech.check_voice("en")  # the voice list is cached; the failure is synthesize's own load
    junk = tmp_path / "libespeak-ng.so"
    junk.write_bytes(b"not a shared library")
    _, data = speech._installed()
    monkeypatch.setattr(speech, "_installed", lambda: (junk, data))
    with pytest.raises(ModelError, match="eSpeak NG's library did not load") as caught:
        speech.synthesize("Hello.")
    _assert_one_line_model_error(caught)


def test_a_missing_library_file_is_a_model_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _, data = speech._installed()
    monkeypatch.setattr(speech, "_installed", lambda: (tmp_path / "libespeak-ng.so", data))
    with pytest.raises(ModelError, match="did not load") as caught:
        speech.synthesize("Hello.")
    _assert_one_line_model_error(caught)


def test_missing_espeak_data_is_a_model_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    library, _ = speech._installed()
    monkeypatch.setattr(speech, "_installed", lambda: (library, str(tmp_path)))
    with pytest.raises(ModelError, match="did not start") as caught:
        speech.synthesize("Hello.")
    _assert_one_line_model_error(caught)


def test_espeakng_loader_not_installed_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import then fails
    with pytest.raises(ModelError, match="is not installed") as caught:
        speech._installed()
    _assert_one_line_model_error(caught)


# wav_duration


def test_wav_duration_reads_the_frames_and_rate() -> None:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(2)
        writer.setsampwidth(2)
        writer.setframerate(16000)
        writer.writeframes(b"\0\0\0\0" * 8000)
    assert speech.wav_duration(buffer.getvalue()) == 0.5


@pytest.mark.parametrize("data", [b"", b"RIFF", b"not a wav at all" * 4])
def test_wav_duration_refuses_what_is_not_a_wav(data: bytes) -> None:
    with pytest.raises(InvalidParameter, match="not a PCM WAV"):
        speech.wav_duration(data)
