"""Pure stage logic: plain functions over tensors and parameters, no queues, stores or databases.

``STAGES`` maps each stage's name to its ``Stage``; a pipeline is an ordered list of names.
Every ``run`` has the same signature, ``run(artifact, params, model, hooks) -> artifact``, so a
task wrapper can run any of them: load the input artifact, load the model if ``needs_model``,
call ``run``, store what it returns.
"""

from farm.stages import decode, denoise, encode, noise, noop, postprocess, preprocess
from farm.stages.base import Artifact, NoHooks, Stage, StageFn, StageHooks, Tensors

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("preprocess", needs_model=False, output="tensors", run=preprocess.run),
        Stage("encode", needs_model=True, output="tensors", run=encode.run),
        Stage("noise", needs_model=True, output="tensors", run=noise.run),
        Stage("noise_txt2img", needs_model=True, output="tensors", run=noise.run_txt2img),
        Stage("denoise", needs_model=True, output="tensors", run=denoise.run),
        Stage("decode", needs_model=True, output="tensors", run=decode.run),
        Stage("postprocess", needs_model=False, output="png", run=postprocess.run),
        Stage("noop", needs_model=False, output="tensors", run=noop.run),
    )
}

__all__ = ["STAGES", "Artifact", "NoHooks", "Stage", "StageFn", "StageHooks", "Tensors"]
