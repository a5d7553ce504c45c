"""Tests for dpkd_lib.models: builders, pruning, LoRA/QLoRA on CPU, saving, vocab checks,
offline behaviour, and the real SmolLM2 GGUF (loaded once for the module)."""
import time

import pytest
import torch

from dpkd_lib import models as M

ARCHS = ["gpt2", "llama"]
VOCAB = 96


def _ids(batch=2, length=9, vocab=VOCAB, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)


@torch.no_grad()
def _logits(model, ids):
    model.eval()
    return model(input_ids=ids).logits


def _final_norm_and_head(model):
    """(final norm, head) of a tiny GPT-2 or Llama, for the manual forward in prune tests."""
    if M.model_arch(model) == "gpt2":
        return model.transformer.ln_f, model.lm_head
    return model.model.norm, model.lm_head


def _lora_step(model, ids, lr=1e-2):
    """One AdamW step on the LM loss, in train mode, returning the loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()
    return loss


# ----------------------------------------------------------------------------- dtypes


def test_resolve_dtype():
    assert M.resolve_dtype("bfloat16") is torch.bfloat16
    assert M.resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        M.resolve_dtype("fp33")


# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_is_deterministic_and_sized(arch):
    before = torch.random.get_rng_state()
    a = M.tiny_model(arch, VOCAB, n_layer=3, n_embd=32, n_head=2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before), "global RNG must not move"
    b = M.tiny_model(arch, VOCAB, n_layer=3, n_embd=32, n_head=2, seed=5)
    c = M.tiny_model(arch, VOCAB, n_layer=3, n_embd=32, n_head=2, seed=6)
    ids = _ids()
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    assert not torch.allclose(_logits(a, ids), _logits(c, ids))
    assert M.model_arch(a) == arch
    assert a.config.num_hidden_layers == 3
    assert _logits(a, ids).shape == (2, 9, VOCAB)
    assert a.get_output_embeddings().weight is a.get_input_embeddings().weight  # tied


def test_tiny_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match="gpt2"):
        M.tiny_model("bert", VOCAB)


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_keeps_first_layers_and_teacher(arch):
    teacher = M.freeze(M.tiny_model(arch, VOCAB, n_layer=3, seed=1))
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    ids = _ids()
    student = M.prune_layers(teacher, 2)

    # teacher untouched
    assert teacher.config.num_hidden_layers == 3
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    # student: first 2 layers' weights, same embeddings, fresh storage, trainable, tied head
    assert student.config.num_hidden_layers == 2
    s_state = student.state_dict()
    assert set(s_state) <= set(teacher_state)
    assert all(torch.equal(v, teacher_state[k]) for k, v in s_state.items())
    assert not any(".2." in k for k in s_state)
    assert all(p.requires_grad for p in student.parameters())
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    with torch.no_grad():
        student.get_input_embeddings().weight.add_(1.0)
    assert torch.equal(teacher.get_input_embeddings().weight, teacher_state[_embed_key(arch)])

    # pruned logits == teacher's hidden state after layer 2, through final norm and head
    fresh = M.prune_layers(teacher, 2)
    with torch.no_grad():
        hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states[2]
        norm, head = _final_norm_and_head(teacher)
        manual = head(norm(hidden))
    torch.testing.assert_close(_logits(fresh, ids), manual, rtol=1e-5, atol=1e-5)
    # keeping every layer changes nothing
    assert torch.equal(_logits(M.prune_layers(teacher, 3), ids), _logits(teacher, ids))


def _embed_key(arch):
    return "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"


@pytest.mark.parametrize("k", [0, 4])
def test_prune_rejects_bad_depth(k):
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        M.prune_layers(M.tiny_model("llama", VOCAB, n_layer=3), k)


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trains_only_adapters(arch):
    base = M.tiny_model(arch, VOCAB, seed=2)
    ids = _ids()
    before = _logits(base, ids).clone()
    model = M.apply_lora(base, r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert M.count_parameters(model, trainable_only=True) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    # every default target got an adapter
    targeted = {n.split(".lora_")[0].split(".")[-1] for n in trainable}
    assert targeted == set(M.LORA_TARGETS[arch])
    assert torch.equal(_logits(model, ids), before)  # lora_B starts at zero

    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    _lora_step(model, ids)
    after = _logits(model, ids)
    assert not torch.allclose(after, before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    merged = M.merge_lora(model)
    assert not M._is_peft(merged)
    torch.testing.assert_close(_logits(merged, ids), after, rtol=1e-4, atol=1e-4)


def test_lora_fallback_targets_all_linear_but_head():
    names = M._linear_names(M.tiny_model("llama", VOCAB))
    assert names == sorted(M.LORA_TARGETS["llama"])


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip_full(tmp_path):
    model = M.tiny_model("llama", VOCAB, seed=3)
    ids = _ids()
    out = tmp_path / "ckpt"
    M.save_model(model, out)
    M.save_model(M.tiny_model("llama", VOCAB, seed=4), out)  # overwrite an existing dir
    reloaded = M.load_saved(out)
    assert torch.equal(_logits(reloaded, ids), _logits(M.tiny_model("llama", VOCAB, seed=4), ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no tmp/old dirs left


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_lora(tmp_path, arch):
    student = M.prune_layers(M.tiny_model(arch, VOCAB, n_layer=3, seed=5), 2)
    model = M.apply_lora(student, r=4, dropout=0.0)
    ids = _ids()
    _lora_step(model, ids)
    expected = _logits(model, ids)
    M.save_model(model, tmp_path / "lora")
    # a pruned base has no source to reload from, so it is saved next to the adapter
    assert (tmp_path / "lora" / "adapter_config.json").exists()
    assert (tmp_path / "lora" / M.BASE_SUBDIR / "config.json").exists()
    reloaded = M.load_saved(tmp_path / "lora")
    assert M._is_peft(reloaded)
    assert reloaded.get_base_model().config.num_hidden_layers == 2
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 4-bit / QLoRA


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    M.save_model(M.tiny_model("llama", VOCAB, n_embd=64, seed=7), path)
    return path


def test_4bit_teacher_close_to_fp32(tiny_llama_dir):
    full = M.load_pretrained(tiny_llama_dir)
    quant = M.freeze(M.load_pretrained(tiny_llama_dir, quantization="4bit"))
    assert quant.is_loaded_in_4bit
    assert M.count_parameters(quant) == M.count_parameters(full)  # packed weights counted right
    ids = _ids()
    ref, got = _logits(full, ids), _logits(quant, ids)
    assert torch.isfinite(got).all()
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0)
    assert cos > 0.95
    assert (ref - got).abs().max() < 0.5
    # an in-memory model quantizes to the same thing as loading its saved files
    assert M.quantize_in_memory(full, "none") is full
    in_memory = M.freeze(M.quantize_in_memory(full, "4bit"))
    assert in_memory.is_loaded_in_4bit and in_memory.name_or_path == ""
    torch.testing.assert_close(_logits(in_memory, ids), got)


def test_qlora_student_trains_after_eval(tiny_llama_dir, tmp_path):
    quant = M.load_pretrained(tiny_llama_dir, quantization="4bit")
    ids = _ids()
    _logits(quant, ids)  # eval + no_grad: bnb may repack weights for CPU inference here
    model = M.apply_lora(quant, r=4, dropout=0.0)
    _logits(model, ids)  # an evaluation between training steps must not break training
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    b_grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert b_grads and all(g is not None and g.abs().sum() > 0 for g in b_grads.values())
    before = _logits(model, ids)
    _lora_step(model, ids)
    assert not torch.allclose(_logits(model, ids), before)


def test_qlora_round_trip(tiny_llama_dir, tmp_path):
    model = M.apply_lora(M.load_pretrained(tiny_llama_dir, quantization="4bit"), r=4, dropout=0.0)
    ids = _ids()
    _lora_step(model, ids)
    after = _logits(model, ids)
    # QLoRA checkpoint: adapter only (the base is a loadable local dir), reloads as QLoRA
    M.save_model(model, tmp_path / "qlora")
    assert not (tmp_path / "qlora" / M.BASE_SUBDIR).exists()
    reloaded = M.load_saved(tmp_path / "qlora", quantization="4bit", is_trainable=True)
    torch.testing.assert_close(_logits(reloaded, ids), after, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- vocab check


def _tokenizer(words, eos="</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos)


WORDS = ["<unk>", "</s>", "the", "cat", "sat", "on", "mat"]


def test_check_same_vocab_accepts_identical():
    M.check_same_vocab(
        _tokenizer(WORDS), _tokenizer(WORDS),
        M.tiny_model("llama", len(WORDS)), M.tiny_model("gpt2", len(WORDS)),
    )


def test_check_same_vocab_reports_differences():
    teacher = _tokenizer(WORDS)
    with pytest.raises(ValueError) as err:
        M.check_same_vocab(teacher, _tokenizer(WORDS[:2] + ["dog"] + WORDS[2:]))
    msg = str(err.value)
    assert "teacher 7, student 8" in msg and "'dog'" in msg and "'the' 2->3" in msg
    assert "same tokenizer" in msg
    with pytest.raises(ValueError, match="eos_token_id"):
        M.check_same_vocab(teacher, _tokenizer(WORDS, eos="mat"))
    with pytest.raises(ValueError, match="logit sizes: teacher 7, student 16"):
        M.check_same_vocab(teacher, teacher, M.tiny_model("llama", 7), M.tiny_model("llama", 16))
    with pytest.raises(ValueError, match="5 logits but its tokenizer has 7"):
        M.check_same_vocab(teacher, teacher, M.tiny_model("llama", 5))


# ----------------------------------------------------------------------------- misc


def test_freeze_and_count_parameters():
    model = M.tiny_model("llama", VOCAB, n_layer=1, n_embd=16, n_head=2)
    model.train()
    # embed (tied head counted once) + 1 layer (4 attn + 3 mlp projections, 2 norms) + final norm
    expected = VOCAB * 16 + 4 * 16 * 16 + 3 * 16 * 64 + 2 * 16 + 16
    assert M.count_parameters(model) == expected
    assert M.freeze(model) is model
    assert not model.training
    assert M.count_parameters(model, trainable_only=True) == 0


def test_offline_hub_id_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(M.ModelLoadError, match="no network.*`cpu` profile.*local"):
        M.load_pretrained("HuggingFaceTB/SmolLM2-1.7B-Instruct-not-cached")
    assert time.monotonic() - start < 5
    with pytest.raises(M.ModelLoadError, match="no config.json"):
        M.load_pretrained(tmp_path)
    # a config without weights: transformers' own OSError comes back wrapped, about the
    # folder (a local path has nothing to do with the network)
    M.tiny_model("llama", VOCAB).config.save_pretrained(tmp_path)
    with pytest.raises(M.ModelLoadError, match="local path.*model.safetensors") as err:
        M.load_pretrained(tmp_path)
    assert "network" not in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- SmolLM2 (GGUF)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 loaded once: the raw GGUF model (captured from materialize), the
    materialized one, its tokenizer, and the cache dir load_smollm2 filled."""
    from transformers import AutoTokenizer

    cache = tmp_path_factory.mktemp("smollm2") / "model"
    seen = {}
    real = M.materialize

    def spy(model):
        seen["raw"] = model
        return real(model)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "materialize", spy)
        model = M.load_smollm2(cache_dir=cache)
    gguf = M.smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return {"raw": seen["raw"], "model": model, "tok": tok, "cache": cache}


def test_smollm2_greedy_says_paris(smollm2):
    tok, model = smollm2["tok"], smollm2["model"]
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    enc = tok("The capital of France is", return_tensors="pt")
    assert enc.input_ids[0, 0].item() != tok.bos_token_id  # no BOS added
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id
        )
    assert "Paris" in tok.decode(out[0, enc.input_ids.shape[1]:])


def test_smollm2_materialize_save_reload(smollm2, tmp_path):
    raw, model, tok = smollm2["raw"], smollm2["model"], smollm2["tok"]
    with pytest.raises(ValueError, match="gguf"):
        raw.save_pretrained(tmp_path / "raw")
    assert model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = tok("Distil the teacher.", return_tensors="pt").input_ids
    expected = _logits(model, ids)
    assert torch.equal(_logits(raw, ids), expected)
    # load_smollm2 cached the materialized model; a second call reads it back quickly
    start = time.monotonic()
    again = M.load_smollm2(cache_dir=smollm2["cache"])
    assert time.monotonic() - start < 10
    assert torch.equal(_logits(again, ids), expected)


def test_smollm2_pruned_student(smollm2, tmp_path):
    teacher, tok = smollm2["model"], smollm2["tok"]
    student = M.prune_layers(teacher, 6)
    assert student.config.num_hidden_layers == 6 and teacher.config.num_hidden_layers == 30
    M.check_same_vocab(tok, tok, teacher, student)
    M.save_model(student, tmp_path / "student", tok)
    ids = tok("Hello", return_tensors="pt").input_ids
    reloaded = M.load_saved(tmp_path / "student")
    # the round trip keeps every weight bit for bit; the logits only to float rounding, as
    # fresh tensors can take another BLAS path than the pruned model's (seen: 1.5e-5 apart)
    saved, mine = reloaded.state_dict(), student.state_dict()
    assert saved.keys() == mine.keys() and all(torch.equal(saved[k], mine[k]) for k in mine)
    assert torch.allclose(_logits(reloaded, ids), _logits(student, ids), rtol=0, atol=1e-4)
