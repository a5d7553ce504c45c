"""The training loop: every objective learns on a fixed batch; cached teacher == online;
4-bit teacher + LoRA student; the step loss is the documented mix of its parts."""
import json
import math

import pytest
import torch

from dpkd_lib.config import load_config
from dpkd_lib.io import read_json, read_jsonl
from dpkd_lib.train import Trainer, lr_at, train

from test_config import SMOKE

from dpkd_lib.choices import DISTILL_OBJECTIVES, OBJECTIVES, SAMPLING_OBJECTIVES, TEACHER_OBJECTIVES


@pytest.fixture(scope="module")
def sft_teacher(tmp_path_factory):
    """A tiny teacher that knows something: SFT on the synthetic set, saved, reloaded as a
    `saved` teacher — random tiny models agree with each other's argmax almost everywhere."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config(SMOKE, [f"output_dir={out}", "train.objective=sft", "teacher=null",
                              "student.n_layer=2", "student.n_embd=64", "train.max_steps=40",
                              "train.lr=0.005", "train.lm_coef=0.0", "data.pretrain_source=none", "eval.splits=[]",
                              "train.save_every=0"])
    train(cfg, progress=False)
    return str(out / "model")


def fixed_batch_cfg(tmp_path, objective, *extra, teacher=None):
    """Four training examples and batch 4: every step sees the same batch."""
    saved = ['teacher={"source": "saved", "name_or_path": "%s"}' % teacher] if teacher else []
    if objective not in TEACHER_OBJECTIVES:   # sft; no_distill without a pre-train term here
        saved = ["teacher=null"]
    return load_config(SMOKE, [*saved,
        f"output_dir={tmp_path / objective}", f"train.objective={objective}",
        "data.n_train=4", "train.batch_size=4", "train.max_steps=6", "train.lr=0.01",
        "train.lm_coef=0.0", "data.pretrain_source=none", "train.save_every=0", "eval.splits=[]",
        *(["train.kd_ratio=1.0"] if objective in DISTILL_OBJECTIVES else []),
        *(["train.seq_max_new_tokens=8"] if objective in SAMPLING_OBJECTIVES else []), *extra])


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
    seq = ["train.seq_max_new_tokens=8"] if objective == "dpkd_seq" else []
    cfg = load_config(SMOKE, [f"output_dir={tmp_path / 'mix'}", "train.kd_ratio=0.3",
                              "train.lm_coef=0.7", f"train.objective={objective}", *seq,
                              f"cache_dir={tmp_path / 'cache'}"])
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    out, _ = trainer.step_loss(0)
    parts = out.parts
    k, lm = 0.3, 0.7
    expected = (1 - k) * parts["ce"] + k * parts["distill"] + lm * ((1 - k) * parts["pt_ce"] + k * parts["pt_kd"])
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert sum(t.item() for t in out.terms.values()) == pytest.approx(out.total.item(), rel=1e-6)
    # the paper's Algorithm 1: L_DPKD + λ·L_PT, with L_PT the plain LM cross-entropy
    alg1 = load_config(SMOKE, [f"output_dir={tmp_path / 'alg1'}", "train.kd_ratio=1.0", "train.lm_coef=0.7",
                               "train.pretrain_loss=ce", f"train.objective={objective}", *seq,
                               f"cache_dir={tmp_path / 'cache'}"])
    trainer = Trainer(alg1, progress=False)
    trainer.setup()
    out, _ = trainer.step_loss(0)
    assert set(out.terms) == {"distill", "pt_ce"} and "pt_kd" not in out.parts
    assert out.total.item() == pytest.approx(out.parts["distill"] + 0.7 * out.parts["pt_ce"], rel=1e-5)


@pytest.mark.parametrize("mode", ["online", "cache"])
def test_no_distill_is_the_mix_with_its_distillation_slot_empty(tmp_path, mode):
    """The control of the released mix: the same CE and pre-train terms, with the same
    weights, as a distillation objective's step on the same batch, and no distillation
    term; with Algorithm 1's settings (kd_ratio 1, pretrain_loss ce) it is the pre-train CE
    alone and needs no teacher. A control with no term at all is refused."""
    from dpkd_lib.config import ConfigError
    cache = ["train.teacher_mode=cache"] if mode == "cache" else []
    outs = {}
    for objective in ("dpkd_token", "no_distill"):
        tr = Trainer(load_config(SMOKE, [f"output_dir={tmp_path / objective}", f"cache_dir={tmp_path / 'cache'}",
                                         f"train.objective={objective}", "train.kd_ratio=0.3", "train.lm_coef=0.7",
                                         *cache]), progress=False)
        tr.setup()
        outs[objective] = tr.step_loss(0)[0]
    full, control = outs["dpkd_token"], outs["no_distill"]
    assert set(control.terms) == {"ce", "pt_ce", "pt_kd"} and "distill" not in control.parts
    for name in ("ce", "pt_ce", "pt_kd"):
        assert control.terms[name].item() == pytest.approx(full.terms[name].item(), rel=1e-6)
    assert control.total.item() == pytest.approx(full.total.item() - 0.3 * full.parts["distill"], rel=1e-5)
    alg1 = load_config(SMOKE, [f"output_dir={tmp_path / 'alg1'}", "train.objective=no_distill", "teacher=null",
                               "train.kd_ratio=1.0", "train.lm_coef=0.7", "train.pretrain_loss=ce"])
    tr = Trainer(alg1, progress=False)
    tr.setup()
    out = tr.step_loss(0)[0]
    assert set(out.terms) == {"pt_ce"} and tr.teacher_model is None
    assert out.total.item() == pytest.approx(0.7 * out.parts["pt_ce"], rel=1e-6)
    with pytest.raises(ConfigError, match="no term at all"):
        load_config(SMOKE, ["train.objective=no_distill", "teacher=null", "train.kd_ratio=1.0", "train.lm_coef=0.0",
                            "data.pretrain_source=none"])
    with pytest.raises(ConfigError, match="needs a teacher section"):
        load_config(SMOKE, ["train.objective=no_distill", "teacher=null"])


@pytest.mark.parametrize("objective", ["dpkd_token", "kd", "rkl", "jsd"])
def test_exact_hidden_cache_trains_like_the_online_teacher(tmp_path, objective):
    """Stored final hidden states + the teacher's head reproduce the online teacher: same
    losses (pre-train KD term included) and the same trained weights."""
    common = ["train.max_steps=3", "eval.splits=[]", "train.save_every=0",
              f"train.objective={objective}", f"cache_dir={tmp_path / 'cache'}"]
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
    common = ["train.max_steps=3", "eval.splits=[]", "train.save_every=0",
              f"cache_dir={tmp_path / 'cache'}"]
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
    common = ["train.max_steps=2", "eval.splits=[]", f"cache_dir={tmp_path / 'cache'}",
              "train.teacher_mode=cache", "train.cache_format=topk", "train.cache_topk=8"]
    train(load_config(SMOKE, [f"output_dir={tmp_path / 'a'}", *common]), progress=False)
    built = []
    original = train_mod.model_lib.build_model
    monkeypatch.setattr(train_mod.model_lib, "build_model",
                        lambda mcfg, tok, trainable: built.append(trainable) or original(mcfg, tok, trainable=trainable))
    train(load_config(SMOKE, [f"output_dir={tmp_path / 'b'}", "train.seed=41", *common]), progress=False)
    assert built == [True], "with a complete cache only the student is built"


def test_4bit_teacher_and_lora_student_on_cpu(tmp_path):
    cfg = load_config(SMOKE, [f"output_dir={tmp_path / 'q'}", "teacher.quantization=4bit",
                              "student.lora=true", "student.lora_r=4", "train.max_steps=3",
                              "eval.splits=[]", "train.save_every=0"])
    summary = train(cfg, progress=False)
    rows = read_jsonl(tmp_path / "q" / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in rows) and summary["steps"] == 3
    assert (tmp_path / "q" / "model" / "adapter_config.json").exists()


def test_cosine_schedule_matches_torch_and_the_released_runner():
    """t_max_steps > 0 is torch's CosineAnnealingLR (the released runner's, T_max = 20 of 30
    epochs): it reaches min_lr at T_max and climbs back after it. 0 = one decay over the run."""
    cfg = load_config(SMOKE, ["train.max_steps=12", "train.lr=1e-3", "train.min_lr=1e-5",
                              "train.t_max_steps=8"]).train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8, eta_min=1e-5)
    for step in range(12):
        assert lr_at(step, cfg) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), step
        opt.step()
        sched.step()
    assert lr_at(8, cfg) == pytest.approx(1e-5) and lr_at(11, cfg) > 1e-4  # climbs back
    whole = load_config(SMOKE, ["train.max_steps=10", "train.lr=1e-3", "train.min_lr=1e-5",
                                "train.warmup_steps=2"]).train
    assert [lr_at(s, whole) for s in (0, 1)] == pytest.approx([5e-4, 1e-3])
    assert lr_at(9, whole) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 7 / 8)))


@pytest.mark.parametrize("average", [False, True])
def test_row_logps_from_response_rows_equal_full_logits(average):
    """DPKD-seq scores sequences from response-row logits only; same numbers as full logits."""
    from dpkd_lib import losses
    from dpkd_lib.models import tiny_model
    from dpkd_lib.objectives import response_logits, row_logps
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
    is the teacher's sampled response to the same prompt, a batch of its own, and the
    teacher's log-probs of it are computed once (not at every step)."""
    import dpkd_lib.objectives as obj_lib
    trainers = {}
    for objective in ("dpkd_token", "dpkd_seq"):
        extra = ["train.seq_max_new_tokens=8"] if objective == "dpkd_seq" else []
        tr = Trainer(load_config(SMOKE, [f"output_dir={tmp_path / objective}", f"cache_dir={tmp_path / 'cache'}",
                                         f"train.objective={objective}", *extra]), progress=False)
        tr.setup()
        trainers[objective] = tr
    seq, tok = trainers["dpkd_seq"], trainers["dpkd_token"]
    assert [ex["input_ids"] for ex in seq.train_set] == [ex["input_ids"] for ex in tok.train_set]
    seen = {}
    original = obj_lib.sequence_preference
    monkeypatch.setattr(obj_lib, "sequence_preference",
                        lambda tcfg, s, t, pair: seen.update(pair) or original(tcfg, s, t, pair))
    seq_out, ids = seq.step_loss(0)
    tok_out, tok_ids = tok.step_loss(0)
    assert list(ids) == list(tok_ids)
    assert seq_out.parts["ce"] == pytest.approx(tok_out.parts["ce"], rel=1e-6)
    samples = dict(zip([ex["id"] for ex in seq.train_set], seq.teacher_sample_ids()))
    dataset = {ex["id"]: ex for ex in seq.train_set}
    for row, i in enumerate(ids):   # the chosen response is the teacher's sample, token for token
        labels = seen["chosen"]["labels"][row]
        new = samples[i]
        assert labels[labels != -100].tolist()[: len(new)] == new
        assert seq.chosen[i]["input_ids"] != dataset[i]["input_ids"]
        assert seen["chosen"]["input_ids"][row, : dataset[i]["prompt_len"]].tolist() == \
            dataset[i]["input_ids"][: dataset[i]["prompt_len"]]
    # the precomputed teacher log-probs are the teacher's log-probs of those chosen rows
    online = obj_lib.OnlineTeacher(seq.teacher_model).sequence_logps(seen["chosen"], True)
    assert torch.allclose(seen["ref_chosen"], online, atol=1e-5)
    assert torch.allclose(seen["ref_rejected"],
                          obj_lib.OnlineTeacher(seq.teacher_model).sequence_logps(seen["rejected"], True), atol=1e-5)


def _check_eos_rule(batch, eos: int, limit: int) -> list[bool]:
    """Each row of a DPKD-seq side: a response that ends in EOS has fewer than `limit` tokens
    before it and no other EOS; one without EOS has exactly `limit` tokens (it was cut).
    Returns whether each row ended by EOS."""
    ended = []
    for labels in batch["labels"]:
        resp = labels[labels != -100].tolist()
        assert eos not in resp[:-1], resp
        if resp[-1] == eos:
            assert len(resp) - 1 < limit, f"a response of {len(resp) - 1} tokens ended by EOS at limit {limit}"
            ended.append(True)
        else:
            assert len(resp) == limit, resp
            ended.append(False)
    return ended


def test_dpkd_seq_chosen_and_rejected_follow_one_eos_rule(tmp_path, monkeypatch):
    """Both sides of DPKD-seq's pair come from the same rule: a sample that stopped on its
    own keeps its EOS, a sample cut at seq_max_new_tokens gets none (the teacher's cut
    samples used to be re-tokenised with an EOS, so "stop within the limit" was the
    preference learned). Half the samples are stopped early here (as if the model had
    drawn EOS) so both cases occur on both sides; the summary reports the teacher's and the
    student's shares."""
    import dpkd_lib.train as train_mod
    original = train_mod.eval_lib.generate_ids

    def some_stop_early(model, tok, prompts, **k):
        out = original(model, tok, prompts, **k)
        return [ids[: j % 3] if j % 2 else ids for j, ids in enumerate(out)]
    monkeypatch.setattr(train_mod.eval_lib, "generate_ids", some_stop_early)
    limit = 4
    cfg = load_config(SMOKE, [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                              "train.objective=dpkd_seq", f"train.seq_max_new_tokens={limit}",
                              "train.batch_size=8", "train.max_steps=2", "eval.splits=[]", "train.save_every=0"])
    tr = Trainer(cfg, progress=False)
    tr.setup()
    pair = tr.dpkd_seq_pair(0)
    eos = tr.tokenizer.eos_token_id
    for side in ("chosen", "rejected"):
        ended = _check_eos_rule(pair[side], eos, limit)
        assert True in ended and False in ended, (side, ended)
        assert pair["lengths"][side]["ended_share"] == pytest.approx(sum(ended) / len(ended))
    stats = tr.teacher_sample_stats
    rows = list(tr.chosen.values())
    assert stats["teacher_sample_ended_share"] == pytest.approx(sum(r["ended"] for r in rows) / len(rows))
    assert 0 < stats["teacher_sample_ended_share"] < 1 and stats["teacher_sample_empty_share"] > 0
    summary = train(cfg, progress=False)
    for who in ("teacher_sample", "rejected_sample"):
        assert 0 < summary[f"{who}_ended_share"] < 1 and 0 < summary[f"{who}_new_tokens"] <= limit
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all("rejected_ended_share" in r and "chosen_new_tokens" in r for r in metrics)


def test_seqkd_teacher_samples_cut_at_the_limit_get_no_eos(tmp_path, monkeypatch):
    """SeqKD trains on the teacher's samples under DPKD-seq's EOS rule: a sample that stopped
    on its own ends in EOS, one cut at seq_max_new_tokens does not (it used to be re-tokenised
    with an EOS, teaching "stop within the limit"). A responses file written before samples
    said whether they ended is sampled again."""
    import dpkd_lib.train as train_mod
    original = train_mod.eval_lib.generate_ids

    def some_stop_early(model, tok, prompts, **k):
        out = original(model, tok, prompts, **k)
        return [ids[: 1 + j % 2] if j % 2 else ids for j, ids in enumerate(out)]
    monkeypatch.setattr(train_mod.eval_lib, "generate_ids", some_stop_early)
    limit = 4
    cfg = load_config(SMOKE, [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                              "train.objective=seqkd", f"train.seq_max_new_tokens={limit}",
                              "train.max_steps=1", "eval.splits=[]", "train.save_every=0"])
    tr = Trainer(cfg, progress=False)
    tr.setup()
    eos = tr.tokenizer.eos_token_id
    records = {r["id"]: r for r in tr.teacher_responses(tr.splits["train"])}
    ended = [records[ex["id"]]["response_ended"] for ex in tr.train_set]
    assert True in ended and False in ended
    for ex, e in zip(tr.train_set, ended):
        assert (ex["labels"][-1] == eos) == e, (ex["id"], e)
    # an older file (no response_ended) is not trusted: the samples are drawn again
    [path] = (tmp_path / "cache" / "responses").glob("*.jsonl")
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "response_ended"}) + "\n"
                            for r in records.values()))
    monkeypatch.setattr(train_mod.eval_lib, "generate_ids", lambda *a, **k: pytest.fail("resampled") or [])
    with pytest.raises(pytest.fail.Exception, match="resampled"):
        tr.teacher_responses(tr.splits["train"])


def test_dpkd_seq_batch_on_policy_samples_every_k_steps(tmp_path, monkeypatch):
    """rejected_every = k: the student's samples for k steps are drawn at once (one generate
    call per k steps), each step still gets its own batch's prompts."""
    import dpkd_lib.train as train_mod
    calls = []
    original = train_mod.eval_lib.generate_ids
    monkeypatch.setattr(train_mod.eval_lib, "generate_ids",
                        lambda model, tok, prompts, **k: calls.append(len(prompts)) or original(model, tok, prompts, **k))
    cfg = load_config(SMOKE, [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                              "train.objective=dpkd_seq", "train.seq_max_new_tokens=6", "train.max_steps=5",
                              "train.rejected_every=2", "eval.splits=[]", "train.save_every=0"])
    train(cfg, progress=False)
    # the teacher's samples (chosen side) for every kept training prompt, once; then batch 4:
    # steps (1, 2), (3, 4), (5)
    kept = read_json(tmp_path / "run" / "manifest.json")["filter_report"]["kept"]
    assert calls == [kept, 8, 8, 4] and kept > 8
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 5 and all(math.isfinite(r["loss"]) and r["rejected_len"] >= 1 for r in rows)


def test_teacher_responses_are_sampled_once_and_shared_by_every_seed(tmp_path, monkeypatch):
    """SeqKD and DPKD-seq, of any training seed, read one set of teacher samples (drawn once,
    with TEACHER_SAMPLE_SEED); another sample length draws a new set."""
    import dpkd_lib.train as train_mod
    calls = []
    original = train_mod.eval_lib.generate_ids
    monkeypatch.setattr(train_mod.eval_lib, "generate_ids",
                        lambda *a, **k: calls.append((k["seed"], k["max_new_tokens"])) or original(*a, **k))
    responses = {}
    for name, objective, seed, length in (("a", "dpkd_seq", 1, 8), ("b", "seqkd", 1, 8), ("c", "dpkd_seq", 2, 8),
                                          ("d", "seqkd", 2, 6)):
        tr = Trainer(load_config(SMOKE, [f"output_dir={tmp_path / name}", f"train.objective={objective}",
                                         f"train.seed={seed}", f"train.seq_max_new_tokens={length}",
                                         f"cache_dir={tmp_path / 'cache'}"]), progress=False)
        tr.setup()
        responses[name] = [r["response"] for r in tr.teacher_responses(tr.splits["train"])]
    # drawn once each: DPKD-seq's token ids at length 8, the texts at length 8, then at 6
    assert calls == [(train_mod.TEACHER_SAMPLE_SEED, 8)] * 2 + [(train_mod.TEACHER_SAMPLE_SEED, 6)]
    assert responses["a"] == responses["b"] == responses["c"] != responses["d"]
    # 2 text sets (length 8 and 6) and DPKD-seq's token ids at length 8, shared by seeds 1 and 2
    assert len(list((tmp_path / "cache" / "responses").glob("*.jsonl"))) == 3


@pytest.mark.parametrize("mode", ["online", "topk"])
def test_token_level_simpo_margin_reaches_the_loss(tmp_path, mode):
    """train.gamma is SimPO's margin at the token level too: −log σ(z − γ) > −log σ(z), so a
    positive margin raises the DPKD term at every position (with γ = 0 token-level SimPO is
    exactly the reference-free loss)."""
    common = ["train.loss_type=simpo", f"cache_dir={tmp_path / 'cache'}"]
    if mode == "topk":
        common += ["train.teacher_mode=cache", "train.cache_format=topk", "train.cache_topk=8"]
    distill = {}
    for gamma in (0.0, 0.5):
        tr = Trainer(load_config(SMOKE, [f"output_dir={tmp_path / str(gamma)}", f"train.gamma={gamma}",
                                         *common]), progress=False)
        tr.setup()
        distill[gamma] = tr.step_loss(0)[0].parts["distill"]
    assert distill[0.5] > distill[0.0] + 1e-3


# every objective × every setting that can change a loss: a setting the run accepts changes
# the step loss; a setting it refuses ("is not used") would not have changed it
PROBES = [  # (name, settings it needs, the probe)
    ("kd_ratio", {}, {"kd_ratio": 0.3}),
    ("lm_coef", {}, {"lm_coef": 0.2}),
    ("pretrain_loss", {}, {"pretrain_loss": "ce"}),
    ("beta", {}, {"beta": 0.7}),
    ("loss_type", {}, {"loss_type": "ipo"}),
    ("label_smoothing", {}, {"label_smoothing": 0.2}),
    ("reference_free", {}, {"reference_free": True}),
    ("gamma", {"loss_type": "simpo"}, {"gamma": 0.3}),
    ("dpop_lambda", {"loss_type": "dpop"}, {"dpop_lambda": 2.0}),
    ("cpo_alpha", {"loss_type": "cpo"}, {"cpo_alpha": 0.5}),
    ("length_normalize", {}, {"length_normalize": False}),
    ("temperature", {}, {"temperature": 1.5}),
    ("jsd_beta", {}, {"jsd_beta": 0.3}),
    ("skew_alpha", {}, {"skew_alpha": 0.4}),
]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_setting_is_used_or_refused(tmp_path, objective):
    import dataclasses

    from dpkd_lib import objectives as obj_lib
    from dpkd_lib.config import ConfigError
    seq = ["train.seq_max_new_tokens=6"] if objective in SAMPLING_OBJECTIVES else []
    base = [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", f"train.objective={objective}",
            "train.lm_coef=0.5", *seq] + (["teacher=null"] if objective == "sft" else [])
    tr = Trainer(load_config(SMOKE, base), progress=False)
    tr.setup()
    batch, pretrain = tr.micro_batch(0), tr.pretrain_batch(0)
    pair = tr.dpkd_seq_pair(0) if objective == "dpkd_seq" else None
    if pair is not None:  # let the teacher score both sides online (length_normalize may change)
        pair = {k: pair[k] for k in ("chosen", "rejected")}
        tr.teacher = obj_lib.OnlineTeacher(tr.teacher_model)

    def loss(**settings):
        t = dataclasses.replace(tr.cfg.train, **settings)
        with torch.no_grad():
            return obj_lib.step_loss(t, tr.student, tr.teacher, batch, pretrain=pretrain, pair=pair).total.item()

    for name, needs, probe in PROBES:
        overrides = [f"train.{k}={v}" for k, v in {**needs, **probe}.items()]
        try:
            try:
                load_config(SMOKE, base + overrides)
            except ConfigError as err:   # the control's pre-train KD gone: its teacher goes too
                if "does not use a teacher" not in str(err):
                    raise
                load_config(SMOKE, base + overrides + ["teacher=null"])
            accepted = True
        except ConfigError as err:
            assert "is not used" in str(err), (name, str(err))
            accepted = False
        before, after = loss(**needs), loss(**needs, **probe)
        if accepted:
            assert after != pytest.approx(before, rel=1e-7, abs=1e-9), f"{objective}: {name} accepted but ignored"
        else:
            assert after == before, f"{objective}: {name} refused but it changes the loss"


def test_dpkd_seq_resumes_mid_block_to_the_same_weights(tmp_path):
    """With rejected_every = 3 the samples for steps 4-6 are drawn at step 4 (block start 3):
    a run resumed from the step-4 checkpoint reuses them (they travel in the checkpoint)
    instead of redrawing them from a student that has moved on."""
    import json
    import shutil

    from safetensors.torch import load_file
    common = [f"cache_dir={tmp_path / 'cache'}", "train.objective=dpkd_seq", "train.seq_max_new_tokens=6",
              "train.max_steps=5", "train.rejected_every=3", "train.save_every=2", "eval.splits=[]"]
    train(load_config(SMOKE, [f"output_dir={tmp_path / 'a'}", *common]), progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    b = tmp_path / "b"
    shutil.rmtree(b / "model")
    (b / "summary.json").unlink()
    manifest = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps(dict(manifest, status="interrupted")))
    assert torch.load(b / "checkpoints" / "last.pt", weights_only=False)["step"] == 4
    train(load_config(SMOKE, [f"output_dir={b}", *common]), progress=False)
    wa, wb = load_file(str(tmp_path / "a" / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_jsonl(tmp_path / "a" / "metrics.jsonl") != [] and \
        [r["loss"] for r in read_jsonl(b / "metrics.jsonl")] == [r["loss"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")]


def test_gradient_split_against_float64_and_exact_for_one_large_term():
    """gradient_split's norms and cosines equal a float64 brute force on the flattened
    gradients; a term alone has cosine 1 with the total even over millions of float32 entries
    (a float32 sum was off by 0.5 %, the committed study showed cosines of 1.005)."""
    from dpkd_lib.objectives import gradient_split

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(4))
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    x = torch.randn(5, 3)
    terms = {"a": ((x @ w + b) ** 2).mean(), "b": (x @ w).sin().sum() * 0.3,
             "c": (b * frozen).sum()}        # b does not reach b, c does not reach w: unused there
    out = gradient_split(terms, [w, b, frozen])
    flat = {}
    for name, value in terms.items():
        gw, gb = torch.autograd.grad(value, [w, b], retain_graph=True, allow_unused=True)
        flat[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                for g, p in ((gw, w), (gb, b))]).double()
    total = sum(flat.values())
    assert out["gnorm_total"] == pytest.approx(float(total.norm()), rel=1e-6)
    for name, g in flat.items():
        assert out[f"gnorm_{name}"] == pytest.approx(float(g.norm()), rel=1e-6)
        assert out[f"gcos_{name}"] == pytest.approx(float(g @ total / g.norm() / total.norm()), rel=1e-6)
    assert sum(out[f"gnorm_{n}"] * out[f"gcos_{n}"] for n in flat) == pytest.approx(out["gnorm_total"])

    big = torch.nn.Parameter(torch.randn(4_000_000) * torch.rand(4_000_000) ** 8)
    one = gradient_split({"only": (big * big.detach()).sum()}, [big])
    assert one["gcos_only"] == pytest.approx(1.0, abs=1e-9)


def test_adam_share_against_a_hand_computed_preconditioner():
    """Each term's share of the AdamW update: its gradient through the preconditioner of this
    step, 1/(sqrt(v̂) + eps) with v̂ = (β2·v + (1-β2)·G²)/(1-β2^(t+1)), G the step's clipped
    gradient, projected on the preconditioned total. Checked against Adam's second moment
    kept by hand over three real AdamW steps, at the first step (no state: v̂ = G²), with and
    without clipping. A term with a small raw gradient on weights Adam has barely moved can
    take a large share of the update; the raw share does not show it."""
    from dpkd_lib.objectives import gradient_split

    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(6))
    v = torch.nn.Parameter(torch.randn(3))
    x = torch.randn(6)

    def terms():
        return {"big": 10.0 * ((w * x).sum() - 1.0) ** 2 + (v[0] - 0.5) ** 2,
                "small": 1e-3 * (v[1:] ** 2).sum() + 0.01 * w[:2].sum()}

    b2, eps = 0.99, 1e-8
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [v], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, b2), eps=eps)

    def flat_grads(t):
        return {n: torch.cat([g.reshape(-1) for g in torch.autograd.grad(val, [w, v], retain_graph=True)]).double()
                for n, val in t.items()}

    def check(out, g, second_moment, steps, clip):
        total = sum(g.values())
        c = min(1.0, clip / float(total.norm())) if clip else 1.0
        v_hat = (b2 * second_moment + (1 - b2) * (c * total) ** 2) / (1 - b2 ** (steps + 1))
        precond = 1.0 / (v_hat.sqrt() + eps)
        u = {n: precond * c * gi for n, gi in g.items()}
        u_total = precond * c * total
        assert out["adam_norm_total"] == pytest.approx(float(u_total.norm()), rel=1e-6)
        for n in g:
            assert out[f"adam_share_{n}"] == pytest.approx(float(u[n] @ u_total / (u_total @ u_total)), rel=1e-6)
            assert out[f"adam_norm_{n}"] == pytest.approx(float(u[n].norm()), rel=1e-6)
            assert out[f"grad_share_{n}"] == pytest.approx(float(g[n] @ total / (total @ total)), rel=1e-6)
        assert sum(out[f"adam_share_{n}"] for n in g) == pytest.approx(1.0)
        assert sum(out[f"grad_share_{n}"] for n in g) == pytest.approx(1.0)
        return out

    t = terms()
    g = flat_grads(t)
    zero = torch.zeros(9, dtype=torch.float64)
    check(gradient_split(t, [w, v], opt), g, zero, 0, 0.0)   # no state yet: v̂ = G², a sign step
    second_moment = zero.clone()
    for step in range(1, 4):
        opt.zero_grad()
        t = terms()
        sum(t.values()).backward()
        grad = torch.cat([w.grad.reshape(-1), v.grad.reshape(-1)]).double()
        second_moment = b2 * second_moment + (1 - b2) * grad * grad
        opt.step()
    t = terms()
    g = flat_grads(t)
    out = check(gradient_split(t, [w, v], opt), g, second_moment, 3, 0.0)
    assert out["adam_share_small"] > 5 * out["grad_share_small"]   # the preconditioner matters here
    clip = 0.1 * float(sum(g.values()).norm())                     # a clipped step weighs G less in v̂
    clipped = check(gradient_split(t, [w, v], opt, clip=clip), g, second_moment, 3, clip)
    assert clipped["adam_share_small"] != pytest.approx(out["adam_share_small"], rel=1e-3)
