"""Speech: text to a WAV with eSpeak NG, through ctypes on the library espeakng-loader ships.

``synthesize`` turns text into WAV bytes (RIFF, 16-bit mono PCM at eSpeak's own rate, 22050 Hz
for the shipped voices), ``wav_duration`` reads a WAV's length back, and ``check_voice`` says
whether eSpeak has a voice, before a job is queued.

Design choices, and why:

* **A fresh library per synthesis.** libespeak-ng keeps synthesizer state in C globals that
  outlive a call and that neither ``espeak_Terminate`` nor a second ``espeak_Initialize``
  resets: the same text spoken twice in one process gives different samples, from about the
  300th on (``test_one_library_instance_drifts_between_syntheses`` shows it). So every call
  loads its own copy of the library, initializes it, speaks, terminates it and unloads it
  (``dlclose``): no state survives between calls, and equal inputs give equal bytes, in one
  process or across processes. The copy lives in a fresh temporary folder because ``dlopen``
  of a path that is already open returns that same instance, state and all: anything else in
  the process that loaded espeakng-loader's library (a phonemizer, say) would otherwise share
  ours (so ``TMPDIR`` must not be mounted noexec). Reloading (copying the 650 KB file,
  loading, initializing, reading the voice's dictionary again) adds under 10 ms to a call that
  takes about 30 ms for 40 words.
* **Fixed noise.** ``espeak_Initialize`` seeds eSpeak's noise generator from the clock; voices
  with breath or Klatt synthesis draw on it. Seeding it with a constant keeps those
  deterministic too, whatever the voice files of a future eSpeak say.
* **One synthesis at a time.** Each call has its own library, but ``espeak_Initialize`` also
  sets the process's ``LC_CTYPE`` to C.UTF-8 (eSpeak reads text with the C library's
  wide-character functions). A module lock serializes calls, so the locale eSpeak needs holds
  for the whole synthesis and the caller's is put back afterwards. Synthesis is quick (tens of
  milliseconds for a sentence), so queuing costs little.
* **Synchronous output.** With ``AUDIO_OUTPUT_SYNCHRONOUS``, ``espeak_Synth`` hands every
  buffer to the callback and returns when the text is spoken: no eSpeak threads (which would
  make ``dlclose`` unsafe) and no ``espeak_Synchronize`` needed. The samples are native-endian
  shorts, written to the WAV as they come: every platform espeakng-loader ships for is
  little-endian, as WAV is.
* **Voices checked against eSpeak's own list.** ``espeak_ListVoices`` gives the voices and the
  languages each speaks; a language counts only if ``espeak_SetVoiceByProperties`` can select
  it (Cherokee's mixed-case ``chr-US-Qaaa-x-west`` cannot; its name can). The list is read
  once per process. A language code is matched case-insensitively, ``_`` read as ``-``; a
  voice name (``English (America)``) case-insensitively; unknown ones raise
  ``InvalidParameter``, never eSpeak's silent fallback to its default voice.
* **Errors at the boundary.** Bad arguments raise ``InvalidParameter``; a library that is
  missing or will not load or start raises ``ModelError``; each with a one-line message.

espeakng-loader is imported only when a function runs (see ``farm.media``).
"""

from __future__ import annotations

import _ctypes
import ctypes
import difflib
import functools
import io
import json
import locale
import os
import shutil
import tempfile
import threading
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from farm.errors import InvalidParameter, ModelError

# Words a minute: espeakRATE_MINIMUM and espeakRATE_MAXIMUM in speak_lib.h. eSpeak clamps
# rates outside these instead of refusing them, so a job would get a speed it did not ask for.
RATE_RANGE = (80, 450)

# Constants of speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # without it, missing data makes eSpeak call exit(1)
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
# A sentence's closing pause at the end, so narrations played back to back do not run together.
_ENDPAUSE = 0x1000
_ESPEAK_RATE = 1
_EE_OK = 0

_NOISE_SEED = 1  # any constant will do
_SUGGESTIONS = 8  # languages named when a voice is unknown
_LOCK = threading.Lock()


class _Voice(ctypes.Structure):
    """speak_lib.h's espeak_VOICE."""

    _fields_ = (
        ("name", ctypes.c_char_p),
        # (priority byte, NUL-terminated language) pairs, ended by a zero priority
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    )


# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events)
_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

_INT, _UINT, _VOID_P, _CHAR_P = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p
# name -> (restype, argtypes), as speak_lib.h and espeak_ng.h declare them
_SIGNATURES = {
    "espeak_Initialize": (_INT, [_INT, _INT, _CHAR_P, _INT]),
    "espeak_ng_SetRandSeed": (_INT, [ctypes.c_long]),
    "espeak_ListVoices": (ctypes.POINTER(ctypes.POINTER(_Voice)), [_VOID_P]),
    "espeak_SetVoiceByProperties": (_INT, [ctypes.POINTER(_Voice)]),
    "espeak_SetVoiceByName": (_INT, [_CHAR_P]),
    "espeak_SetParameter": (_INT, [_INT, _INT, _INT]),
    "espeak_SetSynthCallback": (None, [_SynthCallback]),
    "espeak_Synth": (_INT, [_CHAR_P, ctypes.c_size_t, _UINT, _INT, _UINT, _UINT, _VOID_P, _VOID_P]),
    "espeak_Terminate": (_INT, []),
}


@dataclass(frozen=True)
class _Catalogue:
    """What eSpeak can speak: languages and voice names, each keyed by its lower-case form."""

    languages: dict[str, str]
    names: dict[str, str]


def synthesize(text: str, *, voice: str = "en", rate: int = 175) -> bytes:
    """A WAV file (RIFF, 16-bit mono PCM at eSpeak's own sample rate) speaking ``text``.

    ``voice`` is a language code ("en", "en-us", "de") or a voice name ("English (America)");
    ``rate`` is in words a minute, an int in ``RATE_RANGE``. Equal arguments give equal bytes.
    """
    encoded = _encode(text)
    _check_rate(rate)
    chosen, is_language = _resolve(voice)
    with _LOCK, _engine() as (lib, sample_rate):
        # eSpeak listed this voice, so only a broken install can refuse it now
        if not _select(lib, chosen, is_language):
            raise ModelError(f"eSpeak NG could not load its voice {chosen!r}")
        samples = _speak(lib, encoded, rate)
    return _to_wav(samples, sample_rate)


def wav_duration(data: bytes) -> float:
    """How long a PCM WAV plays, in seconds, from its header and frame count."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            frames, frame_rate = wav.getnframes(), wav.getframerate()
    except (wave.Error, EOFError) as exc:
        raise InvalidParameter(f"not a PCM WAV file: {_one_line(exc)}") from exc
    if frame_rate <= 0:
        raise InvalidParameter(f"the WAV's sample rate is {frame_rate}")
    return frames / frame_rate


def check_voice(voice: str) -> str:
    """``voice`` as eSpeak spells it, if eSpeak has that language or voice name; else
    ``InvalidParameter`` naming a few languages it does have."""
    return _resolve(voice)[0]


def _resolve(voice: str) -> tuple[str, bool]:
    """(``voice`` as eSpeak spells it, whether it is a language rather than a voice name)."""
    if not isinstance(voice, str):
        raise InvalidParameter(f"voice must be a string, not {voice!r}")
    catalogue = _catalogue()
    key = voice.strip().lower()
    language = catalogue.languages.get(key.replace("_", "-"))
    if language is not None:
        return language, True
    name = catalogue.names.get(key)
    if name is not None:
        return name, False
    raise InvalidParameter(
        f"eSpeak NG has no language or voice {voice!r}; languages include "
        f"{_suggestions(key, catalogue)} ({len(catalogue.languages)} in all)"
    )


def _encode(text: str) -> bytes:
    """The text as UTF-8, refused when eSpeak would say nothing or read less than was given."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidParameter(f"text must be a non-blank string, not {text!r:.40}")
    # eSpeak reads a C string: everything after a NUL would be silently dropped
    if "\0" in text:
        raise InvalidParameter("text must not contain NUL characters")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameter(f"text is not valid Unicode: {_one_line(exc)}") from exc


def _check_rate(rate: int) -> None:
    low, high = RATE_RANGE
    # bool is an int to Python, but rate=True is a caller's bug, not one word a minute
    if not isinstance(rate, int) or isinstance(rate, bool) or not low <= rate <= high:
        raise InvalidParameter(
            f"rate must be an integer from {low} to {high} words a minute, not {rate!r}"
        )


def _suggestions(key: str, catalogue: _Catalogue) -> str:
    """The languages closest to the unknown ``key`` (a typo's fix), else the first few."""
    languages = sorted(catalogue.languages.values())
    close = difflib.get_close_matches(key, languages, n=_SUGGESTIONS, cutoff=0.5)
    return ", ".join(close or languages[:_SUGGESTIONS])


@functools.cache
def _catalogue() -> _Catalogue:
    """eSpeak's voices, read once per process. eSpeak writes what it cannot load (a voice whose
    dictionary the wheel lacks: fo, kaa, xex in 0.2.4) straight to file descriptor 2; only a
    process of its own may point that elsewhere (every thread of a worker writes there), so a
    forked child lists the voices and hands back the ones that load without complaint."""
    with _LOCK:  # one fork at a time; the child never takes this lock (a fork copies it held)
        answer = json.loads(_in_child(_voices_that_load))
    if "error" in answer:
        raise ModelError(answer["error"])
    languages, names = answer["voices"]
    return _Catalogue(
        languages={language.lower(): language for language in languages},
        names={name.lower(): name for name in names},
    )


def _voices_that_load() -> bytes:
    try:
        with _engine() as (lib, _), tempfile.TemporaryFile() as said:
            voices = _list_voices(lib)
            spoken = {language for _, languages in voices for language in languages}
            loading = sorted(language for language in spoken if _speakable(lib, language, said))
    except ModelError as exc:  # the parent raises it again, message and all
        return json.dumps({"error": exc.message}).encode()
    return json.dumps({"voices": [loading, [name for name, _ in voices]]}).encode()


def _in_child(work: Callable[[], bytes]) -> bytes:
    """What ``work`` returns, run in a forked copy of this process that exits straight after."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: single-threaded, never returns
        status = 1
        try:
            os.close(read)
            with os.fdopen(write, "wb") as out:
                out.write(work())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        data = answer.read()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise ModelError("eSpeak NG could not list its voices (the library or its data is broken)")
    return data


def _speakable(lib: ctypes.CDLL, language: str, said: IO[bytes]) -> bool:
    """Whether eSpeak selects ``language`` without writing a complaint to fd 2, which points
    at ``said`` meanwhile (in the child of ``_catalogue`` only)."""
    start = said.seek(0, os.SEEK_END)
    saved = os.dup(2)
    os.dup2(said.fileno(), 2)
    try:
        selected = _select(lib, language, True)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    said.seek(start)
    return selected and not said.read()


def _list_voices(lib: ctypes.CDLL) -> list[tuple[str, list[str]]]:
    """(name, languages) of every voice espeak_ListVoices gives, copied out of eSpeak's memory
    (it frees that memory on its next call)."""
    listed = lib.espeak_ListVoices(None)
    voices = []
    index = 0
    while listed[index]:
        voice = listed[index].contents
        voices.append((voice.name.decode("utf-8"), _languages(voice.languages)))
        index += 1
    return voices


def _languages(address: int) -> list[str]:
    languages = []
    while ctypes.c_ubyte.from_address(address).value:  # the priority; zero ends the list
        language = ctypes.string_at(address + 1)
        languages.append(language.decode("utf-8"))
        address += len(language) + 2
    return languages


def _select(lib: ctypes.CDLL, voice: str, is_language: bool) -> bool:
    """Make ``voice`` eSpeak's current one: a language by its best voice, else a voice name."""
    if is_language:
        spec = _Voice(languages=ctypes.cast(ctypes.c_char_p(voice.encode()), ctypes.c_void_p))
        return lib.espeak_SetVoiceByProperties(ctypes.byref(spec)) == _EE_OK
    return lib.espeak_SetVoiceByName(voice.encode("utf-8")) == _EE_OK


def _speak(lib: ctypes.CDLL, text: bytes, rate: int) -> bytes:
    """Every sample eSpeak makes for ``text``, as 16-bit native-endian PCM."""
    chunks: list[bytes] = []

    def collect(wav: ctypes._Pointer, count: int, events: int | None) -> int:
        if count > 0:
            chunks.append(ctypes.string_at(wav, count * ctypes.sizeof(ctypes.c_short)))
        return 0  # 0: go on

    callback = _SynthCallback(collect)  # held here: eSpeak calls it until Synth returns
    lib.espeak_SetSynthCallback(callback)
    lib.espeak_SetParameter(_ESPEAK_RATE, rate, 0)
    flags = _CHARS_UTF8 | _ENDPAUSE
    status = lib.espeak_Synth(text, len(text) + 1, 0, _POS_CHARACTER, 0, flags, None, None)
    if status != _EE_OK:
        raise ModelError(f"eSpeak NG could not speak the text (espeak_Synth returned {status})")
    return b"".join(chunks)


def _to_wav(samples: bytes, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(samples)
    return buffer.getvalue()


@contextmanager
def _engine() -> Iterator[tuple[ctypes.CDLL, int]]:
    """A freshly loaded, initialized eSpeak and its sample rate; terminated and unloaded after.
    Callers hold ``_LOCK``."""
    library, data = _installed()
    lib = _load(library)
    try:
        with _kept_locale():
            yield lib, _initialize(lib, data)
    finally:
        lib.espeak_Terminate()  # frees eSpeak's buffers: dlclose would leak them
        _ctypes.dlclose(lib._handle)


def _installed() -> tuple[Path, str]:
    """espeakng-loader's libespeak-ng and its espeak-ng-data folder."""
    try:
        import espeakng_loader

        return Path(espeakng_loader.get_library_path()), espeakng_loader.get_data_path()
    except (ImportError, RuntimeError) as exc:
        raise ModelError(
            f"eSpeak NG is not installed ({_one_line(exc)}); install espeakng-loader>=0.2.4"
        ) from exc


def _load(library: Path) -> ctypes.CDLL:
    """A private instance of ``library``, loaded from a copy no one else has opened."""
    try:
        with tempfile.TemporaryDirectory(prefix="farm-espeak-") as folder:
            copy = Path(folder) / library.name
            shutil.copyfile(library, copy)
            # the loaded library stays mapped after its file is deleted
            lib = ctypes.CDLL(str(copy))
    except OSError as exc:
        raise ModelError(f"eSpeak NG's library did not load: {_one_line(exc)}") from exc
    try:
        for name, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
    except AttributeError as exc:
        _ctypes.dlclose(lib._handle)
        raise ModelError(
            f"eSpeak NG's library is too old ({_one_line(exc)}); espeakng-loader>=0.2.4 ships 1.52"
        ) from exc
    return lib


def _initialize(lib: ctypes.CDLL, data: str) -> int:
    """Start eSpeak in synchronous mode; its sample rate."""
    sample_rate = lib.espeak_Initialize(
        _AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), _INITIALIZE_DONT_EXIT
    )
    # 1.52 returns its sample rate even when it failed, and that is 0 until data has loaded
    if sample_rate <= 0:
        raise ModelError(f"eSpeak NG did not start: no usable espeak-ng-data at {data}")
    lib.espeak_ng_SetRandSeed(_NOISE_SEED)
    return sample_rate


@contextmanager
def _kept_locale() -> Iterator[None]:
    """The caller's LC_CTYPE back after eSpeak has set its own."""
    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
