"""Tests for dpkd_lib.evaluate: hand-checked metric values and generation behaviour that
can silently go wrong (left padding, seeding, top_k=0 in transformers v5, n-gram blocking,
label shifting in teacher forcing, atomic writes). Tiny random models and a tiny BPE
tokenizer trained in-process: no network, no hub."""
from __future__ import annotations

import json
import math
import os
import statistics
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dpkd_lib import evaluate as ev
from dpkd_lib.io import read_jsonl, write_jsonl

# ----------------------------------------------------------------------------- fixtures

_CORPUS = [
    "the cat sat on the mat",
    "the dog lay on the rug",
    "a quick brown fox jumps over the lazy dog",
    "Below is an instruction that describes a task.",
    "### Instruction:\nName a colour.\n\n### Response:\n",
    "Paris is the capital of France.",
] * 5


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE with ~300 entries; "<eos>" (id 0) doubles as the pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    assert hf.eos_token_id == 0
    return hf


def _llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def _gpt2(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def llama(tokenizer):
    return _llama(len(tokenizer))


def _fixed_head(model, bias: torch.Tensor):
    """Replace the LM head by one that ignores the hidden state: logits = bias at every step.
    Lets a test dictate the next-token distribution of a real HF model."""
    head = nn.Linear(model.config.hidden_size, bias.numel(), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(bias)
    model.lm_head = head
    return model


PROMPTS = [
    "the cat",
    "Below is an instruction that describes a task. the dog lay on the",
    "a quick brown fox jumps over",
    "Paris",
    "### Instruction:\nName a colour.\n\n### Response:\n",
]

# ----------------------------------------------------------------------------- normalisation / EM


def test_normalize_answer_keeps_articles_like_minillm():
    # MiniLLM's rouge_metric.normalize_answer: lower, strip punctuation, collapse spaces;
    # unlike SQuAD it does NOT drop a/an/the.
    assert ev.normalize_answer("The Cat.") == "the cat"
    assert ev.normalize_answer("  A  dog,\n\tan  apple! ") == "a dog an apple"
    assert ev.normalize_answer("U.S.A.") == "usa"
    assert ev.normalize_answer("") == ""


def test_exact_match_cases():
    assert ev.exact_match("The Cat.", ["the cat"]) == 1.0
    assert ev.exact_match("The Cat.", ["cat"]) == 0.0  # articles are kept (MiniLLM)
    assert ev.exact_match("  Paris ,  France! ", ["paris france"]) == 1.0
    assert ev.exact_match("paris", ["Paris\n"]) == 1.0
    assert ev.exact_match("paris", ["lyon", "PARIS!", "nice"]) == 1.0  # max over references
    assert ev.exact_match("paris", ["lyon", "nice"]) == 0.0
    assert ev.exact_match("paris", "Paris.") == 1.0  # a bare string is one reference
    with pytest.raises(ValueError):
        ev.exact_match("paris", [])


# ----------------------------------------------------------------------------- ROUGE-L


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        # LCS = the cat _ on the mat = 5 tokens; P = R = 5/6 -> F = 5/6 = 0.8333
        ("the cat sat on the mat", "the cat lay on the mat", 5 / 6),
        # LCS(a b c d, a c e) = "a c" = 2; P = 2/4, R = 2/3, F = 2PR/(P+R) = (2/3)/(7/6) = 4/7
        ("a b c d", "a c e", 4 / 7),
        # LCS = "the mat" = 2; P = 2/2, R = 2/6, F = 2*(1/3)/(4/3) = 1/2
        ("the mat", "the cat sat on the mat", 0.5),
        # case and punctuation are ignored by rouge-score's tokenizer
        ("The CAT!", "the cat", 1.0),
        # Porter stemming: running -> run, dogs -> dog; without the stemmer this would be 0
        ("running dogs", "run dog", 1.0),
        # empty / punctuation-only predictions score 0
        ("", "the cat", 0.0),
        ("...", "the cat", 0.0),
    ],
)
def test_rouge_l_hand_values(pred, ref, expected):
    assert ev.rouge_l(pred, [ref]) == pytest.approx(expected, abs=1e-9)


def test_rouge_l_max_over_references_and_cached_scorer():
    assert ev.rouge_l("the mat", ["dog", "the cat sat on the mat", "the mat"]) == pytest.approx(1.0)
    assert ev.rouge_l("the mat", ["dog", "the cat sat on the mat"]) == pytest.approx(0.5)
    assert ev._rouge_scorer() is ev._rouge_scorer()


def test_score_predictions_is_mean_times_100():
    preds = ["The cat.", "the cat sat on the mat"]
    refs = [["the cat"], ["the cat lay on the mat", "dog"]]
    out = ev.score_predictions(preds, refs)
    assert out["exact_match"] == pytest.approx(50.0)
    assert out["rouge_l"] == pytest.approx(100 * (1 + 5 / 6) / 2)
    assert out["n"] == 2
    with pytest.raises(ValueError):
        ev.score_predictions(preds, refs[:1])


# ----------------------------------------------------------------------------- diversity / length


def test_distinct_n_and_repetition_hand_values():
    texts = ["The cat, the cat.", "the dog"]
    # words: [the cat the cat], [the dog]
    # unigrams: 6 total, {the, cat, dog} = 3 unique -> 0.5
    assert ev.distinct_n(texts, 1) == pytest.approx(0.5)
    # bigrams: (the cat)(cat the)(the cat) + (the dog): 4 total, 3 unique -> 0.75
    assert ev.distinct_n(texts, 2) == pytest.approx(0.75)
    # per-text: 2/3 and 1/1 -> mean 5/6
    assert ev.distinct_n(texts, 2, mode="mean") == pytest.approx(5 / 6)
    assert ev.repetition_rate(texts, 2) == pytest.approx(1 / 6)
    # texts shorter than n contribute nothing; none at all -> 0
    assert ev.distinct_n(["one", ""], 2) == 0.0
    assert ev.repetition_rate(["one", ""], 4) == 0.0
    assert ev.word_count("Hello, world !") == 2
    with pytest.raises(ValueError):
        ev.distinct_n(texts, 1, mode="bogus")


# ----------------------------------------------------------------------------- buckets / seeds


def test_length_bucket_edges():
    assert ev.length_bucket(0) == "[0,5)"
    assert ev.length_bucket(4) == "[0,5)"
    assert ev.length_bucket(5) == "[5,10)"
    assert ev.length_bucket(19) == "[10,20)"
    assert ev.length_bucket(79) == "[40,80)"
    assert ev.length_bucket(80) == "[80,inf)"
    assert ev.length_bucket(10**6) == "[80,inf)"
    assert ev.length_bucket(6, edges=(0, 3, 7)) == "[3,7)"
    with pytest.raises(ValueError):
        ev.length_bucket(-1)
    with pytest.raises(ValueError):
        ev.length_bucket(7, edges=(0, 3, 7))  # finite last edge is exclusive
    with pytest.raises(ValueError):
        ev.length_bucket(1, edges=(0, 5, 5))


def test_mean_sd_is_the_one_seed_statistic():
    assert ev.mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0, 3))
    vals = [24.1, 24.9, 23.8, 24.4]
    mean, sd, n = ev.mean_sd(vals)
    assert mean == pytest.approx(statistics.mean(vals)) and n == 4
    assert sd == pytest.approx(statistics.stdev(vals))  # sample sd, ddof = 1
    mean, sd, n = ev.mean_sd([5.0, None, float("nan")])  # missing values are skipped
    assert (mean, n) == (5.0, 1) and math.isnan(sd)      # one value: spread unknown, not 0
    mean, sd, n = ev.mean_sd([])
    assert n == 0 and math.isnan(mean) and math.isnan(sd)


def test_bucket_table_means_counts_and_order():
    rows = []
    # example a: ref 3 tokens -> [0,5); example b: 12 -> [10,20); example c: 100 -> [80,inf)
    spec = {"a": 3, "b": 12, "c": 100}
    scores = {  # (seed, id) -> (rouge_l, em)
        (1, "a"): (1.0, 1.0), (2, "a"): (0.5, 0.0),
        (1, "b"): (0.2, 0.0), (2, "b"): (0.4, 0.0),
        (1, "c"): (0.3, 0.0), (2, "c"): (0.3, 0.0),
    }
    for (seed, ex_id), (rl, em) in scores.items():
        rows.append({"id": ex_id, "seed": seed, "rouge_l": rl, "exact_match": em,
                     "response_tokens": 7, "reference_tokens": spec[ex_id],
                     "bucket": ev.length_bucket(spec[ex_id]), "category": "qa" if ex_id != "c" else "sum"})
    table = ev.bucket_table(rows)
    assert list(table["bucket"]) == ["[0,5)", "[10,20)", "[80,inf)"]  # numeric, not string order
    a = table.iloc[0]
    assert a["n_examples"] == 1 and a["n_rows"] == 2
    assert a["rouge_l"] == pytest.approx(75.0)
    assert a["rouge_l_sd"] == pytest.approx(statistics.stdev([100.0, 50.0]))
    assert a["exact_match"] == pytest.approx(50.0)
    assert table.iloc[2]["rouge_l_sd"] == pytest.approx(0.0)
    # re-bucketing with other edges, and grouping by category
    coarse = ev.bucket_table(rows, edges=(0, 10, math.inf))
    assert list(coarse["bucket"]) == ["[0,10)", "[10,inf)"]
    assert list(coarse["n_examples"]) == [1, 2]
    by_cat = ev.bucket_table(rows, by="category")
    assert list(by_cat["category"]) == ["qa", "sum"]
    assert by_cat.iloc[0]["n_examples"] == 2


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_batched_equals_unbatched_with_left_padding(tokenizer, arch):
    model = (_llama if arch == "llama" else _gpt2)(len(tokenizer), seed=1)
    model.train()  # generate must switch to eval and restore this
    lengths = {len(tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) >= 4  # the batch really is padded
    side = tokenizer.padding_side
    batched = ev.generate_ids(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=8,
                              do_sample=False, progress=False)
    single = [ev.generate_ids(model, tokenizer, [p], max_new_tokens=12, batch_size=1,
                              do_sample=False, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert sum(len(x) for x in batched) > 0
    assert model.training and tokenizer.padding_side == side
    # temperature 0 also means greedy, whatever do_sample says
    assert ev.generate_ids(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0.0,
                           progress=False) == batched


def test_sampling_seeds(tokenizer, llama):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0, progress=False)
    rng_state = torch.get_rng_state()
    a = ev.generate(llama, tokenizer, PROMPTS, batch_size=5, seed=10, **kw)
    assert torch.equal(torch.get_rng_state(), rng_state)  # caller's RNG left alone
    b = ev.generate(llama, tokenizer, PROMPTS, batch_size=5, seed=10, **kw)
    c = ev.generate(llama, tokenizer, PROMPTS, batch_size=5, seed=20, **kw)
    assert a == b
    assert a != c
    assert sum(x != y for x, y in zip(a, c)) >= 3
    # per-example RNG: the batch size and the other prompts do not change a sample
    assert ev.generate(llama, tokenizer, PROMPTS, batch_size=2, seed=10, **kw) == a
    assert ev.generate(llama, tokenizer, PROMPTS[2:], keys=[2, 3, 4], seed=10, **kw) == a[2:]
    # transformers' own sampling under a per-batch seed: reproducible, seed-dependent
    d = ev.generate(llama, tokenizer, PROMPTS, batch_size=2, seed=10, rng="per_batch", **kw)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert ev.generate(llama, tokenizer, PROMPTS, batch_size=2, seed=10, rng="per_batch", **kw) == d
    assert ev.generate(llama, tokenizer, PROMPTS, batch_size=2, seed=20, rng="per_batch", **kw) != d


@pytest.mark.parametrize("rng", ["per_example", "per_batch"])
def test_top_k_zero_means_no_filter(tokenizer, rng):
    # Nearly uniform logits over ~300 tokens, strictly ordered (top-k keeps ties, so exact
    # equality would defeat the control). transformers v5 fills top_k=None with the global
    # default 50; top_k=0 must really disable the filter, so > 50 distinct tokens show up.
    # top_k=5 is the positive control: only the 5 highest logits can ever be drawn.
    vocab = len(tokenizer)
    model = _fixed_head(_llama(vocab, seed=2), -1e-3 * torch.arange(vocab, dtype=torch.float32))
    prompts = PROMPTS * 2
    ids = ev.generate_ids(model, tokenizer, prompts, max_new_tokens=30, top_k=0, seed=3,
                          rng=rng, progress=False)
    assert len({t for x in ids for t in x}) > 50
    ids5 = ev.generate_ids(model, tokenizer, prompts, max_new_tokens=30, top_k=5, seed=3,
                           rng=rng, progress=False)
    assert {t for x in ids5 for t in x} <= {1, 2, 3, 4}  # 0 is EOS (cut off)


def test_checkpoint_generation_config_does_not_leak(tokenizer):
    # Hub checkpoints ship generation_config.json defaults (top_k, top_p, temperature,
    # repetition penalty, min length...). transformers fills every field we leave unset
    # from there, which would silently change MiniLLM's protocol.
    from transformers import GenerationConfig

    vocab = len(tokenizer)
    ramp = -1e-3 * torch.arange(vocab, dtype=torch.float32)
    clean = _fixed_head(_llama(vocab, seed=2), ramp)
    dirty = _fixed_head(_llama(vocab, seed=2), ramp)
    dirty.generation_config = GenerationConfig(
        do_sample=True, top_k=20, top_p=0.5, temperature=0.3, repetition_penalty=2.0,
        min_new_tokens=5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    prompts = PROMPTS * 2
    for rng in ("per_example", "per_batch"):
        ids = ev.generate_ids(dirty, tokenizer, prompts, max_new_tokens=30, top_k=0, seed=3,
                              rng=rng, progress=False)
        assert len({t for x in ids for t in x}) > 50
        assert ids == ev.generate_ids(clean, tokenizer, prompts, max_new_tokens=30, top_k=0,
                                      seed=3, rng=rng, progress=False)
    greedy = dict(max_new_tokens=6, do_sample=False, progress=False)
    # greedy on the ramp: token 0 (EOS) first -> empty, despite the checkpoint's min_new_tokens
    assert ev.generate_ids(dirty, tokenizer, prompts, **greedy) == [[]] * len(prompts)


@pytest.mark.parametrize("mode", ["greedy", "per_example", "per_batch"])
def test_no_repeat_ngram_size_blocks_repeats(tokenizer, mode):
    vocab = len(tokenizer)
    bias = torch.full((vocab,), -20.0)
    bias[[50, 60, 70, 80]] = torch.tensor([10.0, 9.0, 8.0, 7.0])  # one dominant token
    bias[tokenizer.eos_token_id] = -30.0  # once the 4 are used up, keep going (id 1 next)
    model = _fixed_head(_llama(vocab, seed=3), bias)
    kw = dict(max_new_tokens=10, progress=False, do_sample=mode != "greedy",
              rng="per_batch" if mode == "per_batch" else "per_example", seed=1)
    free = ev.generate_ids(model, tokenizer, PROMPTS[:2], **kw)
    for ids in free:
        bigrams = list(zip(ids, ids[1:]))
        assert len(set(bigrams)) < len(bigrams)  # without blocking it loops
    blocked = ev.generate_ids(model, tokenizer, PROMPTS[:2], no_repeat_ngram_size=2, **kw)
    for ids in blocked:
        assert len(ids) == 10
        bigrams = list(zip(ids, ids[1:]))
        assert len(set(bigrams)) == len(bigrams)


def test_generation_stops_at_eos_and_decodes_new_tokens_only(tokenizer):
    vocab = len(tokenizer)
    word = tokenizer("the", add_special_tokens=False)["input_ids"]
    assert len(word) == 1
    # the head is constant, so the bias alone decides every step
    bias = torch.full((vocab,), -20.0)
    bias[tokenizer.eos_token_id] = 10.0
    eos_model = _fixed_head(_llama(vocab, seed=4), bias)
    assert ev.generate_ids(eos_model, tokenizer, PROMPTS, max_new_tokens=5, do_sample=False,
                           progress=False) == [[]] * len(PROMPTS)
    assert ev.generate(eos_model, tokenizer, PROMPTS, max_new_tokens=5, progress=False) == [""] * len(PROMPTS)
    bias = torch.full((vocab,), -20.0)
    bias[word[0]] = 10.0
    the_model = _fixed_head(_llama(vocab, seed=4), bias)
    out = ev.generate(the_model, tokenizer, ["the cat", "Paris"], max_new_tokens=3,
                      do_sample=False, progress=False)
    assert out == ["thethethe"] * 2  # prompt not echoed


# ----------------------------------------------------------------------------- teacher forcing


class _FixedLogits(nn.Module):
    """Logits depend only on the position t: p(token t % V) = 1/2, 1/6 for the 3 others."""

    def __init__(self, vocab: int = 4):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        bsz, seq = input_ids.shape
        probs = torch.full((seq, self.vocab), 1 / 6)
        probs[torch.arange(seq), torch.arange(seq) % self.vocab] = 0.5
        return SimpleNamespace(logits=probs.log().expand(bsz, seq, self.vocab))


def test_teacher_forced_metrics_hand_computed():
    # Unshifted labels: label at t+1 is scored by the logits at t (argmax t).
    #  row 0 labels [-100, 0, 2, -100]: pos1 label 0 <- logits@0 (argmax 0): hit, -ln 1/2
    #                                    pos2 label 2 <- logits@1 (argmax 1): miss, -ln 1/6
    #  row 1 labels [-100, -100, 1, 2]: pos2 label 1 <- logits@1: hit, ln2; pos3 label 2 <- @2: hit, ln2
    batch = {
        "input_ids": torch.tensor([[1, 0, 2, 3], [3, 3, 1, 2]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, 0, 2, -100], [-100, -100, 1, 2]]),
    }
    model = _FixedLogits()
    model.train()
    out = ev.teacher_forced_metrics(model, [batch, batch])
    assert out["n_tokens"] == 8
    assert out["nll"] == pytest.approx((3 * math.log(2) + math.log(6)) / 4)
    assert out["token_accuracy"] == pytest.approx(0.75)
    assert out["perplexity"] == pytest.approx(math.exp(out["nll"]))
    assert model.training
    assert ev.teacher_forced_metrics(model, [batch, batch], max_batches=1)["n_tokens"] == 4
    with pytest.raises(ValueError):
        ev.teacher_forced_metrics(model, [{**batch, "labels": torch.full((2, 4), -100)}])


def test_teacher_forced_nll_matches_hf_loss(llama):
    torch.manual_seed(0)
    ids = torch.randint(1, llama.config.vocab_size, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    hf_loss = llama(input_ids=ids, labels=labels).loss.item()  # HF shifts internally
    out = ev.teacher_forced_metrics(llama, [{"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                             "labels": labels}])
    assert out["nll"] == pytest.approx(hf_loss, rel=1e-5)
    assert out["n_tokens"] == 10


def test_head_only_nll_only_where_the_head_gives_the_logits(llama):
    # Gemma-2's soft-capping or a logit scale after the head: the NLL takes the full logits
    assert ev._plain_head(llama) and not ev._plain_head(_FixedLogits())
    for attr in ("final_logit_softcapping", "logit_scale"):
        setattr(llama.config, attr, 30.0)
        try:
            assert not ev._plain_head(llama)
        finally:
            delattr(llama.config, attr)
    assert ev._plain_head(llama)


def test_teacher_forced_metrics_without_an_attention_mask(llama):
    # a batch with no attention_mask is scored as one whose mask is all ones
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, 8, 7, 6, 5]])
    bare = ev.teacher_forced_metrics(llama, [{"input_ids": ids, "labels": labels}])
    masked = ev.teacher_forced_metrics(llama, [{"input_ids": ids, "labels": labels,
                                                "attention_mask": torch.ones_like(ids)}])
    assert bare["nll"] == pytest.approx(masked["nll"], rel=1e-6) and bare["n_tokens"] == 7


def test_reference_metrics_per_example_in_record_order_and_equal_to_each_alone(llama, tokenizer):
    # reference_metrics batches the references by length and scores only response positions:
    # each example's row must still be its own (records' order), equal to HF's loss on it alone
    records = [{"id": f"r{i}", "instruction": instr, "context": "", "response": resp}
               for i, (instr, resp) in enumerate([("Name a colour.", "the cat sat on the mat " * 3),
                                                  ("the cat", "Red"),
                                                  ("a quick brown fox", "jumps over the lazy dog"),
                                                  ("the dog", "Paris is the capital of France.")])]
    cfg = SimpleNamespace(max_length=256, max_prompt=128)
    out = ev.reference_metrics(llama, tokenizer, records, cfg, batch_size=3)
    from dpkd_lib.data import build_sft_dataset
    dataset, _ = build_sft_dataset(records, tokenizer, max_length=256, max_prompt=128)
    assert [r["id"] for r in out["per_example"]] == [ex["id"] for ex in dataset] == ["r0", "r1", "r2", "r3"]
    for row, ex in zip(out["per_example"], dataset):
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        alone = llama(input_ids=ids, labels=labels).loss.item()
        assert row["nll_sum"] / row["n_tokens"] == pytest.approx(alone, rel=1e-4)
    assert out["n_tokens"] == sum(r["n_tokens"] for r in out["per_example"])


# ----------------------------------------------------------------------------- end to end


def _examples():
    return [
        {"id": "e0", "instruction": "the cat", "references": ["the cat sat on the mat"], "category": "open_qa"},
        {"id": "e1", "instruction": "Name a colour.", "references": ["Red"], "category": "brainstorming"},
        {"id": "e2", "instruction": "a quick brown fox", "references": ["jumps over the lazy dog", "jumps"],
         "category": "open_qa"},
        {"id": "e3", "instruction": "Paris is", "references": "the capital of France", "category": "closed_qa"},
    ]


def test_evaluate_generations_rows_and_summary(tokenizer, llama, tmp_path):
    examples = [{**ex, "prompt": f"### Instruction:\n{ex['instruction']}\n\n### Response:\n"} for ex in _examples()]
    rows, summary = ev.evaluate_generations(
        llama, tokenizer, examples, seeds=(10, 20, 30), batch_size=3, max_new_tokens=8,
        temperature=1.0, top_k=0, top_p=1.0, no_repeat_ngram_size=6, progress=False)
    assert len(rows) == 12
    keys = {"id", "seed", "category", "prompt", "sample", "reference", "rouge_l", "exact_match",
            "response_tokens", "reference_tokens", "bucket"}
    assert keys <= set(rows[0])
    for r in rows:
        assert 0.0 <= r["rouge_l"] <= 1.0 and r["exact_match"] in (0.0, 1.0)
        assert r["bucket"] == ev.length_bucket(r["reference_tokens"])
        assert r["response_tokens"] <= 8
        assert r["rouge_l"] == pytest.approx(ev.rouge_l(r["sample"], r["references"]))
    assert rows[11]["reference"] == "the capital of France" and rows[11]["seed"] == 30
    assert summary["n"] == 4 and summary["n_seeds"] == 3 and summary["seeds"] == [10, 20, 30]
    per_seed_rl = [s["rouge_l"] for s in summary["per_seed"]]
    assert summary["rouge_l"] == pytest.approx(statistics.mean(per_seed_rl))
    assert summary["rouge_l_sd"] == pytest.approx(statistics.stdev(per_seed_rl))
    assert summary["rouge_l_sd"] > 0  # different seeds really sampled differently
    em = [s["exact_match"] for s in summary["per_seed"]]
    assert summary["exact_match_sd"] == pytest.approx(statistics.stdev(em) if len(set(em)) > 1 else 0.0)
    for k in ("response_tokens", "distinct_1", "distinct_2", "repetition_rate", "empty_rate",
              "truncated_rate"):
        assert k in summary
    assert summary["per_seed"][0]["rouge_l"] == pytest.approx(
        100 * statistics.mean(r["rouge_l"] for r in rows if r["seed"] == 10))
    assert summary["generation"]["no_repeat_ngram_size"] == 6
    json.dumps(summary, allow_nan=False)

    # same seed again -> same rows; a subset gives the same samples (keys are example ids)
    rows_again, _ = ev.evaluate_generations(llama, tokenizer, examples[1:], seeds=(20,), batch_size=1,
                                            max_new_tokens=8, no_repeat_ngram_size=6, progress=False)
    assert [r["sample"] for r in rows_again] == [r["sample"] for r in rows if r["seed"] == 20][1:]

    table = ev.bucket_table(rows)
    assert table["n_examples"].sum() == 4 and table["n_rows"].sum() == 12

    path = tmp_path / "run" / "eval.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == json.loads(json.dumps(rows))
    assert os.listdir(path.parent) == ["eval.jsonl"]


def test_evaluate_generations_exact_match_and_prompt_fn(tokenizer):
    vocab = len(tokenizer)
    (word,) = tokenizer("the", add_special_tokens=False)["input_ids"]
    bias = torch.full((vocab,), -20.0)
    bias[word] = 10.0
    model = _fixed_head(_llama(vocab, seed=5), bias)
    # greedy with a constant head: "the" at every step; max_new_tokens=1 -> "the"
    examples = [{"id": 0, "instruction": "capital of France?", "references": ["The."]},
                {"id": 1, "instruction": "capital of Italy?", "references": ["Rome"]}]
    rows, summary = ev.evaluate_generations(
        model, tokenizer, examples, seeds=(1,), max_new_tokens=1, do_sample=False,
        prompt_fn=lambda ex: f"Q: {ex['instruction']}\nA:", progress=False)
    assert [r["sample"] for r in rows] == ["the", "the"]
    assert [r["exact_match"] for r in rows] == [1.0, 0.0]
    assert rows[0]["prompt"] == "Q: capital of France?\nA:"
    assert summary["exact_match"] == pytest.approx(50.0) and math.isnan(summary["exact_match_sd"])
    assert summary["rouge_l"] == pytest.approx(50.0)
    assert summary["truncated_rate"] == 1.0
    with pytest.raises(ValueError):
        ev.evaluate_generations(model, tokenizer, examples, seeds=(1, 1), progress=False,
                                prompt_fn=lambda ex: ex["instruction"])


def test_response_length_rows_and_summary(tokenizer):
    """Every evaluation reports response length: per row the new tokens, whether the model
    stopped by EOS and whether it said nothing; per seed and in the summary the mean new
    tokens, the share ended by EOS and the share empty. A head that draws EOS or "the" with
    probability 1/2 each gives all three kinds of response (empty, ended, cut at the limit)."""
    vocab = len(tokenizer)
    (word,) = tokenizer("the", add_special_tokens=False)["input_ids"]
    bias = torch.full((vocab,), -30.0)
    bias[word] = bias[tokenizer.eos_token_id] = 0.0
    model = _fixed_head(_llama(vocab, seed=6), bias)
    examples = [{"id": i, "prompt": p, "references": ["the"]} for i, p in enumerate(PROMPTS)]
    limit = 3
    rows, summary = ev.evaluate_generations(model, tokenizer, examples, seeds=(1, 2, 3), max_new_tokens=limit,
                                            progress=False)
    for r in rows:
        assert r["response_tokens"] == r["sample"].count("the") <= limit
        assert r["ended_eos"] == (r["response_tokens"] < limit) == (not r["truncated"])
        assert r["empty"] == (r["response_tokens"] == 0) == (r["sample"] == "")
    kinds = {("empty" if r["empty"] else "ended" if r["ended_eos"] else "cut") for r in rows}
    assert kinds == {"empty", "ended", "cut"}
    for per_seed in summary["per_seed"]:
        mine = [r for r in rows if r["seed"] == per_seed["seed"]]
        assert per_seed["response_tokens"] == pytest.approx(statistics.mean(r["response_tokens"] for r in mine))
        assert per_seed["ended_rate"] == pytest.approx(statistics.mean(r["ended_eos"] for r in mine))
        assert per_seed["empty_rate"] == pytest.approx(statistics.mean(r["empty"] for r in mine))
    for key, field in (("response_tokens", "response_tokens"), ("ended_rate", "ended_eos"), ("empty_rate", "empty")):
        assert summary[key] == pytest.approx(statistics.mean(r[field] for r in rows))


def test_jsonl_writes_are_atomic_and_strict(tmp_path):
    path = tmp_path / "eval.jsonl"
    write_jsonl(path, [{"id": 1, "sample": "é"}])
    before = path.read_bytes()

    def rows():
        yield {"id": 2}
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert path.read_bytes() == before  # old file intact
    assert os.listdir(tmp_path) == ["eval.jsonl"]  # no temp file left behind
    assert read_jsonl(path) == [{"id": 1, "sample": "é"}]
    # non-finite floats are written as null: any strict JSON reader loads the file
    write_jsonl(path, [{"id": 3, "rouge_l": float("nan"), "x": [float("inf"), 1.5]}])
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"id": 3, "rouge_l": None,
                                                                       "x": [None, 1.5]}


def test_evaluate_splits_flat_summary(tokenizer, llama):
    from dpkd_lib.data import format_prompt

    records = [{"id": f"t{i}", "instruction": ins, "context": ctx, "response": resp, "category": cat}
               for i, (ins, ctx, resp, cat) in enumerate([
                   ("Name a colour.", "", "Red", "brainstorming"),
                   ("Where is the cat?", "The cat sat on the mat.", "on the mat", "closed_qa"),
                   ("Capital of France?", "", "Paris", "open_qa")])]
    splits = {"train": records, "test": records, "valid": records[:1]}
    cfg = SimpleNamespace(splits=["test", "heldout"], max_examples=2, greedy=True, sample_seeds=[1, 2],
                          teacher_forced=True, batch_size=4, max_new_tokens=4, temperature=1.0,
                          sample_max_examples=0,
                          top_k=0, top_p=1.0, no_repeat_ngram_size=0)
    data_cfg = SimpleNamespace(max_length=1024, max_prompt=768)
    rows, summary = ev.evaluate_splits(llama, tokenizer, splits, cfg, data_cfg, progress=False)
    by = lambda d: [r for r in rows if r["decoding"] == d]  # noqa: E731
    assert len(by("greedy")) == 2 and len(by("sample")) == 4 and len(by("teacher_forced")) == 2
    assert {r["split"] for r in rows} == {"test"}
    greedy = by("greedy")
    assert greedy[1]["prompt"] == format_prompt(records[1]) and greedy[1]["reference"] == "on the mat"
    assert all(r["seed"] is None for r in greedy) and {r["seed"] for r in by("sample")} == {1, 2}
    assert summary["eval_skipped_splits"] == ["heldout"]
    assert summary["test_n"] == 2 and summary["test_sample_n"] == 2
    assert summary["test_rouge_l"] == summary["eval"]["test"]["greedy"]["rouge_l"]
    assert summary["test_sample_rouge_l"] == summary["eval"]["test"]["sample"]["rouge_l"]
    for key in ("response_tokens", "ended_rate", "empty_rate"):   # length beside ROUGE-L, each decoding
        assert summary[f"test_{key}"] == summary["eval"]["test"]["greedy"][key]
        assert summary[f"test_sample_{key}"] == summary["eval"]["test"]["sample"][key]
    cfg.sample_max_examples = 1   # sampling on the first example only: greedy and teacher forcing keep both
    rows1, summary1 = ev.evaluate_splits(llama, tokenizer, splits, cfg, data_cfg, progress=False)
    assert summary1["test_sample_n"] == 1 and summary1["test_n"] == 2
    assert [r for r in rows1 if r["decoding"] == "sample"] == [r for r in by("sample") if r["id"] == "t0"]
    # greedy decoding is the model's argmax path: the same as a direct greedy decode
    direct = ev.generate(llama, tokenizer, [format_prompt(r) for r in records[:2]], max_new_tokens=4,
                         do_sample=False, progress=False)
    assert [r["sample"] for r in greedy] == direct
    # teacher-forced: the token-weighted mean of the per-example rows
    tf = by("teacher_forced")
    assert summary["test_nll"] == pytest.approx(sum(r["nll_sum"] for r in tf) / sum(r["n_tokens"] for r in tf))
    assert summary["test_token_acc"] == pytest.approx(sum(r["correct"] for r in tf) / sum(r["n_tokens"] for r in tf))


def test_teacher_kl_against_brute_force(tokenizer, llama):
    """KL(teacher ‖ student) on the references, per prompt the mean over its response
    positions of Σ_v p(v|h)·log(p(v|h)/q(v|h)), against a loop over each example alone on
    the full logits; the summary's kl is the mean over prompts; a model against itself is 0."""
    from types import SimpleNamespace

    from dpkd_lib.data import build_sft_dataset
    teacher = _gpt2(len(tokenizer), seed=3)
    teacher.train()   # dropout on: the metric must switch it off (and restore the mode)
    records = [{"id": f"r{i}", "instruction": ins, "context": "", "response": resp}
               for i, (ins, resp) in enumerate([("Name a colour.", "Red"), ("Where is the cat?", "on the mat"),
                                                ("Capital of France?", "Paris is the capital of France."),
                                                ("the dog", "lay on the rug")])]
    data_cfg = SimpleNamespace(max_length=256, max_prompt=128)
    out = ev.reference_metrics(llama, tokenizer, records, data_cfg, batch_size=3, teacher=teacher)
    dataset, _ = build_sft_dataset(records, tokenizer, max_length=256, max_prompt=128)
    assert teacher.training
    teacher.eval()
    brute = []
    with torch.no_grad():
        for ex, row in zip(dataset, out["per_example"]):
            ids = torch.tensor([ex["input_ids"]])
            p = torch.softmax(teacher(input_ids=ids).logits[0].double(), -1)
            q = torch.softmax(llama(input_ids=ids).logits[0].double(), -1)
            kls = [sum(float(p[i, v] * (p[i, v].log() - q[i, v].log())) for v in range(p.shape[1]))
                   for i in range(ex["prompt_len"] - 1, len(ex["input_ids"]) - 1)]
            assert row["id"] == ex["id"] and row["kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
            brute.append(sum(kls) / len(kls))
    assert out["kl"] == pytest.approx(sum(brute) / len(brute), rel=1e-4)
    assert ev.reference_metrics(llama, tokenizer, records, data_cfg, teacher=llama)["kl"] == pytest.approx(0, abs=1e-6)
    cfg = SimpleNamespace(splits=["test"], max_examples=0, greedy=False, sample_seeds=[], teacher_forced=True,
                          teacher_kl=True, batch_size=4, max_new_tokens=4, temperature=1.0, sample_max_examples=0,
                          top_k=0, top_p=1.0, no_repeat_ngram_size=0)
    rows, summary = ev.evaluate_splits(llama, tokenizer, {"test": records}, cfg, data_cfg, progress=False,
                                       teacher=teacher)
    assert summary["test_kl"] == pytest.approx(out["kl"], rel=1e-5)
    assert [r["kl"] for r in rows] == pytest.approx([r["kl"] for r in out["per_example"]], rel=1e-5)
    with pytest.raises(ValueError, match="teacher_kl needs the teacher"):
        ev.evaluate_splits(llama, tokenizer, {"test": records}, cfg, data_cfg, progress=False)


def test_cached_reference_teacher_gives_the_online_kl_bit_for_bit_without_building_the_teacher(
        tokenizer, llama, tmp_path):
    """eval.teacher_kl's teacher pass is cached per split (ReferenceTeacher): the first
    evaluation builds the teacher once and stores its hidden states; a later one (another
    run) reads them and never builds it; the NLL and KL rows equal the online ones exactly
    (the same batches, the same head), so a cached study reproduces an online one's record.
    Another batching is another cache: its sums may differ in the last bits."""
    from types import SimpleNamespace

    teacher = _gpt2(len(tokenizer), seed=3)
    records = [{"id": f"r{i}", "instruction": ins, "context": "", "response": resp}
               for i, (ins, resp) in enumerate([("Name a colour.", "Red"), ("Where is the cat?", "on the mat"),
                                                ("Capital of France?", "Paris is the capital of France."),
                                                ("the dog", "lay on the rug"), ("Count to three.", "one two three"),
                                                ("Say hello.", "Hello there, how are you today?")])]
    data_cfg = SimpleNamespace(max_length=256, max_prompt=128)
    online = ev.reference_metrics(llama, tokenizer, records, data_cfg, batch_size=4, teacher=teacher)
    builds = []

    def reference_teacher():
        return ev.ReferenceTeacher(lambda: builds.append("built") or teacher, identity={"teacher": "gpt2 seed 3"},
                                   cache_dir=tmp_path, progress=False)

    first = ev.reference_metrics(llama, tokenizer, records, data_cfg, batch_size=4, teacher=reference_teacher())
    assert builds == ["built"] and any(tmp_path.iterdir())
    again = ev.reference_metrics(llama, tokenizer, records, data_cfg, batch_size=4, teacher=reference_teacher())
    assert builds == ["built"]   # read from the cache: no teacher
    for out in (first, again):
        assert out["per_example"] == online["per_example"]   # == on floats: the same bits
        assert (out["kl"], out["kl_token"], out["nll"]) == (online["kl"], online["kl_token"], online["nll"])
    assert online["per_example"][0]["kl"] > 0
    ev.reference_metrics(llama, tokenizer, records, data_cfg, batch_size=2, teacher=reference_teacher())
    assert builds == ["built", "built"]
    # a teacher handed over in train mode: built from in eval mode (dropout off), its mode back
    # when its owner closes the ReferenceTeacher, and eval mode again if it is used after that
    teacher.train()
    other = ev.ReferenceTeacher(lambda: teacher, identity={"teacher": "gpt2 seed 3, again"}, cache_dir=tmp_path,
                                progress=False)
    for _ in range(2):
        out = ev.reference_metrics(llama, tokenizer, records, data_cfg, batch_size=4, teacher=other)
        assert out["per_example"] == online["per_example"]
        other.close()
        assert teacher.training
    teacher.eval()
    with pytest.raises(ValueError, match="needs the teacher's identity"):
        ev.ReferenceTeacher(lambda: teacher, cache_dir=tmp_path)
