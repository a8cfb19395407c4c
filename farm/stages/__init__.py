"""Pure stage logic: plain functions over tensors and parameters, no queues, stores or databases.

``STAGES`` maps each built-in stage's name to its ``Stage`` (declared in farm.builtin, with
what it reads, writes and needs). Every ``run`` has the same signature,
``run(artifact, params, model, hooks) -> artifact``, so a task wrapper can run any of them:
load the input artifact, load the model it names, call ``run``, store what it returns.
"""

from farm.builtin import SD_STAGES as STAGES
from farm.pipelines import Stage, StageFn, StageHooks
from farm.stages.base import Artifact, NoHooks, Tensors

__all__ = ["STAGES", "Artifact", "NoHooks", "Stage", "StageFn", "StageHooks", "Tensors"]
