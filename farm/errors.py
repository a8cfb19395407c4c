"""Every error the farm raises on purpose, each with a stable ``code``.

    FarmError
     ├── ConfigError             CONFIG_INVALID
     ├── InputError              (permanent: the job fails at once, never retried)
     │    ├── InvalidParameter   INVALID_PARAM
     │    ├── UnknownPipeline    UNKNOWN_PIPELINE
     │    └── InvalidImage       INPUT_NOT_IMAGE, INPUT_CORRUPT, INPUT_TOO_LARGE,
     │                           INPUT_TOO_SMALL, INPUT_BAD_ASPECT, INPUT_UNSUPPORTED,
     │                           INPUT_OUTSIDE, INPUT_UNREADABLE
     ├── TransientError          (retried with backoff)
     │    ├── StorageError       STORAGE_UNAVAILABLE
     │    ├── DatabaseError      DATABASE_UNAVAILABLE
     │    └── MetadataError      REDIS_UNAVAILABLE
     ├── ArtifactMissing         ARTIFACT_MISSING
     ├── ModelError              MODEL_INVALID
     ├── JobNotFound             JOB_NOT_FOUND
     ├── JobCancelled            JOB_CANCELLED
     ├── LeaseLost               LEASE_LOST
     ├── StageCrashed            STAGE_CRASHED
     └── StageFailed             STAGE_FAILED

Third-party errors (botocore, redis, psycopg2) are mapped to these at the boundary
with ``raise ... from exc`` so users never see a library traceback.
"""

from __future__ import annotations


class FarmError(Exception):
    """Base of every farm error; ``code`` is stable, ``message`` is for people."""

    code = "FARM_ERROR"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConfigError(FarmError):
    """A setting is missing or malformed."""

    code = "CONFIG_INVALID"


class InputError(FarmError):
    """The user's input cannot be rendered; retrying will not help."""

    code = "INPUT_INVALID"


class InvalidParameter(InputError):
    """A job parameter is out of range, non-finite or of the wrong type."""

    code = "INVALID_PARAM"


class UnknownPipeline(InputError):
    """The job names a pipeline the farm does not have."""

    code = "UNKNOWN_PIPELINE"


class InvalidImage(InputError):
    """The input is not an image the farm can read (see the code for why)."""

    code = "INPUT_NOT_IMAGE"


class TransientError(FarmError):
    """A backing service is unreachable; the stage is retried with backoff."""

    code = "TRANSIENT"
    retryable = True


class StorageError(TransientError):
    """The artifact store could not be reached or refused the request."""

    code = "STORAGE_UNAVAILABLE"


class DatabaseError(TransientError):
    """Postgres could not be reached."""

    code = "DATABASE_UNAVAILABLE"


class MetadataError(TransientError):
    """Redis could not be reached."""

    code = "REDIS_UNAVAILABLE"


class ArtifactMissing(FarmError):
    """An artifact a stage needs is not in the store."""

    code = "ARTIFACT_MISSING"


class ModelError(FarmError):
    """The model folder is missing, incomplete or not a diffusers pipeline."""

    code = "MODEL_INVALID"


class JobNotFound(FarmError):
    """No job has this id."""

    code = "JOB_NOT_FOUND"


class JobCancelled(FarmError):
    """The job was cancelled; raised inside a running stage to stop it."""

    code = "JOB_CANCELLED"


class LeaseLost(FarmError):
    """Another delivery of this stage took over; this one must stop without committing."""

    code = "LEASE_LOST"


class StageCrashed(FarmError):
    """A stage killed its worker too many times in a row."""

    code = "STAGE_CRASHED"


class StageFailed(FarmError):
    """A stage raised an unexpected error."""

    code = "STAGE_FAILED"


def is_input_error(code: str | None) -> bool:
    """True for codes that mean the input itself is bad: resuming cannot fix those."""
    return bool(code) and (
        code.startswith("INPUT_") or code in {"INVALID_PARAM", "UNKNOWN_PIPELINE"}
    )
