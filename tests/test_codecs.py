"""Tensor checkpoints and PNGs survive the artifact store's bytes exactly, or fail clearly."""

from __future__ import annotations

import pytest
import torch

from farm.errors import FarmError
from farm.storage.codecs import MAGIC, decode_tensors, encode_tensors


def assert_same(decoded: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    assert decoded.keys() == original.keys()
    for name, tensor in original.items():
        assert decoded[name].dtype == tensor.dtype
        assert decoded[name].device.type == "cpu"
        assert torch.equal(decoded[name], tensor.detach().cpu()), name


def test_mixed_dtypes_round_trip_exactly() -> None:
    generator = torch.Generator().manual_seed(7)
    tensors = {
        "latents": torch.randn(1, 4, 8, 8, generator=generator),
        "embeds": torch.randn(1, 77, 32, generator=generator).half(),
        "bf16": torch.randn(3, generator=generator).bfloat16(),
        "step": torch.tensor(12, dtype=torch.int64),
        "rng_state": generator.get_state(),
        "mask": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
    }
    decoded = decode_tensors(encode_tensors(tensors))
    assert_same(decoded, tensors)
    assert decoded["step"].shape == ()
    restored = torch.Generator().set_state(decoded["rng_state"])
    assert torch.equal(torch.randn(5, generator=restored), torch.randn(5, generator=generator))


def test_views_and_shared_storage_are_saved_as_values() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    cond, uncond = torch.randn(2, 5, 3).chunk(2)
    tensors = {
        "transposed": base.t(),
        "strided": base[:, ::2],
        "same": base,
        "again": base,
        "cond": cond,
        "uncond": uncond,
        "grad": torch.ones(2, requires_grad=True) * 2,
    }
    assert not tensors["transposed"].is_contiguous()
    assert_same(decode_tensors(encode_tensors(tensors)), tensors)


def test_encoding_is_deterministic() -> None:
    tensors = {"a": torch.randn(16, 16), "b": torch.arange(10)}
    assert encode_tensors(tensors) == encode_tensors(dict(tensors))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a checkpoint at all",
        b"\x28\xb5\x2f\xfd" + b"\x00" * 40,  # a zstd magic without the farm header
        MAGIC + b"garbage after the header",
    ],
)
def test_garbage_is_artifact_corrupt(data: bytes) -> None:
    with pytest.raises(FarmError) as info:
        decode_tensors(data)
    assert info.value.code == "ARTIFACT_CORRUPT"


def test_damaged_checkpoint_is_artifact_corrupt() -> None:
    data = bytearray(encode_tensors({"x": torch.randn(64, 64)}))
    truncated = bytes(data[: len(data) // 2])
    data[len(data) // 2] ^= 0xFF
    for damaged in (truncated, bytes(data)):
        with pytest.raises(FarmError) as info:
            decode_tensors(damaged)
        assert info.value.code == "ARTIFACT_CORRUPT"


def test_non_tensor_values_are_refused() -> None:
    with pytest.raises(TypeError, match="steps"):
        encode_tensors({"steps": 30})  # type: ignore[dict-item]
