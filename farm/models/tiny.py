"""A tiny Stable-Diffusion-architecture pipeline whose renders follow their input.

The components are SD's (AutoencoderKL, UNet2DConditionModel, CLIP text encoder, PNDM), small
enough for a CPU, so the farm exercises the real SD code paths without downloading anything.
Their weights come from farm.models.tiny_weights: the VAE set by hand (2x2 colour means in,
bilinear 2x out), the UNet trained briefly and deterministically on noise prediction, the
prompt silenced. The VAE has two blocks, so it downsamples by 2, not 8: the native 128 px has
the same 64x64 latent as SD-1.5 at 512 px. The UNet has three levels with attention only at
the lowest, so a 128 px step costs about a tenth of a second on a CPU core.

The tokenizer is built from an in-memory byte-level vocabulary: loading diffusers' test tokenizer
by hub name offline does not fail, it silently returns a 2-token vocabulary.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from farm.models.tiny_weights import make_tiny_weights
from farm.native_size import TINY_NATIVE_SIZE

SEED = 0
VAE_SCALE_FACTOR = 2  # two VAE blocks: one downsampling
TEXT_VOCAB_SIZE = 1000  # embedding rows; the tokenizer uses the first ~550 ids
# Whole-word tokens, so a demo prompt reads as words rather than letters when tokenized.
WORDS = ("a", "painting", "photo", "of", "the", "cat", "dog", "city", "forest", "sunset")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_BUILD_LOCK = threading.Lock()


def tiny_build_digest() -> str:
    """A hash of what decides the tiny model's weights: the code that builds and trains it, and
    the torch and diffusers versions it runs on. A cached build is reused only while it holds."""
    import diffusers

    from farm.models import tiny_weights

    digest = hashlib.sha256(f"{torch.__version__}|{diffusers.__version__}".encode())
    for module in (__file__, tiny_weights.__file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()


def build_tiny_pipeline() -> StableDiffusionImg2ImgPipeline:
    """The tiny img2img pipeline, trained; the same weights on every call, in eval mode."""
    # Layers draw their initial weights from torch's global RNG: fork it so the caller's stream
    # is untouched, and hold a lock so two threads building at once cannot interleave draws.
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        unet_weights, vae_weights, scaling_factor = _trained_weights()
        unet, vae, text_encoder = _initial_modules()
    unet.load_state_dict(unet_weights)
    vae.load_state_dict(vae_weights)
    vae.register_to_config(scaling_factor=scaling_factor)
    # Freshly built modules are in train mode; only eval mode round-trips bit-exactly.
    for module in (unet, vae, text_encoder):
        module.eval()
    return StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tiny_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _initial_modules() -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    torch.manual_seed(SEED)
    unet = _unet()
    torch.manual_seed(SEED)
    vae = _vae()
    torch.manual_seed(SEED)
    return unet, vae, _text_encoder()


@functools.cache  # training takes about a minute: a process does it once, however many builds
def _trained_weights() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    unet, vae, _ = _initial_modules()
    with _one_thread():
        make_tiny_weights(vae, unet, _scheduler())
    return unet.state_dict(), vae.state_dict(), float(vae.config.scaling_factor)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one thread: CPU reductions may sum in another order on another thread count,
    and on a busy two-core machine one thread is also the faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _scheduler() -> PNDMScheduler:
    # steps_offset=1 is what the pipeline would rewrite a 0 to (with a FutureWarning).
    return PNDMScheduler(skip_prk_steps=True, steps_offset=1)


def _unet() -> UNet2DConditionModel:
    # Attention only at the lowest of three levels: at 128 px a 32x32-token self-attention
    # would cost four times the rest of the UNet on a CPU.
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        sample_size=TINY_NATIVE_SIZE // VAE_SCALE_FACTOR,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,  # groups of 4 or 8 channels: room for farm.models.tiny_weights
    )


def _text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=TEXT_VOCAB_SIZE,
    )
    return CLIPTextModel(config)


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer: every byte, every byte ending a word, and a few words."""
    alphabet = sorted(ByteLevel.alphabet())
    tokens = [*alphabet, *(char + "</w>" for char in alphabet)]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        _merge_word(word, tokens, merges)
    vocab = {token: index for index, token in enumerate([*tokens, BOS, EOS])}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _merge_word(word: str, tokens: list[str], merges: list[tuple[str, str]]) -> None:
    """Merge ``word`` left to right into one ``word</w>`` token, adding what is missing."""
    done = word[0] if len(word) > 1 else word[0] + "</w>"
    for index, char in enumerate(word[1:], start=2):
        piece = char + "</w>" if index == len(word) else char
        if (done, piece) not in merges:
            merges.append((done, piece))
        done += piece
        if done not in tokens:
            tokens.append(done)
