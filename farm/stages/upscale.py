"""The stages of ``upscale`` (farm.upscale): split, tile, blend.

Each tile is an img2img render of its part of the enlarged image at low strength. Two choices
make overlapping tiles agree, so the blend has little to hide:

- the tile's latents are the VAE's *mode*, not a sample: the same pixels encode alike in every
  tile that holds them (a sample would draw different noise per tile);
- its starting noise is cut from one noise field over the whole image, drawn from the job's
  seed: where tiles overlap they start from the same noise.

They still differ a little near their edges (the UNet sees different context there), which the
feathered blend fades out. Schedulers that draw noise on every step (euler_a) draw it per tile.
"""

from __future__ import annotations

import io

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from farm.errors import ArtifactCorrupt
from farm.models import ModelBundle
from farm.stages import decode, denoise
from farm.stages.base import (
    Artifact,
    StageHooks,
    Tensors,
    model_of,
    new_generator,
    to_artifact,
    to_model,
)
from farm.stages.noise import encode_prompt
from farm.stages.postprocess import finish, to_png
from farm.stages.preprocess import decode_image, to_tensor
from farm.stages.schedule import img2img_start, schedule
from farm.tiling import Box, tile_boxes
from farm.tiling import blend as feathered
from farm.upscale import scaled_size


def split(artifact: Artifact | None, params, model: ModelBundle | None, hooks: StageHooks) -> bytes:
    """Input bytes -> the enlarged picture, a PNG the tiles cut their parts from."""
    image = decode_image(bytes(artifact or b""))
    size = scaled_size(*image.size, params.scale)
    return to_png(image.resize(size, Image.Resampling.LANCZOS))


@torch.no_grad()
def tile(
    artifact: Artifact | None, params, model: ModelBundle | None, hooks: StageHooks
) -> Tensors:
    """The enlarged PNG -> this tile re-rendered: {"image": uint8, "box", "size"}."""
    bundle = model_of(model, "tile")
    image = _open_png(artifact)
    box = _my_box(hooks.stage, image.size, params)
    # 1. the tile's latents, and its part of the one noise field
    pixels = to_model(to_tensor(image.crop(box)), bundle)
    latents = bundle.vae.encode(pixels).latent_dist.mode() * bundle.vae.config.scaling_factor
    noise = _noise_field(bundle, params.seed, image.size)
    noise = _cut(noise, box, bundle.vae_scale_factor)
    # 2. noised to the first timestep of the shortened schedule
    t_start = img2img_start(params)
    scheduler, timesteps = schedule(bundle, params, t_start)
    latents = scheduler.add_noise(latents, noise, timesteps[:1].repeat(1))
    # 3. denoised and decoded by the stages every render runs
    noised = {
        "latents": to_artifact(latents),
        "prompt_embeds": to_artifact(encode_prompt(bundle, params)),
        "timesteps": to_artifact(timesteps),
        "t_start": torch.tensor(t_start, dtype=torch.int64),
        "rng_state": new_generator(params.seed).get_state(),
    }
    rendered = decode.run(denoise.run(noised, params, bundle, hooks), params, bundle, hooks)
    return {
        "image": rendered["image"],
        "box": torch.tensor(box, dtype=torch.int64),
        "size": torch.tensor(image.size, dtype=torch.int64),
    }


def blend(
    artifacts: Artifact | None, params, model: ModelBundle | None, hooks: StageHooks
) -> bytes:
    """Every tile -> the finished PNG, tiles feathered into each other across their overlap."""
    tiles = list(artifacts.values()) if isinstance(artifacts, dict) else []
    if not tiles:
        raise ArtifactCorrupt("blend was given no tiles")
    width, height = (int(side) for side in tiles[0]["size"])
    expected = tile_boxes(width, height, params.size, params.overlap)
    placed = [(Box(*map(int, t["box"])), t["image"][0].permute(1, 2, 0).numpy()) for t in tiles]
    if sorted(box for box, _ in placed) != sorted(expected):
        raise ArtifactCorrupt(f"blend got {len(placed)} tiles that do not cover the image")
    joined = Image.fromarray(feathered(placed, width, height))
    return to_png(finish(joined, params))


def _open_png(data: Artifact | None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data if isinstance(data, bytes) else b""), formats=["PNG"])
        return image.convert("RGB")
    except Exception as exc:  # Pillow's many errors on damaged bytes
        raise ArtifactCorrupt(f"the split image does not open as a PNG ({exc})") from exc


def _my_box(stage: str, size: tuple[int, int], params) -> Box:
    """The box of stage ``tile-i``: the i-th of the layout, as at submit."""
    boxes = tile_boxes(*size, params.size, params.overlap)
    number = stage.rpartition("-")[2]
    index = int(number) if number.isdigit() else -1
    if not 0 <= index < len(boxes):
        raise ArtifactCorrupt(f"stage {stage}: the image has tiles 0 to {len(boxes) - 1}")
    return boxes[index]


def _noise_field(bundle: ModelBundle, seed: int, size: tuple[int, int]) -> torch.Tensor:
    """Noise over the whole image's latent, the same for every tile of the job."""
    scale = bundle.vae_scale_factor
    shape = (1, bundle.unet.config.in_channels, size[1] // scale, size[0] // scale)
    return randn_tensor(
        shape, generator=new_generator(seed), device=bundle.device, dtype=bundle.dtype
    )


def _cut(field: torch.Tensor, box: Box, scale: int) -> torch.Tensor:
    part = field[
        ..., box.top // scale : box.bottom // scale, box.left // scale : box.right // scale
    ]
    return part.contiguous(memory_format=torch.channels_last)
