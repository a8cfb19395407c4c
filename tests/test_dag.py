"""Pipelines as DAGs, on the real stack with real workers: branches in parallel on two
workers, the join decided once under the job's lock, a failed branch stopping its sibling,
cancel, resume and a killed branch worker, each re-running only what is not done.

The built-in ``fanout`` pipeline (split -> N branches -> join, no model) runs its branches on
a queue of their own here, ``dag``, served by two workers started for each test (gpu role:
one thread, one message at a time), so two branches sent at once run on two workers and no
other test's leftover work can hold one of them up.
"""

from __future__ import annotations

import json

import pytest

from farm.db.job_records import get_job
from farm.db.session import session_scope
from farm.errors import InvalidParameter, PipelineInvalid
from farm.job import NoWorkerWarning
from farm.local.workers import start_worker, wait_ready
from farm.pipelines import Pipeline, StageSpec, get_pipeline, stage
from farm.tasks import faults
from tests.helpers import ExtraWorkers, wait_until

# Ten seconds of "work" per branch, reporting every 50 ms: long enough to act on a running
# branch, and a stopped branch is seen stopping long before its end.
LONG = {"steps": 200, "step_seconds": 0.05, "queue": "dag"}


@pytest.fixture
def two_workers(running):
    """Two workers of the dag queue (and the session's cpu worker, for split and join)."""
    dag = ExtraWorkers(running, "gpu", ("dag",))
    dag.start(2)
    yield dag
    dag.stop_all()


def records(farm, job_id: str) -> dict:
    with session_scope(farm.ctx.db_url) as s:
        return {run.stage: run for run in get_job(s, job_id).stage_runs}


def wait_running(job, *stages: str, timeout: float = 60) -> None:
    def all_running() -> bool:
        status = {s.name: s.status for s in job.stages()}
        return all(status[name] == "running" for name in stages)

    wait_until(all_running, timeout, f"{', '.join(stages)} of {job.id} running")


def test_branches_run_at_once_on_two_workers_and_the_join_once(farm, two_workers) -> None:
    job = farm.submit(pipeline="fanout", branches=2, steps=20, step_seconds=0.1, queue="dag")
    assert job.wait(timeout=120).status == "done"
    runs = records(farm, job.id)
    b0, b1 = runs["branch-0"], runs["branch-1"]
    assert b0.started_at < b1.finished_at and b1.started_at < b0.finished_at  # overlapping
    assert b0.worker != b1.worker
    assert runs["join"].attempts == 1 and runs["join"].after_stages == ["branch-0", "branch-1"]
    result = json.loads(job.result())
    assert sorted(result["branches"]) == ["branch-0", "branch-1"]


def test_fifty_joins_race_and_each_is_sent_and_run_once(farm, two_workers) -> None:
    """Branches of equal length on two workers finish together, so the last two inputs of a
    join often commit at the same instant: the job's row lock lets exactly one send it."""
    jobs = [farm.submit(pipeline="fanout", branches=2, queue="dag", seed=i) for i in range(50)]
    for job in jobs:
        assert job.wait(timeout=300).status == "done"
    for job in jobs:
        runs = records(farm, job.id)
        assert [r.attempts for r in runs.values()] == [1, 1, 1, 1], runs
        assert runs["join"].lost_runs == 0
        assert len(json.loads(job.result())["branches"]) == 2


def test_a_failed_branch_fails_the_job_and_stops_its_sibling(farm, two_workers, meta):
    job = farm.submit(pipeline="fanout", branches=2, **LONG)
    wait_running(job, "branch-0", "branch-1")
    faults.arm(meta, job.id, "branch-0", "step", "fail")
    info = job.wait(timeout=60)
    assert (info.status, info.error_code) == ("failed", "STAGE_FAILED")
    assert "branch-0" in info.error_message
    wait_until(lambda: _status(job, "branch-1") == "cancelled", 30, "the sibling to stop")
    sibling = records(farm, job.id)["branch-1"]
    assert (sibling.finished_at - sibling.started_at).total_seconds() < 8  # well before its end
    assert job.info().status == "failed"  # the sibling's stop did not turn it into cancelled

    farm.resume(job.id)
    assert job.wait(timeout=120).status == "done"
    runs = records(farm, job.id)
    assert runs["split"].attempts == 1  # done before the failure: not run again
    assert (runs["branch-0"].attempts, runs["branch-1"].attempts, runs["join"].attempts) == (
        2,
        2,
        1,
    )


def test_cancel_stops_every_running_branch(farm, two_workers) -> None:
    job = farm.submit(pipeline="fanout", branches=2, **LONG)
    wait_running(job, "branch-0", "branch-1")
    assert farm.cancel(job.id) == 1
    both = ("branch-0", "branch-1")
    wait_until(lambda: all(_status(job, b) == "cancelled" for b in both), 30, "branches to stop")
    assert _status(job, "join") == "cancelled" and job.info().status == "cancelled"


def test_a_killed_branch_worker_reruns_only_its_branch(farm, two_workers) -> None:
    job = farm.submit(pipeline="fanout", branches=2, **LONG)
    wait_running(job, "branch-0", "branch-1")
    two_workers.kill(two_workers.named(records(farm, job.id)["branch-0"].worker))
    two_workers.start()  # the other one is busy with branch-1 for seconds yet
    assert job.wait(timeout=180).status == "done"
    runs = records(farm, job.id)
    assert (runs["branch-0"].attempts, runs["branch-0"].lost_runs) == (2, 1)
    assert [runs[name].attempts for name in ("split", "branch-1", "join")] == [1, 1, 1]


def test_a_queue_a_pipeline_names_is_served_by_a_worker_given_it(farm, running) -> None:
    """Any queue name: the job waits, warning that no worker consumes it, until a worker
    started with ``-Q audio`` (``farm worker --queues audio``) runs its branches."""
    job = farm.submit(pipeline="fanout", branches=2, queue="audio")
    with pytest.warns(NoWorkerWarning, match="audio"), pytest.raises(TimeoutError):
        job.wait(timeout=1)
    audio = start_worker("cpu", running.env, running.log_dir, queues=["audio"])
    running.running.append(audio)
    try:
        wait_ready(running.meta, [audio])
        assert job.wait(timeout=120).status == "done"
        branches = [s for s in job.stages() if s.name.startswith("branch-")]
        assert {(s.queue, s.worker) for s in branches} == {("audio", audio.name)}
    finally:
        running.running.remove(audio)
        audio.stop()
        running.meta.forget_worker(audio.name)


def _status(job, name: str) -> str:
    return next(s.status for s in job.stages() if s.name == name)


# -- what a pipeline may declare ---------------------------------------------------------------


@stage(writes="json", reads=("input", "json"))
def _step(artifact, params, model, hooks):
    return {}


def _pipeline(*dag: StageSpec) -> Pipeline:
    return Pipeline("t", tuple(dag), {"_step": _step})


@pytest.mark.parametrize(
    ("dag", "says"),
    [
        ([StageSpec("a", "cpu", "_step", ("b",)), StageSpec("b", "cpu", "_step")], "comes after b"),
        ([StageSpec("a", "cpu", "_step"), StageSpec("a", "cpu", "_step", ("a",))], "two stages"),
        (
            [
                StageSpec("a", "cpu", "_step"),
                StageSpec("b", "cpu", "_step", ("a",)),
                StageSpec("c", "cpu", "_step", ("a",)),
            ],
            "b, c are all final",
        ),
        ([StageSpec("a", "cpu", "nope")], "no stage function 'nope'"),
        ([StageSpec("../a", "cpu", "_step")], "not allowed"),
        ([StageSpec("a", "CPU Q", "_step")], "not allowed"),
        ([StageSpec("a", "q" * 33, "_step")], "queue name 'qqq"),  # stage_runs.queue holds 32
    ],
)
def test_a_wrong_dag_is_refused_saying_why(dag, says) -> None:
    with pytest.raises(PipelineInvalid, match=says):
        _pipeline(*dag)


@pytest.mark.parametrize("queue", ["q" * 33, "Audio", "a b", "../cpu", ""])
def test_fanout_refuses_a_queue_no_worker_could_be_named_after(queue) -> None:
    with pytest.raises(InvalidParameter, match="queue must be a-z"):
        get_pipeline("fanout").params.validate({"queue": queue})


def test_a_stage_reading_several_must_be_a_join() -> None:
    dag = [StageSpec("a", "cpu", "_step"), StageSpec("b", "cpu", "_step", ("a",))]
    dag.append(StageSpec("c", "cpu", "_step", ("a", "b")))
    with pytest.raises(PipelineInvalid, match="not declared join=True"):
        _pipeline(*dag)


def test_an_expand_that_crashes_is_a_pipeline_error_not_a_traceback() -> None:
    def expand(params, data):
        return [StageSpec("a", "cpu", "_step")] if data else {}["missing"]

    pipeline = Pipeline("t", (StageSpec("a", "cpu", "_step"),), {"_step": _step}, expand=expand)
    with pytest.raises(PipelineInvalid, match="building its stages failed: KeyError"):
        pipeline.dag(None, None)
    wrong = Pipeline("t", (StageSpec("a", "cpu", "_step"),), {"_step": _step},
                     expand=lambda p, d: [StageSpec("a", 7, "_step")])  # fmt: skip
    with pytest.raises(PipelineInvalid, match="not a StageSpec of names"):
        wrong.dag(None, b"x")


def test_a_stage_fed_a_kind_it_does_not_read_is_refused() -> None:
    png = stage(writes="png", reads=("input",))(lambda *a: b"")
    reads_tensors = stage(writes="png")(lambda *a: b"")
    ops = {"png": png, "t": reads_tensors}
    dag = (StageSpec("a", "cpu", "png"), StageSpec("b", "cpu", "t", ("a",)))
    with pytest.raises(PipelineInvalid, match="reads tensors, but is given png"):
        Pipeline("t", dag, ops)


def test_a_stage_needing_a_model_its_pipeline_cannot_load_is_refused() -> None:
    needy = stage(writes="json", reads=("input",), model="weights")(lambda *a: {})
    with pytest.raises(PipelineInvalid, match="no loader"):
        Pipeline("t", (StageSpec("a", "cpu", "needy"),), {"needy": needy})
