"""Run parameters: YAML files that map 1:1 to dataclasses, validated before anything loads.

A params file is a nested mapping whose sections are the dataclasses below. Every key must
be a field (an unknown key fails, naming the closest valid one), every value must have the
field's type, and ranges are checked in `validate`, so a typo costs a second, not a model
load. Command-line overrides use dotted keys: `--set train.lr=1e-4 --set output_dir=DIR`.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OBJECTIVES = ("sft", "kd", "rkl", "jsd", "seqkd", "dpkd_token", "dpkd_seq")
TOKENIZER_KINDS = ("bpe_local", "gpt2", "smollm2", "pretrained")
MODEL_SOURCES = ("tiny", "pretrained", "smollm2", "saved")
DATA_SOURCES = ("synthetic", "jsonl", "dolly_hub", "minillm")
PRETRAIN_SOURCES = ("none", "pydoc", "jsonl")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "4bit", "8bit")
LOSS_TYPES = ("sigmoid", "ipo", "dpop", "simpo", "cpo")
TEACHER_MODES = ("online", "cache")


class ConfigError(ValueError):
    """A user error in the params: the message names the key and the fix."""


@dataclass
class TokenizerConfig:
    kind: str = "bpe_local"  # bpe_local: small BPE trained here; gpt2/smollm2: offline assets
    vocab_size: int = 512  # bpe_local only
    path: str = ""  # pretrained: hub id or local dir


@dataclass
class ModelConfig:
    source: str = "tiny"  # tiny | pretrained (hub id / dir) | smollm2 (GGUF wheel) | saved (our run)
    name_or_path: str = ""
    arch: str = "llama"  # tiny only: llama | gpt2
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    prune_to: int = 0  # >0: keep only the first k decoder layers (depth-pruned student)
    dtype: str = "float32"
    quantization: str = "none"  # none | 4bit (nf4) | 8bit, through bitsandbytes
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    merge_lora_on_save: bool = False  # save a plain model (teacher building) instead of an adapter
    gradient_checkpointing: bool = False
    seed: int = 0  # init seed of tiny models


@dataclass
class DataConfig:
    source: str = "synthetic"
    path: str = ""  # jsonl / minillm file or folder
    data_seed: int = 0
    n_train: int = 2000
    n_valid: int = 200
    n_test: int = 300
    n_heldout: int = 300
    max_length: int = 512
    max_prompt: int = 256
    min_response_tokens: int = 0
    bad_data: str = "drop"  # drop (count and report) | error
    pretrain_source: str = "none"  # pre-train corpus D_p for the lm_coef term
    pretrain_path: str = ""
    pretrain_block_size: int = 128
    pretrain_max_blocks: int = 2000


@dataclass
class TrainConfig:
    objective: str = "dpkd_token"
    max_steps: int = 100
    batch_size: int = 8  # global batch (split across processes)
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr: float = 1e-7
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_schedule: str = "cosine"  # cosine | constant
    t_max_steps: int = 0  # cosine period; 0 = max_steps (the released runner uses 2/3 of training)
    warmup_steps: int = 0
    clip_grad: float = 1.0
    # mixing, method.md §2: (1-kd_ratio)*CE + kd_ratio*objective + lm_coef*pre-train term
    kd_ratio: float = 0.5
    lm_coef: float = 0.5
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference_free: bool = False
    length_normalize: bool = True  # dpkd_seq: divide sequence log-probs by length (paper's variant)
    gamma: float = 0.0  # SimPO margin
    temperature: float = 1.0
    jsd_beta: float = 0.5
    seq_max_new_tokens: int = 64  # dpkd_seq / seqkd: generated response length
    teacher_mode: str = "online"  # online | cache (teacher signals precomputed once, on disk)
    cache_format: str = "hidden"  # hidden: exact (final hidden states + head); topk: compact
    cache_topk: int = 32  # topk format only
    cache_dir: str = ".cache/teacher_signals"  # keyed by teacher, tokenizer, data and k
    loss_chunk_size: int = 0  # >0: memory-lean loss over chunks of response positions
    autocast_dtype: str = "float32"  # bfloat16 autocast is faster on some CPUs; fp32 default
    log_every: int = 1
    eval_every: int = 0  # teacher-forced NLL on the validation split every N steps (0 = end only)
    save_every: int = 0  # checkpoint every N steps (0 = end only)
    nan_policy: str = "stop"  # stop | skip
    seed: int = 40


@dataclass
class EvalConfig:
    splits: list = field(default_factory=lambda: ["test", "heldout"])
    max_examples: int = 0  # 0 = all
    seeds: list = field(default_factory=lambda: [10])
    batch_size: int = 16
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0
    generate: bool = True  # False: teacher-forced metrics only


@dataclass
class RunConfig:
    output_dir: str = "results/smoke/run"
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
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return _from_dict(typ, value, key + ".")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list or origin is list:
        if isinstance(value, list):
            return value
    else:
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
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _check_choice(key: str, value: str, options) -> None:
    if value not in options:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(options)}"
                          f"{_closest(value, options)}")


def _check_range(key: str, value, low=None, high=None, low_open=False, high_open=False):
    bad = (low is not None and (value < low or (low_open and value == low))) or \
          (high is not None and (value > high or (high_open and value == high)))
    if bad:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(f"{key}: {value} is out of range {lo}{low if low is not None else '-inf'}, "
                          f"{high if high is not None else 'inf'}{hi}")


def validate(cfg: RunConfig) -> RunConfig:
    """Range and consistency checks that types alone cannot express."""
    t, d = cfg.train, cfg.data
    _check_choice("train.objective", t.objective, OBJECTIVES)
    _check_choice("train.loss_type", t.loss_type, LOSS_TYPES)
    _check_choice("train.lr_schedule", t.lr_schedule, ("cosine", "constant"))
    _check_choice("train.nan_policy", t.nan_policy, ("stop", "skip"))
    _check_choice("train.teacher_mode", t.teacher_mode, TEACHER_MODES)
    _check_choice("train.autocast_dtype", t.autocast_dtype, DTYPES)
    _check_choice("tokenizer.kind", cfg.tokenizer.kind, TOKENIZER_KINDS)
    _check_choice("data.source", d.source, DATA_SOURCES)
    _check_choice("data.pretrain_source", d.pretrain_source, PRETRAIN_SOURCES)
    _check_choice("data.bad_data", d.bad_data, ("drop", "error"))
    _check_range("train.beta", t.beta, 0, None, low_open=True)
    _check_range("train.lr", t.lr, 0, None, low_open=True)
    _check_range("train.min_lr", t.min_lr, 0, t.lr)
    _check_range("train.kd_ratio", t.kd_ratio, 0, 1)
    _check_range("train.lm_coef", t.lm_coef, 0, 1)
    _check_range("train.label_smoothing", t.label_smoothing, 0, 0.5, high_open=True)
    _check_range("train.temperature", t.temperature, 0, None, low_open=True)
    _check_range("train.jsd_beta", t.jsd_beta, 0, 1, low_open=True, high_open=True)
    _check_range("train.max_steps", t.max_steps, 1)
    _check_range("train.batch_size", t.batch_size, 1)
    _check_range("train.grad_accum", t.grad_accum, 1)
    _check_range("train.weight_decay", t.weight_decay, 0)
    _check_range("train.clip_grad", t.clip_grad, 0)
    _check_range("train.cache_topk", t.cache_topk, 1)
    _check_range("train.seq_max_new_tokens", t.seq_max_new_tokens, 1)
    _check_range("data.max_length", d.max_length, 2)
    _check_range("data.max_prompt", d.max_prompt, 1)
    if d.max_prompt >= d.max_length:
        raise ConfigError(f"data.max_prompt ({d.max_prompt}) must be smaller than data.max_length "
                          f"({d.max_length}): the response needs room")
    if d.source in ("jsonl", "minillm") and not d.path:
        raise ConfigError(f"data.path: data.source '{d.source}' needs a file path")
    if d.path and d.source in ("jsonl", "minillm") and not Path(d.path).exists():
        raise ConfigError(f"data.path: file not found: {d.path}")
    if d.pretrain_source == "jsonl" and not Path(d.pretrain_path or "/nonexistent").exists():
        raise ConfigError(f"data.pretrain_path: file not found: '{d.pretrain_path}'")
    if cfg.tokenizer.kind == "pretrained" and not cfg.tokenizer.path:
        raise ConfigError("tokenizer.path: tokenizer.kind 'pretrained' needs a hub id or local dir")
    for role, m in (("student", cfg.student), ("teacher", cfg.teacher)):
        if m is None:
            continue
        _check_choice(f"{role}.source", m.source, MODEL_SOURCES)
        _check_choice(f"{role}.arch", m.arch, ("llama", "gpt2"))
        _check_choice(f"{role}.dtype", m.dtype, DTYPES)
        _check_choice(f"{role}.quantization", m.quantization, QUANTIZATIONS)
        _check_range(f"{role}.prune_to", m.prune_to, 0)
        _check_range(f"{role}.lora_r", m.lora_r, 1)
        if m.source in ("pretrained", "saved") and not m.name_or_path:
            raise ConfigError(f"{role}.name_or_path: source '{m.source}' needs a hub id or path")
        if m.source == "saved" and not Path(m.name_or_path).exists():
            raise ConfigError(f"{role}.name_or_path: saved model not found: {m.name_or_path} "
                              f"(run the step that builds it first)")
    needs_teacher = t.objective not in ("sft",)
    if needs_teacher and cfg.teacher is None:
        raise ConfigError(f"teacher: objective '{t.objective}' needs a teacher section")
    _check_choice("train.cache_format", t.cache_format, ("hidden", "topk"))
    cacheable = ("dpkd_token", "kd", "rkl", "jsd") if t.cache_format == "hidden" else ("dpkd_token", "kd")
    if t.teacher_mode == "cache" and t.objective not in cacheable:
        raise ConfigError(f"train.teacher_mode: 'cache' with cache_format '{t.cache_format}' supports "
                          f"objectives {', '.join(cacheable)}, not '{t.objective}'")
    for s in cfg.eval.splits:
        _check_choice("eval.splits", s, ("train", "valid", "test", "heldout"))
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


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


def from_dict(data: dict) -> RunConfig:
    return validate(_from_dict(RunConfig, data or {}))


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(apply_overrides(data, overrides or []))


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
