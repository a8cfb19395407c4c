"""Finding the data dir of `farm up --data-dir X` later, and the missing-settings message."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.config import (
    Settings,
    data_dir_from_env,
    default_data_dir,
    forget_data_dir,
    remember_data_dir,
)
from farm.errors import ConfigError


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("FARM_DATA_DIR", "FARM_BROKER_URL", "FARM_REDIS_URL", "FARM_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    monkeypatch.chdir(tmp_path)  # no stray ./.env
    return tmp_path


def test_the_recorded_data_dir_is_found_while_its_farm_is_up(home: Path) -> None:
    farm_x = home / "x"
    farm_x.mkdir()
    remember_data_dir(farm_x)
    assert data_dir_from_env() == default_data_dir()  # no farm.env there: nothing is up
    (farm_x / "farm.env").write_text("FARM_BROKER_URL=redis://127.0.0.1:1/0\n")
    assert data_dir_from_env() == farm_x
    forget_data_dir(home / "other")  # not the recorded one: kept
    assert data_dir_from_env() == farm_x
    forget_data_dir(farm_x)
    assert data_dir_from_env() == default_data_dir()


def test_farm_data_dir_wins_and_the_default_needs_no_record(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    farm_x = home / "x"
    farm_x.mkdir()
    (farm_x / "farm.env").write_text("")
    remember_data_dir(farm_x)
    monkeypatch.setenv("FARM_DATA_DIR", str(home / "y"))
    assert data_dir_from_env() == home / "y"
    remember_data_dir(default_data_dir())
    assert not (default_data_dir() / "active-data-dir").exists()


def test_missing_settings_are_named_in_one_sentence(home: Path) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env()
    message = err.value.message
    assert message.startswith(
        "FARM_BROKER_URL, FARM_REDIS_URL and FARM_DATABASE_URL are not set. Set them"
    )
    assert message.count("not set") == 1 and str(default_data_dir() / "farm.env") in message
