"""One typed settings object, read from ``FARM_*`` environment variables.

Precedence: environment > ``./.env`` > ``$FARM_DATA_DIR/farm.env`` (written by ``farm up``)
> defaults. Secrets are ``SecretStr`` and URLs with passwords are masked in ``repr``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from farm import urls
from farm.errors import ConfigError

ENV_PREFIX = "FARM_"
ENV_FILE_NAME = "farm.env"
# In the default data dir: the data dir of the last `farm up --data-dir DIR`, so that later
# commands without FARM_DATA_DIR find that farm (`farm down` removes it).
ACTIVE_FILE_NAME = "active-data-dir"
# Each URL setting and the check it must pass when read (farm.urls).
URL_CHECKS = {
    "broker_url": urls.check_broker_url,
    "redis_url": urls.check_redis_url,
    "database_url": urls.check_database_url,
    "s3_endpoint": urls.check_s3_endpoint,
    "otlp_endpoint": urls.check_otlp_endpoint,
}
_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


def default_data_dir() -> Path:
    """Where the local stack, the tiny model and local artifacts live unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "farm"


def mask_url(url: str) -> str:
    """``redis://:s3cret@host`` -> ``redis://:***@host``."""
    return _URL_PASSWORD.sub(r"\1***@", url)


class Settings(BaseSettings):
    """Connection settings and knobs for every part of the farm."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    broker_url: SecretStr = Field(description="Celery broker, e.g. redis://:pw@host:6379/0")
    redis_url: SecretStr = Field(description="Redis for progress, heartbeats, leases")
    database_url: SecretStr = Field(description="SQLAlchemy URL of the Postgres database")
    storage: Literal["s3", "fs"] = "s3"
    s3_endpoint: str | None = None
    s3_bucket: str = "farm"
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_region: str = "us-east-1"
    s3_ca_bundle: Path | None = Field(
        None, description="PEM CA bundle that verifies an https S3 endpoint (default: certifi's)"
    )
    fs_root: Path | None = None
    data_dir: Path = Field(default_factory=default_data_dir)
    model: Path | None = None
    text_model: Path | None = Field(
        None, description="local causal LM folder for narrated's script (default: a tiny one)"
    )
    visibility_timeout: int = Field(3600, ge=10, description="broker redelivery, seconds")
    lease_ttl: int = Field(30, ge=2, description="a stage is presumed dead after this, seconds")
    gpu_batch: int = Field(
        8, ge=1, le=64, description="jobs a gpu worker batches into one model call (and holds)"
    )
    max_deliveries: int = Field(3, ge=1, description="crashes of one stage before it fails")
    reconcile_interval: int = Field(15, ge=1, description="seconds between reconciler passes")
    outage_timeout: float = Field(
        600, gt=0, description="seconds a client waits for an unreachable service, then fails"
    )
    signing_key: Path | None = Field(None, description="PEM private key: sign task messages")
    signing_cert: Path | None = Field(None, description="PEM certificate of that key")
    signing_cert_store: Path | None = Field(None, description="folder of trusted certificates")
    flower_user: str = Field("farm", description="basic auth user of Flower, farm ui, metrics")
    flower_password: SecretStr | None = None
    metrics_address: str = Field("127.0.0.1", description="where metrics endpoints listen")
    metrics_port: int = Field(9460, ge=0, le=65535, description="`farm metrics`, farm-wide")
    worker_metrics_port: int = Field(
        9461, ge=0, le=65535, description="first port a worker tries for its metrics; 0: off"
    )
    ui_address: str = Field("127.0.0.1", description="where `farm ui` listens")
    ui_port: int = Field(8686, ge=1, le=65535, description="`farm ui`'s port")
    # Both or neither (farm.consoles checks the pair when a console starts).
    console_tls_cert: Path | None = Field(
        None, description="PEM certificate (chain): Flower, farm ui and metrics serve HTTPS"
    )
    console_tls_key: Path | None = Field(None, description="PEM private key of that certificate")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint, e.g. http://collector:4318; unset: off"
    )
    trace_file: Path | None = Field(None, description="also write spans here as JSON lines")

    @field_validator(*URL_CHECKS)
    @classmethod
    def _check_url(cls, value: SecretStr | str | None, info: ValidationInfo) -> object:
        if value is not None:
            url = value.get_secret_value() if isinstance(value, SecretStr) else value
            URL_CHECKS[info.field_name](url)
        return value

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.public_dict().items())
        return f"Settings({fields})"

    __str__ = __repr__

    def public_dict(self) -> dict[str, str | int | None]:
        """Every setting as a string, secrets masked: safe to log or print."""
        out: dict[str, str | int | None] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = mask_url(value.get_secret_value()) if "url" in name else "***"
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        return out

    @property
    def signing(self) -> bool:
        """Whether task messages are signed (all three signing settings given)."""
        values = (self.signing_key, self.signing_cert, self.signing_cert_store)
        if any(values) and not all(values):
            raise ConfigError(
                "Message signing needs FARM_SIGNING_KEY, FARM_SIGNING_CERT and "
                "FARM_SIGNING_CERT_STORE together."
            )
        return all(values)

    def check_storage(self) -> None:
        """Fail fast when the chosen artifact store lacks what it needs."""
        if self.storage == "s3":
            for name in ("s3_endpoint", "s3_access_key", "s3_secret_key"):
                if getattr(self, name) is None:
                    raise ConfigError(_missing_message(name))
        elif self.fs_root is None:
            raise ConfigError(_missing_message("fs_root"))

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Read the environment and env files; a missing value raises ConfigError naming it."""
        try:
            settings = cls(_env_file=env_files(), **overrides)
        except ValidationError as exc:
            raise ConfigError(_validation_message(exc)) from None
        settings.check_storage()
        return settings


def data_dir_from_env() -> Path:
    """The data dir, before the full settings can be read (it locates ``farm.env``):
    FARM_DATA_DIR, else the one ``farm up --data-dir`` recorded while its farm.env exists,
    else the default."""
    value = os.environ.get(f"{ENV_PREFIX}DATA_DIR")
    if value:
        return Path(value).expanduser()
    active = active_data_dir()
    return active if active is not None else default_data_dir()


def active_data_dir() -> Path | None:
    """The data dir ``farm up --data-dir`` recorded, while it holds a farm.env."""
    try:
        path = Path((default_data_dir() / ACTIVE_FILE_NAME).read_text().strip())
    except OSError:
        return None
    return path if path.is_absolute() and (path / ENV_FILE_NAME).is_file() else None


def remember_data_dir(path: Path) -> None:
    """Record ``path`` for later commands without FARM_DATA_DIR (none for the default)."""
    default = default_data_dir()
    pointer = default / ACTIVE_FILE_NAME
    if path.resolve() == default.resolve():
        pointer.unlink(missing_ok=True)
        return
    default.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(pointer.name + ".tmp")
    tmp.write_text(f"{path.resolve()}\n")
    tmp.replace(pointer)


def forget_data_dir(path: Path) -> None:
    """Drop the record of ``path`` (when it is the one recorded)."""
    pointer = default_data_dir() / ACTIVE_FILE_NAME
    try:
        recorded = Path(pointer.read_text().strip())
    except OSError:
        return
    if recorded == path.resolve():
        pointer.unlink(missing_ok=True)


def env_files() -> tuple[Path, ...]:
    """Env files in increasing precedence (pydantic-settings lets later files win)."""
    return (data_dir_from_env() / ENV_FILE_NAME, Path(".env"))


def is_configured() -> bool:
    """True when a farm is configured (env or ``farm.env``), False to use the local stack."""
    if os.environ.get(f"{ENV_PREFIX}BROKER_URL"):
        return True
    return any(path.is_file() for path in env_files())


def _missing_message(name: str) -> str:
    return _missing_sentence([f"{ENV_PREFIX}{name.upper()}"])


def _validation_message(exc: ValidationError) -> str:
    missing, problems = [], []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "?"
        if err["type"] == "missing":
            missing.append(f"{ENV_PREFIX}{name.upper()}")
        else:
            problems.append(f"{ENV_PREFIX}{name.upper()}: {_reason(err)}.")
    if missing:
        problems.insert(0, _missing_sentence(missing))
    return " ".join(problems)


def _reason(err: dict) -> str:
    """What is wrong with a value: our own check's words as they are (pydantic would prefix
    "Value error, "), or pydantic's."""
    if err["type"] == "value_error":
        return str(err["ctx"]["error"])
    return err["msg"]


def _missing_sentence(names: list[str]) -> str:
    """One sentence naming every missing variable, and where they were looked for."""
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    verb, pronoun = ("is", "it") if len(names) == 1 else ("are", "them")
    where = data_dir_from_env() / ENV_FILE_NAME
    return (
        f"{listed} {verb} not set. Set {pronoun} in the environment or a .env file, or run"
        f" `farm up` (looked in {where}; for a farm in another data dir, set FARM_DATA_DIR)."
    )
