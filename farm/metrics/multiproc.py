"""The folder a worker's processes count their metrics in (prometheus-client's multiprocess
mode): a prefork worker's children each write their own files there, and the main process
sums them when scraped.

prometheus-client chooses how it stores values when it is imported, and Celery imports the
task modules (which define the metrics) before any worker signal. So the folder is set as the
worker starts, before the pool forks, and the choice is made again then: it holds for every
value made after it, and every farm metric has labels, so none makes a value before its
first ``labels()`` call, in a stage.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "farm-metrics-"


def prepare() -> Path:
    """A fresh, empty folder for this worker (named after its pid), set in the environment;
    the folders of workers that died without removing theirs are swept first."""
    root = Path(tempfile.gettempdir())
    _sweep(root)
    path = root / f"{PREFIX}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)  # a reused pid's leftovers would add to our counts
    path.mkdir(mode=0o700)
    os.environ[ENV] = str(path)
    if "prometheus_client.values" in sys.modules:
        from prometheus_client import values

        values.ValueClass = values.get_value_class()  # what its import chose, chosen again
    return path


def remove() -> None:
    """Remove this worker's folder (as it shuts down)."""
    path = os.environ.get(ENV)
    if path and Path(path).name == f"{PREFIX}{os.getpid()}":
        shutil.rmtree(path, ignore_errors=True)


def active() -> bool:
    return bool(os.environ.get(ENV))


def _sweep(root: Path) -> None:
    for path in root.glob(f"{PREFIX}*"):
        pid = path.name.removeprefix(PREFIX)
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
