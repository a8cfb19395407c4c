"""farm: a render farm for AI image generation.

Stages of a diffusion pipeline run as Celery tasks on CPU and GPU queues; every stage
checkpoints to S3-compatible storage and records itself in Postgres, so failed jobs resume
from their last finished stage.
"""

from farm.api import Farm
from farm.batch import Batch, BatchCounts
from farm.config import Settings
from farm.errors import (
    ArtifactCorrupt,
    ArtifactMissing,
    AuthFailed,
    BrokerAuthError,
    BrokerUnavailable,
    BucketMissing,
    ConfigError,
    DatabaseAuthError,
    DatabaseError,
    DuplicateJob,
    FarmError,
    InputError,
    InputMissing,
    InvalidImage,
    InvalidParameter,
    JobCancelled,
    JobNotFound,
    LocalStackFailed,
    MetadataError,
    ModelError,
    NotDone,
    NotResumable,
    RedisAuthError,
    StageCrashed,
    StageFailed,
    StorageAuthError,
    StorageError,
    StorageRefused,
    StorageRejected,
    TransientError,
    UnknownPipeline,
    WorkerFailed,
)
from farm.job import Job, JobInfo, NoWorkerWarning, Progress, StageInfo
from farm.params import RenderParams
from farm.pipelines import PIPELINES

__all__ = [
    "PIPELINES",
    "ArtifactCorrupt",
    "ArtifactMissing",
    "AuthFailed",
    "Batch",
    "BatchCounts",
    "BrokerAuthError",
    "BrokerUnavailable",
    "BucketMissing",
    "ConfigError",
    "DatabaseAuthError",
    "DatabaseError",
    "DuplicateJob",
    "Farm",
    "FarmError",
    "InputError",
    "InputMissing",
    "InvalidImage",
    "InvalidParameter",
    "Job",
    "JobCancelled",
    "JobInfo",
    "JobNotFound",
    "LocalStackFailed",
    "MetadataError",
    "ModelError",
    "NoWorkerWarning",
    "NotDone",
    "NotResumable",
    "Progress",
    "RedisAuthError",
    "RenderParams",
    "Settings",
    "StageCrashed",
    "StageFailed",
    "StageInfo",
    "StorageAuthError",
    "StorageError",
    "StorageRefused",
    "StorageRejected",
    "TransientError",
    "UnknownPipeline",
    "WorkerFailed",
]
