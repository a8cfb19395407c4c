"""Resume and cancel semantics, and submitters racing on one idempotency key, on the real stack."""

from __future__ import annotations

import threading

import pytest

from farm import NotResumable
from farm.tasks import faults
from tests.helpers import sample_png, wait_for_step

FAST = {"size": 64, "steps": 6, "seed": 8, "prompt": "a harbour at dawn"}
SLOW = {**FAST, "steps": 60, "strength": 1.0}


def test_resume_refuses_a_running_job_and_leaves_its_stage_running(farm, running) -> None:
    job = farm.submit(sample_png(hue=120), **SLOW)
    wait_for_step(job, "denoise", 2, timeout=120)
    with pytest.raises(NotResumable, match="running"):
        farm.resume(job.id)
    info = job.wait(timeout=240)
    assert info.status == "done"
    assert all(s.attempts == 1 for s in job.stages())  # the running delivery was not replaced


def test_resume_refuses_a_done_job(farm, running) -> None:
    job = farm.submit(sample_png(hue=121), **FAST)
    assert job.wait(timeout=120).status == "done"
    with pytest.raises(NotResumable, match="nothing to resume"):
        farm.resume(job.id)


def test_resume_failed_leaves_cancelled_jobs_unless_asked(farm, running, meta, tmp_path) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    for hue in (122, 123):
        (folder / f"{hue}.png").write_bytes(sample_png(hue=hue))
    batch = farm.submit_folder(folder, **SLOW)
    failed, cancelled = (farm.get(j.id) for j in sorted(batch.jobs(), key=lambda j: j.input_name))
    faults.arm(meta, failed.id, "postprocess", "start", "fail")
    wait_for_step(cancelled, "denoise", 1, timeout=120)
    farm.cancel(cancelled.id)
    assert failed.wait(timeout=240).status == "failed"
    assert cancelled.wait(timeout=60).status == "cancelled"
    assert [j.id for j in farm.resume_failed(batch.id)] == [failed.id]
    assert failed.wait(timeout=120).status == "done"
    assert cancelled.status() == "cancelled"
    assert [j.id for j in farm.resume_failed(batch.id, cancelled=True)] == [cancelled.id]
    assert cancelled.wait(timeout=240).status == "done"


def race(count: int, call) -> tuple[list, list[Exception]]:
    """Run ``call`` in ``count`` threads released at the same instant: results and errors."""
    barrier, results, errors = threading.Barrier(count), [], []

    def one() -> None:
        barrier.wait()
        try:
            results.append(call())
        except Exception as exc:  # a traceback here is what the racing tests are about
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


def test_two_submitters_racing_on_one_key_get_the_same_job(farm, running) -> None:
    key, image = "race-" + sample_png(hue=124).hex()[-16:], sample_png(hue=124)
    jobs, errors = race(4, lambda: farm.submit(image, idempotency_key=key, **FAST).id)
    assert errors == [] and len(set(jobs)) == 1
    assert farm.get(jobs[0]).wait(timeout=120).status == "done"
    inputs = [k for k in farm.ctx.store.list("jobs/") if k.endswith("/input")]
    recorded = {j.id for j in farm.jobs(limit=None)}
    assert all(k.split("/")[1] in recorded for k in inputs)  # the losers' uploads are gone


def test_two_submitters_of_one_folder_at_once_both_finish(farm, running, tmp_path) -> None:
    folder = tmp_path / "raced"
    folder.mkdir()
    for hue in range(130, 136):
        (folder / f"{hue}.png").write_bytes(sample_png(32, hue=hue))
    batches, errors = race(2, lambda: farm.submit_folder(folder, size=32, steps=2, strength=1.0))
    assert errors == [] and len(batches) == 2
    jobs = {j.id for batch in batches for j in batch.jobs()}
    assert len(jobs) == 6  # one job per input, whichever submitter recorded it
    for job_id in jobs:
        assert farm.get(job_id).wait(timeout=120).status == "done"
