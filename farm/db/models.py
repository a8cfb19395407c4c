"""SQLAlchemy models: the source of truth for jobs and their stages.

One ``jobs`` row per job, one ``stage_runs`` row per (job, stage) — created with the job, so a
job's stage table is complete from the start and a stage can never be recorded twice. The
stage rows are also the job's DAG (``op``, ``after_stages``), built once at submit. A job
belongs to every batch that submitted its input (``batch_jobs``): two renders of one folder
share its jobs, and each still sees all of them.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names, so migrations can refer to them (alembic naming.rst).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JsonDict = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobStatus(StrEnum):
    """Where a job is in its lifecycle; the last three are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})


class StageStatus(StrEnum):
    """Where one stage of one job is; only ``done`` stages are skipped on redelivery."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


def _now() -> Any:
    return func.now()


class Batch(Base):
    """A folder (or any group of jobs) submitted together."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    source: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict] = mapped_column(JsonDict, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())

    jobs: Mapped[list[Job]] = relationship(back_populates="batch")


class BatchJob(Base):
    """A job as one batch submitted it: a job joins every batch whose folder holds its input."""

    __tablename__ = "batch_jobs"

    batch_id: Mapped[str] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    job_id: Mapped[str] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    # The input's path in the submitted folder, exactly as the file system spells it: bytes,
    # because a name need not be UTF-8 (``jobs.input_name`` holds U+FFFD there), and the
    # output is named after it.
    input_path: Mapped[bytes] = mapped_column(LargeBinary)


class Job(Base):
    """One image rendered through one pipeline."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict] = mapped_column(JsonDict)
    status: Mapped[str] = mapped_column(String(16), index=True, default=JobStatus.QUEUED)
    current_stage: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer, default=5)
    # The batch that first submitted it; batch_jobs lists every batch it belongs to.
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"), index=True)
    input_name: Mapped[str | None] = mapped_column(Text)  # the user's file name: metadata only
    input_key: Mapped[str | None] = mapped_column(Text)
    # Set when the input shares a packed object with others (folder submits): its byte range.
    input_offset: Mapped[int | None] = mapped_column(Integer)
    input_size: Mapped[int | None] = mapped_column(Integer)
    output_key: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    batch: Mapped[Batch | None] = relationship(back_populates="jobs")
    stage_runs: Mapped[list[StageRun]] = relationship(
        back_populates="job", order_by="StageRun.position", cascade="all, delete-orphan"
    )


class StageRun(Base):
    """One stage of one job: its attempts, where it ran, and the checkpoint it wrote."""

    __tablename__ = "stage_runs"
    __table_args__ = (UniqueConstraint("job_id", "stage"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(32))
    # The job's DAG, stored when it is submitted (a pipeline may build it from the job's
    # parameters): the stage function it runs and the stages whose artifacts it reads.
    op: Mapped[str] = mapped_column(String(64))
    after_stages: Mapped[list[str]] = mapped_column(JsonDict)
    status: Mapped[str] = mapped_column(String(16), default=StageStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Deliveries that started and never finished (worker killed): the poison-message guard.
    lost_runs: Mapped[int] = mapped_column(Integer, default=0)
    # Times the stage, once done, was run again because a later stage found its checkpoint
    # gone or changed (farm.tasks.runner): a bound on rebuilding from a store that keeps losing.
    rebuilds: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    # When its message was last sent: the reconciler re-sends a queued stage whose message
    # the broker no longer holds (Redis lost it) once this is older than a grace period.
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_s: Mapped[float | None] = mapped_column(Float)
    artifact_key: Mapped[str | None] = mapped_column(Text)
    artifact_size: Mapped[int | None] = mapped_column(Integer)
    checksum: Mapped[str | None] = mapped_column(String(64))
    content_type: Mapped[str | None] = mapped_column(String(128))  # farm.storage.kinds
    # How the last successful attempt shared the GPU: the batched model calls it took part in
    # and the mean number of jobs per call. None: it made none (a cpu stage, no engine).
    model_calls: Mapped[int | None] = mapped_column(Integer)
    jobs_per_call: Mapped[float | None] = mapped_column(Float)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="stage_runs")
