"""Every call of the Python API against the real stack and real workers."""

from __future__ import annotations

import io
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
from PIL import Image

from farm import InvalidImage, InvalidParameter, JobNotFound, UnknownPipeline
from farm.job import NoWorkerWarning
from farm.tasks import faults
from tests.helpers import sample_png, wait_until

FAST = {"size": 64, "steps": 6, "seed": 5, "prompt": "a red barn"}


def make_folder(root: Path, good: int = 2, hue0: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        (root / f"good {i}.png").write_bytes(sample_png(64, hue=hue0 + 30 * i))
    (root / "notes.png").write_text("this is text, not a picture")
    (root / "empty.jpg").write_bytes(b"")
    (root / "readme.txt").write_text("not an image suffix: ignored")
    return root


def job_count(farm) -> int:
    return len(farm.jobs(limit=None))


def test_submit_path_wait_result_and_save(farm, running, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    source.write_bytes(sample_png())
    seen = []
    job = farm.submit(source, **FAST)
    info = job.wait(timeout=120, on_progress=seen.append)
    assert info.status == "done" and info.input_name == "in.png"
    assert seen and all(p.status for p in seen)
    saved = job.save(tmp_path / "out.png")
    assert Image.open(saved).size == (64, 64)
    assert saved.read_bytes() == job.result()
    assert [s.status for s in job.stages()] == ["done"] * 6
    assert farm.get(job.id).status() == "done"


def test_submit_bytes_with_priority(farm, running) -> None:
    job = farm.submit(sample_png(), priority=9, **FAST)
    assert job.wait(timeout=120).priority == 9


@pytest.mark.parametrize(
    ("kwargs", "error", "code"),
    [
        ({"strength": float("nan")}, InvalidParameter, "INVALID_PARAM"),
        ({"steps": 0}, InvalidParameter, "INVALID_PARAM"),
        ({"seed": -1}, InvalidParameter, "INVALID_PARAM"),
        ({"guidance": 1e9}, InvalidParameter, "INVALID_PARAM"),
        ({"priority": 12}, InvalidParameter, "INVALID_PARAM"),
        ({"colour": "blue"}, InvalidParameter, "INVALID_PARAM"),
        ({"pipeline": "os.system"}, UnknownPipeline, "UNKNOWN_PIPELINE"),
    ],
)
def test_bad_parameters_are_rejected_before_anything_is_stored(farm, kwargs, error, code) -> None:
    before = job_count(farm)
    with pytest.raises(error) as raised:
        farm.submit(sample_png(), **kwargs)
    assert raised.value.code == code
    assert job_count(farm) == before


def test_unreadable_and_empty_inputs_are_rejected(farm, tmp_path: Path) -> None:
    with pytest.raises(InvalidImage) as missing:
        farm.submit(tmp_path / "nope.png")
    assert missing.value.code == "INPUT_UNREADABLE"
    with pytest.raises(InvalidImage) as empty:
        farm.submit(b"")
    assert empty.value.code == "INPUT_NOT_IMAGE"


def test_get_unknown_job(farm) -> None:
    with pytest.raises(JobNotFound):
        farm.get("0" * 32)
    with pytest.raises(JobNotFound, match="hexadecimal"):
        farm.get("not-an-id%")


def test_get_takes_an_unambiguous_prefix(farm, running) -> None:
    job = farm.submit(pipeline="txt2img", **FAST)
    assert farm.get(job.id[:8]).id == job.id
    assert farm.get(job.id.upper()).id == job.id
    extra = []
    while max(Counter(j.id[0] for j in farm.jobs(limit=None)).values()) < 2:
        extra.append(farm.submit(pipeline="txt2img", **FAST))  # at most 16 more
    shared, count = Counter(j.id[0] for j in farm.jobs(limit=None)).most_common(1)[0]
    with pytest.raises(JobNotFound, match=f"matches {count} jobs"):
        farm.get(shared)
    for other in extra:
        farm.cancel(other)


def test_on_progress_hears_of_changes_not_of_every_poll(farm, running, tmp_path) -> None:
    heard: list = []
    job = farm.submit(sample_png(hue=77), **FAST)
    job.wait(timeout=120, on_progress=heard.append, poll=0.005)
    assert heard and all(a != b for a, b in pairwise(heard))
    counts: list = []
    batch = farm.submit_folder(make_folder(tmp_path / "in", good=1, hue0=177), **FAST)
    batch.wait(timeout=120, on_progress=counts.append, poll=0.005)
    assert counts and all(a != b for a, b in pairwise(counts))
    assert counts[-1].finished


def test_submit_folder_renders_good_files_and_reports_bad_ones(farm, running, tmp_path) -> None:
    folder = make_folder(tmp_path / "in")
    batch = farm.submit_folder(folder, **FAST)
    counts = batch.wait(timeout=180)
    assert (counts.total, counts.done, counts.failed) == (4, 2, 2)
    failures = {j.input_name: j.error_code for j in batch.failed()}
    assert failures == {"notes.png": "INPUT_NOT_IMAGE", "empty.jpg": "INPUT_NOT_IMAGE"}
    assert {j.batch_id for j in farm.jobs(batch=batch.id)} == {batch.id}

    before = job_count(farm)
    again = farm.submit_folder(folder, **FAST)
    assert sorted(again.skipped) == ["good 0.png", "good 1.png"]
    assert again.wait(timeout=60).total == 4
    assert job_count(farm) == before  # nothing submitted twice


def test_small_inputs_are_packed_per_chunk_and_large_ones_stand_alone(
    farm, running, tmp_path, monkeypatch
) -> None:
    from farm import folder as batching

    folder = tmp_path / "in"
    folder.mkdir()
    small = {f"small {i}.png": sample_png(64, hue=200 + i) for i in range(3)}
    large = {"large.png": sample_png(64, hue=210) + b"\0" * 4096}  # PNG ignores trailing bytes
    for name, data in {**small, **large}.items():
        (folder / name).write_bytes(data)
    monkeypatch.setattr(batching, "PACK_LIMIT", 2048)
    batch = farm.submit_folder(folder, **FAST)
    assert batch.wait(timeout=180).done == 4
    rows = {row.input_name: row for row in job_rows(farm, batch.id)}
    packs = {rows[name].input_key for name in small}
    assert len(packs) == 1 and packs.pop().startswith(f"batches/{batch.id}/")
    store = farm.ctx.store
    for name, data in small.items():  # each job's range holds exactly its file
        row = rows[name]
        assert store.get_range(row.input_key, row.input_offset, row.input_size) == data
    alone = rows["large.png"]
    assert (alone.input_key, alone.input_offset) == (f"jobs/{alone.id}/input", None)
    assert store.get(alone.input_key) == large["large.png"]


def test_gc_removes_only_packs_no_job_points_to(farm, running, tmp_path) -> None:
    from farm.db.job_records import new_id
    from farm.storage import keys
    from farm.tasks.gc import orphaned_packs, sweep

    batch = farm.submit_folder(make_folder(tmp_path / "in", good=2, hue0=220), **FAST)
    # this batch's pack, and packs of earlier runs that jobs adopted into it point to
    kept = {row.input_key for row in job_rows(farm, batch.id) if row.input_key}
    assert any(key.startswith(f"batches/{batch.id}/") for key in kept)
    orphan = keys.input_pack_key(new_id(), 0)  # as if its submitter died before recording
    farm.ctx.store.put(orphan, b"bytes no job points to")
    assert orphan not in orphaned_packs(farm.ctx)  # younger than the grace period
    assert orphan in orphaned_packs(farm.ctx, grace_s=0)
    sweep(farm.ctx, grace_s=0)
    assert not farm.ctx.store.exists(orphan)
    assert all(farm.ctx.store.exists(key) for key in kept)
    assert batch.wait(timeout=180).done == 2


def job_rows(farm, batch_id: str):
    from sqlalchemy import select

    from farm.db.models import Job
    from farm.db.session import session_scope

    with session_scope(farm.ctx.db_url) as s:
        return s.scalars(select(Job).where(Job.batch_id == batch_id)).all()


def test_same_folder_with_other_parameters_is_a_new_render(farm, running, tmp_path) -> None:
    folder = make_folder(tmp_path / "in", good=1, hue0=7)
    farm.submit_folder(folder, **FAST).wait(timeout=120)
    other = farm.submit_folder(folder, **{**FAST, "seed": 6})
    assert other.skipped == []


def test_resume_failed_resumes_only_jobs_whose_input_was_fine(farm, running, meta, tmp_path):
    folder = make_folder(tmp_path / "in", good=1, hue0=99)
    batch = farm.submit_folder(folder, **{**FAST, "steps": 40})
    good = next(j for j in batch.jobs() if j.input_name == "good 0.png")
    faults.arm(meta, good.id, "denoise", "start", "fail")
    assert batch.wait(timeout=120).failed == 3
    resumed = farm.resume_failed(batch.id)
    assert [j.id for j in resumed] == [good.id]
    counts = batch.wait(timeout=120)
    assert (counts.done, counts.failed) == (1, 2)


def test_cancel_a_batch(farm, running, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "in", good=3, hue0=150)
    batch = farm.submit_folder(folder, **{**FAST, "steps": 400, "strength": 1.0})
    # The gpu worker takes one job through its gpu stages at a time: once one is denoising,
    # the other two are still waiting, so all three are cancelled.
    wait_until(
        lambda: any(j.current_stage == "denoise" for j in batch.jobs()),
        120,
        "a job of the batch to reach denoise",
    )
    assert farm.cancel(batch=batch.id) == 3
    counts = batch.wait(timeout=60)
    assert (counts.cancelled, counts.failed) == (3, 2)
    assert farm.jobs(status="cancelled", batch=batch.id)


def test_wait_warns_when_no_worker_consumes_a_needed_queue(farm, workers) -> None:
    for gpu in workers.of("gpu"):
        workers.kill(gpu)
    job = farm.submit(sample_png(), **FAST)
    with pytest.warns(NoWorkerWarning, match="gpu"), pytest.raises(TimeoutError):
        job.wait(timeout=1)
    workers.ensure("gpu")
    assert job.wait(timeout=120).status == "done"


def test_result_of_unfinished_job_is_a_clear_error(farm, workers) -> None:
    job = farm.submit(pipeline="txt2img", **{**FAST, "steps": 400})
    with pytest.raises(Exception, match="NOT_DONE"):
        job.result()
    farm.cancel(job.id)


def test_output_is_a_png(farm, running) -> None:
    job = farm.submit(pipeline="txt2img", **FAST)
    job.wait(timeout=120)
    assert Image.open(io.BytesIO(job.result())).format == "PNG"
