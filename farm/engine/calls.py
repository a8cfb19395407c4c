"""Model calls from many jobs as one call: what may share a call, and how rows go in and out.

A stage calls its bundle's components as diffusers' own pipelines do:

- ``unet(sample, timestep, encoder_hidden_states=embeds, return_dict=False)[0]``: the jobs'
  rows are concatenated and each row gets its own job's timestep (a ``[B]`` timestep tensor,
  which the UNet embeds row by row); each job gets its rows of the noise prediction back, and
  its own guidance and scheduler step stay in its own stage.
- ``vae.encode(image).latent_dist``: one encode; each job samples its own rows of the
  distribution with its own generator.
- ``vae.decode(latents, return_dict=False)[0]`` and ``text_encoder(input_ids)[0]``: rows in,
  rows out.

Calls share a model call when their component and the shapes past the batch dimension match
(``Call.key``): a 512x512 job and a 512x384 one do not (aspect buckets, farm.buckets, keep a
mixed folder to a few shapes). A call alone runs exactly as the stage made it, so with one job
per call (FARM_GPU_BATCH=1) the engine is bit-exact with diffusers; batched kernels round
differently, by the bound the README states.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from transformers.modeling_outputs import BaseModelOutputWithPooling

from farm.models import ModelBundle

if TYPE_CHECKING:
    from farm.engine.core import Engine, Member


@dataclasses.dataclass(eq=False)
class Call:
    """One job's call of one model component, waiting for its rows of a batched call."""

    name: str  # the component: unet, vae.encode, vae.decode, text_encoder
    key: tuple | None  # calls with equal (name, key) may share one model call; None: never
    alone: Callable[[], Any]  # the call exactly as the stage made it
    rows: Sequence[torch.Tensor]  # the inputs whose first dimension is the batch
    batched: Callable[[list[Call]], list[Any]] | None = None
    loops: bool = False  # the caller will call again at once (a denoise loop)
    member: Member | None = None
    _done: threading.Event = dataclasses.field(default_factory=threading.Event)
    _answer: Any = None
    _error: BaseException | None = None

    def shares_with(self, other: Call) -> bool:
        return other is self or (
            self.key is not None and self.name == other.name and self.key == other.key
        )

    @property
    def settled(self) -> bool:
        return self._done.is_set()

    @property
    def size(self) -> int:
        return self.rows[0].shape[0]

    def answer(self, value: Any) -> None:
        self._answer = value
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def wait(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._answer


def run(tick: list[Call]) -> list[Any]:
    """The answers of one tick's calls: alone, exactly as made; else one batched call."""
    if len(tick) == 1:
        return [tick[0].alone()]
    return tick[0].batched(tick)


def out_of_memory_message(call: Call) -> str:
    shape = "x".join(str(side) for side in call.rows[0].shape)
    return (
        f"the GPU ran out of memory in {call.name} with this job alone in the batch (input "
        f"{shape}); lower its size, or turn guidance off (guidance 1) to halve its rows, or "
        "run it on a GPU with more free memory"
    )


# -- the components ----------------------------------------------------------------------------


def _shape_key(module: Any, *tensors: torch.Tensor) -> tuple:
    """What must match for rows to be concatenated: the module itself (one model), and the
    shapes past the batch, dtypes and layouts of its inputs."""
    return (id(module), *((tuple(t.shape[1:]), t.dtype, _channels_last(t)) for t in tensors))


def _channels_last(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    joined = torch.cat(list(tensors))
    if _channels_last(tensors[0]):  # keep the layout the stages compute in (farm.stages.base)
        joined = joined.contiguous(memory_format=torch.channels_last)
    return joined


def _split(batch: torch.Tensor, tick: list[Call]) -> list[torch.Tensor]:
    return list(batch.split([call.size for call in tick]))


class _Proxy:
    """A model component whose calls go through the engine; everything else is the module's."""

    def __init__(self, module: Any, engine: Engine) -> None:
        self._module, self._engine = module, engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class UNet(_Proxy):
    def __call__(
        self, sample, timestep, encoder_hidden_states=None, return_dict: bool = True, **extra
    ):
        unet = self._module
        extra = {name: value for name, value in extra.items() if value is not None}

        def alone():
            return unet(sample, timestep, encoder_hidden_states, return_dict=False, **extra)[0]

        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        one_per_row = timesteps.numel() in (1, sample.shape[0])
        batchable = not extra and encoder_hidden_states is not None and one_per_row
        key = _shape_key(unet, sample, encoder_hidden_states) if batchable else None
        rows = (sample, timesteps.float().expand(sample.shape[0]), encoder_hidden_states)
        call = Call("unet", key, alone, rows, self._batched, loops=True)
        noise = self._engine.submit(call)
        return UNet2DConditionOutput(sample=noise) if return_dict else (noise,)

    def _batched(self, tick: list[Call]) -> list[torch.Tensor]:
        sample, timesteps, embeds = (_cat([c.rows[i] for c in tick]) for i in range(3))
        noise = self._module(sample, timesteps, encoder_hidden_states=embeds, return_dict=False)
        return _split(noise[0], tick)


class Vae(_Proxy):
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        vae = self._module
        key = _shape_key(vae, x)
        call = Call(
            "vae.encode", key, lambda: vae.encode(x).latent_dist, (x,), self._encode_batched
        )
        dist = self._engine.submit(call)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def _encode_batched(self, tick: list[Call]) -> list[DiagonalGaussianDistribution]:
        moments = self._module.encode(_cat([c.rows[0] for c in tick])).latent_dist.parameters
        return [DiagonalGaussianDistribution(rows) for rows in _split(moments, tick)]

    def decode(self, z: torch.Tensor, return_dict: bool = True, **extra):
        vae = self._module

        def alone():
            return vae.decode(z, return_dict=False, **extra)[0]

        key = None if extra else _shape_key(vae, z)
        call = Call("vae.decode", key, alone, (z,), self._decode_batched)
        image = self._engine.submit(call)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def _decode_batched(self, tick: list[Call]) -> list[torch.Tensor]:
        image = self._module.decode(_cat([c.rows[0] for c in tick]), return_dict=False)[0]
        return _split(image, tick)


class TextEncoder(_Proxy):
    """``text_encoder(input_ids, attention_mask=...)`` as encode_prompt makes it: its rows of
    the hidden states and the pooled output."""

    def __call__(self, input_ids: torch.Tensor, attention_mask=None, **extra):
        encoder = self._module

        def alone():
            return encoder(input_ids, attention_mask=attention_mask, **extra)

        batchable = not extra and attention_mask is None
        key = _shape_key(encoder, input_ids) if batchable else None
        call = Call("text_encoder", key, alone, (input_ids,), self._batched)
        return self._engine.submit(call)

    def _batched(self, tick: list[Call]) -> list[BaseModelOutputWithPooling]:
        out = self._module(_cat([c.rows[0] for c in tick]))
        hidden, pooled = _split(out[0], tick), _split(out[1], tick)
        return [
            BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=p)
            for h, p in zip(hidden, pooled, strict=True)
        ]


class Tokenizer(_Proxy):
    """One tokenization at a time. A fast (Rust) tokenizer sets padding and truncation on its
    shared backend before each encode, so two job threads tokenizing at once pad each other's
    prompts: encode_prompt's "longest" probe made a negative prompt 2 tokens long, not 77."""

    def __init__(self, module: Any, engine: Engine) -> None:
        super().__init__(module, engine)
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._module(*args, **kwargs)


def wrap(bundle: ModelBundle, engine: Engine) -> ModelBundle:
    """The bundle as job threads share it: model calls through the engine, the tokenizer
    one call at a time."""
    return dataclasses.replace(
        bundle,
        unet=UNet(bundle.unet, engine),
        vae=Vae(bundle.vae, engine),
        text_encoder=TextEncoder(bundle.text_encoder, engine),
        tokenizer=Tokenizer(bundle.tokenizer, engine),
    )
