"""The script stage's language model: built once, loaded like a real one, seeded narrations."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from farm.errors import InvalidParameter, ModelError
from farm.models import text
from farm.models.text import (
    TEXT_MODEL_SUBDIR,
    WORDS,
    TextModel,
    ensure_tiny_text_model,
    load_text_model,
)

PROMPT = "A lighthouse keeper watches the storm roll in over the grey sea."
WEIGHTS = "model.safetensors"

# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def text_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("text-data")
    ensure_tiny_text_model(data_dir)
    return data_dir


@pytest.fixture(scope="session")
def tiny(text_data_dir: Path) -> TextModel:
    return load_text_model(None, text_data_dir)


@pytest.fixture
def model_copy(text_data_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the saved tiny model, free to damage (and loaded apart: a new path)."""
    copy = tmp_path / "model"
    shutil.copytree(text_data_dir / "models" / TEXT_MODEL_SUBDIR, copy)
    return copy


def real_style_folder(folder: Path) -> Path:
    """What a user's FARM_TEXT_MODEL holds: a GPT-2 with a byte-level BPE tokenizer, both saved
    with save_pretrained; trained on nothing, as no test may download one."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [PROMPT, "The quick brown fox jumps over the lazy dog."] * 10,
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- building and loading ------------------------------------------------------------------------


def test_tiny_model_is_saved_and_loaded_like_a_real_one(tmp_path: Path) -> None:
    model = load_text_model(None, tmp_path)
    folder = tmp_path / "models" / TEXT_MODEL_SUBDIR
    assert model.path == folder.resolve()
    assert isinstance(model.model, GPT2LMHeadModel)
    assert (folder / WEIGHTS).is_file() and (folder / "tokenizer.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [TEXT_MODEL_SUBDIR]  # no staging left
    assert not model.model.training


def test_load_is_cached_per_process(tiny: TextModel, text_data_dir: Path) -> None:
    folder = text_data_dir / "models" / TEXT_MODEL_SUBDIR
    assert load_text_model(None, text_data_dir) is tiny
    assert load_text_model(folder / ".." / TEXT_MODEL_SUBDIR, text_data_dir) is tiny


def test_second_ensure_does_not_rebuild(
    text_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = text_data_dir / "models" / TEXT_MODEL_SUBDIR / WEIGHTS
    before = weights.stat().st_mtime_ns

    def no_build(staging: Path) -> None:
        raise AssertionError("the tiny text model was built again")

    monkeypatch.setattr(text, "_save_tiny_text_model", no_build)
    ensure_tiny_text_model(text_data_dir)
    assert weights.stat().st_mtime_ns == before


def test_every_build_is_the_same_and_leaves_global_rng_alone(
    text_data_dir: Path, tmp_path: Path
) -> None:
    first = text_data_dir / "models" / TEXT_MODEL_SUBDIR
    rng = torch.get_rng_state()
    second = ensure_tiny_text_model(tmp_path)
    assert torch.equal(torch.get_rng_state(), rng)
    for name in (WEIGHTS, "tokenizer.json", "config.json"):
        assert (second / name).read_bytes() == (first / name).read_bytes(), name


def test_racing_builders_leave_one_complete_model(tmp_path: Path) -> None:
    folders: list[Path] = []
    threads = [
        threading.Thread(target=lambda: folders.append(ensure_tiny_text_model(tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = tmp_path / "models" / TEXT_MODEL_SUBDIR
    assert folders == [target] * 3
    assert [p.name for p in target.parent.iterdir()] == [TEXT_MODEL_SUBDIR]
    assert load_text_model(target, tmp_path).write("a", seed=0, max_tokens=4)[0]


def test_losing_a_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "models" / TEXT_MODEL_SUBDIR
    save = text._save_tiny_text_model

    def racer_finishes_first(staging: Path) -> None:
        save(staging)
        shutil.copytree(staging, target)

    monkeypatch.setattr(text, "_save_tiny_text_model", racer_finishes_first)
    assert ensure_tiny_text_model(tmp_path) == target
    assert [p.name for p in target.parent.iterdir()] == [TEXT_MODEL_SUBDIR]


def test_a_half_written_folder_is_never_used(tmp_path: Path) -> None:
    target = tmp_path / "models" / TEXT_MODEL_SUBDIR
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="not a complete model"):
        load_text_model(None, tmp_path)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("missing", "does not exist"),
        ("empty", "no config.json"),
        ("no config", "no config.json"),
        ("no weights", "could not load"),
        ("no tokenizer", "only 1 tokens"),
        ("not a causal model", "could not load"),
    ],
)
def test_a_folder_that_is_not_a_model(model_copy: Path, damage: str, reason: str) -> None:
    if damage == "missing":
        shutil.rmtree(model_copy)
    elif damage == "empty":
        shutil.rmtree(model_copy)
        model_copy.mkdir()
    elif damage == "not a causal model":
        (model_copy / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    else:
        names = {
            "no config": ["config.json"],
            "no weights": [WEIGHTS],
            "no tokenizer": ["tokenizer.json", "tokenizer_config.json"],
        }[damage]
        for name in names:
            (model_copy / name).unlink()
    with pytest.raises(ModelError, match=reason) as caught:
        load_text_model(model_copy, model_copy.parent)
    message = str(caught.value)
    assert "FARM_TEXT_MODEL" in message
    assert "\n" not in message


def test_a_real_style_folder_loads_through_the_same_path(tmp_path: Path) -> None:
    folder = real_style_folder(tmp_path / "gpt2")
    model = load_text_model(folder, tmp_path / "data")
    assert model.path == folder.resolve()
    assert not (tmp_path / "data").exists()  # the tiny model is not built when unused
    narration, count = model.write(PROMPT, seed=3, max_tokens=12)
    assert narration and 0 < count <= 12
    assert model.write(PROMPT, seed=3, max_tokens=12) == (narration, count)


# -- writing -------------------------------------------------------------------------------------


def test_write_is_seeded(tiny: TextModel) -> None:
    first = tiny.write(PROMPT, seed=7, max_tokens=40)
    assert tiny.write(PROMPT, seed=7, max_tokens=40) == first
    assert tiny.write(PROMPT, seed=8, max_tokens=40)[0] != first[0]


def test_write_is_the_same_in_a_fresh_process(tiny: TextModel, text_data_dir: Path) -> None:
    code = (
        "import json, sys\n"
        "from farm.models.text import load_text_model\n"
        "model = load_text_model(None, sys.argv[1])\n"
        "print(json.dumps(model.write(sys.argv[2], seed=7, max_tokens=40)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(text_data_dir), PROMPT],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=True,
    )
    narration, count = json.loads(result.stdout.splitlines()[-1])
    assert (narration, count) == tiny.write(PROMPT, seed=7, max_tokens=40)


def test_concurrent_writes_match_writing_alone(tiny: TextModel) -> None:
    seeds = (1, 2, 3, 4)
    alone = {seed: tiny.write(PROMPT, seed=seed, max_tokens=30) for seed in seeds}
    together: dict[int, tuple[str, int]] = {}
    start = threading.Barrier(len(seeds))

    def write(seed: int) -> None:
        start.wait()
        together[seed] = tiny.write(PROMPT, seed=seed, max_tokens=30)

    rng = torch.get_rng_state()
    threads = [threading.Thread(target=write, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's stream is untouched


@pytest.mark.parametrize("seed", range(5))
def test_narration_is_clean_words(tiny: TextModel, seed: int) -> None:
    narration, count = tiny.write(PROMPT, seed=seed, max_tokens=40)
    assert narration == narration.strip() and narration.encode("utf-8")
    assert "<" not in narration  # no special token decoded
    assert not re.search(r"\s[.,!?]", narration)  # no space before a mark
    words = re.findall(r"[^\s.,!?]+", narration)
    assert words and set(words) <= set(WORDS)
    # Every token counted is one word or mark of the narration: EOS and specials are not.
    assert count == len(tiny.tokenizer(narration).input_ids) <= 40


def test_count_stays_within_max_tokens(tiny: TextModel) -> None:
    narration, count = tiny.write(PROMPT, seed=0, max_tokens=3)
    assert narration and 1 <= count <= 3


@pytest.mark.parametrize("max_tokens", [0, -1, 256, 1000])
def test_max_tokens_out_of_range_is_refused(tiny: TextModel, max_tokens: int) -> None:
    with pytest.raises(InvalidParameter, match="max_tokens"):
        tiny.write(PROMPT, seed=0, max_tokens=max_tokens)


def test_a_model_that_stops_at_once_still_narrates(model_copy: Path) -> None:
    model = load_text_model(model_copy, model_copy.parent)
    eos = model.tokenizer.eos_token_id
    # A constant last hidden state along EOS's embedding: EOS wins every step by far.
    with torch.no_grad():
        model.model.transformer.ln_f.weight.zero_()
        model.model.transformer.ln_f.bias.copy_(model.model.transformer.wte.weight[eos] * 1e4)
    narration, count = model.write(PROMPT, seed=0, max_tokens=40)
    assert count == text.MIN_NEW_TOKENS
    assert len(narration.split()) >= 1


def test_unknown_words_become_unk(tiny: TextModel) -> None:
    tokenizer = tiny.tokenizer
    ids = tokenizer("Zorblax THE cat").input_ids
    assert ids == [tokenizer.unk_token_id, *tokenizer.convert_tokens_to_ids(["the", "cat"])]
    assert tiny.write("Zorblax quux", seed=0, max_tokens=10)[0]


def test_a_blank_prompt_still_narrates(tiny: TextModel) -> None:
    assert tiny.write("   ", seed=0, max_tokens=10)[0]


def test_an_overlong_prompt_loses_its_start(tiny: TextModel) -> None:
    # 300 words + 40 new tokens outruns the 256 positions: only the end is read.
    body = " ".join(WORDS[i % len(WORDS)] for i in range(300))
    narration = tiny.write(f"cat {body}", seed=5, max_tokens=40)
    assert tiny.write(f"dog {body}", seed=5, max_tokens=40) == narration
    assert tiny.write(f"{body} dog", seed=5, max_tokens=40) != narration


def test_other_code_drawing_from_torchs_global_rng_meanwhile_changes_nothing(tiny) -> None:
    """A worker's other threads may seed or draw from torch's global RNG at any moment."""
    alone = tiny.write("the old mill by the river", seed=5, max_tokens=30)
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            torch.manual_seed(0)
            torch.rand(100)

    other = threading.Thread(target=draw)
    other.start()
    try:
        written = [tiny.write("the old mill by the river", seed=5, max_tokens=30) for _ in range(5)]
    finally:
        stop.set()
        other.join()
    assert written == [alone] * 5
