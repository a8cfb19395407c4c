"""Settings: env prefix, env files, fail-fast, masked secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.config import Settings, is_configured
from farm.errors import ConfigError

BASE = {
    "FARM_BROKER_URL": "redis://:brokerpw@127.0.0.1:6390/0",
    "FARM_REDIS_URL": "redis://:redispw@127.0.0.1:6390/0",
    "FARM_DATABASE_URL": "postgresql+psycopg2://farm:dbpw@127.0.0.1:5439/farm",
    "FARM_S3_ENDPOINT": "http://127.0.0.1:8333",
    "FARM_S3_ACCESS_KEY": "AKIAFARM",
    "FARM_S3_SECRET_KEY": "s3-secret-sentinel",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in [*BASE, "FARM_STORAGE", "FARM_DATA_DIR", "FARM_MODEL"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray ./.env
    monkeypatch.setenv("FARM_DATA_DIR", str(tmp_path / "data"))
    return monkeypatch


def test_reads_farm_prefixed_variables(clean_env: pytest.MonkeyPatch) -> None:
    for key, value in BASE.items():
        clean_env.setenv(key, value)
    settings = Settings.from_env()
    assert settings.s3_endpoint == "http://127.0.0.1:8333"
    assert settings.s3_secret_key.get_secret_value() == "s3-secret-sentinel"


def test_missing_value_names_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    for key, value in BASE.items():
        if key != "FARM_DATABASE_URL":
            clean_env.setenv(key, value)
    with pytest.raises(ConfigError, match="FARM_DATABASE_URL is not set"):
        Settings.from_env()


def test_s3_storage_needs_its_keys(clean_env: pytest.MonkeyPatch) -> None:
    for key, value in BASE.items():
        if key != "FARM_S3_SECRET_KEY":
            clean_env.setenv(key, value)
    with pytest.raises(ConfigError, match="FARM_S3_SECRET_KEY"):
        Settings.from_env()


def test_bad_value_is_a_config_error(clean_env: pytest.MonkeyPatch) -> None:
    for key, value in BASE.items():
        clean_env.setenv(key, value)
    clean_env.setenv("FARM_LEASE_TTL", "soon")
    with pytest.raises(ConfigError, match="FARM_LEASE_TTL"):
        Settings.from_env()


def test_farm_env_file_in_data_dir_is_read(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert not is_configured()
    (tmp_path / "data").mkdir()
    lines = [f"{k}={v}" for k, v in BASE.items()]
    (tmp_path / "data" / "farm.env").write_text("\n".join(lines) + "\n")
    assert is_configured()
    assert Settings.from_env().s3_access_key.get_secret_value() == "AKIAFARM"


def test_environment_beats_env_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "farm.env").write_text("\n".join(f"{k}={v}" for k, v in BASE.items()))
    clean_env.setenv("FARM_S3_BUCKET", "from-env")
    assert Settings.from_env().s3_bucket == "from-env"


def test_secrets_are_masked_in_repr(clean_env: pytest.MonkeyPatch) -> None:
    for key, value in BASE.items():
        clean_env.setenv(key, value)
    text = repr(Settings.from_env()) + str(Settings.from_env().public_dict())
    for secret in ("brokerpw", "redispw", "dbpw", "s3-secret-sentinel"):
        assert secret not in text
    assert "redis://:***@127.0.0.1:6390/0" in text


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("FARM_DATABASE_URL", "not a url", "not a database URL"),
        ("FARM_DATABASE_URL", "mysql://farm:dbpw@127.0.0.1/farm", "needs PostgreSQL, not mysql"),
        ("FARM_DATABASE_URL", "postgresql+nosuch://farm:dbpw@h/farm", "no such driver"),
        ("FARM_DATABASE_URL", "postgresql+asyncpg://farm:dbpw@h/farm", "asyncpg package"),
        ("FARM_DATABASE_URL", "postgresql://farm:dbpw@h:port/farm", "not a database URL"),
        ("FARM_REDIS_URL", "http://:redispw@127.0.0.1:6390/0", "not a Redis URL"),
        ("FARM_REDIS_URL", "redis://:redispw@127.0.0.1:port/0", "not a Redis URL"),
        ("FARM_BROKER_URL", "http://:brokerpw@127.0.0.1:6390/0", "not http://"),
        ("FARM_BROKER_URL", "brokerpw@127.0.0.1", "has no scheme"),
        ("FARM_S3_ENDPOINT", "not a url", "not an http:// or https:// URL"),
        ("FARM_S3_ENDPOINT", "ftp://127.0.0.1:8333", "not an http:// or https:// URL"),
        ("FARM_OTLP_ENDPOINT", "collector:4318", "not an http:// or https:// URL"),
    ],
)
def test_a_malformed_url_names_its_variable_and_keeps_its_secret(
    clean_env: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    for key, good in BASE.items():
        clean_env.setenv(key, good)
    clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        Settings.from_env()
    assert info.value.message.startswith(f"{name}: ") and says in info.value.message
    assert "Value error" not in info.value.message
    assert not any(secret in info.value.message for secret in ("dbpw", "redispw", "brokerpw"))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FARM_BROKER_URL", "rediss://:pw@redis.internal:6380/0?ssl_cert_reqs=required"),
        ("FARM_BROKER_URL", "amqp://farm:pw@rabbit.internal:5672//"),
        ("FARM_REDIS_URL", "unix:///run/redis.sock?db=1"),
        ("FARM_DATABASE_URL", "postgresql+psycopg2://farm:pw@pg/farm?sslmode=verify-full"),
        ("FARM_S3_ENDPOINT", "https://s3.internal"),
        ("FARM_OTLP_ENDPOINT", "http://collector:4318"),
    ],
)
def test_every_supported_url_form_is_accepted(
    clean_env: pytest.MonkeyPatch, name: str, value: str
) -> None:
    for key, good in BASE.items():
        clean_env.setenv(key, good)
    clean_env.setenv(name, value)
    Settings.from_env()
