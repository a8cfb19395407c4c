"""The GPU engine in one process, on the tiny model: jobs on threads, as in a gpu worker.

Every job runs the plain stage functions; only its model calls go through the engine. Renders
are compared with the same jobs run alone, without the engine (which tests/test_stages.py
pins to diffusers bit for bit). Workers, Redis and the records: tests/test_batching.py.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load, save

from farm import engine
from farm.engine import PIXEL_BOUND
from farm.engine.core import Engine
from farm.errors import GpuOutOfMemory, WorkerStopping
from farm.models import ModelBundle, load_model
from farm.params import RenderParams
from farm.stages import STAGES, Artifact, NoHooks

IMG2IMG = ("preprocess", "encode", "noise", "denoise", "decode", "postprocess")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return load_model(None, tmp_path_factory.mktemp("engine-data"), device="cpu")


@pytest.fixture
def running() -> Iterator[Engine]:
    started = engine.start(8, None)
    yield started
    engine.stop()


def photo(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    pixels = (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def mixed_jobs(count: int = 8) -> list[tuple[bytes, RenderParams]]:
    """Different steps, strengths, schedulers, guidance (on and off), prompts and seeds."""
    schedulers = ("pndm", "ddim", "euler", "euler_a", "dpm")
    return [
        (
            photo(96, 64, i),
            RenderParams.from_dict(
                {
                    "prompt": f"prompt number {i}",
                    "steps": (4, 8, 12, 30, 6, 20, 10, 16)[i % 8],
                    "strength": (0.5, 0.8, 1.0, 0.6, 0.9, 0.7, 0.75, 0.3)[i % 8],
                    "scheduler": schedulers[i % len(schedulers)],
                    "guidance": (7.5, 1.0, 3.0, 7.5, 1.0, 5.0, 7.5, 2.0)[i % 8],
                    "seed": i,
                    "size": 64,
                }
            ),
        )
        for i in range(count)
    ]


def render(data: bytes, job: RenderParams, bundle: ModelBundle, job_id: str = "") -> np.ndarray:
    """The job's stages in order, each in the engine when one runs (as the runner does)."""
    artifact: Artifact = data
    for name in IMG2IMG:
        stage = STAGES[name]
        with engine.joined(job_id, name, bundle if stage.model else None) as (model, _):
            artifact = stage.run(artifact, job, model, NoHooks())
        if not isinstance(artifact, bytes):  # what the next stage reads from the store
            artifact = load(save(artifact))
    return np.asarray(Image.open(io.BytesIO(artifact)).convert("RGB")).astype(np.int16)


def render_alone(data: bytes, job: RenderParams, bundle: ModelBundle) -> np.ndarray:
    """The job's stages called directly, with no engine in between."""
    artifact: Artifact = data
    for name in IMG2IMG:
        stage = STAGES[name]
        artifact = stage.run(artifact, job, bundle if stage.model else None, NoHooks())
        if not isinstance(artifact, bytes):  # what the next stage reads from the store
            artifact = load(save(artifact))
    return np.asarray(Image.open(io.BytesIO(artifact)).convert("RGB")).astype(np.int16)


def render_together(jobs, bundle: ModelBundle) -> list[np.ndarray | BaseException]:
    """Every job on its own thread at once, as a gpu worker's threads run them."""
    results: list[np.ndarray | BaseException] = [None] * len(jobs)  # type: ignore[list-item]

    def one(index: int) -> None:
        try:
            results[index] = render(*jobs[index], bundle, job_id=f"job-{index}")
        except BaseException as exc:  # handed to the test
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def largest_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def test_mixed_jobs_share_model_calls_within_the_bound(
    bundle: ModelBundle, running: Engine
) -> None:
    jobs = mixed_jobs()
    alone = [render_alone(data, job, bundle) for data, job in jobs]
    together = render_together(jobs, bundle)
    for solo, batched in zip(alone, together, strict=True):
        assert isinstance(batched, np.ndarray), batched
        assert largest_difference(solo, batched) <= PIXEL_BOUND
    stats = running.stats()
    denoise_calls = sum(job.img2img_steps() for _, job in jobs)  # UNet calls run alone
    assert stats["model_calls"] < denoise_calls  # every encode, prompt and decode call too
    assert stats["jobs_per_call"] > 2


def test_one_job_per_call_is_bit_exact(bundle: ModelBundle) -> None:
    jobs = mixed_jobs(4)
    alone = [render_alone(data, job, bundle) for data, job in jobs]
    engine.start(1, None)
    try:
        together = render_together(jobs, bundle)
        assert engine.current().stats()["jobs_per_call"] == 1.0
    finally:
        engine.stop()
    for solo, batched in zip(alone, together, strict=True):
        assert np.array_equal(solo, batched)


def test_membership_counts_the_calls_a_stage_shared(bundle: ModelBundle, running: Engine) -> None:
    data, job = mixed_jobs(1)[0]
    job = dataclasses.replace(job, scheduler="ddim")  # one UNet call per step (PNDM adds one)
    members = []
    artifact: Artifact = data
    for name in IMG2IMG[:4]:
        stage = STAGES[name]
        with engine.joined("job", name, bundle if stage.model else None) as (model, member):
            artifact = stage.run(artifact, job, model, NoHooks())
            members.append(member)
    assert members[0] is None  # preprocess has no model: not in the engine
    assert members[3].calls == job.img2img_steps() and members[3].jobs_per_call == 1.0


class OutOfMemoryAbove:
    """A UNet that runs out of memory on more than ``rows`` rows at once."""

    def __init__(self, unet: torch.nn.Module, rows: int) -> None:
        self.unet, self.rows, self.refused = unet, rows, 0

    def __call__(self, sample: torch.Tensor, *args, **kwargs):
        if sample.shape[0] > self.rows:
            self.refused += 1
            raise torch.OutOfMemoryError(f"injected: {sample.shape[0]} rows")
        return self.unet(sample, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.unet, name)


def test_out_of_memory_halves_the_batch_and_every_job_finishes(
    bundle: ModelBundle, running: Engine
) -> None:
    small = OutOfMemoryAbove(bundle.unet, rows=4)  # two guided jobs at most
    tight = dataclasses.replace(bundle, unet=small)
    jobs = [(data, dataclasses.replace(job, guidance=7.5)) for data, job in mixed_jobs()]
    alone = [render_alone(data, job, bundle) for data, job in jobs]
    together = render_together(jobs, tight)
    for solo, batched in zip(alone, together, strict=True):
        assert isinstance(batched, np.ndarray), batched
        assert largest_difference(solo, batched) <= PIXEL_BOUND
    assert small.refused > 0
    assert running.out_of_memory > 0 and running.lowest_cap <= 2


def test_a_job_too_big_alone_fails_with_gpu_out_of_memory(
    bundle: ModelBundle, running: Engine
) -> None:
    tight = dataclasses.replace(bundle, unet=OutOfMemoryAbove(bundle.unet, rows=0))
    data, job = mixed_jobs(1)[0]
    with pytest.raises(GpuOutOfMemory) as caught:
        render(data, job, tight)
    assert caught.value.code == "GPU_OUT_OF_MEMORY"
    assert "lower its size" in caught.value.message


def test_jobs_of_different_shapes_never_share_a_call(bundle: ModelBundle, running: Engine) -> None:
    jobs = [
        (data, dataclasses.replace(job, size=64 + 16 * (i % 2)))
        for i, (data, job) in enumerate(mixed_jobs(4))
    ]
    alone = [render_alone(data, job, bundle) for data, job in jobs]
    together = render_together(jobs, bundle)
    for solo, batched in zip(alone, together, strict=True):
        assert solo.shape == batched.shape
        assert largest_difference(solo, batched) <= PIXEL_BOUND


def component_calls(bundle: ModelBundle) -> dict[str, object]:
    """For each batched component other than the UNet: a call of job ``i``'s own input."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, 64, 64, generator=generator) for _ in range(4)]
    latents = [torch.randn(1, 4, 32, 32, generator=generator) for _ in range(4)]
    tokens = [
        bundle.tokenizer(
            f"prompt {i}",
            padding="max_length",
            max_length=bundle.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for i in range(4)
    ]
    return {
        "vae.encode": lambda b, i: b.vae.encode(images[i]).latent_dist.mean,
        "vae.decode": lambda b, i: b.vae.decode(latents[i], return_dict=False)[0],
        "text_encoder": lambda b, i: b.text_encoder(tokens[i])[0],
    }


def all_waiting_then_run(paused: Engine, calls: list) -> list[torch.Tensor]:
    """Each call on its own thread; the engine starts once all of them wait for it, so they
    meet in one tick as far as they can share one."""
    answers: list[torch.Tensor] = [None] * len(calls)  # type: ignore[list-item]

    def one(index: int) -> None:
        answers[index] = calls[index]()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    try:
        while paused.waiting() < len(calls):
            threading.Event().wait(0.01)
        paused.start()
        for thread in threads:
            thread.join(60)
    finally:
        paused.stop()
    return answers


@pytest.mark.parametrize("component", ["vae.encode", "vae.decode", "text_encoder"])
def test_calls_waiting_at_the_same_moment_share_one_model_call(
    bundle: ModelBundle, component: str
) -> None:
    call = component_calls(bundle)[component]
    paused = Engine(8, None)
    wrapped = paused.wrap(bundle)
    answers = all_waiting_then_run(paused, [lambda i=i: call(wrapped, i) for i in range(4)])
    assert (paused.model_calls, paused.jobs_in_calls) == (1, 4)
    for index, answer in enumerate(answers):
        with torch.no_grad():
            alone = call(bundle, index)
        assert answer is not None and answer.shape == alone.shape
        assert torch.allclose(answer, alone, atol=1e-4)


def test_a_stopped_engine_fails_calls_instead_of_leaving_them_waiting(bundle: ModelBundle) -> None:
    stopped = Engine(8, None)
    wrapped = stopped.wrap(bundle)
    latents = torch.zeros(1, 4, 32, 32)
    waiting: list[BaseException] = []

    def decode() -> None:
        try:
            wrapped.vae.decode(latents)
        except WorkerStopping as exc:
            waiting.append(exc)

    thread = threading.Thread(target=decode)
    thread.start()
    while stopped.waiting() < 1:
        threading.Event().wait(0.01)
    stopped.stop()  # a call already waiting fails, retryably
    thread.join(10)
    assert len(waiting) == 1 and waiting[0].retryable
    with pytest.raises(WorkerStopping):  # and so does one made afterwards
        wrapped.vae.decode(latents)


def test_calls_of_two_models_of_the_same_shapes_never_share(bundle: ModelBundle) -> None:
    other = dataclasses.replace(bundle, vae=copy.deepcopy(bundle.vae))
    with torch.no_grad():
        for parameter in other.vae.parameters():
            parameter.mul_(0.5)
    decode = component_calls(bundle)["vae.decode"]
    paused = Engine(8, None)
    models = (paused.wrap(bundle), paused.wrap(other))
    answers = all_waiting_then_run(paused, [lambda m=m: decode(m, 0) for m in models])
    assert paused.model_calls == 2  # one per model
    with torch.no_grad():
        assert torch.allclose(answers[0], decode(bundle, 0), atol=1e-5)
        assert torch.allclose(answers[1], decode(other, 0), atol=1e-5)


def test_job_threads_tokenizing_at_once_keep_their_own_padding(
    bundle: ModelBundle, running: Engine
) -> None:
    """encode_prompt pads a prompt to 77 tokens after probing it with padding="longest"; on
    a shared fast tokenizer another thread's probe could change the first one's padding."""
    tokenizer = running.wrap(bundle).tokenizer
    wrong: list[int] = []

    def padded() -> None:
        for _ in range(3000):
            ids = tokenizer("a cat", padding="max_length", max_length=77, truncation=True)
            if len(ids.input_ids) != 77:
                wrong.append(len(ids.input_ids))

    def probing() -> None:
        for _ in range(3000):
            tokenizer("a painting of a cat", padding="longest")

    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between every few bytecodes: races show
    try:
        threads = [threading.Thread(target=padded), threading.Thread(target=probing)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        sys.setswitchinterval(switching)
    assert wrong == []
