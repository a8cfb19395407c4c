"""The stages of ``narrated`` (farm.narrated) that are its own: script, image_noise, speech,
video. The picture's other stages are the Stable Diffusion ones every render runs."""

from __future__ import annotations

from farm.errors import StageFailed
from farm.media import speech as tts
from farm.media.video import make_video
from farm.models import ModelBundle
from farm.params import output_size
from farm.stages import noise
from farm.stages.base import Artifact, StageHooks


def script(_artifact: Artifact | None, params, model, hooks: StageHooks) -> dict:
    """The narration the text model writes from the prompt, seeded."""
    text, tokens = model.write(params.prompt, seed=params.seed, max_tokens=params.max_tokens)
    if not text.strip():  # the model's fault, not the job's: speech would blame the job
        raise StageFailed(f"the text model wrote no words for this prompt ({tokens} tokens)")
    return {"text": text, "tokens": tokens, "written": True}


def given_script(_artifact: Artifact | None, params, _model, hooks: StageHooks) -> dict:
    """The narration the job gave, passed on as a script."""
    return {"text": params.narration.strip(), "tokens": None, "written": False}


def image_noise(
    _script: Artifact | None, params, model: ModelBundle | None, hooks: StageHooks
) -> Artifact:
    """txt2img's first stage: the picture is of the prompt, not of the script."""
    return noise.run_txt2img(None, params, model, hooks)


def speech(script: dict, params, _model, hooks: StageHooks) -> bytes:
    """The narration read aloud: a WAV. Reports a step before and after, where it can stop."""
    hooks.on_step(0, 1)
    wav = tts.synthesize(script["text"], voice=params.voice, rate=params.rate)
    hooks.on_step(1, 1)
    return wav


def video(parts: dict, params, _model, _hooks: StageHooks) -> bytes:
    """The picture, slowly panned and zoomed for as long as the speech: an MP4."""
    return make_video(parts["image"], parts["speech"], fps=params.fps, size=output_size(params))
