"""Checkpoints and outputs are checked against their records, and what the farm can rebuild it
rebuilds: a swapped, changed or deleted checkpoint re-runs the stage that wrote it (and further
up when its own input is gone too); a done job's lost output is rendered again; only the
submitted input, which the farm cannot rebuild, fails the job (INPUT_MISSING).
Real servers, real workers (issue 17, items 1 and 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.errors import ArtifactCorrupt, ArtifactMissing
from farm.storage import keys
from farm.tasks import faults
from tests.helpers import same_render, sample_png
from tests.test_cli import FAST, run_farm

PARAMS = {"size": 64, "steps": 6, "strength": 0.8, "prompt": "a lighthouse", "seed": 5}
IMG2IMG = ("preprocess", "encode", "noise", "denoise", "decode", "postprocess")

pytestmark = pytest.mark.slow


def render(farm, hue: int):
    job = farm.submit(sample_png(hue=hue), **PARAMS)
    assert job.wait(timeout=240).status == "done"
    return job


def failed_at_postprocess(farm, meta, hue: int):
    """A job whose every stage but the last is done: what resume starts from."""
    job = farm.submit(sample_png(hue=hue), **PARAMS)
    faults.arm(meta, job.id, "postprocess", "start", "fail")
    assert job.wait(timeout=240).status == "failed"
    return job


def stages(job) -> dict:
    return {s.name: s for s in job.stages()}


def checkpoint(job, stage: str) -> str:
    return stages(job)[stage].artifact_key


def assert_ran_once(job, *names: str) -> None:
    runs = stages(job)
    assert {name: runs[name].attempts for name in names} == dict.fromkeys(names, 1)


def test_a_checkpoint_swapped_with_another_jobs_is_rebuilt_not_used(farm, running, meta) -> None:
    expected = render(farm, 200).result()
    other = render(farm, 20)
    job = failed_at_postprocess(farm, meta, 200)
    store = farm.ctx.store
    store.put(checkpoint(job, "decode"), store.get(checkpoint(other, "decode")))

    assert farm.resume(job.id).wait(timeout=240).status == "done"

    assert same_render(job.result(), expected)  # not the other job's picture
    runs = stages(job)
    assert (runs["decode"].attempts, runs["decode"].rebuilds) == (2, 1)
    assert runs["postprocess"].attempts == 3  # failed, found decode changed, ran
    assert_ran_once(job, "preprocess", "encode", "noise", "denoise")


def test_deleted_checkpoints_are_rebuilt_up_the_pipeline(farm, workers, running, meta) -> None:
    expected = render(farm, 210).result()
    job = failed_at_postprocess(farm, meta, 210)
    for stage in ("denoise", "decode"):
        farm.ctx.store.delete(checkpoint(job, stage))
    workers.replace_all("gpu")  # a fresh worker: its memory holds none of the checkpoints

    assert farm.resume(job.id).wait(timeout=240).status == "done"

    assert same_render(job.result(), expected)
    runs = stages(job)
    # decode ran, found denoise's checkpoint gone, waited for it, ran again
    assert {s: (runs[s].attempts, runs[s].rebuilds) for s in ("denoise", "decode")} == {
        "denoise": (2, 1),
        "decode": (3, 1),
    }
    assert_ran_once(job, "preprocess", "encode", "noise")
    wanted = {keys.input_key(job.id)} | {r.artifact_key for r in job.stages()}
    assert set(farm.ctx.store.list(keys.job_prefix(job.id))) == wanted


def test_a_done_jobs_changed_or_deleted_output_is_refused_then_rendered_again(
    farm, running
) -> None:
    job = render(farm, 220)
    expected = job.result()
    output = job.info().output_key
    store = farm.ctx.store

    store.put(output, render(farm, 30).result())
    with pytest.raises(ArtifactCorrupt, match=f"postprocess checkpoint of job {job.id}"):
        job.result()
    store.delete(output)
    with pytest.raises(ArtifactMissing, match=f"farm resume {job.id}"):
        job.result()

    assert farm.resume(job.id).wait(timeout=240).status == "done"

    assert same_render(job.result(), expected)
    runs = stages(job)
    assert (runs["postprocess"].attempts, runs["postprocess"].rebuilds) == (2, 1)
    assert_ran_once(job, *IMG2IMG[:-1])


def test_render_renders_a_lost_output_again_and_writes_every_file(
    farm, farm_env, running, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for hue in (40, 140):
        (photos / f"p{hue}.png").write_bytes(sample_png(64, hue=hue))
    first = run_farm(["render", str(photos), "-o", str(tmp_path / "a"), *FAST], farm_env)
    assert first.returncode == 0, first.stdout + first.stderr
    [lost] = [j for j in farm.jobs(limit=None) if j.input_name == "p40.png" and j.output_key]
    farm.ctx.store.delete(lost.output_key)

    again = run_farm(["render", str(photos), "-o", str(tmp_path / "b"), *FAST], farm_env)

    assert again.returncode == 0, again.stdout + again.stderr
    assert "is gone from the store. Rendering it again." in again.stdout
    for name in ("p40.png", "p140.png"):
        assert same_render(
            (tmp_path / "b" / name).read_bytes(), (tmp_path / "a" / name).read_bytes()
        )
    runs = stages(farm.get(lost.id))
    assert (runs["postprocess"].attempts, runs["postprocess"].rebuilds) == (2, 1)


def test_a_submitted_input_that_is_gone_fails_the_job_saying_so(farm, running, meta) -> None:
    job = farm.submit(sample_png(hue=230), **PARAMS)
    faults.arm(meta, job.id, "preprocess", "start", "fail")
    assert job.wait(timeout=240).status == "failed"
    farm.ctx.store.delete(keys.input_key(job.id))

    info = farm.resume(job.id).wait(timeout=240)

    assert (info.status, info.error_code) == ("failed", "INPUT_MISSING")
    assert "submit the file again" in info.error_message
