"""Migrations and job records on the real Postgres of the local stack."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from farm.db import job_records, stage_records
from farm.db.migrate import alembic_config, downgrade_base, upgrade_head
from farm.db.models import Base, StageRun
from farm.db.session import get_engine, session_scope
from farm.errors import ArtifactMissing, NotResumable
from farm.local import StackInfo
from farm.pipelines import get_pipeline


@pytest.fixture
def fresh_db(stack: StackInfo) -> str:
    """An empty database of its own, so migrations run on a blank slate."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = get_engine(stack.database_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return stack.database_url.rsplit("/", 1)[0] + f"/{name}"


def table_names(url: str) -> set[str]:
    return set(sa.inspect(get_engine(url)).get_table_names())


def test_upgrade_head_then_downgrade_base(fresh_db: str) -> None:
    upgrade_head(fresh_db)
    assert {"jobs", "stage_runs", "batches", "alembic_version"} <= table_names(fresh_db)
    downgrade_base(fresh_db)
    get_engine(fresh_db).dispose()
    assert table_names(fresh_db) == {"alembic_version"}


def test_models_match_migrations(fresh_db: str) -> None:
    upgrade_head(fresh_db)
    with get_engine(fresh_db).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations differ; run alembic revision --autogenerate: {diff}"


def test_migration_0006_stores_the_dags_of_jobs_recorded_before_it(fresh_db: str) -> None:
    """Jobs recorded by an older farm ran the built-in linear pipelines: their stored DAGs
    are those pipelines', stage by stage, and their finished checkpoints get content types."""
    command.upgrade(alembic_config(fresh_db), "0005")
    old = [("a" * 32, "txt2img", ["noise", "denoise", "decode", "postprocess"])]
    old.append(("b" * 32, "noop", [f"noop{i}" for i in range(1, 7)]))
    with get_engine(fresh_db).begin() as conn:
        for job_id, pipeline, stages in old:
            conn.execute(
                sa.text("INSERT INTO jobs (id, pipeline, params, status, priority) "
                        "VALUES (:id, :p, '{}', 'done', 5)"),
                {"id": job_id, "p": pipeline},
            )  # fmt: skip
            for i, stage in enumerate(stages):
                ext = "png" if stage == "postprocess" else "safetensors.zst"
                conn.execute(
                    sa.text("INSERT INTO stage_runs (job_id, stage, position, queue, status, "
                            "attempts, lost_runs, rebuilds, artifact_key) VALUES (:j, :s, :i, "
                            "'cpu', 'done', 1, 0, 0, :k)"),
                    {"j": job_id, "s": stage, "i": i, "k": f"jobs/{job_id}/{stage}.{ext}"},
                )  # fmt: skip
    upgrade_head(fresh_db)
    with session_scope(fresh_db) as s:
        runs = {(r.job_id[0], r.stage): r for r in s.scalars(sa.select(StageRun))}
    txt = [runs["a", name] for name in old[0][2]]
    assert [r.op for r in txt] == ["noise_txt2img", "denoise", "decode", "postprocess"]
    assert [r.after_stages for r in txt] == [[], ["noise"], ["denoise"], ["decode"]]
    assert txt[-1].content_type == "image/png"
    assert txt[0].content_type == "application/x-farm-tensors+zstd"
    assert {runs["b", f"noop{i}"].op for i in range(1, 7)} == {"noop"}


def test_migration_0007_adds_the_model_call_stats_and_drops_them_again(fresh_db: str) -> None:
    """Stages recorded before it made no batched model calls: theirs are null."""
    command.upgrade(alembic_config(fresh_db), "0006")
    with get_engine(fresh_db).begin() as conn:
        conn.execute(
            sa.text("INSERT INTO jobs (id, pipeline, params, status, priority) "
                    "VALUES (:id, 'noop', '{}', 'done', 5)"),
            {"id": "c" * 32},
        )  # fmt: skip
        conn.execute(
            sa.text("INSERT INTO stage_runs (job_id, stage, position, queue, op, after_stages, "
                    "status, attempts, lost_runs, rebuilds) VALUES (:j, 'noop1', 0, 'cpu', "
                    "'noop', '[]', 'done', 1, 0, 0)"),
            {"j": "c" * 32},
        )  # fmt: skip
    command.upgrade(alembic_config(fresh_db), "0007")
    with session_scope(fresh_db) as s:
        run = s.scalars(sa.select(StageRun)).one()
        assert (run.model_calls, run.jobs_per_call) == (None, None)
    command.downgrade(alembic_config(fresh_db), "0006")
    get_engine(fresh_db).dispose()
    columns = {c["name"] for c in sa.inspect(get_engine(fresh_db)).get_columns("stage_runs")}
    assert "stage_runs" in table_names(fresh_db) and "op" in columns
    assert not {"model_calls", "jobs_per_call"} & columns


def test_constraint_names_follow_the_convention(stack: StackInfo) -> None:
    inspector = sa.inspect(get_engine(stack.database_url))
    uniques = {c["name"] for c in inspector.get_unique_constraints("stage_runs")}
    assert "uq_stage_runs_job_id_stage" in uniques


_recorded: list[str] = []


@pytest.fixture(autouse=True)
def _cancel_recorded_jobs(stack: StackInfo) -> Iterator[None]:
    """These jobs' records are driven by hand and their checkpoints never written: cancelled
    afterwards, so that the session's workers (whose reconciler sends what is queued, and
    rebuilds what is missing) never render them."""
    yield
    with session_scope(stack.database_url) as s:
        for job_id in _recorded:
            job_records.mark_cancelled(s, job_id)
    _recorded.clear()


def new_job(url: str, pipeline: str) -> str:
    """Record a job as submit() does; returns its id."""
    new = job_records.NewJob(pipeline=pipeline, params={}, job_id=job_records.new_id())
    with session_scope(url) as s:
        job_records.insert_jobs(s, get_pipeline(pipeline), [new], failures={})
    _recorded.append(new.job_id)
    return new.job_id


def test_a_stage_cannot_be_recorded_twice(stack: StackInfo) -> None:
    job_id = new_job(stack.database_url, "img2img")
    with pytest.raises(sa.exc.IntegrityError), session_scope(stack.database_url) as s:
        s.add(
            StageRun(
                job_id=job_id, stage="encode", position=9, queue="gpu", op="encode", after_stages=[]
            )
        )


def test_a_queued_stage_whose_input_is_not_done_waits_as_pending(stack: StackInfo) -> None:
    """Another reader found the producer's checkpoint lost and reopened it: a reader whose
    message was out already must not run on the old checkpoint, but wait for the new one."""
    job_id = new_job(stack.database_url, "img2img")
    with session_scope(stack.database_url) as s:
        s.execute(
            sa.update(StageRun)
            .where(StageRun.job_id == job_id, StageRun.stage == "encode")
            .values(status="queued")
        )
    with session_scope(stack.database_url) as s:
        begin = stage_records.begin_stage(s, job_id, "encode", "w1", max_lost=3)
    assert begin.action == stage_records.BeginAction.SKIP
    with session_scope(stack.database_url) as s:
        run = s.scalars(
            sa.select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == "encode")
        ).one()
        assert (run.status, run.attempts) == ("pending", 0)


def test_job_has_one_record_per_stage_from_the_start(stack: StackInfo) -> None:
    job_id = new_job(stack.database_url, "img2img")
    with session_scope(stack.database_url) as s:
        runs = [(run.stage, run.status) for run in job_records.get_job(s, job_id).stage_runs]
    assert runs == [
        ("preprocess", "queued"),
        *[(stage, "pending") for stage in ("encode", "noise", "denoise", "decode", "postprocess")],
    ]


def test_attempt_fences_out_a_replaced_delivery(stack: StackInfo) -> None:
    url = stack.database_url
    job_id = new_job(url, "txt2img")
    with session_scope(url) as s:
        first = stage_records.begin_stage(s, job_id, "noise", "w1", max_lost=3)
    with session_scope(url) as s:  # w1 died; a redelivery takes the stage over
        second = stage_records.begin_stage(s, job_id, "noise", "w2", max_lost=3)
    assert (first.attempt, second.attempt) == (1, 2)
    checkpoint = stage_records.Checkpoint("k", 1, "0" * 64, 0.1)
    with session_scope(url) as s:
        late = stage_records.complete_stage(s, job_id, "noise", 1, checkpoint)
        assert late.outcome == stage_records.Outcome.FENCED_OUT
    with session_scope(url) as s:
        done = stage_records.complete_stage(s, job_id, "noise", 2, checkpoint)
        ready = tuple(spec.name for spec in done.ready)
        assert (done.outcome, ready) == (stage_records.Outcome.ADVANCED, ("denoise",))
    with session_scope(url) as s:
        run = next(r for r in job_records.get_job(s, job_id).stage_runs if r.stage == "noise")
        assert (run.status, run.attempts, run.lost_runs, run.worker) == ("done", 2, 1, "w2")


def test_poison_guard_fails_after_max_lost_deliveries(stack: StackInfo) -> None:
    url = stack.database_url
    job_id = new_job(url, "txt2img")
    actions = []
    for _ in range(4):
        with session_scope(url) as s:
            actions.append(stage_records.begin_stage(s, job_id, "noise", "w", max_lost=2).action)
    assert actions == ["run", "run", "crashed", "crashed"]


def test_a_stage_committed_done_is_never_failed_afterwards(stack: StackInfo) -> None:
    url = stack.database_url
    job_id = new_job(url, "txt2img")
    with session_scope(url) as s:
        begin = stage_records.begin_stage(s, job_id, "noise", "w", max_lost=3)
        checkpoint = stage_records.Checkpoint("k", 1, "0" * 64, 0.1)
        stage_records.complete_stage(s, job_id, "noise", begin.attempt, checkpoint)
    with session_scope(url) as s:  # an error after the commit, in the same delivery
        stage_records.fail_stage(s, job_id, "noise", begin.attempt, "STAGE_FAILED", "late")
    with session_scope(url) as s:
        job = job_records.get_job(s, job_id)
        assert job.status == "running" and job.stage_runs[0].status == "done"


def test_a_cancelled_job_whose_stage_still_runs_is_not_resumed_yet(stack: StackInfo, meta) -> None:
    url = stack.database_url
    job_id = new_job(url, "txt2img")
    with session_scope(url) as s:
        stage_records.begin_stage(s, job_id, "noise", "w", max_lost=3)
        job_records.mark_cancelled(s, job_id)
    with pytest.raises(NotResumable, match="still stopping"), session_scope(url) as s:
        job_records.reopen(s, meta, job_id)


def test_a_stage_records_its_model_calls_until_it_runs_again(stack: StackInfo, farm) -> None:
    url = stack.database_url
    job_id = new_job(url, "txt2img")

    def model_calls() -> dict[str, tuple]:
        return {s.name: (s.model_calls, s.jobs_per_call) for s in farm.get(job_id).stages()}

    shared = stage_records.Checkpoint("k", 1, "0" * 64, 0.1, model_calls=12, jobs_per_call=3.4)
    with session_scope(url) as s:
        noise = stage_records.begin_stage(s, job_id, "noise", "w", max_lost=3)
        stage_records.complete_stage(s, job_id, "noise", noise.attempt, shared)
    assert model_calls()["noise"] == (12, 3.4) and model_calls()["denoise"] == (None, None)

    # denoise finds noise's checkpoint lost: while noise runs again, its record no longer
    # tells of the calls its lost run made; its next commit tells of its own
    lost = ArtifactMissing("noise's checkpoint is gone.")
    with session_scope(url) as s:
        denoise = stage_records.begin_stage(s, job_id, "denoise", "w", max_lost=3)
        stage_records.reopen_producer(s, job_id, "denoise", denoise.attempt, "noise", lost)
    with session_scope(url) as s:
        again = stage_records.begin_stage(s, job_id, "noise", "w", max_lost=3)
    assert model_calls()["noise"] == (None, None)
    rebuilt = stage_records.Checkpoint("k", 1, "0" * 64, 0.1, model_calls=5, jobs_per_call=2.0)
    with session_scope(url) as s:
        stage_records.complete_stage(s, job_id, "noise", again.attempt, rebuilt)
    assert model_calls()["noise"] == (5, 2.0)
