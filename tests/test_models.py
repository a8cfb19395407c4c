"""Model loading: the tiny model is built once, saved, and loaded offline like a real one."""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from farm.errors import ModelError
from farm.models import (
    SCHEDULERS,
    TINY_MODEL_SUBDIR,
    ModelBundle,
    build_tiny_pipeline,
    ensure_tiny_model,
    load_model,
    make_scheduler,
)
from farm.models.loader import MIN_VOCAB_SIZE, _publish
from farm.models.tiny_weights import pictures
from farm.native_size import FALLBACK_SIZE, TINY_NATIVE_SIZE, native_size
from farm.params import SCHEDULER_NAMES

# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def models_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("models-data")
    ensure_tiny_model(data_dir)
    return data_dir


@pytest.fixture(scope="session")
def tiny(models_data_dir: Path) -> ModelBundle:
    return load_model(None, models_data_dir, device="cpu")


@pytest.fixture
def model_copy(models_data_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the saved tiny model, free to damage."""
    copy = tmp_path / "model"
    shutil.copytree(models_data_dir / TINY_MODEL_SUBDIR, copy)
    return copy


# -- tests ---------------------------------------------------------------------------------------


def test_tiny_model_is_saved_and_loaded_offline(tmp_path: Path, no_network: None) -> None:
    bundle = load_model(None, tmp_path)
    folder = tmp_path / TINY_MODEL_SUBDIR
    assert bundle.path == folder.resolve()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tiny-sd-")]
    assert (bundle.device, bundle.dtype) == (torch.device("cpu"), torch.float32)


def test_loaded_model_is_usable(tiny: ModelBundle) -> None:
    assert len(tiny.tokenizer) > MIN_VOCAB_SIZE
    assert tiny.tokenizer.model_max_length == 77
    tokens = tiny.tokenizer.tokenize("a painting of a cat")
    assert tokens == ["a</w>", "painting</w>", "of</w>", "a</w>", "cat</w>"]
    assert tiny.vae_scale_factor == 2
    assert not (tiny.unet.training or tiny.vae.training or tiny.text_encoder.training)
    assert tiny.scheduler_config["steps_offset"] == 1


def test_load_is_cached_per_process(models_data_dir: Path, tiny: ModelBundle) -> None:
    assert load_model(None, models_data_dir, device="cpu") is tiny
    path = models_data_dir / TINY_MODEL_SUBDIR
    assert load_model(path, models_data_dir, device="cpu") is tiny


def test_second_ensure_reuses_the_folder(models_data_dir: Path) -> None:
    index = models_data_dir / TINY_MODEL_SUBDIR / "model_index.json"
    before = index.stat().st_mtime_ns
    assert ensure_tiny_model(models_data_dir) == index.parent
    assert index.stat().st_mtime_ns == before


def test_racing_builders_leave_one_complete_model(tmp_path: Path) -> None:
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_tiny_model(tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / TINY_MODEL_SUBDIR] * 3
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [TINY_MODEL_SUBDIR.name]
    loaded = load_model(None, tmp_path, device="cpu").unet.state_dict()
    for name, tensor in build_tiny_pipeline().unet.state_dict().items():
        assert torch.equal(tensor, loaded[name]), name


def test_losing_a_race_keeps_the_winner(model_copy: Path, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    shutil.copytree(model_copy, staging)
    _publish(staging, model_copy)  # target already complete: not an error
    assert (model_copy / "model_index.json").is_file()


def test_a_foreign_folder_in_the_way_is_an_error(model_copy: Path, tmp_path: Path) -> None:
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "notes.txt").write_text("not a model")
    with pytest.raises(ModelError, match="not a complete model"):
        _publish(model_copy, target)


def test_tiny_weights_are_fixed_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first, second = build_tiny_pipeline(), build_tiny_pipeline()
    assert torch.rand(1) == expected
    for name, tensor in first.unet.state_dict().items():
        assert torch.equal(tensor, second.unet.state_dict()[name]), name


def test_missing_folder_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nowhere", tmp_path, device="cpu")


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelError, match="lacks vae, text_encoder, tokenizer, scheduler"):
        load_model(tmp_path, tmp_path, device="cpu")


def test_empty_component_folders_are_a_model_error(tmp_path: Path) -> None:
    for name in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / name).mkdir()
    with pytest.raises(ModelError, match="could not load"):
        load_model(tmp_path, tmp_path, device="cpu")


def test_degraded_tokenizer_is_refused(model_copy: Path) -> None:
    shutil.rmtree(model_copy / "tokenizer")
    CLIPTokenizer().save_pretrained(model_copy / "tokenizer")  # 3 tokens, like the offline trap
    with pytest.raises(ModelError, match="tokenizer degraded"):
        load_model(model_copy, model_copy, device="cpu")


def test_scheduler_names_match_params() -> None:
    assert set(SCHEDULERS) == set(SCHEDULER_NAMES)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_make_scheduler_is_fresh_and_pipeline_ready(tiny: ModelBundle, name: str) -> None:
    scheduler = make_scheduler(tiny, name)
    assert isinstance(scheduler, SCHEDULERS[name])
    assert scheduler is not make_scheduler(tiny, name)
    assert scheduler.config.get("steps_offset", 1) == 1
    assert scheduler.config.get("clip_sample", False) is False


# -- native size and the tiny model's weights -----------------------------------------------------


def test_native_size_is_read_from_the_folder(model_copy: Path, tmp_path: Path) -> None:
    assert native_size(model_copy) == TINY_NATIVE_SIZE == 128  # 64 latent x 2
    assert native_size(None) == TINY_NATIVE_SIZE
    assert native_size(tmp_path / "nowhere") == FALLBACK_SIZE
    config = model_copy / "unet" / "config.json"
    config.write_text(config.read_text().replace('"sample_size": 64', '"sample_size": 96'))
    assert native_size(model_copy) == 192


def test_native_size_needs_no_torch() -> None:
    import subprocess
    import sys

    code = "import farm.api, sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_tiny_vae_round_trips_pictures(tiny: ModelBundle) -> None:
    images = pictures(4, 128, torch.Generator().manual_seed(7))
    with torch.no_grad():
        posterior = tiny.vae.encode(images).latent_dist
        decoded = tiny.vae.decode(posterior.sample(torch.Generator().manual_seed(1))).sample
    assert posterior.std.max() < 1e-6  # a point posterior: sampling returns the mean
    assert (decoded - images).abs().mean() * 127.5 < 6  # of 255: half resolution blurs edges
    latents = posterior.mean * tiny.vae.config.scaling_factor
    assert 0.7 < latents.std() < 1.4  # scaled to about unit variance, as SD's latents are


def test_tiny_prompt_changes_nothing(tiny: ModelBundle) -> None:
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    outputs = [
        tiny.unet(latents, 500, encoder_hidden_states=torch.randn(1, 77, 32) * scale).sample
        for scale in (0.0, 1.0)
    ]
    assert torch.equal(*outputs)


def test_a_new_data_dir_gets_the_cached_build(tiny_model, tmp_path) -> None:
    from farm.models.loader import ensure_tiny_model, tiny_model_cache

    copy = ensure_tiny_model(tmp_path)
    files = sorted(p.relative_to(tiny_model) for p in tiny_model.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file())
    assert all((copy / f).read_bytes() == (tiny_model / f).read_bytes() for f in files)
    assert tiny_model_cache().is_dir()
