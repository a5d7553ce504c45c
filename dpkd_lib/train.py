"""One training loop for every objective, on `accelerate` (CPU, one GPU, or `accelerate launch`).

What a step minimises is `objectives.step_loss` (docs/method.md §2). This module feeds it:
the data in a deterministic length-grouped order, the pre-train blocks, the teacher (online
or from its cache), DPKD-seq's pairs; then AdamW, the schedule, clipping, checkpoints, the
per-step log and the final evaluation.

Read `train()` and `_train()` top to bottom: the run folder's lock, set-up, then the loop,
then the final save and evaluation. Interrupting it (Ctrl-C, SIGTERM) during the loop
saves a checkpoint at the end of the step and says how to resume (during set-up or the final
evaluation it stops at once; the last checkpoint stays); killing it loses at most the steps
since the last checkpoint; the same command then resumes. Running out of memory or disk space anywhere ends the run with
one line naming the phase (OutOfResources), recorded in the manifest, the checkpoints kept
(docs/running.md). A non-finite loss stops the run,
or with ``train.nan_policy=skip`` skips the batch (on every process at once), up to ``train.max_skipped_share`` of the
steps and never with non-finite weights: a finished run has finite weights and metrics.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import signal
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as data_lib
from . import evaluate as eval_lib
from . import models as model_lib
from . import objectives as obj_lib
from . import teacher_cache as tc
from .choices import TEACHER_SIGNAL_OBJECTIVES
from .config import RunConfig, position_needs, teacher_use, to_dict
from .errors import OutOfResources, TrainingFault, human_bytes, is_disk_full, out_of_resources
from .io import read_json, read_jsonl, write_json, write_jsonl
from .signals import routed
from .rundir import RunDir, free_space, run_id
from .tokenization import build_tokenizer

log = logging.getLogger("dpkd_lib")

#: the sampling seed of the teacher's responses (SeqKD data, DPKD-seq's chosen side): one set
#: for every training seed, as MiniLLM generates its SeqKD data once (docs/design.md §6)
TEACHER_SAMPLE_SEED = 0


# ----------------------------------------------------------------------------- building blocks

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    """Linear warm-up, then cosine from lr to min_lr over t_max steps. With t_max_steps = 0
    the period is the run (flat at min_lr at its end); with t_max_steps > 0 the schedule is
    torch's CosineAnnealingLR, which the released runner uses with T_max = 20 of 30 epochs:
    past T_max it climbs back towards lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    after = step - cfg.warmup_steps
    if cfg.t_max_steps:
        progress = after / cfg.t_max_steps
    else:
        progress = min(1.0, after / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def batch_schedule(lengths, batch_size: int, n_batches: int, seed: int) -> list[list[int]]:
    """Deterministic length-grouped batches, epoch after epoch, until n_batches."""
    schedule, epoch = [], 0
    while len(schedule) < n_batches:
        schedule += data_lib.length_grouped_batches(lengths, batch_size, seed=seed, epoch=epoch)
        epoch += 1
    return schedule[:n_batches]


def _world() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_process(flag: bool, device=None) -> bool:
    """`flag` or-ed over every process of the run (one all-reduce; none in a single process).
    A decision that ends a step early (a non-finite loss) must be the same on every process:
    one that skips its backward alone leaves the others waiting in DDP's all-reduce forever."""
    if _world() == 1:
        return flag
    import torch.distributed as dist
    votes = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item() > 0)


def gather_objects(obj) -> list:
    """Every process's `obj`, in rank order ([obj] in a single process): what the main
    process saves on behalf of all (DPKD-seq's pending rejected samples)."""
    if _world() == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def response_row(ex_id: str, prompt_ids, new_ids, max_new_tokens: int, eos: int) -> dict:
    """One DPKD-seq response row from a sample's new token ids (`evaluate.generate_ids`: cut
    before the first EOS). The chosen (teacher) and rejected (student) sides are both made
    here, under one EOS rule: a sample that ended by EOS (fewer than `max_new_tokens` new
    ids) keeps its EOS as the last scored token; a sample cut at the limit gets none, so
    neither side teaches "stop here" where the sampler only ran out of room."""
    new = [int(i) for i in new_ids]
    ended = len(new) < max_new_tokens
    target = new + ([int(eos)] if ended else [])
    prompt = [int(i) for i in prompt_ids]
    return {"id": ex_id, "input_ids": prompt + target, "labels": [-100] * len(prompt) + target,
            "prompt_len": len(prompt), "response_len": len(target), "new_tokens": len(new), "ended": ended}


def sample_stats(rows) -> dict:
    """Mean new tokens, share ended by EOS and share empty (no new token) of `response_row`s."""
    n = max(len(rows), 1)
    return {"new_tokens": sum(r["new_tokens"] for r in rows) / n,
            "ended_share": sum(r["ended"] for r in rows) / n,
            "empty_share": sum(r["new_tokens"] == 0 for r in rows) / n}


class StoppedAtStep(KeyboardInterrupt):
    """The loop's own stop at the end of a step, after a checkpoint (its message says which)."""


@contextlib.contextmanager
def stop_requests():
    """SIGINT / SIGTERM, for the whole of a run. Yields a dict: while ``asked["defer"]`` is
    true (the training loop) a signal only sets ``asked["signal"]`` and the loop stops at
    the end of the current step, after a checkpoint; otherwise (set-up, final evaluation),
    and on a second signal, it raises KeyboardInterrupt at once. While ``asked["closing"]``
    (the interrupted run's manifest is being written) signals are ignored. The previous
    handlers are restored on exit."""
    asked: dict = {"signal": None, "defer": False, "closing": False}

    def handler(signum, frame):
        if asked["closing"]:
            return
        first = asked["signal"] is None
        asked["signal"] = signal.Signals(signum).name
        if not (asked["defer"] and first):
            raise KeyboardInterrupt(f"interrupted ({asked['signal']}); rerun the same command to resume")

    with routed(handler):
        yield asked


# ----------------------------------------------------------------------------- the run

class Trainer:
    """Holds what the loop needs; `train()` below is the loop itself."""

    def __init__(self, cfg: RunConfig, *, force: bool = False, progress: bool = True,
                 on_phase=None):
        from accelerate import Accelerator
        self.cfg, self.progress, self.force = cfg, progress, force
        # on_phase(name, trainer) is called as each phase starts (the GPU check measures
        # peak memory and time per phase with it): "teacher", "teacher_cache", "student",
        # then per micro-batch "forward", "backward", per step "optimizer", then "valid",
        # "save", "eval" and "end"
        self.on_phase = on_phase or (lambda name, trainer: None)
        self.params = to_dict(cfg)
        self.run = RunDir(cfg.output_dir)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.is_main = self.accelerator.is_main_process
        self.state = None  # fresh | resume | finished, once claim() has looked at the folder
        self.step, self.saved_step, self.skipped = 0, None, 0
        # wall time: this attempt's start, and what earlier attempts spent up to the checkpoint
        # it resumed from (kept in the checkpoint), so a run made in parts reports its whole cost
        self.attempt_started, self.elapsed_before = time.time(), 0.0
        self.phase = "set-up"  # set-up | training | the final evaluation (for messages)

    @contextlib.contextmanager
    def claim(self):
        """Own the run folder for the block: the main process takes its lock before anything
        is written (a second process fails at once, writing nothing), then decides what to do
        with it (`RunDir.prepare`). Other processes (ranks of `accelerate launch`) take no
        lock: they follow the main process's decision."""
        # a finished run on a read-only mount is reused from there, without a lock
        with self.run.lock(read_only_ok=True) if self.is_main else contextlib.nullcontext():
            if self.is_main:
                self.state = self.run.prepare(self.params, force=self.force)
            self.accelerator.wait_for_everyone()
            if not self.is_main:
                self.state = "finished" if self.run.is_finished() else (
                    "resume" if self.run.has_checkpoint() else "fresh")
            yield self

    # -- set-up
    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        set_seed(t.seed)
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        load_reports = {}  # records no split can use (not an object, a missing field), by split
        self.splits = data_lib.load_splits(cfg.data, self.tokenizer, reports=load_reports)
        data_lib.check_eval_splits(self.splits, cfg.data, cfg.eval.splits, cfg.eval.skip_empty_splits)
        self.data_hash = data_lib.data_hash(self.splits["train"])
        self.teacher_model = None
        samples = t.objective == "seqkd" or t.train_on == "teacher_samples"
        # the teacher in training (eval.teacher_kl's is built at the end, if its signals are not cached)
        signals = t.objective in TEACHER_SIGNAL_OBJECTIVES and bool(teacher_use(cfg, training=True))
        if samples or t.objective == "dpkd_seq" or (signals and t.teacher_mode == "online"):
            self.on_phase("teacher", self)
            self.teacher_model = self.build("teacher")
        train_records = self.splits["train"]
        if samples:  # SeqKD, or the released runner's data variant: the teacher's own responses
            train_records = self.teacher_responses(train_records)
        self.train_set, report = self.tokenize(train_records)
        report.absorb(load_reports.pop("train", None))
        self.filter_report = report.as_dict()
        if load_reports:
            self.filter_report["other_splits"] = {k: r.as_dict() for k, r in load_reports.items()}
        self.pretrain = None
        if t.lm_coef > 0:
            texts = (data_lib.pydoc_corpus() if cfg.data.pretrain_source == "pydoc"
                     else data_lib.pretrain_texts(cfg.data.pretrain_path))
            self.pretrain = data_lib.pretrain_blocks(texts, self.tokenizer, cfg.data.pretrain_block_size,
                                                     max_blocks=cfg.data.pretrain_max_blocks)
        self.chosen = {}
        if t.objective == "dpkd_seq":
            self.setup_dpkd_seq()
        if signals and t.teacher_mode == "cache":
            self.teacher = self.teacher_signals()
        elif self.teacher_model is not None:
            self.teacher = obj_lib.OnlineTeacher(self.teacher_model)
        else:
            self.teacher = None
        self.on_phase("student", self)
        self.student = self.build("student")
        if self.teacher_model is not None:
            model_lib.check_same_vocab(self.tokenizer, self.tokenizer, self.teacher_model, self.student)
        self.optimizer = torch.optim.AdamW(param_groups(self.student, t.weight_decay), lr=t.lr,
                                           betas=(t.adam_beta1, t.adam_beta2))
        self.student, self.optimizer = self.accelerator.prepare(self.student, self.optimizer)
        if self.teacher_model is not None and self.teacher_model.device != self.accelerator.device \
                and cfg.teacher.quantization == "none":
            self.teacher_model.to(self.accelerator.device)
        lengths = [len(ex["input_ids"]) for ex in self.train_set]
        self.schedule = batch_schedule(lengths, t.batch_size, t.max_steps * t.grad_accum, t.seed)

    def build(self, role: str):
        """The teacher (frozen) or the student, refused in one line when the run's sequences
        would not fit its table of positions (config.position_needs)."""
        mcfg = getattr(self.cfg, role)
        model = model_lib.build_model(mcfg, self.tokenizer, trainable=role == "student")
        model_lib.check_positions(model, position_needs(self.cfg, role),
                                  f"the {role} ({model_lib.describe(mcfg)})")
        return model

    def tokenize(self, records):
        d = self.cfg.data
        return data_lib.build_sft_dataset(records, self.tokenizer, max_length=d.max_length,
                                          max_prompt=d.max_prompt,
                                          min_response_tokens=d.min_response_tokens,
                                          bad_data=d.bad_data, source=data_lib.split_source(d, "train"))

    @functools.cached_property
    def teacher_identity(self) -> dict:
        return tc.teacher_identity(self.cfg, self.tokenizer)

    def teacher_signals(self) -> obj_lib.CachedTeacher:
        """Cached teacher signals on the train set (and the pre-train blocks): built once per
        (teacher, tokenizer, data, format), shared by every method and seed that uses them."""
        cfg, t = self.cfg, self.cfg.train
        built = {}
        self.on_phase("teacher_cache", self)

        def get_teacher():
            if "model" not in built:
                built["model"] = self.build("teacher")
            return built["model"]

        if not self.is_main:  # the main process builds the cache; the others then read it
            self.accelerator.wait_for_everyone()
        ident, fmt, k = self.teacher_identity, t.cache_format, t.cache_topk
        meta = ident | {"k": k, "format": fmt}
        kw = dict(meta=meta, fmt=fmt, batch_size=cfg.eval.batch_size, device=self.accelerator.device,
                  progress=self.progress)
        pad = self.tokenizer.pad_token_id
        caches = [tc.load_or_build(tc.folder(cfg.cache_dir, meta, self.train_set), get_teacher,
                                   self.train_set, pad, k, **kw)]
        if self.pretrain is not None:
            blocks = [{"id": f"pt{i}", "input_ids": row.tolist(), "labels": row.tolist(), "prompt_len": 0}
                      for i, row in enumerate(self.pretrain)]
            caches.append(tc.load_or_build(tc.folder(cfg.cache_dir, meta, blocks), get_teacher,
                                           blocks, pad, k, **kw))
        built.clear()
        if self.is_main:
            self.accelerator.wait_for_everyone()
        return obj_lib.CachedTeacher(*caches, device=self.accelerator.device)

    def teacher_responses(self, records):
        """Teacher-sampled responses to the prompts of `records` (SeqKD's data, and the
        released runner's ``train_on: teacher_samples``), sampled once per (teacher, data,
        length) into the cache folder and shared by every run that needs them, whatever its
        training seed: like MiniLLM's SeqKD data, one set drawn once (TEACHER_SAMPLE_SEED), so a
        seed's cost is its training. A sample cut at ``seq_max_new_tokens`` is marked
        ``response_ended: false`` and tokenised without EOS (data.tokenize_example), so SeqKD does
        not learn to stop where the sampler ran out of room."""
        t, e = self.cfg.train, self.cfg.eval
        key = tc.cache_key(**self.teacher_identity, data=data_lib.data_hash(records),
                           seed=TEACHER_SAMPLE_SEED, max_new_tokens=t.seq_max_new_tokens)

        def sample(recs):   # (text, ended by EOS): a sample cut at the limit gets no EOS (response_row's rule)
            ids = eval_lib.generate_ids(self.teacher_model, self.tokenizer,
                                        [data_lib.format_prompt(r) for r in recs],
                                        max_new_tokens=t.seq_max_new_tokens, batch_size=e.batch_size,
                                        seed=TEACHER_SAMPLE_SEED, keys=[r["id"] for r in recs],
                                        progress=self.progress)
            return [(self.tokenizer.decode(x, skip_special_tokens=True).strip(), len(x) < t.seq_max_new_tokens)
                    for x in ids]
        return tc.load_or_sample(tc.responses_path(self.cfg.cache_dir, key), records, sample,
                                 write=self.is_main)

    def teacher_sample_ids(self) -> list[list[int]]:
        """DPKD-seq's chosen side as token ids: the teacher's sample for each training prompt
        (the tokenised prompt itself, so no decode / re-encode), cut before its first EOS
        (`generate_ids`). Drawn once per (teacher, prompts, length) with TEACHER_SAMPLE_SEED
        and kept in the cache folder for every seed and method that needs them."""
        t, e = self.cfg.train, self.cfg.eval
        prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in self.train_set]
        keys = [ex["id"] for ex in self.train_set]
        key = tc.cache_key(**self.teacher_identity, kind="sample_ids", prompts=data_lib.data_hash(prompts),
                           ids=keys, seed=TEACHER_SAMPLE_SEED, max_new_tokens=t.seq_max_new_tokens)
        path = tc.responses_path(self.cfg.cache_dir, key)
        if path.exists():
            try:
                rows = read_jsonl(path)
                if [r["id"] for r in rows] == keys:
                    return [r["new_ids"] for r in rows]
            except Exception as exc:  # noqa: BLE001 - unreadable: sample again
                log.warning("warning: %s is unreadable (%s): sampling again", path, type(exc).__name__)
        samples = eval_lib.generate_ids(self.teacher_model, self.tokenizer, prompts,
                                        max_new_tokens=t.seq_max_new_tokens, batch_size=e.batch_size,
                                        seed=TEACHER_SAMPLE_SEED, keys=keys, progress=self.progress)
        if self.is_main:
            write_jsonl(path, [{"id": k, "new_ids": ids} for k, ids in zip(keys, samples)])
        return samples

    def setup_dpkd_seq(self) -> None:
        """DPKD-seq's chosen side: the teacher's sample for each training prompt, built by
        `response_row` under the same EOS rule as the student's rejected samples, a batch of
        its own (the CE term stays on the dataset responses), with the teacher's log-probs of
        it computed once. How many teacher samples ended by EOS (and their lengths) goes to
        the manifest and the summary: with a short `seq_max_new_tokens` most are cut."""
        t, eos = self.cfg.train, self.tokenizer.eos_token_id
        samples = self.teacher_sample_ids()
        self.chosen = {ex["id"]: response_row(ex["id"], ex["input_ids"][: ex["prompt_len"]], new,
                                              t.seq_max_new_tokens, eos)
                       for ex, new in zip(self.train_set, samples)}
        self.teacher_sample_stats = {f"teacher_sample_{k}": v
                                     for k, v in sample_stats(list(self.chosen.values())).items()}
        self.filter_report |= self.teacher_sample_stats
        rows = list(self.chosen.values())
        key = tc.cache_key(**self.teacher_identity, data=data_lib.data_hash(rows), average=t.length_normalize)
        self.ref_chosen = tc.load_or_score(
            tc.scores_path(self.cfg.cache_dir, key), rows,
            lambda batch: obj_lib.OnlineTeacher(self.teacher_model).sequence_logps(
                self.to_device(batch), t.length_normalize),
            self.tokenizer.pad_token_id, write=self.is_main)
        self.rejected = {}

    def dpkd_seq_lengths(self) -> dict:
        """The response lengths of DPKD-seq's pairs over the run: the teacher's samples (set-up)
        and the student's rejected samples (the mean of the per-step rows of metrics.jsonl,
        this process's share of each batch)."""
        out = dict(self.teacher_sample_stats)
        path = self.run.file("metrics.jsonl")
        rows = read_jsonl(path, torn_ok=True) if self.is_main and path.exists() else []
        for key in ("new_tokens", "ended_share", "empty_share"):
            values = [r[f"rejected_{key}"] for r in rows if f"rejected_{key}" in r]
            out[f"rejected_sample_{key}"] = float(np.mean(values)) if values else None
        return out

    # -- batches
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

    def sample_rejected(self, index: int) -> None:
        """The student's own samples (DPKD-seq's rejected side) for micro-batches index ..
        index + rejected_every - 1, drawn in one batch by the current student ("batch
        on-policy" when rejected_every > 1), with the teacher's log-probs of them."""
        t, eos = self.cfg.train, self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        stop = min(index + t.rejected_every, len(self.schedule))
        wanted = [(j, i) for j in range(index, stop) for i in self.my_rows(j)]
        prompts = [self.train_set[i]["input_ids"][: self.train_set[i]["prompt_len"]] for _, i in wanted]
        model = self.accelerator.unwrap_model(self.student)
        samples = eval_lib.generate_ids(model, self.tokenizer, prompts, max_new_tokens=t.seq_max_new_tokens,
                                        batch_size=max(len(prompts), 1), seed=t.seed * 7919 + index,
                                        keys=[f"{j}:{i}" for j, i in wanted], progress=False)
        rows = [response_row(self.train_set[i]["id"], p, new, t.seq_max_new_tokens, eos)
                for (_, i), p, new in zip(wanted, prompts, samples)]
        teacher = obj_lib.OnlineTeacher(self.teacher_model)
        # length-sorted batches of score_rows' default 16, not eval's (150 on cpu): one padded
        # batch of 64 samples cost the cpu teacher 27.5 s, batches of 16 cost 14.2 s
        scores = tc.score_rows(rows, lambda b: teacher.sequence_logps(self.to_device(b), t.length_normalize), pad)
        self.rejected = {}
        for (j, _), row, score in zip(wanted, rows, scores):
            self.rejected.setdefault(j, []).append((row, score))

    def dpkd_seq_pair(self, index: int) -> dict:
        if index not in self.rejected:
            self.sample_rejected(index)
        rows = [self.train_set[i] for i in self.my_rows(index)]
        chosen = [self.chosen[ex["id"]] for ex in rows]
        rejected, ref_rejected = zip(*self.rejected.pop(index))
        pad = self.tokenizer.pad_token_id
        return {"chosen": self.to_device(data_lib.collate_sft(chosen, pad)),
                "rejected": self.to_device(data_lib.collate_sft(list(rejected), pad)),
                "lengths": {"chosen": sample_stats(chosen), "rejected": sample_stats(list(rejected))},
                "ref_chosen": torch.tensor([self.ref_chosen[ex["id"]] for ex in chosen],
                                           device=self.accelerator.device),
                "ref_rejected": torch.tensor(ref_rejected, device=self.accelerator.device)}

    # -- one step
    def step_loss(self, index: int) -> tuple[obj_lib.StepLoss, list]:
        """Loss of micro-batch `index` (objectives.step_loss) and the batch's example ids."""
        t = self.cfg.train
        batch = self.micro_batch(index)
        out = obj_lib.step_loss(
            t, self.student, self.teacher, batch,
            pretrain=self.pretrain_batch(index) if self.pretrain is not None else None,
            pair=self.dpkd_seq_pair(index) if t.objective == "dpkd_seq" else None,
            response_scale=self.token_share(index))
        return out, batch["ids"]

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
    def save_checkpoint(self, step: int) -> None:
        """A checkpoint of `step` (main process), only of finite weights: a non-finite one
        stops the run (TrainingFault) and the last good checkpoint stays."""
        if not self.weights_finite():
            self.fault(f"the weights are not finite after step {step}")
        # every process's DPKD-seq samples drawn for the coming steps (each rank draws its own rows)
        rejected = gather_objects(getattr(self, "rejected", {}))
        if self.is_main:
            model = self.accelerator.unwrap_model(self.student)
            self.run.save_checkpoint({
                "step": step, "skipped": self.skipped, "optimizer": self.optimizer.state_dict(),
                "elapsed_s": self.elapsed_s(),
                "model": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()},
                # DPKD-seq's samples drawn for the coming steps (rejected_every > 1), one dict per
                # process: a resumed run must not redraw them from a student that has moved on
                "rejected_by_rank": rejected})
        self.saved_step = step

    def load_checkpoint(self) -> int:
        """The step of the newest readable checkpoint (0: none), with its state restored. The
        main process checks (and moves a damaged one aside) first; the others then read what it
        left, so no two processes rename one file or resume from different steps."""
        state = self.run.load_checkpoint() if self.is_main else None
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            state = self.run.load_checkpoint()
        if state is None:
            return 0
        model = self.accelerator.unwrap_model(self.student)
        missing = model.load_state_dict(state["model"], strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"checkpoint in {self.run.path} does not fit this model: "
                               f"{missing.unexpected_keys[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        by_rank, world = state.get("rejected_by_rank"), self.accelerator.num_processes
        if by_rank is None:  # a checkpoint of one process, written before rejected_by_rank
            by_rank = [state.get("rejected", {})]
        # another number of processes splits the batches otherwise: those samples are drawn again
        self.rejected = by_rank[self.accelerator.process_index] if len(by_rank) == world else {}
        self.skipped = state.get("skipped", 0)
        self.elapsed_before = state.get("elapsed_s", 0.0)   # 0: a checkpoint from before it was kept
        self.saved_step = state["step"]
        return state["step"]

    def elapsed_s(self) -> float:
        """Wall seconds this run has cost: this attempt's so far, plus earlier attempts' up to
        the checkpoint it resumed from (their work after it was lost and is redone here)."""
        return self.elapsed_before + time.time() - self.attempt_started

    def doing(self) -> str:
        """What the run was doing, for a one-line error (memory, disk)."""
        if self.phase == "training":
            return f"training step {self.step + 1}"
        if self.phase == "set-up":
            return "the set-up (loading the data and the models)"
        return f"{self.phase} after step {self.step}"

    def save_model(self, model) -> None:
        """The final model (models.save_model writes it atomically and removes its temporary
        on failure); a full disk is one line with the size needed."""
        out = self.run.file("model")
        try:
            model_lib.save_model(model, out, tokenizer=self.tokenizer)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            raise OutOfResources(
                f"the model could not be written to {out}: no space left on the disk (it needs about "
                f"{human_bytes(size)}, {free_space(out.parent)} free); {self.run.checkpoint_note()}; free "
                f"space, then rerun the same command to resume") from None

    def fault(self, what: str, detail: str = "") -> None:
        """Stop on a numerical fault: the manifest says failed, the last good checkpoint stays."""
        if self.is_main:
            self.run.fail(what)
        raise TrainingFault(f"{what}{detail}; {self.run.checkpoint_note()}")

    def weights_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.student.parameters() if p.requires_grad)

    def interrupted_message(self, asked: dict) -> str:
        """One line for a stop outside a step's end (set-up, the final evaluation)."""
        resume = (f"from step {self.saved_step}" if self.saved_step is not None else
                  "from its last checkpoint" if self.run.has_checkpoint() else "from step 0")
        where = self.phase if self.phase == "set-up" else f"{self.phase} after step {self.step}"
        return (f"interrupted ({asked['signal'] or 'KeyboardInterrupt'}) during {where}; rerun the same "
                f"command to resume ({resume})")

    def stop_asked(self, asked: dict) -> bool:
        """Whether a signal asked to stop, on any process (they must stop at the same step)."""
        if self.accelerator.num_processes == 1:
            return asked["signal"] is not None
        if asked["signal"] is not None:
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()

    # -- evaluation
    def valid_metrics(self) -> dict:
        model = self.accelerator.unwrap_model(self.student)
        out = eval_lib.reference_metrics(model, self.tokenizer, self.splits.get("valid") or
                                         self.splits["train"][:64], self.cfg.data)
        return {"valid_nll": out.get("nll"), "valid_token_acc": out.get("token_acc")}

    def final_eval(self) -> dict:
        model = self.accelerator.unwrap_model(self.student)
        # eval.teacher_kl: the run's teacher, or built now if a split's signals are not cached yet
        known = self.cfg.teacher is not None and self.cfg.eval.teacher_kl
        teacher = eval_lib.eval_teacher(self.cfg, self.tokenizer, self.accelerator.device,
                                        model=self.teacher_model, progress=self.progress,
                                        identity=self.teacher_identity if known else None)
        rows, summary = eval_lib.evaluate_splits(model, self.tokenizer, self.splits, self.cfg.eval,
                                                 self.cfg.data, progress=self.progress, teacher=teacher)
        self.run.write_jsonl("eval.jsonl", rows)
        return summary


def train(cfg: RunConfig, *, force: bool = False, progress: bool = True, on_phase=None) -> dict:
    """Run (or resume, or reuse) one training run; returns its summary. ``on_phase``: see
    `Trainer` (the GPU check's probe; None: nothing is called).

    The run folder is locked first (`Trainer.claim`). A stop is always recorded in the
    manifest: ``interrupted`` (SIGINT / SIGTERM: KeyboardInterrupt with a one-line message
    saying how to resume), ``failed`` (a numerical fault, TrainingFault, or any other error)."""
    with stop_requests() as asked:
        tr = Trainer(cfg, force=force, progress=progress, on_phase=on_phase)
        with tr.claim():
            if tr.state == "finished":
                return read_json(tr.run.file("summary.json"))
            try:
                return _train(tr, asked)
            except KeyboardInterrupt as err:
                asked["closing"] = True
                message = str(err) if isinstance(err, StoppedAtStep) else tr.interrupted_message(asked)
                if tr.is_main:
                    with contextlib.suppress(OSError):  # a full disk: the message still comes first
                        tr.run.write_manifest(status="interrupted", interrupted_at=tr.step)
                raise KeyboardInterrupt(message) from None
            except TrainingFault:
                raise  # the manifest already says failed
            except Exception as err:
                # memory or disk exhausted: one line, the run stays resumable
                short = out_of_resources(err, tr.doing(), tr.run.checkpoint_note())
                recorded = not tr.is_main or tr.run.fail(
                    str(short) if short else f"{type(err).__name__}: {str(err)[:300]}")
                if short is None:
                    raise  # never masked by a failure to record it
                if not recorded:
                    short = OutOfResources(f"{short} (the manifest could not be updated: it still says "
                                           f"{tr.run.manifest.get('status', 'running')})")
                raise short from None


def _train(tr: Trainer, asked: dict) -> dict:
    cfg, t = tr.cfg, tr.cfg.train
    tr.setup()
    if tr.is_main:
        tr.run.start_manifest(tr.params, seed=t.seed, device=str(tr.accelerator.device),
                              data_hash=tr.data_hash)
        tr.run.write_manifest(filter_report=tr.filter_report, num_processes=tr.accelerator.num_processes)
    step = tr.step = tr.load_checkpoint() if tr.state == "resume" else 0
    if tr.is_main:
        tr.run.truncate_metrics(step)
    bar = tqdm(total=t.max_steps, initial=step, desc=t.objective,
               disable=not (tr.progress and tr.is_main), dynamic_ncols=True)
    tr.student.train()
    asked["defer"], tr.phase = True, "training"  # from here a signal stops the loop at the end of a step
    while step < t.max_steps:
        tick = time.time()
        lr = lr_at(step, t)
        for group in tr.optimizer.param_groups:
            group["lr"] = lr
        logs, ids, bad = [], [], None
        probe = t.grad_probe_every and (step + 1) % t.grad_probe_every == 0
        for micro in range(t.grad_accum):
            tr.on_phase("forward", tr)
            out, batch_ids = tr.step_loss(step * t.grad_accum + micro)
            ids += list(batch_ids)
            parts = out.parts | out.stats
            if any_process(not bool(torch.isfinite(out.total)), tr.accelerator.device):  # decided together
                bad = parts
                break
            if probe and micro == 0:  # where the update comes from (extra backward passes)
                parts |= obj_lib.gradient_split(out.terms, tr.student.parameters(), tr.optimizer,
                                                  clip=t.clip_grad, scale=1.0 / t.grad_accum)
            tr.on_phase("backward", tr)
            tr.accelerator.backward(out.total / t.grad_accum)
            logs.append(parts | {"loss": out.total.item()})
        if bad is not None:  # a non-finite loss: stop, or skip the batch (up to a share of the run)
            tr.optimizer.zero_grad(set_to_none=True)
            if t.nan_policy == "stop":
                tr.fault(f"non-finite loss at step {step}",
                         f": parts {bad}, batch ids {ids[:16]} (train.nan_policy=skip skips such batches)")
            if not tr.weights_finite():
                tr.fault(f"the weights are not finite at step {step} ({tr.skipped} steps skipped before)",
                         ": skipping batches cannot recover from that")
            tr.skipped += 1
            if tr.skipped > t.max_skipped_share * t.max_steps:
                tr.fault(f"{tr.skipped} of {step + 1} steps had a non-finite loss, over "
                         f"train.max_skipped_share={t.max_skipped_share} of {t.max_steps}")
            row = None
        else:
            tr.on_phase("optimizer", tr)
            grad_norm = tr.accelerator.clip_grad_norm_(tr.student.parameters(), t.clip_grad) \
                if t.clip_grad > 0 else torch.tensor(float("nan"))
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
            row = {"step": step + 1, "lr": lr, "grad_norm": float(grad_norm), "time_s": time.time() - tick}
            for key in dict.fromkeys(k for p in logs for k in p):
                row[key] = float(np.mean([p[key] for p in logs if key in p]))
            if t.objective != "seqkd" and t.train_on == "dataset":  # else CE is on teacher samples
                row["student_nll_ref"] = row.get("ce")
        step = tr.step = step + 1
        if row is not None:
            if t.eval_every and step % t.eval_every == 0:
                row |= tr.valid_metrics()
            if tr.is_main and (step % t.log_every == 0 or step == t.max_steps):
                tr.run.append_metrics(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        bar.update(1)
        if tr.stop_asked(asked):
            tr.save_checkpoint(step)
            bar.close()
            raise StoppedAtStep(f"interrupted ({asked['signal'] or 'a signal to another process'}) "
                                f"at step {step}; rerun the same command to resume")
        if t.save_every and step % t.save_every == 0 and step < t.max_steps:
            tr.save_checkpoint(step)
    if not t.save_every and tr.saved_step != step and step > 0:
        # no checkpoints asked for: one at the end all the same, so that a stop in the final
        # evaluation (or a full disk at the model save) does not cost the training again
        tr.save_checkpoint(step)
        if tr.stop_asked(asked):  # a signal during that save
            bar.close()
            raise StoppedAtStep(f"interrupted ({asked['signal'] or 'a signal to another process'}) "
                                f"at step {step}; rerun the same command to resume")
    # the final evaluation stops at once on a signal; a rerun resumes from the last checkpoint
    asked["defer"], tr.phase = False, "the final evaluation"
    bar.close()
    tr.accelerator.wait_for_everyone()
    if not tr.weights_finite():
        tr.fault(f"the weights are not finite after {step} steps ({tr.skipped} skipped)")
    summary = {"objective": t.objective, "steps": step, "skipped_batches": tr.skipped,
               "seed": t.seed, "run_id": run_id(tr.params)}
    if t.objective == "dpkd_seq":
        summary |= tr.dpkd_seq_lengths()
    tr.on_phase("valid", tr)
    summary |= tr.valid_metrics()
    if not math.isfinite(summary["valid_nll"] if summary["valid_nll"] is not None else 0.0):
        tr.fault(f"the validation NLL is not finite after {step} steps ({tr.skipped} skipped)")
    if tr.is_main:
        tr.on_phase("save", tr)
        model = tr.accelerator.unwrap_model(tr.student)
        if cfg.student.lora and cfg.student.merge_lora_on_save:
            model = model_lib.merge_lora(model)
        tr.save_model(model)
        if cfg.eval.splits:
            tr.on_phase("eval", tr)
            summary |= tr.final_eval()
        tr.on_phase("end", tr)
        summary["wall_time_s"] = tr.elapsed_s()
        write_json(tr.run.file("summary.json"), summary)
        tr.run.write_manifest(status="finished", wall_time_s=summary["wall_time_s"],
                              finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    tr.accelerator.wait_for_everyone()
    return summary
