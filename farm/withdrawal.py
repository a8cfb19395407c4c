"""A submit that fails leaves nothing behind, or says what it left.

A submit writes to four servers in turn: inputs to the artifact store, jobs to Postgres, their
live state to Redis, their first messages to the broker. ``check_servers`` asks all four
before the first write, so a wrong password or a dead server fails the command with nothing
written. A server that fails between two writes is handled by ``Withdrawal``: a job left
recorded as queued would be rendered by the reconciler, and the user's retry would render it
a second time, so what was written is taken back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from farm.db import job_records
from farm.db.session import check_database, transaction
from farm.errors import FarmError
from farm.tasks.context import Context
from farm.tasks.dispatch import check_broker


def check_servers(ctx: Context) -> None:
    """Postgres, Redis, the broker and the artifact store each answer and take our
    credentials; the first that does not raises its error."""
    check_database(ctx.db_url)
    ctx.meta.ping()
    check_broker()
    ctx.store.check()


@dataclass
class Withdrawal:
    """What one submit has written so far, to take back should a later write fail."""

    ctx: Context
    keys: list[str] = field(default_factory=list)  # uploaded, or being uploaded
    job_ids: list[str] = field(default_factory=list)  # recorded (committed)

    def take_back(self) -> str | None:
        """Remove the recorded jobs, then their uploads. Returns None when nothing is left,
        else a sentence saying what is and what to do about it."""
        if self.job_ids:
            try:
                with transaction(self.ctx.db_url) as conn:
                    job_records.delete_jobs(conn, self.job_ids)
            except FarmError as exc:  # their inputs stay too: the jobs still need them
                return _jobs_left(self.job_ids, exc)
            with contextlib.suppress(FarmError):  # live state is rebuilt from Postgres anyway
                self.ctx.meta.forget_jobs(self.job_ids)
        try:
            for key in self.keys:
                self.ctx.store.delete(key)
        except FarmError as exc:
            return f"its uploaded inputs could not be removed ({exc.code}): `farm gc` removes them"
        return None


def tell(exc: BaseException, left: str) -> None:
    """Add to a farm error what the failed command left behind."""
    if isinstance(exc, FarmError):
        exc.add_detail(left)


def _jobs_left(job_ids: list[str], exc: FarmError) -> str:
    which = f"job {job_ids[0]}" if len(job_ids) == 1 else f"{len(job_ids)} jobs ({job_ids[0]}...)"
    return (
        f"{which} could not be withdrawn ({exc.code}): recorded as queued, the farm renders them "
        "once it can send them; `farm cancel JOB` stops one"
    )
