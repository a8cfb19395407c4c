"""Each pipeline's parameters as data: names, types, ranges, defaults and one line of help.

A ``Schema`` validates what a user submits (JSON, or ``--param key=value`` pairs) into a
*canonical* dict: every parameter, defaults filled in, values normalised, so equal requests give
equal ``digest``s. It raises ``InvalidParameter`` with the same wording as farm.params, whose
checks it reuses. A stage receives ``bind(canonical)``: an immutable ``Params`` mapping.

``RenderSchema`` offers the same interface for the Stable Diffusion parameters, which keep their
own rules (sizes given as ``"WxH"``, steps x strength) in ``RenderParams``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, ClassVar

from farm.errors import FarmError, InvalidParameter, PipelineInvalid
from farm.params import (
    _CHOICES,
    _FLOATS,
    _INTS,
    _SIDES,
    MAX_PROMPT_CHARS,
    PARAM_HELP,
    RenderParams,
    check_choice,
    check_float,
    check_int,
    check_keys,
    check_mapping,
    check_text,
    interval,
    params_digest,
    show,
)

__all__ = ["Param", "Params", "RenderSchema", "RenderWith", "Schema", "params_digest"]

_KINDS = {str: "str", int: "int", float: "float", bool: "bool"}
_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_INT_TEXT = re.compile(r"\s*[+-]?[0-9]+\s*")


@dataclass(frozen=True)
class Param:
    """One parameter of a pipeline; ``default=None`` makes it optional, with no default."""

    name: str
    kind: type  # str, int, float or bool
    default: object  # must itself pass check(); stored canonical
    help: str  # one line
    low: float | None = None  # inclusive unless low_open
    high: float | None = None
    low_open: bool = False  # floats only: (0, 1] where 0 itself means nothing
    choices: tuple[str, ...] | None = None  # for str: allowed values, lower-case
    max_chars: int = MAX_PROMPT_CHARS  # for str without choices

    def __post_init__(self) -> None:
        """A bad definition is the pipeline author's bug: ValueError at import, never a user's
        INVALID_PARAM at submit time."""
        problem = self._definition_problem()
        if problem is not None:
            raise ValueError(f"parameter {self.name!r}: {problem}")
        try:
            default = self.check(self.default)
        except InvalidParameter as exc:
            raise ValueError(f"parameter {self.name!r}: bad default: {exc.message}") from exc
        object.__setattr__(self, "default", default)  # 1 -> 1.0: digests see canonical values

    def _definition_problem(self) -> str | None:
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name[0] == "_":
            return "the name must be an identifier not starting with _ (it is an attribute)"
        if self.kind not in _KINDS:
            return f"kind must be str, int, float or bool, not {self.kind!r}"
        if "\n" in self.help:
            return "help must be one line"
        if self.choices is not None and self.kind is not str:
            return "choices are for str parameters only"
        if self.choices is not None and any(c != c.strip().lower() for c in self.choices):
            return "choices must be lower-case (user input is lower-cased to match them)"
        if (self.low, self.high) != (None, None) and self.kind not in (int, float):
            return "low and high are for int and float parameters only"
        if self.low_open and (self.kind is not float or self.low is None):
            return "low_open needs a float parameter with a low bound"
        return None

    def check(self, value: object) -> object:
        """The canonical value, or InvalidParameter naming the field and what it allows."""
        if value is None and self.default is None:
            return None
        if self.kind is bool:
            return _check_bool(self.name, value)
        if self.kind is int:
            return check_int(self.name, value, self.low, self.high)
        if self.kind is float:
            return check_float(self.name, value, self.low, self.high, self.low_open)
        if self.choices is not None:
            return check_choice(self.name, value, self.choices)
        return check_text(self.name, value, self.max_chars)

    def parse(self, text: str) -> object:
        """The checked value of a command-line string (``--param key=value``)."""
        if self.kind is bool:
            return self.check(_parse_bool(self.name, text))
        if self.kind is int:
            return self.check(_parse_int(self.name, text))
        if self.kind is float:
            return self.check(_parse_float(self.name, text))
        return self.check(text)

    def describe(self) -> dict[str, Any]:
        """JSON-safe, for listings (``farm pipelines``, the API)."""
        bounded = (self.low, self.high) != (None, None)
        return {
            "name": self.name,
            "type": _KINDS[self.kind],
            "default": self.default,
            "range": interval(self.low, self.high, self.low_open) if bounded else None,
            "choices": list(self.choices) if self.choices is not None else None,
            "help": self.help,
        }


class Params(Mapping[str, object]):
    """What a stage function receives: ``params["passes"]`` or ``params.passes``, read-only."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, object]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getitem__(self, name: str) -> object:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> object:
        # Only reached when normal lookup fails; "_" names must not recurse into _values.
        if not name.startswith("_") and name in self._values:
            return self._values[name]
        raise AttributeError(f"no parameter {name!r}")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Params are read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Params are read-only")

    def __reduce__(self) -> tuple[type[Params], tuple[dict[str, object]]]:
        """Pickle and copy by content: the slot cannot be set the default way."""
        return Params, (dict(self._values),)

    def __repr__(self) -> str:
        return f"Params({self._values!r})"


@dataclass(frozen=True)
class Schema:
    """A pipeline's parameters, in the order listings show them. ``check``: what no single
    parameter can say (a list's items, two that must agree), given the bound parameters;
    it raises InvalidParameter, at submit, before anything is stored."""

    params: tuple[Param, ...] = ()
    check: Callable[[Params], None] | None = None

    def __post_init__(self) -> None:
        """Names are unique and never shadow a Mapping method, so ``params.name`` is the value."""
        names = _names(self.params)
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"parameter names repeat: {', '.join(repeated)}")
        clash = sorted(set(names) & set(dir(Params)))
        if clash:
            raise ValueError(f"parameter names {', '.join(clash)} are Params methods")

    def validate(self, raw: Mapping[str, object]) -> dict[str, object]:
        """Every parameter in declaration order, checked, the missing ones at their default."""
        fields = check_mapping(raw)
        check_keys(fields, _names(self.params))
        canonical = {
            p.name: p.check(fields[p.name]) if p.name in fields else p.default for p in self.params
        }
        if self.check is not None:
            self._run_check(Params(canonical))
        return canonical

    def _run_check(self, params: Params) -> None:
        try:
            self.check(params)
        except FarmError:
            raise
        except Exception as exc:  # the pipeline's own code: its bug is not the user's input
            raise PipelineInvalid(
                f"the parameter check failed: {type(exc).__name__}: {exc}"
            ) from exc

    def parse_cli(self, pairs: Sequence[str]) -> dict[str, object]:
        """``["passes=3"]`` -> ``{"passes": 3}``: only the pairs given, each typed and checked."""
        given = _split_pairs(pairs, _names(self.params))
        by_name = {p.name: p for p in self.params}
        return {name: by_name[name].parse(text) for name, text in given.items()}

    def bind(self, canonical: Mapping[str, object]) -> Params:
        """Validated again, so a stage never sees a value its schema would refuse."""
        return Params(self.validate(canonical))

    def describe(self) -> list[dict[str, Any]]:
        return [p.describe() for p in self.params]

    def digest(self, canonical: Mapping[str, object]) -> str:
        return params_digest(canonical)


def _render_param(field: dataclasses.Field) -> Param:
    """RenderParams' field as a Param, its range read from farm.params' own tables."""
    kind, low, high, low_open = _render_range(field.name)
    choices = _CHOICES.get(field.name)
    return Param(
        field.name, kind, field.default, PARAM_HELP[field.name], low, high, low_open, choices
    )


def _render_range(name: str) -> tuple[type, float | None, float | None, bool]:
    """(kind, low, high, low_open); fields in no numeric table are text."""
    if name in _FLOATS:
        return (float, *_FLOATS[name])
    ints = {**_INTS, **_SIDES}
    if name in ints:
        return (int, *ints[name], False)
    return (str, None, None, False)


@dataclass(frozen=True)
class RenderSchema:
    """Schema's interface over RenderParams, which stays the one place its rules live.

    ``extra``: a pipeline's own parameters beside the render ones (upscale's ``scale``,
    narrated's ``voice``), validated like a Schema's; ``check`` then sees them all. A stage
    then gets a ``RenderWith``: the render parameters and the extra ones, read alike.
    ``defaults``: render parameters whose default differs for this pipeline (upscale's
    ``strength``); ``help``: render parameters whose meaning does (upscale's ``size``)."""

    img2img: bool = False  # also refuse steps x strength that leaves no denoising step
    extra: tuple[Param, ...] = ()
    defaults: Mapping[str, object] = dataclasses.field(default_factory=dict)  # render ones
    help: Mapping[str, str] = dataclasses.field(default_factory=dict)  # render ones, reworded
    check: Callable[[Any], None] | None = None
    params: ClassVar[tuple[Param, ...]] = tuple(
        map(_render_param, dataclasses.fields(RenderParams))
    )

    def __post_init__(self) -> None:
        clash = sorted(set(_names(self.extra)) & set(_names(self.params)))
        if clash:
            raise ValueError(f"extra parameters {', '.join(clash)} are render parameters")
        Schema(self.extra)  # the same rules for their names
        unknown = sorted((set(self.defaults) | set(self.help)) - set(_names(self.params)))
        if unknown:
            raise ValueError(f"defaults or help for {', '.join(unknown)}: not render parameters")
        RenderParams.from_dict(self.defaults)  # a bad default is the author's bug, not a user's

    @property
    def all_params(self) -> tuple[Param, ...]:
        return self.params + self.extra

    def validate(self, raw: Mapping[str, object]) -> dict[str, object]:
        fields = {**self.defaults, **check_mapping(raw)}
        extra_names = _names(self.extra)
        check_keys(fields, _names(self.all_params))
        render = RenderParams.from_dict({k: v for k, v in fields.items() if k not in extra_names})
        if self.img2img:
            render.img2img_steps()
        extra = Schema(self.extra).validate({k: fields[k] for k in extra_names if k in fields})
        canonical = {**render.to_dict(), **extra}
        if self.check is not None:
            Schema(check=self.check)._run_check(self.bind_unchecked(canonical))
        return canonical

    def parse_cli(self, pairs: Sequence[str]) -> dict[str, object]:
        """Typed but not yet validated as a whole: ``size`` stays text when it is ``WxH``."""
        given = _split_pairs(pairs, _names(self.all_params))
        by_name = {p.name: p for p in self.all_params}
        return {
            name: text if name == "size" and "x" in text.lower() else by_name[name].parse(text)
            for name, text in given.items()
        }

    def bind(self, canonical: Mapping[str, object]) -> Any:
        """RenderParams; with extra parameters, a RenderWith of both."""
        return self.bind_unchecked(self.validate(canonical) if self.extra else canonical)

    def bind_unchecked(self, canonical: Mapping[str, object]) -> Any:
        extra_names = _names(self.extra)
        render = RenderParams.from_dict(
            {k: v for k, v in canonical.items() if k not in extra_names}
        )
        if not self.extra:
            return render
        return RenderWith(render, {k: canonical[k] for k in extra_names})

    def describe(self) -> list[dict[str, Any]]:
        own = [
            dataclasses.replace(
                p,
                default=self.defaults.get(p.name, p.default),
                help=self.help.get(p.name, p.help),
            )
            for p in self.params
        ]
        return [p.describe() for p in (*own, *self.extra)]

    def digest(self, canonical: Mapping[str, object]) -> str:
        return params_digest(canonical)


class RenderWith(Params):
    """A pipeline's own parameters (``params.scale``) and the render ones (``params.seed``,
    and RenderParams' methods) on one object, so the Stable Diffusion stages take it as they
    take RenderParams. ``render`` is the RenderParams alone."""

    __slots__ = ("render",)

    def __init__(self, render: RenderParams, extra: Mapping[str, object]) -> None:
        super().__init__(extra)
        object.__setattr__(self, "render", render)

    def __getattr__(self, name: str) -> object:
        if not name.startswith("_") and name in self._values:
            return self._values[name]
        return getattr(self.render, name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RenderWith):
            return NotImplemented
        return (self.render, self._values) == (other.render, other._values)

    def __hash__(self) -> int:
        return hash((self.render, tuple(self._values.items())))

    def __reduce__(self) -> tuple[type[RenderWith], tuple[RenderParams, dict[str, object]]]:
        return RenderWith, (self.render, dict(self._values))

    def __repr__(self) -> str:
        return f"RenderWith({self.render!r}, {self._values!r})"


def _names(params: Sequence[Param]) -> list[str]:
    return [p.name for p in params]


def _split_pairs(pairs: Sequence[str], allowed: Sequence[str]) -> dict[str, str]:
    """``key=value`` strings by key; a key given twice keeps its last value, as shells do."""
    given = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if not equals:
            raise InvalidParameter(f"--param takes key=value, got {show(pair)}")
        given[key.strip()] = text
    check_keys(given, allowed)
    return given


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):  # 1 and "yes" are refused: JSON has true and false
        kind = type(value).__name__
        raise InvalidParameter(f"{name} must be true or false, got {kind} {show(value)}")
    return value


def _parse_bool(name: str, text: str) -> bool:
    word = text.strip().lower()
    if word not in _BOOL_WORDS:
        raise InvalidParameter(f"{name} must be true or false (or yes/no, 1/0), got {show(text)}")
    return _BOOL_WORDS[word]


def _parse_int(name: str, text: str) -> int:
    if _INT_TEXT.fullmatch(text):
        with suppress(ValueError):  # past Python's 4300-digit limit for int()
            return int(text)
    raise InvalidParameter(f"{name} must be a whole number, got {show(text)}")


def _parse_float(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidParameter(f"{name} must be a number, got {show(text)}") from None
