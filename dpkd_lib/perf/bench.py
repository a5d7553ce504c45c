"""`make bench`: side-by-side measurements of the study's performance work (issue 4).

``python -m dpkd_lib.perf.bench --mode full|quick [--out results/bench]`` writes
``summary.json`` (every figure, the raw per-size numbers and the machine's facts) and
``summary.md`` (figure, value, target, met?).

Why side by side: the reference box has 2 cores shared with other jobs, so absolute times
drift by tens of percent from minute to minute. Every comparison (plain vs lean loss,
online vs cached teacher, batched vs one-at-a-time generation) therefore runs in one process
on the same inputs, its two sides interleaved repeat by repeat (A B A B ...), and the
figure is a ratio of medians. Nothing is tuned to meet a target: a missed target is
reported as missed.

Figures (keys of summary.json):

* ``dpkd_loss_peak_mem_ratio`` / ``dpkd_loss_speed_ratio``: lean (``chunk_size``) vs plain
  ``losses.dpkd_token_loss`` forward+backward on [8, 512, V] logits with ~20 % response
  positions, V in {1k, 32k, 50k} (the 50k value under the key). Peak memory is what the loss
  itself allocates: on CUDA ``max_memory_allocated`` above the inputs; on CPU, which has no
  allocator statistics, :class:`LiveTensorPeak` follows every tensor storage the loss's
  forward and backward create (a TorchDispatchMode with weak references) and keeps the peak
  of their live bytes: exact, deterministic, and blind to the inputs.
* ``teacher_cache_speedup``: training-step time with the online teacher / with the top-k
  cache, SmolLM2-135M (30 layers) teacher and its 6-layer student, batch 8 of the synthetic
  set, the cpu profile's step (train.py's code: response logits, 0.5·CE + 0.5·DPKD with the
  reward statistics, the pre-train term on 8 pydoc blocks of 64 tokens with the teacher's
  full logits or its cached top-k, clipping, AdamW). The one-off cache build is timed
  separately (``teacher_cache_build_s``). ``teacher_cache_speedup_cap`` = 1 + (the teacher's
  forward for the step's batch and pre-train blocks) / (the cached student step), measured
  in the same interleaved loop: no cache can beat it, since the student's step remains.
* ``teacher_cache_loss_rel_error``: worst per-batch |cached − exact| / exact DPKD loss at
  k = 32, with the cache built by ``teacher_cache.compute_signals``; per k in
  {1, 4, 8, 32, 128} in ``teacher_cache_rel_error_by_k``, with how often the student's
  greedy token falls outside the cached top-k (the only source of the deviation).
* ``generation_batched_speedup``: new tokens/s, greedy, KV cache, batch 16 (left padded,
  sorted by length) / one prompt at a time, with min_new_tokens = max_new_tokens so both
  sides produce the same number of tokens; at 64 new tokens (quick) or 128 (full: the cpu
  profile's eval length; 32 is reported too).
* ``train_tokens_per_s`` (non-padding tokens per second of the cached-teacher step) and
  ``mfu``: model FLOPs per second / measured fp32 matmul FLOP/s (torch.matmul on
  1024-2048 squares, same threads). Model FLOPs = 6·(non-embedding params)·(padded tokens)
  + 6·hidden·vocab·(response tokens): the head runs on response positions only. The plain
  6·N·tokens figure is ``mfu_6N``.
* ``dpkd_seq_step_s`` / ``dpkd_seq_step_s_k4``: mean DPKD-seq training step (the
  student's sampling and the teacher's scoring of its samples included) through
  ``train.train`` on the same pair, with the student's samples drawn every step
  (``train.rejected_every`` 1) or every 4 steps in one batch (4).
* ``memory_planner_max_rel_error``: worst |predicted − measured| / measured peak over the
  planner's calibration workloads (fresh subprocess each; see dpkd_lib/gpu/calibrate.py).
* The exact teacher cache on disk (issue 26; ``--only cache_disk`` runs this stage alone
  into ``cache_disk.{json,md}``), 10 KB per position as a 13-14B teacher's fp16 hidden
  state: ``teacher_cache_read_ms_per_step`` (one batch's rows read from the file, page cache
  warm; cold reads in the details) against ``teacher_cache_read_ms_per_step_in_memory`` (the
  same rows from the cache held in memory, as before), interleaved;
  ``teacher_cache_peak_rss_ratio_4x``: peak RSS of DPKD-token training from a cache 4× larger
  over that from the smaller one, each in a fresh process (the in-memory form's beside it);
  ``teacher_cache_size_over_memory_limit``: the 4× cache's size over the address-space limit
  (RLIMIT_AS) under which it was built and trained from (> 1: larger than the limit; NaN if
  it failed). See :func:`bench_cache_disk`.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Optional, Sequence

# Shared 2-core boxes: with OpenMP's default (active) waiting, torch's 2 threads spin while
# other jobs hold a core, and a student step measured 5-10x slower at 2 threads than at 1
# (forward 2.0 s vs 0.43 s, AdamW step 3.0 s vs 0.3 s, load average ~3). Passive waiting
# removes that pathology for both sides of every comparison. It is read when the OpenMP
# runtime loads (at `import torch`), so it only takes effect under `python -m
# dpkd_lib.perf.bench`; an explicit setting wins. Recorded in the machine facts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from .. import losses
from ..data import left_pad
from ..io import atomic_write_text, read_jsonl, write_json
from ..gpu.calibrate import calibrate

OUT_DIR = Path("results/bench")
REPO_ROOT = Path(__file__).resolve().parents[2]

#: key -> (target text, predicate on the value); keys without a target have predicate None.
TARGETS: dict[str, tuple[str, Optional[Callable[[float], bool]]]] = {
    "dpkd_loss_peak_mem_ratio": ("≤ 0.5", lambda v: v <= 0.5),
    "dpkd_loss_speed_ratio": ("≥ 1.2", lambda v: v >= 1.2),
    "teacher_cache_speedup": ("≥ 2", lambda v: v >= 2.0),
    "teacher_cache_speedup_cap": ("—", None),
    "teacher_cache_loss_rel_error": ("≤ 1e-3", lambda v: v <= 1e-3),
    "generation_batched_speedup": ("≥ 5", lambda v: v >= 5.0),
    "reference_nll_speedup": ("—", None),
    "train_tokens_per_s": ("—", None),
    "mfu": ("—", None),
    "dpkd_seq_step_s": ("—", None),
    "dpkd_seq_step_s_k4": ("—", None),
    "memory_planner_max_rel_error": ("≤ 0.2", lambda v: v <= 0.2),
    "teacher_cache_read_ms_per_step": ("—", None),
    "teacher_cache_read_ms_per_step_in_memory": ("—", None),
    "teacher_cache_peak_rss_ratio_4x": ("≤ 1.05", lambda v: v <= 1.05),
    "teacher_cache_size_over_memory_limit": ("> 1", lambda v: v > 1.0),
}
KEYS = tuple(TARGETS)

#: sizes per mode. quick must finish in ≤ 5 min on the 2-core reference box.
#: "tiny" runs every stage on tiny random models in seconds (tests use it; its numbers mean
#: nothing).
MODES: dict[str, dict[str, Any]] = {
    "quick": dict(vocabs=(1000, 32000, 50000), loss_BT=(8, 512), loss_repeats=3,
                  cache_batches=3, step_repeats=3, gen_prompts=16, gen_new_tokens=(64,),
                  gen_repeats=1, matmul_sizes=(1024, 2048), matmul_repeats=3, planner="quick",
                  pair="cpu", seq_steps=4, seq_new_tokens=32, nll_examples=64,
                  cache_rows=30_000, cache_steps=8, cache_repeats=20, cache_memory_rss=True,
                  eval_prompts=150, eval_repeats=1),
    "full": dict(vocabs=(1000, 32000, 50000), loss_BT=(8, 512), loss_repeats=7,
                 cache_batches=12, step_repeats=8, gen_prompts=32, gen_new_tokens=(32, 128),
                 gen_repeats=2, matmul_sizes=(1024, 1536, 2048), matmul_repeats=7,
                 planner="full", pair="cpu", seq_steps=8, seq_new_tokens=64, nll_examples=200,
                 cache_rows=50_000, cache_steps=16, cache_repeats=40, cache_memory_rss=True,
                 eval_prompts=150, eval_repeats=3),
    "tiny": dict(vocabs=(64, 256), loss_BT=(2, 32), loss_repeats=1, cache_batches=2,
                 step_repeats=1, gen_prompts=4, gen_new_tokens=(4,), gen_repeats=1,
                 matmul_sizes=(64, 128), matmul_repeats=1, planner="tiny", pair="tiny",
                 seq_steps=4, seq_new_tokens=4, nll_examples=8,
                 cache_rows=2_000, cache_steps=2, cache_repeats=3, cache_memory_rss=False,
                 eval_prompts=6, eval_repeats=1),
}
K_VALUES = (1, 4, 8, 32, 128)


# ----------------------------------------------------------------------------- helpers

def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _progress(iterable, desc: str, enabled: bool, total: Optional[int] = None):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, disable=not enabled, total=total, leave=False)


def machine_facts(threads: int) -> dict:
    """What a reader needs to compare these numbers with theirs."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    facts = {"cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads,
             "torch_version": torch.__version__, "python": platform.python_version(),
             "platform": platform.platform(), "device": str(_device())}
    try:
        import transformers
        facts["transformers_version"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    facts["load_average_at_start"] = _loadavg()
    facts["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
    return facts


def _loadavg() -> Optional[list]:
    """1/5/15-minute load averages: above the core count, other jobs were competing for
    the CPU during the measurement (times then inflate, ratios get noisier)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def interleaved_medians(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                        device: Optional[torch.device] = None) -> dict:
    """Time each callable ``repeats`` times, the callables interleaved within each repeat
    (so drift from other jobs hits every side alike); returns {name: {"median_s", "times_s"}}."""
    device = device or _device()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(v), "min_s": min(v), "times_s": v}
            for name, v in times.items()}


class LiveTensorPeak:
    """Peak bytes of the tensor storages created inside the ``with`` block and still alive.

    CPU torch keeps no allocator statistics, and process RSS also sees the interpreter,
    allocator caching and other threads. This context manager intercepts every ATen call
    (forward and the autograd backward, which runs the ops in this thread on CPU), registers
    each output storage that is not one of the call's inputs' storages (so views and in-place
    results of pre-existing tensors — the inputs, the weights — do not count), and drops it
    when its weak reference expires. ``peak`` is the largest sum of live bytes seen.
    Tensors created by a kernel internally (scratch buffers) are not seen; on CUDA prefer
    ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._sweep()
                inputs = {t.untyped_storage().data_ptr()
                          for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
                for t in tree_leaves(out):
                    if not isinstance(t, torch.Tensor):
                        continue
                    st = t.untyped_storage()
                    key = st.data_ptr()
                    if key in inputs or key in tracker._live or st.nbytes() == 0:
                        continue
                    tracker._live[key] = (StorageWeakRef(st), st.nbytes())
                    tracker.current += st.nbytes()
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self._mode = _Mode()
        self._live: dict[int, tuple[Any, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current -= self._live.pop(k)[1]

    def __enter__(self) -> "LiveTensorPeak":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def measure_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes that ``fn`` allocates above what is live when it starts (CUDA allocator
    statistics; :class:`LiveTensorPeak` on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    with LiveTensorPeak() as tracker:
        fn()
    return int(tracker.peak)


# ----------------------------------------------------------------------------- 1. the loss

def loss_inputs(B: int, T: int, V: int, response_fraction: float = 0.2, seed: int = 0,
                device: Optional[torch.device] = None):
    """[B, T, V] student logits (requires grad) and teacher logits (no grad) correlated like
    a student and its teacher, and labels with one response span per row covering about
    ``response_fraction`` of the positions (−100 elsewhere). Built in place: no temporaries."""
    device = device or _device()
    g = torch.Generator(device="cpu").manual_seed(seed)
    student = torch.empty(B, T, V, device=device)
    teacher = torch.empty(B, T, V, device=device)
    student.normal_(0.0, 2.0, generator=g) if device.type == "cpu" else student.normal_(0.0, 2.0)
    teacher.normal_(0.0, 1.0, generator=g) if device.type == "cpu" else teacher.normal_(0.0, 1.0)
    teacher.add_(student, alpha=0.8)
    labels = torch.full((B, T), losses.IGNORE_INDEX, dtype=torch.long)
    for b in range(B):
        frac = response_fraction * (0.5 + torch.rand(1, generator=g).item())
        n = max(1, min(T, round(T * frac)))
        start = int(torch.randint(0, T - n + 1, (1,), generator=g))
        labels[b, start:start + n] = torch.randint(0, V, (n,), generator=g)
    student.requires_grad_(True)
    return student, teacher, labels.to(device)


def bench_loss(vocabs: Sequence[int] = (1000, 32000, 50000), B: int = 8, T: int = 512,
               response_fraction: float = 0.2, chunk_size: int = 256, repeats: int = 3,
               progress: bool = True, device: Optional[torch.device] = None) -> dict:
    """Plain vs lean ``dpkd_token_loss`` forward+backward: peak memory, time, agreement."""
    device = device or _device()
    per_v = {}
    for V in _progress(vocabs, "loss: V", progress):
        s, t, labels = loss_inputs(B, T, V, response_fraction, device=device)
        runs = {}

        def run(chunk):
            s.grad = None
            loss = losses.dpkd_token_loss(s, t, labels, chunk_size=chunk)
            loss.backward()
            return loss

        # one tracked run per side also gives the values and gradients to compare
        values, grads = {}, {}
        for name, chunk in (("plain", None), ("lean", chunk_size)):
            s.grad = None
            gc.collect()
            if device.type == "cuda":
                run(chunk)  # warm-up: cuBLAS workspaces etc. are not the loss's memory
                s.grad = None
            out = {}
            runs[name] = {"peak_bytes": measure_peak_bytes(lambda c=chunk: out.setdefault("l", run(c)),
                                                           device)}
            values[name] = out["l"].item()
            grads[name] = s.grad
            s.grad = None
        lp, ll = values["plain"], values["lean"]
        grad_diff = (grads["lean"] - grads["plain"]).abs().max().item()
        del grads
        timing = interleaved_medians({"plain": lambda: run(None), "lean": lambda: run(chunk_size)},
                                     repeats=repeats, warmup=0, device=device)
        s.grad = None
        unit = B * T * V * 4
        row = {"V": V, "B": B, "T": T, "response_positions": int((labels != -100).sum()),
               "plain_peak_bytes": runs["plain"]["peak_bytes"],
               "lean_peak_bytes": runs["lean"]["peak_bytes"],
               "plain_peak_in_BTV_fp32": runs["plain"]["peak_bytes"] / unit,
               "lean_peak_in_BTV_fp32": runs["lean"]["peak_bytes"] / unit,
               "peak_mem_ratio": runs["lean"]["peak_bytes"] / runs["plain"]["peak_bytes"],
               "plain_s": timing["plain"]["median_s"], "lean_s": timing["lean"]["median_s"],
               "plain_times_s": timing["plain"]["times_s"], "lean_times_s": timing["lean"]["times_s"],
               "speed_ratio": timing["plain"]["median_s"] / timing["lean"]["median_s"],
               "speed_ratio_of_minima": timing["plain"]["min_s"] / timing["lean"]["min_s"],
               "loss_plain": lp, "loss_lean": ll, "loss_abs_diff": abs(lp - ll),
               "grad_max_abs_diff": grad_diff}
        per_v[str(V)] = row
        del s, t, labels
        gc.collect()
    top = per_v[str(max(vocabs))]
    return {"per_vocab": per_v, "peak_mem_ratio": top["peak_mem_ratio"],
            "speed_ratio": top["speed_ratio"], "chunk_size": chunk_size,
            "response_fraction": response_fraction,
            "memory_method": "cuda max_memory_allocated" if device.type == "cuda"
            else "live tensor storages (LiveTensorPeak)"}


# ----------------------------------------------------------------------------- 2. matmul peak

def matmul_flops(sizes: Sequence[int] = (1024, 1536, 2048), repeats: int = 5,
                 device: Optional[torch.device] = None) -> dict:
    """fp32 torch.matmul FLOP/s on n×n squares (2n³ per product). The peak is the fastest
    repeat of the best size: the machine's capability, which other jobs on a shared box can
    only lower (the medians are kept too)."""
    device = device or _device()
    out = {}
    for n in sizes:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        inner = max(1, int(2e9 // (2 * n ** 3)))  # ~2 GFLOP per timed call

        def run():
            for _ in range(inner):
                torch.matmul(a, b)

        med = interleaved_medians({"mm": run}, repeats=repeats, warmup=1, device=device)["mm"]
        out[str(n)] = {"median_flops": inner * 2 * n ** 3 / med["median_s"],
                       "best_flops": inner * 2 * n ** 3 / min(med["times_s"])}
    return {"by_size": out, "peak_flops": max(v["best_flops"] for v in out.values()),
            "median_flops": max(v["median_flops"] for v in out.values())}


# ----------------------------------------------------------------------------- 3. cpu pair

#: where the cpu profile keeps its built pair (notebook 01); used when present
PROFILE_TEACHER = Path("results/cpu/runs/teacher/model")
PROFILE_STUDENT = Path("results/cpu/runs/student_init/model")


def load_cpu_pair(n_student_layers: int = 6, use_profile_models: bool = True):
    """The cpu profile's pair: its built teacher (LoRA-SFT SmolLM2, merged) and starting
    student (SFT'd first 6 layers) when notebook 01 has built them; otherwise the raw
    SmolLM2-135M-Instruct (30 layers) and its first ``n_student_layers`` layers. Both have the
    same cost; the loss-deviation figure depends on how close student and teacher are, so
    the summary records which pair ran. Returns (teacher, student, tokenizer, description)."""
    from .. import models, tokenization
    tokenizer = tokenization.smollm2_tokenizer()
    if use_profile_models and (PROFILE_TEACHER / "config.json").exists() and PROFILE_STUDENT.exists():
        teacher = models.freeze(models.load_saved(str(PROFILE_TEACHER), dtype="float32"))
        student = models.load_saved(str(PROFILE_STUDENT), dtype="float32")
        student.requires_grad_(True)
        return teacher, student, tokenizer, f"profile pair: {PROFILE_TEACHER} -> {PROFILE_STUDENT}"
    teacher = models.load_smollm2(dtype="float32", cache_dir=models.SMOLLM2_CACHE)
    student = models.prune_layers(teacher, n_student_layers)
    models.freeze(teacher)
    return teacher, student, tokenizer, (f"raw SmolLM2-135M-Instruct (30 layers) -> its first "
                                         f"{n_student_layers} layers, untrained")


def load_tiny_pair():
    """A tiny random Llama teacher (2 layers) and its first layer, with a small local BPE
    tokenizer: the same code paths as the cpu pair, in milliseconds (tests)."""
    from .. import models, tokenization
    tokenizer = tokenization.train_bpe_tokenizer(tokenization.default_corpus_texts(), vocab_size=384)
    teacher = models.tiny_model("llama", len(tokenizer), n_layer=2, n_embd=64, n_head=4, seed=1,
                                pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
    student = models.prune_layers(teacher, 1)
    models.freeze(teacher)
    return teacher, student, tokenizer, "tiny random llama 2L×64 -> its first layer"


def synthetic_examples(tokenizer, n: int, seed: int = 0, max_length: int = 384,
                       max_prompt: int = 256, split: str = "train") -> list[dict]:
    """Tokenised examples of the synthetic instruction set (the cpu profile's data)."""
    from .. import data as data_lib
    sizes = {"n_train": 0, "n_valid": 0, "n_test": 0, "n_heldout": 0}
    sizes[f"n_{split}"] = n
    records = data_lib.load_records("synthetic", seed=seed, **sizes)[split]
    examples, _ = data_lib.build_sft_dataset(records, tokenizer, max_length=max_length,
                                             max_prompt=max_prompt)
    return examples


def make_batches(examples: Sequence[dict], batch_size: int, n_batches: int, pad_id: int,
                 seed: int = 40) -> list[dict]:
    """Length-grouped batches, as train.py draws them."""
    from .. import data as data_lib
    order = data_lib.length_grouped_batches([len(e["input_ids"]) for e in examples], batch_size,
                                            seed=seed, drop_last=True)
    return [data_lib.collate_sft([examples[i] for i in idx], pad_id) for idx in order[:n_batches]]


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def bench_teacher_cache(teacher, student, batches: Sequence[dict], pad_id: int, *,
                        pretrain: Optional[torch.Tensor] = None,
                        k_values: Sequence[int] = K_VALUES, default_k: int = 32, repeats: int = 3,
                        progress: bool = True, device: Optional[torch.device] = None) -> dict:
    """Online vs cached teacher: step times (interleaved), cache build time, loss deviation
    by k, and the student's training throughput (from the cached steps).

    The step is train.Trainer.step_loss's for ``dpkd_token`` with the released runner's
    mixing: 0.5·CE + 0.5·DPKD on the response, and, with ``pretrain`` blocks ([n, L] token
    ids, the cpu profile's lm_coef term), 0.5·[0.5·CE + 0.5·H(p, q)] on ``batch_size`` blocks
    (online: the teacher's full logits; cached: its top-k, as train.py does)."""
    from .. import objectives as obj_lib
    from .. import teacher_cache as tc
    from .. import train as train_mod
    from ..config import TrainConfig
    device = device or _device()
    teacher.to(device)
    student.to(device)
    tcfg = TrainConfig(objective="dpkd_token")
    kd = tcfg.kd_ratio
    examples = []
    for b in batches:
        for row, ex_id in enumerate(b["ids"]):
            n = int(b["attention_mask"][row].sum())
            ids = b["input_ids"][row, :n].tolist()
            examples.append({"id": ex_id, "input_ids": ids, "labels": b["labels"][row, :n].tolist(),
                             "prompt_len": 0})
    kmax = max(max(k_values), default_k)
    _sync(device)
    t0 = time.perf_counter()
    cache = tc.compute_signals(teacher, examples, pad_id, kmax, batch_size=len(batches[0]["ids"]),
                               device=device, progress=False)
    _sync(device)
    build_s = time.perf_counter() - t0
    bs = len(batches[0]["ids"])
    pt_cache, pt_build_s = None, 0.0
    if pretrain is not None:
        blocks = [{"id": f"pt{i}", "input_ids": row.tolist(), "labels": row.tolist(), "prompt_len": 0}
                  for i, row in enumerate(pretrain)]
        _sync(device)
        t0 = time.perf_counter()
        pt_cache = tc.compute_signals(teacher, blocks, pad_id, default_k, batch_size=bs,
                                      device=device, progress=False)
        _sync(device)
        pt_build_s = time.perf_counter() - t0
    # the default, exact format: final hidden states + the teacher's head
    _sync(device)
    t0 = time.perf_counter()
    h_cache = tc.compute_signals(teacher, examples, pad_id, fmt="hidden", batch_size=bs,
                                 device=device, progress=False)
    h_pt_cache = None
    if pretrain is not None:
        h_pt_cache = tc.compute_signals(teacher, blocks, pad_id, fmt="hidden", batch_size=bs,
                                        device=device, progress=False)
    _sync(device)
    hidden_build_s = time.perf_counter() - t0

    def counts(batch):
        return (batch["labels"][:, 1:] != -100).sum(1).tolist()

    # loss deviation by k, on the untrained student (exact: full teacher logits)
    errors = {str(k): [] for k in k_values}
    missed = {str(k): [] for k in k_values}  # student argmax outside the cached top-k
    exact_losses, hidden_errors = [], []
    with torch.no_grad():
        for batch in _progress(batches, "cache: loss by k", progress):
            b = _to(batch, device)
            s_logits, labels = obj_lib.response_logits(student, b)
            t_logits, _ = obj_lib.response_logits(teacher, b)
            exact = losses.dpkd_token_loss(s_logits, t_logits, labels, beta=tcfg.beta).item()
            exact_losses.append(exact)
            t_hidden = h_cache.teacher_logits(batch["ids"], counts(batch), device)
            approx = losses.dpkd_token_loss(s_logits, t_hidden, labels, beta=tcfg.beta).item()
            hidden_errors.append(abs(approx - exact) / abs(exact))
            ids, logps = cache.gather(batch["ids"], counts(batch))
            for k in k_values:
                approx = losses.dpkd_token_loss_from_teacher_topk(
                    s_logits, labels, ids[..., :k].to(device), logps[..., :k].to(device),
                    beta=tcfg.beta).item()
                errors[str(k)].append(abs(approx - exact) / abs(exact))
                s_id = s_logits.argmax(-1, keepdim=True).cpu()
                missed[str(k)].append(float((ids[..., :k] != s_id).all(-1).float().mean()))
            del s_logits, t_logits

    # step timing: train.py's step for dpkd_token, online vs cached (both formats), and the
    # teacher's forward alone (the cap on the speed-up), interleaved
    opt = torch.optim.AdamW(train_mod.param_groups(student, tcfg.weight_decay), lr=1e-6)
    student.train()
    state = {"i": 0}

    teachers = {"online": obj_lib.OnlineTeacher(teacher),
                "hidden": obj_lib.CachedTeacher(h_cache, h_pt_cache, device=device),
                "topk": obj_lib.CachedTeacher(cache, pt_cache, device=device)}
    tcfgs = {"online": tcfg, "hidden": TrainConfig(objective="dpkd_token", teacher_mode="cache"),
             "topk": TrainConfig(objective="dpkd_token", teacher_mode="cache", cache_format="topk",
                                 cache_topk=default_k)}

    def step(mode: str):  # train.py's step: objectives.step_loss, then clip and AdamW
        batch = batches[state["i"] % len(batches)]
        pretrain_rows = None
        if pretrain is not None:
            rows = [(state["i"] * bs + j) % len(pretrain) for j in range(bs)]
            pretrain_rows = (pretrain[rows].to(device), [f"pt{r}" for r in rows])
        out = obj_lib.step_loss(tcfgs[mode], student, teachers[mode], _to(batch, device),
                                pretrain=pretrain_rows)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), tcfg.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def teacher_forward():  # what the online step adds: the teacher's signals for the batch
        batch = _to(batches[state["i"] % len(batches)], device)
        teachers["online"].response(batch)
        if pretrain is not None:
            rows = [(state["i"] * bs + j) % len(pretrain) for j in range(bs)]
            teachers["online"].pretrain(pretrain[rows].to(device), None)

    def advance(mode):
        def fn():
            step(mode)
            if mode == "hidden":
                state["i"] += 1  # every mode sees the same batch in each repeat
        return fn

    n_rep = max(repeats, 1)
    timing = interleaved_medians({"online": advance("online"), "topk": advance("topk"),
                                  "teacher_forward": teacher_forward, "hidden": advance("hidden")},
                                 repeats=n_rep, warmup=1, device=device)
    # throughput of the cached step over the batches it ran on
    used = [batches[i % len(batches)] for i in range(1, n_rep + 1)]
    real_tokens = statistics.mean(int(b["attention_mask"].sum()) for b in used)
    padded_tokens = statistics.mean(b["input_ids"].numel() for b in used)
    resp_tokens = statistics.mean(int((b["labels"][:, 1:] != -100).sum()) for b in used)
    if pretrain is not None:  # the pre-train blocks are real tokens with full logits
        pt_tokens = bs * pretrain.shape[1]
        real_tokens, padded_tokens = real_tokens + pt_tokens, padded_tokens + pt_tokens
        resp_tokens += bs * (pretrain.shape[1] - 1)
    online_s, cached_s = timing["online"]["median_s"], timing["topk"]["median_s"]
    per_batch_build = (build_s + pt_build_s) / len(batches)
    epochs = 30  # the released runner's epoch count
    hidden_s = timing["hidden"]["median_s"]
    teacher_s = timing["teacher_forward"]["median_s"]
    return {
        # headline figures: the default `hidden` format (exact); top-k figures beside them
        "speedup": online_s / hidden_s,
        # a cached step still runs the student's step: online / cached <= 1 + teacher / student
        "speedup_cap": 1 + teacher_s / hidden_s, "teacher_forward_s": teacher_s,
        "rel_error": max(hidden_errors),
        "format": "hidden",
        "hidden_step_s": hidden_s, "hidden_build_s": hidden_build_s,
        "topk_speedup": online_s / cached_s,
        "speedup_of_minima": timing["online"]["min_s"] / timing["topk"]["min_s"],
        "online_step_s": online_s, "cached_step_s": cached_s,
        "online_times_s": timing["online"]["times_s"], "cached_times_s": timing["topk"]["times_s"],
        "build_s": build_s, "build_s_per_batch": per_batch_build, "cache_k": kmax,
        "pretrain_build_s": pt_build_s, "pretrain_blocks": 0 if pretrain is None else len(pretrain),
        "speedup_30_epochs_incl_build": (epochs * online_s) / (epochs * cached_s + per_batch_build),
        "rel_error_by_k": {k: max(v) for k, v in errors.items()},
        "rel_error_mean_by_k": {k: statistics.mean(v) for k, v in errors.items()},
        "topk_rel_error": max(errors[str(default_k)]) if str(default_k) in errors else float("nan"),
        "student_argmax_outside_topk_by_k": {k: statistics.mean(v) for k, v in missed.items()},
        "default_k": default_k, "exact_losses": exact_losses, "n_batches": len(batches),
        "batch_size": len(batches[0]["ids"]),
        "tokens_per_step": real_tokens, "padded_tokens_per_step": padded_tokens,
        "response_tokens_per_step": resp_tokens,
        "train_tokens_per_s": real_tokens / hidden_s,
        "step_includes": ("0.5·CE + 0.5·DPKD on the response" + (
            f" + 0.5·[0.5·CE + 0.5·H(p,q)] on {bs} pre-train blocks of {pretrain.shape[1]} tokens"
            if pretrain is not None else "") + ", clip, AdamW; not logging or evaluation"),
    }


def model_flops_per_step(student, padded_tokens: float, response_tokens: float) -> dict:
    """6·(non-embedding params)·padded tokens + 6·hidden·vocab·response tokens (the head
    runs on response positions only, the embedding lookup is free); and the plain 6·N·T."""
    from ..models import count_parameters
    n_total = count_parameters(student)
    emb = student.get_input_embeddings().weight
    vocab, hidden = emb.shape
    head = student.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    n_nonemb = n_total - vocab * hidden - (0 if tied else vocab * hidden)
    return {"n_params": n_total, "n_nonembedding": n_nonemb,
            "flops": 6 * n_nonemb * padded_tokens + 6 * hidden * vocab * response_tokens,
            "flops_6N": 6 * n_total * padded_tokens}


# ----------------------------------------------------------------------------- 4. generation

def bench_generation(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32,
                     batch_size: int = 16, repeats: int = 1, progress: bool = True,
                     device: Optional[torch.device] = None) -> dict:
    """Greedy KV-cached decoding, batch ``batch_size`` (left padded, sorted by length, as
    evaluate.generate_ids does) vs one prompt at a time. min_new_tokens = max_new_tokens so
    both produce exactly len(prompts)·max_new_tokens tokens."""
    device = device or _device()
    model.to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                  use_cache=True, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                  num_beams=1)
    produced = {"batched": 0, "single": 0}

    def run(rows, key):
        ids, mask = left_pad(rows, pad, device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        produced[key] += (out.shape[1] - ids.shape[1]) * out.shape[0]

    def batched():
        for i in range(0, len(order), batch_size):
            run([encoded[j] for j in order[i:i + batch_size]], "batched")

    def single():
        for j in order:
            run([encoded[j]], "single")

    run([encoded[order[0]]], "single")  # warm-up
    produced["single"] = 0
    timing = interleaved_medians({"batched": batched, "single": single}, repeats=repeats,
                                 warmup=0, device=device)
    n_tokens = len(prompts) * max_new_tokens
    assert produced["batched"] == produced["single"] == n_tokens * repeats, produced
    tps_b = n_tokens / timing["batched"]["median_s"]
    tps_s = n_tokens / timing["single"]["median_s"]
    return {"speedup": tps_b / tps_s,
            "speedup_of_minima": timing["single"]["min_s"] / timing["batched"]["min_s"],
            "batched_tokens_per_s": tps_b, "single_tokens_per_s": tps_s,
            "batched_s": timing["batched"]["median_s"], "single_s": timing["single"]["median_s"],
            "n_prompts": len(prompts), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "prompt_tokens_mean": statistics.mean(len(e) for e in encoded)}


class _FullLogits(torch.nn.Module):
    """A model seen without its vocabulary head, so that `evaluate.teacher_forced_metrics`
    takes its generic path: logits at every position, prompt and padding included (what every
    model took before the head was applied to response positions only)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model(**kwargs)


def bench_reference_nll(model, examples: Sequence[dict], pad_id: int, *, repeats: int = 1,
                        batch_size: int = 16, device: Optional[torch.device] = None) -> dict:
    """The teacher-forced NLL every run computes on its valid, test and held-out references
    (`evaluate.reference_metrics`): now, length-sorted batches with the vocabulary head on
    response positions only, against before, batches in the examples' order with logits at
    every position. Same examples, same batch size, interleaved."""
    from .. import data as data_lib
    from .. import evaluate as ev
    device = device or _device()
    model.to(device).eval()

    def batches(groups):
        return [_to(data_lib.collate_sft([examples[i] for i in idx], pad_id), device) for idx in groups]
    as_given = batches([range(b, min(b + batch_size, len(examples))) for b in range(0, len(examples), batch_size)])
    by_length = batches(data_lib.sorted_batches(examples, batch_size))
    out = {}
    timing = interleaved_medians({
        "before": lambda: out.__setitem__("before", ev.teacher_forced_metrics(_FullLogits(model), as_given)),
        "now": lambda: out.__setitem__("now", ev.teacher_forced_metrics(model, by_length))},
        repeats=repeats, device=device)
    return {"speedup": timing["before"]["median_s"] / timing["now"]["median_s"],
            "before_s": timing["before"]["median_s"], "now_s": timing["now"]["median_s"],
            "nll_abs_diff": abs(out["before"]["nll"] - out["now"]["nll"]),
            "n_examples": len(examples), "n_tokens": out["now"]["n_tokens"], "batch_size": batch_size}


# ----------------------------------------------------------------------------- run + report

# ----------------------------------------------------------------------------- the cache on disk

class WideTeacher(torch.nn.Module):
    """A stand-in teacher for the disk-cache stage: its final hidden state is a fixed random
    embedding of each token (tanh), its head a random [V, H] matrix. What the stage measures
    is bytes per position, not the teacher: H = 2560 fp32 is 10 KB per position, what a
    13-14B teacher's fp16 hidden state (5120 × 2 bytes) takes."""

    def __init__(self, vocab: int, hidden: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, hidden, generator=g))
            self.head.weight.copy_(torch.randn(vocab, hidden, generator=g) / hidden ** 0.5)

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(hidden_states=(torch.tanh(self.embed(input_ids)),), logits=None)

    def get_output_embeddings(self):
        return self.head


def wide_examples(n_rows: int, *, vocab: int, prompt: int = 24, response: int = 128,
                  seed: int = 0) -> list[dict]:
    """Tokenised examples holding about ``n_rows`` response positions (lengths vary ±25 %)."""
    g = torch.Generator().manual_seed(seed)
    out, rows, i = [], 0, 0
    while rows < n_rows:
        r = int(response * (0.75 + 0.5 * torch.rand((), generator=g).item()))
        ids = torch.randint(3, vocab, (prompt + r,), generator=g).tolist()
        out.append({"id": f"w{i}", "input_ids": ids, "labels": [-100] * prompt + ids[prompt:],
                    "prompt_len": prompt})
        rows, i = rows + r - (1 if prompt == 0 else 0), i + 1
    return out


def _tiny_student(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, tie_word_embeddings=True))


def _vm() -> dict:
    """This process's VmSize / VmPeak / VmHWM (peak RSS) in bytes, from /proc."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmSize", "VmPeak", "VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def cache_child(spec: Mapping) -> dict:
    """One side of the disk-cache stage, in a fresh process (see `bench_cache_disk`):
    ``build`` the cache (``spec["folder"]``) and/or ``train`` ``steps`` DPKD-token steps
    (lean loss) of a tiny student from it, read by rows (``form: disk``) or loaded whole
    (``form: memory``, the cache before issue 26), optionally under an address-space limit
    of the process's size + ``headroom`` bytes (RLIMIT_AS, as ``prlimit --as``). Returns
    the limit, peak RSS (VmHWM), the cache's size, the steps done, or the error."""
    import resource

    from .. import objectives as obj_lib
    from .. import teacher_cache as tc
    from ..config import TrainConfig
    from ..data import collate_sft
    torch.set_num_threads(1)
    V, H = spec["vocab"], spec["hidden"]
    teacher, student = WideTeacher(V, H), _tiny_student(V)
    examples = wide_examples(spec["rows"], vocab=V)
    folder = Path(spec["folder"])
    out: dict[str, Any] = {"form": spec["form"], "rows": spec["rows"]}
    if spec.get("headroom"):
        limit = _vm()["VmSize"] + int(spec["headroom"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        out["limit"] = limit
    out["rss_before"] = _vm()["VmHWM"]
    try:
        if "build" in spec["actions"]:
            t0 = time.perf_counter()
            tc.build(folder, teacher, examples, 0, 0, meta={}, fmt="hidden", batch_size=8,
                     progress=False)
            out["build_s"] = time.perf_counter() - t0
            out["rss_after_build"] = _vm()["VmHWM"]
        out["cache_bytes"] = (folder / tc.SIGNALS).stat().st_size
        if "train" in spec["actions"]:
            if spec["form"] == "disk":
                cache = tc.TeacherCache.load(folder)
            else:
                cache = _in_memory(folder)
            t = TrainConfig(objective="dpkd_token", teacher_mode="cache", loss_chunk_size=256)
            teacher_sig = obj_lib.CachedTeacher(cache)
            opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
            g = torch.Generator().manual_seed(1)
            done = 0
            for _ in range(spec["steps"]):  # batches drawn over the whole cache
                idx = torch.randint(0, len(examples), (spec.get("batch", 8),), generator=g).tolist()
                batch = collate_sft([examples[i] for i in idx], 0)
                loss = obj_lib.step_loss(t, student, teacher_sig, batch).total
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                done += 1
            out["steps"] = done
            out["loss"] = float(loss)
    except (MemoryError, RuntimeError, OSError) as exc:  # what a memory limit raises
        out["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    out["peak_rss"] = _vm()["VmHWM"]
    out["vm_peak"] = _vm()["VmPeak"]
    return out


def _in_memory(folder: Path):
    """The cache as it was before issue 26: every tensor read into (heap) memory, as the
    in-process build left it and `safetensors.load_file` gave it back."""
    from .. import teacher_cache as tc
    info = json.loads((Path(folder) / tc.INDEX).read_text())
    f = tc.SignalFile(Path(folder) / tc.SIGNALS)
    tensors = {name: f.read(name) for name in f.where}
    f.close()
    return tc.TeacherCache(tensors, {k: tuple(v) for k, v in info["index"].items()}, info["format"])


def run_cache_child(spec: Mapping, timeout: float = 900) -> dict:
    """`cache_child` in a fresh interpreter (its own peak RSS and its own limits)."""
    import json as json_lib
    import subprocess
    code = ("import json, sys; from dpkd_lib.perf import bench; "
            "print(json.dumps(bench.cache_child(json.loads(sys.argv[1]))))")
    # glibc's dynamic mmap threshold puts large blocks, once freed, on the heap, which keeps
    # its address space: under the RLIMIT_AS of a limited child the build then peaked 1-4 MiB
    # under the limit and failed now and then (a CI run). A fixed 1 MiB threshold maps and
    # unmaps every large block, as calibrate.py's fixed-threshold workloads do: 56 MiB to spare,
    # the same on every run, and the whole cache in memory still fails under the same limit.
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="1048576",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code, json_lib.dumps(dict(spec))], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"cache child failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json_lib.loads(proc.stdout.strip().splitlines()[-1])


def _drop_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (clean pages: no root needed), so the
    next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_cache_disk(rows: int, *, vocab: int = 1024, hidden: int = 2560, steps: int = 8,
                     repeats: int = 20, memory_rss: bool = True, workdir: Optional[Path] = None,
                     progress: bool = True) -> dict:
    """The exact teacher cache on disk (issue 26) against the in-memory cache it replaced.

    * Read cost per step: the teacher signal of one training batch (8 examples, ~1000
      positions of 10 KB), `TeacherCache.teacher_hidden`, from the file by rows (page cache
      warm, and cold: the file's pages dropped before each read) and from the whole cache in
      memory, interleaved in this process on the same batches.
    * Peak RSS of DPKD-token training (``steps`` steps of a tiny student, batches over the
      whole cache) from caches of ``rows`` and 4 × ``rows`` positions, each in a fresh
      process: read by rows, and (``memory_rss``) loaded whole.
    * A build and training under a memory limit (RLIMIT_AS = the process's size after its
      imports + 256 MiB) of the 4× cache, which is larger than the limit; and the in-memory
      form under the same limit.
    """
    import tempfile

    from .. import teacher_cache as tc
    from ..data import collate_sft
    out: dict[str, Any] = {"rows": rows, "hidden": hidden, "vocab": vocab, "steps": steps,
                           "bytes_per_position": hidden * 4}
    with tempfile.TemporaryDirectory(prefix="dpkd-bench-cache-", dir=workdir) as tmp:
        folders = {"1x": Path(tmp) / "c1", "4x": Path(tmp) / "c4"}
        sizes = {"1x": rows, "4x": 4 * rows}
        base = {"vocab": vocab, "hidden": hidden, "steps": steps}
        # the 4x cache built under the limit, then the 1x one without
        limited = run_cache_child(dict(base, form="disk", rows=sizes["4x"], folder=str(folders["4x"]),
                                       actions=["build", "train"], headroom=256 * 2 ** 20))
        out["limited_build_and_train"] = limited
        tc.build(folders["1x"], WideTeacher(vocab, hidden), wide_examples(sizes["1x"], vocab=vocab), 0, 0,
                 meta={}, fmt="hidden", batch_size=8, progress=False)
        if memory_rss:  # the old form under the same limit
            out["limited_memory_form"] = run_cache_child(dict(
                base, form="memory", rows=sizes["4x"], folder=str(folders["4x"]), actions=["train"],
                headroom=256 * 2 ** 20))
        rss = {}
        for form in ("disk", "memory") if memory_rss else ("disk",):
            for size in ("1x", "4x"):
                res = run_cache_child(dict(base, form=form, rows=sizes[size], folder=str(folders[size]),
                                           actions=["train"]))
                rss[f"{form}_{size}"] = res
                if progress:
                    print(f"[bench cache] {form} {size}: peak RSS {res['peak_rss'] / 2**20:.0f} MiB",
                          file=sys.stderr)
        out["train_rss"] = rss
        out["cache_bytes"] = {size: (folders[size] / tc.SIGNALS).stat().st_size for size in folders}
        # read cost per step, disk (warm / cold) vs memory, interleaved, on the 4x cache
        disk = tc.TeacherCache.load(folders["4x"])
        memory = _in_memory(folders["4x"])
        examples = wide_examples(sizes["4x"], vocab=vocab)
        g = torch.Generator().manual_seed(2)
        batches = [collate_sft([examples[i] for i in torch.randint(0, len(examples), (8,), generator=g).tolist()], 0)
                   for _ in range(repeats + 1)]
        state = {"i": 0}

        def read(cache, cold=False):
            def fn():
                b = batches[state["i"] % len(batches)]
                if cold:
                    _drop_page_cache(folders["4x"] / tc.SIGNALS)
                cache.teacher_hidden(b["ids"], (b["labels"][:, 1:] != -100).sum(1).tolist())
            return fn

        def advance():
            state["i"] += 1
        # cold first (the file's pages dropped), then the same rows again from the page cache
        timing = interleaved_medians({"memory": read(memory), "disk_cold": read(disk, cold=True),
                                      "disk_warm": read(disk), "next": advance},
                                     repeats=repeats, warmup=1, device=torch.device("cpu"))
        positions = statistics.mean(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        disk.close()
        del memory
    out["read_s_per_step"] = {k: timing[k]["median_s"] for k in ("memory", "disk_warm", "disk_cold")}
    out["positions_per_step"] = positions
    out["bytes_per_step"] = positions * hidden * 4
    d1, d4 = rss["disk_1x"]["peak_rss"], rss["disk_4x"]["peak_rss"]
    out["peak_rss_ratio_4x"] = d4 / d1
    out["peak_rss_mib"] = {k: v["peak_rss"] / 2 ** 20 for k, v in rss.items()}
    ok = "error" not in limited and limited.get("steps") == steps
    out["size_over_limit"] = limited["cache_bytes"] / limited["limit"] if ok else float("nan")
    return out


def cache_disk_figures(res: Mapping) -> dict:
    """The disk-cache stage's summary keys."""
    return {"teacher_cache_read_ms_per_step": 1e3 * res["read_s_per_step"]["disk_warm"],
            "teacher_cache_read_ms_per_step_in_memory": 1e3 * res["read_s_per_step"]["memory"],
            "teacher_cache_peak_rss_ratio_4x": res["peak_rss_ratio_4x"],
            "teacher_cache_size_over_memory_limit": res["size_over_limit"]}


def cache_disk_markdown(res: Mapping) -> list[str]:
    """The stage's table: read cost per step and peak RSS by cache size, side by side."""
    if not res:
        return []
    rs, mib = res["read_s_per_step"], res["peak_rss_mib"]
    size = res["cache_bytes"]
    lines = ["", f"Teacher cache on disk (exact `hidden` format, {res['bytes_per_position'] / 1024:.0f} KB "
                 f"per position as a 13-14B teacher's fp16 hidden state; batch of 8 examples, "
                 f"{res['positions_per_step']:.0f} positions, {res['bytes_per_step'] / 2**20:.1f} MiB per step):", "",
             "| read per step | in memory (before) | file, page cache warm | file, cold (pages dropped) |",
             "|---|---:|---:|---:|",
             f"| ms | {1e3 * rs['memory']:.2f} | {1e3 * rs['disk_warm']:.2f} | {1e3 * rs['disk_cold']:.2f} |", "",
             f"| peak RSS of {res['steps']} DPKD-token steps (MiB) | cache {size['1x'] / 2**20:.0f} MiB | "
             f"cache {size['4x'] / 2**20:.0f} MiB |", "|---|---:|---:|"]
    for form in ("disk", "memory"):
        if f"{form}_1x" in mib:
            lines.append(f"| {'read by rows' if form == 'disk' else 'in memory (before)'} | "
                         f"{mib[form + '_1x']:.0f} | {mib[form + '_4x']:.0f} |")
    lim = res["limited_build_and_train"]
    lines += ["", f"Under RLIMIT_AS = {lim.get('limit', 0) / 2**20:.0f} MiB the {size['4x'] / 2**20:.0f} MiB "
                  f"cache was built and trained from: "
                  + (f"{lim['steps']} steps, peak RSS {lim['peak_rss'] / 2**20:.0f} MiB" if "steps" in lim
                     else f"failed ({lim.get('error')})")]
    old = res.get("limited_memory_form")
    if old:
        lines[-1] += f"; the in-memory form under the same limit: {old.get('error') or 'ran'}."
    return lines


def run_cache_disk(mode: str = "quick", out_dir: Path = OUT_DIR, progress: bool = True) -> dict:
    """The disk-cache stage alone (``--only cache_disk``): results/bench/cache_disk.{json,md}."""
    cfg = MODES[mode]
    res = bench_cache_disk(cfg["cache_rows"], steps=cfg["cache_steps"], repeats=cfg["cache_repeats"],
                           memory_rss=cfg["cache_memory_rss"], progress=progress)
    out = {"mode": mode, "machine": machine_facts(1), "details": {"teacher_cache_disk": res},
           **cache_disk_figures(res)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "cache_disk.json", out)
    atomic_write_text(out_dir / "cache_disk.md", "\n".join(
        [f"# `make bench`: the teacher cache on disk ({mode} mode)", ""]
        + [f"- `{k}`: {out[k]:.3g} (target {TARGETS[k][0]})" for k in cache_disk_figures(res)]
        + cache_disk_markdown(res)) + "\n")
    return out


def bench_eval(teacher, student, tokenizer, *, n_prompts: int = 150, max_new_tokens: int = 64,
               repeats: int = 1, device: Optional[torch.device] = None, progress: bool = True) -> dict:
    """One run's final evaluation as the cpu profile makes it, on the test and held-out
    references (``n_prompts`` each; greedy answers at batch ``n_prompts`` with
    ``max_new_tokens``; teacher-forced NLL and KL(teacher ‖ student) at batch 16), its
    teacher-forced readouts three ways, interleaved: ``before`` (the work the code of the
    default study's record did, made with today's functions: a student pass for the NLL, then
    a second one beside the teacher's for the KL), ``online`` (one student pass, the teacher
    beside it) and ``cached`` (one student pass, the teacher's hidden states read from the
    evaluation cache; its one-off build is ``cache_build_s``). Greedy decoding is timed once
    for scale. ``rows_equal``: the three give the same per-prompt rows, bit for bit (that the
    old code gave them too is checked on the committed record: docs/results.md §7)."""
    import tempfile

    from .. import data as data_lib
    from .. import evaluate as ev
    device = device or _device()
    teacher.to(device).eval()
    student.to(device).eval()
    records = data_lib.load_records("synthetic", seed=0, n_train=0, n_valid=0, n_test=n_prompts,
                                    n_heldout=n_prompts)
    splits = {name: records[name][:n_prompts] for name in ("test", "heldout")}
    data_cfg = SimpleNamespace(max_length=384, max_prompt=256)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        def cached():
            return ev.ReferenceTeacher(lambda: teacher, identity={"bench": "eval"}, cache_dir=cache_dir,
                                       progress=False)

        def before():
            for name, recs in splits.items():
                nll = ev.reference_metrics(student, tokenizer, recs, data_cfg)   # the NLL pass, then the KL pass
                kl = ev.reference_metrics(student, tokenizer, recs, data_cfg, teacher=teacher)
                out[f"before_{name}"] = [dict(r, **{k: kl["per_example"][i][k] for k in ("kl", "kl_sum")})
                                         for i, r in enumerate(nll["per_example"])]

        def way(label, make):
            def run():   # one teacher for both splits, closed after them, as evaluate_splits does
                teacher_of_run = make()
                try:
                    for name, recs in splits.items():
                        out[f"{label}_{name}"] = ev.reference_metrics(student, tokenizer, recs, data_cfg,
                                                                      teacher=teacher_of_run)["per_example"]
                finally:
                    if isinstance(teacher_of_run, ev.ReferenceTeacher):
                        teacher_of_run.close()
            return run

        t0 = time.perf_counter()
        way("cached", cached)()   # builds the cache: the first run's one-off cost
        build_s = time.perf_counter() - t0
        timing = interleaved_medians({"before": before, "online": way("online", lambda: teacher),
                                      "cached": way("cached", cached)}, repeats=repeats, warmup=0,
                                     device=device)
    t0 = time.perf_counter()
    tokens = []
    for name, recs in splits.items():
        examples = [{"id": r["id"], "prompt": data_lib.format_prompt(r), "references": [r["response"]]}
                    for r in recs]
        _, gen = ev.evaluate_generations(student, tokenizer, examples, batch_size=n_prompts,
                                         max_new_tokens=max_new_tokens, seeds=(0,), do_sample=False,
                                         progress=progress)
        tokens.append(gen["response_tokens"])
    greedy_s = time.perf_counter() - t0
    med = {k: v["median_s"] for k, v in timing.items()}
    return {"before_s": med["before"], "online_s": med["online"], "cached_s": med["cached"],
            "cache_build_s": build_s, "greedy_s": greedy_s, "greedy_response_tokens": tokens,
            "speedup": med["before"] / med["cached"], "saved_s": med["before"] - med["cached"],
            "rows_equal": all(out[f"before_{n}"] == out[f"online_{n}"] == out[f"cached_{n}"] for n in splits),
            "n_prompts": n_prompts, "max_new_tokens": max_new_tokens, "times": timing}


def run_eval(mode: str = "quick", out_dir: Path = OUT_DIR, progress: bool = True,
             threads: Optional[int] = None) -> dict:
    """The evaluation stage alone (``--only eval``): results/bench/eval.{json,md}."""
    cfg = MODES[mode]
    threads = int(threads or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    teacher, student, tokenizer, pair_desc = load_cpu_pair() if cfg["pair"] == "cpu" else load_tiny_pair()
    res = bench_eval(teacher, student, tokenizer, n_prompts=cfg["eval_prompts"], repeats=cfg["eval_repeats"],
                     progress=progress)
    out = {"mode": mode, "machine": machine_facts(threads), "pair": pair_desc, "details": {"eval": res},
           "eval_teacher_forced_speedup": res["speedup"]}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "eval.json", out)
    atomic_write_text(out_dir / "eval.md", "\n".join([
        f"# `make bench`: one run's final evaluation ({mode} mode, {threads} threads)", "",
        f"{pair_desc}; test and held-out, {res['n_prompts']} prompts each. Teacher-forced NLL and "
        f"KL(teacher || student), median of {cfg['eval_repeats']}, interleaved:", "",
        "| readouts | s |", "|---|---:|",
        f"| before: NLL pass, then KL pass beside the teacher | {res['before_s']:.1f} |",
        f"| one student pass, the teacher beside it | {res['online_s']:.1f} |",
        f"| one student pass, the teacher read from the cache | {res['cached_s']:.1f} |",
        f"| (once per study) the cache's build | {res['cache_build_s']:.1f} |",
        f"| for scale: greedy answers, {res['max_new_tokens']} new tokens at most | {res['greedy_s']:.1f} |", "",
        f"- `eval_teacher_forced_speedup`: {res['speedup']:.2f}x ({res['saved_s']:.0f} s a run saved)",
        f"- the three give the same per-prompt rows, bit for bit: {res['rows_equal']}"]) + "\n")
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def format_markdown(summary: Mapping) -> str:
    """The table the README shows: figure, value, target, met?"""
    facts = summary.get("machine", {})
    lines = [f"# `make bench` ({summary.get('mode', '?')} mode)", "",
             f"{facts.get('cpu_model', '?')}, {facts.get('torch_threads', '?')} torch threads, "
             f"torch {facts.get('torch_version', '?')}, device {facts.get('device', '?')}; "
             f"wall time {summary.get('wall_time_s', float('nan')):.0f} s; load average at start "
             f"{facts.get('load_average_at_start')}, after each stage "
             f"{summary.get('load_average_after_stage', {})} (above {facts.get('cpu_count')}: "
             f"other jobs shared the CPU); OMP_WAIT_POLICY={facts.get('omp_wait_policy') or 'default'}.",
             "",
             "| figure | value | target | met? |", "|---|---:|---|---|"]
    for key in KEYS:
        value = summary.get(key)
        target, ok = TARGETS[key]
        if not _finite(value):
            shown, met = "n/a", "—"
        else:
            shown = f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
            met = "—" if ok is None else ("yes" if ok(value) else "**no**")
        lines.append(f"| `{key}` | {shown} | {target} | {met} |")
    loss = summary.get("details", {}).get("loss", {}).get("per_vocab", {})
    if loss:
        first = next(iter(loss.values()))
        lines += ["", f"DPKD loss, lean (chunk_size={summary['details']['loss'].get('chunk_size')}) vs "
                      f"plain, B×T = {first['B']}×{first['T']}, ~20 % response positions, "
                      f"forward+backward:", "",
                  "| V | plain peak MiB | lean peak MiB | mem ratio | plain s | lean s | speed ratio |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for v, r in loss.items():
            lines.append(f"| {v} | {r['plain_peak_bytes'] / 2**20:.0f} | {r['lean_peak_bytes'] / 2**20:.0f}"
                         f" | {r['peak_mem_ratio']:.3f} | {r['plain_s']:.3f} | {r['lean_s']:.3f}"
                         f" | {r['speed_ratio']:.2f} |")
    lines += cache_disk_markdown(summary.get("details", {}).get("teacher_cache_disk", {}))
    cache = summary.get("details", {}).get("teacher_cache", {})
    if cache.get("rel_error_by_k"):
        ks = sorted(cache["rel_error_by_k"], key=int)
        lines += ["", "Teacher cache: DPKD loss |cached − exact| / exact (worst batch) by k:", "",
                  "| k | " + " | ".join(ks) + " |", "|---|" + "---:|" * len(ks),
                  "| rel. error | " + " | ".join(f"{cache['rel_error_by_k'][k]:.2e}" for k in ks) + " |"]
        outside = cache.get("student_argmax_outside_topk_by_k")
        if outside:
            lines.append("| student argmax outside top-k | "
                         + " | ".join(f"{outside[k]:.1%}" for k in ks) + " |")
        lines += ["", f"Steps: online {cache['online_step_s']:.2f} s, cached {cache['cached_step_s']:.2f} s "
                      f"(median of {len(cache['online_times_s'])}); one-off cache build "
                      f"{cache['build_s']:.1f} s for {cache['n_batches']} batches"
                      f" + {cache.get('pretrain_build_s', 0.0):.1f} s for "
                      f"{cache.get('pretrain_blocks', 0)} pre-train blocks; over 30 epochs "
                      f"incl. the build: {cache['speedup_30_epochs_incl_build']:.2f}×."]
    planner = summary.get("details", {}).get("planner", {})
    if planner.get("workloads"):
        lines += ["", "Memory planner, predicted vs measured peak (MiB):", "",
                  "| workload | measured | predicted | rel. error |", "|---|---:|---:|---:|"]
        for r in planner["workloads"] + planner.get("fixed_mmap_threshold", []):
            name = r["name"] + (" (MALLOC_MMAP_THRESHOLD_=1MiB)" if r.get("mmap_threshold") else "")
            lines.append(f"| {name} | {r['measured'] / 2**20:.0f} | {r['predicted'] / 2**20:.0f} "
                         f"| {r['rel_error']:+.1%} |")
    for note in summary.get("notes", []):
        lines += ["", f"- {note}"]
    return "\n".join(lines) + "\n"


def explain(summary: Mapping) -> list[str]:
    """Facts from the measurements that explain each figure (printed under the table)."""
    notes = []
    d = summary.get("details", {})
    if summary.get("mode") == "tiny":
        notes.append("tiny mode: tiny random models, numbers carry no meaning")
    loss = d.get("loss", {}).get("per_vocab", {})
    if loss:
        top = loss[max(loss, key=int)]
        notes.append(
            f"loss memory: at V={top['V']} the plain path peaks at {top['plain_peak_in_BTV_fp32']:.2f} "
            f"and the lean one at {top['lean_peak_in_BTV_fp32']:.2f} [B,T,V] fp32 tensors above the "
            f"inputs. The gradient of the [B,T,V] student logits (1 tensor) is unavoidable; in the "
            f"lean path the boolean-index backward (new_zeros + out-of-place index_put) builds a "
            f"second one. Max |lean − plain|: loss {max(r['loss_abs_diff'] for r in loss.values()):.1e}, "
            f"grad {max(r['grad_max_abs_diff'] for r in loss.values()):.1e}.")
    cache = d.get("teacher_cache", {})
    if cache:
        out = cache.get("student_argmax_outside_topk_by_k", {})
        k = str(cache.get("default_k", 32))
        notes.append(
            f"teacher cache ({summary.get('cpu_pair', '')}): the headline figures are the default "
            f"`hidden` format (final hidden states + the teacher's head: exact, loss rel. error "
            f"{cache.get('rel_error', float('nan')):.1e}). The compact `topk` format (k={k}): "
            f"speed-up {cache.get('topk_speedup', float('nan')):.2f}, loss rel. error "
            f"{cache.get('topk_rel_error', float('nan')):.3g}; the student's greedy token is outside "
            f"the teacher's top-{k} at {out.get(k, float('nan')):.1%} of response positions, where "
            f"log p(s) is replaced by its upper bound (exact at k = V).")
        notes.append(
            f"teacher-cache steps: online {cache['online_step_s']:.2f} s vs hidden-cache "
            f"{cache['hidden_step_s']:.2f} s vs top-k cache {cache['cached_step_s']:.2f} s (medians); "
            f"the speed-up is bounded by 1 + (teacher forward) / (student step) = "
            f"1 + {cache['teacher_forward_s']:.2f} / {cache['hidden_step_s']:.2f} = "
            f"{cache['speedup_cap']:.2f} here. Step = {cache['step_includes']}.")
    gen = d.get("generation", {})
    if gen:
        notes.append(
            f"generation: {gen['n_prompts']} prompts (mean {gen['prompt_tokens_mean']:.0f} tokens) × "
            f"{gen['max_new_tokens']} new tokens: {gen['single_tokens_per_s']:.0f} tok/s one at a time, "
            f"{gen['batched_tokens_per_s']:.0f} tok/s at batch {gen['batch_size']} (ratio of the "
            f"fastest repeats {gen.get('speedup_of_minima', float('nan')):.2f}).")
    nll = d.get("reference_nll", {})
    if nll:
        notes.append(
            f"reference NLL: {nll['n_examples']} valid references ({nll['n_tokens']} response tokens), "
            f"batch {nll['batch_size']}: {nll['before_s']:.2f} s with logits at every position in "
            f"the examples' order, {nll['now_s']:.2f} s length-sorted with the head on response "
            f"positions only (|ΔNLL| {nll['nll_abs_diff']:.1e}).")
    seq = d.get("dpkd_seq", {})
    if seq:
        notes.append(
            f"DPKD-seq ({seq['pair']} pair, batch {seq['batch_size']}, {seq['seq_max_new_tokens']} "
            f"sampled tokens, {seq['steps']} steps of train.train): {seq['k1']['step_s']:.2f} s per "
            f"step sampling every step, {seq['k4']['step_s']:.2f} s sampling every 4 steps in one "
            f"batch ({seq['speedup_k4']:.2f}×).")
    planner = d.get("planner", {})
    if planner.get("workloads"):
        notes.append(f"planner: worst workload {planner['worst']}.")
    return notes


def write_outputs(summary: Mapping, out_dir: Path = OUT_DIR) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "summary.json", out_dir / "summary.md"
    write_json(js, summary)
    atomic_write_text(md, format_markdown(summary))
    return js, md


def bench_dpkd_seq(pair: str, steps: int, new_tokens: int, threads: int) -> dict:
    """DPKD-seq's training step, sampling included, through ``train.train`` itself: the cpu
    pair (SmolLM2 teacher, its first 6 layers as the student, the cpu profile's params) or
    tiny models (the smoke profile's), ``steps`` steps of batch 8, once with the student's
    samples drawn every step (``train.rejected_every`` 1) and once every 4 steps in one batch
    ("batch on-policy", k = 4). Times are the run's own per-step ``time_s`` (metrics.jsonl);
    the two runs follow each other (not interleaved) and share the teacher's samples."""
    import tempfile

    from .. import config as config_lib
    from .. import train as train_mod
    base = "params/cpu/base_train.yaml" if pair == "cpu" else "params/smoke/base_train.yaml"
    teacher = {"source": "smollm2"} if pair == "cpu" else {"source": "tiny", "arch": "gpt2", "seed": 1}
    batch = 8 if pair == "cpu" else 4
    out: dict[str, Any] = {"pair": pair, "params": base, "steps": steps, "batch_size": batch,
                           "seq_max_new_tokens": new_tokens}
    with tempfile.TemporaryDirectory(prefix="dpkd-bench-seq-") as tmp:
        for k in (1, 4):
            data = config_lib.merge(config_lib.load_yaml(REPO_ROOT / base), {
                "output_dir": f"{tmp}/k{k}", "cache_dir": f"{tmp}/cache", "threads": threads,
                "teacher": teacher,
                "data": {"n_train": steps * batch, "n_valid": 8, "n_test": 0, "n_heldout": 0},
                "train": {"objective": "dpkd_seq", "max_steps": steps, "batch_size": batch,
                          "rejected_every": k, "seq_max_new_tokens": new_tokens},
                "eval": {"splits": []}})
            train_mod.train(config_lib.from_dict(data), progress=False)
            times = [row["time_s"] for row in read_jsonl(Path(tmp) / f"k{k}" / "metrics.jsonl")]
            out[f"k{k}"] = {"step_s": statistics.mean(times), "times_s": times}
    out["speedup_k4"] = out["k1"]["step_s"] / out["k4"]["step_s"]
    return out


def run(mode: str = "quick", out_dir: Path = OUT_DIR, progress: bool = True,
        threads: Optional[int] = None) -> dict:
    """Every benchmark of ``mode``, in order; writes the summary after each stage (partial
    results survive a crash) and returns it."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    from .. import data as data_lib
    cfg = MODES[mode]
    threads = int(threads or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    device = _device()
    started = time.time()
    summary: dict[str, Any] = {"mode": mode, "machine": machine_facts(threads), "details": {},
                               "notes": [], "load_average_after_stage": {}}

    def stage_done(name: str) -> None:
        summary["load_average_after_stage"][name] = _loadavg()
        write_outputs(dict(summary, wall_time_s=time.time() - started), out_dir)
        if progress:
            print(f"[bench {mode}] {name} done at {time.time() - started:.0f} s", file=sys.stderr)

    # 1. the DPKD loss, lean vs plain
    B, T = cfg["loss_BT"]
    res = bench_loss(cfg["vocabs"], B=B, T=T, repeats=cfg["loss_repeats"], progress=progress,
                     device=device)
    summary["details"]["loss"] = res
    summary["dpkd_loss_peak_mem_ratio"] = res["peak_mem_ratio"]
    summary["dpkd_loss_speed_ratio"] = res["speed_ratio"]
    summary["dpkd_loss_peak_mem_ratio_by_vocab"] = {v: r["peak_mem_ratio"] for v, r in res["per_vocab"].items()}
    summary["dpkd_loss_speed_ratio_by_vocab"] = {v: r["speed_ratio"] for v, r in res["per_vocab"].items()}
    stage_done("loss")

    # 2. the machine's matmul peak (the MFU denominator)
    res = matmul_flops(cfg["matmul_sizes"], repeats=cfg["matmul_repeats"], device=device)
    summary["details"]["matmul"] = res
    summary["matmul_peak_flops"] = res["peak_flops"]
    stage_done("matmul")

    # 3. the teacher cache: online vs cached steps, the cap, loss deviation by k, throughput
    teacher, student, tokenizer, pair_desc = load_cpu_pair() if cfg["pair"] == "cpu" else load_tiny_pair()
    summary["cpu_pair"] = pair_desc
    pad = tokenizer.pad_token_id
    examples = synthetic_examples(tokenizer, 400 if cfg["pair"] == "cpu" else 40)
    pretrain = data_lib.pretrain_blocks(data_lib.pydoc_corpus(), tokenizer, 64,
                                        max_blocks=8 * cfg["cache_batches"])
    batches = make_batches(examples, 8, cfg["cache_batches"], pad)
    res = bench_teacher_cache(teacher, student, batches, pad, pretrain=pretrain,
                              repeats=cfg["step_repeats"], progress=progress, device=device)
    summary["details"]["teacher_cache"] = res
    summary["teacher_cache_speedup"] = res["speedup"]
    summary["teacher_cache_speedup_cap"] = res["speedup_cap"]
    summary["teacher_cache_loss_rel_error"] = res["rel_error"]
    summary["teacher_cache_rel_error_by_k"] = res["rel_error_by_k"]
    summary["teacher_cache_build_s"] = res["build_s"]
    summary["train_tokens_per_s"] = res["train_tokens_per_s"]
    fl = model_flops_per_step(student, res["padded_tokens_per_step"], res["response_tokens_per_step"])
    summary["details"]["flops"] = fl
    summary["mfu"] = fl["flops"] / res["cached_step_s"] / summary["matmul_peak_flops"]
    summary["mfu_6N"] = (6 * fl["n_params"] * res["tokens_per_step"] / res["cached_step_s"]
                         / summary["matmul_peak_flops"])
    del teacher
    gc.collect()
    stage_done("cache")

    # 4. batched vs one-at-a-time generation (the student); the key is the longest length:
    # the cpu profile evaluates with 128 new tokens, and the shared prefill weighs less the
    # longer the answers
    sizes = {"n_train": 0, "n_valid": 0, "n_test": cfg["gen_prompts"], "n_heldout": 0}
    records = data_lib.load_records("synthetic", seed=1, **sizes)["test"]
    prompts = [data_lib.format_prompt(r) for r in records][: cfg["gen_prompts"]]
    by_len = {str(n): bench_generation(student, tokenizer, prompts, max_new_tokens=n,
                                       repeats=cfg["gen_repeats"], progress=progress, device=device)
              for n in cfg["gen_new_tokens"]}
    res = dict(by_len[str(max(cfg["gen_new_tokens"]))], by_new_tokens=by_len)
    summary["details"]["generation"] = res
    summary["generation_batched_speedup"] = res["speedup"]
    summary["generation_batched_speedup_by_new_tokens"] = {k: v["speedup"] for k, v in by_len.items()}
    stage_done("generation")

    # 5. the teacher-forced NLL of the references (every run's valid/test/held-out metric)
    res = bench_reference_nll(student, synthetic_examples(tokenizer, cfg["nll_examples"], split="valid"),
                              pad, repeats=cfg["gen_repeats"], device=device)
    summary["details"]["reference_nll"] = res
    summary["reference_nll_speedup"] = res["speedup"]
    del student
    gc.collect()
    stage_done("reference_nll")

    # 6. DPKD-seq's step (sampling included): rejected_every 1 vs 4
    res = bench_dpkd_seq(cfg["pair"], cfg["seq_steps"], cfg["seq_new_tokens"], threads)
    summary["details"]["dpkd_seq"] = res
    summary["dpkd_seq_step_s"] = res["k1"]["step_s"]
    summary["dpkd_seq_step_s_k4"] = res["k4"]["step_s"]
    stage_done("dpkd_seq")

    # 7. the exact teacher cache on disk: read cost per step, peak RSS by cache size, a build
    # under a memory limit smaller than the cache (fresh subprocesses)
    res = bench_cache_disk(cfg["cache_rows"], steps=cfg["cache_steps"], repeats=cfg["cache_repeats"],
                           memory_rss=cfg["cache_memory_rss"], progress=progress)
    summary["details"]["teacher_cache_disk"] = res
    summary.update(cache_disk_figures(res))
    stage_done("teacher_cache_disk")

    # 8. the memory planner against measured peaks (fresh subprocess per workload)
    res = calibrate(cfg["planner"], threads=threads, progress=progress)
    summary["details"]["planner"] = res
    summary["memory_planner_max_rel_error"] = res["max_rel_error"]
    stage_done("planner")

    summary["wall_time_s"] = time.time() - started
    summary["notes"] = explain(summary)
    summary["targets"] = {k: {"target": TARGETS[k][0],
                              "met": (None if TARGETS[k][1] is None or not _finite(summary.get(k))
                                      else bool(TARGETS[k][1](summary[k])))} for k in KEYS}
    write_outputs(summary, out_dir)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpkd_lib.perf.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="full")
    parser.add_argument("--out", default=str(OUT_DIR))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--only", choices=["cache_disk", "eval"], default=None,
                        help="run one stage alone (cache_disk: results/bench/cache_disk.{json,md}; "
                             "eval: results/bench/eval.{json,md})")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.only == "cache_disk":
        out = run_cache_disk(args.mode, Path(args.out), progress=not args.no_progress)
        print((Path(args.out) / "cache_disk.md").read_text())
        return 0 if out else 1
    if args.only == "eval":
        out = run_eval(args.mode, Path(args.out), progress=not args.no_progress, threads=args.threads)
        print((Path(args.out) / "eval.md").read_text())
        return 0 if out["details"]["eval"]["rows_equal"] else 1
    summary = run(args.mode, Path(args.out), progress=not args.no_progress, threads=args.threads)
    print(format_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
