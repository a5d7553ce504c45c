"""`make bench` plumbing on tiny sizes (seconds): every key present and finite, the Markdown
table lists every key, the tensor-lifetime tracker counts what it should, the DPKD-seq stage
runs train.train with rejected_every 1 and 4. Nothing is timed here: speed figures are the
bench's job, not the tests'."""
from __future__ import annotations

import json
import math

import torch

from dpkd_lib import losses
from dpkd_lib.perf import bench


def test_live_tensor_peak_counts_new_storages_not_inputs():
    x = torch.randn(1000, 1000, requires_grad=True)  # 4 MB input: must not count
    with bench.LiveTensorPeak() as tracker:
        y = x.detach()  # a view of the input: not an allocation
        z = x.log_softmax(-1)  # 4 MB, kept by autograd
        z.sum().backward()  # backward allocates x.grad (4 MB) and a temporary
    assert y.data_ptr() == x.data_ptr()
    assert 8e6 <= tracker.peak <= 16.5e6
    assert tracker.current >= 4e6  # z and x.grad are still alive


def test_bench_loss_tiny_sizes_agree_and_report():
    res = bench.bench_loss((64, 128), B=2, T=32, repeats=1, progress=False)
    assert set(res["per_vocab"]) == {"64", "128"}
    for row in res["per_vocab"].values():
        assert row["loss_abs_diff"] < 1e-5 and row["grad_max_abs_diff"] < 1e-6
        assert row["plain_peak_bytes"] > 0 and row["lean_peak_bytes"] > 0
    assert math.isfinite(res["peak_mem_ratio"]) and math.isfinite(res["speed_ratio"])


def test_loss_inputs_have_the_response_fraction():
    s, t, labels = bench.loss_inputs(4, 200, 50, response_fraction=0.2)
    frac = (labels != -100).float().mean().item()
    assert 0.05 < frac < 0.4
    assert s.requires_grad and not t.requires_grad


def test_tiny_mode_summary_has_every_key(tmp_path, monkeypatch):
    # the planner stage spawns subprocesses (tests/test_memory.py runs one); stub it here
    def fake_planner(mode, threads=1, progress=True):
        row = {"name": "stub", "measured": 100, "predicted": 110, "rel_error": 0.1}
        return {"workloads": [row], "fixed_mmap_threshold": [], "max_rel_error": 0.1, "worst": "stub"}

    monkeypatch.setattr(bench, "calibrate", fake_planner)
    summary = bench.run("tiny", tmp_path, progress=False, threads=1)
    for key in bench.KEYS:
        assert key in summary and math.isfinite(summary[key]), key
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert set(bench.KEYS) <= set(stored)
    assert {"cpu_model", "torch_threads", "torch_version", "device"} <= set(stored["machine"])
    assert set(stored["teacher_cache_rel_error_by_k"]) == {str(k) for k in bench.K_VALUES}
    cache = stored["details"]["teacher_cache"]
    assert cache["speedup_cap"] == stored["teacher_cache_speedup_cap"] > 1
    assert cache["speedup_cap"] == 1 + cache["teacher_forward_s"] / cache["hidden_step_s"]
    seq = stored["details"]["dpkd_seq"]  # train.train's own per-step times, one per step
    assert len(seq["k1"]["times_s"]) == len(seq["k4"]["times_s"]) == bench.MODES["tiny"]["seq_steps"]
    assert stored["dpkd_seq_step_s"] == seq["k1"]["step_s"]
    md = (tmp_path / "summary.md").read_text()
    for key in bench.KEYS:
        assert f"`{key}`" in md
    assert "| figure | value | target | met? |" in md


def test_eval_stage_compares_three_ways_that_give_the_same_rows(tmp_path):
    """`--only eval` on the tiny pair: the record's two-pass readouts, the one-pass online
    and the cached teacher give the same per-prompt rows (bit for bit), every time is
    positive, and eval.md shows each side."""
    out = bench.run_eval("tiny", tmp_path, progress=False, threads=1)
    res = out["details"]["eval"]
    assert res["rows_equal"] is True
    assert all(res[k] > 0 for k in ("before_s", "online_s", "cached_s", "cache_build_s", "greedy_s"))
    assert out["eval_teacher_forced_speedup"] == res["before_s"] / res["cached_s"]
    assert json.loads((tmp_path / "eval.json").read_text())["details"]["eval"]["n_prompts"] == 6
    md = (tmp_path / "eval.md").read_text()
    assert "read from the cache" in md and "bit for bit: True" in md
