"""Memory planner: predict the peak memory of a distillation run *before* loading anything.

Why: on a 16 GB GPU the colab pair (a 13-14B 4-bit teacher and a 7B QLoRA student) only
fits with the right combination of teacher quantisation, teacher cache, gradient
checkpointing and batch size, and finding that out by loading 20 GB of weights and running
out of memory costs minutes per try. A plan is a handful of numbers (shapes, dtypes, batch,
sequence length), so the peak can be estimated in microseconds, printed by the notebook,
and refused with a list of changes that would make it fit.

Use::

    cfg = load_config("params/colab/qlora_train.yaml", ["train.teacher_mode=cache"])
    plan = plan_from_config(cfg, device="cuda", capability=(7, 5))   # a T4: dtype auto = fp16
    est = estimate(plan)
    print(format_plan(est, CARDS[0].bytes))
    check_fits(est, 15 * GiB)        # raises MemoryPlanError naming the fixes, best first
    plan_from_config(cfg, device_budget=15 * GiB)   # the same, plus the cache build's plan

``python -m dpkd_lib.gpu.memory --doc`` regenerates docs/gpu_memory.md, the table of every GPU
profile's plan on every card (:data:`PROFILE_RUNS` × :data:`CARDS`); ``--params FILE [--set k=v]
[--card T4]`` prints one plan.

Model shapes come from :mod:`dpkd_lib.gpu.standins` (the checkpoints' config numbers, the same
ones the GPU check builds its stand-ins from), a local folder's config.json, or a tiny
model's params.

Model of the peak (bytes; each term is one row of the breakdown, and the rows sum to the
total). A training step has three phases whose transients are never alive together; the
persistent terms count in all of them and the peak is the largest phase:

* persistent: ``framework`` — the CUDA context (~0.5 GiB, invisible to
  ``torch.cuda.max_memory_allocated``) on a GPU; on a CPU the resident size of the
  interpreter once torch, transformers, peft and accelerate are imported
  (:data:`CPU_BASELINE_BYTES`, or a measurement in ``framework_bytes``). Weights: parameters
  x bytes. 4-bit nf4 (bitsandbytes, double quantisation, blocks of 64) costs 0.5 byte + an
  8-bit absmax per 64 weights + an fp32 per 256 blocks = 0.5159 byte per quantised weight;
  8-bit LLM.int8 1 byte + an fp32 scale per output row. Only the block linears are
  quantised: embeddings, norms and the LM head stay in the compute dtype, and for QLoRA
  ``peft.prepare_model_for_kbit_training`` upcasts them to fp32 (4 GB on Qwen2.5-7B, whose
  152k-token embeddings are untied). ``optimizer_states``: AdamW's two fp32 moments per
  trainable parameter, plus an fp32 master copy for 16-bit weights trained in full with
  ``master_weights``; LoRA trains r·(in + out) fp32 parameters per adapted linear. An online
  teacher's weights.
* forward: ``student_activations`` (below), the student's [N, V] fp32 logits and the loss's
  forward intermediates (N = response positions when ``response_only``, as
  ``objectives.response_logits`` computes them), and the teacher's signal: an online
  teacher's forward (the hidden states ``output_hidden_states`` keeps, one MLP's
  intermediates) and its logits; a cached teacher's rows — for the exact ``hidden`` cache
  format the batch's hidden states and the logits they give, whole for the plain loss, one
  chunk of ``loss_chunk_size`` positions at a time for the lean one
  (``losses.TeacherHidden``), for ``topk`` the ids and log-probs. The ``hidden`` cache's
  head (in the teacher's dtype) is read once onto the device and stays: persistent
  ``teacher_head``.
* backward: activations, the loss's backward intermediates and the gradients.
  :data:`LOGIT_COPIES` counts the [N, V] tensors alive, measured with a tensor-lifetime
  tracker on the step loss (CE + DPKD + reward statistics).
* step: gradients and AdamW's foreach temporaries.
* CPU only, ``allocator_overhead``: glibc's heap fragmentation, a fitted share of the
  phase's transient bytes (:data:`CPU_ALLOCATOR_OVERHEAD`).
* host (not in a GPU total): what a teacher cache really holds in CPU memory — the current
  batch's rows, read from the file by rows (``teacher_cache.SignalFile``), and the 64 MiB
  blocks the head is read onto the device in; during the build, one batch's rows on their
  way to the file. On a CPU plan the rows are part of the total.
* disk: the cache's file — per response position of the data set the teacher's hidden state
  in the teacher's dtype (``hidden``, plus the head) or k ids and log-probs (``topk``).
  Compared with the disk a Colab or Kaggle runtime offers (:data:`DISKS`).

``student_activations`` are what autograd keeps for the backward pass, counted tensor by
tensor for a Llama block (RMSNorm, SDPA attention, gated MLP): the block input, the two
normalised inputs and their weighted outputs, rotated q, k and v, the attention output
before and after the head merge, the residual sum (9·hidden + 2·kv_hidden) and the MLP's
gate, up, silu(gate) and product (4·intermediate) per token per layer, times the
activation dtype's bytes and :data:`ACT_CALIBRATION`. The count agrees with
``saved_tensors_hooks`` on SmolLM2 blocks to 2.4 % (full), 2 % (LoRA with dropout; see
:func:`_act_elems_per_token_layer` for the LoRA and QLoRA terms). GPT-2 blocks have an
ungated MLP (2·intermediate); eager attention adds the [heads, T] probabilities. With
gradient checkpointing only each block's input is kept, plus one block's activations while
it is recomputed. Sequences count at the padded length ``seq_len``.

``dtype: auto`` (model dtypes, the 4-bit compute dtype, ``train.autocast_dtype``) is
resolved per card: bf16 from compute capability 8.0, fp16 below (T4, P100), float32 on CPU
(:mod:`dpkd_lib.precision`); a plan records what it chose.

Calibration (``python -m dpkd_lib.perf.bench`` runs it, ``dpkd_lib/gpu/calibrate.py``):
configurations that run on a CPU are run in a fresh subprocess and their peak compared with
:func:`estimate`; ``memory_planner_max_rel_error`` in ``results/bench/summary.json`` is the
worst relative error. ``python -m dpkd_lib.gpu.gpu_check`` compares the phases with CUDA
peaks of the GPU profiles' own runs.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .. import precision
from . import standins
from ..choices import TEACHER_MODES as RUN_TEACHER_MODES, TEACHER_SIGNAL_OBJECTIVES, CACHE_FORMATS
from ..errors import ConfigError, MemoryPlanError

__all__ = [
    "GiB", "MiB", "MemoryPlanError", "ModelShape", "MemoryPlan", "Card", "CARDS",
    "PROFILE_RUNS", "estimate", "format_plan", "check_fits", "suggest_fixes", "fix_path",
    "plan_from_config", "teacher_cache_plan", "profile_plans", "card_table", "update_doc",
]

GiB = 1024 ** 3
MiB = 1024 ** 2
REPO_ROOT = Path(__file__).resolve().parents[2]

#: CUDA context + cuBLAS workspace, resident on the GPU but outside torch's allocator.
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
#: RSS of `python -c "import torch, transformers, peft, accelerate"` on the reference box
#: (torch 2.13 CPU, transformers 5.24, peft 0.21): 449 MiB; torch + transformers alone is
#: 291 MiB. The calibration harness measures it per run (``framework_bytes``).
CPU_BASELINE_BYTES = 450 * MiB

#: Multiplier on the counted per-token activation bytes (see the module docstring); fitted
#: to measured CPU peaks of SmolLM2 blocks (results/bench/summary.json, `memory_planner`).
ACT_CALIBRATION = 1.0

#: [N, V] fp32 tensors alive in a training step's loss (CE + DPKD + reward stats, as
#: objectives.step_loss computes them), measured with a tensor-lifetime tracker on response
#: rows: forward = the logits + 3 (saved log-softmax, the stats' transient log-softmaxes);
#: backward = the logits + 4 (the CE's logsumexp backward dominates, so the lean DPKD path,
#: whose gathered copy and index backward cost as much as they save on rows that are all
#: response, does not lower it). Cached teacher: the same.
LOGIT_COPIES = {"forward": 4.0, "backward": 5.0}
#: [N, V] fp32 tensors of the teacher's signal alive during the student's forward loss: its
#: logits and the log-softmax the loss builds from them (online, or from a `hidden` cache).
TEACHER_LOGIT_COPIES = 2.0
#: AdamW (foreach) temporaries during optimizer.step, in units of the trainable fp32 bytes.
FOREACH_TEMPS = 2.0
#: CPU only: glibc's heap keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold,
#: so peak RSS exceeds the live tensor bytes by a share of the step's transient memory:
#: measured 0-5 % for full fine-tuning, 28 % for LoRA (many small dropout masks and
#: copies) and ~40 % for tiny models. With MALLOC_MMAP_THRESHOLD_=1048576 the gap vanishes
#: (planner within 2 %), which proves it is the allocator and not a missing tensor. One
#: fitted value; a plan can set its own (``MemoryPlan.cpu_allocator_overhead``).
CPU_ALLOCATOR_OVERHEAD = 0.2
#: [N, V] tensors of a teacher-only forward (teacher_cache.compute_signals): the logits,
#: the tempered copy and its log-softmax.
INFERENCE_LOGIT_COPIES = 3.0

DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
#: bytes per quantised weight: nf4 + 8-bit absmax per block of 64 + fp32 per 256 blocks
NF4_BYTES = 0.5 + 1.0 / 64 + 4.0 / (64 * 256)
INT8_BYTES = 1.0
#: records of databricks-dolly-15k (the data of the hub-data profiles): a cache holds at
#: most (records - valid - test) × max_length × response share positions
DOLLY_RECORDS = 15011


# ----------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only LM that decide its memory (no weights needed).

    ``arch`` is "llama" for every gated-MLP family (Llama, Qwen2, Mistral, SmolLM2) and
    "gpt2" for GPT-2 (ungated MLP, learned positions, biases). ``attn_bias``: q/k/v biases
    (Qwen2).
    """

    n_layer: int
    hidden: int
    intermediate: int
    n_head: int
    n_kv_head: int
    vocab: int
    tied: bool = True
    arch: str = "llama"
    max_positions: int = 0  # gpt2 learned position embeddings
    attn_bias: bool = False
    name: str = ""

    @property
    def kv_hidden(self) -> int:
        return self.hidden * self.n_kv_head // self.n_head

    @property
    def gated(self) -> bool:
        return self.arch != "gpt2"

    # -- parameter counts
    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of the linear layers of one block (LoRA targets, 4-bit weights)."""
        h, kv, i = self.hidden, self.kv_hidden, self.intermediate
        if self.arch == "gpt2":
            return [("c_attn", h, 3 * h), ("attn.c_proj", h, h), ("c_fc", h, i), ("mlp.c_proj", i, h)]
        return [("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h),
                ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]

    def linear_params(self) -> int:
        """Weights of all block linears (what bitsandbytes quantises)."""
        return self.n_layer * sum(a * b for _, a, b in self.linear_shapes())

    def other_params(self) -> int:
        """Embeddings, norms, biases, positions and an untied head (kept in compute dtype)."""
        h, V = self.hidden, self.vocab
        n = V * h + (0 if self.tied else V * h) + h  # embeddings, head, final norm
        if self.arch == "gpt2":
            n += self.max_positions * h + h  # wpe, final norm bias
            n += self.n_layer * (4 * h + 3 * h + h + self.intermediate + h)  # 2 LN, 4 biases
        else:
            n += self.n_layer * 2 * h  # two RMSNorms per block
            if self.attn_bias:
                n += self.n_layer * (h + 2 * self.kv_hidden)
        return n

    def n_params(self) -> int:
        return self.linear_params() + self.other_params()

    def lora_params(self, r: int) -> int:
        return self.n_layer * sum(r * (a + b) for _, a, b in self.linear_shapes())

    # -- constructors
    @classmethod
    def from_hf_config(cls, cfg: Any, name: str = "") -> "ModelShape":
        """From a transformers config object or its dict (Llama-style or GPT-2 names)."""
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, Mapping) else \
            (lambda k, d=None: getattr(cfg, k, d))
        model_type = str(get("model_type", "llama"))
        if model_type == "gpt2":
            h = int(get("n_embd"))
            n_head = int(get("n_head"))
            return cls(n_layer=int(get("n_layer")), hidden=h, intermediate=int(get("n_inner") or 4 * h),
                       n_head=n_head, n_kv_head=n_head, vocab=int(get("vocab_size")),
                       tied=bool(get("tie_word_embeddings", True)), arch="gpt2",
                       max_positions=int(get("n_positions", 1024)), name=name)
        n_head = int(get("num_attention_heads"))
        return cls(n_layer=int(get("num_hidden_layers")), hidden=int(get("hidden_size")),
                   intermediate=int(get("intermediate_size")), n_head=n_head,
                   n_kv_head=int(get("num_key_value_heads") or n_head), vocab=int(get("vocab_size")),
                   tied=bool(get("tie_word_embeddings", False)), arch="llama",
                   attn_bias=model_type == "qwen2", name=name)

    @classmethod
    def of(cls, name: str, depth: int = 1, width: int = 1) -> Optional["ModelShape"]:
        """The shape of a checkpoint the study knows (standins.SPECS, by hub id or alias),
        scaled like its stand-in; None when unknown."""
        spec = standins.find(name)
        if spec is None:
            return None
        spec = standins.scaled(spec, depth, width)
        label = spec.name.split("/")[-1] + (f" /{depth}×/{width}" if (depth, width) != (1, 1) else "")
        return cls.from_hf_config(standins.config_dict(spec), name=label)

    def pruned(self, k: int) -> "ModelShape":
        """The first ``k`` layers (``models.prune_layers``): embeddings and head kept."""
        return replace(self, n_layer=int(k), name=f"{self.name}[:{k}]" if self.name else "")


# ----------------------------------------------------------------------------- the plan

STUDENT_MODES = ("full", "lora", "qlora")
TEACHER_MODES = RUN_TEACHER_MODES + ("none",)
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "8bit", "4bit")
TASKS = ("train", "teacher_inference")


@dataclass
class MemoryPlan:
    """Everything that decides the peak of one training (or teacher-inference) process.

    ``task="train"``: a student training step (with the teacher online, cached or absent).
    ``task="teacher_inference"``: the teacher alone, no gradients (building the teacher
    cache, or teacher generation); student fields are then ignored.
    Sizes are per process and per micro-batch; ``seq_len`` is the padded length. Dtypes are
    resolved names (``auto`` is resolved by :func:`plan_from_config`; ``auto_dtype`` says what
    it became).
    """

    student: Optional[ModelShape] = None
    teacher: Optional[ModelShape] = None
    task: str = "train"
    device: str = "cpu"  # cpu | cuda
    # student
    student_mode: str = "full"  # full | lora | qlora (4-bit base + LoRA)
    student_dtype: str = "float32"  # weights (full/lora) and compute dtype (qlora)
    lora_r: int = 16
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = False
    master_weights: bool = True  # fp32 master copy when 16-bit weights are trained in full
    autocast_dtype: str = "float32"  # activation dtype under autocast (float32 = off)
    # teacher
    teacher_mode: str = "online"  # online | cache | none
    teacher_dtype: str = "float32"  # float32 | bfloat16 | float16 | 8bit | 4bit
    teacher_compute_dtype: str = "float32"  # dtype of a quantised teacher's matmuls
    cache_format: str = "hidden"  # hidden (exact) | topk
    cache_topk: int = 32
    cache_positions: int = 0  # response positions of the data set held by a teacher cache
    loss_chunk_size: int = 256  # positions per chunk of the lean loss (train.loss_chunk_size)
    # data
    batch_size: int = 8
    seq_len: int = 512
    response_fraction: float = 0.2
    response_only: bool = True  # logits only at response positions (objectives.response_logits)
    pretrain_batch: int = 0  # pre-train term blocks per step (0 = no pre-train term)
    pretrain_seq_len: int = 0
    loss: str = "plain"  # plain | lean (train.loss_chunk_size > 0)
    attn_impl: str = "sdpa"  # sdpa | eager
    keep_hidden_states: bool = True  # output_hidden_states=True, as response_logits calls it
    framework_bytes: Optional[int] = None  # measured baseline (default: see estimate)
    cpu_allocator_overhead: Optional[float] = None  # None: CPU_ALLOCATOR_OVERHEAD
    auto_dtype: str = ""  # what dtype "auto" resolved to ("" when no dtype was auto)
    label: str = ""

    def validate(self) -> "MemoryPlan":
        def one_of(name, value, options):
            if value not in options:
                raise ValueError(f"MemoryPlan.{name}: {value!r} is not one of {', '.join(options)}")
        one_of("task", self.task, TASKS)
        one_of("device", self.device, ("cpu", "cuda"))
        one_of("student_mode", self.student_mode, STUDENT_MODES)
        one_of("teacher_mode", self.teacher_mode, TEACHER_MODES)
        one_of("teacher_dtype", self.teacher_dtype, WEIGHT_DTYPES)
        one_of("student_dtype", self.student_dtype, WEIGHT_DTYPES[:3])
        one_of("teacher_compute_dtype", self.teacher_compute_dtype, WEIGHT_DTYPES[:3])
        one_of("autocast_dtype", self.autocast_dtype, WEIGHT_DTYPES[:3])
        one_of("cache_format", self.cache_format, CACHE_FORMATS)
        one_of("loss", self.loss, ("plain", "lean"))
        one_of("attn_impl", self.attn_impl, ("sdpa", "eager"))
        if self.task == "train" and self.student is None:
            raise ValueError("MemoryPlan: task 'train' needs a student shape")
        if self.task == "teacher_inference" and self.teacher is None:
            raise ValueError("MemoryPlan: task 'teacher_inference' needs a teacher shape")
        if self.task == "train" and self.teacher_mode != "none" and self.teacher is None:
            raise ValueError("MemoryPlan: teacher_mode online/cache needs a teacher shape "
                             "(or teacher_mode='none')")
        if not 0.0 < self.response_fraction <= 1.0:
            raise ValueError("MemoryPlan.response_fraction must be in (0, 1]")
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError("MemoryPlan: batch_size and seq_len must be >= 1")
        return self


def _bytes(dtype: str) -> float:
    return DTYPE_BYTES[dtype]


def _quant_bytes(dtype: str) -> float:
    return {"4bit": NF4_BYTES, "8bit": INT8_BYTES}.get(dtype) or _bytes(dtype)


def _weights(shape: ModelShape, dtype: str, compute_dtype: str, *, upcast_rest: bool = False) -> float:
    """Resident weights. Quantised dtypes apply to block linears only; the rest stays in the
    compute dtype (fp32 after prepare_model_for_kbit_training when ``upcast_rest``)."""
    if dtype in ("4bit", "8bit"):
        rest = 4.0 if upcast_rest else _bytes(compute_dtype)
        q = shape.linear_params() * _quant_bytes(dtype)
        if dtype == "8bit":  # one fp32 scale per output row
            q += shape.n_layer * sum(b for _, _, b in shape.linear_shapes()) * 4
        return q + shape.other_params() * rest
    return shape.n_params() * _bytes(dtype)


def _act_elems_per_token_layer(shape: ModelShape, seq_len: int, attn_impl: str, mode: str,
                               dropout: float) -> float:
    """Saved activation elements per token per block (module docstring).

    Full fine-tuning, Llama block: 9·h + 2·kv + 4·i (measured with saved_tensors_hooks on
    SmolLM2 blocks: 11438 against 11712 counted). LoRA: frozen weights save 2·h less (the
    RMSNorm weight products), and each adapted linear with dropout > 0 keeps its own
    dropout output for lora_A (3·h for q/k/v, h for o, 2·h for gate/up, i for down) —
    measured 17118 against 16800 counted with dropout 0.05, 10110 against 10560 without.
    QLoRA: bitsandbytes' 4-bit matmul also keeps its input (3·h + i).
    """
    h, kv, i = shape.hidden, shape.kv_hidden, shape.intermediate
    mlp = 4 * i if shape.gated else 2 * i
    n = 9 * h + 2 * kv + mlp
    if mode in ("lora", "qlora"):
        n -= 2 * h
        if dropout > 0:
            n += sum(a for _, a, _ in shape.linear_shapes())
    if mode == "qlora":
        n += 3 * h + i
    if attn_impl == "eager":
        n += shape.n_head * seq_len
    return n


def _mask_bytes_per_token_layer(shape: ModelShape, mode: str, dropout: float) -> float:
    if mode in ("lora", "qlora") and dropout > 0:
        return sum(a for _, a, _ in shape.linear_shapes())  # one bool per adapted input
    return 0.0


def _framework(plan: MemoryPlan) -> float:
    if plan.framework_bytes is not None:
        return float(plan.framework_bytes)
    return float(CUDA_CONTEXT_BYTES if plan.device == "cuda" else CPU_BASELINE_BYTES)


def _teacher_compute_bytes(plan: MemoryPlan) -> float:
    quantized = plan.teacher_dtype in ("4bit", "8bit")
    return _bytes(plan.teacher_compute_dtype if quantized else plan.teacher_dtype)


def estimate(plan: MemoryPlan) -> dict:
    """Peak memory of ``plan``: {"components": {name: bytes}, "total": bytes, "phase": the
    phase of the step that peaks, "phases": {phase: total}, "host": {name: bytes} (CPU memory
    a CUDA plan also needs: the teacher cache), "plan": dict, "notes": [...]}.

    The components sum to the total. A training step is split in three phases whose
    transient terms are never alive together: "forward" (student activations, its logits
    and the loss's forward intermediates, the teacher's signal: online forward and logits,
    or a cache's rows),
    "backward" (activations, the loss's backward intermediates, gradients) and "step"
    (gradients and AdamW's foreach temporaries); persistent terms (framework, weights,
    optimizer states, teacher cache) count in all three. The peak is the largest phase.
    """
    plan.validate()
    persistent: dict[str, float] = {"framework": _framework(plan)}
    host: dict[str, float] = {}
    notes: list[str] = []
    B, T = plan.batch_size, plan.seq_len
    tokens = B * T
    pt_tokens = plan.pretrain_batch * plan.pretrain_seq_len
    n_resp = max(1, round(tokens * plan.response_fraction))
    V = (plan.student or plan.teacher).vocab

    if plan.task == "teacher_inference":
        t = plan.teacher
        cb = _teacher_compute_bytes(plan)
        n_logit = n_resp if plan.response_only else tokens
        persistent["teacher_weights"] = _weights(t, plan.teacher_dtype, plan.teacher_compute_dtype)
        fwd = {"teacher_activations": _inference_activations(t, tokens, cb, plan.keep_hidden_states)}
        if plan.cache_format == "topk":  # logits at response rows, then their top-k
            fwd["teacher_logits"] = n_logit * t.vocab * 4.0 * INFERENCE_LOGIT_COPIES
            row_bytes = plan.cache_topk * 8.0
        else:  # the `hidden` cache keeps the final hidden states (in the teacher's dtype), no logits
            fwd["teacher_logits"] = n_logit * t.hidden * cb
            row_bytes = t.hidden * cb
        if plan.teacher_dtype in ("4bit", "8bit"):
            fwd["quant_workspace"] = _largest_linear(t) * cb
        # the build streams each batch's rows to the file: one batch on the host
        host = {"teacher_cache_rows": n_logit * row_bytes} if plan.device == "cuda" else {}
        disk = {"teacher_cache": _cache_disk_bytes(plan)} if plan.cache_positions else {}
        return _finish(plan, persistent, {"forward": fwd}, notes, host, disk)

    s = plan.student
    mode = plan.student_mode
    sdt = plan.student_dtype
    act_b = _bytes(plan.autocast_dtype) if plan.autocast_dtype != "float32" else _bytes(sdt)
    # weights and optimizer states (persistent), gradients (backward and step)
    if mode == "full":
        trainable = s.n_params()
        persistent["student_weights"] = s.n_params() * _bytes(sdt)
        grads = trainable * _bytes(sdt)
        master = 4.0 if (sdt != "float32" and plan.master_weights) else 0.0
        persistent["optimizer_states"] = trainable * (8.0 + master)
    else:
        trainable = s.lora_params(plan.lora_r)
        if mode == "lora":
            persistent["student_weights"] = s.n_params() * _bytes(sdt) + trainable * 4.0
        else:
            persistent["student_weights"] = _weights(s, "4bit", sdt, upcast_rest=True) + trainable * 4.0
        grads = trainable * 4.0
        persistent["optimizer_states"] = trainable * 8.0
    # activations kept for backward
    per_tl = _act_elems_per_token_layer(s, T, plan.attn_impl, mode, plan.lora_dropout) * act_b \
        + _mask_bytes_per_token_layer(s, mode, plan.lora_dropout)
    all_tokens = tokens + pt_tokens
    if plan.gradient_checkpointing:
        act = all_tokens * (s.n_layer * s.hidden * act_b + per_tl)
    else:
        act = all_tokens * s.n_layer * per_tl
    act += all_tokens * 3 * s.hidden * act_b  # embedding output, final norm in/out
    act *= ACT_CALIBRATION
    # [N, V] fp32 logits (train.response_logits upcasts) and the loss's intermediates
    rows = n_resp if plan.response_only else tokens
    unit = V * 4.0
    if plan.response_only or plan.loss == "plain":
        logits_bwd = (rows * LOGIT_COPIES["backward"] + pt_tokens * LOGIT_COPIES["backward"]) * unit
    else:  # lean loss on all-position logits: full logits + their gradient, loss rows only
        logits_bwd = (2 * tokens + n_resp * (LOGIT_COPIES["backward"] - 1)
                      + pt_tokens * LOGIT_COPIES["backward"]) * unit
    logits_fwd = (rows + pt_tokens) * LOGIT_COPIES["forward"] * unit
    fwd = {"student_activations": act, "student_logits": logits_fwd}
    bwd = {"student_activations": act, "student_logits": logits_bwd, "student_grads": grads}
    step = {"student_grads": grads, "optimizer_temporaries": trainable * 4.0 * FOREACH_TEMPS}
    if mode == "qlora":
        ws = _largest_linear(s) * _bytes(sdt)
        fwd["quant_workspace"] = bwd["quant_workspace"] = ws
    # teacher
    if plan.teacher_mode == "online":
        t = plan.teacher
        cb = _teacher_compute_bytes(plan)
        persistent["teacher_weights"] = _weights(t, plan.teacher_dtype, plan.teacher_compute_dtype)
        t_act = _inference_activations(t, max(tokens, pt_tokens), cb, plan.keep_hidden_states)
        t_logits = (rows + pt_tokens) * t.vocab * 4.0 * TEACHER_LOGIT_COPIES
        # the teacher runs after the student's forward: its transients overlap with the
        # student's activations and logits, not with the backward pass (its hidden states
        # and its logits are counted together: conservative, and within 1 % measured)
        fwd["teacher_activations"] = t_act
        fwd["teacher_logits"] = t_logits
        if plan.teacher_dtype in ("4bit", "8bit"):
            fwd["quant_workspace"] = max(fwd.get("quant_workspace", 0.0), _largest_linear(t) * cb)
    elif plan.teacher_mode == "cache":
        t = plan.teacher
        cb = _teacher_compute_bytes(plan)  # the cache stores the teacher's own dtype
        signal_rows = rows + pt_tokens
        if plan.cache_format == "hidden":  # hidden rows + the head, logits on the fly
            persistent["teacher_head"] = t.vocab * t.hidden * cb  # read once, kept
            read = signal_rows * t.hidden * cb
            # the lean loss computes the response rows' teacher logits one chunk at a time; the
            # plain loss, and the pre-train term (always plain), all at once
            logit_rows = (min(rows, plan.loss_chunk_size) if plan.loss == "lean" else rows) + pt_tokens
            fwd["teacher_signal"] = read + logit_rows * t.vocab * 4.0 * TEACHER_LOGIT_COPIES
            staging = min(64 * MiB, t.vocab * t.hidden * cb)  # the head's read blocks
        else:  # top-k ids (int32 stored, int64 gathered) and fp32 log-probs
            read = signal_rows * plan.cache_topk * 8.0
            fwd["teacher_signal"] = signal_rows * plan.cache_topk * 12.0
            staging = 0.0
        if plan.device == "cuda":  # the batch's rows pass through host memory
            host["teacher_cache_rows"] = read + staging
        else:
            persistent["teacher_cache_rows"] = read
        stored = _cache_disk_bytes(plan)
        notes.append(f"the teacher cache takes {_gib(stored)} GiB on disk "
                     f"({'at most: every train record at full length' if plan.cache_positions else 'this batch'}); "
                     f"{_gib(read)} GiB of it is read into host memory per step")
    disk = {"teacher_cache": _cache_disk_bytes(plan)} if plan.teacher_mode == "cache" else {}
    return _finish(plan, persistent, {"forward": fwd, "backward": bwd, "step": step}, notes, host, disk)


def _cache_disk_bytes(plan: MemoryPlan) -> float:
    """The teacher cache's file: per position of the data set the hidden state in the
    teacher's dtype and the head once (``hidden``), or k int32 ids and fp32 log-probs."""
    t = plan.teacher
    positions = plan.cache_positions or max(1, round(plan.batch_size * plan.seq_len * plan.response_fraction))
    if plan.cache_format == "hidden":
        cb = _teacher_compute_bytes(plan)
        return positions * t.hidden * cb + t.vocab * t.hidden * cb
    return positions * plan.cache_topk * 8.0


def _largest_linear(shape: ModelShape) -> int:
    return max(a * b for _, a, b in shape.linear_shapes())


def _inference_activations(shape: ModelShape, tokens: int, cb: float, keep_hidden: bool) -> float:
    """No-grad forward: the kept hidden states ((L+1)·h per token when output_hidden_states)
    plus one block's live intermediates (gate, up, silu, product or fc/gelu + residual)."""
    kept = (shape.n_layer + 1) * shape.hidden if keep_hidden else 2 * shape.hidden
    live = (3 * shape.intermediate if shape.gated else 2 * shape.intermediate) + 4 * shape.hidden
    return tokens * (kept + live) * cb


def _finish(plan: MemoryPlan, persistent: dict, phases: dict, notes: list,
            host: Optional[dict] = None, disk: Optional[dict] = None) -> dict:
    base = sum(persistent.values())
    totals = {name: base + sum(p.values()) for name, p in phases.items()}
    peak_phase = max(totals, key=totals.get)
    comps = {k: int(round(v)) for k, v in persistent.items()}
    comps.update({k: int(round(v)) for k, v in phases[peak_phase].items() if v > 0})
    if plan.device == "cpu" and plan.task == "train":
        dynamic = sum(v for k, v in phases[peak_phase].items())
        share = CPU_ALLOCATOR_OVERHEAD if plan.cpu_allocator_overhead is None \
            else plan.cpu_allocator_overhead
        if share:
            comps["allocator_overhead"] = int(round(dynamic * share))
    return {"components": comps, "total": int(sum(comps.values())), "phase": peak_phase,
            "phases": {k: int(round(v)) for k, v in totals.items()},
            "host": {k: int(round(v)) for k, v in (host or {}).items()},
            "disk": {k: int(round(v)) for k, v in (disk or {}).items()},
            "plan": _plan_dict(plan), "notes": notes}


def _plan_dict(plan: MemoryPlan) -> dict:
    d = dataclasses.asdict(plan)
    for key in ("student", "teacher"):
        shape = getattr(plan, key)
        d[key] = None if shape is None else dict(dataclasses.asdict(shape), n_params=shape.n_params())
    return d


# ----------------------------------------------------------------------------- reporting

def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _describe(plan: Mapping) -> str:
    def shape_name(s):
        if not s:
            return "-"
        return s.get("name") or f"{s['n_layer']}L×{s['hidden']}"

    auto = f" (dtype auto = {plan['auto_dtype']})" if plan.get("auto_dtype") else ""
    if plan["task"] == "teacher_inference":
        return (f"teacher inference: {shape_name(plan['teacher'])} {plan['teacher_dtype']}, "
                f"batch {plan['batch_size']} × seq {plan['seq_len']}, {plan['device']}{auto}")
    if plan["teacher_mode"] == "none" or not plan["teacher"]:
        teacher = "no teacher"
    else:
        how = f"cache ({plan['cache_format']})" if plan["teacher_mode"] == "cache" else "online"
        teacher = f"teacher {shape_name(plan['teacher'])} {plan['teacher_dtype']} {how}"
    gc = ", grad ckpt" if plan["gradient_checkpointing"] else ""
    return (f"student {shape_name(plan['student'])} {plan['student_mode']} {plan['student_dtype']}"
            f"{gc}; {teacher}; batch {plan['batch_size']} × seq {plan['seq_len']}, "
            f"response {plan['response_fraction']:.0%}, {plan['loss']} loss, {plan['device']}{auto}")


def format_plan(est: Mapping, budget_bytes: Optional[float] = None) -> str:
    """A Markdown table of the breakdown (GiB and share), the total and, with a budget,
    whether it fits: what notebook 02 prints before loading anything."""
    comps, total = est["components"], est["total"]
    lines = [_describe(est["plan"]), "", "| component | GiB | share |", "|---|---:|---:|"]
    for name, value in sorted(comps.items(), key=lambda kv: -kv[1]):
        share = value / total if total else 0.0
        lines.append(f"| {name} | {_gib(value)} | {share:.0%} |")
    lines.append(f"| **total (peak, {est['phase']})** | **{_gib(total)}** | 100% |")
    for name, value in est.get("host", {}).items():
        lines.append(f"| host memory: {name} | {_gib(value)} | — |")
    for name, value in est.get("disk", {}).items():
        lines.append(f"| disk: {name} | {_gib(value)} | — |")
    if budget_bytes:
        verdict = "fits" if total <= budget_bytes else "DOES NOT FIT"
        lines += ["", f"budget {_gib(budget_bytes)} GiB: {verdict} "
                      f"(headroom {_gib(budget_bytes - total)} GiB)"]
    for note in est.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _plan_from_dict(d: Mapping) -> MemoryPlan:
    d = dict(d)
    for key in ("student", "teacher"):
        if d.get(key):
            s = dict(d[key])
            s.pop("n_params", None)
            d[key] = ModelShape(**s)
    return MemoryPlan(**d)


# ----------------------------------------------------------------------------- fixes

#: How much a change alters the run, for picking the first one to make (lowest first):
#: 0 memory for time only (exact), 1 an approximation of the teacher's signal, 2 the batch
#: or the teacher's precision, 3 the method itself (what is trained, on what).
RANKS = {"train.teacher_mode": 0, "train.loss_chunk_size": 0, "student.gradient_checkpointing": 0,
         "train.cache_format": 1, "train.batch_size": 2, "eval.batch_size": 0,
         "teacher.quantization": 2, "student.lora": 3, "student.quantization": 3,
         "train.lm_coef": 3, "data.max_length": 3, "(code)": 0}


def _trials(plan: MemoryPlan, budget_bytes: Optional[float]) -> list[tuple[str, str, MemoryPlan]]:
    """(description, params setting, changed plan) for each single change that may help."""
    trials: list[tuple[str, str, MemoryPlan]] = []
    is_train = plan.task == "train"
    compute = plan.auto_dtype or ("bfloat16" if plan.device == "cuda" else "float32")
    if is_train and plan.teacher_mode == "online":
        trials.append(("cache the teacher", "train.teacher_mode=cache",
                       replace(plan, teacher_mode="cache")))
    if is_train and plan.teacher_mode == "cache" and plan.cache_format == "hidden":
        trials.append(("compact teacher cache (top-k: biased, not exact)", "train.cache_format=topk",
                       replace(plan, cache_format="topk")))
    if plan.teacher is not None and plan.teacher_dtype != "4bit" and \
            (plan.task == "teacher_inference" or plan.teacher_mode == "online"):
        trials.append(("use teacher 4bit", "teacher.quantization=4bit",
                       replace(plan, teacher_dtype="4bit", teacher_compute_dtype=compute)))
    if is_train and not plan.gradient_checkpointing:
        trials.append(("gradient checkpointing", "student.gradient_checkpointing=true",
                       replace(plan, gradient_checkpointing=True)))
    if is_train and plan.student_mode == "full":
        trials.append(("LoRA student", "student.lora=true", replace(plan, student_mode="lora")))
        trials.append(("QLoRA student", "student.lora=true, student.quantization=4bit",
                       replace(plan, student_mode="qlora",
                               student_dtype=compute if plan.device == "cuda" else plan.student_dtype)))
    elif is_train and plan.student_mode == "lora":
        trials.append(("QLoRA student", "student.quantization=4bit", replace(plan, student_mode="qlora")))
    if is_train and plan.loss == "plain":
        trials.append(("lean loss", "train.loss_chunk_size=256", replace(plan, loss="lean")))
    if not plan.response_only:
        trials.append(("logits at response positions only", "(code)", replace(plan, response_only=True)))
    if is_train and plan.pretrain_batch:
        trials.append(("no pre-train term", "train.lm_coef=0",
                       replace(plan, pretrain_batch=0, pretrain_seq_len=0)))
    # halving batch / sequence until it fits
    batch_key = "train.batch_size" if is_train else "eval.batch_size"
    for attr, floor, key in (("batch_size", 1, batch_key), ("seq_len", 64, "data.max_length")):
        value = getattr(plan, attr)
        while value > floor:
            value = max(floor, value // 2)
            cand = replace(plan, **{attr: value})
            if budget_bytes is None or estimate(cand)["total"] <= budget_bytes or value == floor:
                what = ("batch" if attr == "batch_size" else "sequence length") + \
                    (" (the cache build's batch)" if not is_train and attr == "batch_size" else "")
                trials.append((f"{what} {value}", f"{key}={value}", cand))
                break
    return trials


def suggest_fixes(plan: MemoryPlan, budget_bytes: Optional[float] = None) -> list[dict]:
    """Single changes to ``plan`` that lower its peak, largest saving first.

    Each entry: {"change": what to do (with the params key), "key": the params setting,
    "saving": bytes, "total": bytes after the change, "fits": bool or None}. Batch and
    sequence length are lowered by halving until the plan fits (or to 1 / 64).
    """
    base = estimate(plan)["total"]
    out = []
    for label, key, cand in _trials(plan, budget_bytes):
        total = estimate(cand)["total"]
        if total < base:
            out.append({"change": f"{label} ({key})", "key": key, "saving": base - total,
                        "total": total, "fits": None if budget_bytes is None else total <= budget_bytes,
                        "rank": RANKS[key.split("=")[0]], "plan": cand})
    return sorted(out, key=lambda d: -d["saving"])


def fix_path(plan: MemoryPlan, budget_bytes: float, max_changes: int = 4) -> list[str]:
    """The params settings to change, in order, to make ``plan`` fit ``budget_bytes``: of the
    changes enough on their own, the one that alters the run least (:data:`RANKS`; then the
    largest saving); when none is enough, the largest saving, and so on. [] when it fits
    already; the list is cut when nothing more helps."""
    return _fix(plan, budget_bytes, max_changes)[0]


def _fix(plan: MemoryPlan, budget_bytes: float, max_changes: int = 4) -> tuple[list[str], MemoryPlan]:
    """:func:`fix_path`'s changes and the plan they lead to."""
    path: list[str] = []
    for _ in range(max_changes):
        if estimate(plan)["total"] <= budget_bytes:
            break
        fixes = suggest_fixes(plan, budget_bytes)
        if not fixes:
            break
        enough = [f for f in fixes if f["fits"]]
        best = min(enough, key=lambda f: (f["rank"], -f["saving"])) if enough else fixes[0]
        path.append(best["key"])
        plan = best["plan"]
    return path, plan


def check_fits(est: Mapping, budget_bytes: float) -> Mapping:
    """Return ``est`` if its total fits ``budget_bytes``; else raise :class:`MemoryPlanError`
    whose message lists the changes that help, largest saving first."""
    total = est["total"]
    if total <= budget_bytes:
        return est
    plan = _plan_from_dict(est["plan"])
    fixes = suggest_fixes(plan, budget_bytes)
    lines = [f"plan needs {_gib(total)} GiB but the budget is {_gib(budget_bytes)} GiB "
             f"(short by {_gib(total - budget_bytes)} GiB): {_describe(est['plan'])}.",
             "Changes that help, largest saving first:"]
    for f in fixes:
        mark = "  <- enough on its own" if f["fits"] else ""
        lines.append(f"  - {f['change']}: saves {_gib(f['saving'])} GiB "
                     f"(total {_gib(f['total'])} GiB){mark}")
    if not any(f["fits"] for f in fixes):
        lines.append("  No single change is enough: combine them from the top.")
    biggest = max(est["components"].items(), key=lambda kv: kv[1])
    lines.append(f"Largest component: {biggest[0]} ({_gib(biggest[1])} GiB).")
    raise MemoryPlanError("\n".join(lines))


# ----------------------------------------------------------------------------- from params

_TOKENIZER_VOCAB = {"smollm2": 49152, "gpt2": 50257}
_SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _vocab_of(run_config) -> Optional[int]:
    tok = run_config.tokenizer
    if tok.kind == "bpe_local":
        return int(tok.vocab_size)
    if tok.kind == "pretrained":
        spec = standins.find(tok.path)
        return spec.vocab if spec else None
    return _TOKENIZER_VOCAB.get(tok.kind)


def _read_local_config(path: Path) -> Optional[ModelShape]:
    """config.json of a saved model (or of the base of a saved LoRA adapter)."""
    for cand in (path / "config.json", path / "base" / "config.json"):
        if cand.is_file():
            return ModelShape.from_hf_config(json.loads(cand.read_text()), name=path.name)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path", "")
        if base:
            return _shape_of_name(base)
    return None


def _shape_of_name(name: str) -> Optional[ModelShape]:
    path = Path(name)
    if path.exists():
        return _read_local_config(path)
    shape = ModelShape.of(name)
    if shape is not None:
        return shape
    try:  # a hub id already in the local cache: config only, never weights, never network
        from transformers import AutoConfig
        return ModelShape.from_hf_config(AutoConfig.from_pretrained(name, local_files_only=True),
                                         name=name)
    except Exception:  # noqa: BLE001 - anything else means "unknown"
        return None


def _shape_of_model(mcfg, vocab: Optional[int], role: str) -> ModelShape:
    if mcfg.source == "tiny":
        if vocab is None:
            raise MemoryPlanError(f"{role}: a tiny model needs a known vocabulary size")
        h = mcfg.n_embd
        gpt2 = mcfg.arch == "gpt2"
        shape = ModelShape(n_layer=mcfg.n_layer, hidden=h, intermediate=4 * h, n_head=mcfg.n_head,
                           n_kv_head=mcfg.n_head, vocab=vocab, tied=True,
                           arch="gpt2" if gpt2 else "llama", max_positions=512 if gpt2 else 0,
                           name=f"tiny-{mcfg.arch} {mcfg.n_layer}L×{h}")
    elif mcfg.source == "smollm2":
        shape = ModelShape.of(_SMOLLM2)
    else:
        shape = _shape_of_name(mcfg.name_or_path)
        if shape is None:
            raise MemoryPlanError(
                f"{role}.name_or_path: cannot read the shape of {mcfg.name_or_path!r} without "
                f"downloading it (not a local folder with config.json, not in the hub cache, not "
                f"in standins.SPECS); pass shapes={{'{role}': ModelShape(...)}} or add its "
                f"config numbers to dpkd_lib/gpu/standins.py")
    if mcfg.prune_to:
        shape = shape.pruned(mcfg.prune_to)
    return shape


def _train_records(data) -> int:
    """Records of the train split (upper bound for hub data: before the filters)."""
    if data.source == "synthetic":
        n = data.n_train
        if data.train_slice:
            from ..config import parse_slice
            n = len(range(n)[parse_slice(data.train_slice)])
        return n
    return max(0, DOLLY_RECORDS - data.n_valid - data.n_test)


def plan_from_config(run_config, device_budget: Optional[float] = None, *, device: Optional[str] = None,
                     capability: Optional[Sequence[int]] = None, seq_len: Optional[int] = None,
                     response_fraction: Optional[float] = None,
                     shapes: Optional[Mapping[str, ModelShape]] = None) -> MemoryPlan:
    """A :class:`MemoryPlan` for a :class:`dpkd_lib.config.RunConfig`, without loading weights.

    Shapes come from ``shapes`` (override), tiny-model params, a local folder's config.json,
    :data:`dpkd_lib.gpu.standins.SPECS`, or a config already in the hub cache. ``device``: "cpu" or
    "cuda" (default: what this machine has); ``capability``: the CUDA card's (major, minor),
    which resolves ``dtype: auto`` (default: this machine's card; on a machine with none,
    8.0). The sequence length defaults to ``data.max_length`` (a batch pads to its longest
    row, so this is the worst case) and the response fraction to 0.5 (≈ 0.2 on the synthetic
    set; a Dolly response is often half the sequence). With ``device_budget`` (bytes) the
    plan, and its cache build's, are checked and :class:`MemoryPlanError` raised when either
    does not fit.
    """
    shapes = dict(shapes or {})
    t = run_config.train
    vocab = _vocab_of(run_config)
    student = shapes.get("student") or _shape_of_model(run_config.student, vocab, "student")
    if vocab is None:
        vocab = student.vocab
    teacher = None
    if run_config.teacher is not None:
        teacher = shapes.get("teacher") or _shape_of_model(run_config.teacher, vocab, "teacher")
    device = device or precision.default_device()
    if device == "cuda" and capability is None:
        import torch
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() \
            else precision.BF16_CAPABILITY

    def dt(name: str) -> str:
        return precision.resolve(name, device, capability)

    s = run_config.student
    named = [s.dtype, t.autocast_dtype] + ([run_config.teacher.dtype] if teacher else [])
    quantized = s.quantization in ("4bit", "8bit")
    mode = "qlora" if (s.lora and quantized) else ("lora" if s.lora else "full")
    T = int(seq_len or run_config.data.max_length)
    frac = float(response_fraction if response_fraction is not None else 0.5)
    pretrain = t.lm_coef > 0 and run_config.data.pretrain_source != "none"
    fields: dict[str, Any] = dict(
        student=student, teacher=teacher, device=device, student_mode=mode,
        student_dtype=dt(s.dtype), lora_r=s.lora_r, lora_dropout=s.lora_dropout,
        gradient_checkpointing=s.gradient_checkpointing,
        autocast_dtype=dt(t.autocast_dtype), batch_size=t.batch_size, seq_len=T,
        response_fraction=frac, loss="lean" if t.loss_chunk_size > 0 else "plain",
        loss_chunk_size=t.loss_chunk_size or 256,
        pretrain_batch=t.batch_size if pretrain else 0,
        pretrain_seq_len=run_config.data.pretrain_block_size if pretrain else 0,
        auto_dtype=precision.auto_dtype(device, capability) if "auto" in named else "",
        label=run_config.output_dir)
    if teacher is None:
        fields["teacher_mode"] = "none"
    else:
        tq = run_config.teacher.quantization
        cached = t.teacher_mode == "cache" and t.objective in TEACHER_SIGNAL_OBJECTIVES
        fields["teacher_mode"] = "cache" if cached else "online"
        fields["teacher_dtype"] = tq if tq in ("4bit", "8bit") else dt(run_config.teacher.dtype)
        fields["teacher_compute_dtype"] = dt(run_config.teacher.dtype)
        if cached:
            fields["cache_format"] = t.cache_format
            fields["cache_topk"] = t.cache_topk
            positions = _train_records(run_config.data) * T * frac
            if pretrain:  # the pre-train blocks are cached too, every position
                d = run_config.data
                positions += d.pretrain_max_blocks * (d.pretrain_block_size - 1)
            fields["cache_positions"] = int(positions)
    plan = MemoryPlan(**fields).validate()
    if device_budget is not None:
        check_fits(estimate(plan), device_budget)
        build = teacher_cache_plan(plan, batch_size=run_config.eval.batch_size)
        if build is not None:
            check_fits(estimate(build), device_budget)
    return plan


def teacher_cache_plan(plan: MemoryPlan, batch_size: Optional[int] = None) -> Optional[MemoryPlan]:
    """The plan of building the teacher cache for a cached-teacher training ``plan``: the
    teacher alone, no gradients, at ``batch_size`` (train.py builds it at eval.batch_size).
    None when the plan has no cached teacher. A cached plan fits only if both fit."""
    if plan.task != "train" or plan.teacher_mode != "cache" or plan.teacher is None:
        return None
    return replace(plan, task="teacher_inference", teacher_mode="online",
                   batch_size=batch_size or plan.batch_size, label=f"{plan.label} (cache build)")


# ----------------------------------------------------------------------------- cards, profiles

@dataclass(frozen=True)
class Card:
    """A GPU: its memory as nvidia-smi reports it, and its CUDA compute capability."""

    name: str
    memory_mib: int
    capability: tuple

    @property
    def bytes(self) -> int:
        return self.memory_mib * MiB


#: The cards docs/gpu_memory.md covers (Colab: T4, L4, A100; Kaggle: P100, T4).
CARDS: tuple[Card, ...] = (
    Card("T4 16 GB", 15360, (7, 5)),
    Card("P100 16 GB", 16280, (6, 0)),
    Card("L4 24 GB", 23034, (8, 9)),
    Card("A100 40 GB", 40960, (8, 0)),
    Card("A100/H100 80 GB", 81559, (8, 0)),
)

_CACHED = ("train.objective=dpkd_token", "train.teacher_mode=cache")
#: The GPU profiles' runs docs/gpu_memory.md and the GPU check cover: (label, base params
#: file, overrides). DPKD-token is the notebooks' main distillation run; the token-level
#: objectives run with the teacher cached, DPKD-seq and SeqKD with the teacher online (its
#: plan: the same step with the teacher in memory; DPKD-seq's extra forward passes over the
#: sampled pair are not modelled).
PROFILE_RUNS: tuple[tuple[str, str, tuple], ...] = (
    ("paper: GPT-2 XL → base, teacher cached", "params/paper/base_train.yaml", _CACHED),
    ("paper: GPT-2 XL → base, teacher online", "params/paper/base_train.yaml",
     ("train.objective=dpkd_token",)),
    ("colab: GPT-2 XL → base, teacher cached", "params/colab/base_train.yaml", _CACHED),
    ("colab: GPT-2 XL → base, teacher online", "params/colab/base_train.yaml",
     ("train.objective=dpkd_token",)),
    ("colab: Qwen2.5 14B → 7B QLoRA, teacher cached", "params/colab/qlora_train.yaml", _CACHED),
    ("colab: Llama-2 13B → 7B QLoRA, teacher cached", "params/colab/qlora_llama2_train.yaml", _CACHED),
)


def profile_config(path: str, overrides: Sequence[str], root: Path = REPO_ROOT):
    from ..config import load_config
    return load_config(Path(root) / path, list(overrides))


def card_verdict(cfg, card: Card) -> dict:
    """Does run config ``cfg`` fit ``card``? {"fits", "dtype", "train", "build" (estimates;
    build None when the teacher is not cached), "changes": params settings that make it
    fit, "why"}."""
    plan = plan_from_config(cfg, device="cuda", capability=card.capability)
    train = estimate(plan)
    build_plan = teacher_cache_plan(plan, batch_size=cfg.eval.batch_size)
    build = estimate(build_plan) if build_plan is not None else None
    dtypes = {plan.student_dtype, plan.autocast_dtype} | \
        ({plan.teacher_compute_dtype} if plan.teacher is not None else set())
    compute = "bf16" if "bfloat16" in dtypes else ("fp16" if "float16" in dtypes else "fp32")
    out = {"dtype": compute, "train": train, "build": build, "changes": [], "why": ""}
    changes = []
    if "bfloat16" in dtypes and tuple(card.capability) < precision.BF16_CAPABILITY:
        named = [("teacher.dtype", cfg.teacher.dtype if cfg.teacher is not None else None),
                 ("student.dtype", cfg.student.dtype), ("train.autocast_dtype", cfg.train.autocast_dtype)]
        changes = [f"{key}=auto" for key, value in named if value == "bfloat16"]
        out["why"] = "no bf16 on this card"
    train_changes, fixed = _fix(plan, card.bytes)
    changes += train_changes
    # the cache build of the run as changed (a top-k cache builds with the teacher's logits)
    fixed_build = teacher_cache_plan(fixed, batch_size=cfg.eval.batch_size)
    if fixed_build is not None:
        changes += [c for c in fix_path(fixed_build, card.bytes) if c not in changes]
    fits = not changes
    out.update(fits=fits, changes=changes,
               why=out["why"] or ("" if fits else "out of memory"))
    return out


def profile_plans(cards: Sequence[Card] = CARDS, root: Path = REPO_ROOT) -> list[dict]:
    """Every :data:`PROFILE_RUNS` entry's plan on every card: [{"label", "params",
    "overrides", "cards": {card name: card_verdict}}]."""
    rows = []
    for label, path, overrides in PROFILE_RUNS:
        cfg = profile_config(path, overrides, root)
        rows.append({"label": label, "params": path, "overrides": list(overrides),
                     "cards": {card.name: card_verdict(cfg, card) for card in cards}})
    return rows


#: Disk a notebook runtime offers for the teacher cache (bytes, decimal GB as the services
#: state them; check with `df -h` on the runtime: it varies). Colab: the VM disk left free
#: on a GPU runtime; Kaggle: /kaggle/working, the 20 GB a notebook can write and keep.
DISKS: tuple[tuple[str, int], ...] = (("Colab (~78 GB free)", 78 * 10 ** 9),
                                      ("Kaggle /kaggle/working (20 GB)", 20 * 10 ** 9))


def _host_and_disk(first: Mapping) -> tuple[float, float]:
    """(host bytes the run really holds for its teacher signal, training or build, whichever
    is larger; the cache's size on disk) of one card verdict."""
    train, build = first["train"], first["build"]
    host = max(sum(train["host"].values()), sum(build["host"].values()) if build else 0)
    return host, sum(train.get("disk", {}).values())


def card_table(cards: Sequence[Card] = CARDS, root: Path = REPO_ROOT, rows=None) -> str:
    """The per-card memory table (Markdown), generated from the params files."""
    head = ["run", "cache build", "forward", "backward", "step", "host RAM", "cache on disk"] + \
        [c.name for c in cards]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 6 + "---|" * len(cards)]
    for row in rows or profile_plans(cards, root):
        first = next(iter(row["cards"].values()))
        train, build = first["train"], first["build"]
        phases = train["phases"]
        host, disk = _host_and_disk(first)
        cells = [row["label"], _gib(build["total"]) if build else "—",
                 *(_gib(phases[p]) for p in ("forward", "backward", "step")),
                 _gib(host) if host else "—", f"≤ {_gib(disk)}" if disk else "—"]
        for card in cards:
            v = row["cards"][card.name]
            if v["fits"]:
                cells.append(f"fits ({v['dtype']})")
            else:
                fix = " + ".join(f"`{c}`" for c in v["changes"]) or "no single setting"
                cells.append(f"**no**: {fix}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def disk_table(rows) -> str:
    """Each cached run's teacher cache on disk against the disks of :data:`DISKS`."""
    lines = ["| run | cache format | cache on disk (GiB, at most) | " + " | ".join(n for n, _ in DISKS) + " |",
             "|---|---|---:|" + "---|" * len(DISKS)]
    for row in rows:
        first = next(iter(row["cards"].values()))
        _, disk = _host_and_disk(first)
        if not disk:
            continue
        fmt = first["train"]["plan"]["cache_format"]
        cells = [row["label"], fmt, _gib(disk)] + \
            ["fits" if disk <= size else f"**no** (use `train.cache_format=topk`, or a larger disk)"
             for _, size in DISKS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


DOC_PATH = REPO_ROOT / "docs" / "gpu_memory.md"
DOC_HEADER = "<!-- generated by `python -m dpkd_lib.gpu.memory --doc` from the params files: do not edit -->"


def _detail(cfg, card: Card) -> str:
    """One run's plan on one card: training and cache build breakdowns (format_plan)."""
    plan = plan_from_config(cfg, device="cuda", capability=card.capability)
    parts = [format_plan(estimate(plan), card.bytes)]
    build = teacher_cache_plan(plan, batch_size=cfg.eval.batch_size)
    if build is not None:
        parts.append("Cache build:\n\n" + format_plan(estimate(build), card.bytes))
    return "\n\n".join(parts)


def doc_page(cards: Sequence[Card] = CARDS, root: Path = REPO_ROOT) -> str:
    """docs/gpu_memory.md: the per-card table, the caches on disk, and the 4-bit pairs'
    breakdowns on a T4."""
    rows = profile_plans(cards, root)
    t4 = cards[0]
    out = [DOC_HEADER, "", "# GPU memory per card", "",
           "Peak GPU memory per phase (GiB; fp16 and bf16 take the same bytes) predicted by",
           "`dpkd_lib.gpu.memory` for each GPU profile's DPKD-token run, and whether it fits each card",
           "(memory as nvidia-smi reports it, CUDA context included). When it does not, the cell",
           "names the settings to change, in order. `dtype: auto` picks fp16 below compute",
           "capability 8.0 (T4, P100), bf16 from it. *Cache build* is the teacher alone",
           "filling the teacher cache (it is unloaded before the student trains).",
           "",
           "*Host RAM* is what the teacher signal really holds in CPU memory: the exact (`hidden`)",
           "cache is written to disk while the teacher pass goes and read back by rows, so it is",
           "one batch's rows (plus the 64 MiB blocks the head is read onto the GPU in), whatever",
           "the cache's size (`dpkd_lib/teacher_cache.py`; measured in `make bench`,",
           "`teacher_cache_disk`). It leaves out loading the models themselves. *Cache on disk*",
           "is the cache's file, an upper bound: every train record at full length (Dolly's",
           "responses are mostly shorter), in the teacher's dtype (fp16 on a T4).",
           "",
           card_table(cards, root, rows),
           "",
           "## The teacher cache on disk",
           "",
           "The disk a runtime offers, as the services state it (check `df -h`: it varies).",
           "On Kaggle put `cache_dir` outside /kaggle/working if the cache does not fit there",
           "(it is rebuilt, not kept). `train.cache_format=topk` is the compact option (8·k bytes",
           "per position) but not exact: DPKD's log p(s) for a student argmax outside the",
           "teacher's top k is only bounded, and top-k KD is a biased estimate of KD.",
           "",
           disk_table(rows)]
    for label, path, overrides in PROFILE_RUNS:
        if "QLoRA" not in label:
            continue
        cfg = profile_config(path, overrides, root)
        out += ["", f"## {label}, on a {t4.name}", "",
                f"`{path}` with {', '.join(f'`{o}`' for o in overrides)}.", "",
                _detail(cfg, t4)]
    return "\n".join(out) + "\n"


def update_doc(path: Path = DOC_PATH, check: bool = False) -> bool:
    """Write docs/gpu_memory.md (``check``: only compare). Returns True when the page is (or
    was already) current."""
    path = Path(path)
    new = doc_page(root=path.parent.parent)
    if path.exists() and path.read_text() == new:
        return True
    if not check:
        from ..io import atomic_write_text
        atomic_write_text(path, new)
    return False


def _main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m dpkd_lib.gpu.memory",
                                     description="memory planner: print a run's plan, or regenerate "
                                                 "docs/gpu_memory.md, every GPU profile on every card")
    parser.add_argument("--doc", action="store_true",
                        help="rewrite docs/gpu_memory.md, the table of every GPU profile on every card")
    parser.add_argument("--check", action="store_true", help="with --doc: exit 1 if it is stale")
    parser.add_argument("--params", help="a params file to plan")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--card", choices=[c.name.split()[0] for c in CARDS], default=None,
                        help="plan for this card (default: this machine)")
    args = parser.parse_args(argv)
    try:
        if args.doc:
            current = update_doc(check=args.check)
            print(f"{DOC_PATH} is current" if current else
                  (f"{DOC_PATH} is stale: run python -m dpkd_lib.gpu.memory --doc"
                   if args.check else f"{DOC_PATH} updated"))
            return 0 if current or not args.check else 1
        if args.params:
            cfg = profile_config(args.params, args.set, Path.cwd())
            card = next((c for c in CARDS if c.name.split()[0] == args.card), None)
            plan = plan_from_config(cfg, device="cuda" if card else None,
                                    capability=card.capability if card else None)
            budget = card.bytes if card else None
            print(format_plan(estimate(plan), budget))
            build = teacher_cache_plan(plan, batch_size=cfg.eval.batch_size)
            if build is not None:
                print("\n" + format_plan(estimate(build), budget))
            if card:
                verdict = card_verdict(cfg, card)
                print(f"\n{card.name}: " + ("fits" if verdict["fits"] else
                                              f"{verdict['why']}; change " + ", then ".join(verdict["changes"])))
            return 0
    except (ConfigError, MemoryPlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
