"""`make gpu-check`: run each GPU profile's own code path on stand-ins, measure it, and compare
with the memory planner. One command for any machine with a CUDA GPU, no network.

    python -m dpkd_lib.gpu.gpu_check [--out results/gpu_check] [--steps 3] [--budget-s 420]

For each run of :data:`dpkd_lib.gpu.memory.PROFILE_RUNS` whose teacher is cached (the colab
Qwen2.5 14B → 7B and Llama-2 13B → 7B QLoRA runs, the paper and colab GPT-2 runs) it calls
``train.train`` itself — the profile's params with the hub checkpoints served as full-size
random stand-ins of the same architecture (``standins.use_standins``: built directly on the
GPU in the target dtype, the 4-bit nf4 ones quantised layer by layer from memory), the
teacher-signal cache built and the teacher unloaded, the (Q)LoRA student with gradient
checkpointing where the profile says so, a few DPKD-token steps, then batched greedy
generation on the synthetic set (Dolly needs the network). Only the data, the step count and
the evaluation size are changed (``CHECK_OVERRIDES``).

It writes ``results/gpu_check/<card>.json`` and ``.md``: per run and phase (cache build,
student build, forward, backward, optimizer step, save, generation) the peak allocated
memory (``torch.cuda.max_memory_allocated``, reset at each phase) beside the planner's
prediction for the same batch shapes, the step time, training tokens/s, generation tokens/s,
and for each card of ``memory.CARDS`` whether the plan the profile ships fits — by the
planner, and by the planner scaled with this run's measured/predicted ratio — and which
settings to change when it does not. The versions it ran with are recorded. A run the card
cannot hold (by the planner) or that the time budget leaves no room for is skipped and says
so; a run that fails is recorded with its error and the check goes on (exit 1 at the end).

On a machine without CUDA it refuses in one line (exit 2). ``--cpu-scale DEPTH,WIDTH`` runs
the same path on a CPU with stand-ins scaled down (``standins.scaled``): everything but the
CUDA specifics (CUDA allocator peaks, the CUDA 4-bit kernels, fp16/bf16 on a card), which
is how ``tests/test_gpu_check.py`` keeps this script from rotting; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from . import memory, standins
from ..config import load_config
from ..io import atomic_write_text, write_json
from .calibrate import _reset_peak, _rss_now, _vm_hwm

OUT_DIR = Path("results/gpu_check")
#: the order runs are tried in (the colab 4-bit path first: the one a 16 GB card needs most)
RUN_ORDER = ("colab: Qwen2.5 14B → 7B QLoRA, teacher cached",
             "colab: Llama-2 13B → 7B QLoRA, teacher cached",
             "paper: GPT-2 XL → base, teacher cached",
             "colab: GPT-2 XL → base, teacher cached")
#: planner phases the measured ones are compared with (measured name -> plan phase)
PLAN_PHASES = {"teacher_cache": "build", "forward": "forward", "backward": "backward",
               "optimizer": "step"}
PHASES = ("teacher_cache", "student", "forward", "backward", "optimizer", "valid", "save", "eval")
RUN_KEYS = ("label", "params", "overrides", "status", "wall_time_s", "phases", "step_time_s",
            "train_tokens_per_s", "generation_tokens_per_s", "batch", "ratio_measured_to_planned",
            "fits")


def check_overrides(steps: int, batch: int, grad_accum: int, n_gen: int, new_tokens: int,
                    root: str, pretrain: bool, cpu: bool = False) -> list[str]:
    """What the check changes in a profile's params: synthetic data (no network) sized for
    ``steps`` steps, the run folder, no intermediate checkpoints, and a greedy-only
    evaluation of ``n_gen`` prompts (batched generation; teacher-forced metrics off). On a
    CPU (``cpu``) the pre-train blocks are also cut to 32 tokens: their full-vocabulary
    logits are what makes a scaled GPT-2 step slow there."""
    out = [f"output_dir={root}/run", f"cache_dir={root}/cache",
           "data.source=synthetic", f"data.n_train={max(8, steps * batch * grad_accum)}",
           "data.n_valid=4", f"data.n_test={n_gen}", "data.n_heldout=0",
           f"train.max_steps={steps}", "train.save_every=0", "train.eval_every=0",
           "train.log_every=1", "eval.splits=[test]", "eval.sample_seeds=[]",
           "eval.teacher_forced=false", f"eval.max_examples={n_gen}",
           f"eval.max_new_tokens={new_tokens}"]
    if pretrain:  # every pre-train block is cached too: enough for the steps, no more
        out.append(f"data.pretrain_max_blocks={max(8, steps * batch * grad_accum)}")
        if cpu:
            out.append("data.pretrain_block_size=32")
    return out


# ----------------------------------------------------------------------------- measuring

class PhaseProbe:
    """``train.train(on_phase=...)``: at each phase boundary, the peak memory since the last
    boundary (CUDA: max_memory_allocated, reset each time; CPU: peak RSS, reset through
    /proc/self/clear_refs) and the time, accumulated per phase name (peak: max)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.phases: dict[str, dict[str, float]] = {}
        self.current: Optional[str] = None
        self.started = time.perf_counter()
        self.batch: dict[str, float] = {}
        self.baseline = 0 if cuda else _rss_now()
        self._reset()

    def _reset(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak()
        self.started = time.perf_counter()

    def _peak(self) -> int:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return _vm_hwm()

    def close(self) -> None:
        if self.current is not None:
            entry = self.phases.setdefault(self.current, {"peak_bytes": 0, "time_s": 0.0, "count": 0})
            entry["peak_bytes"] = max(entry["peak_bytes"], self._peak())
            entry["time_s"] += time.perf_counter() - self.started
            entry["count"] += 1
        self.current = None

    def record(self) -> dict:
        """What a run keeps (memory.json): the device, the peak over all phases, the RSS the
        process held before its first phase (CPU: interpreter and libraries, which a GPU plan
        does not count), and per phase its peak bytes, time and count."""
        return {"device": "cuda" if self.cuda else "cpu", "baseline_bytes": self.baseline,
                "peak_bytes": max((p["peak_bytes"] for p in self.phases.values()), default=0),
                "phases": self.phases, "batch": self.batch}

    def __call__(self, name: str, trainer) -> None:
        self.close()
        if name == "forward" and not self.batch:
            self.batch = batch_shapes(trainer)
        if name != "end":
            self.current = name
            self._reset()


def planned_bytes(cfg, measured: dict, *, capability=None, shapes=None) -> dict:
    """{phase: the planner's bytes for it, or None where the planner has none (`PLAN_PHASES`)}
    for each phase of ``measured`` (a `PhaseProbe.record`, with the device it ran on), planned
    for the shapes the run trained on (its batch, its longest sequence). It needs the run's
    models' shapes (a saved model's config.json), so a measured run keeps it in its memory.json
    while they exist (`runs.run_grid`). On CUDA the allocator's peak has no CUDA context, so the
    plan's framework term is taken off; on CPU the process's RSS is compared as it is. A run
    resumed past its last training step measured no batch: nothing to plan for, {}."""
    b, device = measured.get("batch"), measured["device"]
    if not b:
        return {}
    plan = memory.plan_from_config(cfg, device=device, capability=capability, shapes=shapes,
                                   seq_len=b["seq_len"], response_fraction=b["response_fraction"])
    est = memory.estimate(plan)
    predicted = dict(est["phases"])
    build_plan = memory.teacher_cache_plan(plan, cfg.eval.batch_size)
    if build_plan is not None:
        predicted["build"] = memory.estimate(dataclasses.replace(build_plan, seq_len=b["seq_len"]))["total"]
    out = {}
    for name in PHASES:
        if name not in measured["phases"]:
            continue
        want = predicted.get(PLAN_PHASES.get(name, ""), None)
        want = want - est["components"]["framework"] if (want is not None and device == "cuda") else want
        out[name] = None if want is None else int(want)
    return out


def planned_against_measured(measured: dict, planned: dict) -> dict:
    """Per measured phase (a `PhaseProbe.record`, e.g. a run's memory.json): its peak bytes,
    time and count beside the planner's bytes for it (``planned``: `planned_bytes`)."""
    return {name: {"peak_bytes": int(got["peak_bytes"]), "time_s": got["time_s"], "count": int(got["count"]),
                   "predicted_bytes": planned.get(name)}
            for name in PHASES if (got := measured["phases"].get(name)) is not None}


def batch_shapes(tr) -> dict:
    """The shapes the run's steps train on (from its schedule): the longest padded
    micro-batch, its response share, tokens per step (non-padding, pre-train included)."""
    t, d = tr.cfg.train, tr.cfg.data
    micro = [[tr.train_set[i] for i in tr.my_rows(j)] for j in range(len(tr.schedule))]
    seq = max(max(len(ex["input_ids"]) for ex in rows) for rows in micro)
    resp = sum(sum(ex["response_len"] for ex in rows) for rows in micro)
    padded = sum(len(rows) * max(len(ex["input_ids"]) for ex in rows) for rows in micro)
    real = sum(sum(len(ex["input_ids"]) for ex in rows) for rows in micro)
    pt = t.batch_size * d.pretrain_block_size if tr.pretrain is not None else 0
    return {"seq_len": seq, "response_fraction": resp / padded, "micro_batches": len(micro),
            "tokens_per_step": (real / len(micro) + pt) * t.grad_accum}


# ----------------------------------------------------------------------------- one run

def check_run(label: str, path: str, overrides: tuple, *, steps: int, n_gen: int, new_tokens: int,
              cuda: bool, card: Optional[memory.Card], depth: int, width: int, root: Path) -> dict:
    """Run one profile run through train.train on stand-ins; return its record (RUN_KEYS)."""
    import torch

    from .. import train as train_mod

    shipped = memory.profile_config(path, overrides, root)
    t = shipped.train
    record: dict[str, Any] = {k: None for k in RUN_KEYS}
    record.update(label=label, params=path, overrides=list(overrides), phases={}, fits={})
    device = "cuda" if cuda else "cpu"
    capability = tuple(card.capability) if card else None
    shapes = None
    if (depth, width) != (1, 1):  # the planner sees the scaled stand-ins, as the run builds them
        shapes = {role: memory.ModelShape.of(getattr(shipped, role).name_or_path, depth, width)
                  for role in ("student", "teacher")}
    # the plan the profile ships, on every card (planner), and on this one
    for c in memory.CARDS:
        v = memory.card_verdict(shipped, c)
        record["fits"][c.name] = {"planner": v["fits"], "changes": v["changes"], "dtype": v["dtype"],
                                  "planned_peak_bytes": max(v["train"]["total"],
                                                            v["build"]["total"] if v["build"] else 0)}
    if card is not None:
        planned = memory.plan_from_config(shipped, device="cuda", capability=capability)
        peak = max(memory.estimate(planned)["total"],
                   memory.estimate(memory.teacher_cache_plan(planned, shipped.eval.batch_size))["total"])
        if peak > card.bytes:
            record["status"] = (f"skipped: the planner puts its peak at {peak / memory.GiB:.1f} GiB, "
                                f"over this card's {card.bytes / memory.GiB:.1f} GiB")
            return record
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dpkd-gpu-check-") as tmp:
        extra = check_overrides(steps, t.batch_size, t.grad_accum, n_gen, new_tokens, tmp,
                                pretrain=t.lm_coef > 0, cpu=not cuda)
        cfg = load_config(Path(root) / path, list(overrides) + extra)
        probe = PhaseProbe(cuda)
        try:
            with standins.use_standins(depth, width, device=device):
                summary = train_mod.train(cfg, progress=False, on_phase=probe)
            probe.close()
            metrics = [r for r in _read_jsonl(Path(tmp) / "run" / "metrics.jsonl")]
        except Exception as err:  # noqa: BLE001 - recorded; the other runs go on
            probe.close()
            record["status"] = f"failed: {type(err).__name__}: {str(err)[:400]}"
            record["wall_time_s"] = time.perf_counter() - started
            return record
        finally:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    record["wall_time_s"] = time.perf_counter() - started
    b = probe.batch
    measured = probe.record()
    record["phases"] = planned_against_measured(
        measured, planned_bytes(cfg, measured, capability=capability, shapes=shapes))
    ratios = [p["peak_bytes"] / p["predicted_bytes"] for p in record["phases"].values()
              if p["predicted_bytes"]]
    record["ratio_measured_to_planned"] = max(ratios) if ratios else None
    times = [r["time_s"] for r in metrics]
    step_s = _median(times[1:] or times)  # the first step warms up kernels and caches
    record["step_time_s"] = step_s
    record["train_tokens_per_s"] = b["tokens_per_step"] / step_s if step_s else None
    greedy = summary.get("eval", {}).get("test", {}).get("greedy", {})
    gen_tokens = greedy.get("response_tokens", 0.0) * greedy.get("n", 0)
    record["generation_tokens_per_s"] = gen_tokens / greedy["generate_s"] if greedy.get("generate_s") else None
    record["batch"] = dict(b, batch_size=t.batch_size, grad_accum=t.grad_accum, steps=steps,
                           generated_tokens=gen_tokens)
    ratio = record["ratio_measured_to_planned"] or 1.0
    for c in memory.CARDS:
        f = record["fits"][c.name]
        f["measured_scaled"] = f["planner"] and f["planned_peak_bytes"] * max(ratio, 1.0) <= c.bytes
    record["status"] = "ok"
    return record


def _read_jsonl(path: Path) -> list[dict]:
    from ..io import read_jsonl
    return read_jsonl(path, torn_ok=True)


def _median(values: list[float]) -> Optional[float]:
    if not values:
        return None
    v = sorted(values)
    return (v[len(v) // 2] + v[(len(v) - 1) // 2]) / 2


# ----------------------------------------------------------------------------- the check

def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "tokenizers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    import torch
    out["cuda"] = torch.version.cuda
    return out


def this_card(cuda: bool, depth: int, width: int) -> tuple[str, Optional[memory.Card], dict]:
    """(file stem, the card as a memory.Card or None on CPU, facts)."""
    if not cuda:
        return f"cpu-scaled-d{depth}w{width}", None, {"device": "cpu", "scale": [depth, width]}
    import torch
    props = torch.cuda.get_device_properties(0)
    cap = tuple(torch.cuda.get_device_capability(0))
    card = memory.Card(props.name, int(props.total_memory // memory.MiB), cap)
    stem = re.sub(r"[^A-Za-z0-9.]+", "-", props.name).strip("-")
    return stem, card, {"device": "cuda", "name": props.name, "memory_bytes": int(props.total_memory),
                        "capability": list(cap)}


def run_check(out_dir: Path = OUT_DIR, *, steps: int = 3, budget_s: float = 420.0,
              cpu_scale: Optional[tuple[int, int]] = None, only: Optional[list[str]] = None,
              root: Path = memory.REPO_ROOT) -> dict:
    """Every cached-teacher profile run (RUN_ORDER), within ``budget_s`` seconds; writes and
    returns the report."""
    import torch
    cuda = cpu_scale is None
    depth, width = cpu_scale or (1, 1)
    started = time.perf_counter()
    stem, card, facts = this_card(cuda, depth, width)
    runs = {label: (path, ov) for label, path, ov in memory.PROFILE_RUNS}
    order = [label for label in RUN_ORDER if only is None or label in only]
    n_gen, new_tokens = (16, 64) if cuda else (2, 4)
    report: dict[str, Any] = {"card": facts, "versions": versions(), "steps": steps,
                              "budget_s": budget_s, "runs": []}
    for label in order:
        path, overrides = runs[label]
        spent = time.perf_counter() - started
        longest = max([r["wall_time_s"] or 0.0 for r in report["runs"]], default=0.0)
        if report["runs"] and spent + longest > budget_s:  # the next run would likely overrun
            rec = {k: None for k in RUN_KEYS}
            rec.update(label=label, params=path, overrides=list(overrides), phases={}, fits={},
                       status=f"skipped: time budget ({budget_s:.0f} s) spent")
        else:
            print(f"[gpu-check] {label} ...", file=sys.stderr, flush=True)
            rec = check_run(label, path, overrides, steps=steps, n_gen=n_gen, new_tokens=new_tokens,
                            cuda=cuda, card=card, depth=depth, width=width, root=root)
            print(f"[gpu-check] {label}: {rec['status']} ({rec['wall_time_s'] or 0:.0f} s)",
                  file=sys.stderr, flush=True)
        report["runs"].append(rec)
        if cuda:
            torch.cuda.empty_cache()
    report["wall_time_s"] = time.perf_counter() - started
    write_report(report, Path(out_dir) / stem)
    return report


# ----------------------------------------------------------------------------- report

def _g(x) -> str:
    return "—" if x is None else f"{x / memory.GiB:.2f}"


def _f(x, fmt: str = ".3g") -> str:
    return "—" if x is None else format(x, fmt)


def format_markdown(report: dict) -> str:
    card, v = report["card"], report["versions"]
    where = (f"{card['name']} ({card['memory_bytes'] / memory.GiB:.1f} GiB, capability "
             f"{'.'.join(map(str, card['capability']))})" if card["device"] == "cuda"
             else f"CPU, stand-ins scaled by depth/width {card['scale']} (plumbing only: the numbers mean nothing)")
    lines = [f"# GPU check: {where}", "",
             f"torch {v.get('torch')} (CUDA {v.get('cuda')}), transformers {v.get('transformers')}, "
             f"peft {v.get('peft')}, accelerate {v.get('accelerate')}, bitsandbytes {v.get('bitsandbytes')}, "
             f"Python {v.get('python')}; {report['steps']} training steps per run; wall time "
             f"{report['wall_time_s']:.0f} s (budget {report['budget_s']:.0f} s).", "",
             "Peak memory per phase, measured (GiB; the allocator's peak, CUDA context excluded) "
             "against the planner for the same shapes:", "",
             "| run | status | " + " | ".join(PHASES) + " | step s | train tok/s | gen tok/s | measured / planned |",
             "|---|---|" + "---:|" * (len(PHASES) + 4)]
    for r in report["runs"]:
        cells = [r["label"], r["status"] if r["status"] == "ok" else r["status"][:80]]
        for name in PHASES:
            p = r["phases"].get(name)
            cells.append("—" if p is None else
                         f"{_g(p['peak_bytes'])}" + (f" / {_g(p['predicted_bytes'])}" if p["predicted_bytes"] else ""))
        cells += [_f(r["step_time_s"]), _f(r["train_tokens_per_s"], ".0f"),
                  _f(r["generation_tokens_per_s"], ".0f"), _f(r["ratio_measured_to_planned"])]
        lines.append("| " + " | ".join(cells) + " |")
    names = [c.name for c in memory.CARDS]
    lines += ["", "Does the plan each profile ships fit? (planner; in brackets, the planner scaled by "
                  "this run's measured/planned ratio when above 1)", "",
              "| run | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in report["runs"]:
        cells = [r["label"]]
        for name in names:
            f = r["fits"].get(name)
            if not f:
                cells.append("—")
                continue
            text = f"fits ({f['dtype']})" if f["planner"] else \
                "no: " + (" + ".join(f"`{c}`" for c in f["changes"]) or "no single setting")
            if "measured_scaled" in f and f["measured_scaled"] != f["planner"]:
                text += " [measured: " + ("fits" if f["measured_scaled"] else "no") + "]"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, stem: Path) -> tuple[Path, Path]:
    stem = Path(stem)
    js, md = stem.with_suffix(".json"), stem.with_suffix(".md")
    write_json(js, report)
    atomic_write_text(md, format_markdown(report))
    return js, md


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpkd_lib.gpu.gpu_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT_DIR))
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (default 3)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip a run that would likely end past this many seconds, judged by "
                             "the longest run so far (default 420)")
    parser.add_argument("--only", action="append", default=None, metavar="LABEL",
                        help="run only this run (repeatable; labels as in memory.PROFILE_RUNS)")
    parser.add_argument("--cpu-scale", default=None, metavar="DEPTH,WIDTH",
                        help="run on CPU with stand-ins scaled down by these factors (tests)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch
    except ImportError:
        print("error: gpu-check needs torch with CUDA in this Python (make gpu-check GPU_PYTHON=...)",
              file=sys.stderr)
        return 2
    scale = None
    if args.cpu_scale:
        try:
            depth, width = (int(x) for x in args.cpu_scale.split(","))
            scale = (depth, width)
        except ValueError:
            print(f"error: --cpu-scale expects DEPTH,WIDTH (e.g. 24,64), got {args.cpu_scale!r}",
                  file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print(f"error: gpu-check needs a CUDA GPU and this Python's torch ({torch.__version__}) sees "
              f"none; run it where `python -c 'import torch; print(torch.cuda.is_available())'` "
              f"prints True (make gpu-check GPU_PYTHON=python3 on Colab/Kaggle)", file=sys.stderr)
        return 2
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("error: gpu-check needs bitsandbytes for the 4-bit runs: pip install bitsandbytes "
              "(a wheel; nothing else is downloaded)", file=sys.stderr)
        return 2
    unknown = [o for o in args.only or [] if o not in RUN_ORDER]
    if unknown:
        print(f"error: --only {unknown[0]!r} is not one of: {'; '.join(RUN_ORDER)}", file=sys.stderr)
        return 2
    report = run_check(Path(args.out), steps=args.steps, budget_s=args.budget_s, cpu_scale=scale,
                       only=args.only)
    print(format_markdown(report))
    return 1 if any(r["status"].startswith("failed") for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
