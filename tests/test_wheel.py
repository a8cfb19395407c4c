"""The built wheel works on a machine without the checkout: installed into a fresh venv and run
from elsewhere, it migrates, starts a farm, renders and stops it.

The fresh venv gets the already-installed dependencies through a ``.pth`` line naming this
interpreter's site-packages (a directory added that way does not run its own ``.pth`` files, so
the checkout's editable install stays out), and PATH reaches this venv's server binaries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import sample_png

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEPENDENCIES = sysconfig.get_path("purelib")
SERVER_BIN = Path(sys.executable).parent  # this venv's bin: weed and friends
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "demo-output"
)


def build_wheel(tmp: Path) -> Path:
    """`pip wheel` on a copy of the checkout, so the build leaves nothing in the checkout.
    No build isolation: setuptools is already installed, and nothing is downloaded."""
    source = tmp / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_SOURCE)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, "-w", str(dist), str(source)], check=True, cwd=tmp, timeout=300)
    (wheel,) = dist.glob("farm-*.whl")
    return wheel


def fresh_venv(root: Path, wheel: Path) -> tuple[Path, Path]:
    """A venv holding only the wheel (plus the shared dependencies); returns (bin, site)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]))
    (site / "farm-dependencies.pth").write_text(DEPENDENCIES + "\n")
    # pip comes from the shared dependencies; --ignore-installed keeps it off their farm.
    install = ["-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed"]
    subprocess.run([str(python), *install, str(wheel)], check=True, timeout=300)
    return root / "bin", site


def run(args: list[str], **kwargs) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs).stdout.strip()


def isolated_env(tmp: Path, venv_bin: Path) -> dict[str, str]:
    """No FARM_* or PYTHON* setting of the test session; home and data dirs of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "PYTHON"))}
    env.pop("VIRTUAL_ENV", None)
    dirs = {"HOME": tmp / "home", "XDG_DATA_HOME": tmp / "xdg", "FARM_DATA_DIR": tmp / "data"}
    for path in dirs.values():
        path.mkdir()
    return {
        **env,
        **{k: str(v) for k, v in dirs.items()},
        "PATH": os.pathsep.join([str(venv_bin), str(SERVER_BIN), env.get("PATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "200",
        "NO_COLOR": "1",
    }


def test_installed_wheel_migrates_runs_a_farm_and_renders(tmp_path: Path) -> None:
    venv_bin, site = fresh_venv(tmp_path / "venv", build_wheel(tmp_path))
    env = isolated_env(tmp_path, venv_bin)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "in").mkdir(parents=True)
    (elsewhere / "in" / "x.png").write_bytes(sample_png(64, hue=7))

    def farm(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(venv_bin / "farm"), *args],
            env=env,
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    where = "import farm, farm.db.migrate as m; print(farm.__file__); " + (
        "print(m.alembic_config('').get_main_option('script_location'))"
    )
    found = run([str(venv_bin / "python"), "-c", where], env=env, cwd=elsewhere)
    module, migrations = found.splitlines()
    assert Path(module) == site / "farm" / "__init__.py"
    assert Path(migrations) == site / "farm" / "migrations"
    try:
        up = farm("up")
        assert up.returncode == 0, up.stdout + up.stderr
        upgrade = farm("db", "upgrade")
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
        assert "database at head" in upgrade.stdout
        args = ["render", "in", "-o", "out", "--size", "64", "--steps", "4", "--seed", "3"]
        render = farm(*args)
        assert render.returncode == 0, render.stdout + render.stderr
        assert (elsewhere / "out" / "x.png").is_file()
    finally:
        down = farm("down")
    assert down.returncode == 0, down.stdout + down.stderr
