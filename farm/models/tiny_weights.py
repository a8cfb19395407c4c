"""How the tiny model gets weights that make its renders depend on their input (no downloads).

Random weights make an autoencoder that returns the same noise whatever it is given. So:

1. **VAE: set by hand, exactly.** The encoder averages each 2x2 block of pixels (latent channels
   0-2: red, green, blue; 3: their luminance), the decoder upsamples bilinearly, so
   ``decode(encode(x))`` is ``x`` at half resolution. Every residual branch and attention output
   is zero, so the blocks pass their input through. The one nonlinear step on the main path is
   ``GroupNorm -> SiLU`` before each ``conv_out``; it is made linear by carrying each colour in
   a group as a (+value, -value) pair beside a constant channel, so every group's mean and
   spread are fixed, and by shifting the values where SiLU is the identity. The posterior's
   log-variance is the lowest diffusers allows (-30): sampling it returns the mean.
   ``scaling_factor`` is, as for SD, one over the standard deviation of the latents.
2. **UNet: trained briefly on the DDPM objective** SD is trained with: epsilon prediction on the
   latents of procedurally drawn pictures (colour gradients, discs, boxes, stripes, soft cloudy
   noise) under the scheduler's own noise schedule. A step removes roughly the noise it was
   given, so low strength stays near the input and high strength drifts to what the UNet
   learned. The tiny model does not understand text: its cross-attention output projections
   are zero and stay zero, so the prompt (and with it guidance) leaves the picture unchanged.

Everything is seeded and trains on one CPU thread: on a given machine the weights are the same
every time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel

SEED = 0
CROP = 32  # training pictures are small: the UNet is convolutional, its attention local enough
UNET_STEPS, UNET_BATCH, UNET_LR = 250, 16, 2e-3
LOGVAR_MIN = -30.0  # DiagonalGaussianDistribution clamps the log-variance to [-30, 20]
CARRIER = 40.0  # the constant channel of each group; large next to pixel values in [-1, 1]
SHIFT = 10.0  # SiLU(x) = x within 5e-4 for x >= 10 - 1
LUMA = (0.299, 0.587, 0.114)


def make_tiny_weights(vae: AutoencoderKL, unet: UNet2DConditionModel, scheduler: SchedulerMixin):
    """Set ``vae`` by hand, then train ``unet`` on its latents; both end in eval mode."""
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        set_vae(vae)
        latents = vae.encode(pictures(64, CROP, generator)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    vae.eval()
    train_unet(unet, vae, scheduler, generator)


# -- pictures ------------------------------------------------------------------------------------


def pictures(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 3, size, size) in [-1, 1]: a gradient, soft noise, stripes, a few shapes."""
    axis = torch.linspace(0, 1, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(count, *shape, generator=generator)

    # 1. a linear gradient between two colours, in a random direction
    angle = uniform(1, 1) * 2 * math.pi
    ramp = x * angle.cos() + y * angle.sin()
    low, high = ramp.amin((1, 2), keepdim=True), ramp.amax((1, 2), keepdim=True)
    ramp = ((ramp - low) / (high - low)).unsqueeze(1)
    image = uniform(3, 1, 1) + (uniform(3, 1, 1) - uniform(3, 1, 1)) * ramp
    # 2. soft cloudy noise: a coarse random grid, upsampled
    coarse = torch.rand(count, 3, 4, 4, generator=generator) - 0.5
    clouds = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    image = image + clouds * uniform(1, 1, 1) * 0.6
    # 3. stripes on about a third of the pictures
    frequency = 2 + uniform(1, 1) * 10
    stripes = torch.sin(2 * math.pi * frequency * (x * angle.sin() - y * angle.cos())) > 0
    striped = (uniform(1, 1) < 0.33) & stripes
    image = torch.where(striped.unsqueeze(1), uniform(3, 1, 1), image)
    # 4. three shapes, each a disc, a box, or absent
    for _ in range(3):
        centre_x, centre_y, radius = uniform(1, 1), uniform(1, 1), 0.05 + uniform(1, 1) * 0.3
        disc = (x - centre_x) ** 2 + (y - centre_y) ** 2 < radius**2
        box = ((x - centre_x).abs() < radius) & ((y - centre_y).abs() < radius * 1.5)
        kind = uniform(1, 1)
        mask = torch.where(kind < 0.4, disc, box) & (kind < 0.8)
        image = torch.where(mask.unsqueeze(1), uniform(3, 1, 1), image)
    return (image.clamp(0, 1) * 2 - 1).contiguous()


# -- the VAE, by hand ----------------------------------------------------------------------------
#
# Layout of a feature map with C channels in G groups (g = C / G channels each): group c < 3
# carries colour c as channels (c*g: CARRIER, c*g + 1: +value, c*g + 2: -value); all other
# channels are 0. Each group's channels then sum to CARRIER at every pixel, whatever the picture.


def set_vae(vae: AutoencoderKL) -> None:
    encoder, decoder = vae.encoder, vae.decoder
    for module in vae.modules():
        _silence_branch(module)
    # encoder: pixels -> carried colours -> 2x2 means -> latents
    _carry_in(encoder.conv_in, [[(c, 1.0)] for c in range(3)], _groups(encoder.conv_in, vae))
    _spatial(encoder.down_blocks[0].downsamplers[0].conv, _box_2x2(), vae)
    _regroup(encoder.down_blocks[1].resnets[0].conv_shortcut, vae)
    _linearize(encoder.conv_norm_out)
    means = [[(c, 1.0)] for c in range(3)] + [[(c, w) for c, w in enumerate(LUMA)]]
    _carry_out(encoder.conv_out, means, encoder.conv_norm_out, LOGVAR_MIN)
    _identity(vae.quant_conv)
    _identity(vae.post_quant_conv)
    # decoder: latents -> carried colours -> bilinear 2x -> pixels
    _carry_in(decoder.conv_in, [[(c, 1.0)] for c in range(3)], _groups(decoder.conv_in, vae))
    _spatial(decoder.up_blocks[0].upsamplers[0].conv, _bilinear(), vae)
    _regroup(decoder.up_blocks[1].resnets[0].conv_shortcut, vae)
    _linearize(decoder.conv_norm_out)
    _carry_out(decoder.conv_out, [[(c, 1.0)] for c in range(3)], decoder.conv_norm_out, None)


def _silence_branch(module: torch.nn.Module) -> None:
    """A ResNet block's residual branch and an attention's output are zero: they pass through."""
    kind = type(module).__name__
    if kind == "ResnetBlock2D":
        last = module.conv2
    elif kind == "Attention":
        last = module.to_out[0]
    else:
        return
    last.weight.zero_()
    last.bias.zero_()


def _groups(conv: torch.nn.Conv2d, vae: AutoencoderKL) -> int:
    return conv.out_channels // vae.config.norm_num_groups


def _carry_in(conv: torch.nn.Conv2d, sources: list[list[tuple[int, float]]], size: int) -> None:
    """Output group c carries sum(w * input[i] for i, w in sources[c]) (centre tap only)."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.kernel_size[0] // 2
    for group, terms in enumerate(sources):
        conv.bias[group * size] = CARRIER
        for channel, weight in terms:
            conv.weight[group * size + 1, channel, centre, centre] = weight
            conv.weight[group * size + 2, channel, centre, centre] = -weight


def _spatial(conv: torch.nn.Conv2d, kernel: torch.Tensor, vae: AutoencoderKL) -> None:
    """Filter every carried value with ``kernel``; the carriers stay constant (bias, no taps,
    so zero padding at the border cannot dent them)."""
    size = _groups(conv, vae)
    conv.weight.zero_()
    conv.bias.zero_()
    for group in range(3):
        conv.bias[group * size] = CARRIER
        for offset in (1, 2):
            channel = group * size + offset
            conv.weight[channel, channel] = kernel


def _box_2x2() -> torch.Tensor:
    """The mean of a 2x2 block: Downsample2D pads right and bottom, then strides by 2."""
    kernel = torch.zeros(3, 3)
    kernel[:2, :2] = 0.25
    return kernel


def _bilinear() -> torch.Tensor:
    """After Upsample2D's nearest 2x, [1, 2, 1] / 4 in each direction is bilinear 2x."""
    taps = torch.tensor([1.0, 2.0, 1.0]) / 4
    return torch.outer(taps, taps)


def _regroup(conv: torch.nn.Conv2d, vae: AutoencoderKL) -> None:
    """A 1x1 shortcut between channel counts: move each group's channels to their new place."""
    groups = vae.config.norm_num_groups
    size_in, size_out = conv.in_channels // groups, conv.out_channels // groups
    conv.weight.zero_()
    conv.bias.zero_()
    for group in range(3):
        for offset in range(3):
            conv.weight[group * size_out + offset, group * size_in + offset, 0, 0] = 1.0


def _linearize(norm: torch.nn.GroupNorm) -> None:
    """Undo the group's fixed mean and spread, then shift by SHIFT, where SiLU is linear."""
    size = norm.num_channels // norm.num_groups
    mean = CARRIER / size
    spread = math.sqrt(CARRIER**2 / size - mean**2)
    norm.weight.fill_(spread)
    norm.bias.fill_(mean + SHIFT)


def _carry_out(
    conv: torch.nn.Conv2d,
    sums: list[list[tuple[int, float]]],
    norm: torch.nn.GroupNorm,
    logvar: float | None,
) -> None:
    """Output k = sum(w * colour c for c, w in sums[k]); each colour read as (+ - -) / 2, which
    cancels SHIFT. Outputs past ``sums`` (the log-variance) are the constant ``logvar``."""
    size = norm.num_channels // norm.num_groups
    centre = conv.kernel_size[0] // 2
    conv.weight.zero_()
    conv.bias.zero_()
    for output, terms in enumerate(sums):
        for colour, weight in terms:
            conv.weight[output, colour * size + 1, centre, centre] = weight / 2
            conv.weight[output, colour * size + 2, centre, centre] = -weight / 2
    if logvar is not None:
        conv.bias[len(sums) :] = logvar


def _identity(conv: torch.nn.Conv2d) -> None:
    conv.weight.zero_()
    conv.bias.zero_()
    for channel in range(conv.out_channels):
        conv.weight[channel, channel, 0, 0] = 1.0


# -- the UNet, trained ---------------------------------------------------------------------------


def train_unet(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    scheduler: SchedulerMixin,
    generator: torch.Generator,
) -> None:
    _silence_text(unet)
    with torch.no_grad():  # start from "no noise here": the sampler then leaves latents alone
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.zero_()
    # With the text silenced the context's values do not matter, only its shape.
    context = torch.zeros(UNET_BATCH, 1, unet.config.cross_attention_dim)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=UNET_LR)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, UNET_LR, total_steps=UNET_STEPS)
    unet.train()
    for _ in range(UNET_STEPS):
        with torch.no_grad():
            latents = vae.encode(pictures(UNET_BATCH, CROP, generator)).latent_dist.mean
            latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (UNET_BATCH,), generator=generator
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        predicted = unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = F.mse_loss(predicted, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    unet.eval()
    unet.requires_grad_(True)


def _silence_text(unet: UNet2DConditionModel) -> None:
    """Zero and freeze every cross-attention output projection: the prompt changes nothing."""
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            projection = module.to_out[0]
            with torch.no_grad():
                projection.weight.zero_()
                projection.bias.zero_()
            projection.requires_grad_(False)
