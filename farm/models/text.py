"""The language model of the ``script`` stage: it writes a short narration from a prompt.

``FARM_TEXT_MODEL`` names a local folder that transformers' ``AutoModelForCausalLM`` and
``AutoTokenizer`` load (a gpt2 saved with ``save_pretrained``, say). Without it the farm uses a
tiny GPT-2 with fixed-seed random weights, built in a fraction of a second, saved under the data
dir and then loaded from there exactly like a real model, so the demo exercises the real path.
Its tokenizer is word-level over a few hundred common English words: random weights then write
random words, not sentences, but words eSpeak can speak, where a byte-level vocabulary would
write fragments of words. The folder's name is fixed, so a change to the vocabulary or config
below must rename it (as ``tiny-sd-2`` did), or old data dirs keep the old model.

Generation samples (top-k, top-p) from a generator seeded with ``seed`` and used by nothing
else, so a job's narration is the same on every run and in every process, whatever other code
does with torch's global RNG. Workers run jobs in threads: ``write`` holds the model's lock, so
two jobs never share the fast tokenizer's state at once (see farm.engine.calls). The model runs
on the CPU: a narration is a few dozen tokens.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from farm.errors import InvalidParameter, ModelError
from farm.models.loader import MIN_VOCAB_SIZE, stage_and_publish

TEXT_MODEL_SUBDIR = "tiny-text-model"
SEED = 0
TOP_K, TOP_P = 50, 0.95
# EOS is held back this long: a model that would stop at once still says something.
MIN_NEW_TOKENS = 8
UNK, PAD, EOS = "<unk>", "<pad>", "<|endoftext|>"
# Only marks that decode's clean-up joins to the word before, so the text reads "dark, cold."
PUNCTUATION = (".", ",", "!", "?")
# Common words eSpeak says well; one string, as a list literal would run to 300 lines.
_WORD_LIST = """
    a about above across after again against air all almost alone along always among an and
    animal another answer any around as at away back bank be beautiful because bed before began
    behind below beside best better between big bird black blue boat body book both boy bread
    bridge bright bring brother brown but by call came can car carry castle cat child children
    city clear close cloud cold color come could country course cup dance dark day deep did
    different do dog door down dream during each early earth east eat end even evening ever
    every eye face fall family far farm fast father feel few field find fire first fish five
    floor flower fly follow food for forest found four friend from full garden gave girl give
    glass go gold good great green grew ground grow had hand happy hard has have he head hear
    heart heavy help her here high hill him his hold home horse hot house how i ice idea if in
    into is island it its journey just keep kind king knew know lake land large last late laugh
    learn leave left light like line little long look love low made make man many map may me
    mind moon more morning most mother mountain move much music must my name near never new
    next night no north not nothing now ocean of off often old on once one only open or other
    our out over paper people picture place plant play quiet rain ran read red remember rest
    river road rock room round run sad said same sand saw say sea second see seemed shadow she
    ship short should side silver sing sister sky sleep slow small snow so soft some song soon
    sound south spring stand star still stone stood story street strong summer sun sure table
    take tall tell than that the their them then there they thing think this those three
    through time to today together told too took toward town tree true turn two under until up
    upon us very village voice wait walk wall want warm was watch water wave way we went were
    west what when where which while white who why wide wild will wind window winter with
    without woman wood word work world would write year yellow yes yet you young
"""
WORDS = tuple(_WORD_LIST.split())
TEXT_HINT = (
    "FARM_TEXT_MODEL must name a local causal language model folder "
    "(a model and its tokenizer saved with save_pretrained)"
)
_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class TextModel:
    """A loaded language model and its tokenizer; shared by every job in the process."""

    path: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def write(self, prompt: str, *, seed: int, max_tokens: int) -> tuple[str, int]:
        """A narration continuing ``prompt`` (the new text only, not the prompt) and its token
        count: the tokens generated, not counting the EOS that ended them.

        A prompt longer than the model's context less ``max_tokens`` loses its start: the end
        is what the narration continues. Words the tokenizer does not know read as its unk."""
        context = self.context_length
        if not 1 <= max_tokens < context:
            raise InvalidParameter(f"max_tokens must be 1 to {context - 1}, not {max_tokens}")
        with self._lock:
            prompt_ids = self._prompt_ids(prompt, budget=context - max_tokens)
            new_ids = self._generate(prompt_ids, seed=seed, max_tokens=max_tokens)
            text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        return text.strip(), len(new_ids)

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def _prompt_ids(self, prompt: str, budget: int) -> list[int]:
        ids = self.tokenizer(prompt).input_ids[-budget:]
        # A blank prompt still needs one token to continue from: the model's start of text.
        return ids or [_start_token(self.tokenizer)]

    def _generate(self, prompt_ids: list[int], *, seed: int, max_tokens: int) -> list[int]:
        """Sample token by token from a generator of this call's own: transformers' generate
        draws from torch's global RNG, which any other code of the worker may seed or draw
        from between two of our draws."""
        eos, banned = self.tokenizer.eos_token_id, _inner_special_ids(self.tokenizer)
        generator = torch.Generator().manual_seed(seed)
        ids, new_ids = list(prompt_ids), []
        with torch.inference_mode():
            for step in range(max_tokens):
                logits = self.model(torch.tensor([ids])).logits[0, -1].float()
                logits[banned] = -torch.inf
                if step < MIN_NEW_TOKENS:  # a narration is never empty
                    logits[eos] = -torch.inf
                token = _sample(logits, generator)
                if token == eos:
                    break
                ids.append(token)
                new_ids.append(token)
        return new_ids


def _sample(logits: torch.Tensor, generator: torch.Generator) -> int:
    """One token from the TOP_K likeliest, cut further to the smallest set whose probability
    reaches TOP_P (nucleus sampling)."""
    top = torch.topk(logits, min(TOP_K, logits.numel()))
    probs = torch.softmax(top.values, dim=-1)
    probs = probs * ((torch.cumsum(probs, dim=-1) - probs) < TOP_P)
    choice = torch.multinomial(probs / probs.sum(), 1, generator=generator)
    return int(top.indices[choice])


def _start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    bos = tokenizer.bos_token_id
    return bos if bos is not None else tokenizer.eos_token_id


def _inner_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens that must not be generated: decoding would drop them, leaving a token
    counted with no word, or a narration of nothing. EOS stays: it ends the narration."""
    return sorted(set(tokenizer.all_special_ids) - {tokenizer.eos_token_id})


# -- the tiny model ----------------------------------------------------------------------------


def ensure_tiny_text_model(data_dir: Path) -> Path:
    """Save the tiny text model under ``data_dir`` unless it is there; return its folder."""
    target = Path(data_dir) / "models" / TEXT_MODEL_SUBDIR
    if not _is_complete(target):
        stage_and_publish(target, _save_tiny_text_model, _is_complete)
    return target


def _is_complete(folder: Path) -> bool:
    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((folder / name).is_file() for name in names)


def _save_tiny_text_model(folder: Path) -> None:
    model, tokenizer = build_tiny_text_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_tiny_text_model() -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """The tiny GPT-2 and its word-level tokenizer; the same weights on every call."""
    tokenizer = build_tiny_text_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,  # GPT-2's convention: one token starts and ends
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Layers draw their initial weights from torch's global RNG: fork it so the caller's stream
    # is untouched, and hold a lock so two threads building at once cannot interleave draws.
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = GPT2LMHeadModel(config)
    return model, tokenizer


def build_tiny_text_tokenizer() -> PreTrainedTokenizerFast:
    """Whole words and punctuation, lower-cased; anything else is ``<unk>``."""
    vocab = {token: index for index, token in enumerate([UNK, PAD, EOS, *PUNCTUATION, *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        pad_token=PAD,
        bos_token=EOS,
        eos_token=EOS,
        model_max_length=256,
        # Word-level decoding puts a space before every mark; the clean-up takes it away.
        clean_up_tokenization_spaces=True,
    )


# -- loading -----------------------------------------------------------------------------------


def load_text_model(model_path: Path | None, data_dir: Path) -> TextModel:
    """The model at ``model_path`` (the tiny model when None), loaded once per process."""
    path = Path(model_path) if model_path is not None else ensure_tiny_text_model(data_dir)
    return _load_cached(path.expanduser().resolve())


@functools.cache
def _load_cached(path: Path) -> TextModel:
    os.environ["HF_HUB_OFFLINE"] = "1"
    _check_folder(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = _first_line(exc)
        raise ModelError(f"could not load the text model at {path}: {reason}; {TEXT_HINT}") from exc
    _check_tokenizer(path, model, tokenizer)
    return TextModel(path=path, model=model.eval(), tokenizer=tokenizer)


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(f"text model folder {path} does not exist; {TEXT_HINT}")
    if not (path / "config.json").is_file():
        raise ModelError(f"text model folder {path} has no config.json; {TEXT_HINT}")


def _check_tokenizer(
    path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    # Without its files, AutoTokenizer silently makes a tokenizer of one token from the config.
    if len(tokenizer) <= MIN_VOCAB_SIZE:
        raise ModelError(
            f"the tokenizer in {path} has only {len(tokenizer)} tokens; are its files missing? "
            f"{TEXT_HINT}"
        )
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer in {path} has no end-of-text token; {TEXT_HINT}")
    if len(tokenizer) > model.config.vocab_size:
        raise ModelError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model only "
            f"{model.config.vocab_size} embeddings; the folder mixes two models"
        )


def _first_line(exc: Exception) -> str:
    """Transformers' messages run to several lines of advice; the farm reports one."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
