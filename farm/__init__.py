"""farm: a render farm for AI image generation.

Stages of a diffusion pipeline run as Celery tasks on CPU and GPU queues; every stage
checkpoints to S3-compatible storage and records itself in Postgres, so failed jobs resume
from their last finished stage.
"""

from farm.api import Farm, Job, JobInfo, NoWorkerWarning, Progress, StageInfo
from farm.batch import Batch, BatchCounts
from farm.config import Settings
from farm.errors import (
    ArtifactMissing,
    ConfigError,
    DatabaseError,
    FarmError,
    InputError,
    InvalidImage,
    InvalidParameter,
    JobCancelled,
    JobNotFound,
    MetadataError,
    ModelError,
    StageCrashed,
    StageFailed,
    StorageError,
    TransientError,
    UnknownPipeline,
)
from farm.params import RenderParams
from farm.pipelines import PIPELINES

__all__ = [
    "PIPELINES",
    "ArtifactMissing",
    "Batch",
    "BatchCounts",
    "ConfigError",
    "DatabaseError",
    "Farm",
    "FarmError",
    "InputError",
    "InvalidImage",
    "InvalidParameter",
    "Job",
    "JobCancelled",
    "JobInfo",
    "JobNotFound",
    "MetadataError",
    "ModelError",
    "NoWorkerWarning",
    "Progress",
    "RenderParams",
    "Settings",
    "StageCrashed",
    "StageFailed",
    "StageInfo",
    "StorageError",
    "TransientError",
    "UnknownPipeline",
]
