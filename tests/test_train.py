"""The training loop: every objective learns on a fixed batch; cached teacher == online;
4-bit teacher + LoRA student; the step loss is the documented mix of its parts."""
import math

import pytest
import torch

from dpkd_lib.config import load_config
from dpkd_lib.results import read_json, read_jsonl
from dpkd_lib.train import Trainer, lr_at, train

from test_config import SMOKE

OBJECTIVES = ["sft", "kd", "rkl", "jsd", "seqkd", "dpkd_token", "dpkd_seq"]


@pytest.fixture(scope="module")
def sft_teacher(tmp_path_factory):
    """A tiny teacher that knows something: SFT on the synthetic set, saved, reloaded as a
    `saved` teacher — random tiny models agree with each other's argmax almost everywhere."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config(SMOKE, [f"output_dir={out}", "train.objective=sft", "teacher=null",
                              "student.n_layer=2", "student.n_embd=64", "train.max_steps=40",
                              "train.lr=0.005", "train.lm_coef=0.0", "eval.generate=false",
                              "train.save_every=0"])
    train(cfg, progress=False)
    return str(out / "model")


def fixed_batch_cfg(tmp_path, objective, *extra, teacher=None):
    """Four training examples and batch 4: every step sees the same batch."""
    saved = [f"teacher.source=saved", f"teacher.name_or_path={teacher}"] if teacher else []
    return load_config(SMOKE, [*saved,
        f"output_dir={tmp_path / objective}", f"train.objective={objective}",
        "data.n_train=4", "train.batch_size=4", "train.max_steps=6", "train.lr=0.01",
        "train.kd_ratio=1.0", "train.lm_coef=0.0", "data.pretrain_source=none",
        "train.save_every=0", "eval.generate=false", "train.seq_max_new_tokens=8", *extra])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_decreases_its_loss_on_a_fixed_batch(tmp_path, objective, sft_teacher):
    summary = train(fixed_batch_cfg(tmp_path, objective, teacher=sft_teacher), progress=False)
    rows = read_jsonl(tmp_path / objective / "metrics.jsonl")
    losses = [r["loss"] for r in rows]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    if objective == "dpkd_seq":
        # on-policy: the rejected side is resampled every step, so compare against the
        # student's own samples through the margin, which must grow
        assert rows[-1]["reward_margin"] > rows[0]["reward_margin"]
    else:
        assert losses[-1] < losses[0], losses
    if objective == "dpkd_token":
        assert rows[0]["argmax_disagree"] > 0.2, "the test needs a teacher that disagrees"
        assert rows[-1]["reward_margin"] > rows[0]["reward_margin"]
    assert summary["steps"] == 6 and math.isfinite(summary["valid_nll"])
    assert read_json(tmp_path / objective / "manifest.json")["status"] == "finished"


@pytest.mark.parametrize("objective", ["dpkd_token", "dpkd_seq"])
def test_step_loss_is_the_documented_mix(tmp_path, objective):
    """(1-k)·CE + k·objective + lm·[(1-k)·CE_pt + k·H(p,q)_pt] with the logged parts."""
    cfg = load_config(SMOKE, [f"output_dir={tmp_path / 'mix'}", "train.kd_ratio=0.3",
                              "train.lm_coef=0.7", f"train.objective={objective}",
                              "train.seq_max_new_tokens=8", f"train.cache_dir={tmp_path / 'cache'}"])
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    loss, parts, _ = trainer.step_loss(0)
    k, lm = 0.3, 0.7
    expected = (1 - k) * parts["ce"] + k * parts["distill"] + lm * ((1 - k) * parts["pt_ce"] + k * parts["pt_kd"])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("objective", ["dpkd_token", "kd", "rkl", "jsd"])
def test_exact_hidden_cache_trains_like_the_online_teacher(tmp_path, objective):
    """Stored final hidden states + the teacher's head reproduce the online teacher: same
    losses (pre-train KD term included) and the same trained weights."""
    common = ["train.max_steps=3", "eval.generate=false", "train.save_every=0",
              f"train.objective={objective}", f"train.cache_dir={tmp_path / 'cache'}"]
    train(load_config(SMOKE, [f"output_dir={tmp_path / 'online'}", *common]), progress=False)
    train(load_config(SMOKE, [f"output_dir={tmp_path / 'cached'}", "train.teacher_mode=cache",
                              "train.cache_format=hidden", *common]), progress=False)
    a = read_jsonl(tmp_path / "online" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "cached" / "metrics.jsonl")
    for key in ("loss", "distill", "pt_kd"):
        for ra, rb in zip(a, b):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), key
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "online" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cached" / "model" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_topk_cache_with_k_at_vocabulary_size_is_exact(tmp_path):
    common = ["train.max_steps=3", "eval.generate=false", "train.save_every=0",
              f"train.cache_dir={tmp_path / 'cache'}"]
    online = load_config(SMOKE, [f"output_dir={tmp_path / 'online'}", *common])
    vocab = online.tokenizer.vocab_size
    cached = load_config(SMOKE, [f"output_dir={tmp_path / 'cached'}", "train.teacher_mode=cache",
                                 "train.cache_format=topk", f"train.cache_topk={vocab + 16}", *common])
    train(online, progress=False)
    train(cached, progress=False)
    a = read_jsonl(tmp_path / "online" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "cached" / "metrics.jsonl")
    for key in ("loss", "distill", "pt_kd", "reward_margin"):
        for ra, rb in zip(a, b):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), key
    assert any((tmp_path / "cache").iterdir()), "the cache was written to train.cache_dir"


def test_small_k_cache_is_close_and_never_loads_the_teacher_twice(tmp_path, monkeypatch):
    import dpkd_lib.train as train_mod
    common = ["train.max_steps=2", "eval.generate=false", f"train.cache_dir={tmp_path / 'cache'}",
              "train.teacher_mode=cache", "train.cache_format=topk", "train.cache_topk=8"]
    train(load_config(SMOKE, [f"output_dir={tmp_path / 'a'}", *common]), progress=False)
    built = []
    original = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model",
                        lambda mcfg, tok, trainable: built.append(trainable) or original(mcfg, tok, trainable=trainable))
    train(load_config(SMOKE, [f"output_dir={tmp_path / 'b'}", "train.seed=41", *common]), progress=False)
    assert built == [True], "with a complete cache only the student is built"


def test_4bit_teacher_and_lora_student_on_cpu(tmp_path):
    cfg = load_config(SMOKE, [f"output_dir={tmp_path / 'q'}", "teacher.quantization=4bit",
                              "student.lora=true", "student.lora_r=4", "train.max_steps=3",
                              "eval.generate=false", "train.save_every=0"])
    summary = train(cfg, progress=False)
    rows = read_jsonl(tmp_path / "q" / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in rows) and summary["steps"] == 3
    assert (tmp_path / "q" / "model" / "adapter_config.json").exists()


def test_cosine_schedule_matches_formula():
    cfg = load_config(SMOKE, ["train.max_steps=10", "train.lr=1e-3", "train.min_lr=1e-5",
                              "train.t_max_steps=8"]).train
    assert lr_at(0, cfg) == pytest.approx(1e-3)
    assert lr_at(4, cfg) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(8, cfg) == pytest.approx(1e-5) and lr_at(9, cfg) == pytest.approx(1e-5)


@pytest.mark.parametrize("average", [False, True])
def test_row_logps_from_response_rows_equal_full_logits(average):
    """DPKD-seq scores sequences from response-row logits only; same numbers as full logits."""
    from dpkd_lib import losses
    from dpkd_lib.models import tiny_model
    from dpkd_lib.train import response_logits, row_logps
    torch.manual_seed(0)
    model = tiny_model("llama", 50, n_layer=1, n_embd=32, n_head=4, seed=3)
    ids = torch.randint(1, 50, (3, 9))
    labels = ids.clone()
    labels[0, :4] = labels[1, :2] = labels[2, :6] = -100
    labels[1, 7:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    full = model(input_ids=ids).logits[:, :-1].float()
    expected = losses.sequence_logps(full, labels[:, 1:], average=average)
    got = row_logps(*response_logits(model, batch), batch, average)
    assert torch.allclose(got, expected, atol=1e-5)


def test_dpkd_seq_keeps_ce_on_the_dataset_and_the_teacher_response_as_chosen(tmp_path, monkeypatch):
    """DPKD-seq's CE term is on the dataset responses, like every distillation objective
    (the same CE as DPKD-token's on the same batch); the chosen side of its preference pair
    is the teacher's sampled response to the same prompt, a batch of its own."""
    import dpkd_lib.train as train_mod
    common = ["train.seq_max_new_tokens=8", f"train.cache_dir={tmp_path / 'cache'}"]
    trainers = {}
    for objective in ("dpkd_token", "dpkd_seq"):
        tr = Trainer(load_config(SMOKE, [f"output_dir={tmp_path / objective}",
                                         f"train.objective={objective}", *common]), progress=False)
        tr.setup()
        trainers[objective] = tr
    seq, tok = trainers["dpkd_seq"], trainers["dpkd_token"]
    assert [ex["input_ids"] for ex in seq.train_set] == [ex["input_ids"] for ex in tok.train_set]
    seen = {}
    original = train_mod.sequence_preference
    monkeypatch.setattr(train_mod, "sequence_preference",
                        lambda tcfg, s, t, pair: seen.update(pair) or original(tcfg, s, t, pair))
    _, seq_parts, ids = seq.step_loss(0)
    _, tok_parts, tok_ids = tok.step_loss(0)
    assert list(ids) == list(tok_ids)
    assert seq_parts["ce"] == pytest.approx(tok_parts["ce"], rel=1e-6)
    teacher_rows = {r["id"]: r["response"] for r in read_jsonl(tmp_path / "dpkd_seq" / "teacher_responses.jsonl")}
    chosen = seq.tokenizer.batch_decode(torch.where(seen["chosen"]["labels"] == -100, seq.tokenizer.pad_token_id,
                                                    seen["chosen"]["labels"]), skip_special_tokens=True)
    dataset = {ex["id"]: ex for ex in seq.train_set}
    for i, text in zip(ids, chosen):
        assert text.strip() == teacher_rows[i].strip()
        assert not torch.equal(torch.tensor(seq.chosen_by_id[i]["input_ids"]), torch.tensor(dataset[i]["input_ids"]))


def test_teacher_responses_are_sampled_once_per_seed_and_shared(tmp_path, monkeypatch):
    """SeqKD and DPKD-seq of one seed read the same teacher samples; another seed samples anew."""
    import dpkd_lib.train as train_mod
    calls = []
    original = train_mod.eval_lib.generate
    monkeypatch.setattr(train_mod.eval_lib, "generate",
                        lambda *a, **k: calls.append(k["seed"]) or original(*a, **k))
    common = ["train.seq_max_new_tokens=8", f"train.cache_dir={tmp_path / 'cache'}"]
    responses = {}
    for name, objective, seed in (("a", "dpkd_seq", 1), ("b", "seqkd", 1), ("c", "dpkd_seq", 2)):
        tr = Trainer(load_config(SMOKE, [f"output_dir={tmp_path / name}", f"train.objective={objective}",
                                         f"train.seed={seed}", *common]), progress=False)
        tr.setup()
        responses[name] = [r["response"] for r in read_jsonl(tmp_path / name / "teacher_responses.jsonl")]
    assert calls == [1, 2]
    assert responses["a"] == responses["b"] and responses["a"] != responses["c"]


@pytest.mark.parametrize("mode", ["online", "topk"])
def test_token_level_simpo_margin_reaches_the_loss(tmp_path, mode):
    """train.gamma is SimPO's margin at the token level too: −log σ(z − γ) > −log σ(z), so a
    positive margin raises the DPKD term at every position (with γ = 0 token-level SimPO is
    exactly the reference-free loss)."""
    common = ["train.loss_type=simpo", f"train.cache_dir={tmp_path / 'cache'}"]
    if mode == "topk":
        common += ["train.teacher_mode=cache", "train.cache_format=topk", "train.cache_topk=8"]
    distill = {}
    for gamma in (0.0, 0.5):
        tr = Trainer(load_config(SMOKE, [f"output_dir={tmp_path / str(gamma)}", f"train.gamma={gamma}",
                                         *common]), progress=False)
        tr.setup()
        distill[gamma] = tr.step_loss(0)[1]["distill"]
    assert distill[0.5] > distill[0.0] + 1e-3
