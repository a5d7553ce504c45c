"""Run parameters: YAML files that map 1:1 to dataclasses, validated before anything loads.

A params file is a nested mapping whose sections are the dataclasses below (docs/params.md
lists every key). Every key must be a field (an unknown key fails, naming the closest valid
one), every value must have the field's type, every float must be finite, ranges are checked,
and a parameter that the chosen objective, loss type or mode does not use is refused (see
`unused_params`): a typo or a meaningless setting costs a second, not a model load.

A file may start from another: ``extends: ../cpu/base_train.yaml`` (a path relative to the
file) merges this file's keys over that one's, section by section, so a profile states only
what differs. Command-line overrides use dotted keys: ``--set train.lr=1e-4``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import choices as C
from .errors import ConfigError

__all__ = ["ConfigError", "TokenizerConfig", "ModelConfig", "DataConfig", "TrainConfig",
           "EvalConfig", "RunConfig", "load_config", "load_yaml", "from_dict", "to_dict",
           "validate", "unused_params", "diff_keys", "apply_overrides"]


@dataclass
class TokenizerConfig:
    kind: str = "bpe_local"  # bpe_local: small BPE trained here; gpt2/smollm2: offline assets
    vocab_size: int = 512  # bpe_local only
    path: str = ""  # pretrained only: hub id or local dir


@dataclass
class ModelConfig:
    source: str = "tiny"  # tiny | pretrained (hub id / dir) | smollm2 (GGUF wheel) | saved (our run)
    name_or_path: str = ""  # pretrained / saved
    arch: str = "llama"  # tiny only: llama | gpt2
    n_layer: int = 2  # tiny only
    n_embd: int = 64  # tiny only
    n_head: int = 4  # tiny only
    seed: int = 0  # tiny only: init seed
    prune_to: int = 0  # >0: keep only the first k decoder layers (depth-pruned student)
    dtype: str = "float32"
    quantization: str = "none"  # none | 4bit (nf4) | 8bit, through bitsandbytes
    lora: bool = False  # student only
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    merge_lora_on_save: bool = False  # save a plain model (teacher building) instead of an adapter
    gradient_checkpointing: bool = False  # student only


@dataclass
class DataConfig:
    source: str = "synthetic"
    path: str = ""  # jsonl / minillm file or folder
    data_seed: int = 0
    n_train: int = 2000  # synthetic only
    n_valid: int = 200
    n_test: int = 300
    n_heldout: int = 300  # synthetic only
    train_slice: str = ""  # "start:end" of the train split ("" = all): builds and methods use disjoint slices
    max_length: int = 512
    max_prompt: int = 256
    min_response_tokens: int = 0
    bad_data: str = "drop"  # drop (count and report) | error
    pretrain_source: str = "none"  # pre-train corpus D_p of the lm_coef term
    pretrain_path: str = ""  # pretrain_source jsonl only
    pretrain_block_size: int = 128
    pretrain_max_blocks: int = 2000


@dataclass
class TrainConfig:
    objective: str = "dpkd_token"
    max_steps: int = 100
    batch_size: int = 8  # global batch (split across processes)
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr: float = 1e-7  # cosine only
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_schedule: str = "cosine"  # cosine | constant
    t_max_steps: int = 0  # cosine period; 0 = max_steps. >0: torch's CosineAnnealingLR, which climbs back after it
    warmup_steps: int = 0
    clip_grad: float = 1.0
    # the step (objectives.py): (1-kd_ratio)*CE + kd_ratio*objective + lm_coef*pre-train term
    kd_ratio: float = 0.5  # distillation objectives only
    lm_coef: float = 0.5
    pretrain_loss: str = "released"  # released: (1-kd_ratio)*CE + kd_ratio*H(p,q); ce: Algorithm 1's L_PT
    beta: float = 0.1  # dpkd_token / dpkd_seq
    loss_type: str = "sigmoid"  # dpkd_token / dpkd_seq
    label_smoothing: float = 0.0  # loss types sigmoid, dpop, simpo, cpo
    reference_free: bool = False  # loss types sigmoid, ipo, hinge, dpop
    gamma: float = 0.0  # loss type simpo: target margin
    dpop_lambda: float = 50.0  # loss type dpop: penalty weight (released code's default)
    cpo_alpha: float = 1.0  # loss type cpo: NLL regulariser weight
    length_normalize: bool = True  # dpkd_seq: divide sequence log-probs by length (paper's variant)
    temperature: float = 1.0  # token-level distillation objectives
    jsd_beta: float = 0.5  # jsd
    skew_alpha: float = 0.1  # skl / srkl (DistiLLM)
    train_on: str = "dataset"  # dataset | teacher_samples: the responses CE and token terms see (not seqkd / dpkd_seq)
    seq_max_new_tokens: int = 64  # seqkd / dpkd_seq / train_on teacher_samples: sampled response length
    rejected_every: int = 1  # dpkd_seq: draw the student's samples for this many steps at once
    teacher_mode: str = "online"  # online | cache (token-level objectives: signals precomputed once)
    cache_format: str = "hidden"  # cache: hidden = exact (final hidden states + head); topk = compact
    cache_topk: int = 32  # cache_format topk only
    loss_chunk_size: int = 0  # >0: memory-lean loss over chunks of response positions
    autocast_dtype: str = "float32"  # bfloat16 autocast is faster on some CPUs; fp32 default
    log_every: int = 1
    eval_every: int = 0  # teacher-forced NLL on the validation split every N steps (0 = end only)
    save_every: int = 0  # checkpoint every N steps (0 = end only)
    grad_probe_every: int = 0  # >0: every N steps, log each loss term's gradient norm and cosine
    nan_policy: str = "stop"  # stop | skip
    max_skipped_share: float = 0.1  # nan_policy skip: stop once this share of steps was skipped
    seed: int = 40


@dataclass
class EvalConfig:
    splits: list = field(default_factory=lambda: ["test", "heldout"])
    max_examples: int = 0  # per split; 0 = all (the first n records: every model sees the same)
    greedy: bool = True  # greedy decoding: the primary generation metric
    sample_seeds: list = field(default_factory=list)  # T-sampling, one pass per seed (paper protocol)
    sample_max_examples: int = 0  # sampling on the first n of those examples only (0 = all of them)
    teacher_forced: bool = True  # NLL and token accuracy on the references
    batch_size: int = 16
    max_new_tokens: int = 128
    temperature: float = 1.0  # sampling only
    top_k: int = 0  # sampling only
    top_p: float = 1.0  # sampling only
    no_repeat_ngram_size: int = 0


@dataclass
class RunConfig:
    output_dir: str = "results/smoke/run"
    cache_dir: str = ".cache/teacher_signals"  # teacher signals and samples, keyed by what made them
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    threads: int = 0  # torch threads; 0 = leave torch's default


# ----------------------------------------------------------------------------- parsing

def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check `value` against a field type; ints are accepted for floats (1 → 1.0)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return _from_dict(typ, value, key + ".")
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, list)}
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: {value} is not a finite number")
            return float(value)
    elif ok.get(typ, lambda v: True)(value):
        return value
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key}: expected {name}, got {value!r} ({type(value).__name__})")


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}'{_closest(key, names)}; "
                              f"valid keys here: {', '.join(names)}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def _check_choice(key: str, value: str, options) -> None:
    if value not in options:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(options)}"
                          f"{_closest(value, options)}")


def _check_range(key: str, value, low=None, high=None, low_open=False, high_open=False):
    bad = (low is not None and (value < low or (low_open and value == low))) or \
          (high is not None and (value > high or (high_open and value == high)))
    if bad:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ConfigError(f"{key}: {value} is out of range {lo}{low if low is not None else '-inf'}, "
                          f"{high if high is not None else 'inf'}{hi}")


def parse_slice(text: str, key: str = "data.train_slice") -> slice:
    """'start:end' (either side may be empty) → slice; '' → everything."""
    if not text:
        return slice(None)
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, end = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise ConfigError(f"{key}: expected 'start:end' (e.g. '1200:2400'), got {text!r}") from None
    if (start is not None and start < 0) or (end is not None and end < 0) or \
            (start is not None and end is not None and end <= start):
        raise ConfigError(f"{key}: {text!r} is empty or negative; need 0 <= start < end")
    return slice(start, end)


# ----------------------------------------------------------------------------- what is used

def _defaults(cls) -> dict:
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls)}


def _train_uses(t: TrainConfig, name: str) -> tuple[bool, str]:
    """Does the train section's `name` affect a run of `t`? (used, where it applies)."""
    obj, dpkd = t.objective, t.objective in ("dpkd_token", "dpkd_seq")
    topk = t.teacher_mode == "cache" and t.cache_format == "topk"
    rules = {
        "kd_ratio": (obj in C.DISTILL_OBJECTIVES, f"objectives {', '.join(C.DISTILL_OBJECTIVES)}"),
        "pretrain_loss": (obj in C.DISTILL_OBJECTIVES and t.lm_coef > 0,
                          "a distillation objective with lm_coef > 0 (without a teacher term both forms are CE)"),
        "min_lr": (t.lr_schedule == "cosine", "lr_schedule cosine"),
        "t_max_steps": (t.lr_schedule == "cosine", "lr_schedule cosine"),
        "teacher_mode": (obj in C.TOKEN_OBJECTIVES, f"objectives {', '.join(C.TOKEN_OBJECTIVES)}"),
        "cache_format": (obj in C.TOKEN_OBJECTIVES and t.teacher_mode == "cache", "teacher_mode cache"),
        "cache_topk": (obj in C.TOKEN_OBJECTIVES and topk, "teacher_mode cache with cache_format topk"),
        "beta": (dpkd, "objectives dpkd_token, dpkd_seq"),
        "loss_type": (dpkd, "objectives dpkd_token, dpkd_seq"),
        "length_normalize": (obj == "dpkd_seq", "objective dpkd_seq"),
        "rejected_every": (obj == "dpkd_seq", "objective dpkd_seq"),
        "temperature": (obj in C.TOKEN_OBJECTIVES and not topk,
                        "token-level objectives with the teacher's logits (not a top-k cache)"),
        "jsd_beta": (obj == "jsd", "objective jsd"),
        "skew_alpha": (obj in ("skl", "srkl"), "objectives skl, srkl"),
        "seq_max_new_tokens": (obj in C.SAMPLING_OBJECTIVES or t.train_on == "teacher_samples",
                               "objectives seqkd, dpkd_seq, or train_on teacher_samples"),
        "train_on": (obj not in C.SAMPLING_OBJECTIVES, "every objective but seqkd (always the teacher's "
                     "samples) and dpkd_seq (its chosen side is the teacher's sample already)"),
        "max_skipped_share": (t.nan_policy == "skip", "nan_policy skip"),
    }
    for setting in C.LOSS_TYPE_PARAMS["sigmoid"] + ("gamma", "dpop_lambda", "cpo_alpha"):
        users = [lt for lt, used in C.LOSS_TYPE_PARAMS.items() if setting in used]
        rules[setting] = (dpkd and setting in C.LOSS_TYPE_PARAMS[t.loss_type],
                          f"objectives dpkd_token, dpkd_seq with loss_type {', '.join(users)}")
    return rules.get(name, (True, ""))


def unused_params(cfg: RunConfig, purpose: str = "train") -> list[tuple[str, Any, str]]:
    """(dotted key, value, where it applies) of every parameter set away from its default that this
    run would not use. `purpose` "eval" (a saved model on the eval splits, usually with the
    training run's own params file) checks the tokenizer and eval sections only."""
    out = []

    def check(prefix, section, cls, rule):
        for name, default in _defaults(cls).items():
            if getattr(section, name) != default:
                used, where = rule(name)
                if not used:
                    out.append((f"{prefix}.{name}", getattr(section, name), where))

    tok = cfg.tokenizer
    check("tokenizer", tok, TokenizerConfig, lambda n: {
        "vocab_size": (tok.kind == "bpe_local", "tokenizer.kind bpe_local"),
        "path": (tok.kind == "pretrained", "tokenizer.kind pretrained")}.get(n, (True, "")))
    e = cfg.eval
    generates = e.greedy or bool(e.sample_seeds)
    check("eval", e, EvalConfig, lambda n: {
        **{k: (generates, "eval.greedy or eval.sample_seeds") for k in ("batch_size", "max_new_tokens",
                                                                        "no_repeat_ngram_size")},
        **{k: (bool(e.sample_seeds), "eval.sample_seeds") for k in ("temperature", "top_k", "top_p",
                                                                   "sample_max_examples")},
    }.get(n, (True, "")))
    if purpose == "eval":
        return out
    for role in ("student", "teacher"):
        m = getattr(cfg, role)
        if m is None:
            continue
        lora = role == "student" and m.lora
        check(role, m, ModelConfig, lambda n, m=m, lora=lora, role=role: {
            **{k: (m.source == "tiny", "source tiny") for k in ("arch", "n_layer", "n_embd", "n_head", "seed")},
            "name_or_path": (m.source in ("pretrained", "saved"), "source pretrained or saved"),
            "lora": (role == "student", "the student"),
            **{k: (lora, "student.lora true") for k in ("lora_r", "lora_alpha", "lora_dropout", "merge_lora_on_save")},
            "gradient_checkpointing": (role == "student", "the student"),
        }.get(n, (True, "")))
    d = cfg.data
    pretrain = cfg.train.lm_coef > 0
    check("data", d, DataConfig, lambda n: {
        "path": (d.source in ("jsonl", "minillm"), "data.source jsonl or minillm"),
        "n_train": (d.source == "synthetic", "data.source synthetic"),
        "n_heldout": (d.source == "synthetic", "data.source synthetic"),
        # the switch is pretrain_source; the block settings describe the corpus it names
        "pretrain_source": (pretrain, "train.lm_coef > 0"),
        "pretrain_path": (d.pretrain_source == "jsonl", "data.pretrain_source jsonl"),
    }.get(n, (True, "")))
    check("train", cfg.train, TrainConfig, lambda n: _train_uses(cfg.train, n))
    return out


# ----------------------------------------------------------------------------- validation

def validate(cfg: RunConfig, purpose: str = "train") -> RunConfig:
    """Choices, ranges and consistency that types alone cannot express, then the unused
    check. `purpose` "eval": only what evaluating a saved student reads (no teacher, no train)."""
    d, e = cfg.data, cfg.eval
    _check_choice("tokenizer.kind", cfg.tokenizer.kind, C.TOKENIZER_KINDS)
    _check_range("tokenizer.vocab_size", cfg.tokenizer.vocab_size, 257)
    if cfg.tokenizer.kind == "pretrained" and not cfg.tokenizer.path:
        raise ConfigError("tokenizer.path: tokenizer.kind 'pretrained' needs a hub id or local dir")
    _check_choice("data.source", d.source, C.DATA_SOURCES)
    _check_choice("data.pretrain_source", d.pretrain_source, C.PRETRAIN_SOURCES)
    _check_choice("data.bad_data", d.bad_data, C.BAD_DATA_POLICIES)
    for key in ("n_train", "n_valid", "n_test", "n_heldout", "min_response_tokens"):
        _check_range(f"data.{key}", getattr(d, key), 0)
    _check_range("data.max_length", d.max_length, 2)
    _check_range("data.max_prompt", d.max_prompt, 1)
    _check_range("data.pretrain_block_size", d.pretrain_block_size, 2)
    _check_range("data.pretrain_max_blocks", d.pretrain_max_blocks, 1)
    parse_slice(d.train_slice)
    if d.max_prompt >= d.max_length:
        raise ConfigError(f"data.max_prompt ({d.max_prompt}) must be smaller than data.max_length "
                          f"({d.max_length}): the response needs room")
    if d.source in ("jsonl", "minillm") and not d.path:
        raise ConfigError(f"data.path: data.source '{d.source}' needs a file path")
    if d.path and d.source in ("jsonl", "minillm") and not Path(d.path).exists():
        raise ConfigError(f"data.path: file not found: {d.path}")
    for s in e.splits:
        _check_choice("eval.splits", s, C.SPLITS)
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in e.sample_seeds) \
            or len(set(e.sample_seeds)) != len(e.sample_seeds):
        raise ConfigError(f"eval.sample_seeds: expected distinct integers, got {e.sample_seeds!r}")
    _check_range("eval.max_examples", e.max_examples, 0)
    _check_range("eval.sample_max_examples", e.sample_max_examples, 0)
    _check_range("eval.batch_size", e.batch_size, 1)
    _check_range("eval.max_new_tokens", e.max_new_tokens, 1)
    _check_range("eval.temperature", e.temperature, 0, None, low_open=True)
    _check_range("eval.top_k", e.top_k, 0)
    _check_range("eval.top_p", e.top_p, 0, 1, low_open=True)
    _check_range("eval.no_repeat_ngram_size", e.no_repeat_ngram_size, 0)
    _check_range("threads", cfg.threads, 0)
    for role in ("student",) if purpose == "eval" else ("student", "teacher"):
        m = getattr(cfg, role)
        if m is None:
            continue
        _check_choice(f"{role}.source", m.source, C.MODEL_SOURCES)
        _check_choice(f"{role}.arch", m.arch, C.TINY_ARCHS)
        _check_choice(f"{role}.dtype", m.dtype, C.DTYPES)
        _check_choice(f"{role}.quantization", m.quantization, C.QUANTIZATIONS)
        for key in ("n_layer", "n_embd", "n_head", "lora_r", "lora_alpha"):
            _check_range(f"{role}.{key}", getattr(m, key), 1)
        _check_range(f"{role}.prune_to", m.prune_to, 0)
        _check_range(f"{role}.lora_dropout", m.lora_dropout, 0, 1, high_open=True)
        if m.source in ("pretrained", "saved") and not m.name_or_path:
            raise ConfigError(f"{role}.name_or_path: source '{m.source}' needs a hub id or path")
        if m.source == "saved" and not Path(m.name_or_path).exists():
            raise ConfigError(f"{role}.name_or_path: saved model not found: {m.name_or_path} "
                              f"(run the step that builds it first)")
    if cfg.teacher is not None and cfg.teacher.lora:
        raise ConfigError("teacher.lora: the teacher is frozen; LoRA applies to the student only")
    if purpose == "train":
        _validate_train(cfg)
    unused = unused_params(cfg, purpose)
    if unused:
        key, value, where = unused[0]
        run = f"objective '{cfg.train.objective}'" if purpose == "train" else "an evaluation"
        more = f" (also unused: {', '.join(k for k, _, _ in unused[1:])})" if len(unused) > 1 else ""
        raise ConfigError(f"{key}={value!r} is not used by this run ({run}): it applies to {where}; "
                          f"remove it or change the setting it depends on{more}")
    return cfg


def _validate_train(cfg: RunConfig) -> None:
    t, d = cfg.train, cfg.data
    _check_choice("train.objective", t.objective, C.OBJECTIVES)
    _check_choice("train.loss_type", t.loss_type, C.LOSS_TYPES)
    _check_choice("train.lr_schedule", t.lr_schedule, C.LR_SCHEDULES)
    _check_choice("train.nan_policy", t.nan_policy, C.NAN_POLICIES)
    _check_choice("train.teacher_mode", t.teacher_mode, C.TEACHER_MODES)
    _check_choice("train.cache_format", t.cache_format, C.CACHE_FORMATS)
    _check_choice("train.pretrain_loss", t.pretrain_loss, C.PRETRAIN_LOSSES)
    _check_choice("train.train_on", t.train_on, C.TRAIN_ON)
    _check_choice("train.autocast_dtype", t.autocast_dtype, C.DTYPES)
    for key in ("beta", "lr", "temperature"):
        _check_range(f"train.{key}", getattr(t, key), 0, None, low_open=True)
    _check_range("train.min_lr", t.min_lr, 0, t.lr)
    for key in ("kd_ratio", "lm_coef", "max_skipped_share"):
        _check_range(f"train.{key}", getattr(t, key), 0, 1)
    for key in ("adam_beta1", "adam_beta2"):
        _check_range(f"train.{key}", getattr(t, key), 0, 1, high_open=True)
    _check_range("train.label_smoothing", t.label_smoothing, 0, 0.5, high_open=True)
    _check_range("train.jsd_beta", t.jsd_beta, 0, 1, low_open=True, high_open=True)
    _check_range("train.skew_alpha", t.skew_alpha, 0, 1, high_open=True)
    for key in ("gamma", "dpop_lambda", "cpo_alpha", "weight_decay", "clip_grad"):
        _check_range(f"train.{key}", getattr(t, key), 0)
    for key in ("max_steps", "batch_size", "grad_accum", "cache_topk", "seq_max_new_tokens",
                "rejected_every", "log_every"):
        _check_range(f"train.{key}", getattr(t, key), 1)
    for key in ("warmup_steps", "t_max_steps", "eval_every", "save_every", "loss_chunk_size",
                "grad_probe_every"):
        _check_range(f"train.{key}", getattr(t, key), 0)
    if t.warmup_steps >= t.max_steps:
        raise ConfigError(f"train.warmup_steps ({t.warmup_steps}) must be below train.max_steps "
                          f"({t.max_steps})")
    needs_teacher = t.objective in C.TEACHER_OBJECTIVES or t.train_on == "teacher_samples"
    if needs_teacher and cfg.teacher is None:
        why = f"objective '{t.objective}'" if t.objective in C.TEACHER_OBJECTIVES else "train_on teacher_samples"
        raise ConfigError(f"teacher: {why} needs a teacher section")
    if not needs_teacher and cfg.teacher is not None:
        raise ConfigError(f"teacher: objective '{t.objective}' does not use a teacher; "
                          f"remove the section (teacher: null)")
    if t.teacher_mode == "cache" and t.cache_format == "topk" and t.objective not in C.TOPK_OBJECTIVES:
        raise ConfigError(f"train.cache_format: 'topk' supports objectives "
                          f"{', '.join(C.TOPK_OBJECTIVES)}, not '{t.objective}' (use cache_format hidden)")
    if t.lm_coef > 0 and d.pretrain_source == "none":
        raise ConfigError("train.lm_coef > 0 needs a pre-train corpus: set data.pretrain_source "
                          "(pydoc, or jsonl with data.pretrain_path), or lm_coef: 0")
    if t.lm_coef > 0 and d.pretrain_source == "jsonl" and not Path(d.pretrain_path or "/nonexistent").exists():
        raise ConfigError(f"data.pretrain_path: file not found: '{d.pretrain_path}'")
    if cfg.student.merge_lora_on_save and cfg.student.quantization != "none":
        raise ConfigError("student.merge_lora_on_save: a 4-bit/8-bit base cannot be merged; "
                          "save the adapter (merge_lora_on_save: false)")


# ----------------------------------------------------------------------------- loading

def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {text}: the value is not valid YAML") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def merge(base: dict, over: dict) -> dict:
    """`over`'s keys over `base`'s, section by section (a mapping merges into a mapping;
    anything else, null included, replaces)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A params file as a mapping, with its `extends` chain merged in. Errors name the file
    (and the line, for a YAML syntax error)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or err.__class__.__name__
        raise ConfigError(f"{path}:{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' takes one file path, got {parent!r}")
    return merge(load_yaml(path.parent / parent, _seen + (path.resolve(),)), data)


def from_dict(data: dict, purpose: str = "train") -> RunConfig:
    return validate(_from_dict(RunConfig, data or {}), purpose)


def load_config(path: str | Path, overrides: list[str] | None = None, *,
                purpose: str = "train") -> RunConfig:
    """Read, merge, override and validate a params file (`purpose`: train or eval)."""
    data = apply_overrides(load_yaml(path), overrides or [])
    try:
        return from_dict(data, purpose)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved params dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys
