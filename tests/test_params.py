"""RenderParams: what users may ask for, and the clear errors for what they may not."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

from farm.buckets import BUCKETS
from farm.errors import InvalidParameter
from farm.params import FIT_NAMES, SCHEDULER_NAMES, RenderParams, output_size


def test_defaults() -> None:
    params = RenderParams.from_dict({})
    assert params == RenderParams() == RenderParams(size=512)
    assert params.params_digest() == RenderParams(size=512).params_digest()
    assert (params.size, params.width, params.height, params.fit) == (512, None, None, "cover")
    assert (params.steps, params.scheduler) == (30, "pndm")
    assert (params.strength, params.guidance, params.seed) == (0.75, 7.5, 0)


def test_valid_values_are_normalized() -> None:
    params = RenderParams.from_dict(
        {
            "prompt": "a cat\r\n\tin a hat",
            "guidance": 7,
            "width": 1001,
            "height": 15,
            "seed": 2**32 - 1,
        }
    )
    assert params.guidance == 7.0 and isinstance(params.guidance, float)
    assert (params.width, params.height) == (1000, 8)  # snapped down to a multiple of 8
    assert params.seed == 2**32 - 1


@pytest.mark.parametrize(
    ("size", "stored"),
    [
        (64, (64, None, None)),
        (100, (96, None, None)),  # snapped down, like width and height
        ("256", (256, None, None)),
        ("768x512", (None, 768, 512)),
        (" 100 X 36 ", (None, 96, 32)),
    ],
)
def test_size_shorthand(size: object, stored: tuple[int | None, ...]) -> None:
    params = RenderParams.from_dict({"size": size})
    assert (params.size, params.width, params.height) == stored


# -- output size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "input_size", "expected"),
    [
        ({"size": 512}, (4032, 3024), (512, 384)),  # a phone's 4:3 is a bucket
        ({"size": 512}, (3024, 4032), (384, 512)),  # a portrait stays a portrait
        ({"size": 512}, (300, 200), (512, 344)),  # 3:2: 341.3 -> the nearest multiple of 8
        ({"size": 1024}, (1250, 1000), (1024, 816)),  # 5:4: 819.2 -> 816, not 824
        ({"size": 512}, (1920, 1080), (512, 288)),  # 16:9
        ({"size": 512}, (1080, 1350), (408, 512)),  # 4:5, Instagram's portrait
        ({"size": 512}, (1100, 1000), (512, 512)),  # 1.1:1 is nearer 1:1 than 5:4
        ({"size": 512}, (1150, 1000), (512, 408)),  # 1.15:1 is nearer 5:4
        ({"size": 512}, (1400, 1000), (512, 384)),  # 1.4:1 is nearer 4:3 than 3:2 in log-aspect
        ({"size": 512}, (2340, 1080), (512, 256)),  # 19.5:9, a phone screenshot: 2:1
        ({"size": 512}, (4000, 1000), (512, 256)),  # a 4:1 panorama: the widest bucket, 2:1
        ({"size": 512}, (1000, 4000), (256, 512)),
        ({"size": 8}, (2000, 100), (8, 8)),  # 4 -> at least 8
        ({"size": 512}, (640, 640), (512, 512)),
        ({"size": 512}, None, (512, 512)),  # txt2img: N x N
        ({"size": "768x512"}, (100, 400), (768, 512)),  # exact, whatever the input
        ({"size": "520x296"}, (1000, 1000), (520, 296)),  # exact, though no bucket's aspect
        ({"size": "768x512"}, None, (768, 512)),
        ({"width": 256}, (400, 300), (256, 192)),  # one side: the other follows the bucket
        ({"height": 256}, (400, 300), (344, 256)),
        ({"width": 512}, (2340, 1080), (512, 256)),
        ({"height": 512}, (1000, 1080), (512, 512)),
        ({"width": 2048}, (100, 1000), (2048, 2048)),  # never past SIZE_MAX
        ({"width": 256}, None, (256, 256)),
        ({}, (400, 300), (512, 384)),
    ],
)
def test_output_size(
    given: dict[str, Any], input_size: tuple[int, int] | None, expected: tuple[int, int]
) -> None:
    width, height = output_size(RenderParams.from_dict(given), input_size)
    assert (width, height) == expected
    assert width % 8 == 0 and height % 8 == 0


def random_inputs(count: int, seed: int) -> list[tuple[int, int]]:
    """Input sizes of aspects log-uniform in [1:20, 20:1], the most preprocess accepts."""
    rng = random.Random(seed)
    aspects = (math.exp(rng.uniform(-math.log(20), math.log(20))) for _ in range(count))
    return [(round(1000 * a), 1000) if a >= 1 else (1000, round(1000 / a)) for a in aspects]


@pytest.mark.parametrize("size", [8, 64, 128, 200, 512, 768, 1024, 2048])
def test_a_mixed_folder_gives_at_most_one_shape_per_bucket(size: int) -> None:
    params = RenderParams(size=size)
    shapes = {output_size(params, input_size) for input_size in random_inputs(20, seed=size)}
    assert len(shapes) <= len(BUCKETS)
    for width, height in shapes:
        assert width % 8 == 0 and height % 8 == 0
        assert max(width, height) == params.size  # the long side is the one asked for
        assert width * height >= params.size**2 // 2 - 4 * params.size


@pytest.mark.parametrize("given", [{"size": 512}, {"width": 320}, {"height": 1000}])
def test_every_derived_side_is_a_multiple_of_8(given: dict[str, Any]) -> None:
    params = RenderParams.from_dict(given)
    ratios = [(w * 100, h * 100) for w, h in BUCKETS] + random_inputs(200, seed=1)
    for width, height in (output_size(params, input_size) for input_size in ratios):
        assert width % 8 == 0 and height % 8 == 0, (width, height)


def test_explicit_width_and_height_ignore_the_buckets() -> None:
    for width, height in [(520, 296), (1000, 8), (64, 2048)]:
        params = RenderParams(width=width, height=height)
        for input_size in [None, *random_inputs(20, seed=2)]:
            assert output_size(params, input_size) == (width, height)


@pytest.mark.parametrize("fit", FIT_NAMES)
def test_every_fit_is_accepted(fit: str) -> None:
    params = RenderParams.from_dict({"size": "64x32", "fit": fit.upper()})
    assert params.fit == fit
    assert RenderParams.from_dict(params.to_dict()) == params


def test_round_trip_through_json() -> None:
    params = RenderParams.from_dict({"prompt": "ünïcode ✓", "scheduler": "Euler_A", "sharpen": 1})
    again = RenderParams.from_dict(json.loads(json.dumps(params.to_dict())))
    assert again == params
    assert params.scheduler == "euler_a"
    for given in ({"size": 200}, {"size": "64x32", "fit": "contain"}, {"height": 64}):
        params = RenderParams.from_dict(given)
        assert RenderParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params


def test_digest_tells_sizes_apart() -> None:
    digests = {
        RenderParams.from_dict(given).params_digest()
        for given in ({"size": 256}, {"size": "256x256"}, {"width": 256}, {"height": 256})
    }
    assert len(digests) == 4  # a long side, an exact square and one fixed side differ
    assert (
        RenderParams.from_dict({"size": "64x32", "fit": "contain"}).params_digest()
        != RenderParams.from_dict({"size": "64x32"}).params_digest()
    )


def test_digest_is_stable_and_distinguishes() -> None:
    params = RenderParams(prompt="x", guidance=7)
    assert params.params_digest() == RenderParams(prompt="x", guidance=7.0).params_digest()
    assert params.params_digest() != RenderParams(prompt="x", guidance=7.5).params_digest()
    assert len(params.params_digest()) == 64


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_is_accepted(name: str) -> None:
    assert RenderParams(scheduler=name).scheduler == name


BAD: list[tuple[dict[str, Any], str]] = [
    ({"steps": math.nan}, "steps"),
    ({"guidance": math.nan}, "guidance must be a finite number"),
    ({"guidance": math.inf}, "guidance must be a finite number"),
    ({"strength": -math.inf}, "strength"),
    ({"seed": -1}, "seed must be between 0 and 4294967295"),
    ({"seed": 2**70}, "seed must be between"),
    ({"seed": 10**5000}, "too large to print"),
    ({"strength": 2**2000}, "strength must be in (0, 1]"),
    ({"seed": 1.5}, "seed must be a whole number"),
    ({"steps": True}, "steps must be a number, got bool"),
    ({"guidance": False}, "guidance must be a number, got bool"),
    ({"steps": "30"}, "steps must be a number, got str"),
    ({"steps": None}, "steps must be a number"),
    ({"steps": 0}, "steps must be between 1 and 500"),
    ({"steps": 501}, "steps"),
    ({"strength": 0}, "strength must be in (0, 1]"),
    ({"strength": 1.01}, "strength"),
    ({"guidance": 50.5}, "guidance must be in [0, 50]"),
    ({"saturation": -0.1}, "saturation"),
    ({"sharpen": 6}, "sharpen"),
    ({"width": 7}, "width must be between 8 and 2048"),
    ({"height": 4096}, "height"),
    ({"size": "big"}, "size must be"),
    ({"size": True}, "size must be"),
    ({"size": 64, "width": 64}, "either size or width/height"),
    ({"size": "64", "height": 64}, "either size or width/height"),
    ({"size": "9000x64"}, "width"),
    ({"size": 4096}, "size must be between 8 and 2048"),
    ({"size": 4}, "size must be between 8 and 2048"),
    ({"size": 64.5}, "size must be a whole number"),
    ({"width": 64.0}, "width must be a whole number"),
    ({"height": "64"}, "height must be a number, got str"),
    ({"fit": "crop"}, "fit must be one of cover, contain, stretch; got 'crop'"),
    ({"fit": None}, "fit must be one of cover, contain, stretch"),
    ({"scheduler": "lms"}, "scheduler must be one of pndm, ddim, euler, euler_a, dpm"),
    ({"scheduler": 3}, "scheduler"),
    ({"prompt": 5}, "prompt must be text"),
    ({"prompt": "x" * 2001}, "prompt has 2001 characters; at most 2000"),
    ({"negative_prompt": "a\x00b"}, "negative_prompt contains the control character '\\x00'"),
    ({"prompt": "bell\x07"}, "control character"),
    ({"prompt": "lone \ud800 surrogate"}, "prompt contains"),
    ({"colour": 1.0}, "unknown parameter(s) 'colour'"),
    ({"steps": 20, "stpes": 20, "zzz": 1}, "unknown parameter(s) 'stpes', 'zzz'"),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_invalid_parameters_name_the_problem(data: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParameter) as raised:
        RenderParams.from_dict(data)
    assert message in raised.value.message
    assert raised.value.code == "INVALID_PARAM"


def test_not_a_mapping() -> None:
    with pytest.raises(InvalidParameter, match="JSON object"):
        RenderParams.from_dict([("steps", 3)])  # type: ignore[arg-type]


def test_non_string_key() -> None:
    with pytest.raises(InvalidParameter, match="names must be text"):
        RenderParams.from_dict({1: 2})


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(InvalidParameter, match="steps"):
        RenderParams(steps=-3)
    with pytest.raises(InvalidParameter, match="either size or width/height"):
        RenderParams(size=64, height=64)
    with pytest.raises(InvalidParameter, match="fit must be one of"):
        RenderParams(fit="fill")


def test_is_frozen() -> None:
    params = RenderParams()
    with pytest.raises(AttributeError):
        params.steps = 3  # type: ignore[misc]


def test_img2img_steps_follow_diffusers_arithmetic() -> None:
    assert RenderParams(steps=30, strength=0.5).img2img_steps() == 15
    with pytest.raises(InvalidParameter, match="leaves no denoising step"):
        RenderParams(steps=2, strength=0.3).img2img_steps()
