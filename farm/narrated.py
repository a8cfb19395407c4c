"""``narrated``: a prompt becomes a short narrated video, each stage a different model on a
different kind of worker.

    script (gpu) ─┬─ image-noise → image-denoise → image-decode (gpu) → image (cpu) ─┬─ video (cpu)
                  └─ speech (audio) ─────────────────────────────────────────────────┘

``script`` writes the narration with a causal language model (FARM_TEXT_MODEL, or the tiny one
the farm builds), unless the job gives ``narration``; ``image`` is txt2img of the prompt through
the Stable Diffusion stages; ``speech`` reads the narration aloud with eSpeak NG on any worker
of the ``audio`` queue (a CPU node); ``video`` pans slowly over the picture for as long as the
speech lasts, muxed into an MP4 (H.264 + AAC). The picture and the speech are independent
branches, so they render at the same time on different workers.
"""

from __future__ import annotations

from farm.errors import InvalidParameter
from farm.media.speech import RATE_RANGE
from farm.media.video import FPS_RANGE
from farm.params import output_size
from farm.pipelines import CPU, GPU, SD_MODEL, Pipeline, Stage, StageSpec, lazy
from farm.schema import Param, RenderSchema

AUDIO = "audio"
TEXT_MODEL = "text"
MAX_TOKENS = 200  # the script at most: about a minute and a half of speech


def _load_text_model(settings):
    from farm.models.text import load_text_model

    return load_text_model(settings.text_model, settings.data_dir)


_STAGES = "farm.stages.narrated"
OPS = {
    op.name: op
    for op in (
        Stage("script", lazy(_STAGES, "script"), writes="json", reads=(), model=TEXT_MODEL),
        # a job that gives its narration: no model to load
        Stage("given_script", lazy(_STAGES, "given_script"), writes="json", reads=()),
        # the image branch starts from the script's end, reading nothing of it
        Stage("image_noise", lazy(_STAGES, "image_noise"), reads=("json",), model=SD_MODEL),
        Stage("denoise", lazy("farm.stages.denoise", "run"), model=SD_MODEL),
        Stage("decode", lazy("farm.stages.decode", "run"), model=SD_MODEL),
        Stage("postprocess", lazy("farm.stages.postprocess", "run"), writes="png"),
        Stage("speech", lazy(_STAGES, "speech"), writes="wav", reads=("json",)),
        Stage("video", lazy(_STAGES, "video"), writes="mp4", reads=("png", "wav"), join=True),
    )
}


def expand(params, _data: bytes | None) -> list[StageSpec]:
    """The DAG; its first stage writes the script, or passes on the one the job gave."""
    writer = "given_script" if params.narration.strip() else "script"
    return [
        StageSpec("script", GPU, writer),
        StageSpec("image-noise", GPU, "image_noise", ("script",)),
        StageSpec("image-denoise", GPU, "denoise", ("image-noise",)),
        StageSpec("image-decode", GPU, "decode", ("image-denoise",)),
        StageSpec("image", CPU, "postprocess", ("image-decode",)),
        StageSpec("speech", AUDIO, "speech", ("script",)),
        StageSpec("video", CPU, "video", ("image", "speech")),
    ]


def _check(params) -> None:
    if not params.prompt.strip():
        raise InvalidParameter("narrated needs a prompt: what the video shows and is about")
    from farm.media.speech import check_voice  # ctypes only: light enough for a client
    from farm.media.video import MAX_SIDE, MIN_SIDE

    check_voice(params.voice)
    width, height = output_size(params)
    if not MIN_SIDE <= min(width, height) <= max(width, height) <= MAX_SIDE:
        raise InvalidParameter(
            f"narrated videos are {MIN_SIDE} to {MAX_SIDE} px on a side, got {width}x{height}"
        )


PARAMS = RenderSchema(
    extra=(
        Param("narration", str, "", "What the voice says; empty: the script stage writes it."),
        Param("max_tokens", int, 40, "Tokens the script stage writes at most.", 1, MAX_TOKENS),
        Param("voice", str, "en", "eSpeak NG language (en, en-us, de, fr, ...) or voice name."),
        Param("rate", int, 175, "Speaking rate in words per minute.", *RATE_RANGE),
        Param("fps", int, 24, "Video frames per second.", *FPS_RANGE),
    ),
    defaults={"steps": 20},
    help={"steps": "Denoising steps of the picture, 1-500 (20)."},
    check=_check,
)

NARRATED = Pipeline(
    "narrated",
    stages=tuple(expand(PARAMS.bind_unchecked(PARAMS.validate({"prompt": "x"})), None)),
    ops=OPS,
    params=PARAMS,
    needs_input=False,
    expand=expand,
    models={TEXT_MODEL: _load_text_model},
    help="A prompt -> a narrated video: script, then picture and speech at once, then MP4.",
)
