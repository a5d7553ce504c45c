"""`make gpu-check` (dpkd_lib/gpu/gpu_check.py) on a CPU: it refuses in one line without
--cpu-scale, and with it runs the same path — each GPU profile's params through train.train on
scaled-down stand-ins (4-bit teacher cache built then unloaded, QLoRA student with gradient
checkpointing, a DPKD-token step, batched generation) — and writes every key. This is also
the one training step of the paper and colab profiles (tests/test_profiles.py resolves and
builds them; the smoke and cpu profiles train there). The numbers themselves mean nothing."""
from __future__ import annotations

import json

from dpkd_lib.gpu import memory
from dpkd_lib.gpu import gpu_check


def test_refuses_on_cpu_in_one_line(capsys):
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: gpu-check needs a CUDA GPU") and "\n" not in err
    assert gpu_check.main(["--cpu-scale", "8"]) == 2  # a malformed scale is a one-line error too


def test_cpu_scaled_check_runs_every_profile_and_writes_every_key(tmp_path, capsys):
    assert gpu_check.main(["--cpu-scale", "24,64", "--steps", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cpu-scaled-d24w64.json").read_text())
    assert {"card", "versions", "steps", "budget_s", "runs", "wall_time_s"} <= set(report)
    assert all(report["versions"][k] for k in ("torch", "transformers", "peft", "accelerate",
                                                "bitsandbytes"))
    assert [r["label"] for r in report["runs"]] == list(gpu_check.RUN_ORDER)
    for run in report["runs"]:
        assert run["status"] == "ok", run["status"]
        assert set(gpu_check.RUN_KEYS) <= set(run) and all(run[k] is not None for k in gpu_check.RUN_KEYS)
        # every phase of the real run was seen, the planned ones with the planner's figure
        assert {"teacher_cache", "student", "forward", "backward", "optimizer", "save", "eval"} \
            <= set(run["phases"])
        for name, phase in run["phases"].items():
            assert phase["peak_bytes"] > 0 and phase["time_s"] >= 0
            assert (phase["predicted_bytes"] is not None) == (name in gpu_check.PLAN_PHASES)
        assert run["step_time_s"] > 0 and run["train_tokens_per_s"] > 0
        assert run["generation_tokens_per_s"] > 0 and run["batch"]["generated_tokens"] > 0
        assert set(run["fits"]) == {c.name for c in memory.CARDS}
        for verdict in run["fits"].values():
            assert {"planner", "measured_scaled", "changes", "dtype", "planned_peak_bytes"} <= set(verdict)
            assert verdict["planner"] == (not verdict["changes"])
    qwen = report["runs"][0]
    assert qwen["fits"]["T4 16 GB"]["planner"]  # the shipped 14B → 7B plan, exact cache, fits a T4
    md = (tmp_path / "cpu-scaled-d24w64.md").read_text()
    for run in report["runs"]:
        assert md.count(f"| {run['label']} |") == 2  # the phase table and the card table
    assert "plumbing only" in md


def test_a_run_the_time_budget_cannot_hold_is_skipped_and_says_so(tmp_path, monkeypatch):
    def fake_run(label, path, overrides, **kw):  # a finished run that took 5 s
        return dict({k: 1 for k in gpu_check.RUN_KEYS}, label=label, status="ok", wall_time_s=5.0,
                    phases={}, fits={})

    monkeypatch.setattr(gpu_check, "check_run", fake_run)
    report = gpu_check.run_check(tmp_path, budget_s=3.0, cpu_scale=(24, 64))
    assert [r["status"] for r in report["runs"]] == \
        ["ok"] + ["skipped: time budget (3 s) spent"] * (len(gpu_check.RUN_ORDER) - 1)
    assert all(set(gpu_check.RUN_KEYS) <= set(r) for r in report["runs"])
    assert (tmp_path / "cpu-scaled-d24w64.md").exists()
