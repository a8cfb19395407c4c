"""The bad-input catalog as a user meets it: one folder mixing every bad case with good images,
rendered once through the real farm (real servers, real workers).

Each bad file must end up in ``batch.failed()`` under its own name with a stable code, found
where it should be (before upload, or by the preprocess stage in a worker) and explained in one
human sentence; the good files, whatever their names, render. The folder is rendered once per
module; each case is then a small test on the recorded result.
"""

from __future__ import annotations

import io
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from farm import InvalidParameter, UnknownPipeline
from farm.batch import Batch, BatchCounts
from farm.db import job_records
from farm.db.session import session_scope
from farm.inputs import MAX_INPUT_BYTES
from farm.job import JobInfo
from tests.helpers import sample_png
from tests.test_bad_inputs import assert_one_human_sentence, bomb_png, encode, noise_image

FAST = {"size": 64, "steps": 4, "seed": 11, "prompt": "a lighthouse, bad-inputs folder"}

NFC = unicodedata.normalize("NFC", "café.png")
NFD = unicodedata.normalize("NFD", "café.png")
EMOJI = "🐱 sunset  photo (1).png"
GOOD = (NFC, NFD, EMOJI)
NOT_UTF8 = "caf\ufffd latin-1.png"  # on disk: b"caf\xe9 latin-1.png"

SUBMIT, WORKER = "submit", "worker"
# name -> (code, where it is found)
BAD: dict[str, tuple[str, str]] = {
    "empty.png": ("INPUT_NOT_IMAGE", SUBMIT),
    "huge.png": ("INPUT_TOO_LARGE", SUBMIT),  # 50 MB + 1 byte
    "passwd.png": ("INPUT_OUTSIDE", SUBMIT),  # -> /etc/passwd
    "outside.png": ("INPUT_OUTSIDE", SUBMIT),  # -> ../secret.png, a real image
    "loop.png": ("INPUT_UNREADABLE", SUBMIT),  # -> itself
    "to-pipe.png": ("INPUT_UNREADABLE", SUBMIT),  # -> a FIFO in the folder
    "letter.png": ("INPUT_NOT_IMAGE", WORKER),  # text renamed .png
    "icon.png": ("INPUT_NOT_IMAGE", WORKER),  # a real ICO: outside the format allowlist
    "half.png": ("INPUT_CORRUPT", WORKER),
    "half.jpg": ("INPUT_CORRUPT", WORKER),
    "bomb.png": ("INPUT_TOO_LARGE", WORKER),  # 14000x14000, ~1 MB on disk
    "dot.png": ("INPUT_TOO_SMALL", WORKER),  # 1x1
    "sliver.png": ("INPUT_TOO_SMALL", WORKER),  # 4000x2
    "banner.png": ("INPUT_BAD_ASPECT", WORKER),  # 50000x10
    "float.tif": ("INPUT_UNSUPPORTED", WORKER),  # 32-bit floating-point pixels
    "new\nline.png": ("INPUT_NOT_IMAGE", WORKER),  # text, with a newline in its name
    NOT_UTF8: ("INPUT_NOT_IMAGE", WORKER),  # text, with a name that is not UTF-8
}
IGNORED = ("album.png", ".hidden.png", "readme.txt", "pipe.fifo")  # not inputs at all
KEY = re.compile(r"jobs/(?P<job>[0-9a-f]{32})/(input|[a-z0-9_]+\.(safetensors\.zst|png))")
PACK = re.compile(r"batches/(?P<batch>[0-9a-f]{32})/inputs-[0-9]{6}")  # small inputs, packed


def build_folder(root: Path) -> Path:
    folder = root / "in"
    folder.mkdir()
    (root / "secret.png").write_bytes(sample_png(64, hue=241))
    for i, name in enumerate(GOOD):
        (folder / name).write_bytes(sample_png(64, hue=200 + 17 * i))  # distinct bytes
    (folder / "empty.png").write_bytes(b"")
    with (folder / "huge.png").open("wb") as sparse:
        sparse.truncate(MAX_INPUT_BYTES + 1)
    (folder / "passwd.png").symlink_to("/etc/passwd")
    (folder / "outside.png").symlink_to(Path("..") / "secret.png")
    (folder / "loop.png").symlink_to("loop.png")
    os.mkfifo(folder / "pipe.fifo")
    (folder / "to-pipe.png").symlink_to("pipe.fifo")
    (folder / "letter.png").write_text("Dear farm, this letter is not a picture.")
    (folder / "icon.png").write_bytes(encode(Image.new("RGB", (64, 64), (9, 9, 9)), "ICO"))
    png, jpeg = encode(noise_image(seed=21)), encode(noise_image(seed=22), "JPEG")
    (folder / "half.png").write_bytes(png[: len(png) // 2])
    (folder / "half.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "bomb.png").write_bytes(bomb_png(14000))
    (folder / "dot.png").write_bytes(encode(Image.new("RGB", (1, 1), (1, 2, 3))))
    (folder / "sliver.png").write_bytes(encode(Image.new("RGB", (4000, 2), (4, 5, 6))))
    (folder / "banner.png").write_bytes(encode(Image.new("RGB", (50000, 10), (7, 8, 9))))
    floats = Image.fromarray(np.full((64, 64), 0.25, dtype=np.float32))
    (folder / "float.tif").write_bytes(encode(floats, "TIFF"))
    (folder / "new\nline.png").write_text("a text file with a newline in its name")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9 latin-1.png"), "wb") as latin:
        latin.write(b"a text file whose name is Latin-1, not UTF-8")
    (folder / "album.png").mkdir()
    (folder / ".hidden.png").write_bytes(sample_png(64, hue=5))
    (folder / "readme.txt").write_text("not an image suffix")
    return folder


@dataclass(frozen=True)
class Rendered:
    folder: Path
    batch: Batch
    counts: BatchCounts
    jobs: dict[str, JobInfo]  # by input name


@pytest.fixture(scope="module")
def rendered(farm, workers, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    workers.ensure("cpu", "gpu")
    folder = build_folder(tmp_path_factory.mktemp("bad-inputs"))
    batch = farm.submit_folder(folder, **FAST)
    counts = batch.wait(timeout=300)
    jobs = {job.input_name: job for job in batch.jobs()}
    return Rendered(folder, batch, counts, jobs)


def where_found(farm, job: JobInfo) -> str:
    """SUBMIT when no stage ever ran (nothing was uploaded); WORKER when preprocess failed it."""
    stages = {stage.name: stage for stage in farm.get(job.id).stages()}
    if all(stage.attempts == 0 for stage in stages.values()):
        return SUBMIT
    preprocess = stages["preprocess"]
    assert preprocess.status == "failed" and preprocess.error_code == job.error_code
    assert all(s.attempts == 0 for name, s in stages.items() if name != "preprocess")
    return WORKER


def input_key(farm, job_id: str) -> tuple[str | None, str | None]:
    """Where the job's input is, and its batch."""
    with session_scope(farm.ctx.db_url) as s:
        job = job_records.get_job(s, job_id)
        return job.input_key, job.batch_id


# -- the batch as a whole -------------------------------------------------------------------------


def test_every_input_has_one_job_and_only_the_good_ones_render(rendered: Rendered) -> None:
    assert sorted(rendered.jobs) == sorted([*GOOD, *BAD])
    assert rendered.counts == BatchCounts(
        total=len(GOOD) + len(BAD), done=len(GOOD), failed=len(BAD)
    )
    assert not set(IGNORED) & set(rendered.jobs)


def test_failed_list_names_each_bad_file_with_its_code(rendered: Rendered) -> None:
    failed = {job.input_name: job.error_code for job in rendered.batch.failed()}
    assert failed == {name: code for name, (code, _) in BAD.items()}


# -- one test per bad case ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BAD), ids=[ascii(n)[1:-1] for n in BAD])
def test_bad_file_fails_with_its_code_where_expected(farm, rendered: Rendered, name: str) -> None:
    code, where = BAD[name]
    job = rendered.jobs[name]
    assert (job.status, job.error_code) == ("failed", code)
    assert where_found(farm, job) == where
    assert_one_human_sentence(job.error_message)
    if where == SUBMIT:  # refused before upload: nothing of it reached the store
        assert input_key(farm, job.id)[0] is None
        assert list(farm.ctx.store.list(f"jobs/{job.id}/")) == []


def test_files_outside_the_folder_were_never_uploaded(farm, rendered: Rendered) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    for name in ("passwd.png", "outside.png"):
        job = rendered.jobs[name]
        assert "outside the input folder" in job.error_message
        assert input_key(farm, job.id)[0] is None
    for job in rendered.jobs.values():  # not in any stored input, packed or not
        key, _ = input_key(farm, job.id)
        assert key is None or passwd not in farm.ctx.store.get(key)


# -- good files with odd names ------------------------------------------------------------------


@pytest.mark.parametrize("name", GOOD, ids=["nfc", "nfd", "emoji-and-spaces"])
def test_unicode_and_spaces_in_names_render_and_the_name_is_kept(
    farm, rendered: Rendered, name: str
) -> None:
    job = rendered.jobs[name]
    assert job.status == "done" and job.input_name == name
    output = farm.get(job.id).result()
    assert Image.open(io.BytesIO(output)).size == (64, 64)


def test_nfc_and_nfd_twins_stay_two_jobs_with_their_exact_names(rendered: Rendered) -> None:
    assert NFC != NFD
    nfc, nfd = rendered.jobs[NFC], rendered.jobs[NFD]
    assert nfc.id != nfd.id
    assert unicodedata.is_normalized("NFC", nfc.input_name)
    assert not unicodedata.is_normalized("NFC", nfd.input_name)


def test_names_that_are_not_utf8_or_hold_newlines_are_stored(rendered: Rendered) -> None:
    assert rendered.jobs[NOT_UTF8].input_name == NOT_UTF8
    assert rendered.jobs["new\nline.png"].input_name == "new\nline.png"


def test_object_keys_hold_only_job_ids_and_stage_names(farm, rendered: Rendered) -> None:
    for name, job in rendered.jobs.items():
        key, batch_id = input_key(farm, job.id)
        if BAD.get(name, ("", WORKER))[1] == SUBMIT:
            assert key is None, name
        else:  # its own object, or a range of its chunk's packed object: ids only either way
            pack = PACK.fullmatch(key)
            assert key == f"jobs/{job.id}/input" or (pack and pack["batch"] == batch_id), name
        written = list(farm.ctx.store.list(f"jobs/{job.id}/"))
        written += [s.artifact_key for s in farm.get(job.id).stages() if s.artifact_key]
        written += [job.output_key] if job.output_key else []
        for stored in written:
            match = KEY.fullmatch(stored)
            assert match and match["job"] == job.id, (name, stored)
    done = rendered.jobs[EMOJI]
    assert done.output_key == f"jobs/{done.id}/postprocess.png"


# -- bad parameters for a folder: refused before anything is stored -------------------------------

BAD_PARAMS: list[tuple[dict[str, Any], str]] = [
    ({"strength": math.nan}, "INVALID_PARAM"),
    ({"strength": -1}, "INVALID_PARAM"),
    ({"steps": 0}, "INVALID_PARAM"),
    ({"steps": 10**6}, "INVALID_PARAM"),
    ({"seed": -1}, "INVALID_PARAM"),
    ({"seed": 2**70}, "INVALID_PARAM"),
    ({"guidance": math.inf}, "INVALID_PARAM"),
    ({"steps": True}, "INVALID_PARAM"),
    ({"prompt": "nul \x00 byte"}, "INVALID_PARAM"),
    ({"prompt": "bell \x07"}, "INVALID_PARAM"),
    ({"prompt": "x" * 100_000}, "INVALID_PARAM"),
    ({"pipeline": "foo"}, "UNKNOWN_PIPELINE"),
    ({"pipeline": "os.system"}, "UNKNOWN_PIPELINE"),
]


@pytest.mark.parametrize(("bad", "code"), BAD_PARAMS, ids=lambda v: ascii(v)[:24])
def test_bad_parameters_refuse_the_whole_folder_before_storing_anything(
    farm, rendered: Rendered, bad: dict[str, Any], code: str
) -> None:
    before = len(farm.jobs(limit=None))
    error = UnknownPipeline if code == "UNKNOWN_PIPELINE" else InvalidParameter
    with pytest.raises(error) as raised:
        farm.submit_folder(rendered.folder, **{**FAST, **bad})
    assert raised.value.code == code
    assert "\n" not in raised.value.message and len(raised.value.message) < 300
    assert len(farm.jobs(limit=None)) == before
