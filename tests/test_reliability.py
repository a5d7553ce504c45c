"""A long study must survive kills, bad input and numerical faults: each test here fails
without the feature it names (issue 5)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpkd_lib.losses as losses_mod
import dpkd_lib.train as train_mod
from dpkd_lib.config import load_config
from dpkd_lib.io import read_json, read_jsonl
from dpkd_lib.errors import TrainingFault
from dpkd_lib.train import train

from test_config import ROOT, SMOKE, _cli

LONG = ["train.max_steps=120", "train.save_every=10", "eval.max_examples=4",
        "eval.max_new_tokens=8"]


def _weights(run_dir):
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


def _comparable(summary):
    return {k: v for k, v in summary.items() if k not in ("wall_time_s", "generate_s") and
            not k.endswith("generate_s") and not isinstance(v, dict)}


def _metric_rows(run_dir):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def test_sigkill_then_same_command_resumes_to_identical_results(tmp_path):
    sets = [a for o in LONG for a in ("--set", o)]
    ref = tmp_path / "uninterrupted"
    assert _cli("train", "--params", str(SMOKE), "--set", f"output_dir={ref}", *sets,
                "--no-progress").returncode == 0
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dpkd_lib", "train", "--params", str(SMOKE), "--set",
           f"output_dir={run}", *sets, "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 45:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = read_json(run / "manifest.json")
    assert manifest["status"] == "running", "the kill must land mid-training for this test to mean anything"
    assert not (run / "summary.json").exists()
    assert (run / "checkpoints" / "last.pt").exists()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert read_json(run / "manifest.json")["attempts"] == 2
    assert _comparable(read_json(run / "summary.json")) == _comparable(read_json(ref / "summary.json"))
    assert _metric_rows(run) == _metric_rows(ref), "metrics.jsonl must continue exactly"
    a, b = _weights(run), _weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights must be bitwise equal"


def test_finished_run_is_reused_not_recomputed(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--params", str(SMOKE), "--set", f"output_dir={out}", "--set", "eval.splits=[]"]
    assert _cli(*args).returncode == 0
    stamp = (out / "summary.json").stat().st_mtime_ns
    second = _cli(*args)
    assert second.returncode == 0 and (out / "summary.json").stat().st_mtime_ns == stamp


def test_different_params_refuse_to_clobber_then_force_moves_aside(tmp_path):
    out = tmp_path / "run"
    base = ["train", "--params", str(SMOKE), "--set", f"output_dir={out}", "--set", "eval.splits=[]"]
    assert _cli(*base).returncode == 0
    refused = _cli(*base, "--set", "train.beta=0.5")
    assert refused.returncode == 2 and "train.beta" in refused.stderr and "--force" in refused.stderr
    assert read_json(out / "manifest.json")["status"] == "finished"
    forced = _cli(*base, "--set", "train.beta=0.5", env_extra={"FORCE": "1"})
    assert forced.returncode == 0, forced.stderr[-1000:]
    assert len(list(tmp_path.glob("run.replaced-*"))) == 1


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    teacher = tmp_path / "teacher"
    assert _cli("train", "--params", str(SMOKE), "--set", f"output_dir={teacher}", "--set",
                "train.objective=sft", "--set", "teacher=null", "--set", "train.max_steps=1",
                "--set", "eval.splits=[]", "--set", "tokenizer.vocab_size=300").returncode == 0
    proc = _cli("train", "--params", str(SMOKE), "--set", f"output_dir={tmp_path / 'd'}",
                "--set", 'teacher={"source": "saved", "name_or_path": "%s"}' % (teacher / "model"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "vocab" in proc.stderr.lower(), proc.stderr


def test_hub_id_offline_fails_fast_pointing_at_the_offline_profile(tmp_path):
    started = time.time()
    proc = _cli("train", "--params", str(SMOKE), "--set", f"output_dir={tmp_path / 'h'}",
                "--set", 'teacher={"source": "pretrained", "name_or_path": "gpt2-xl"}',
                env_extra={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and time.time() - started < 60
    message = proc.stderr.lower()
    assert "gpt2-xl" in message and ("offline" in message or "network" in message)
    assert "cpu" in message or "local path" in message


def _bad_jsonl(path, n_good=12):
    good = [{"id": f"g{i}", "instruction": f"Say the number {i}.", "context": "", "response": f"{i}",
             "category": "open_qa"} for i in range(n_good)]
    bad = [{"id": "m1", "instruction": "no response field"},
           {"id": "e1", "instruction": "empty", "context": "", "response": "   "},
           {"id": "l1", "instruction": "long " * 400, "context": "", "response": "x"}]
    with open(path, "w") as handle:
        for row in good + bad:
            handle.write(json.dumps(row) + "\n")
        handle.write('{"id": "u1", "instruction": "bad bytes", "context": "", "response": "\\udc80"}\n')


def test_bad_records_are_counted_per_reason_or_rejected_by_policy(tmp_path):
    data = tmp_path / "data.jsonl"
    _bad_jsonl(data)
    section = {"source": "jsonl", "path": str(data), "n_valid": 2, "n_test": 2, "max_length": 256,
               "max_prompt": 192, "pretrain_source": "pydoc", "pretrain_block_size": 64}
    sets = ["--set", f"data={json.dumps(section)}", "--set", "eval.splits=[]"]
    ok = _cli("train", "--params", str(SMOKE), "--set", f"output_dir={tmp_path / 'drop'}", *sets)
    assert ok.returncode == 0, ok.stderr[-1500:]
    report = read_json(tmp_path / "drop" / "manifest.json")["filter_report"]
    dropped = report["dropped"]
    assert sum(dropped.values()) >= 1 and report["kept"] >= 1, report
    strict = _cli("train", "--params", str(SMOKE), "--set", f"output_dir={tmp_path / 'err'}", *sets,
                  "--set", "data.bad_data=error")
    assert strict.returncode == 2 and "Traceback" not in strict.stderr


def test_empty_data_after_filtering_is_an_error_not_a_zero_step_run(tmp_path):
    proc = _cli("train", "--params", str(SMOKE), "--set", f"output_dir={tmp_path / 'e'}",
                "--set", "data.min_response_tokens=100000", "--set", "eval.splits=[]")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "response_too_short" in proc.stderr or "empty" in proc.stderr.lower()
    assert not (tmp_path / "e" / "summary.json").exists()


def _nan_on_call(monkeypatch, bad_call):
    calls = {"n": 0}
    original = losses_mod.sft_loss

    def flaky(logits, labels, *args, **kwargs):
        calls["n"] += 1
        value = original(logits, labels, *args, **kwargs)
        return value * float("nan") if calls["n"] == bad_call else value

    monkeypatch.setattr(losses_mod, "sft_loss", flaky)


def test_nan_loss_stops_with_step_parts_and_batch_ids_keeping_the_checkpoint(tmp_path, monkeypatch):
    # sft_loss runs twice per step here (response CE, pre-train CE): call 7 is step 4's response CE
    _nan_on_call(monkeypatch, bad_call=7)
    cfg = load_config(SMOKE, [f"output_dir={tmp_path / 'n'}", "train.save_every=2", "eval.splits=[]"])
    with pytest.raises(TrainingFault) as err:
        train(cfg, progress=False)
    message = str(err.value)
    assert "step 3" in message and "batch ids" in message and "ce" in message
    assert read_json(tmp_path / "n" / "manifest.json")["status"] == "failed"
    state = torch.load(tmp_path / "n" / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 2


def test_nan_policy_skip_counts_the_batch(tmp_path, monkeypatch):
    _nan_on_call(monkeypatch, bad_call=7)
    cfg = load_config(SMOKE, [f"output_dir={tmp_path / 's'}", "train.nan_policy=skip", "eval.splits=[]",
                              "train.max_skipped_share=0.2"])
    summary = train(cfg, progress=False)
    assert summary["skipped_batches"] == 1 and math.isfinite(summary["valid_nll"])
    assert len(read_jsonl(tmp_path / "s" / "metrics.jsonl")) == cfg.train.max_steps - 1


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    sets = ["--set", "eval.splits=[]", "--set", "train.max_steps=6"]
    single = tmp_path / "single"
    assert _cli("train", "--params", str(SMOKE), "--set", f"output_dir={single}", *sets).returncode == 0
    multi = tmp_path / "multi"
    launcher = Path(sys.executable).with_name("accelerate")
    # `--cpu` makes accelerate 1.15 use its one-process launcher (multi-CPU there needs MPI);
    # the torchrun launcher starts two ranks and our Accelerator(cpu=True) joins them over gloo
    proc = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dpkd_lib", "train",
                           "--params", str(SMOKE), "--set", f"output_dir={multi}", *sets, "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_json(multi / "manifest.json")["num_processes"] == 2
    a, b = _weights(single), _weights(multi)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
    sa, sb = read_json(single / "summary.json"), read_json(multi / "summary.json")
    assert sb["valid_nll"] == pytest.approx(sa["valid_nll"], rel=1e-5)


def test_same_seed_same_metrics_other_seed_other_samples(tmp_path):
    runs = {}
    for name, seed, sample_seed in (("a", 40, 10), ("b", 40, 10), ("c", 41, 11)):
        cfg = load_config(SMOKE, [f"output_dir={tmp_path / name}", f"train.seed={seed}",
                                  "eval.greedy=false", f"eval.sample_seeds=[{sample_seed}]", "eval.max_examples=4",
                                  "eval.max_new_tokens=8"])
        train(cfg, progress=False)
        runs[name] = (_metric_rows(tmp_path / name), [r["sample"] for r in read_jsonl(tmp_path / name / "eval.jsonl") if r["decoding"] == "sample"])
    assert runs["a"] == runs["b"]
    assert runs["a"][0] != runs["c"][0] and runs["a"][1] != runs["c"][1]


def test_cli_eval_scores_a_saved_model(tmp_path):
    run = tmp_path / "run"
    assert _cli("train", "--params", str(SMOKE), "--set", f"output_dir={run}", "--set",
                "eval.splits=[]").returncode == 0
    out = tmp_path / "eval"
    proc = _cli("eval", "--params", str(SMOKE), "--model", str(run / "model"), "--out", str(out),
                "--set", "eval.max_examples=3", "--set", "eval.max_new_tokens=6", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-1500:]
    rows = [r for r in read_jsonl(out / "eval.jsonl") if r["decoding"] == "greedy"]
    assert len(rows) == 3 and {"sample", "reference", "rouge_l", "exact_match"} <= set(rows[0])
    assert "test_rouge_l" in read_json(out / "eval_summary.json")
    missing = _cli("eval", "--params", str(SMOKE), "--model", str(tmp_path / "nope"), "--out", str(out))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
