"""One training loop for every objective, on `accelerate` (CPU, one GPU, or `accelerate launch`).

Step loss (method.md §2, the released DPKD runner, generalised to every objective):

    (1 - kd_ratio) * CE(dataset response) + kd_ratio * objective
        + lm_coef * [(1 - kd_ratio) * CE(pre-train) + kd_ratio * H(p, q)(pre-train)]

with kd_ratio = lm_coef = 0.5 in the released runner. `sft` and `seqkd` are plain
cross-entropy (on dataset / teacher-generated responses) plus lm_coef * CE(pre-train).

Read `train()` top to bottom: set-up, then the loop, then the final save and evaluation.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as data_lib
from . import evaluate as eval_lib
from . import losses
from . import models as model_lib
from .config import ConfigError, RunConfig, to_dict
from .results import RunDir, read_json, run_id, write_json

CHECKPOINT = "checkpoints/last.pt"
DISTILL_OBJECTIVES = ("kd", "rkl", "jsd", "dpkd_token", "dpkd_seq")
SMOLLM2_CACHE = os.environ.get("DPKD_SMOLLM2_CACHE", ".cache/smollm2")


class TrainingFault(RuntimeError):
    """A numerical fault (NaN/inf loss) that stopped training; the last good checkpoint stays."""


# ----------------------------------------------------------------------------- building blocks

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_tokenizer(cfg: RunConfig):
    from . import tokenization as tok
    kind = cfg.tokenizer.kind
    if kind == "bpe_local":
        return tok.train_bpe_tokenizer(tok.default_corpus_texts(), vocab_size=cfg.tokenizer.vocab_size)
    if kind == "gpt2":
        return tok.gpt2_tokenizer()
    if kind == "smollm2":
        return tok.smollm2_tokenizer()
    return tok.load_tokenizer(cfg.tokenizer.path)


def build_model(mcfg, tokenizer, *, trainable: bool):
    """Model from its config section: tiny / hub / GGUF / saved, then prune, then LoRA."""
    if mcfg.source == "tiny":
        model = model_lib.tiny_model(mcfg.arch, len(tokenizer), n_layer=mcfg.n_layer,
                                     n_embd=mcfg.n_embd, n_head=mcfg.n_head, seed=mcfg.seed,
                                     pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
        model = model.to(model_lib.resolve_dtype(mcfg.dtype))
    elif mcfg.source == "smollm2":
        # the GGUF parse takes ~20 s; a converted copy under .cache loads in well under 1 s
        model = model_lib.load_smollm2(dtype=mcfg.dtype, cache_dir=SMOLLM2_CACHE)
    elif mcfg.source == "saved":
        model = model_lib.load_saved(mcfg.name_or_path, dtype=mcfg.dtype,
                                     quantization=None if mcfg.quantization == "none" else mcfg.quantization)
    else:
        model = model_lib.load_pretrained(
            mcfg.name_or_path, dtype=mcfg.dtype,
            quantization=None if mcfg.quantization == "none" else mcfg.quantization)
    if mcfg.prune_to:
        model = model_lib.prune_layers(model, mcfg.prune_to)
    if mcfg.quantization != "none" and mcfg.source in ("tiny", "smollm2"):
        model = model_lib.quantize_in_memory(model, mcfg.quantization, dtype=mcfg.dtype)
    if not trainable:
        model_lib.freeze(model)
        return model
    if mcfg.gradient_checkpointing:
        model_lib.enable_gradient_checkpointing(model)
    if mcfg.lora:
        model = model_lib.apply_lora(model, r=mcfg.lora_r, alpha=mcfg.lora_alpha,
                                     dropout=mcfg.lora_dropout)
    return model


def param_groups(model, weight_decay: float):
    """The released runner's AdamW groups: no decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg) -> float:
    """Linear warm-up, then cosine from lr to min_lr over t_max steps (flat at min_lr after)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t_max = cfg.t_max_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, t_max - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def batch_schedule(lengths, batch_size: int, n_batches: int, seed: int) -> list[list[int]]:
    """Deterministic length-grouped batches, epoch after epoch, until n_batches."""
    schedule, epoch = [], 0
    while len(schedule) < n_batches:
        schedule += data_lib.length_grouped_batches(lengths, batch_size, seed=seed, epoch=epoch)
        epoch += 1
    return schedule[:n_batches]


def response_hidden(model, batch):
    """Final (post-norm) hidden states at response positions, flattened: ([N, H], [N]).
    Position i predicts token i + 1 (shift); rows are in batch order."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=True, logits_to_keep=1, use_cache=False)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    return out.hidden_states[-1][:, :-1][mask], labels[mask]


def response_logits(model, batch):
    """Logits at response positions only, flattened: ([1, N, V], [1, N]).

    Only ~1/5 of positions carry a loss, and the vocabulary head is over half of a small
    student's FLOPs, so the head is applied to the gathered final hidden states of those
    positions, not to the whole [B, T, H] tensor.
    """
    hidden, labels = response_hidden(model, batch)
    head = getattr(model, "module", model).get_output_embeddings()  # DDP wraps the model
    logits = head(hidden.to(head.weight.dtype) if head.weight.dtype.is_floating_point else hidden)
    return logits.float().unsqueeze(0), labels.unsqueeze(0)


def full_logits(model, input_ids):
    """Aligned logits for a pre-train block: logits[:, i] scores input_ids[:, i + 1]."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
    return logits.float(), input_ids[:, 1:]


# ----------------------------------------------------------------------------- objectives

def distill_term(tcfg, s_logits, t_logits, labels) -> tuple[torch.Tensor, dict]:
    """The objective's own term on response positions, next to its formula."""
    obj, chunk = tcfg.objective, (tcfg.loss_chunk_size or None)
    if obj == "kd":  # forward KL(p || q): mode covering (gradient equals soft CE's)
        return losses.forward_kl(s_logits, t_logits, labels, temperature=tcfg.temperature,
                                 chunk_size=chunk), {}
    if obj == "rkl":  # reverse KL(q || p): mode seeking
        return losses.reverse_kl(s_logits, t_logits, labels, temperature=tcfg.temperature,
                                 chunk_size=chunk), {}
    if obj == "jsd":  # generalised Jensen-Shannon (DistiLLM's family)
        return losses.js_divergence(s_logits, t_logits, labels, beta=tcfg.jsd_beta,
                                    temperature=tcfg.temperature, chunk_size=chunk), {}
    if obj == "dpkd_token":  # released code: teacher argmax chosen, student argmax rejected
        loss = losses.dpkd_token_loss(s_logits, t_logits, labels, beta=tcfg.beta,
                                      loss_type=tcfg.loss_type, label_smoothing=tcfg.label_smoothing,
                                      reference_free=tcfg.reference_free, gamma=tcfg.gamma,
                                      temperature=tcfg.temperature, chunk_size=chunk)
        return loss, token_reward_stats(s_logits, labels, tcfg.beta, t_logits=t_logits,
                                        chunk_size=chunk)
    raise ConfigError(f"train.objective: '{obj}' has no token-level term")


def cached_distill_term(tcfg, s_logits, labels, topk) -> tuple[torch.Tensor, dict]:
    """The same terms from cached teacher top-k (teacher_mode=cache; kd and dpkd_token)."""
    ids, logps = topk
    if tcfg.objective == "kd":
        return losses.forward_kl_from_teacher_topk(s_logits, labels, ids, logps), {}
    loss = losses.dpkd_token_loss_from_teacher_topk(
        s_logits, labels, ids, logps, beta=tcfg.beta, loss_type=tcfg.loss_type,
        label_smoothing=tcfg.label_smoothing, reference_free=tcfg.reference_free, gamma=tcfg.gamma)
    return loss, token_reward_stats(s_logits, labels, tcfg.beta, topk=topk)


@torch.no_grad()
def token_reward_stats(s_logits, labels, beta: float, *, t_logits=None, topk=None,
                       chunk_size=None) -> dict:
    """Implicit token rewards β·log(q/p) of the chosen (teacher argmax) and rejected (student
    argmax) tokens: their means, margin and how often chosen beats rejected where they differ.
    The teacher comes as full logits (online) or as cached top-k, through the same log-prob
    helpers the losses use, so logs and loss agree."""
    if t_logits is not None:
        lp = losses.dpkd_token_logps(s_logits, t_logits, labels, chunk_size=chunk_size)
    else:
        lp = losses.dpkd_token_logps_from_teacher_topk(s_logits, labels, topk[0], topk[1])
    r_c, r_r = losses.implicit_rewards(lp.policy_chosen, lp.policy_rejected, lp.ref_chosen,
                                       lp.ref_rejected, beta=beta)
    differ = lp.chosen_ids != lp.rejected_ids
    acc = (r_c > r_r)[differ].float().mean().item() if differ.any() else float("nan")
    return {"reward_chosen": r_c.mean().item(), "reward_rejected": r_r.mean().item(),
            "reward_margin": (r_c - r_r).mean().item(), "reward_accuracy": acc,
            "argmax_disagree": differ.float().mean().item()}


def row_logps(logits, labels, batch, average: bool):
    """Per-sequence log-probs [B] from response-row logits ([1, N, V], as `response_logits`
    returns them): each row's positions are passed to `losses.sequence_logps` on their own."""
    rows = (batch["labels"][:, 1:] != -100).nonzero()[:, 0]
    n_rows = batch["labels"].shape[0]
    return torch.cat([losses.sequence_logps(logits[:, rows == r], labels[:, rows == r], average=average)
                      for r in range(n_rows)])


def sequence_preference(tcfg, student, teacher, pair) -> tuple[torch.Tensor, dict]:
    """Paper's DPKD (sequence level): teacher response chosen, student's own sample rejected."""
    avg = tcfg.length_normalize
    logps = {}
    for side in ("chosen", "rejected"):
        batch = pair[side]
        s_logits, labels = response_logits(student, batch)
        with torch.no_grad():
            t_logits, _ = response_logits(teacher, batch)
        logps[side] = row_logps(s_logits, labels, batch, avg)
        logps["ref_" + side] = row_logps(t_logits, labels, batch, avg)
    per_pair = losses.preference_loss(
        logps["chosen"], logps["rejected"], logps["ref_chosen"], logps["ref_rejected"],
        beta=tcfg.beta, loss_type=tcfg.loss_type, label_smoothing=tcfg.label_smoothing,
        reference_free=tcfg.reference_free, gamma=tcfg.gamma)
    r_c, r_r = losses.implicit_rewards(logps["chosen"], logps["rejected"], logps["ref_chosen"],
                                       logps["ref_rejected"], beta=tcfg.beta,
                                       reference_free=tcfg.reference_free)
    stats = {"reward_chosen": r_c.mean().item(), "reward_rejected": r_r.mean().item(),
             "reward_margin": (r_c - r_r).mean().item(),
             "reward_accuracy": (r_c > r_r).float().mean().item(),
             "rejected_len": float((pair["rejected"]["labels"] != -100).sum(1).float().mean())}
    return per_pair.mean(), stats


@torch.no_grad()
def sample_rejected(student, tokenizer, examples, tcfg, device, generator_seed: int):
    """Student's on-policy samples for the prompts of `examples`, as a right-padded batch."""
    pad = tokenizer.pad_token_id
    prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in examples]
    ids, att = data_lib.left_pad(prompts, pad)
    width = ids.shape[1]
    was_training = student.training
    student.eval()
    with torch.random.fork_rng(devices=[]):  # sampling must not move the training RNG stream
        torch.manual_seed(generator_seed)
        out = student.generate(input_ids=ids.to(device), attention_mask=att.to(device), do_sample=True,
                               temperature=1.0, top_k=0, top_p=1.0,
                               max_new_tokens=tcfg.seq_max_new_tokens, pad_token_id=pad,
                               eos_token_id=tokenizer.eos_token_id)
    student.train(was_training)
    rows = []
    for i, p in enumerate(prompts):
        new = out[i, width:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        new = new or [tokenizer.eos_token_id]
        rows.append({"id": examples[i]["id"], "input_ids": p + new,
                     "labels": [-100] * len(p) + new, "prompt_len": len(p)})
    return data_lib.collate_sft(rows, pad)


# ----------------------------------------------------------------------------- the run

class Trainer:
    """Holds what the loop needs; `train()` below is the loop itself."""

    def __init__(self, cfg: RunConfig, *, force: bool = False, progress: bool = True):
        from accelerate import Accelerator
        self.cfg, self.progress = cfg, progress
        self.params = to_dict(cfg)
        self.run = RunDir(cfg.output_dir)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.is_main = self.accelerator.is_main_process
        self.state = self.run.prepare(self.params, force=force) if self.is_main else "fresh"
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            self.state = "finished" if self.run.is_finished() else (
                "resume" if self.run.file(CHECKPOINT).exists() else "fresh")

    # -- set-up
    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        set_seed(t.seed)
        self.tokenizer = build_tokenizer(cfg)
        splits = data_lib.load_records(cfg.data.source, path=cfg.data.path or None,
                                       seed=cfg.data.data_seed, n_train=cfg.data.n_train,
                                       n_valid=cfg.data.n_valid, n_test=cfg.data.n_test,
                                       n_heldout=cfg.data.n_heldout)
        self.splits = splits
        self.data_hash = data_lib.data_hash(splits["train"])
        self.teacher = self.cache = self.pt_cache = None
        uses_teacher = cfg.teacher is not None and t.objective != "sft"
        if uses_teacher and t.teacher_mode == "online":
            self.teacher = build_model(cfg.teacher, self.tokenizer, trainable=False)
        train_records = splits["train"]
        if t.objective == "seqkd":  # SeqKD: plain SFT on the teacher's own responses
            train_records = self.teacher_responses(train_records)
        self.train_set, report = self.tokenize(train_records)
        self.filter_report = report.as_dict()
        self.chosen_by_id = {}
        if t.objective == "dpkd_seq":
            # The paper's chosen side is the teacher's response to the same prompt. It is a
            # batch of its own: the CE term of the step loss stays on the dataset responses,
            # as for every other distillation objective (module docstring).
            chosen, _ = self.tokenize(self.teacher_responses(train_records))
            self.chosen_by_id = {ex["id"]: ex for ex in chosen}
            # a teacher response the filters dropped (too long, say) leaves the reference as chosen
            self.filter_report["chosen_is_reference"] = sum(
                ex["id"] not in self.chosen_by_id for ex in self.train_set)
        self.valid_set, _ = self.tokenize(splits.get("valid") or splits["train"][:64])
        self.pretrain = None
        if t.lm_coef > 0 and cfg.data.pretrain_source != "none":
            texts = (data_lib.pydoc_corpus() if cfg.data.pretrain_source == "pydoc"
                     else [r.get("text", "") for r in data_lib.read_jsonl(cfg.data.pretrain_path)])
            self.pretrain = data_lib.pretrain_blocks(texts, self.tokenizer, cfg.data.pretrain_block_size,
                                                     max_blocks=cfg.data.pretrain_max_blocks)
        if uses_teacher and t.teacher_mode == "cache":
            self.cache, self.pt_cache = self.teacher_signals()
        self.student = build_model(cfg.student, self.tokenizer, trainable=True)
        if self.teacher is not None:
            model_lib.check_same_vocab(self.tokenizer, self.tokenizer, self.teacher, self.student)
        self.optimizer = torch.optim.AdamW(param_groups(self.student, t.weight_decay), lr=t.lr,
                                           betas=(t.adam_beta1, t.adam_beta2))
        self.student, self.optimizer = self.accelerator.prepare(self.student, self.optimizer)
        if self.teacher is not None and self.teacher.device != self.accelerator.device \
                and cfg.teacher.quantization == "none":
            self.teacher.to(self.accelerator.device)
        lengths = [len(ex["input_ids"]) for ex in self.train_set]
        self.schedule = batch_schedule(lengths, t.batch_size, t.max_steps * t.grad_accum, t.seed)

    def tokenize(self, records):
        d = self.cfg.data
        return data_lib.build_sft_dataset(records, self.tokenizer, max_length=d.max_length,
                                          max_prompt=d.max_prompt,
                                          min_response_tokens=d.min_response_tokens,
                                          bad_data=d.bad_data)

    def teacher_signals(self):
        """Cached teacher top-k on the train set (and pre-train blocks): built once per
        (teacher, tokenizer, data, k), shared by every method and seed that uses it."""
        from . import teacher_cache as tc
        cfg, t = self.cfg, self.cfg.train
        teacher_params = to_dict(cfg.teacher)
        tok_name = f"{cfg.tokenizer.kind}:{cfg.tokenizer.path}:{cfg.tokenizer.vocab_size}:{len(self.tokenizer)}"
        built = {}

        def get_teacher():
            if "model" not in built:
                built["model"] = build_model(cfg.teacher, self.tokenizer, trainable=False)
            return built["model"]

        if not self.is_main:  # the main process builds the cache; the others then read it
            self.accelerator.wait_for_everyone()
        fmt = t.cache_format
        train_key = tc.cache_key(teacher_params, tok_name, data_lib.data_hash(self.train_set),
                                 t.cache_topk, fmt)
        meta = {"teacher": teacher_params, "tokenizer": tok_name, "k": t.cache_topk, "format": fmt}
        device = self.accelerator.device
        cache = tc.load_or_build(Path(t.cache_dir) / train_key, get_teacher, self.train_set,
                                 self.tokenizer.pad_token_id, t.cache_topk, meta=meta, fmt=fmt,
                                 batch_size=cfg.eval.batch_size, device=device, progress=self.progress)
        pt_cache = None
        if self.pretrain is not None:
            blocks = [{"id": f"pt{i}", "input_ids": row.tolist(), "labels": row.tolist(), "prompt_len": 0}
                      for i, row in enumerate(self.pretrain)]
            pt_key = tc.cache_key(teacher_params, tok_name, data_lib.data_hash(blocks), t.cache_topk, fmt)
            pt_cache = tc.load_or_build(Path(t.cache_dir) / pt_key, get_teacher, blocks,
                                        self.tokenizer.pad_token_id, t.cache_topk, meta=meta, fmt=fmt,
                                        batch_size=cfg.eval.batch_size, device=device,
                                        progress=self.progress)
        built.clear()
        if self.is_main:
            self.accelerator.wait_for_everyone()
        return cache, pt_cache

    def teacher_responses(self, records):
        """Teacher-sampled responses to the prompts of `records` (SeqKD's data, DPKD-seq's
        chosen side). Sampled once per (teacher, data, seed, length) into `train.cache_dir`,
        so runs of one seed share them (SeqKD and DPKD-seq, the DPKD-seq ablations), and
        copied next to the run, where a resumed run finds them."""
        t = self.cfg.train
        key = run_id({"teacher": to_dict(self.cfg.teacher), "data": data_lib.data_hash(records),
                      "seed": t.seed, "max_new_tokens": t.seq_max_new_tokens,
                      "tokenizer": to_dict(self.cfg.tokenizer)}, length=16)
        mine, shared = self.run.file("teacher_responses.jsonl"), Path(t.cache_dir) / "responses" / f"{key}.jsonl"
        for path in (mine, shared):
            if path.exists():
                cached = data_lib.read_jsonl(path)
                if len(cached) == len(records) and all(c.get("id") == r.get("id") for c, r in zip(cached, records)):
                    break
        else:
            prompts = [data_lib.format_prompt(r) for r in records]
            samples = eval_lib.generate(self.teacher, self.tokenizer, prompts,
                                        max_new_tokens=t.seq_max_new_tokens,
                                        batch_size=self.cfg.eval.batch_size, temperature=1.0,
                                        top_k=0, top_p=1.0, seed=t.seed, progress=self.progress)
            cached = [dict(r, response=s if s.strip() else r["response"]) for r, s in zip(records, samples)]
            if self.is_main:
                data_lib.write_jsonl(cached, shared)
        if self.is_main and not mine.exists():
            data_lib.write_jsonl(cached, mine)
        return cached

    def my_rows(self, index: int) -> list[int]:
        """This process's share of global batch `index` (several processes split each batch)."""
        ids = self.schedule[index]
        return ids[self.accelerator.process_index::self.accelerator.num_processes] or ids[:1]

    def to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.accelerator.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def micro_batch(self, index: int):
        return self.to_device(data_lib.collate_sft([self.train_set[i] for i in self.my_rows(index)],
                                                   self.tokenizer.pad_token_id))

    def pretrain_batch(self, index: int):
        n = len(self.pretrain)
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + index)
        rows = torch.randint(0, n, (self.cfg.train.batch_size,), generator=g)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        rows = rows[rank::world]
        return self.pretrain[rows].to(self.accelerator.device), [f"pt{i}" for i in rows.tolist()]

    # -- one step
    def step_loss(self, index: int) -> tuple[torch.Tensor, dict, list]:
        """Loss of micro-batch `index` and its logged parts."""
        t = self.cfg.train
        batch = self.micro_batch(index)
        kd = t.kd_ratio if t.objective in DISTILL_OBJECTIVES else 0.0
        autocast = torch.autocast(self.accelerator.device.type, dtype=getattr(torch, t.autocast_dtype),
                                  enabled=t.autocast_dtype != "float32")
        parts, stats = {}, {}
        with autocast:
            s_logits, labels = response_logits(self.student, batch)
            parts["ce"] = losses.sft_loss(s_logits, labels)
            loss = (1 - kd) * parts["ce"]
            if self.cache is not None and self.cache.format == "topk":
                counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()
                topk = self.cache.gather(batch["ids"], counts)
                parts["distill"], stats = cached_distill_term(t, s_logits, labels, topk)
                loss = loss + kd * parts["distill"]
            elif t.objective in ("kd", "rkl", "jsd", "dpkd_token"):
                with torch.no_grad():
                    if self.cache is not None:  # exact: stored hidden states through the head
                        counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()
                        t_logits = self.cache.teacher_logits(batch["ids"], counts, self.accelerator.device)
                    else:
                        t_logits, _ = response_logits(self.teacher, batch)
                parts["distill"], stats = distill_term(t, s_logits, t_logits, labels)
                loss = loss + kd * parts["distill"]
            elif t.objective == "dpkd_seq":
                rows = [self.train_set[i] for i in self.my_rows(index)]
                chosen = data_lib.collate_sft([self.chosen_by_id.get(ex["id"], ex) for ex in rows],
                                              self.tokenizer.pad_token_id)
                rejected = sample_rejected(self.student, self.tokenizer, rows, t,
                                           self.accelerator.device, t.seed * 7919 + index)
                pair = {side: self.to_device(b) for side, b in (("chosen", chosen), ("rejected", rejected))}
                parts["distill"], stats = sequence_preference(t, self.student, self.teacher, pair)
                loss = loss + kd * parts["distill"]
            if self.pretrain is not None:
                pt_ids, pt_names = self.pretrain_batch(index)
                pt_logits, pt_labels = full_logits(self.student, pt_ids)
                parts["pt_ce"] = losses.sft_loss(pt_logits, pt_labels)
                pt = (1 - kd) * parts["pt_ce"]
                if kd > 0 and self.pt_cache is not None and self.pt_cache.format == "hidden":
                    with torch.no_grad():
                        pt_teacher = self.pt_cache.teacher_logits(pt_names, device=self.accelerator.device)
                    parts["pt_kd"] = losses.soft_cross_entropy(
                        pt_logits, pt_teacher.reshape(pt_logits.shape), pt_labels)
                    pt = pt + kd * parts["pt_kd"]
                elif kd > 0 and self.pt_cache is not None:
                    # cached: soft CE over the top-k plus one bucket for the rest (exact at k = V)
                    ids, logps = self.pt_cache.gather(pt_names)
                    flat = pt_logits.reshape(1, -1, pt_logits.shape[-1])
                    parts["pt_kd"] = losses.soft_cross_entropy_from_teacher_topk(
                        flat, pt_labels.reshape(1, -1), ids, logps)
                    pt = pt + kd * parts["pt_kd"]
                elif kd > 0:
                    with torch.no_grad():
                        pt_teacher, _ = full_logits(self.teacher, pt_ids)
                    parts["pt_kd"] = losses.soft_cross_entropy(pt_logits, pt_teacher, pt_labels)
                    pt = pt + kd * parts["pt_kd"]
        # response terms are token means over this process's rows: rescale to the global batch
        loss = loss * self.token_share(index)
        if self.pretrain is not None:
            loss = loss + t.lm_coef * pt
        stats["response_tokens"] = int((labels != -100).sum())
        return loss, {k: v.item() for k, v in parts.items()} | stats, batch["ids"]

    def token_share(self, index: int) -> float:
        """world × (this process's response tokens / the global batch's). DDP averages the
        processes' gradients, so this makes N processes optimise the same flat token mean
        over the global batch as one process does (1.0 in a single process)."""
        world = self.accelerator.num_processes
        if world == 1:
            return 1.0
        ids = self.schedule[index]
        def count(rows):
            return sum(self.train_set[i]["response_len"] for i in rows)
        return world * count(self.my_rows(index)) / count(ids)

    # -- checkpoints
    def trainable_state(self) -> dict:
        model = self.accelerator.unwrap_model(self.student)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def save_checkpoint(self, step: int) -> None:
        if not self.is_main:
            return
        state = {"step": step, "model": self.trainable_state(),
                 "optimizer": self.optimizer.state_dict(),
                 "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                         "torch": torch.get_rng_state()}}
        path = self.run.file(CHECKPOINT)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self) -> int:
        path = self.run.file(CHECKPOINT)
        if not path.exists():
            return 0
        state = torch.load(path, weights_only=False)
        model = self.accelerator.unwrap_model(self.student)
        missing = model.load_state_dict(state["model"], strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"checkpoint {path} does not fit this model: {missing.unexpected_keys[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        return state["step"]

    # -- evaluation
    def valid_metrics(self) -> dict:
        batches = [data_lib.collate_sft(self.valid_set[i:i + 16], self.tokenizer.pad_token_id)
                   for i in range(0, len(self.valid_set), 16)]
        batches = [{k: (v.to(self.accelerator.device) if torch.is_tensor(v) else v) for k, v in b.items()}
                   for b in batches]
        model = self.accelerator.unwrap_model(self.student)
        was = model.training
        model.eval()
        out = eval_lib.teacher_forced_metrics(model, batches)
        model.train(was)
        return {"valid_nll": out["nll"], "valid_token_acc": out["token_accuracy"]}

    def final_eval(self) -> dict:
        model = self.accelerator.unwrap_model(self.student)
        per_example, summary = eval_lib.evaluate_splits(model, self.tokenizer, self.splits, self.cfg.eval,
                                               self.cfg.data, progress=self.progress)
        eval_lib.write_eval_jsonl(per_example, self.run.file("eval.jsonl"))
        return summary


def train(cfg: RunConfig, *, force: bool = False, progress: bool = True) -> dict:
    """Run (or resume, or reuse) one training run; returns its summary."""
    tr = Trainer(cfg, force=force, progress=progress)
    if tr.state == "finished":
        return read_json(tr.run.file("summary.json"))
    t, started = cfg.train, time.time()
    tr.setup()
    if tr.is_main:
        tr.run.start_manifest(tr.params, seed=t.seed, device=str(tr.accelerator.device),
                              data_hash=tr.data_hash)
        tr.run.write_manifest(filter_report=tr.filter_report,
                              num_processes=tr.accelerator.num_processes)
    step = tr.load_checkpoint() if tr.state == "resume" else 0
    if tr.is_main:
        tr.run.truncate_metrics(step)
    skipped = 0
    bar = tqdm(total=t.max_steps, initial=step, desc=f"{t.objective}", disable=not (progress and tr.is_main),
               dynamic_ncols=True)
    tr.student.train()
    while step < t.max_steps:
        tick = time.time()
        lr = lr_at(step, t)
        for group in tr.optimizer.param_groups:
            group["lr"] = lr
        logs, ids, bad = [], [], False
        for micro in range(t.grad_accum):
            loss, parts, batch_ids = tr.step_loss(step * t.grad_accum + micro)
            ids += list(batch_ids)
            if not torch.isfinite(loss):
                bad = True
                logs.append(parts)
                break
            tr.accelerator.backward(loss / t.grad_accum)
            logs.append(parts | {"loss": loss.item()})
        if bad:
            tr.optimizer.zero_grad(set_to_none=True)
            if t.nan_policy == "stop":
                if tr.is_main:
                    tr.run.write_manifest(status="failed", error=f"non-finite loss at step {step}")
                raise TrainingFault(f"non-finite loss at step {step}: parts {logs[-1]}, batch ids "
                                    f"{ids[:16]}; the last good checkpoint is kept in "
                                    f"{tr.run.file(CHECKPOINT)} (train.nan_policy=skip skips such batches)")
            skipped += 1
            step += 1
            bar.update(1)
            continue
        grad_norm = tr.accelerator.clip_grad_norm_(tr.student.parameters(), t.clip_grad) \
            if t.clip_grad > 0 else torch.tensor(float("nan"))
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        step += 1
        row = {"step": step, "lr": lr, "grad_norm": float(grad_norm), "time_s": time.time() - tick}
        for key in logs[0]:
            row[key] = float(np.mean([p[key] for p in logs]))
        if t.objective != "seqkd":  # SeqKD's CE is on teacher samples, not on the references
            row["student_nll_ref"] = row.get("ce")
        if t.eval_every and step % t.eval_every == 0:
            row |= tr.valid_metrics()
        if tr.is_main and (step % t.log_every == 0 or step == t.max_steps):
            tr.run.append_metrics(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        bar.update(1)
        if t.save_every and step % t.save_every == 0 and step < t.max_steps:
            tr.save_checkpoint(step)
    bar.close()
    tr.accelerator.wait_for_everyone()
    summary = {"objective": t.objective, "steps": step, "skipped_batches": skipped,
               "seed": t.seed, "run_id": tr.run.manifest.get("run_id")}
    summary |= tr.valid_metrics()
    if tr.is_main:
        model = tr.accelerator.unwrap_model(tr.student)
        if cfg.student.lora and cfg.student.merge_lora_on_save:
            model = model_lib.merge_lora(model)
        model_lib.save_model(model, tr.run.file("model"), tokenizer=tr.tokenizer)
        if cfg.eval.generate and cfg.eval.splits:
            summary |= tr.final_eval()
        summary["wall_time_s"] = time.time() - started
        write_json(tr.run.file("summary.json"), summary)
        tr.run.write_manifest(status="finished", wall_time_s=summary["wall_time_s"],
                              finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    tr.accelerator.wait_for_everyone()
    return summary
