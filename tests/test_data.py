"""Prompts, tokenized examples, filtering, batching, corpora and loaders."""
from __future__ import annotations

import json
import os
import random
import time

import pytest
import torch

from dpkd_lib import data as D
from dpkd_lib.errors import DataError
from dpkd_lib.datasets.synthetic import generate_synthetic
from dpkd_lib.tokenization import gpt2_tokenizer

EOS = 50256


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def rec(i=0, instruction="Name a primary colour.", context="", response="Red", **extra):
    return {"id": f"r{i}", "instruction": instruction, "context": context, "response": response, **extra}


# --------------------------------------------------------------------------- prompts


def test_prompt_without_context_is_minillm_exact():
    assert D.format_prompt(rec(instruction="Say hi.")) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert D.format_prompt({"instruction": "Say hi.", "context": None, "response": "x"}) == \
        D.format_prompt({"instruction": "Say hi.", "response": "x"})


def test_prompt_with_context_is_minillm_exact():
    assert D.format_prompt(rec(instruction="Summarize.", context="A long text.")) == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "Summarize.\n\n### Input:\nA long text.\n\n### Response:\n")


# --------------------------------------------------------------------------- examples


def test_tokenize_example_masks_prompt_and_appends_eos(tok):
    r = rec(instruction="What is 2 + 2?", response="4")
    ex = D.tokenize_example(r, tok, max_length=512, max_prompt=256)
    prompt_ids = tok(D.format_prompt(r), add_special_tokens=False)["input_ids"]
    response_ids = tok("4", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == prompt_ids + response_ids + [EOS]
    assert len(ex["labels"]) == len(ex["input_ids"])
    assert ex["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert ex["labels"][len(prompt_ids):] == response_ids + [EOS]  # unshifted
    assert ex["prompt_len"] == len(prompt_ids) and ex["response_len"] == len(response_ids) + 1
    assert ex["id"] == "r0" and ex["response"] == "4"


def _bad_records():
    """One record per drop reason (with gpt2: prompt ~40 tokens; max_prompt 60, max_length 80)."""
    long_ctx = "word " * 40
    return [
        ["not a dict", "not_a_record"],
        [{"id": "m", "instruction": "Do it."}, "missing_field"],
        [rec(1, response=7), "not_a_string"],
        [rec(2, instruction="   "), "empty_instruction"],
        [rec(3, response=" \n\t"), "empty_response"],
        [rec(4, response="bad \udcff byte"), "invalid_unicode"],
        [rec(0, response="Blue"), "duplicate_id"],
        [rec(5, context=long_ctx), "prompt_too_long"],
        [rec(6, response="OK"), "response_too_short"],
        [rec(7, response="many " * 60), "too_long"],
    ]


def test_each_filter_reason_is_counted(tok):
    records = [rec(0, response="Red and yellow.")] + [r for r, _ in _bad_records()]
    examples, report = D.build_sft_dataset(records, tok, max_length=80, max_prompt=60,
                                           min_response_tokens=3)
    assert [e["id"] for e in examples] == ["r0"]
    expected = {reason: 1 for _, reason in _bad_records()}
    assert report.dropped == expected
    assert set(expected) == set(D.DROP_REASONS)
    assert report.kept == 1 and report.total == 11
    assert report.first_dropped["duplicate_id"] == "r0"
    text = str(report)
    assert text.startswith("kept 1/11 records; dropped 10 (")
    assert "prompt_too_long=1" in text and "\n" not in text
    assert report.as_dict()["dropped"]["too_long"] == 1


def test_bad_data_error_names_first_bad_record(tok):
    records = [rec(0, response="Red"), rec(1, response=""), rec(2, response=123)]
    with pytest.raises(ValueError, match=r"'r1'.*empty_response"):
        D.build_sft_dataset(records, tok, bad_data="error")
    with pytest.raises(ValueError, match="bad_data"):
        D.build_sft_dataset(records, tok, bad_data="ignore")


def test_empty_dataset_after_filtering_raises_with_report(tok):
    with pytest.raises(DataError, match=r"no usable records.*kept 0/2.*empty_response=2"):
        D.build_sft_dataset([rec(0, response=""), rec(1, response=" ")], tok)


def test_invalid_utf8_in_file_is_dropped_not_fatal(tmp_path, tok):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps(rec(0, response="Red")).encode()
    bad = b'{"id": "r1", "instruction": "Name a colour.", "response": "Bl\xffue"}'
    path.write_bytes(good + b"\n" + bad + b"\n\n")
    records = D.load_jsonl_records(path)
    examples, report = D.build_sft_dataset(records, tok)
    assert [e["id"] for e in examples] == ["r0"] and report.dropped == {"invalid_unicode": 1}
    assert len(D.data_hash(records)) == 64  # hashable despite the surrogate


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2"):
        D.read_jsonl(path)


# --------------------------------------------------------------------------- batches


def test_collate_sft_right_pads(tok):
    examples, _ = D.build_sft_dataset([rec(0, response="Red"), rec(1, response="Red, green and blue.")], tok)
    batch = D.collate_sft(examples, pad_id=EOS)
    n0, n1 = (len(e["input_ids"]) for e in examples)
    assert n1 > n0 and batch["input_ids"].shape == (2, n1)
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert batch["labels"][0, n0:].eq(-100).all() and batch["input_ids"][0, n0:].eq(EOS).all()
    assert batch["labels"][1].tolist() == examples[1]["labels"]
    assert batch["ids"] == ["r0", "r1"]


def test_collate_prompts_left_pads_records_and_examples_alike(tok):
    records = [rec(0, response="Red"), rec(1, instruction="Summarize.", context="A long text here.",
                                           response="Text.", references=["Text.", "A text."])]
    batch = D.collate_prompts(records, tok, max_prompt=256)
    lens = [len(tok(D.format_prompt(r), add_special_tokens=False)["input_ids"]) for r in records]
    width = max(lens)
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"][0].tolist() == [0] * (width - lens[0]) + [1] * lens[0]
    assert batch["input_ids"][0, : width - lens[0]].eq(EOS).all()
    assert tok.decode(batch["input_ids"][0, width - lens[0]:]) == D.format_prompt(records[0])
    assert batch["references"] == [["Red"], ["Text.", "A text."]]
    assert batch["ids"] == ["r0", "r1"] and batch["prompts"][1].endswith("### Response:\n")
    examples, _ = D.build_sft_dataset(records, tok)
    again = D.collate_prompts(examples, tok, max_prompt=256)
    assert torch.equal(again["input_ids"], batch["input_ids"])
    assert again["references"] == batch["references"]
    clipped = D.collate_prompts(records[:1], tok, max_prompt=5)
    assert clipped["input_ids"].shape == (1, 5)
    assert tok.decode(clipped["input_ids"][0]).endswith("Response:\n")


def test_length_grouped_batches_cover_each_index_once_and_cut_padding():
    rng = random.Random(0)
    lengths = [rng.randint(20, 300) for _ in range(1000)]
    grouped = D.length_grouped_batches(lengths, 8, seed=1, mega_batches=50)
    flat = sorted(i for b in grouped for i in b)
    assert flat == list(range(1000))
    assert all(len(b) == 8 for b in grouped)
    random_b = D.random_batches(len(lengths), 8, seed=1)
    assert D.mean_padded_length(grouped, lengths) < 0.8 * D.mean_padded_length(random_b, lengths)
    assert D.length_grouped_batches(lengths, 8, seed=1) == grouped
    assert D.length_grouped_batches(lengths, 8, seed=1, epoch=1) != grouped
    assert D.length_grouped_batches(lengths, 8, seed=2) != grouped


def test_length_grouped_batches_drop_last():
    lengths = list(range(1, 22))
    kept = D.length_grouped_batches(lengths, 4, seed=0, drop_last=True)
    assert all(len(b) == 4 for b in kept) and sum(map(len, kept)) == 20
    every = D.length_grouped_batches(lengths, 4, seed=0)
    assert sorted(i for b in every for i in b) == list(range(21))


# --------------------------------------------------------------------------- pre-training corpus


def test_pydoc_corpus_is_offline_english():
    texts = D.pydoc_corpus()
    assert len(texts) > 50 and sum(map(len, texts)) > 300_000
    assert texts == D.pydoc_corpus()


def test_pretrain_blocks_concatenate_with_eos(tok):
    texts = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]
    blocks = D.pretrain_blocks(texts, tok, block_size=4)
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [EOS]
    n = len(stream) // 4
    assert blocks.shape == (n, 4) and blocks.dtype == torch.long
    assert blocks.flatten().tolist() == stream[: n * 4]
    assert D.pretrain_blocks(texts, tok, block_size=4, max_blocks=2).shape == (2, 4)
    with pytest.raises(DataError, match="not one block"):
        D.pretrain_blocks(["hi"], tok, block_size=64)


# --------------------------------------------------------------------------- loaders


def test_load_dolly_hub_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError, match="no network: use the cpu profile"):
        D.load_dolly_hub(cache_dir=tmp_path)
    assert time.perf_counter() - start < 5.0


def test_load_dolly_hub_unreachable_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setattr(D.hub, "offline", lambda: False)
    monkeypatch.setattr(D.hub, "reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match="hub unreachable.*no network"):
        D.load_dolly_hub(cache_dir=tmp_path)


def test_load_dolly_hub_uses_a_cached_copy_offline(monkeypatch, tmp_path):
    """A file already in the hub cache layout is read with no network call."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "datasets--databricks--databricks-dolly-15k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    D.write_jsonl(repo / "snapshots" / commit / "databricks-dolly-15k.jsonl", [{"instruction": "Q", "context": "", "response": "A", "category": "open_qa"}] * 3)
    records = D.load_dolly_hub(cache_dir=tmp_path)
    assert [r["id"] for r in records] == ["dolly-00000", "dolly-00001", "dolly-00002"]
    assert records[0]["response"] == "A" and records[0]["category"] == "open_qa"


def test_load_records_dispatch_and_errors(tmp_path):
    with pytest.raises(ValueError, match="synthetic, jsonl, dolly_hub, minillm"):
        D.load_records("dolly")
    with pytest.raises(FileNotFoundError, match="needs a path"):
        D.load_records("jsonl")
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        D.load_records("jsonl", tmp_path / "nowhere.jsonl")
    out = D.load_records("synthetic", seed=2, n_train=10, n_valid=2, n_test=3, n_heldout=4)
    assert [len(out[s]) for s in ("train", "valid", "test", "heldout")] == [10, 2, 3, 4]
    folder = tmp_path / "splits"
    D.write_jsonl(folder / "train.jsonl", out["train"])
    D.write_jsonl(folder / "test.jsonl", out["test"])
    loaded = D.load_records("jsonl", folder)
    assert loaded == {"train": out["train"], "test": out["test"]}
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        D.load_records("jsonl", tmp_path)


def test_load_jsonl_maps_dolly_and_alpaca_fields(tmp_path):
    path = tmp_path / "mixed.jsonl"
    D.write_jsonl(path, [
        {"instruction": "Q1", "context": "C1", "response": "A1", "category": "closed_qa"},
        {"instruction": "Q2", "input": "", "output": "A2"},
    ])
    r1, r2 = D.load_jsonl_records(path)
    assert (r1["id"], r1["context"], r1["response"], r1["category"]) == ("mixed-00000", "C1", "A1", "closed_qa")
    assert (r2["id"], r2["context"], r2["response"]) == ("mixed-00001", "", "A2")


def test_load_minillm_processed_rebuilds_the_same_prompt(tmp_path):
    with_ctx = rec(0, instruction="Summarize.", context="Some text.")
    no_ctx = rec(1, instruction="Say hi.")
    path = tmp_path / "valid.jsonl"
    D.write_jsonl(path, [
        {"instruction": "Summarize.", "prompt": D.format_prompt(with_ctx), "input": "Some text.", "output": "Short."},
        {"prompt": D.format_prompt(no_ctx), "output": ["Hi.", "Hello."]},
        {"prompt": "Free-form prompt", "output": "x"},
    ])
    a, b, c = D.load_minillm_processed(path)
    assert D.format_prompt(a) == D.format_prompt(with_ctx) and a["response"] == "Short."
    assert D.format_prompt(b) == D.format_prompt(no_ctx)
    assert b["response"] == "Hi." and b["references"] == ["Hi.", "Hello."]
    assert c["instruction"] == "Free-form prompt" and c["context"] == ""


def test_minillm_dolly_split(tok):
    records = [rec(i, instruction=f"Question {i}?", response=("word " * (i % 20)).strip() or "x")
               for i in range(300)]
    split = D.minillm_dolly_split(records, seed=3, n_valid=40, n_test=20)
    assert [len(split[s]) for s in ("train", "valid", "test")] == [240, 40, 20]
    ids = [r["id"] for s in split.values() for r in s]
    assert len(set(ids)) == 300
    assert D.minillm_dolly_split(records, seed=3, n_valid=40, n_test=20) == split
    assert D.minillm_dolly_split(records, seed=4, n_valid=40, n_test=20)["test"] != split["test"]
    filtered = D.minillm_dolly_split(records, seed=3, n_valid=40, n_test=20, tokenizer=tok)
    kept = [r for s in filtered.values() for r in s]
    assert kept and all(len(tok(r["response"])["input_ids"]) >= 11 for r in kept)
    with pytest.raises(DataError, match="cannot give"):
        D.minillm_dolly_split(records[:50], seed=0, n_valid=40, n_test=20)


def test_jsonl_roundtrip_and_data_hash(tmp_path):
    records = generate_synthetic(n_train=20, n_valid=0, n_test=0, n_heldout=0, seed=4)["train"]
    path = tmp_path / "sub" / "train.jsonl"
    D.write_jsonl(path, records)
    assert not os.path.exists(str(path) + ".tmp")
    assert D.read_jsonl(path) == records
    assert D.data_hash(D.read_jsonl(path)) == D.data_hash(records)
    changed = [dict(r) for r in records]
    changed[5]["response"] += "!"
    assert D.data_hash(changed) != D.data_hash(records)
    reordered = [{k: r[k] for k in reversed(list(r))} for r in records]
    assert D.data_hash(reordered) == D.data_hash(records)  # key order does not matter


def test_synthetic_set_fits_default_lengths(tok):
    splits = generate_synthetic(n_train=300, n_valid=0, n_test=50, n_heldout=50, seed=0)
    for name, records in splits.items():
        if records:
            examples, report = D.build_sft_dataset(records, tok, max_length=512, max_prompt=256)
            assert report.kept == len(records), (name, str(report))
