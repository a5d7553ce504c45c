"""Calibration of the memory planner: run a workload, measure its peak, compare with the plan.

Each workload is a JSON-able spec (:data:`WORKLOAD_DEFAULTS`) that maps 1:1 to a
:class:`dpkd_lib.gpu.memory.MemoryPlan` (:func:`plan_for_workload`) and to code that runs it
(:func:`run_workload`: tiny models or SmolLM2 and its pruned students, built as the library
builds them, stepped with ``objectives.step_loss``). :func:`measure_workload` runs one in a
fresh interpreter (``python -m dpkd_lib.gpu.calibrate --run-workload SPEC``), so the peak is
that workload's alone; :func:`calibrate` runs the bench's set of workloads
(``python -m dpkd_lib.perf.bench`` reports ``memory_planner_max_rel_error``).

Measuring: on CPU, the kernel's peak RSS (VmHWM) after the models are built and the counter
reset (``/proc/self/clear_refs``); on CUDA, ``torch.cuda.max_memory_allocated``. The GPU check
(``perf/gpu_check.py``) uses the same peak counters per phase of a real run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from .memory import MemoryPlan, ModelShape, estimate

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


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


def _smollm2_shape(n_layer: int) -> ModelShape:
    full = ModelShape.of(SMOLLM2)
    return full if n_layer == full.n_layer else full.pruned(n_layer)


def _workload_shape(spec: Mapping, which: str) -> ModelShape:
    if which == "teacher":
        return _smollm2_shape(spec["teacher_n_layer"])
    if spec["model"] == "smollm2":
        return _smollm2_shape(spec["n_layer"])
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
                          cache_format="topk",
                          batch_size=s["batch"], seq_len=s["seq"], device=device,
                          response_fraction=s["response_fraction"], framework_bytes=framework_bytes,
                          label=s.get("name", "")).validate()
    teacher = _workload_shape(s, "teacher") if s["teacher"] else None
    return MemoryPlan(student=_workload_shape(s, "student"), teacher=teacher,
                      teacher_mode=s["teacher"] or "none", teacher_dtype=s["teacher_dtype"],
                      cache_format="topk",
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
    :func:`measure_workload`) and return its measured peak. The step is
    ``objectives.step_loss`` (DPKD-token in the released mix, no pre-train term; SFT without
    a teacher), then backward and AdamW.

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
    from .. import models
    from ..config import TrainConfig
    from ..objectives import OnlineTeacher, TopK, step_loss
    from ..train import param_groups
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
        if s["teacher"] == "cache":
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
    cmd = [sys.executable, "-m", "dpkd_lib.gpu.calibrate", "--run-workload", json.dumps(s)]
    env = _child_env()
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(mmap_threshold))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(Path(__file__).resolve().parents[2]))
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



def planner_workloads(mode: str) -> list[dict]:
    """Configurations that run here (tiny models, the 6-layer SmolLM2 student full and LoRA
    at several sizes, the 30-layer teacher fp32 and 4-bit inference)."""
    quick = [
        dict(name="tiny 4L×256 V8k full b8×256", model="tiny", n_layer=4, hidden=256, vocab=8192,
             batch=8, seq=256, teacher="cache"),
        dict(name="SmolLM2[:6] full b8×128 cached", model="smollm2", n_layer=6, batch=8, seq=128,
             teacher="cache"),
        dict(name="SmolLM2[:6] LoRA b8×128 cached", model="smollm2", n_layer=6, mode="lora",
             batch=8, seq=128, teacher="cache"),
        dict(name="SmolLM2 30L fp32 inference b8×256", task="teacher_inference", batch=8, seq=256),
    ]
    if mode == "tiny":
        return [dict(name="tiny 2L×128 V4k full b4×128", model="tiny", n_layer=2, hidden=128,
                     vocab=4096, batch=4, seq=128, teacher="cache")]
    if mode == "quick":
        return quick
    return quick + [
        dict(name="tiny 2L×128 V4k full b4×128", model="tiny", n_layer=2, hidden=128, vocab=4096,
             batch=4, seq=128, teacher="cache"),
        dict(name="SmolLM2[:6] full b8×256 cached", model="smollm2", n_layer=6, batch=8, seq=256,
             teacher="cache"),
        dict(name="SmolLM2[:6] full b4×256 cached", model="smollm2", n_layer=6, batch=4, seq=256,
             teacher="cache"),
        dict(name="SmolLM2[:6] full b8×256 grad-ckpt", model="smollm2", n_layer=6, batch=8, seq=256,
             teacher="cache", gradient_checkpointing=True),
        dict(name="SmolLM2[:6] LoRA b8×256 cached", model="smollm2", n_layer=6, mode="lora",
             batch=8, seq=256, teacher="cache"),
        dict(name="SmolLM2[:6] full b8×128 online fp32 teacher", model="smollm2", n_layer=6,
             batch=8, seq=128, teacher="online"),
        dict(name="SmolLM2 30L fp32 inference b16×128", task="teacher_inference", batch=16, seq=128),
        dict(name="SmolLM2 30L 4-bit inference b8×256", task="teacher_inference",
             teacher_dtype="4bit", batch=8, seq=256),
    ]


def calibrate(mode: str = "quick", threads: int = 1, progress: bool = True) -> dict:
    """Predicted vs measured peak for each workload of ``mode`` (fresh subprocess each):
    {"workloads": [...], "fixed_mmap_threshold": [...], "max_rel_error", "worst"}."""
    from tqdm.auto import tqdm
    rows = []
    for spec in tqdm(planner_workloads(mode), desc="planner", disable=not progress, leave=False):
        rows.append(measure_workload(dict(spec, threads=threads)))
    extra = []
    if mode == "full":  # the allocator's share, shown on one workload
        for spec in planner_workloads(mode):
            if spec["name"].startswith("SmolLM2[:6] LoRA b8×256"):
                extra.append(measure_workload(dict(spec, threads=threads), mmap_threshold=1 << 20))
    worst = max(rows, key=lambda r: abs(r["rel_error"]))
    return {"workloads": rows, "fixed_mmap_threshold": extra,
            "max_rel_error": abs(worst["rel_error"]), "worst": worst["name"]}


def _main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m dpkd_lib.gpu.calibrate",
                                     description="memory planner calibration: run one workload "
                                                 "(--run-workload SPEC) or a mode's set")
    parser.add_argument("--run-workload", default=None, help="a workload spec (JSON): run it here")
    parser.add_argument("--mode", default="quick", choices=("tiny", "quick", "full"))
    args = parser.parse_args(argv)
    if args.run_workload:
        print(json.dumps(run_workload(json.loads(args.run_workload))))
        return 0
    res = calibrate(args.mode)
    for r in res["workloads"]:
        print(f"{r['name']}: measured {r['measured'] / 2**20:.0f} MiB, predicted "
              f"{r['predicted'] / 2**20:.0f} MiB ({r['rel_error']:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
