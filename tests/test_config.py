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
