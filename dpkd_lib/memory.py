"""Memory planner: predict the peak memory of a distillation run *before* loading anything.

Why: on a 16 GB GPU the colab pair (a 13-14B 4-bit teacher and a 7B QLoRA student) only
fits with the right combination of teacher quantisation, teacher cache, gradient
checkpointing and batch size, and finding that out by loading 20 GB of weights and running
out of memory costs minutes per try. A plan is a handful of numbers (shapes, dtypes, batch,
sequence length), so the peak can be estimated in microseconds, printed by the notebook,
and refused with a list of changes that would make it fit.

Use::

    cfg = load_config("params/colab/qlora_train.yaml", ["train.teacher_mode=cache"])
    plan = plan_from_config(cfg)                 # or MemoryPlan(...), preset_plan(...)
    est = estimate(plan)
    print(format_plan(est, 15 * GiB))
    check_fits(est, 15 * GiB)        # raises MemoryPlanError naming the fixes, best first
    plan_from_config(cfg, device_budget=15 * GiB)   # the same, plus the cache build's plan

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
  teacher's weights; a cached teacher is not resident, only its top-k (int32 id + fp32
  log-prob per response position of the data set).
* forward: ``student_activations`` (below), the student's [N, V] fp32 logits and the loss's
  forward intermediates (N = response positions when ``response_only``, as
  ``train.response_logits`` computes them), and the online teacher's forward (the hidden
  states ``output_hidden_states`` keeps, one MLP's intermediates) and its logits.
* backward: activations, the loss's backward intermediates and the gradients.
  :data:`LOGIT_COPIES` counts the [N, V] tensors alive, measured with a tensor-lifetime
  tracker on train.py's loss (CE + DPKD + reward statistics).
* step: gradients and AdamW's foreach temporaries.
* CPU only, ``allocator_overhead``: glibc's heap fragmentation, a fitted share of the
  phase's transient bytes (:data:`CPU_ALLOCATOR_OVERHEAD`).

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

Calibration (``python -m dpkd_lib.bench`` runs it): every configuration that runs here
(tiny models, the 6-layer SmolLM2 student full / LoRA at several batch and sequence sizes,
the 30-layer teacher fp32 and 4-bit inference) is run in a fresh subprocess by
:func:`measure_workload` and its peak compared with :func:`estimate` of the matching
:func:`plan_for_workload`; ``memory_planner_max_rel_error`` in ``results/bench/summary.json``
is the worst relative error.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

__all__ = [
    "GiB",
    "MiB",
    "MemoryPlanError",
    "ModelShape",
    "MemoryPlan",
    "KNOWN_SHAPES",
    "PRESETS",
    "smollm2_shape",
    "known_shape",
    "preset_plan",
    "estimate",
    "format_plan",
    "check_fits",
    "suggest_fixes",
    "plan_from_config",
    "teacher_cache_plan",
    "plan_for_workload",
    "run_workload",
    "measure_workload",
    "cpu_baseline_bytes",
]

GiB = 1024 ** 3
MiB = 1024 ** 2

#: CUDA context + cuBLAS workspace, resident on the GPU but outside torch's allocator.
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
#: RSS of `python -c "import torch, transformers, peft, accelerate"` on the reference box
#: (torch 2.13 CPU, transformers 5.24, peft 0.21): 449 MiB; torch + transformers alone is
#: 291 MiB. :func:`cpu_baseline_bytes` measures it on the current machine.
CPU_BASELINE_BYTES = 450 * MiB

#: Multiplier on the counted per-token activation bytes (see the module docstring); fitted
#: to measured CPU peaks of SmolLM2 blocks (results/bench/summary.json, `memory_planner`).
ACT_CALIBRATION = 1.0

#: [N, V] fp32 tensors alive in a training step's loss (CE + DPKD + reward stats, as
#: train.step_loss computes them), measured with a tensor-lifetime tracker on response
#: rows: forward = the logits + 3 (saved log-softmax, the stats' transient log-softmaxes);
#: backward = the logits + 4 (the CE's logsumexp backward dominates, so the lean DPKD path,
#: whose gathered copy and index backward cost as much as they save on rows that are all
#: response, does not lower it). Cached teacher: the same.
LOGIT_COPIES = {"forward": 4.0, "backward": 5.0}
#: [N, V] fp32 tensors of an online teacher alive during the student's forward loss: its
#: logits and the log-softmax the loss builds from them.
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

DTYPE_BYTES = {"float32": 4.0, "fp32": 4.0, "bfloat16": 2.0, "bf16": 2.0, "float16": 2.0,
               "fp16": 2.0}
#: bytes per quantised weight: nf4 + 8-bit absmax per block of 64 + fp32 per 256 blocks
NF4_BYTES = 0.5 + 1.0 / 64 + 4.0 / (64 * 256)
INT8_BYTES = 1.0


class MemoryPlanError(ValueError):
    """A plan that does not fit its budget; the message lists the changes that would help,
    largest saving first, and marks those that are enough on their own."""


# ----------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only LM that decide its memory (no weights needed).

    ``arch`` is "llama" for every gated-MLP family (Llama, Qwen2, Mistral, SmolLM2) and
    "gpt2" for GPT-2 (ungated MLP, learned positions, biases).
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
                   tied=bool(get("tie_word_embeddings", False)), arch="llama", name=name)

    @classmethod
    def from_params(cls, n_params: float, vocab: int = 32000, tied: bool = False,
                    name: str = "") -> "ModelShape":
        """A Llama-like shape with about ``n_params`` parameters, for when only the size is
        known: 12·L·h² + V·h(1 + untied) = N with L = h / 128 (the 7B/13B/70B aspect ratio),
        intermediate = 8/3·h rounded to 256, 128-dim heads, no GQA."""
        emb = vocab * (1 if tied else 2)
        h = 256
        while 12 * (h / 128) * h * h + emb * h < n_params:
            h += 128
        n_layer = max(1, round(h / 128))
        inter = int(math.ceil(8 * h / 3 / 256) * 256)
        return cls(n_layer=n_layer, hidden=h, intermediate=inter, n_head=max(1, h // 128),
                   n_kv_head=max(1, h // 128), vocab=vocab, tied=tied, name=name or f"~{n_params:.3g}")

    def pruned(self, k: int) -> "ModelShape":
        """The first ``k`` layers (``models.prune_layers``): embeddings and head kept."""
        return replace(self, n_layer=int(k), name=f"{self.name}[:{k}]" if self.name else "")


def _llama(name, L, h, i, heads, kv, V, tied):
    return ModelShape(n_layer=L, hidden=h, intermediate=i, n_head=heads, n_kv_head=kv, vocab=V,
                      tied=tied, name=name)


def _gpt2(name, L, h, heads):
    return ModelShape(n_layer=L, hidden=h, intermediate=4 * h, n_head=heads, n_kv_head=heads,
                      vocab=50257, tied=True, arch="gpt2", max_positions=1024, name=name)


#: Published configs of the models the profiles name (so a plan needs no download).
KNOWN_SHAPES: dict[str, ModelShape] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": _llama("SmolLM2-135M", 30, 576, 1536, 9, 3, 49152, True),
    "Qwen/Qwen2.5-14B-Instruct": _llama("Qwen2.5-14B", 48, 5120, 13824, 40, 8, 152064, False),
    "Qwen/Qwen2.5-7B-Instruct": _llama("Qwen2.5-7B", 28, 3584, 18944, 28, 4, 152064, False),
    "Qwen/Qwen2.5-1.5B-Instruct": _llama("Qwen2.5-1.5B", 28, 1536, 8960, 12, 2, 151936, True),
    "meta-llama/Llama-2-13b-hf": _llama("Llama-2-13B", 40, 5120, 13824, 40, 40, 32000, False),
    "meta-llama/Llama-2-7b-hf": _llama("Llama-2-7B", 32, 4096, 11008, 32, 32, 32000, False),
    "gpt2": _gpt2("gpt2", 12, 768, 12),
    "gpt2-medium": _gpt2("gpt2-medium", 24, 1024, 16),
    "gpt2-large": _gpt2("gpt2-large", 36, 1280, 20),
    "gpt2-xl": _gpt2("gpt2-xl", 48, 1600, 25),
}
_ALIASES = {"meta-llama/Llama-2-13b-chat-hf": "meta-llama/Llama-2-13b-hf",
            "meta-llama/Llama-2-7b-chat-hf": "meta-llama/Llama-2-7b-hf",
            "HuggingFaceTB/SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "openai-community/gpt2": "gpt2", "openai-community/gpt2-medium": "gpt2-medium",
            "openai-community/gpt2-large": "gpt2-large", "openai-community/gpt2-xl": "gpt2-xl",
            "Qwen/Qwen2.5-14B": "Qwen/Qwen2.5-14B-Instruct", "Qwen/Qwen2.5-7B": "Qwen/Qwen2.5-7B-Instruct",
            # MiniLLM's released GPT-2 checkpoints (the paper and colab profiles' pair)
            "MiniLLM/teacher-gpt2-1.5B": "gpt2-xl", "MiniLLM/init-gpt2-120M": "gpt2",
            "MiniLLM/init-gpt2-340M": "gpt2-medium", "MiniLLM/init-gpt2-760M": "gpt2-large",
            "MiniLLM/SFT-gpt2-120M": "gpt2", "MiniLLM/SFT-gpt2-340M": "gpt2-medium",
            "MiniLLM/SFT-gpt2-760M": "gpt2-large"}


def known_shape(name: str) -> Optional[ModelShape]:
    """The shape of a model the study knows by hub id (case-insensitive), else None."""
    name = _ALIASES.get(name, name)
    for key, shape in KNOWN_SHAPES.items():
        if key.lower() == str(name).lower():
            return shape
    return None


def smollm2_shape(n_layer: int = 30) -> ModelShape:
    """SmolLM2-135M-Instruct (the cpu profile's teacher), or its first ``n_layer`` layers."""
    return KNOWN_SHAPES["HuggingFaceTB/SmolLM2-135M-Instruct"].pruned(n_layer) if n_layer != 30 \
        else KNOWN_SHAPES["HuggingFaceTB/SmolLM2-135M-Instruct"]


# ----------------------------------------------------------------------------- the plan

STUDENT_MODES = ("full", "lora", "qlora")
TEACHER_MODES = ("online", "cached", "none")
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "8bit", "4bit")
TASKS = ("train", "teacher_inference")


@dataclass
class MemoryPlan:
    """Everything that decides the peak of one training (or teacher-inference) process.

    ``task="train"``: a student training step (with the teacher online, cached or absent).
    ``task="teacher_inference"``: the teacher alone, no gradients (building the teacher
    cache, or teacher generation); student fields are then ignored.
    Sizes are per process and per micro-batch; ``seq_len`` is the padded length.
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
    teacher_mode: str = "online"  # online | cached | none
    teacher_dtype: str = "float32"  # float32 | bfloat16 | float16 | 8bit | 4bit
    teacher_compute_dtype: str = "float32"  # dtype of a quantised teacher's matmuls
    cache_topk: int = 32
    cache_positions: int = 0  # response positions of the data set held by a teacher cache
    # data
    batch_size: int = 8
    seq_len: int = 512
    response_fraction: float = 0.2
    response_only: bool = True  # logits only at response positions (train.response_logits)
    pretrain_batch: int = 0  # pre-train term blocks per step (0 = no pre-train term)
    pretrain_seq_len: int = 0
    loss: str = "plain"  # plain | lean (train.loss_chunk_size > 0)
    attn_impl: str = "sdpa"  # sdpa | eager
    keep_hidden_states: bool = True  # output_hidden_states=True, as response_logits calls it
    framework_bytes: Optional[int] = None  # measured baseline (default: see estimate)
    cpu_allocator_overhead: Optional[float] = None  # None: CPU_ALLOCATOR_OVERHEAD
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
        one_of("loss", self.loss, ("plain", "lean"))
        one_of("attn_impl", self.attn_impl, ("sdpa", "eager"))
        if self.task == "train" and self.student is None:
            raise ValueError("MemoryPlan: task 'train' needs a student shape")
        if self.task == "teacher_inference" and self.teacher is None:
            raise ValueError("MemoryPlan: task 'teacher_inference' needs a teacher shape")
        if self.task == "train" and self.teacher_mode != "none" and self.teacher is None:
            raise ValueError("MemoryPlan: teacher_mode online/cached needs a teacher shape "
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
    phase of the step that peaks, "phases": {phase: total}, "plan": dict, "notes": [...]}.

    The components sum to the total. A training step is split in three phases whose
    transient terms are never alive together: "forward" (student activations, its logits
    and the loss's forward intermediates, the online teacher's forward and logits),
    "backward" (activations, the loss's backward intermediates, gradients) and "step"
    (gradients and AdamW's foreach temporaries); persistent terms (framework, weights,
    optimizer states, teacher cache) count in all three. The peak is the largest phase.
    """
    plan.validate()
    persistent: dict[str, float] = {"framework": _framework(plan)}
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
        fwd = {"teacher_activations": _inference_activations(t, tokens, cb, plan.keep_hidden_states),
               "teacher_logits": n_logit * t.vocab * 4.0 * INFERENCE_LOGIT_COPIES}
        if plan.teacher_dtype in ("4bit", "8bit"):
            fwd["quant_workspace"] = _largest_linear(t) * cb
        return _finish(plan, persistent, {"forward": fwd}, notes)

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
    elif plan.teacher_mode == "cached":
        positions = plan.cache_positions or n_resp
        persistent["teacher_cache"] = positions * plan.cache_topk * 8.0 \
            + (n_resp + pt_tokens) * plan.cache_topk * 12.0
        if plan.device == "cuda":
            notes.append("teacher_cache is host (CPU) memory except the per-batch rows")
    return _finish(plan, persistent, {"forward": fwd, "backward": bwd, "step": step}, notes)


def _largest_linear(shape: ModelShape) -> int:
    return max(a * b for _, a, b in shape.linear_shapes())


def _inference_activations(shape: ModelShape, tokens: int, cb: float, keep_hidden: bool) -> float:
    """No-grad forward: the kept hidden states ((L+1)·h per token when output_hidden_states)
    plus one block's live intermediates (gate, up, silu, product or fc/gelu + residual)."""
    kept = (shape.n_layer + 1) * shape.hidden if keep_hidden else 2 * shape.hidden
    live = (3 * shape.intermediate if shape.gated else 2 * shape.intermediate) + 4 * shape.hidden
    return tokens * (kept + live) * cb


def _finish(plan: MemoryPlan, persistent: dict, phases: dict, notes: list) -> dict:
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

    if plan["task"] == "teacher_inference":
        return (f"teacher inference: {shape_name(plan['teacher'])} {plan['teacher_dtype']}, "
                f"batch {plan['batch_size']} × seq {plan['seq_len']}, {plan['device']}")
    teacher = "no teacher" if plan["teacher_mode"] == "none" or not plan["teacher"] else \
        f"teacher {shape_name(plan['teacher'])} {plan['teacher_dtype']} {plan['teacher_mode']}"
    gc = ", grad ckpt" if plan["gradient_checkpointing"] else ""
    return (f"student {shape_name(plan['student'])} {plan['student_mode']} {plan['student_dtype']}"
            f"{gc}; {teacher}; batch {plan['batch_size']} × seq {plan['seq_len']}, "
            f"response {plan['response_fraction']:.0%}, {plan['loss']} loss, {plan['device']}")


def format_plan(est: Mapping, budget_bytes: Optional[float] = None) -> str:
    """A Markdown table of the breakdown (GiB and share), the total and, with a budget,
    whether it fits: what notebook 3 prints before loading anything."""
    comps, total = est["components"], est["total"]
    lines = [_describe(est["plan"]), "", "| component | GiB | share |", "|---|---:|---:|"]
    for name, value in sorted(comps.items(), key=lambda kv: -kv[1]):
        share = value / total if total else 0.0
        lines.append(f"| {name} | {_gib(value)} | {share:.0%} |")
    lines.append(f"| **total (peak)** | **{_gib(total)}** | 100% |")
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


def suggest_fixes(plan: MemoryPlan, budget_bytes: Optional[float] = None) -> list[dict]:
    """Single changes to ``plan`` that lower its peak, largest saving first.

    Each entry: {"change": what to do (with the params key), "saving": bytes, "total":
    bytes after the change, "fits": bool or None}. Batch and sequence length are lowered by
    halving until the plan fits (or to 1 / 64).
    """
    base = estimate(plan)["total"]
    trials: list[tuple[str, MemoryPlan]] = []
    is_train = plan.task == "train"
    if is_train and plan.teacher_mode == "online":
        trials.append(("cache the teacher (train.teacher_mode=cache)", replace(plan, teacher_mode="cached")))
    if plan.teacher is not None and plan.teacher_dtype != "4bit" and \
            (plan.task == "teacher_inference" or plan.teacher_mode == "online"):
        trials.append(("use teacher 4bit (teacher.quantization=4bit)",
                       replace(plan, teacher_dtype="4bit",
                               teacher_compute_dtype="bfloat16" if plan.device == "cuda" else "float32")))
    if is_train and not plan.gradient_checkpointing:
        trials.append(("gradient checkpointing (student.gradient_checkpointing=true)",
                       replace(plan, gradient_checkpointing=True)))
    if is_train and plan.student_mode == "full":
        trials.append(("LoRA student (student.lora=true)", replace(plan, student_mode="lora")))
        trials.append(("QLoRA student (student.lora=true, student.quantization=4bit)",
                       replace(plan, student_mode="qlora",
                               student_dtype="bfloat16" if plan.device == "cuda" else plan.student_dtype)))
    elif is_train and plan.student_mode == "lora":
        trials.append(("QLoRA student (student.quantization=4bit)", replace(plan, student_mode="qlora")))
    if is_train and plan.loss == "plain":
        trials.append(("lean loss (train.loss_chunk_size=256)", replace(plan, loss="lean")))
    if not plan.response_only:
        trials.append(("logits at response positions only", replace(plan, response_only=True)))
    if is_train and plan.pretrain_batch:
        trials.append(("no pre-train term (train.lm_coef=0)", replace(plan, pretrain_batch=0,
                                                                      pretrain_seq_len=0)))
    # halving batch / sequence until it fits
    batch_key = "train.batch_size" if is_train else "eval.batch_size (the cache build's batch)"
    for attr, floor, key in (("batch_size", 1, batch_key), ("seq_len", 64, "data.max_length")):
        value = getattr(plan, attr)
        while value > floor:
            value = max(floor, value // 2)
            cand = replace(plan, **{attr: value})
            if budget_bytes is None or estimate(cand)["total"] <= budget_bytes or value == floor:
                label = f"batch {value} ({key}={value})" if attr == "batch_size" else \
                    f"sequence length {value} ({key}={value})"
                trials.append((label, cand))
                break
    out = []
    for label, cand in trials:
        total = estimate(cand)["total"]
        if total < base:
            out.append({"change": label, "saving": base - total, "total": total,
                        "fits": None if budget_bytes is None else total <= budget_bytes})
    return sorted(out, key=lambda d: -d["saving"])


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


# ----------------------------------------------------------------------------- presets

#: The colab pairs: a 4-bit teacher and a QLoRA student on one 16 GB GPU (T4: fp16).
PRESETS: dict[str, dict] = {
    "colab-qwen2.5-14b-7b": dict(
        teacher="Qwen/Qwen2.5-14B-Instruct", student="Qwen/Qwen2.5-7B-Instruct",
        teacher_dtype="4bit", teacher_compute_dtype="float16", student_mode="qlora",
        student_dtype="float16", teacher_mode="cached", gradient_checkpointing=True,
        batch_size=4, seq_len=512, response_fraction=0.5, loss="lean", device="cuda",
        lora_r=16),
    "colab-llama2-13b-7b": dict(
        teacher="meta-llama/Llama-2-13b-hf", student="meta-llama/Llama-2-7b-hf",
        teacher_dtype="4bit", teacher_compute_dtype="float16", student_mode="qlora",
        student_dtype="float16", teacher_mode="cached", gradient_checkpointing=True,
        batch_size=4, seq_len=512, response_fraction=0.5, loss="lean", device="cuda",
        lora_r=16),
}


def preset_plan(name: str, **overrides) -> MemoryPlan:
    """A :data:`PRESETS` plan with field overrides, e.g.
    ``preset_plan("colab-qwen2.5-14b-7b", teacher_mode="online")``."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    fields = dict(PRESETS[name], **overrides)
    fields["teacher"] = known_shape(fields["teacher"]) if isinstance(fields["teacher"], str) else fields["teacher"]
    fields["student"] = known_shape(fields["student"]) if isinstance(fields["student"], str) else fields["student"]
    fields.setdefault("label", name)
    return MemoryPlan(**fields).validate()


# ----------------------------------------------------------------------------- from params

_TOKENIZER_VOCAB = {"smollm2": 49152, "gpt2": 50257}


def _vocab_of(run_config) -> Optional[int]:
    tok = run_config.tokenizer
    if tok.kind == "bpe_local":
        return int(tok.vocab_size)
    return _TOKENIZER_VOCAB.get(tok.kind)


def _read_local_config(path: Path) -> Optional[ModelShape]:
    """config.json of a saved model (or of the base of a saved LoRA adapter)."""
    for cand in (path / "config.json", path / "base" / "config.json"):
        if cand.is_file():
            from transformers import AutoConfig
            return ModelShape.from_hf_config(AutoConfig.from_pretrained(str(cand.parent)),
                                             name=path.name)
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
    shape = known_shape(name)
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
        if mcfg.arch == "gpt2":
            shape = ModelShape(n_layer=mcfg.n_layer, hidden=h, intermediate=4 * h, n_head=mcfg.n_head,
                               n_kv_head=mcfg.n_head, vocab=vocab, tied=True, arch="gpt2",
                               max_positions=512, name=f"tiny-gpt2 {mcfg.n_layer}L×{h}")
        else:
            shape = ModelShape(n_layer=mcfg.n_layer, hidden=h, intermediate=4 * h, n_head=mcfg.n_head,
                               n_kv_head=mcfg.n_head, vocab=vocab, tied=True,
                               name=f"tiny-llama {mcfg.n_layer}L×{h}")
    elif mcfg.source == "smollm2":
        shape = smollm2_shape()
    else:
        shape = _shape_of_name(mcfg.name_or_path)
        if shape is None:
            raise MemoryPlanError(
                f"{role}.name_or_path: cannot read the shape of {mcfg.name_or_path!r} without "
                f"downloading it (not a local folder with config.json, not in the hub cache, not "
                f"in memory.KNOWN_SHAPES); pass shapes={{'{role}': ModelShape(...)}} or "
                f"ModelShape.from_params(...)")
    if mcfg.prune_to:
        shape = shape.pruned(mcfg.prune_to)
    return shape


def plan_from_config(run_config, device_budget: Optional[float] = None, *, device: Optional[str] = None,
                     seq_len: Optional[int] = None, response_fraction: Optional[float] = None,
                     shapes: Optional[Mapping[str, ModelShape]] = None) -> MemoryPlan:
    """A :class:`MemoryPlan` for a :class:`dpkd_lib.config.RunConfig`, without loading weights.

    Shapes come from ``shapes`` (override), tiny-model params, SmolLM2's known config, a
    local folder's config.json, :data:`KNOWN_SHAPES`, or a config already in the hub cache.
    The sequence length defaults to ``data.max_length`` (a batch pads to its longest row, so
    this is the worst case) and the response fraction to 0.5 (≈ 0.2 on the synthetic set; a
    Dolly response is often half the sequence). With ``device_budget`` (bytes) the plan is
    also checked and :class:`MemoryPlanError` raised when it does not fit.
    """
    shapes = dict(shapes or {})
    t = run_config.train
    vocab = _vocab_of(run_config)
    student = shapes.get("student") or _shape_of_model(run_config.student, vocab, "student")
    if vocab is None:
        vocab = student.vocab
    uses_teacher = run_config.teacher is not None and t.objective != "sft"
    teacher = None
    if uses_teacher:
        teacher = shapes.get("teacher") or _shape_of_model(run_config.teacher, vocab, "teacher")
    if device is None:
        try:
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:  # pragma: no cover
            device = "cpu"
    s = run_config.student
    quantized = s.quantization in ("4bit", "8bit")
    mode = "qlora" if (s.lora and quantized) else ("lora" if s.lora else "full")
    T = int(seq_len or run_config.data.max_length)
    frac = float(response_fraction if response_fraction is not None else 0.5)
    pretrain = t.lm_coef > 0 and run_config.data.pretrain_source != "none"
    fields: dict[str, Any] = dict(
        student=student, teacher=teacher, device=device, student_mode=mode,
        student_dtype=s.dtype, lora_r=s.lora_r, lora_dropout=s.lora_dropout,
        gradient_checkpointing=s.gradient_checkpointing,
        autocast_dtype=t.autocast_dtype, batch_size=t.batch_size, seq_len=T,
        response_fraction=frac, loss="lean" if t.loss_chunk_size > 0 else "plain",
        pretrain_batch=t.batch_size if pretrain else 0,
        pretrain_seq_len=run_config.data.pretrain_block_size if pretrain else 0,
        cache_topk=t.cache_topk, label=run_config.output_dir)
    if teacher is None:
        fields["teacher_mode"] = "none"
    else:
        tq = run_config.teacher.quantization
        fields["teacher_mode"] = "cached" if t.teacher_mode == "cache" else "online"
        fields["teacher_dtype"] = tq if tq in ("4bit", "8bit") else run_config.teacher.dtype
        fields["teacher_compute_dtype"] = run_config.teacher.dtype
        fields["cache_positions"] = int(run_config.data.n_train * T * frac)
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
    if plan.task != "train" or plan.teacher_mode != "cached" or plan.teacher is None:
        return None
    return replace(plan, task="teacher_inference", teacher_mode="online",
                   batch_size=batch_size or plan.batch_size, label=f"{plan.label} (cache build)")


# ----------------------------------------------------------------------------- measuring

def cpu_baseline_bytes(modules=("torch", "transformers", "peft", "accelerate")) -> int:
    """Peak RSS of a fresh interpreter that only imports ``modules`` (the CPU framework
    overhead of a plan on this machine)."""
    code = ("import resource, " + ", ".join(modules) +
            "; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=_child_env())
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["TQDM_DISABLE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


#: Defaults of a workload spec (a JSON-able dict that maps 1:1 to a MemoryPlan and to code
#: that runs it): model "tiny" (llama, the sizes below) or "smollm2" (n_layer of 30).
WORKLOAD_DEFAULTS = dict(task="train", model="tiny", n_layer=2, hidden=64, n_head=4, vocab=1024,
                         mode="full", teacher=None, teacher_n_layer=30, teacher_dtype="float32",
                         batch=8, seq=128, response_fraction=0.2, loss="plain", steps=2,
                         threads=1, lora_r=16, lora_dropout=0.05, gradient_checkpointing=False)


def _spec(spec: Mapping) -> dict:
    unknown = set(spec) - set(WORKLOAD_DEFAULTS) - {"name"}
    if unknown:
        raise ValueError(f"unknown workload keys {sorted(unknown)}")
    return dict(WORKLOAD_DEFAULTS, **spec)


def _workload_shape(spec: Mapping, which: str) -> ModelShape:
    if which == "teacher":
        return smollm2_shape(spec["teacher_n_layer"])
    if spec["model"] == "smollm2":
        return smollm2_shape(spec["n_layer"])
    h = spec["hidden"]
    return ModelShape(n_layer=spec["n_layer"], hidden=h, intermediate=4 * h, n_head=spec["n_head"],
                      n_kv_head=spec["n_head"], vocab=spec["vocab"], tied=True,
                      name=f"tiny {spec['n_layer']}L×{h}")


def plan_for_workload(spec: Mapping, framework_bytes: Optional[int] = None,
                      device: str = "cpu") -> MemoryPlan:
    """The :class:`MemoryPlan` that :func:`run_workload` runs for ``spec``."""
    s = _spec(spec)
    if s["task"] == "teacher_inference":
        return MemoryPlan(teacher=_workload_shape(s, "teacher"), task="teacher_inference",
                          teacher_dtype=s["teacher_dtype"], teacher_compute_dtype="float32",
                          batch_size=s["batch"], seq_len=s["seq"], device=device,
                          response_fraction=s["response_fraction"], framework_bytes=framework_bytes,
                          label=s.get("name", "")).validate()
    teacher = _workload_shape(s, "teacher") if s["teacher"] else None
    return MemoryPlan(student=_workload_shape(s, "student"), teacher=teacher,
                      teacher_mode=s["teacher"] or "none", teacher_dtype=s["teacher_dtype"],
                      student_mode=s["mode"], lora_r=s["lora_r"], lora_dropout=s["lora_dropout"],
                      gradient_checkpointing=s["gradient_checkpointing"], batch_size=s["batch"],
                      seq_len=s["seq"], response_fraction=s["response_fraction"], loss=s["loss"],
                      device=device, framework_bytes=framework_bytes,
                      label=s.get("name", "")).validate()


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process, after releasing freed
    heap pages, so the peak that follows belongs to the workload, not to model loading."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # noqa: BLE001 - not glibc: RSS may just stay a little higher
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _synthetic_batch(spec: Mapping, vocab: int, device) -> dict:
    """B×T random token ids; the last ``response_fraction`` of each row is the response."""
    import torch
    g = torch.Generator().manual_seed(0)
    B, T = spec["batch"], spec["seq"]
    ids = torch.randint(3, vocab, (B, T), generator=g)
    labels = ids.clone()
    n_resp = max(1, round(T * spec["response_fraction"]))
    labels[:, : T - n_resp] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device), "ids": [str(i) for i in range(B)]}


def run_workload(spec: Mapping) -> dict:
    """Build and run ``spec`` in this process (meant for a fresh subprocess: see
    :func:`measure_workload`) and return its measured peak.

    CPU: peak RSS (VmHWM) after the models are built and the counter reset, so loading
    transients (a 30-layer model loaded to cut a 6-layer student out of it) do not count.
    CUDA: ``torch.cuda.max_memory_allocated`` over the steps. ``import_rss`` is the RSS right
    after the imports: the plan's CPU framework overhead.
    """
    s = _spec(spec)
    import torch
    import transformers  # noqa: F401
    import peft  # noqa: F401
    import accelerate  # noqa: F401
    from . import losses, models
    from .config import TrainConfig
    from .objectives import OnlineTeacher, TopK, step_loss
    from .train import param_groups
    import_rss = _rss_now()
    torch.set_num_threads(int(s["threads"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def smollm2(n_layer):
        cache = models.SMOLLM2_CACHE
        full = models.load_smollm2(dtype="float32", cache_dir=cache)
        return full if n_layer == 30 else models.prune_layers(full, n_layer)

    def build_student():
        if s["model"] == "smollm2":
            m = smollm2(s["n_layer"])
        else:
            m = models.tiny_model("llama", s["vocab"], n_layer=s["n_layer"], n_embd=s["hidden"],
                                  n_head=s["n_head"], max_positions=max(512, s["seq"]), seed=0)
        if s["mode"] == "qlora":
            m = models.quantize_in_memory(m, "4bit", dtype="float32")
        if s["gradient_checkpointing"]:
            models.enable_gradient_checkpointing(m)
        if s["mode"] in ("lora", "qlora"):
            m = models.apply_lora(m, r=s["lora_r"], alpha=2 * s["lora_r"], dropout=s["lora_dropout"])
        return m

    def build_teacher():
        t = smollm2(s["teacher_n_layer"])
        if s["teacher_dtype"] in ("4bit", "8bit"):
            t = models.quantize_in_memory(t, s["teacher_dtype"], dtype="float32")
        return models.freeze(t)

    import gc
    result: dict[str, Any] = {"import_rss": import_rss, "device": str(device)}
    vocab = s["vocab"] if s["model"] == "tiny" else 49152
    if s["task"] == "teacher_inference":
        vocab = 49152
        teacher = build_teacher().to(device) if s["teacher_dtype"] not in ("4bit", "8bit") else build_teacher()
        batch = _synthetic_batch(s, vocab, device)
        gc.collect()
        result["loaded_rss"] = _rss_now()
        result["reset_ok"] = _reset_peak()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            for _ in range(s["steps"]):
                logits = OnlineTeacher(teacher).response(batch)
                top = (logits[0].float() / 1.0).log_softmax(-1).topk(32, dim=-1)
                del logits, top
    else:
        teacher = build_teacher() if s["teacher"] == "online" else None
        student = build_student().to(device)
        if teacher is not None and s["teacher_dtype"] not in ("4bit", "8bit"):
            teacher = teacher.to(device)
        student.train()
        opt = torch.optim.AdamW(param_groups(student, 0.01), lr=1e-5)
        batch = _synthetic_batch(s, vocab, device)
        chunk = 256 if s["loss"] == "lean" else None
        topk = None
        if s["teacher"] == "cached":
            with torch.no_grad():
                g = torch.Generator().manual_seed(1)
                n = int((batch["labels"][:, 1:] != -100).sum())
                topk = (torch.randint(0, vocab, (1, n, 32), generator=g).to(device),
                        torch.randn(1, n, 32, generator=g).log_softmax(-1).to(device))
        gc.collect()
        result["loaded_rss"] = _rss_now()
        result["reset_ok"] = _reset_peak()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # the training step itself (objectives.step_loss, no pre-train term), released mix
        tcfg = TrainConfig(objective="dpkd_token", lm_coef=0.0, loss_chunk_size=chunk or 0,
                           teacher_mode="online" if teacher is not None else "cache",
                           cache_format="topk" if topk is not None else "hidden")

        class _TopK:  # a cache stand-in: the same top-k signal at every step
            def response(self, batch):
                return TopK(*topk)

        signal = OnlineTeacher(teacher) if teacher is not None else (_TopK() if topk is not None else None)
        if signal is None:
            tcfg = TrainConfig(objective="sft", lm_coef=0.0, loss_chunk_size=chunk or 0)
        for _ in range(s["steps"]):
            loss = step_loss(tcfg, student, signal, batch).total
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
    if device.type == "cuda":
        result["peak"] = int(torch.cuda.max_memory_allocated())
        result["peak_kind"] = "cuda_max_memory_allocated"
    else:
        result["peak"] = _vm_hwm()
        result["peak_kind"] = "cpu_vm_hwm_after_load" if result["reset_ok"] else "cpu_ru_maxrss"
    return result


def measure_workload(spec: Mapping, timeout: float = 900,
                     mmap_threshold: Optional[int] = None) -> dict:
    """Run ``spec`` in a fresh interpreter; return {"measured": peak bytes, "predicted":
    plan total, "rel_error": (pred − meas)/meas, "components": ..., "spec": ...}.

    On CPU the prediction uses the subprocess's own import-time RSS as the framework term;
    on CUDA the CUDA context is left out of both sides (max_memory_allocated does not see it).
    ``mmap_threshold`` (bytes) runs the child with glibc's MALLOC_MMAP_THRESHOLD_ fixed, which
    removes heap fragmentation; the prediction then has no allocator-overhead term.
    """
    s = _spec(spec)
    cmd = [sys.executable, "-m", "dpkd_lib.memory", "--run-workload", json.dumps(s)]
    env = _child_env()
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(mmap_threshold))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(Path(__file__).resolve().parent.parent))
    if proc.returncode != 0:
        raise RuntimeError(f"workload {s.get('name', '')} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    cuda = res["peak_kind"].startswith("cuda")
    plan = plan_for_workload(s, framework_bytes=0 if cuda else res["import_rss"],
                             device="cuda" if cuda else "cpu")
    if mmap_threshold:
        plan.cpu_allocator_overhead = 0.0
    est = estimate(plan)
    return {"name": s.get("name", ""), "spec": s, "measured": res["peak"],
            "predicted": est["total"], "rel_error": (est["total"] - res["peak"]) / res["peak"],
            "components": est["components"], "peak_kind": res["peak_kind"],
            "import_rss": res["import_rss"], "loaded_rss": res["loaded_rss"],
            "mmap_threshold": mmap_threshold}


def _main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m dpkd_lib.memory",
                                     description="memory planner: print a preset's plan, or run "
                                                 "one calibration workload (internal)")
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--budget-gib", type=float, default=None)
    parser.add_argument("--run-workload", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_workload:
        print(json.dumps(run_workload(json.loads(args.run_workload))))
        return 0
    if args.preset:
        est = estimate(preset_plan(args.preset))
        budget = args.budget_gib * GiB if args.budget_gib else None
        print(format_plan(est, budget))
        if budget:
            try:
                check_fits(est, budget)
            except MemoryPlanError as err:
                print(err)
                return 1
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
