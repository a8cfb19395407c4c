"""`farm ui` in headless Chromium against the real stack and workers: the batch page's progress
bar moves during a render without a reload, the job page shows the timeline and then the
output, Cancel cancels; every route needs basic auth; a POST without its token changes nothing.

FARM_UI_SCREENSHOTS=docs makes the live-render test save docs/ui-batch.png, docs/ui-job.png and
docs/ui-workers.png (the README's pictures).
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from farm.job import StageInfo
from farm.tasks import faults
from farm.ui import create_app
from farm.ui.media import _span
from farm.ui.timeline import lanes_of
from farm.ui.views import eta
from tests.helpers import ExtraWorkers, free_port, sample_png, wait_for_step, wait_until

CHROMIUM = Path("/usr/bin/chromium")
USER, PASSWORD = "farm", "ui-test-pw"
SHOTS = os.environ.get("FARM_UI_SCREENSHOTS")
# Every tick of the gpu engine slowed: a denoise of the tiny model lasts seconds, not a blink.
SLOW_TICK = "stall:0.25"

browser_needed = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")


@pytest.fixture(scope="module")
def ui(farm) -> Iterator[str]:
    """The console in this process (uvicorn in a thread); yields its base URL."""
    app = create_app(farm, user=USER, password=PASSWORD)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "the console to listen")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def context(browser, ui):
    credentials = {"username": USER, "password": PASSWORD}
    ctx = browser.new_context(
        base_url=ui, http_credentials=credentials, viewport={"width": 1180, "height": 860}
    )
    yield ctx
    ctx.close()


@pytest.fixture
def slow_gpu(meta) -> Iterator[None]:
    faults.arm_engine(meta, SLOW_TICK)
    try:
        yield
    finally:
        faults.disarm_engine(meta)


def request(
    url: str,
    auth: str | None = None,
    method: str = "GET",
    data: dict | None = None,
    headers: dict | None = None,
):
    """(status, headers) of a plain HTTP request, not a browser's."""
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, method=method, data=body, headers=headers or {})
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers


def progress_value(page) -> float:
    return float(page.get_attribute("#batch-progress", "value"))


def shoot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / name), full_page=True)


# -- over plain HTTP (first: their small renders warm the workers up) ---------------------------

ROUTES = [
    ("GET", "/"),
    ("GET", "/batches"),
    ("GET", "/batches/{batch}"),
    ("GET", "/batches/{batch}/live"),
    ("POST", "/batches/{batch}/resume-failed"),
    ("GET", "/jobs"),
    ("GET", "/jobs/{job}"),
    ("GET", "/jobs/{job}/live"),
    ("GET", "/jobs/{job}/output"),
    ("GET", "/jobs/{job}/thumbnail"),
    ("POST", "/jobs/{job}/resume"),
    ("POST", "/jobs/{job}/cancel"),
    ("GET", "/workers"),
    ("GET", "/workers/live"),
    ("GET", "/static/ui.js"),
    ("GET", "/static/ui.css"),
    ("GET", "/no/such/page"),
]


def test_every_route_refuses_requests_without_the_password(farm, running, ui, tmp_path) -> None:
    (tmp_path / "a.png").write_bytes(sample_png(hue=200))
    batch = farm.submit_folder(tmp_path, size=64, steps=2, strength=1.0, seed=5)
    batch.wait(timeout=60)
    job = batch.jobs()[0]
    for method, path in ROUTES:
        url = ui + path.format(batch=batch.id, job=job.id)
        for auth in (None, f"{USER}:wrong", f"someone:{PASSWORD}", PASSWORD):
            status, headers = request(url, auth, method, {} if method == "POST" else None)
            assert status == 401, f"{method} {path} with {auth!r} answered {status}"
            assert headers["WWW-Authenticate"].startswith("Basic ")
    authed = f"{USER}:{PASSWORD}"  # with it, every page renders (the unknown one is a 404)
    for method, path in ROUTES:
        if method == "GET":
            expected = 404 if path == "/no/such/page" else 200
            url = ui + path.format(batch=batch.id, job=job.id)
            assert request(url, authed)[0] == expected, path
    assert farm.get(job.id).status() == "done"


def test_output_is_served_by_range(farm, running, ui, tmp_path) -> None:
    job = farm.submit(sample_png(hue=210), size=64, steps=2, strength=1.0, seed=6)
    job.wait(timeout=60)
    data = job.result()
    req = urllib.request.Request(f"{ui}/jobs/{job.id}/output", headers={"Range": "bytes=8-15"})
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(req, timeout=10) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 8-15/{len(data)}"
        assert response.read() == data[8:16]


# -- the command ---------------------------------------------------------------------------------


def test_farm_ui_command_makes_up_a_password_and_refuses_bad_settings(farm_env, tmp_path) -> None:
    env = {k: v for k, v in {**os.environ, **farm_env}.items() if k != "FARM_FLOWER_PASSWORD"}
    port = free_port()
    log = tmp_path / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "farm", "ui", "--port", str(port)], env=env, stderr=out
        )
    try:
        said = re.compile(r"this run's password: (\S+)")
        wait_until(lambda: "farm ui on http" in log.read_text(), 60, "farm ui to listen")
        password = said.search(log.read_text()).group(1)
        base = f"http://127.0.0.1:{port}"
        assert request(base + "/workers")[0] == 401
        assert request(base + "/workers", f"farm:{password}")[0] == 200
        # a second console on the same port: one line, a stable code
        taken = subprocess.run(
            [sys.executable, "-m", "farm", "ui", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        proc.terminate()
        proc.wait(10)
    assert taken.returncode == 2
    assert taken.stderr.strip().splitlines()[-1].startswith("error CONFIG_INVALID: farm ui cannot")
    bad = subprocess.run(
        [sys.executable, "-m", "farm", "ui"],
        env={**env, "FARM_UI_PORT": "http"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error CONFIG_INVALID: FARM_UI_PORT"), lines


# -- in a browser, during a real render --------------------------------------------------------


@browser_needed
def test_pages_follow_a_real_render(farm, running, meta, slow_gpu, context, tmp_path) -> None:
    for hue in (150, 160, 170):
        (tmp_path / f"in-{hue}.png").write_bytes(sample_png(hue=hue))
    batch = farm.submit_folder(tmp_path, size=64, steps=8, strength=1.0, seed=3)
    total = batch.counts().total
    first, failing = batch.jobs()[:2]
    # its last stage, seconds away: armed long before any worker reaches it
    faults.arm(meta, failing.id, "postprocess", "start", "fail")
    batch_page, job_page, workers_page = (context.new_page() for _ in range(3))
    batch_page.goto(f"/batches/{batch.id}")
    job_page.goto(f"/jobs/{first.id}")
    workers_page.goto("/workers")
    thumbnail = job_page.locator("img.thumbnail")
    assert thumbnail.count() == 0

    # The bar moves while the batch renders, in the page as loaded: no reload until Resume.
    at_load = progress_value(batch_page)
    assert at_load < total, "the batch finished before its page loaded"

    def moved_midway() -> bool:
        return at_load < progress_value(batch_page) < total

    wait_until(moved_midway, 60, "the progress bar to move during the render")
    # The workers page names the gpu worker's current job, from the stage records.
    gpu = running.of("gpu")[0].name
    busy = workers_page.locator(f'tr[data-worker="{gpu}"] a.current')
    wait_until(lambda: busy.count() > 0, 60, "the gpu worker's current job on /workers")
    shoot(workers_page, "ui-workers.png")
    # The job page draws its stages on the timeline as they run, the output once done.
    wait_until(lambda: job_page.locator("rect.run").count() > 0, 60, "timeline bars")

    batch.wait(timeout=120)
    wait_until(lambda: progress_value(batch_page) == total, 30, "the bar to fill")
    done, failed = (batch_page.locator(f'[data-count="{name}"]') for name in ("done", "failed"))
    wait_until(lambda: (done.inner_text(), failed.inner_text()) == (f"{total - 1}", "1"), 30, "")
    failed_row = batch_page.locator("tr", has_text="STAGE_FAILED").inner_text()
    assert failing.input_name in failed_row and "injected failure" in failed_row
    shoot(batch_page, "ui-batch.png")
    loaded = "img => img.complete && img.naturalWidth > 0"
    wait_until(lambda: thumbnail.count() and thumbnail.evaluate(loaded), 30, "the thumbnail")
    stages = [s.name for s in farm.get(first.id).stages()]
    drawn = job_page.locator("rect.run").evaluate_all("rs => rs.map(r => r.dataset.stage)")
    assert drawn == stages
    assert job_page.locator("rect.run.q-gpu").count() > 0
    assert job_page.locator("rect.run.q-cpu").count() > 0
    shoot(job_page, "ui-job.png")

    batch_page.get_by_role("button", name="Resume failed").click()
    assert batch.wait(timeout=60).done == total
    wait_until(lambda: done.inner_text() == str(total), 30, "the page to count all done")


@browser_needed
def test_cancel_button_cancels_and_a_post_without_its_token_does_not(
    farm, running, slow_gpu, context, ui
) -> None:
    job = farm.submit(sample_png(hue=180), size=64, steps=200, strength=1.0, seed=4)
    wait_for_step(job, "denoise", 1)
    page = context.new_page()
    page.goto(f"/jobs/{job.id}")
    action = f"/jobs/{job.id}/cancel"
    token = page.locator(f'form[action="{action}"] input[name="csrf_token"]').get_attribute("value")
    auth = f"{USER}:{PASSWORD}"
    refused = [
        ({}, {}),  # no token
        ({"csrf_token": "0" * 64}, {}),  # a made-up one
        ({"csrf_token": token}, {"Origin": "http://evil.example"}),  # sent from another site
        ({"csrf_token": token}, {"Referer": "http://evil.example/x"}),
    ]
    for form, headers in refused:
        assert request(ui + action, auth, "POST", form, headers)[0] == 403, (form, headers)
    # the token is for this action only: resume refuses it (403, not the job's NOT_RESUMABLE)
    assert request(f"{ui}/jobs/{job.id}/resume", auth, "POST", {"csrf_token": token})[0] == 403
    assert job.status() == "running"
    assert job.progress().status == "running"

    page.get_by_role("button", name="Cancel").click()
    wait_until(lambda: job.status() == "cancelled", 30, "the job to be cancelled")
    status = page.locator(".summary .status")
    wait_until(lambda: status.inner_text() == "cancelled", 30, "the page to say cancelled")


@browser_needed
def test_dag_branches_are_lanes_of_the_timeline(farm, running, context) -> None:
    job = farm.submit(
        sample_png(hue=190), pipeline="variants", filters="blur,edges,emboss", size=64
    )
    job.wait(timeout=60)
    page = context.new_page()
    page.goto(f"/jobs/{job.id}")
    lanes = page.locator(".timeline svg.lane")
    assert lanes.count() == 3  # load -> blur -> sheet; edges; emboss
    assert lanes.nth(0).locator("rect.run").evaluate_all("rs => rs.map(r => r.dataset.stage)") == [
        "load",
        "variant-blur",
        "sheet",
    ]
    assert page.locator("img.thumbnail").evaluate("img => img.naturalWidth") > 0


@browser_needed
def test_a_narrated_video_has_a_poster_and_plays(farm, running, context, ui) -> None:
    audio = ExtraWorkers(running, "cpu", ("audio",))  # farm worker --queues audio
    audio.start()
    try:
        job = farm.submit(
            pipeline="narrated", prompt="a kite", narration="A red kite.", steps=4, size=64, fps=8
        )
        assert job.wait(timeout=120).status == "done"
    finally:
        audio.stop_all()
    page = context.new_page()
    page.goto(f"/jobs/{job.id}")
    assert page.locator(".timeline svg.lane").count() == 2  # the picture's branch, the speech's
    poster = page.locator("video.thumbnail").get_attribute("poster")
    assert page.request.get(poster).headers["content-type"] == "image/png"
    # The player reads the MP4 through the console by byte ranges: it knows the clip's length.
    video = page.locator("video.thumbnail")
    wait_until(lambda: video.evaluate("v => v.readyState >= 1"), 30, "the video's metadata")
    assert video.evaluate("v => v.duration") > 0


# -- pure parts ------------------------------------------------------------------------------------


def stage(name: str, *after: str) -> StageInfo:
    return StageInfo(name, "cpu", "done", 1, 0, 0, None, None, None, None, None, None, None, after)


def test_a_chain_is_one_lane_and_branches_get_their_own() -> None:
    chain = [stage("a"), stage("b", "a"), stage("c", "b")]
    assert [[s.name for s in lane] for lane in lanes_of(chain)] == [["a", "b", "c"]]
    narrated = [
        stage("script"),
        stage("image", "script"),
        stage("speech", "script"),
        stage("video", "image", "speech"),
    ]
    lanes = [[s.name for s in lane] for lane in lanes_of(narrated)]
    assert lanes == [["script", "image", "video"], ["speech"]]


def test_eta_goes_at_the_pace_so_far() -> None:
    assert eta(10.0, 1.0, 4) == pytest.approx(30.0)
    assert eta(10.0, 0.0, 4) is None and eta(10.0, 4.0, 4) is None


def test_byte_ranges() -> None:
    assert _span("bytes=0-9", 100) == (0, 9)
    assert _span("bytes=90-", 100) == (90, 99)
    assert _span("bytes=-10", 100) == (90, 99)
    assert _span("bytes=95-200", 100) == (95, 99)
    assert _span("bytes=100-", 100) is None
    assert _span("items=0-1", 100) is None
