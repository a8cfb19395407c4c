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

from importlib import import_module

from farm.errors import InvalidParameter
from farm.params import output_size
from farm.pipelines import CPU, GPU, SD_MODEL, Pipeline, Stage, StageFn, StageSpec
from farm.schema import Param, RenderSchema

AUDIO = "audio"
TEXT_MODEL = "text"
MAX_WORDS = 200  # tokens the script may write: about a minute and a half of speech


def _lazy(module: str, function: str) -> StageFn:
    def run(artifact, params, model, hooks):
        return getattr(import_module(module), function)(artifact, params, model, hooks)

    run.__qualname__ = f"{module}.{function}"
    return run


def _load_text_model(settings):
    from farm.models.text import load_text_model

    return load_text_model(settings.text_model, settings.data_dir)


_STAGES = "farm.stages.narrated"
OPS = {
    op.name: op
    for op in (
        Stage("script", _lazy(_STAGES, "script"), writes="json", reads=(), model=TEXT_MODEL),
        # the image branch starts from the script's end, reading nothing of it
        Stage("image_noise", _lazy(_STAGES, "image_noise"), reads=("json",), model=SD_MODEL),
        Stage("denoise", _lazy("farm.stages.denoise", "run"), model=SD_MODEL),
        Stage("decode", _lazy("farm.stages.decode", "run"), model=SD_MODEL),
        Stage("postprocess", _lazy("farm.stages.postprocess", "run"), writes="png"),
        Stage("speech", _lazy(_STAGES, "speech"), writes="wav", reads=("json",)),
        Stage("video", _lazy(_STAGES, "video"), writes="mp4", reads=("png", "wav"), join=True),
    )
}

STAGES = (
    StageSpec("script", GPU, "script"),
    StageSpec("image-noise", GPU, "image_noise", ("script",)),
    StageSpec("image-denoise", GPU, "denoise", ("image-noise",)),
    StageSpec("image-decode", GPU, "decode", ("image-denoise",)),
    StageSpec("image", CPU, "postprocess", ("image-decode",)),
    StageSpec("speech", AUDIO, "speech", ("script",)),
    StageSpec("video", CPU, "video", ("image", "speech")),
)


def _check(params) -> None:
    if not params.prompt.strip():
        raise InvalidParameter("narrated needs a prompt: what the video shows and is about")
    from farm.media.speech import check_voice  # ctypes only: light enough for a client
    from farm.media.video import MAX_SIDE

    check_voice(params.voice)
    if max(output_size(params)) > MAX_SIDE:
        raise InvalidParameter(f"narrated videos are at most {MAX_SIDE} px on a side")


PARAMS = RenderSchema(
    extra=(
        Param("narration", str, "", "What the voice says; empty: the script stage writes it."),
        Param("words", int, 40, "Tokens the script stage writes.", 1, MAX_WORDS),
        Param("voice", str, "en", "eSpeak NG language (en, en-us, de, fr, ...) or voice name."),
        Param("rate", int, 175, "Speaking rate in words per minute.", 80, 450),
        Param("fps", int, 24, "Video frames per second.", 1, 60),
    ),
    defaults={"steps": 20},
    check=_check,
)

NARRATED = Pipeline(
    "narrated",
    stages=STAGES,
    ops=OPS,
    params=PARAMS,
    needs_input=False,
    models={TEXT_MODEL: _load_text_model},
    help="A prompt -> a narrated video: script, then picture and speech at once, then MP4.",
)
