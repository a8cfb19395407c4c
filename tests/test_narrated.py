"""``narrated`` on the real stack: script on a gpu worker, picture and speech at the same time
on different workers (gpu, audio), then the MP4 on a cpu worker."""

from __future__ import annotations

import io
import json
import wave

import av
import numpy as np
import pytest

from farm.errors import InvalidParameter
from farm.media.speech import wav_duration
from farm.pipelines import get_pipeline
from farm.tasks import faults
from tests.helpers import ExtraWorkers, wait_until
from tests.test_cli import run_farm
from tests.test_dag import records

STAGES = ("script", "image-noise", "image-denoise", "image-decode", "image", "speech", "video")
QUICK = {"steps": 4, "size": 64}  # the picture is not what these tests look at


@pytest.fixture
def audio(running):
    workers = ExtraWorkers(running, "cpu", ("audio",))  # farm worker --queues audio
    workers.start()
    yield workers
    workers.stop_all()


def artifact(farm, job, stage: str) -> bytes:
    return farm.ctx.store.get(records(farm, job.id)[stage].artifact_key)


def samples(wav: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(wav)) as file:
        return np.frombuffer(file.readframes(file.getnframes()), dtype=np.int16)


def test_a_prompt_becomes_an_mp4_as_long_as_its_speech(farm, farm_env, audio, tmp_path) -> None:
    submitted = run_farm(
        ["submit", "--pipeline", "narrated", "--prompt", "a lighthouse in a storm"], farm_env
    )
    assert submitted.returncode == 0, submitted.stderr
    job = farm.get(submitted.stdout.strip())
    assert job.wait(timeout=240).status == "done"
    path = job.save(tmp_path / "x.mp4")
    with av.open(str(path)) as container:
        video = [s for s in container.streams if s.type == "video"]
        sound = [s for s in container.streams if s.type == "audio"]
        assert [s.codec_context.name for s in video] == ["h264"]
        assert [s.codec_context.name for s in sound] == ["aac"]
        duration = container.duration / av.time_base
        fps = float(video[0].average_rate)
    wav = artifact(farm, job, "speech")
    assert abs(duration - wav_duration(wav)) <= 1 / fps
    assert np.sqrt(np.mean(samples(wav).astype(np.float64) ** 2)) > 500  # speech, not silence
    script = json.loads(artifact(farm, job, "script"))
    assert script["written"] and script["tokens"] == 40 and script["text"].strip()
    runs = records(farm, job.id)
    assert [runs[name].attempts for name in STAGES] == [1] * len(STAGES)
    assert (runs["speech"].queue, runs["image-denoise"].queue) == ("audio", "gpu")
    shown = run_farm(["status", job.id], farm_env).stdout  # the DAG: queues, where it joins
    assert all(name in shown for name in STAGES) and "audio" in shown and "image, speech" in shown


def test_picture_and_speech_render_at_once_on_different_workers(farm, audio, running) -> None:
    job = farm.submit(pipeline="narrated", prompt="a fox in the snow", steps=20)
    # eSpeak takes milliseconds; a neural voice takes seconds: speak for as long as one would
    faults.arm(running.meta, job.id, "speech", "step", "sleep:2")
    assert job.wait(timeout=240).status == "done"
    runs = records(farm, job.id)
    speech, picture = runs["speech"], runs["image-denoise"]
    assert speech.worker != picture.worker
    assert speech.started_at < picture.finished_at and picture.started_at < speech.finished_at


def test_the_speech_grows_with_the_narration(farm, audio) -> None:
    short = farm.submit(pipeline="narrated", prompt="a city", narration="Hello there.", **QUICK)
    long = farm.submit(
        pipeline="narrated",
        prompt="a city",
        narration="Hello there. The city wakes slowly, and the first trams cross the bridge "
        "while the river carries the morning mist out towards the sea.",
        **QUICK,
    )
    for job in (short, long):
        assert job.wait(timeout=240).status == "done"
    assert json.loads(artifact(farm, short, "script"))["written"] is False
    seconds = [wav_duration(artifact(farm, job, "speech")) for job in (short, long)]
    assert seconds[1] > 3 * seconds[0] > 0


def test_the_same_seed_and_prompt_give_the_same_script_and_speech(farm, audio) -> None:
    jobs = [farm.submit(pipeline="narrated", prompt="an old mill", seed=11, **QUICK) for _ in "ab"]
    other = farm.submit(pipeline="narrated", prompt="an old mill", seed=12, **QUICK)
    for job in (*jobs, other):
        assert job.wait(timeout=240).status == "done"
    scripts = [artifact(farm, job, "script") for job in (*jobs, other)]
    speeches = [artifact(farm, job, "speech") for job in (*jobs, other)]
    assert scripts[0] == scripts[1] and speeches[0] == speeches[1]
    assert scripts[2] != scripts[0]  # the seed does choose the words


def test_a_killed_audio_worker_re_runs_only_the_speech(farm, audio, running) -> None:
    job = farm.submit(pipeline="narrated", prompt="a harbour at night", **QUICK)
    faults.arm(running.meta, job.id, "speech", "step", "stall:1")

    def speaking() -> bool:
        return {s.name: s.status for s in job.stages()}["speech"] == "running"

    wait_until(speaking, 120, "the speech stage running")
    audio.kill(audio.named(records(farm, job.id)["speech"].worker))
    audio.start()
    faults.disarm(running.meta, job.id, "speech", "step")
    assert job.wait(timeout=240).status == "done"
    runs = records(farm, job.id)
    assert (runs["speech"].attempts, runs["speech"].lost_runs) == (2, 1)
    assert [runs[name].attempts for name in STAGES if name != "speech"] == [1] * 6


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"prompt": "   "}, "narrated needs a prompt"),
        ({"prompt": "a cat", "voice": "zz-nowhere"}, "voice"),
        ({"prompt": "a cat", "rate": 1000}, "rate"),
        ({"prompt": "a cat", "fps": 0}, "fps"),
        ({"prompt": "a cat", "size": 8}, "16 to 1920 px"),
    ],
)
def test_bad_narrated_parameters_are_refused_at_submit(farm, params, says) -> None:
    with pytest.raises(InvalidParameter, match=says):
        farm.submit(pipeline="narrated", **params)


def test_a_job_that_gives_its_narration_never_loads_the_text_model() -> None:
    narrated = get_pipeline("narrated")
    params = narrated.params.bind(narrated.params.validate({"prompt": "a", "narration": "Hi."}))
    first = narrated.dag(params, None)[0]
    assert (first.name, first.op, narrated.op(first.op).model) == ("script", "given_script", None)
    assert narrated.op(narrated.stages[0].op).model == "text"  # without it, the model writes
