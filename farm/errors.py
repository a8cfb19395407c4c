"""Every error the farm raises on purpose, one class per stable ``code`` (``InvalidImage``
carries one of the INPUT_* codes, which say what is wrong with the file).

    FarmError
     ├── ConfigError             CONFIG_INVALID
     ├── InputError              (permanent: the job fails at once, never retried)
     │    ├── InvalidParameter   INVALID_PARAM
     │    ├── UnknownPipeline    UNKNOWN_PIPELINE
     │    ├── InvalidImage       INPUT_NOT_IMAGE, INPUT_CORRUPT, INPUT_TOO_LARGE,
     │    │                      INPUT_TOO_SMALL, INPUT_BAD_ASPECT, INPUT_UNSUPPORTED,
     │    │                      INPUT_OUTSIDE, INPUT_UNREADABLE
     │    └── InputMissing       INPUT_MISSING
     ├── TransientError          (a service is unreachable: retried with backoff)
     │    ├── StorageError       STORAGE_UNAVAILABLE
     │    ├── DatabaseError      DATABASE_UNAVAILABLE
     │    ├── MetadataError      REDIS_UNAVAILABLE
     │    └── BrokerUnavailable  BROKER_UNAVAILABLE
     ├── AuthFailed              (a server refused our credentials: never retried)
     │    ├── DatabaseAuthError  DATABASE_AUTH_FAILED
     │    ├── RedisAuthError     REDIS_AUTH_FAILED
     │    └── BrokerAuthError    BROKER_AUTH_FAILED
     ├── TlsUntrusted            TLS_UNTRUSTED (a server's certificate failed verification)
 ├── StorageRefused          (the store answered and said no: never retried)
     │    ├── StorageAuthError   STORAGE_AUTH
     │    ├── BucketMissing      STORAGE_NO_BUCKET
     │    └── StorageRejected    STORAGE_REJECTED
     ├── ArtifactMissing         ARTIFACT_MISSING
     ├── ArtifactCorrupt         ARTIFACT_CORRUPT
     ├── ModelError              MODEL_INVALID
     ├── JobNotFound             JOB_NOT_FOUND
     ├── NotDone                 NOT_DONE
     ├── NotResumable            NOT_RESUMABLE
     ├── DuplicateJob            DUPLICATE_JOB
     ├── LocalStackFailed        LOCAL_STACK_FAILED
     ├── WorkerFailed            WORKER_FAILED
     ├── JobCancelled            JOB_CANCELLED
     ├── LeaseLost               LEASE_LOST
     ├── StageCrashed            STAGE_CRASHED
     └── StageFailed             STAGE_FAILED

Each ``TransientError`` names the ``service`` it waits on (``service_of`` maps a recorded code
back to it: what users see while a stage waits for its retry). Only ``TransientError`` and its
subclasses are ``retryable``, and that is a property of the class, never of one instance:
``except TransientError`` can never catch an authentication failure. Third-party errors
(botocore, redis, psycopg2, kombu) are mapped to these at their boundary (the stores, the
session, the metadata client, dispatch) with ``raise ... from exc``, so users never see a
library traceback.
"""

from __future__ import annotations


class FarmError(Exception):
    """Base of every farm error; ``code`` is stable, ``message`` is for people."""

    code = "FARM_ERROR"
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def add_detail(self, sentence: str) -> None:
        """Append what the user should know besides, e.g. what a failed command left behind."""
        self.message = f"{self.message}; {sentence}"
        self.args = (self.message,)


class TlsUntrusted(FarmError):
    """A server's TLS certificate is not signed by the CA we trust, or names another host:
    never retried (waiting does not change a certificate)."""

    code = "TLS_UNTRUSTED"


class ConfigError(FarmError):
    """A setting, option or argument is missing or malformed."""

    code = "CONFIG_INVALID"


class PipelineInvalid(ConfigError):
    """A pipeline's definition is wrong (a plugin's, or what its ``expand`` built): a stage
    after one that does not exist, a cycle, a stage fed a kind it does not read."""

    code = "PIPELINE_INVALID"


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
    """The input is not an image the farm can read; ``code`` (one of the INPUT_* codes in the
    tree above) says why."""

    code = "INPUT_NOT_IMAGE"

    def __init__(self, message: str, *, code: str = "INPUT_NOT_IMAGE") -> None:
        super().__init__(message)
        if not code.startswith("INPUT_"):
            raise ValueError(f"an InvalidImage code starts with INPUT_, not {code!r}")
        self.code = code


class InputMissing(InputError):
    """The submitted input is gone from the store: the one artifact the farm cannot rebuild."""

    code = "INPUT_MISSING"


class TransientError(FarmError):
    """A backing service is unreachable; the stage is retried with backoff."""

    code = "TRANSIENT"
    retryable = True
    service = "a service"  # what the farm is waiting on, as users call it


class StorageError(TransientError):
    """The artifact store could not be reached or failed for now (5xx, throttling, a full
    disk)."""

    code = "STORAGE_UNAVAILABLE"
    service = "storage"


class DatabaseError(TransientError):
    """Postgres could not be reached."""

    code = "DATABASE_UNAVAILABLE"
    service = "Postgres"


class MetadataError(TransientError):
    """Redis (progress, leases, cancel flags) could not be reached."""

    code = "REDIS_UNAVAILABLE"
    service = "Redis"


class BrokerUnavailable(TransientError):
    """The Celery broker could not be reached, so a message was not sent."""

    code = "BROKER_UNAVAILABLE"
    service = "the broker"


class AuthFailed(FarmError):
    """A server refused the credentials in its URL setting: retrying will not help."""

    code = "AUTH_FAILED"


class DatabaseAuthError(AuthFailed):
    """Postgres refused the user or password of FARM_DATABASE_URL."""

    code = "DATABASE_AUTH_FAILED"


class RedisAuthError(AuthFailed):
    """Redis refused the password of FARM_REDIS_URL."""

    code = "REDIS_AUTH_FAILED"


class BrokerAuthError(AuthFailed):
    """The broker refused the credentials of FARM_BROKER_URL."""

    code = "BROKER_AUTH_FAILED"


class StorageRefused(FarmError):
    """The artifact store answered and refused the request: retrying will not help."""

    code = "STORAGE_REFUSED"


class StorageAuthError(StorageRefused):
    """The store refused our credentials (or they are missing)."""

    code = "STORAGE_AUTH"


class BucketMissing(StorageRefused):
    """The configured bucket does not exist."""

    code = "STORAGE_NO_BUCKET"


class StorageRejected(StorageRefused):
    """The store rejected the request itself (a 4xx, or a key the backend cannot hold)."""

    code = "STORAGE_REJECTED"


class ArtifactMissing(FarmError):
    """An artifact a stage needs is not in the store."""

    code = "ARTIFACT_MISSING"


class ArtifactCorrupt(FarmError):
    """An artifact is in the store but is not what was written (damaged or foreign bytes)."""

    code = "ARTIFACT_CORRUPT"


class ModelError(FarmError):
    """The model folder is missing, incomplete or not a diffusers pipeline."""

    code = "MODEL_INVALID"


class JobNotFound(FarmError):
    """No job has this id."""

    code = "JOB_NOT_FOUND"


class NotDone(FarmError):
    """The job has no output (yet): it is not done."""

    code = "NOT_DONE"


class NotResumable(FarmError):
    """Resume was asked of a job that is running, queued or done."""

    code = "NOT_RESUMABLE"


class DuplicateJob(FarmError):
    """Another submitter recorded a job with the same idempotency key first."""

    code = "DUPLICATE_JOB"


class LocalStackFailed(FarmError):
    """A server of the local stack would not start, answer or stop."""

    code = "LOCAL_STACK_FAILED"


class WorkerFailed(FarmError):
    """A worker process exited or did not become ready."""

    code = "WORKER_FAILED"


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


# A transient error's code -> the service it waits on.
_SERVICES = {cls.code: cls.service for cls in (TransientError, *TransientError.__subclasses__())}
TRANSIENT_CODES = frozenset(_SERVICES)


def service_of(code: str | None) -> str | None:
    """The service a recorded transient error ``code`` waits on (``Postgres``...); None for
    any other code."""
    return _SERVICES.get(code or "")


def is_input_error(code: str | None) -> bool:
    """True for codes that mean the input itself is bad: resuming cannot fix those."""
    return bool(code) and (
        code.startswith("INPUT_") or code in {"INVALID_PARAM", "UNKNOWN_PIPELINE"}
    )


class GpuOutOfMemory(FarmError):
    """The GPU ran out of memory with this job alone in the batch: the job itself is too big."""

    code = "GPU_OUT_OF_MEMORY"


class WorkerStopping(TransientError):
    """The worker stopped while a stage waited for its GPU engine: the stage runs again."""

    code = "WORKER_STOPPING"
    service = "a gpu worker"


class GpuMemoryShort(TransientError):
    """The GPU ran out of memory in a job's own work beside a batch: the stage runs again."""

    code = "GPU_MEMORY_SHORT"
    service = "GPU memory"
