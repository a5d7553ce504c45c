"""Offline tokenizers: known ids, special tokens, determinism of the local BPE."""
from __future__ import annotations

import pytest

from dpkd_lib.tokenization import (
    default_corpus_texts,
    gpt2_tokenizer,
    smollm2_tokenizer,
    train_bpe_tokenizer,
)

CORPUS = [
    "Below is an instruction that describes a task. Write a response.",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Tokyo is the capital of Japan.",
] * 20


def test_gpt2_known_ids_and_specials():
    tok = gpt2_tokenizer()
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert tok("Hello world")["input_ids"] == [15496, 995]  # no BOS added
    assert len(tok) == 50257
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
    assert tok.pad_token_id == tok.eos_token_id


def test_gpt2_cache_dir_reused(tmp_path):
    first = gpt2_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    second = gpt2_tokenizer(tmp_path)
    text = "Distillation keeps 12.4k examples."
    assert first(text)["input_ids"] == second(text)["input_ids"]


def test_smollm2_tokenizer_from_gguf(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("smollm2"))
    tok = smollm2_tokenizer(cache)
    assert tok("Hello world")["input_ids"] == [19556, 905]  # no BOS added
    assert len(tok) == 49152
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.eos_token_id == tok.pad_token_id == 2
    assert smollm2_tokenizer(cache) is tok  # lru-cached in process
    smollm2_tokenizer.cache_clear()
    reloaded = smollm2_tokenizer(cache)  # now from the saved folder, not the GGUF
    assert reloaded is not tok
    text = "### Response:\nThe capital of Kenya is Nairobi."
    assert reloaded(text)["input_ids"] == tok(text)["input_ids"]
    assert reloaded.eos_token_id == 2


def test_bpe_is_deterministic_and_round_trips(tmp_path):
    a = train_bpe_tokenizer(CORPUS, vocab_size=300, out_dir=tmp_path)
    b = train_bpe_tokenizer(CORPUS, vocab_size=300)
    assert a.get_vocab() == b.get_vocab()
    assert len(a) <= 300
    assert a.eos_token == "<|endoftext|>" and a.eos_token_id == 0 and a.pad_token_id == 0
    text = "Unseen wörds, ☃ and   spaces\nstill round-trip."
    ids = a(text)["input_ids"]
    assert a.decode(ids) == text  # byte level: nothing is unknown
    assert 0 not in ids  # no special token added
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded(text)["input_ids"] == ids and loaded.eos_token_id == 0


def test_bpe_learns_merges_from_corpus():
    tok = train_bpe_tokenizer(CORPUS, vocab_size=320)
    assert len(tok("the capital of France")["input_ids"]) < len("the capital of France")


def test_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)


def test_default_corpus_has_prose_and_task_text():
    texts = default_corpus_texts(n_synthetic=50)
    assert len(texts) > 50
    assert any("### Response:" in t for t in texts)
    assert sum(map(len, texts)) > 300_000  # the pydoc topics
