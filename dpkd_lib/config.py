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
           "validate", "unused_params", "diff_keys", "teacher_use", "teacher_use_of", "apply_overrides",
           "unset_keys", "SECTIONS", "CHOICES", "RANGES", "USES", "Range", "Uses", "position_needs"]


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
    dtype: str = "float32"  # dtype the weights are loaded in (compute dtype of a 4-bit/8-bit model); auto: by the card
    quantization: str = "none"  # none | 4bit (nf4) | 8bit, through bitsandbytes
    lora: bool = False  # student only
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator (scale = lora_alpha / lora_r)
    lora_dropout: float = 0.05  # dropout on the LoRA branch
    merge_lora_on_save: bool = False  # save a plain model (teacher building) instead of an adapter
    gradient_checkpointing: bool = False  # student only


@dataclass
class DataConfig:
    source: str = "synthetic"  # where the instruction records come from
    path: str = ""  # jsonl / minillm file or folder
    data_seed: int = 0  # seed of the synthetic set, or of the MiniLLM-style split (hub, one file)
    n_train: int = 2000  # synthetic only
    n_valid: int = 200  # valid split size (synthetic, hub, one file; a folder's files are used as they are)
    n_test: int = 300  # test split size, as n_valid (DollyEval in the paper profile)
    n_heldout: int = 300  # synthetic only
    train_slice: str = ""  # "start:end" of the train split ("" = all): builds and methods use disjoint slices
    max_length: int = 512  # prompt + response tokens; longer examples are dropped and counted
    max_prompt: int = 256  # prompt tokens; longer prompts are dropped and counted
    min_response_tokens: int = 0  # drop (and count) responses shorter than this (MiniLLM: 11)
    bad_data: str = "drop"  # drop (count and report) | error
    pretrain_source: str = "none"  # pre-train corpus D_p of the lm_coef term
    pretrain_path: str = ""  # pretrain_source jsonl only
    pretrain_block_size: int = 128  # tokens per pre-train block
    pretrain_max_blocks: int = 2000  # blocks kept from the corpus


@dataclass
class TrainConfig:
    objective: str = "dpkd_token"  # sft, a KD baseline, a DPKD variant (docs/method.md §7), or no_distill (the mix's control)
    max_steps: int = 100  # optimizer steps
    batch_size: int = 8  # global batch (split across processes)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4  # peak learning rate (AdamW)
    min_lr: float = 1e-7  # cosine only
    weight_decay: float = 0.01  # AdamW; none on biases and norm weights (released runner)
    adam_beta1: float = 0.9  # AdamW β1
    adam_beta2: float = 0.999  # AdamW β2
    lr_schedule: str = "cosine"  # cosine | constant
    t_max_steps: int = 0  # cosine period; 0 = max_steps. >0: torch's CosineAnnealingLR, which climbs back after it
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    clip_grad: float = 1.0  # gradient-norm clipping (0 = off)
    # the step (objectives.py): (1-kd_ratio)*CE + kd_ratio*objective + lm_coef*pre-train term
    kd_ratio: float = 0.5  # distillation objectives only
    lm_coef: float = 0.5  # weight of the pre-train term (0 = off; > 0 needs data.pretrain_source)
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
    cache_format: str = "hidden"  # cache: hidden = exact (final hidden states + head, on disk); topk = compact, biased (log p outside the top k only bounded)
    cache_topk: int = 32  # cache_format topk only
    loss_chunk_size: int = 0  # >0: memory-lean loss over chunks of response positions
    autocast_dtype: str = "float32"  # bfloat16 autocast is faster on some CPUs; fp32 default; auto: by the card
    log_every: int = 1  # write a metrics.jsonl row every N steps
    eval_every: int = 0  # teacher-forced NLL on the validation split every N steps (0 = end only)
    save_every: int = 0  # checkpoint every N steps (0 = end only)
    grad_probe_every: int = 0  # >0: every N steps, log each loss term's share of the raw gradient and of the AdamW update
    nan_policy: str = "stop"  # stop | skip
    max_skipped_share: float = 0.1  # nan_policy skip: stop once this share of steps was skipped
    seed: int = 40  # training seed: batch order, pre-train blocks, sampling (released runner: 40)


@dataclass
class EvalConfig:
    splits: list = field(default_factory=lambda: ["test", "heldout"])  # splits the final evaluation scores
    max_examples: int = 0  # per split; 0 = all (the first n records: every model sees the same)
    greedy: bool = True  # greedy decoding: the primary generation metric
    sample_seeds: list = field(default_factory=list)  # T-sampling, one pass per seed (paper protocol)
    sample_max_examples: int = 0  # sampling on the first n of those examples only (0 = all of them)
    teacher_forced: bool = True  # NLL and token accuracy on the references
    teacher_kl: bool = False  # KL(teacher || student) per response position on the references (needs a teacher section)
    batch_size: int = 16  # prompts per generation batch
    max_new_tokens: int = 128  # generation length limit (MiniLLM: 256)
    temperature: float = 1.0  # sampling only
    top_k: int = 0  # sampling only
    top_p: float = 1.0  # sampling only
    no_repeat_ngram_size: int = 0  # 0 = off; MiniLLM's protocol uses 6
    skip_empty_splits: bool = False  # a split of eval.splits without records: true skips it (eval_skipped_splits), false is an error


@dataclass
class RunConfig:
    output_dir: str = "results/smoke/run"  # the run folder (runs.run_grid sets results/<profile>/runs/<name>)
    cache_dir: str = ".cache/teacher_signals"  # teacher signals and samples, keyed by what made them
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # shared by teacher and student
    student: ModelConfig = field(default_factory=ModelConfig)  # the model trained
    teacher: ModelConfig | None = None  # frozen; null for objectives without a teacher
    data: DataConfig = field(default_factory=DataConfig)  # instruction data and pre-train corpus
    train: TrainConfig = field(default_factory=TrainConfig)  # the step, the optimizer, the loop
    eval: EvalConfig = field(default_factory=EvalConfig)  # the final evaluation (docs/design.md §7)
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


# ----------------------------------------------------------------------------- valid values
# The rules below are data: `validate` and `unused_params` apply them, and docs/params.md is
# generated from them (`python -m dpkd_lib.params_reference`). A "section" is the dataclass a
# rule belongs to: "run" (RunConfig's own keys), "tokenizer", "model" (student and teacher),
# "data", "train", "eval".

SECTIONS = {"run": RunConfig, "tokenizer": TokenizerConfig, "model": ModelConfig,
            "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}

#: string settings and their valid values (choices.py); for a list, every item
CHOICES: dict[str, dict[str, tuple]] = {
    "tokenizer": {"kind": C.TOKENIZER_KINDS},
    "model": {"source": C.MODEL_SOURCES, "arch": C.TINY_ARCHS, "dtype": C.DTYPES,
              "quantization": C.QUANTIZATIONS},
    "data": {"source": C.DATA_SOURCES, "bad_data": C.BAD_DATA_POLICIES,
             "pretrain_source": C.PRETRAIN_SOURCES},
    "train": {"objective": C.OBJECTIVES, "lr_schedule": C.LR_SCHEDULES,
              "pretrain_loss": C.PRETRAIN_LOSSES, "loss_type": C.LOSS_TYPES,
              "teacher_mode": C.TEACHER_MODES, "cache_format": C.CACHE_FORMATS,
              "autocast_dtype": C.DTYPES, "nan_policy": C.NAN_POLICIES, "train_on": C.TRAIN_ON},
    "eval": {"splits": C.SPLITS},
}


@dataclass(frozen=True)
class Range:
    """A numeric range; `high` may name another key of the same section (min_lr <= lr)."""
    low: float | None = None
    high: float | str | None = None
    low_open: bool = False
    high_open: bool = False

    def check(self, key: str, section) -> None:
        high = getattr(section, self.high) if isinstance(self.high, str) else self.high
        _check_range(key, getattr(section, key.rsplit(".", 1)[-1]), self.low, high,
                     self.low_open, self.high_open)

    def text(self, prefix: str = "") -> str:
        """'> 0', '≥ 1', '[0, 1)', '[0, train.lr]' (prefix: the section's dotted prefix)."""
        high = f"{prefix}{self.high}" if isinstance(self.high, str) else self.high
        if high is None:
            return f"{'>' if self.low_open else '≥'} {self.low:g}"
        high = high if isinstance(high, str) else f"{high:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {high}{')' if self.high_open else ']'}"


_POS, _NONNEG, _UNIT = Range(0, low_open=True), Range(0), Range(0, 1)
#: numeric settings and their ranges, in field order (the first bad one is reported)
RANGES: dict[str, dict[str, Range]] = {
    "run": {"threads": _NONNEG},
    "tokenizer": {"vocab_size": Range(257)},
    "model": {"n_layer": Range(1), "n_embd": Range(1), "n_head": Range(1), "prune_to": _NONNEG,
              "lora_r": Range(1), "lora_alpha": Range(1), "lora_dropout": Range(0, 1, high_open=True)},
    "data": {"n_train": _NONNEG, "n_valid": _NONNEG, "n_test": _NONNEG, "n_heldout": _NONNEG,
             "max_length": Range(2), "max_prompt": Range(1), "min_response_tokens": _NONNEG,
             "pretrain_block_size": Range(2), "pretrain_max_blocks": Range(1)},
    "train": {"max_steps": Range(1), "batch_size": Range(1), "grad_accum": Range(1), "lr": _POS,
              "min_lr": Range(0, "lr"), "weight_decay": _NONNEG,
              "adam_beta1": Range(0, 1, high_open=True), "adam_beta2": Range(0, 1, high_open=True),
              "t_max_steps": _NONNEG, "warmup_steps": _NONNEG, "clip_grad": _NONNEG,
              "kd_ratio": _UNIT, "lm_coef": _UNIT, "beta": _POS,
              "label_smoothing": Range(0, 0.5, high_open=True), "gamma": _NONNEG,
              "dpop_lambda": _NONNEG, "cpo_alpha": _NONNEG, "temperature": _POS,
              "jsd_beta": Range(0, 1, low_open=True, high_open=True),
              "skew_alpha": Range(0, 1, high_open=True), "seq_max_new_tokens": Range(1),
              "rejected_every": Range(1), "cache_topk": Range(1), "loss_chunk_size": _NONNEG,
              "log_every": Range(1), "eval_every": _NONNEG, "save_every": _NONNEG,
              "grad_probe_every": _NONNEG, "max_skipped_share": _UNIT},
    "eval": {"max_examples": _NONNEG, "sample_max_examples": _NONNEG, "batch_size": Range(1),
             "max_new_tokens": Range(1),
             "temperature": _POS, "top_k": _NONNEG, "top_p": Range(0, 1, low_open=True),
             "no_repeat_ngram_size": _NONNEG},
}


def _check_section(kind: str, section, prefix: str) -> None:
    """The choices, then the ranges, of one section (`prefix`: its dotted name + '.')."""
    for name, options in CHOICES.get(kind, {}).items():
        value = getattr(section, name)
        for item in value if isinstance(value, list) else [value]:
            _check_choice(prefix + name, item, options)
    for name, rng in RANGES.get(kind, {}).items():
        rng.check(prefix + name, section)


# ----------------------------------------------------------------------------- what is used

def _defaults(cls) -> dict:
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class Uses:
    """Where a setting has an effect. `when(cfg, section, role)` says whether it has one in
    this run (`section`: the dataclass holding it, `role`: "student", "train", ...); `where`
    says where in words: the refusal message and docs/params.md print it."""
    when: Any
    where: str


def _objectives(names) -> str:
    return f"objective {names[0]}" if len(names) == 1 else f"objectives {', '.join(names)}"


def _topk(t) -> bool:
    return t.teacher_mode == "cache" and t.cache_format == "topk"


def _signals(c) -> bool:
    """Whether training reads the teacher's per-position signals (online or cached)."""
    t = c.train
    return t.objective in C.TOKEN_OBJECTIVES or (t.objective in C.CONTROL_OBJECTIVES and _control_pt_kd(t))


def _control_pt_kd(t) -> bool:
    """Whether the control's step keeps a teacher term: the released pre-train term's H(p, q)."""
    return t.lm_coef > 0 and t.pretrain_loss == "released" and t.kd_ratio > 0


def _for(names) -> Uses:
    """Used by the objectives `names` only."""
    return Uses(lambda c, t, r: t.objective in names, _objectives(names))


#: every setting that only some runs use; a setting not listed here is used by every run. A
#: setting changed from its default that the run would not use is refused (`unused_params`).
USES: dict[str, dict[str, Uses]] = {
    "tokenizer": {
        "vocab_size": Uses(lambda c, s, r: s.kind == "bpe_local", "tokenizer.kind bpe_local"),
        "path": Uses(lambda c, s, r: s.kind == "pretrained", "tokenizer.kind pretrained"),
    },
    "model": {
        **{k: Uses(lambda c, s, r: s.source == "tiny", "source tiny")
           for k in ("arch", "n_layer", "n_embd", "n_head", "seed")},
        "name_or_path": Uses(lambda c, s, r: s.source in ("pretrained", "saved"),
                             "source pretrained or saved"),
        "lora": Uses(lambda c, s, r: r == "student", "the student"),
        **{k: Uses(lambda c, s, r: r == "student" and s.lora, "student.lora true")
           for k in ("lora_r", "lora_alpha", "lora_dropout", "merge_lora_on_save")},
        "gradient_checkpointing": Uses(lambda c, s, r: r == "student", "the student"),
    },
    "data": {
        "path": Uses(lambda c, s, r: s.source in ("jsonl", "minillm"), "data.source jsonl or minillm"),
        "n_train": Uses(lambda c, s, r: s.source == "synthetic", "data.source synthetic"),
        # a folder of split files is taken as it is: no generated or split-by-seed sets
        **{k: Uses(lambda c, s, r: not (s.source in ("jsonl", "minillm") and Path(s.path).is_dir()),
                   "generated data or one file split MiniLLM-style (not a folder of split files)")
           for k in ("n_valid", "n_test", "data_seed")},
        "n_heldout": Uses(lambda c, s, r: s.source == "synthetic", "data.source synthetic"),
        # the switch is pretrain_source; the block settings describe the corpus it names
        "pretrain_source": Uses(lambda c, s, r: c.train.lm_coef > 0, "train.lm_coef > 0"),
        "pretrain_path": Uses(lambda c, s, r: s.pretrain_source == "jsonl", "data.pretrain_source jsonl"),
    },
    "train": {
        "min_lr": Uses(lambda c, t, r: t.lr_schedule == "cosine", "lr_schedule cosine"),
        "t_max_steps": Uses(lambda c, t, r: t.lr_schedule == "cosine", "lr_schedule cosine"),
        "kd_ratio": _for(C.MIX_OBJECTIVES),
        "pretrain_loss": Uses(lambda c, t, r: t.objective in C.MIX_OBJECTIVES and t.lm_coef > 0,
                              "a distillation objective with lm_coef > 0 (without a teacher term both "
                              "forms are CE)"),
        "beta": _for(C.PREFERENCE_OBJECTIVES),
        "loss_type": _for(C.PREFERENCE_OBJECTIVES),
        # label_smoothing, reference_free, gamma, dpop_lambda, cpo_alpha: added below from
        # choices.LOSS_TYPE_PARAMS
        "length_normalize": _for(("dpkd_seq",)),
        "temperature": Uses(lambda c, t, r: t.objective in C.TOKEN_OBJECTIVES and not _topk(t),
                            "token-level objectives with the teacher's logits (not a top-k cache)"),
        "jsd_beta": _for(("jsd",)),
        "skew_alpha": _for(("skl", "srkl")),
        "seq_max_new_tokens": Uses(lambda c, t, r: t.objective in C.SAMPLING_OBJECTIVES
                                   or t.train_on == "teacher_samples",
                                   "objectives seqkd, dpkd_seq, or train_on teacher_samples"),
        "train_on": Uses(lambda c, t, r: t.objective not in C.SAMPLING_OBJECTIVES,
                         "every objective but seqkd (always the teacher's samples) and dpkd_seq "
                         "(its chosen side is the teacher's sample already)"),
        "rejected_every": _for(("dpkd_seq",)),
        "teacher_mode": Uses(lambda c, t, r: _signals(c), f"{_objectives(C.TOKEN_OBJECTIVES)}, or "
                             f"{_objectives(C.CONTROL_OBJECTIVES)} with a pre-train KD term"),
        "cache_format": Uses(lambda c, t, r: _signals(c) and t.teacher_mode == "cache",
                             "teacher_mode cache"),
        "cache_topk": Uses(lambda c, t, r: _signals(c) and _topk(t),
                           "teacher_mode cache with cache_format topk"),
        "max_skipped_share": Uses(lambda c, t, r: t.nan_policy == "skip", "nan_policy skip"),
    },
    "eval": {
        **{k: Uses(lambda c, e, r: e.greedy or bool(e.sample_seeds), "eval.greedy or eval.sample_seeds")
           for k in ("batch_size", "max_new_tokens", "no_repeat_ngram_size")},
        **{k: Uses(lambda c, e, r: bool(e.sample_seeds), "eval.sample_seeds")
           for k in ("temperature", "top_k", "top_p", "sample_max_examples")},
        "skip_empty_splits": Uses(lambda c, e, r: bool(e.splits), "a non-empty eval.splits"),
    },
}
for _setting in dict.fromkeys(p for used in C.LOSS_TYPE_PARAMS.values() for p in used):
    USES["train"][_setting] = Uses(
        lambda c, t, r, s=_setting: (t.objective in C.PREFERENCE_OBJECTIVES
                                     and s in C.LOSS_TYPE_PARAMS[t.loss_type]),
        f"{_objectives(C.PREFERENCE_OBJECTIVES)} with loss_type "
        f"{', '.join(lt for lt, used in C.LOSS_TYPE_PARAMS.items() if _setting in used)}")
del _setting

#: the sections each purpose checks: (role in the params file, section kind)
_CHECKED = {"eval": (("tokenizer", "tokenizer"), ("eval", "eval")),
            "train": (("tokenizer", "tokenizer"), ("eval", "eval"), ("student", "model"),
                      ("teacher", "model"), ("data", "data"), ("train", "train"))}


def unused_params(cfg: RunConfig, purpose: str = "train") -> list[tuple[str, Any, str]]:
    """(dotted key, value, where it applies) of every parameter set away from its default that this
    run would not use (`USES`). `purpose` "eval" (a saved model on the eval splits, usually with
    the training run's own params file) checks the tokenizer and eval sections only."""
    out = []
    for role, kind in _CHECKED["eval" if purpose == "eval" else "train"]:
        section = getattr(cfg, role)
        if section is None:
            continue
        for name, default in _defaults(type(section)).items():
            rule, value = USES[kind].get(name), getattr(section, name)
            if rule is not None and value != default and not rule.when(cfg, section, role):
                out.append((f"{role}.{name}", value, rule.where))
    return out


# ----------------------------------------------------------------------------- validation

def validate(cfg: RunConfig, purpose: str = "train") -> RunConfig:
    """Choices and ranges (`CHOICES`, `RANGES`), consistency that types alone cannot express,
    then the unused check (`USES`). `purpose` "eval": only what evaluating a saved student
    reads (no teacher, no train)."""
    d, e = cfg.data, cfg.eval
    _check_section("tokenizer", cfg.tokenizer, "tokenizer.")
    if cfg.tokenizer.kind == "pretrained" and not cfg.tokenizer.path:
        raise ConfigError("tokenizer.path: tokenizer.kind 'pretrained' needs a hub id or local dir")
    _check_section("data", d, "data.")
    parse_slice(d.train_slice)
    if d.max_prompt >= d.max_length:
        raise ConfigError(f"data.max_prompt ({d.max_prompt}) must be smaller than data.max_length "
                          f"({d.max_length}): the response needs room")
    if d.source in ("jsonl", "minillm") and not d.path:
        raise ConfigError(f"data.path: data.source '{d.source}' needs a file path")
    if d.path and d.source in ("jsonl", "minillm") and not Path(d.path).exists():
        raise ConfigError(f"data.path: file not found: {d.path}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in e.sample_seeds) \
            or len(set(e.sample_seeds)) != len(e.sample_seeds):
        raise ConfigError(f"eval.sample_seeds: expected distinct integers, got {e.sample_seeds!r}")
    _check_section("eval", e, "eval.")
    _check_section("run", cfg, "")
    for key in ("output_dir", "cache_dir") if purpose == "train" else ():
        if not str(getattr(cfg, key)).strip():  # Path("") is the current folder
            example = {"output_dir": "results/my_run", "cache_dir": ".cache/teacher_signals"}[key]
            raise ConfigError(f"{key} is empty (an unset shell variable?): name a folder, "
                              f"e.g. --set {key}={example}")
    for role in ("student",) if purpose == "eval" else ("student", "teacher"):
        m = getattr(cfg, role)
        if m is None:
            continue
        _check_section("model", m, f"{role}.")
        if m.source == "tiny":
            _check_tiny(cfg, role, m, purpose)
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
                          f"remove it (on the command line: --unset {key}) or change the setting it "
                          f"depends on{more}")
    return cfg


def _check_tiny(cfg: RunConfig, role: str, m: ModelConfig, purpose: str) -> None:
    """What a tiny model's shape allows, checked before the tokenizer is even trained."""
    if m.n_embd % m.n_head:
        raise ConfigError(f"{role}.n_embd ({m.n_embd}) must be divisible by {role}.n_head ({m.n_head})")
    if m.prune_to > m.n_layer:
        raise ConfigError(f"{role}.prune_to ({m.prune_to}) must be at most {role}.n_layer ({m.n_layer})")
    if m.arch != "gpt2":  # llama's rotary positions have no table to run off
        return
    for what, length in position_needs(cfg, role, purpose).items():
        if length > C.TINY_MAX_POSITIONS:
            raise ConfigError(f"{what} ({length}) exceeds the {C.TINY_MAX_POSITIONS} positions of the tiny "
                              f"gpt2 {role}; shorten it or use {role}.arch llama")


def position_needs(cfg: RunConfig, role: str, purpose: str = "train") -> dict[str, int]:
    """{what, in params words: tokens} of the longest sequences model `role` will see: a
    model with a table of learned positions (GPT-2) must have at least that many. Checked
    here for tiny models, and once loaded for every other (models.check_positions)."""
    d, e, t = cfg.data, cfg.eval, cfg.train
    need = {"data.max_length": d.max_length}
    if role == "student" and (e.greedy or e.sample_seeds) and e.splits:  # the student generates in the evaluation
        need["data.max_prompt + eval.max_new_tokens"] = d.max_prompt + e.max_new_tokens
    if purpose == "train" and t.lm_coef > 0:
        need["data.pretrain_block_size"] = d.pretrain_block_size
    if purpose == "train" and (t.objective in C.SAMPLING_OBJECTIVES or t.train_on == "teacher_samples"):
        need["data.max_prompt + train.seq_max_new_tokens"] = d.max_prompt + t.seq_max_new_tokens
    return need


def teacher_use(cfg: RunConfig, *, training: bool = False) -> str:
    """What a run uses its teacher for, in words ("" when nothing): the objective, the
    control's pre-train KD term, SeqKD-style training on the teacher's samples, or (unless
    ``training``) only the evaluation's KL (eval.teacher_kl)."""
    t = cfg.train
    if t.objective in C.TEACHER_OBJECTIVES:
        return f"objective '{t.objective}'"
    if t.objective in C.CONTROL_OBJECTIVES and _control_pt_kd(t):
        return f"objective '{t.objective}' (the pre-train term's H(p, q))"
    if t.train_on == "teacher_samples":
        return "train_on teacher_samples"
    if not training and cfg.eval.teacher_kl and cfg.eval.splits:
        return "eval.teacher_kl"
    return ""


def teacher_use_of(data: dict) -> str:
    """`teacher_use` of a params mapping before it is validated (runs.run_config decides with
    it whether a run gets the pair's teacher)."""
    return teacher_use(_from_dict(RunConfig, {k: v for k, v in data.items() if k != "teacher"}))


def _validate_train(cfg: RunConfig) -> None:
    t, d = cfg.train, cfg.data
    _check_section("train", t, "train.")
    if t.objective in C.MIX_OBJECTIVES and t.kd_ratio == 0:
        raise ConfigError(f"train.kd_ratio: 0 leaves objective '{t.objective}' nothing but CE; "
                          f"use train.objective: sft, or kd_ratio > 0")
    if t.objective in C.CONTROL_OBJECTIVES and t.kd_ratio == 1 and t.lm_coef == 0:
        raise ConfigError(f"train.kd_ratio 1 with lm_coef 0 leaves objective '{t.objective}' no term at all; "
                          f"lower kd_ratio or set lm_coef > 0")
    if t.warmup_steps >= t.max_steps:
        raise ConfigError(f"train.warmup_steps ({t.warmup_steps}) must be below train.max_steps "
                          f"({t.max_steps})")
    why = teacher_use(cfg)
    if why and cfg.teacher is None:
        raise ConfigError(f"teacher: {why} needs a teacher section")
    if not why and cfg.teacher is not None:
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
    """'key=value' -> (dotted key parts, value). The value is YAML (1e-4, true, [1, 2], null),
    but never a YAML comment: a value whose YAML reading would drop a ` #...` tail (a path
    like `runs/run #1`) is taken as the whole string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
        node = yaml.compose(raw) if "#" in raw else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text}: the value is not valid YAML") from None
    if "#" in raw and raw[node.end_mark.index if node is not None else 0:].strip():
        value = raw.strip()  # YAML read part of it as a comment: keep every character
    return key.strip().split("."), value


def _check_key(path: list[str], text: str) -> None:
    """Refuse an --unset key that no params file can hold (a typo would unset nothing)."""
    cls = RunConfig
    for i, part in enumerate(path):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise ConfigError(f"--unset {text}: unknown key '{'.'.join(path[:i + 1])}'{_closest(part, names)}")
        hint = typing.get_type_hints(cls)[part]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        cls = args[0] if args else hint
        if i < len(path) - 1 and not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--unset {text}: '{part}' is not a section")


def unset_keys(data: dict, keys: list[str]) -> dict:
    """`data` without the dotted `keys` (--unset data.n_train): each falls back to its default
    (docs/params.md), as if the params file and the files it extends never set it. How a
    profile's setting that a new data source, objective or loss type does not use is removed
    from the command line."""
    for text in keys or []:
        path = text.strip().split(".")
        _check_key(path, text)
        node = data
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return data


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
                purpose: str = "train", unset: list[str] | None = None) -> RunConfig:
    """Read, merge, unset (`unset_keys`), override and validate a params file (`purpose`:
    train or eval)."""
    data = apply_overrides(unset_keys(load_yaml(path), unset or []), overrides or [])
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
