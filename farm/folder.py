"""Submitting a folder as one batch.

Files are read and uploaded in chunks (a thread pool for the object store, one database
transaction per chunk) so memory stays flat however large the folder is. Each input's
idempotency key is its content hash + pipeline + parameters + model: a second run of the same
folder skips what is done, resumes what failed for a reason other than its input, and
creates no duplicate job. A job belongs to every batch that submitted its input, so two renders
of one folder, at once or one after the other, share its jobs and each follows all of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from sqlalchemy import select

from farm.batch import Batch
from farm.db import job_records
from farm.db.models import JobStatus
from farm.db.rows import Conn, jobs, lock_job
from farm.db.session import session_scope, transaction
from farm.errors import FarmError, InputError, InvalidParameter, NotResumable, is_input_error
from farm.inputs import FolderListing, InputFile, read_input, scan_folder
from farm.pipelines import Pipeline, StageSpec, get_pipeline, ready
from farm.storage import keys
from farm.tasks.dispatch import send_many
from farm.withdrawal import Withdrawal, tell

if TYPE_CHECKING:
    from farm.api import Farm

CHUNK = 64
UPLOAD_THREADS = 8
# A cancelled job's running stage stops at its next step (a denoise step, or the end of a
# shorter stage): how long a render of its folder waits to adopt it again.
STOPPING_WAIT_S = 60.0
STOPPING_POLL_S = 0.2
# Inputs up to this size are packed, one object per chunk (at most CHUNK x this = 16 MiB):
# per-object overhead, not bytes, is what a folder of small images costs the object store.
PACK_LIMIT = 256 * 1024


class Placement(NamedTuple):
    """Where an input's bytes went: its own object, or a byte range of a packed one."""

    key: str | None
    offset: int | None = None
    size: int | None = None


@dataclass
class FolderSubmission:
    """Submits one folder's files, chunk by chunk."""

    farm: Farm
    pipeline: Pipeline
    params: dict  # canonical, as the pipeline's schema validated them
    priority: int
    batch_id: str = ""
    base: Path = Path()
    skipped: list[str] = field(default_factory=list)
    _stopping: list[str] = field(default_factory=list, init=False, repr=False)
    _packs: Iterator[int] = field(default_factory=itertools.count, init=False, repr=False)

    def run(self, folder: str | Path, recursive: bool) -> Batch:
        self.base = base = Path(folder).expanduser().resolve()
        files = scan_folder(base, recursive)
        self.farm.check_servers()  # before anything is written, so a failure leaves nothing
        with session_scope(self.farm.ctx.db_url) as s:
            settings = {**self.params, "pipeline": self.pipeline.name}
            self.batch_id = job_records.create_batch(s, str(base), settings).id
        try:
            self._submit_files(base, files)
        except Exception as exc:
            tell(exc, self._left_behind())
            raise
        self._adopt_stopped()
        return Batch(self.farm.ctx, self.batch_id, self.skipped)

    def _submit_files(self, base: Path, files: FolderListing) -> None:
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            for chunk in _chunks(files, CHUNK):
                read = list(pool.map(lambda f: read_input(f, base), chunk))
                self._submit_chunk(read, pool)

    def _left_behind(self) -> str:
        """After a failed chunk was taken back: what the batch keeps of earlier chunks (their
        jobs render), or nothing at all."""
        try:
            with transaction(self.farm.ctx.db_url) as conn:
                kept = job_records.drop_batch_if_empty(conn, self.batch_id)
        except FarmError as exc:
            return (
                f"batch {self.batch_id} may keep jobs submitted before this ({exc.code}); "
                "re-run the same command once the farm is back: it submits only the rest"
            )
        if not kept:
            return "nothing was submitted"
        return (
            f"batch {self.batch_id} keeps {kept} jobs recorded before the failure, which render; "
            "re-run the same command to submit the rest, or `farm cancel --batch "
            f"{self.batch_id}` to stop them"
        )

    def _submit_chunk(self, files: list[InputFile], pool: ThreadPoolExecutor) -> None:
        written = Withdrawal(self.farm.ctx)
        try:
            self._try_chunk(files, pool, written)
        except Exception as exc:
            left = written.take_back()
            if left:
                tell(exc, left)
            raise

    def _try_chunk(
        self, files: list[InputFile], pool: ThreadPoolExecutor, written: Withdrawal
    ) -> None:
        by_key: dict[str, InputFile] = {}
        skipped = []
        for file in files:
            first = by_key.setdefault(self._key(file), file)
            if first is not file:  # same bytes, same parameters: the same render
                skipped.append(f"{file.name} (same content as {first.name})")
        existing = self._existing(list(by_key))
        new = {key: f for key, f in by_key.items() if key not in existing}
        ids = {key: job_records.new_id() for key in new}
        readable = {ids[k]: f for k, f in new.items() if f.data is not None}
        placed = self._upload_inputs(readable, pool, written)
        nowhere = Placement(None)  # an input refused at submit was not uploaded
        failures = {ids[k]: f.error for k, f in new.items() if f.error is not None}
        dags = self._dags({ids[k]: f for k, f in new.items()}, failures)
        jobs = [
            self._new_job(ids[k], k, f, placed.get(ids[k], nowhere), dags.get(ids[k]))
            for k, f in new.items()
        ]
        with transaction(self.farm.ctx.db_url) as conn:
            inserted = job_records.insert_jobs(conn, self.pipeline, jobs, failures)
            # Another submitter recorded these inputs since the lookup: its jobs are adopted.
            existing |= self._existing([k for k in new if ids[k] not in inserted], conn)
            members = {existing.get(key) or ids[key]: f for key, f in by_key.items()}
            job_records.join_batch(conn, self.batch_id, self._paths(members))
            to_send = [(i, ready(dags[i], ())) for i in sorted(inserted - failures.keys())]
            # jobs locked in one order, so two submitters of one folder never deadlock
            adopted = (self._adopt(conn, job_id) for job_id in sorted(existing.values()))
            to_send += filter(None, adopted)
        written.job_ids += sorted(inserted)
        self.skipped += skipped
        self._drop_unrecorded(placed, inserted)
        self._announce(to_send)

    def _adopt_stopped(self) -> None:
        """Adopt again the cancelled jobs whose stage was still stopping (it stops at its next
        step): left cancelled, they would end this render as cancelled, not rendered."""
        deadline = time.monotonic() + STOPPING_WAIT_S
        while self._stopping and time.monotonic() < deadline:
            time.sleep(STOPPING_POLL_S)
            stopping, self._stopping = sorted(self._stopping), []
            with transaction(self.farm.ctx.db_url) as conn:
                to_send = list(filter(None, (self._adopt(conn, job_id) for job_id in stopping)))
            self._announce(to_send)

    def _announce(self, to_send: list[tuple[str, list[StageSpec]]]) -> None:
        meta = self.farm.ctx.meta
        meta.set_states(
            {
                job_id: {"status": "queued", "stage": stages[0].name, "step": 0}
                for job_id, stages in to_send
            }
        )
        send_many(to_send, self.priority)

    def _dags(
        self, files: dict[str, InputFile], failures: dict[str, FarmError]
    ) -> dict[str, tuple[StageSpec, ...]]:
        """Each readable input's DAG, built by the pipeline from the parameters and the input
        (``failures`` gains the inputs it refuses)."""
        bound, dags = self.pipeline.params.bind(self.params), {}
        for job_id, file in files.items():
            if job_id in failures:
                continue
            try:
                dags[job_id] = self.pipeline.dag(bound, file.data)
            except InputError as exc:
                failures[job_id] = exc
        return dags

    @cached_property
    def _render_digest(self) -> str:
        """Everything but the input that makes two renders the same."""
        digest = self.pipeline.params.digest(self.params)
        return f"{self.pipeline.name}|{digest}|{self.farm.model_id}"

    def _key(self, file: InputFile) -> str:
        """Same input bytes + same parameters + same model = the same render."""
        text = f"{file.content_hash}|{self._render_digest}"
        return hashlib.sha256(text.encode()).hexdigest()

    def _existing(self, idem_keys: list[str], conn: Conn | None = None) -> dict[str, str]:
        """Idempotency key -> job id of the keys already recorded (in ``conn``'s transaction
        when given)."""
        if not idem_keys:
            return {}
        query = select(jobs.c.idempotency_key, jobs.c.id).where(
            jobs.c.idempotency_key.in_(idem_keys)
        )
        if conn is not None:
            return dict(conn.execute(query).all())
        with transaction(self.farm.ctx.db_url) as own:
            return dict(own.execute(query).all())

    def _paths(self, members: dict[str, InputFile]) -> dict[str, bytes]:
        """Job id -> its input's path in the folder, as the file system's bytes."""
        return {job_id: os.fsencode(f.path.relative_to(self.base)) for job_id, f in members.items()}

    def _drop_unrecorded(self, placed: dict[str, Placement], inserted: set[str]) -> None:
        """Delete what was uploaded for inputs another submitter recorded first: no job of
        ours points to it (gc would find it too, an hour later)."""
        kept = {p.key for job_id, p in placed.items() if job_id in inserted}
        for key in {p.key for p in placed.values()} - kept:
            with contextlib.suppress(FarmError):
                self.farm.ctx.store.delete(key)

    def _upload_inputs(
        self, files: dict[str, InputFile], pool: ThreadPoolExecutor, written: Withdrawal
    ) -> dict[str, Placement]:
        """Upload a chunk's inputs (job id -> file): the small ones packed into one object,
        each larger one on its own. Returns where each job's bytes are."""
        small = {job_id: f for job_id, f in files.items() if len(f.data) <= PACK_LIMIT}
        placed = {job_id: Placement(keys.input_key(job_id)) for job_id in files.keys() - small}
        uploads = [(placed[job_id].key, files[job_id].data) for job_id in placed]
        if small:
            pack_key = keys.input_pack_key(self.batch_id, next(self._packs))
            offset = 0
            for job_id, file in small.items():
                placed[job_id] = Placement(pack_key, offset, len(file.data))
                offset += len(file.data)
            uploads.append((pack_key, b"".join(file.data for file in small.values())))
        written.keys += [key for key, _ in uploads]
        list(pool.map(lambda upload: self.farm.ctx.store.put(*upload), uploads))
        return placed

    def _new_job(
        self,
        job_id: str,
        key: str,
        file: InputFile,
        placement: Placement,
        stages: tuple[StageSpec, ...] | None,
    ) -> job_records.NewJob:
        return job_records.NewJob(
            pipeline=self.pipeline.name,
            params=self.params,
            stages=stages,
            priority=self.priority,
            batch_id=self.batch_id,
            input_name=file.name,
            input_key=placement.key,
            input_offset=placement.offset,
            input_size=placement.size,
            idempotency_key=key,
            job_id=job_id,
        )

    def _adopt(self, conn: Conn, job_id: str) -> tuple[str, list[StageSpec]] | None:
        """An input an earlier run already submitted (it joined this batch too): resume it if
        it failed (or was cancelled) for a reason other than its input; otherwise leave it
        be."""
        status, error_code, name = lock_job(
            conn, job_id, jobs.c.status, jobs.c.error_code, jobs.c.input_name
        )
        if status == JobStatus.DONE:
            self.skipped.append(name or job_id)
            return None
        if status in (JobStatus.FAILED, JobStatus.CANCELLED) and not is_input_error(error_code):
            try:
                _, reopened = job_records.reopen(conn, self.farm.ctx.meta, job_id)
            except NotResumable:  # cancelled, its stage still stopping: adopted once it stopped
                self._stopping.append(job_id)
                return None
            return (job_id, reopened) if reopened else None
        return None


def submit_folder(
    farm: Farm, folder: str | Path, recursive: bool, pipeline: str, priority: int, params: dict
) -> Batch:
    spec = get_pipeline(pipeline)
    if not spec.needs_input:
        raise InvalidParameter(f"Pipeline {spec.name!r} takes no input images.")
    canonical = spec.params.validate(params)
    return FolderSubmission(farm, spec, canonical, priority).run(folder, recursive)


def _chunks(items: Sequence, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
