"""Stage logic on the real tiny model: bit-exact with diffusers, cancellable.

Bad inputs to the preprocess stage (the catalog of notes/reliability.md §3) are tested in
tests/test_bad_inputs.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors.torch import load, save

from farm.errors import ArtifactMissing, InvalidParameter, JobCancelled, ModelError
from farm.models import ModelBundle, load_model, make_scheduler
from farm.params import SCHEDULER_NAMES, RenderParams, output_size
from farm.stages import STAGES, Artifact, NoHooks
from farm.stages.preprocess import PAD_COLOUR, prepare_image

IMG2IMG = ("preprocess", "encode", "noise", "denoise", "decode", "postprocess")
TXT2IMG = ("noise_txt2img", "denoise", "decode", "postprocess")

# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return load_model(None, tmp_path_factory.mktemp("stages-data"), device="cpu")


def png_bytes(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photo() -> bytes:
    """A 96x64 gradient with noise: not square, so the cover crop is exercised."""
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 64 * 96 * 3).reshape(64, 96, 3)
    pixels = (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
    return png_bytes(Image.fromarray(pixels))


def params(**overrides: object) -> RenderParams:
    base: dict[str, object] = {
        "prompt": "a painting of a cat",
        "negative_prompt": "blurry",
        "strength": 0.8,
        "steps": 6,
        "seed": 1234,
        "size": 64,
    }
    return RenderParams.from_dict({**base, **overrides})


def through_safetensors(artifact: Artifact) -> Artifact:
    """What a stage's output looks like to the next stage after the artifact store."""
    return artifact if isinstance(artifact, bytes) else load(save(artifact))


class Recorder:
    """Hooks that record progress and can cancel at a given step."""

    def __init__(self, cancel_at: int | None = None) -> None:
        self.steps: list[tuple[int, int]] = []
        self.cancel_at = cancel_at

    def on_step(self, step: int, total: int) -> None:
        self.steps.append((step, total))
        if step == self.cancel_at:
            raise JobCancelled("cancelled by the test")


def run_stages(
    names: tuple[str, ...], first: Artifact | None, job: RenderParams, bundle: ModelBundle
) -> dict[str, Artifact]:
    """Run stages in order with a serialization round trip between each; every output."""
    outputs: dict[str, Artifact] = {}
    artifact = first
    for name in names:
        stage = STAGES[name]
        artifact = stage.run(artifact, job, bundle if stage.needs_model else None, NoHooks())
        outputs[name] = artifact = through_safetensors(artifact)
    return outputs


def pixels_of(png: Artifact) -> np.ndarray:
    assert isinstance(png, bytes)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def img2img_pipeline(bundle: ModelBundle, scheduler: str) -> StableDiffusionImg2ImgPipeline:
    pipe = StableDiffusionImg2ImgPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=bundle.unet,
        scheduler=make_scheduler(bundle, scheduler),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- equivalence with diffusers ------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_staged_img2img_equals_the_pipeline(
    bundle: ModelBundle, photo: bytes, scheduler: str
) -> None:
    job = params(scheduler=scheduler)
    outputs = run_stages(IMG2IMG, photo, job, bundle)
    pipe = img2img_pipeline(bundle, scheduler)
    call = {
        "prompt": job.prompt,
        "image": prepare_image(photo, job),
        "strength": job.strength,
        "num_inference_steps": job.steps,
        "guidance_scale": job.guidance,
        "negative_prompt": job.negative_prompt,
    }
    picture = pipe(**call, generator=torch.Generator("cpu").manual_seed(job.seed)).images[0]
    latents = pipe(
        **call, generator=torch.Generator("cpu").manual_seed(job.seed), output_type="latent"
    )
    staged = outputs["denoise"]
    assert isinstance(staged, dict)
    assert torch.equal(latents.images, staged["latents"])
    assert np.abs(pixels_of(outputs["postprocess"]) - np.asarray(picture, np.int16)).max() == 0


def test_without_guidance_equals_the_pipeline(bundle: ModelBundle, photo: bytes) -> None:
    job = params(guidance=1.0, strength=0.5)
    outputs = run_stages(IMG2IMG, photo, job, bundle)
    noise = outputs["noise"]
    assert isinstance(noise, dict) and noise["prompt_embeds"].shape[0] == 1
    pipe = img2img_pipeline(bundle, "pndm")
    picture = pipe(
        job.prompt,
        image=prepare_image(photo, job),
        strength=job.strength,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance,
        generator=torch.Generator("cpu").manual_seed(job.seed),
    ).images[0]
    assert np.abs(pixels_of(outputs["postprocess"]) - np.asarray(picture, np.int16)).max() == 0


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a"])
def test_txt2img_equals_the_pipeline_given_channels_last_noise(
    bundle: ModelBundle, scheduler: str
) -> None:
    job = params(scheduler=scheduler, prompt="a photo of a dog", negative_prompt="")
    outputs = run_stages(TXT2IMG, None, job, bundle)
    components = img2img_pipeline(bundle, scheduler).components
    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(job.seed)
    # The stages compute in channels-last (see farm.stages.base.to_model); so must the pipeline.
    noise = randn_tensor((1, 4, 32, 32), generator=generator)
    width, height = output_size(job)
    picture = pipe(
        job.prompt,
        height=height,
        width=width,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance,
        generator=generator,
        latents=noise.contiguous(memory_format=torch.channels_last),
    ).images[0]
    assert np.abs(pixels_of(outputs["postprocess"]) - np.asarray(picture, np.int16)).max() == 0


def test_artifacts_are_cpu_contiguous_and_serializable(bundle: ModelBundle, photo: bytes) -> None:
    job = params()
    artifact: Artifact | None = photo
    for name in IMG2IMG[:-1]:
        stage = STAGES[name]
        artifact = stage.run(artifact, job, bundle if stage.needs_model else None, NoHooks())
        assert isinstance(artifact, dict)
        for key, tensor in artifact.items():
            assert tensor.device.type == "cpu" and tensor.is_contiguous(), (name, key)
            assert not tensor.is_floating_point() or tensor.dtype == torch.float32, (name, key)
        save(artifact)
    assert artifact["image"].dtype == torch.uint8
    assert artifact["image"].shape == (1, 3, 40, 64)  # the photo's 3:2, sides multiples of 8


def test_same_job_same_png(bundle: ModelBundle, photo: bytes) -> None:
    job = params(steps=3, sharpen=1.5, saturation=1.3)
    first = run_stages(IMG2IMG, photo, job, bundle)["postprocess"]
    second = run_stages(IMG2IMG, photo, job, bundle)["postprocess"]
    assert isinstance(first, bytes) and first == second


# -- denoise: progress, cancel, consistency ------------------------------------------------------


def noised(bundle: ModelBundle, photo: bytes, job: RenderParams) -> Artifact:
    return run_stages(IMG2IMG[:3], photo, job, bundle)["noise"]


def test_progress_is_reported_after_every_unet_call(bundle: ModelBundle, photo: bytes) -> None:
    job = params(steps=10, strength=0.5)
    artifact = noised(bundle, photo, job)
    calls: list[int] = []
    handle = bundle.unet.register_forward_hook(lambda *args: calls.append(1))
    hooks = Recorder()
    try:
        STAGES["denoise"].run(artifact, job, bundle, hooks)
    finally:
        handle.remove()
    # PNDM's schedule repeats one timestep: 5 steps of 10 take 6 UNet calls.
    assert hooks.steps == [(step, 6) for step in range(1, 7)]
    assert len(calls) == 6


def test_cancel_stops_denoise(bundle: ModelBundle, photo: bytes) -> None:
    job = params(steps=10, strength=1.0, scheduler="euler")
    hooks = Recorder(cancel_at=3)
    with pytest.raises(JobCancelled):
        STAGES["denoise"].run(noised(bundle, photo, job), job, bundle, hooks)
    assert hooks.steps == [(1, 10), (2, 10), (3, 10)]


def test_denoise_refuses_a_different_schedule(bundle: ModelBundle, photo: bytes) -> None:
    artifact = noised(bundle, photo, params(steps=6))
    with pytest.raises(ModelError, match="schedule differs"):
        STAGES["denoise"].run(artifact, params(steps=7), bundle, NoHooks())


def test_too_few_steps_for_the_strength(bundle: ModelBundle, photo: bytes) -> None:
    job = params(steps=1, strength=0.5)
    with pytest.raises(InvalidParameter, match="leaves no denoising step"):
        noised(bundle, photo, job)


def test_missing_inputs_are_named(bundle: ModelBundle) -> None:
    with pytest.raises(ArtifactMissing, match="latents, prompt_embeds"):
        STAGES["denoise"].run({"rng_state": torch.zeros(1)}, params(), bundle, NoHooks())
    with pytest.raises(ModelError, match="needs a model"):
        STAGES["encode"].run({"image": torch.zeros(1, 3, 8, 8)}, params(), None, NoHooks())


def test_registry() -> None:
    assert set(STAGES) == {*IMG2IMG, *TXT2IMG, "noop"}
    assert [name for name, stage in STAGES.items() if not stage.needs_model] == [
        "preprocess",
        "postprocess",
        "noop",
    ]
    assert STAGES["postprocess"].writes == "png"


# -- postprocess ---------------------------------------------------------------------------------


def plain_image() -> dict[str, torch.Tensor]:
    grid = torch.arange(64 * 64 * 3, dtype=torch.int64).reshape(1, 3, 64, 64) % 251
    return {"image": grid.to(torch.uint8)}


def test_postprocess_default_keeps_pixels_and_writes_no_metadata() -> None:
    png = STAGES["postprocess"].run(plain_image(), params(), None, NoHooks())
    assert isinstance(png, bytes)
    expected = plain_image()["image"][0].permute(1, 2, 0).numpy()
    assert np.array_equal(pixels_of(png), expected)
    chunks = Image.open(io.BytesIO(png))
    assert chunks.info == {}  # no text, time or gamma chunks


@pytest.mark.parametrize("option", ["sharpen", "saturation", "contrast", "brightness"])
def test_finishing_touches_change_pixels(option: str) -> None:
    plain = STAGES["postprocess"].run(plain_image(), params(), None, NoHooks())
    touched = STAGES["postprocess"].run(plain_image(), params(**{option: 2.0}), None, NoHooks())
    assert not np.array_equal(pixels_of(plain), pixels_of(touched))


# -- preprocess ----------------------------------------------------------------------------------


def prepared(data: bytes, **overrides: object) -> np.ndarray:
    return np.asarray(prepare_image(data, params(**overrides)))


def test_preprocess_output_matches_diffusers(photo: bytes) -> None:
    artifact = STAGES["preprocess"].run(photo, params(size="64x32"), None, NoHooks())
    assert isinstance(artifact, dict)
    image = artifact["image"]
    assert image.shape == (1, 3, 32, 64) and image.dtype == torch.float32
    processor = VaeImageProcessor(vae_scale_factor=2)  # what the tiny pipeline uses
    assert torch.equal(image, processor.preprocess(prepare_image(photo, params(size="64x32"))))


def test_cover_crop_keeps_the_centre() -> None:
    wide = Image.new("RGB", (300, 100), (0, 0, 0))
    wide.paste((255, 255, 255), (100, 0, 200, 100))  # white middle third
    pixels = prepared(png_bytes(wide), size="64x64")
    assert pixels.shape == (64, 64, 3) and pixels.min() > 240


def test_panorama_snaps_to_the_widest_bucket() -> None:
    panorama = Image.new("RGB", (800, 200), (255, 0, 0))  # 4:1
    panorama.paste((0, 0, 0), (200, 0, 600, 200))  # the middle half, which 2:1 keeps
    panorama.paste((255, 255, 255), (200, 0, 300, 200))  # the kept part's white left quarter
    pixels = prepared(png_bytes(panorama), size=128)
    assert pixels.shape == (64, 128, 3)
    # The red ends are cropped away; the resampling filter reads a pixel past each edge of the crop.
    assert pixels[:, 1:28].min() > 240 and pixels[:, 36:-1].max() < 15


def test_photos_of_mixed_aspects_share_a_few_shapes() -> None:
    expected = {  # input -> (height, width) at size 128
        (96, 64): (88, 128),  # 3:2
        (100, 64): (88, 128),  # 1.56:1, nearest 3:2
        (64, 96): (128, 88),  # 2:3
        (90, 64): (96, 128),  # 1.41:1, nearest 4:3
        (120, 64): (72, 128),  # 1.88:1, nearest 16:9
        (64, 64): (128, 128),
        (70, 64): (128, 128),  # 1.09:1, nearest 1:1
        (160, 64): (64, 128),  # 2.5:1, beyond the widest bucket, 2:1
    }
    for size, shape in expected.items():
        assert prepared(png_bytes(Image.new("RGB", size)), size=128).shape == (*shape, 3), size


def test_exif_rotated_portrait_stays_a_portrait() -> None:
    # Stored 96 wide and 64 high, with EXIF orientation 6: a viewer turns it 90 degrees.
    stored = Image.new("RGB", (96, 64), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif.tobytes())
    assert prepared(buffer.getvalue(), size=96).shape == (96, 64, 3)  # 64 wide, 96 high


def test_contain_pads_with_mid_grey() -> None:
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    pixels = prepared(png_bytes(wide), size="64x64", fit="contain")
    assert pixels.shape == (64, 64, 3)
    assert tuple(pixels[0, 32]) == tuple(pixels[63, 32]) == PAD_COLOUR  # bars above and below
    assert tuple(pixels[32, 0]) == tuple(pixels[32, 63]) == (255, 0, 0)  # the picture, all of it
    assert (pixels[:, :, 0] == 255).all(axis=1).sum() == 32


def test_stretch_keeps_everything_and_distorts() -> None:
    wide = Image.new("RGB", (200, 100), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 50, 100))  # a white left quarter
    pixels = prepared(png_bytes(wide), size="64x64", fit="stretch")
    assert pixels.shape == (64, 64, 3)
    assert pixels[:, :14].min() > 240 and pixels[:, 18:].max() < 15  # a quarter, still


def test_txt2img_size_is_square_or_exact(bundle: ModelBundle) -> None:
    for size, shape in ((48, (1, 4, 24, 24)), ("64x32", (1, 4, 16, 32))):
        noise = STAGES["noise_txt2img"].run(None, params(size=size), bundle, NoHooks())
        assert isinstance(noise, dict) and tuple(noise["latents"].shape) == shape


# -- the tiny model's renders depend on their input and strength ---------------------------------


def render(bundle: ModelBundle, data: bytes, strength: float) -> np.ndarray:
    job = params(size=128, steps=20, strength=strength, guidance=7.5)
    return pixels_of(run_stages(IMG2IMG, data, job, bundle)["postprocess"])


def test_tiny_renders_follow_input_and_strength(bundle: ModelBundle) -> None:
    from tests.helpers import sample_png

    inputs = [sample_png(128), sample_png(128, hue=150)]
    originals = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB"), np.int16) for d in inputs]
    distance = {
        s: np.abs(render(bundle, inputs[0], s) - originals[0]).mean() for s in (0.1, 0.5, 1.0)
    }
    assert distance[0.1] < 15  # low strength: close to the input (of 255; the VAE blurs edges)
    assert distance[0.1] < distance[0.5] < distance[1.0]
    other = render(bundle, inputs[1], 0.5)
    assert np.abs(render(bundle, inputs[0], 0.5) - other).mean() > 20  # inputs stay apart
