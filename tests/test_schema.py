"""Per-pipeline parameter schemas: checks, defaults, CLI pairs, the bound Params and digests."""

from __future__ import annotations

import copy
import json
import math
import pickle
from typing import Any

import pytest

from farm.errors import InvalidParameter
from farm.params import RenderParams
from farm.pipelines import get_pipeline
from farm.schema import Param, Params, RenderSchema, Schema, params_digest

PASSES = Param("passes", int, 3, "How many passes.", low=1, high=50)
AMOUNT = Param("amount", float, 1.0, "How much.", low=0, high=5)
RADIUS = Param("radius", float, 0.5, "Blur radius.", low=0.0, high=1.0, low_open=True)
MODE = Param("mode", str, "blur", "What to do.", choices=("blur", "sharpen"))
NAME = Param("name", str, "", "A label.", max_chars=10)
FLAG = Param("flag", bool, False, "Whether to.")
LABEL = Param("label", str, None, "Optional label.")
SCHEMA = Schema((PASSES, AMOUNT, RADIUS, MODE, NAME, FLAG, LABEL))
ALLOWED = "allowed: passes, amount, radius, mode, name, flag, label"

# Digest of RenderParams(prompt="a", seed=3) computed before params_digest moved: stored jobs'
# idempotency keys depend on it never changing.
RENDER_DIGEST = "15c0b6e80bc74c634c00a485cdfda1751cdc5cfa4dafd14e3029a6ed64ba4df9"


def _message(call: Any, *args: object) -> str:
    with pytest.raises(InvalidParameter) as raised:
        call(*args)
    assert raised.value.code == "INVALID_PARAM"
    return raised.value.message


# -- Param.check ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "value", "canonical"),
    [
        (PASSES, 1, 1),
        (PASSES, 50, 50),
        (AMOUNT, 0, 0.0),  # ints are floats' canonical float
        (AMOUNT, 5, 5.0),
        (RADIUS, 1e-9, 1e-9),
        (RADIUS, 1, 1.0),
        (MODE, " Sharpen ", "sharpen"),
        (NAME, "tab\there", "tab\there"),
        (FLAG, True, True),
        (LABEL, None, None),  # optional: None is allowed only when the default is None
        (LABEL, "x", "x"),
    ],
)
def test_check_accepts_and_normalises(param: Param, value: object, canonical: object) -> None:
    checked = param.check(value)
    assert checked == canonical and type(checked) is type(canonical)


@pytest.mark.parametrize(
    ("param", "value", "message"),
    [
        (PASSES, 0, "passes must be between 1 and 50, got 0"),
        (PASSES, 51, "passes must be between 1 and 50, got 51"),
        (PASSES, 2.5, "passes must be a whole number, got 2.5"),
        (PASSES, True, "passes must be a number, got bool True"),
        (PASSES, "3", "passes must be a number, got str '3'"),
        (PASSES, None, "passes must be a number, got NoneType None"),
        (AMOUNT, 7, "amount must be in [0, 5], got 7"),
        (AMOUNT, -0.5, "amount must be in [0, 5], got -0.5"),
        (AMOUNT, math.nan, "amount must be a finite number, got nan"),
        (AMOUNT, False, "amount must be a number, got bool False"),
        (RADIUS, 0, "radius must be in (0, 1], got 0"),
        (RADIUS, 0.0, "radius must be in (0, 1], got 0.0"),
        (MODE, "c", "mode must be one of blur, sharpen; got 'c'"),
        (MODE, 1, "mode must be one of blur, sharpen; got 1"),
        (NAME, 5, "name must be text, got int"),
        (NAME, "x" * 11, "name has 11 characters; at most 10"),
        (NAME, "a\x00", "name contains the control character '\\x00' at position 1"),
        (FLAG, 1, "flag must be true or false, got int 1"),
        (FLAG, "true", "flag must be true or false, got str 'true'"),
        (FLAG, None, "flag must be true or false"),
    ],
)
def test_check_names_the_field_and_the_allowed_range(
    param: Param, value: object, message: str
) -> None:
    assert message in _message(param.check, value)


def test_unbounded_sides() -> None:
    at_least = Param("n", int, 0, "n", low=0)
    assert at_least.check(10**30) == 10**30
    assert _message(at_least.check, -1) == "n must be at least 0, got -1"
    at_most = Param("x", float, 0.0, "x", high=2)
    assert _message(at_most.check, 3) == "x must be in (-inf, 2], got 3"
    assert at_most.describe()["range"] == "(-inf, 2]"
    assert Param("y", float, 0.0, "y").describe()["range"] is None


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"kind": list, "default": []}, "kind must be"),
        ({"kind": int, "default": 0, "choices": ("a",)}, "choices are for str"),
        ({"kind": str, "default": "A", "choices": ("A",)}, "lower-case"),
        ({"kind": int, "default": 0, "low_open": True, "low": 0}, "low_open"),
        ({"kind": bool, "default": False, "low": 0}, "low and high"),
        ({"kind": int, "default": 0, "low": 1}, "bad default: p must be at least 1, got 0"),
        ({"kind": int, "default": True}, "bad default"),
        ({"kind": str, "default": "", "help": "two\nlines"}, "one line"),
    ],
)
def test_bad_definitions_are_programming_errors(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Param(**{"name": "p", "help": "h", **kwargs})


def test_defaults_are_stored_canonical() -> None:
    assert Param("g", float, 7, "g").default == 7.0
    assert type(Param("g", float, 7, "g").default) is float
    assert Param("m", str, "Blur", "m", choices=("blur",)).default == "blur"


def test_bad_schemas_are_programming_errors() -> None:
    with pytest.raises(ValueError, match="repeat"):
        Schema((PASSES, PASSES))
    with pytest.raises(ValueError, match="keys"):
        Schema((Param("keys", int, 0, "shadows Mapping.keys"),))


# -- Schema.validate ------------------------------------------------------------------------------


def test_validate_fills_defaults_in_declaration_order() -> None:
    canonical = SCHEMA.validate({"mode": "SHARPEN", "passes": 7})
    assert list(canonical) == ["passes", "amount", "radius", "mode", "name", "flag", "label"]
    assert canonical == {
        "passes": 7,
        "amount": 1.0,
        "radius": 0.5,
        "mode": "sharpen",
        "name": "",
        "flag": False,
        "label": None,
    }
    assert SCHEMA.validate(canonical) == canonical  # canonical values are a fixed point
    assert Schema().validate({}) == {}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"colour": 1}, f"unknown parameter(s) 'colour'; {ALLOWED}"),
        ({"zz": 1, "aa": 2, "passes": 3}, "unknown parameter(s) 'aa', 'zz'"),
        ({1: 2}, "parameter names must be text, got 1"),
        ([("passes", 3)], "parameters must be a JSON object, got list"),
        ("passes=3", "parameters must be a JSON object, got str"),
        ({"passes": 0}, "passes must be between 1 and 50, got 0"),
    ],
)
def test_validate_refuses(raw: Any, message: str) -> None:
    assert message in _message(SCHEMA.validate, raw)


# -- Schema.parse_cli -----------------------------------------------------------------------------


def test_parse_cli_types_only_the_given_pairs() -> None:
    pairs = ["passes=3", "mode=Blur", "amount=2.5", "radius=1", "flag=YES", "name=a=b"]
    parsed = SCHEMA.parse_cli(pairs)
    assert parsed == {
        "passes": 3,
        "mode": "blur",
        "amount": 2.5,
        "radius": 1.0,
        "flag": True,
        "name": "a=b",  # the first "=" splits; the value keeps the rest
    }
    assert type(parsed["passes"]) is int and type(parsed["radius"]) is float
    assert SCHEMA.parse_cli([]) == {}
    assert SCHEMA.parse_cli(["passes=3", "passes=4"]) == {"passes": 4}  # the last one wins


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("No", False), ("1", True), ("0", False)]
)
def test_parse_cli_bools(text: str, value: bool) -> None:
    assert SCHEMA.parse_cli([f"flag={text}"]) == {"flag": value}


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("passes", "--param takes key=value, got 'passes'"),
        ("colour=red", f"unknown parameter(s) 'colour'; {ALLOWED}"),
        ("passes=x", "passes must be a whole number, got 'x'"),
        ("passes=2.0", "passes must be a whole number, got '2.0'"),
        ("passes=0", "passes must be between 1 and 50, got 0"),
        ("passes=" + "9" * 5000, "passes must be a whole number"),
        ("amount=lots", "amount must be a number, got 'lots'"),
        ("amount=nan", "amount must be a finite number, got nan"),
        ("amount=9", "amount must be in [0, 5], got 9.0"),
        ("radius=0", "radius must be in (0, 1], got 0.0"),
        ("flag=maybe", "flag must be true or false (or yes/no, 1/0), got 'maybe'"),
        ("mode=c", "mode must be one of blur, sharpen; got 'c'"),
    ],
)
def test_parse_cli_refuses(pair: str, message: str) -> None:
    assert message in _message(SCHEMA.parse_cli, [pair])


# -- Params ---------------------------------------------------------------------------------------


def test_bind_gives_a_read_only_mapping_with_attributes() -> None:
    params = SCHEMA.bind(SCHEMA.validate({"passes": 4}))
    assert isinstance(params, Params)
    assert params["passes"] == params.passes == 4
    assert params.mode == "blur" and len(params) == 7 and "flag" in params
    assert params == SCHEMA.validate({"passes": 4}) == Params(dict(params))
    assert params != SCHEMA.bind(SCHEMA.validate({"passes": 5}))
    assert repr(Params({"passes": 4})) == "Params({'passes': 4})"
    with pytest.raises(AttributeError):
        params.passes = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del params.passes
    with pytest.raises(TypeError):
        params["passes"] = 5  # type: ignore[index]
    with pytest.raises(AttributeError, match="no parameter 'nope'"):
        _ = params.nope
    with pytest.raises(KeyError):
        _ = params["nope"]


def test_params_copy_and_pickle_by_content() -> None:
    params = Params({"passes": 4})
    assert pickle.loads(pickle.dumps(params)) == params
    assert copy.deepcopy(params) == params


def test_bind_validates() -> None:
    assert "passes must be between" in _message(SCHEMA.bind, {"passes": 0})


def test_a_schema_check_sees_every_parameter_bound_and_refuses_at_validate() -> None:
    seen = []

    def few_passes_when_wide(params: Params) -> None:
        seen.append(params)
        if params.passes > 10 and params.radius > 0.5:
            raise InvalidParameter("passes over 10 need a radius of at most 0.5")

    schema = Schema((PASSES, RADIUS), check=few_passes_when_wide)
    assert "need a radius" in _message(schema.validate, {"passes": 11, "radius": 0.9})
    canonical = schema.validate({"radius": 0.9})
    assert seen[-1] == canonical  # defaults filled in before the check


# -- describe and digest --------------------------------------------------------------------------


def test_describe_is_json_safe() -> None:
    described = json.loads(json.dumps(SCHEMA.describe()))
    assert described[0] == {
        "name": "passes",
        "type": "int",
        "default": 3,
        "range": "[1, 50]",
        "choices": None,
        "help": "How many passes.",
    }
    by_name = {d["name"]: d for d in described}
    assert by_name["radius"]["range"] == "(0, 1]"
    assert by_name["mode"]["choices"] == ["blur", "sharpen"]
    assert by_name["flag"]["type"] == "bool" and by_name["flag"]["range"] is None
    assert by_name["label"]["default"] is None
    json.dumps(RenderSchema().describe())


def test_digest_is_canonical_json() -> None:
    canonical = SCHEMA.validate({"passes": 4})
    assert SCHEMA.digest(canonical) == params_digest(dict(reversed(canonical.items())))
    assert SCHEMA.digest(canonical) != SCHEMA.digest(SCHEMA.validate({}))
    assert params_digest({"a": "ü"}) == params_digest({"a": "\u00fc"})


def test_render_params_digest_is_unchanged() -> None:
    params = RenderParams(prompt="a", seed=3)
    assert params.params_digest() == RENDER_DIGEST
    assert RenderSchema().digest(params.to_dict()) == RENDER_DIGEST


# -- RenderSchema ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"prompt": "a cat", "steps": 12, "guidance": 7},
        {"size": "768x512", "fit": "CONTAIN"},
        {"size": 100, "scheduler": "Euler_A"},
        {"width": 1001, "seed": 2**32 - 1},
    ],
)
def test_render_schema_validates_as_render_params(raw: dict[str, Any]) -> None:
    expected = RenderParams.from_dict(raw).to_dict()
    assert RenderSchema().validate(raw) == expected
    assert RenderSchema(img2img=True).validate(raw) == expected
    assert RenderSchema().bind(expected) == RenderParams.from_dict(raw)


def test_render_schema_img2img_needs_a_denoising_step() -> None:
    raw = {"steps": 1, "strength": 0.5}
    assert RenderSchema().validate(raw)["steps"] == 1  # txt2img ignores strength
    assert "leaves no denoising step" in _message(RenderSchema(img2img=True).validate, raw)


def test_render_schema_refuses_as_render_params() -> None:
    assert "unknown parameter(s) 'colour'" in _message(RenderSchema().validate, {"colour": 1})
    assert "either size or width/height" in _message(
        RenderSchema().validate, {"size": 64, "width": 64}
    )


def test_render_schema_lists_every_field_with_render_params_defaults() -> None:
    names = [p.name for p in RenderSchema.params]
    assert names == list(RenderParams().to_dict())
    defaults = {p.name: p.default for p in RenderSchema.params}
    assert defaults == {**RenderParams().to_dict(), "size": None}  # size: optional, no default
    by_name = {p.name: p.describe() for p in RenderSchema.params}
    assert by_name["strength"]["range"] == "(0, 1]"
    assert by_name["seed"]["range"] == "[0, 4294967295]"
    assert by_name["width"]["range"] == "[8, 2048]"
    assert by_name["fit"]["choices"] == ["cover", "contain", "stretch"]
    assert by_name["steps"]["help"] == "Denoising steps, 1-500 (30)."
    assert all(p.help for p in RenderSchema.params)


def test_render_schema_parse_cli() -> None:
    schema = RenderSchema()
    parsed = schema.parse_cli(["steps=12", "size=768x512", "strength=0.5", "scheduler=DDIM"])
    assert parsed == {"steps": 12, "size": "768x512", "strength": 0.5, "scheduler": "ddim"}
    assert schema.parse_cli(["size=512"]) == {"size": 512}
    assert schema.validate(schema.parse_cli(["size=768X512"]))["width"] == 768
    assert "size must be a whole number, got 'big'" in _message(schema.parse_cli, ["size=big"])
    assert "unknown parameter(s) 'colour'" in _message(schema.parse_cli, ["colour=1"])
    assert "--param takes key=value" in _message(schema.parse_cli, ["steps"])


def test_render_with_extra_parameters_compares_and_hashes_by_all_of_them() -> None:
    upscale = get_pipeline("upscale").params
    small, large = (upscale.bind(upscale.validate({"size": side})) for side in (128, 256))
    assert small != large and small == upscale.bind(upscale.validate({"size": 128}))
    assert hash(small) == hash(upscale.bind(upscale.validate({"size": 128})))
    assert (small.size, small.scale, small.strength) == (128, 2, 0.3)  # render, own, default
    assert pickle.loads(pickle.dumps(small)) == small
