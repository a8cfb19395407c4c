"""``upscale`` on the real stack: one image's tiles rendered by several gpu workers at once,
joined without seams, a killed worker's tile the only one rendered again."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from farm.errors import InvalidImage, InvalidParameter
from farm.tasks import faults
from farm.tiling import MAX_TILES, SEAM_BOUND, seam_ratio, tile_boxes
from tests.helpers import ExtraWorkers, sample_png, wait_until
from tests.test_dag import records


def picture(hue: int = 0) -> bytes:
    """A 64 px gradient with a disc whose edges fall between the tiles' edges (a picture's own
    edges along the tile grid would read as seams)."""
    image = Image.new("RGB", (64, 64))
    pixels = image.load()
    for y in range(64):
        for x in range(64):
            pixels[x, y] = ((x * 3 + hue) % 256, (y * 3 + 40) % 256, (x + 2 * y + hue) % 256)
    ImageDraw.Draw(image).ellipse((14, 24, 40, 50), fill=(250, 220, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def second_gpu(running):
    extra = ExtraWorkers(running, "gpu")
    extra.start()
    yield extra
    extra.stop_all()


def kill_gpu_worker(running, extra: ExtraWorkers, name: str) -> None:
    """SIGKILL the gpu worker called ``name``, the session's or an extra one, and start
    another in its place."""
    session = [w for w in running.running if w.name == name]
    if session:
        running.kill(session[0])
        running.ensure("gpu")
    else:
        extra.kill(extra.named(name))
        extra.start()


def test_a_small_image_at_scale_4_is_rendered_by_two_gpu_workers_without_seams(
    farm, second_gpu
) -> None:
    job = farm.submit(picture(), pipeline="upscale", scale=4, prompt="a photo")
    assert job.wait(timeout=300).status == "done"
    output = np.array(Image.open(io.BytesIO(job.result())))
    assert output.shape == (256, 256, 3)
    runs = records(farm, job.id)
    tiles = [run for name, run in runs.items() if name.startswith("tile-")]
    assert len(tiles) >= 4 and all(run.queue == "gpu" for run in tiles)
    by_worker = {run.worker for run in tiles}
    assert len(by_worker) >= 2, by_worker
    assert any(
        a.worker != b.worker and a.started_at < b.finished_at and b.started_at < a.finished_at
        for a in tiles
        for b in tiles
    ), "no two workers rendered tiles at the same time"
    assert seam_ratio(output, tile_boxes(256, 256, 128, 32)) < SEAM_BOUND


def test_a_killed_tile_worker_renders_only_its_tile_again(farm, second_gpu, running) -> None:
    job = farm.submit(picture(hue=90), pipeline="upscale", scale=4, seed=3)
    faults.arm(running.meta, job.id, "tile-0", "step", "stall:2")  # tile-0 outlasts the rest
    others = [f"tile-{i}" for i in range(1, 9)]

    def others_done() -> bool:
        status = {s.name: s.status for s in job.stages()}
        return status["tile-0"] == "running" and all(status[n] == "done" for n in others)

    wait_until(others_done, 120, "every tile but tile-0 done, tile-0 running")
    kill_gpu_worker(running, second_gpu, records(farm, job.id)["tile-0"].worker)
    faults.disarm(running.meta, job.id, "tile-0", "step")
    assert job.wait(timeout=300).status == "done"
    runs = records(farm, job.id)
    assert (runs["tile-0"].attempts, runs["tile-0"].lost_runs) == (2, 1)
    assert [runs[name].attempts for name in ("split", *others, "blend")] == [1] * 10


@pytest.mark.parametrize(("scale", "says"), [(3, "scale must be 2 or 4"), (100, "scale")])
def test_a_scale_other_than_2_or_4_is_refused_at_submit(farm, scale, says) -> None:
    with pytest.raises(InvalidParameter, match=says):
        farm.submit(sample_png(64), pipeline="upscale", scale=scale)


def test_an_image_needing_more_tiles_than_the_cap_is_refused_at_submit(farm) -> None:
    with pytest.raises(InvalidParameter, match=f"over the cap of {MAX_TILES}"):
        farm.submit(_png(1024, 1024), pipeline="upscale", scale=4)


def test_an_output_over_the_pixel_cap_is_refused_at_submit(farm) -> None:
    """4080 px at scale 4 with 2048 px tiles is only 64 tiles, but 266 million pixels."""
    with pytest.raises(InvalidParameter, match="over the 40,000,000 pixels"):
        farm.submit(_png(4080, 4080), pipeline="upscale", scale=4, size=2048, overlap=8)


@pytest.mark.parametrize(
    ("image", "code"),
    [
        (b"not an image at all", "INPUT_NOT_IMAGE"),
        (sample_png(4), "INPUT_TOO_SMALL"),
        (_png(1000, 40), "INPUT_BAD_ASPECT"),
    ],
)
def test_an_input_preprocess_would_refuse_is_refused_at_submit(farm, image, code) -> None:
    with pytest.raises(InvalidImage) as caught:
        farm.submit(image, pipeline="upscale")
    assert caught.value.code == code
