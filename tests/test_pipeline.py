"""The staged pipeline end to end: real stack, real cpu and gpu worker processes, with Redis
and with RabbitMQ as the broker."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from farm import StageInfo
from farm.tasks import faults
from tests.brokers import on_each_broker, per_broker
from tests.helpers import sample_png, wait_for_step, wait_until

pytestmark = on_each_broker
farm, workers, meta = per_broker("farm"), per_broker("workers"), per_broker("meta")

FAST = {"size": 64, "steps": 8, "strength": 0.75, "seed": 3, "prompt": "a lighthouse at dusk"}
IMG2IMG_STAGES = ["preprocess", "encode", "noise", "denoise", "decode", "postprocess"]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_job_runs_end_to_end(farm, running) -> None:
    job = farm.submit(sample_png(), **FAST)
    info = job.wait(timeout=120)
    assert info.status == "done", info
    assert farm.ctx.store.exists(info.output_key)
    assert Image.open(io.BytesIO(job.result())).size == (64, 64)
    stages = job.stages()
    assert [s.name for s in stages] == IMG2IMG_STAGES
    for stage in stages:
        assert (stage.status, stage.attempts) == ("done", 1), stage
        assert stage.worker.startswith(f"{stage.queue}-"), stage
        assert stage.duration_s > 0 and stage.artifact_size > 0
        assert farm.ctx.store.exists(stage.artifact_key)


def test_txt2img_needs_no_input(farm, running) -> None:
    job = farm.submit(pipeline="txt2img", **FAST)
    assert job.wait(timeout=120).status == "done"
    assert [s.name for s in job.stages()] == ["noise", "denoise", "decode", "postprocess"]


def test_staged_run_in_separate_workers_matches_the_monolithic_pipeline(
    farm, running, tiny_model
) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    params = {**FAST, "negative_prompt": "blurry", "guidance": 7.5, "steps": 12}
    source = sample_png(64)
    job = farm.submit(source, **params)
    assert job.wait(timeout=120).status == "done"
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model, local_files_only=True)
    import torch

    reference = pipe(
        params["prompt"],
        image=Image.open(io.BytesIO(source)).convert("RGB"),
        strength=params["strength"],
        num_inference_steps=params["steps"],
        guidance_scale=params["guidance"],
        negative_prompt=params["negative_prompt"],
        generator=torch.Generator("cpu").manual_seed(params["seed"]),
    ).images[0]
    diff = np.abs(pixels(job.result()).astype(int) - np.asarray(reference).astype(int))
    assert diff.max() == 0


def test_failed_decode_resumes_without_rerunning_earlier_stages(farm, running, meta) -> None:
    job = farm.submit(sample_png(hue=40), **FAST)
    faults.arm(meta, job.id, "decode", "start", "fail")
    failed = job.wait(timeout=120)
    assert (failed.status, failed.error_code) == ("failed", "STAGE_FAILED")
    assert "injected" in failed.error_message

    farm.resume(job.id)
    assert job.wait(timeout=120).status == "done"
    attempts = {s.name: s.attempts for s in job.stages()}
    assert attempts == {
        "preprocess": 1,
        "encode": 1,
        "noise": 1,
        "denoise": 1,
        "decode": 2,
        "postprocess": 1,
    }


def test_cancel_during_denoise(farm, running) -> None:
    job = farm.submit(sample_png(), **{**FAST, "steps": 400, "strength": 1.0})
    wait_for_step(job, "denoise", 2)
    assert farm.cancel(job.id)
    assert job.wait(timeout=60).status == "cancelled"

    def denoise() -> StageInfo:
        return next(s for s in job.stages() if s.name == "denoise")

    wait_until(lambda: denoise().status == "cancelled", 30, "denoise to stop")
    assert job.progress().step < 400
    assert [s.status for s in job.stages()][4:] == ["cancelled", "cancelled"]


# kill -9 of the gpu worker mid-denoise: tests/test_faults.py::test_gpu_worker_killed_mid_denoise


def test_noop_pipeline_carries_its_input_through(farm, running) -> None:
    from farm.storage.codecs import decode_tensors

    job = farm.submit(b"\x01\x02\x03", pipeline="noop")
    info = job.wait(timeout=60)
    assert info.status == "done"
    payload = decode_tensors(farm.ctx.store.get(info.output_key))["payload"]
    assert bytes(payload.tolist()) == b"\x01\x02\x03"


def test_sleep_pipeline_holds_its_gpu_stage_and_carries_its_input(farm, running) -> None:
    from farm.storage.codecs import decode_tensors

    job = farm.submit(b"\x04\x05", pipeline="sleep", hold_ms=300)
    info = job.wait(timeout=60)
    assert info.status == "done"
    stages = {s.name: s for s in job.stages()}
    assert [(s.name, s.queue) for s in stages.values()] == [
        ("take", "cpu"),
        ("hold", "gpu"),
        ("give", "cpu"),
    ]
    assert stages["hold"].duration_s >= 0.3 and stages["hold"].worker.startswith("gpu-")
    payload = decode_tensors(farm.ctx.store.get(info.output_key))["payload"]
    assert bytes(payload.tolist()) == b"\x04\x05"
