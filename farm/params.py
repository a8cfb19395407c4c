"""What a user may ask of one render, validated once at the edge.

``RenderParams`` is immutable and always valid: every way of building one runs the same checks,
so a stage never sees a NaN guidance or a 3-pixel-wide canvas. ``to_dict()`` is JSON-safe (it is
stored in Postgres) and ``params_digest()`` hashes its canonical JSON for idempotency keys.
The ``check_*`` helpers are public because farm.schema checks every pipeline's parameters with
them: one wording for every INVALID_PARAM message.

Size is stored as the user meant it, and ``output_size`` turns it into pixels:

- ``size`` N: the long side; img2img takes the input's aspect ratio snapped to the nearest of
  a few buckets (farm.buckets: 1:1 to 2:1, landscape or portrait) so that a mixed folder gives
  few latent shapes and batches on the GPU; the short side is rounded to the nearest multiple of
  8 and the input fitted by ``fit``. N stays the long side, so the pixel count varies with the
  bucket from N² (1:1) down to N²/2 (2:1): what batching needs is few distinct shapes, not one
  pixel count. txt2img renders N x N. With no size at all, 512 (``Farm.submit`` fills in the
  model's native size before this class sees the parameters).
- ``width`` and ``height`` (or ``size="WxH"``): exactly that, the input fitted by ``fit``;
  one of them alone fixes that side and the other follows the input's bucketed aspect ratio.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from farm.buckets import snap_aspect
from farm.errors import InvalidParameter

# Names users may pass as ``scheduler``; farm.models.schedulers maps each to a diffusers class.
SCHEDULER_NAMES = ("pndm", "ddim", "euler", "euler_a", "dpm")
MAX_PROMPT_CHARS = 2000
SIZE_MIN, SIZE_MAX = 8, 2048
DEFAULT_SIZE = 512
# Stable Diffusion VAEs downsample by 8 (the tiny demo model by 2): a side that is not a multiple
# of 8 would make the latent grid and the decoded image disagree on size, so sides given snap
# down, sides derived from an aspect ratio snap to the nearest multiple.
SIZE_MULTIPLE = 8
# How an input is fitted to an output of another aspect: crop centred, pad, or distort.
FIT_NAMES = ("cover", "contain", "stretch")
SEED_MAX = 2**32 - 1
_ALLOWED_CONTROL = frozenset("\t\n\r")  # \r: text from browser forms ends lines with \r\n
# ASCII digits only, at most 9 of them: int() of a 5000-digit string raises ValueError.
_SIZE_HINT = 'a number or "WIDTHxHEIGHT" like "768x512"'
_SIZE_TEXT = re.compile(r"^\s*([0-9]{1,9})\s*(?:x\s*([0-9]{1,9})\s*)?$", re.IGNORECASE)

# name -> (low, high, whether low itself is excluded)
_FLOATS: dict[str, tuple[float, float, bool]] = {
    "strength": (0.0, 1.0, True),
    "guidance": (0.0, 50.0, False),
    "sharpen": (0.0, 5.0, False),
    "saturation": (0.0, 5.0, False),
    "contrast": (0.0, 5.0, False),
    "brightness": (0.0, 5.0, False),
}
_INTS: dict[str, tuple[int, int]] = {
    "steps": (1, 500),
    "seed": (0, SEED_MAX),
}
_SIDES: dict[str, tuple[int, int]] = {
    "size": (SIZE_MIN, SIZE_MAX),
    "width": (SIZE_MIN, SIZE_MAX),
    "height": (SIZE_MIN, SIZE_MAX),
}
_CHOICES: dict[str, tuple[str, ...]] = {"fit": FIT_NAMES, "scheduler": SCHEDULER_NAMES}

# One line per parameter: `farm render --help` and farm.schema.RenderSchema both show these.
PARAM_HELP: dict[str, str] = {
    "prompt": "What to render.",
    "negative_prompt": "What to avoid.",
    "strength": "0-1: how far from the input (0.75).",
    "steps": "Denoising steps, 1-500 (30).",
    "guidance": "Classifier-free guidance, 0-50 (7.5).",
    "seed": "Random seed (0).",
    "size": "Long side in px, the input's aspect snapped to the nearest of a few buckets "
    "(default: the model's native size), or WxH.",
    "width": "Output width in px: with --height exactly that size (see --fit); alone, the height "
    "follows the input's bucketed aspect.",
    "height": "Output height in px: with --width exactly that size (see --fit); alone, the width "
    "follows the input's bucketed aspect.",
    "fit": "How the input meets another aspect: cover (crop, default), contain (pad), stretch.",
    "scheduler": "pndm, ddim, euler, euler_a or dpm.",
    "sharpen": "Unsharp-mask amount, 0-5 (0).",
    "saturation": "Colour saturation, 0-5 (1).",
    "contrast": "Contrast, 0-5 (1).",
    "brightness": "Brightness, 0-5 (1).",
}


@dataclass(frozen=True)
class RenderParams:
    """Parameters of one render; see the module docstring for the guarantees."""

    prompt: str = ""
    negative_prompt: str = ""
    strength: float = 0.75
    steps: int = 30
    guidance: float = 7.5
    seed: int = 0
    size: int | None = None  # the long side; None (with no width/height) means DEFAULT_SIZE
    width: int | None = None
    height: int | None = None
    fit: str = "cover"
    sharpen: float = 0.0
    saturation: float = 1.0
    contrast: float = 1.0
    brightness: float = 1.0
    scheduler: str = "pndm"

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            check_text(name, getattr(self, name))
        for name, (low, high, low_open) in _FLOATS.items():
            value = check_float(name, getattr(self, name), low, high, low_open)
            object.__setattr__(self, name, value)
        for name, (low, high) in _INTS.items():
            check_int(name, getattr(self, name), low, high)
        self._check_sides()
        for name, choices in _CHOICES.items():
            object.__setattr__(self, name, check_choice(name, getattr(self, name), choices))

    def _check_sides(self) -> None:
        """Snap the given sides down to SIZE_MULTIPLE; no size at all is DEFAULT_SIZE, so
        ``RenderParams()`` and ``RenderParams(size=512)`` are equal and share a digest."""
        given = {name: getattr(self, name) for name in _SIDES if getattr(self, name) is not None}
        if "size" in given and len(given) > 1:
            raise InvalidParameter("give either size or width/height, not both")
        for name, value in given.items():
            if name == "size" and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise InvalidParameter(f"size must be {_SIZE_HINT}, got {show(value)}")
            low, high = _SIDES[name]
            check_int(name, value, low, high)
            object.__setattr__(self, name, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
        if not given:
            object.__setattr__(self, "size", DEFAULT_SIZE)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RenderParams:
        """Validate user JSON; ``size`` (``512`` or ``"768x512"``) sets width and height."""
        fields = check_mapping(data)
        if isinstance(fields.get("size"), str):
            fields.update(_expand_size(fields))
        check_keys(fields, _field_names())
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-safe; ``RenderParams.from_dict(p.to_dict()) == p``."""
        return dataclasses.asdict(self)

    def img2img_steps(self) -> int:
        """Denoising steps an img2img render runs (diffusers' ``get_timesteps`` arithmetic);
        InvalidParameter when steps x strength leaves none."""
        steps = min(int(self.steps * self.strength), self.steps)
        if steps < 1:
            raise InvalidParameter(
                f"steps x strength = {self.steps} x {self.strength:g} leaves no denoising step; "
                "raise steps or strength"
            )
        return steps

    def params_digest(self) -> str:
        """sha256 of the canonical JSON: equal parameters give equal digests in any process."""
        return params_digest(self.to_dict())


def params_digest(canonical: Mapping[str, Any]) -> str:
    """sha256 of ``canonical`` as sorted, compact JSON: the idempotency key of every pipeline's
    parameters, so changing this changes every stored job's key."""
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _field_names() -> list[str]:
    return [field.name for field in dataclasses.fields(RenderParams)]


def check_mapping(data: object) -> dict[Any, Any]:
    """A copy of ``data`` if it is a mapping: parameters arrive as JSON and may be anything."""
    if not isinstance(data, Mapping):
        raise InvalidParameter(f"parameters must be a JSON object, got {type(data).__name__}")
    return dict(data)


def check_keys(fields: Mapping[Any, Any], allowed: Sequence[str]) -> None:
    """Refuse names that are not text or not in ``allowed``, listing every unknown one at once."""
    for key in fields:
        if not isinstance(key, str):
            raise InvalidParameter(f"parameter names must be text, got {show(key)}")
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        names = ", ".join(show(name) for name in unknown)
        raise InvalidParameter(f"unknown parameter(s) {names}; allowed: {', '.join(allowed)}")


def output_size(params: RenderParams, input_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) in pixels of the render of an input of ``input_size`` (upright, that is
    after EXIF orientation); ``None`` for txt2img, which has no input and so a square aspect.
    An aspect taken from the input is snapped to a bucket; explicit width and height are exact."""
    if params.width is not None and params.height is not None:
        return params.width, params.height
    aspect = snap_aspect(input_size[0] / input_size[1]) if input_size else 1.0
    if params.width is not None:
        return params.width, _snap(params.width / aspect)
    if params.height is not None:
        return _snap(params.height * aspect), params.height
    long = params.size or DEFAULT_SIZE
    return (long, _snap(long / aspect)) if aspect >= 1 else (_snap(long * aspect), long)


def _snap(side: float) -> int:
    """The nearest multiple of SIZE_MULTIPLE, within [SIZE_MIN, SIZE_MAX]."""
    snapped = math.floor(side / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE
    return min(max(snapped, SIZE_MIN), SIZE_MAX)


def _expand_size(fields: dict[str, Any]) -> dict[str, Any]:
    """``size`` given as text: "512" is the long side, "768x512" exact width and height."""
    size = fields.pop("size")
    if "width" in fields or "height" in fields:
        raise InvalidParameter("give either size or width/height, not both")
    match = _SIZE_TEXT.match(size)
    if match is None:
        raise InvalidParameter(f"size must be {_SIZE_HINT}, got {show(size)}")
    if match.group(2) is None:
        return {"size": int(match.group(1))}
    return {"width": int(match.group(1)), "height": int(match.group(2))}


def check_text(name: str, value: object, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """``value`` if it is text Postgres can store, at most ``max_chars`` long."""
    if not isinstance(value, str):
        raise InvalidParameter(f"{name} must be text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidParameter(f"{name} has {len(value)} characters; at most {max_chars}")
    for index, char in enumerate(value):
        category = unicodedata.category(char)
        # Cs: lone surrogates, which cannot be stored as UTF-8 in Postgres.
        if (category == "Cc" and char not in _ALLOWED_CONTROL) or category == "Cs":
            raise InvalidParameter(
                f"{name} contains the control character {char!r} at position {index}; "
                "only tabs and newlines are allowed"
            )
    return value


def _check_number(name: str, value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = type(value).__name__
        raise InvalidParameter(f"{name} must be a number, got {kind} {show(value)}")
    return value


def check_float(
    name: str, value: object, low: float | None, high: float | None, low_open: bool = False
) -> float:
    """``value`` as a finite float within the interval; a bound of None is no bound."""
    number = _check_number(name, value)
    if isinstance(number, float) and not math.isfinite(number):
        raise InvalidParameter(f"{name} must be a finite number, got {show(number)}")
    # Compare before float(): Python compares huge ints with floats exactly, float() overflows.
    below = low is not None and (number < low or (low_open and number == low))
    if below or (high is not None and number > high):
        shown = interval(low, high, low_open)
        raise InvalidParameter(f"{name} must be in {shown}, got {show(number)}")
    return float(number)


def check_int(name: str, value: object, low: float | None, high: float | None) -> int:
    """``value`` if it is an int (never a bool) within [low, high]; None is no bound."""
    number = _check_number(name, value)
    if not isinstance(number, int):
        raise InvalidParameter(f"{name} must be a whole number, got {show(number)}")
    if (low is not None and number < low) or (high is not None and number > high):
        raise InvalidParameter(f"{name} must be {_int_range(low, high)}, got {show(number)}")
    return number


def _int_range(low: float | None, high: float | None) -> str:
    if high is None:
        return f"at least {low}"
    if low is None:
        return f"at most {high}"
    return f"between {low} and {high}"


def interval(low: float | None, high: float | None, low_open: bool = False) -> str:
    """``[0, 50]``, ``(0, 1]`` or ``[0, inf)``: how messages and listings show a range."""
    start = "(-inf" if low is None else ("(" if low_open else "[") + _number(low)
    end = "inf)" if high is None else _number(high) + "]"
    return f"{start}, {end}"


def _number(bound: float) -> str:
    # :g keeps 0.0 as "0"; ints stay exact (:g would print SEED_MAX as 4.29497e+09).
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def check_choice(field: str, value: object, names: Sequence[str]) -> str:
    """``value`` stripped and lower-cased if it is one of ``names`` (themselves lower-case)."""
    name = value.strip().lower() if isinstance(value, str) else ""
    if name not in names:
        choices = ", ".join(names)
        raise InvalidParameter(f"{field} must be one of {choices}; got {show(value)}")
    return name


def show(value: object) -> str:
    """A short repr for messages: user input may be megabytes long."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return "a number too large to print"
    return text if len(text) <= 40 else text[:37] + "..."
