"""Reliability, second pass (issue 12). Each test names the row of the issue's table it
covers: what happened on commit 40f9ba6, which the test would catch, and what happens now."""
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpkd_lib.train as train_mod
from dpkd_lib import config as config_mod
from dpkd_lib.study import driver as study
from dpkd_lib.config import ConfigError, load_config
from dpkd_lib.errors import ModelLoadError, RunBusy, TrainingFault
from dpkd_lib.io import read_json, read_jsonl
from dpkd_lib.rundir import RunDir
from dpkd_lib.train import train

from test_config import ROOT, SMOKE, _cli
from test_reliability import _nan_on_call


def _cfg(tmp_path, name, *overrides):
    return load_config(SMOKE, [f"output_dir={tmp_path / name}", f"cache_dir={tmp_path / 'cache'}", *overrides])


def _weights(run_dir):
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def _comparable(summary):
    return {k: v for k, v in summary.items() if k != "wall_time_s" and not k.endswith("generate_s")
            and not isinstance(v, dict)}


def _lines(text):
    return [line for line in text.strip().splitlines() if line.strip()]


def _crash_at(monkeypatch, index):
    """Make micro-batch `index` raise, as a crash (or a kill) in the middle of a run would."""
    original = train_mod.Trainer.step_loss

    def step_loss(self, i):
        if i == index:
            raise RuntimeError("simulated crash")
        return original(self, i)
    monkeypatch.setattr(train_mod.Trainer, "step_loss", step_loss)


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- one writer per run folder

def test_second_train_on_a_busy_folder_exits_2_at_once_writing_nothing(tmp_path, monkeypatch):
    """Row "two train processes on one output_dir" (old: both exit 0, metrics.jsonl
    interleaved). The first run holds the folder's lock mid-run (paused in its 4th step);
    a second `train` with the same command exits 2 with one line naming the holder's pid and
    touches no file; the first then finishes with each step logged once."""
    run = tmp_path / "run"
    resume, paused = threading.Event(), threading.Event()
    original = train_mod.Trainer.step_loss

    def step_loss(self, index):
        if index == 3 and not resume.is_set():
            paused.set()
            resume.wait(120)
        return original(self, index)
    monkeypatch.setattr(train_mod.Trainer, "step_loss", step_loss)
    args = [f"output_dir={run}", "train.save_every=2", "eval.splits=[]"]
    result = {}
    first = threading.Thread(target=lambda: result.update(summary=train(_cfg(tmp_path, "run", *args[1:]),
                                                                        progress=False)))
    first.start()
    try:
        assert paused.wait(120), "the first run never reached its 4th step"
        before = _snapshot(run)
        assert read_json(run / "manifest.json")["status"] == "running" and "checkpoints/last.pt" in before
        started = time.time()
        second = _cli("train", "--params", str(SMOKE), "--set", f"cache_dir={tmp_path / 'cache'}",
                      *[a for o in args for a in ("--set", o)], "--no-progress")
        elapsed = time.time() - started
        after = _snapshot(run)
    finally:
        resume.set()
        first.join(120)
    assert second.returncode == 2, second.stderr
    lines = _lines(second.stderr)
    assert len(lines) == 1 and f"pid {os.getpid()}" in lines[0] and "in use" in lines[0], second.stderr
    assert elapsed < 60
    assert after == before, "the second process must not write anything"
    assert result["summary"]["steps"] == 8
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 9))
    assert read_json(run / "manifest.json")["status"] == "finished"


def test_a_dead_holders_lock_is_taken_over_also_without_flock(tmp_path, monkeypatch):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / ".lock").write_text(str(dead.pid))  # what a killed holder leaves behind
    with run.lock():
        assert (run.path / ".lock").read_text() == str(os.getpid())
    # a file system without flock (some network mounts): the pid in .lock decides
    import dpkd_lib.rundir as rundir_mod

    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(rundir_mod.fcntl, "flock", no_flock)
    (run.path / ".lock").write_text(str(dead.pid))
    with run.lock():
        pass
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run.path / ".lock").write_text(str(live.pid))
        with pytest.raises(RunBusy, match=f"pid {live.pid}"):
            with run.lock():
                pass
    finally:
        live.kill()
        live.wait()


def test_force_replaces_a_run_while_holding_the_lock(tmp_path):
    from test_rundir import params
    run = RunDir(tmp_path / "run")
    with run.lock():
        assert run.prepare(params()) == "fresh"
    run.write_manifest(status="finished")
    (run.path / "summary.json").write_text("{}")
    with run.lock():
        assert run.prepare(params("train.beta=0.3"), force=True) == "fresh"
        with pytest.raises(RunBusy):  # the new folder is locked before the old lock is let go
            with RunDir(run.path).lock():
                pass
    moved = [p for p in tmp_path.iterdir() if ".replaced-" in p.name]
    assert len(moved) == 1 and (moved[0] / "summary.json").exists()


# ----------------------------------------------------------------------------- corrupt files

def test_truncated_checkpoint_falls_back_to_the_previous_one_with_identical_results(tmp_path, monkeypatch,
                                                                                     caplog):
    """Row "checkpoints/last.pt truncated" (old: every rerun died with a PytorchStreamReader
    traceback, the manifest stuck at running). Now the rerun warns in one line, resumes from
    previous.pt (or, both damaged, from step 0) and ends with the uninterrupted run's weights."""
    common = ["train.save_every=2", "eval.splits=[]"]
    train(_cfg(tmp_path, "ref", *common), progress=False)
    for name, damaged in (("one", ["last.pt"]), ("both", ["last.pt", "previous.pt"])):
        run = tmp_path / name
        _crash_at(monkeypatch, 6)  # dies in step 7: checkpoints of steps 6 (last) and 4 (previous)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(_cfg(tmp_path, name, *common), progress=False)
        monkeypatch.undo()
        manifest = read_json(run / "manifest.json")
        assert manifest["status"] == "failed" and "simulated crash" in manifest["error"]
        for file in damaged:
            path = run / "checkpoints" / file
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dpkd_lib"):
            summary = train(_cfg(tmp_path, name, *common), progress=False)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == len(damaged) and all("\n" not in w for w in warnings), warnings
        assert "last.pt is unreadable" in warnings[0]
        assert ("falling back to checkpoints/previous.pt" if name == "one" else "starting over") in warnings[-1]
        assert summary["steps"] == 8 and read_json(run / "manifest.json")["status"] == "finished"
        assert (run / "checkpoints" / "last.corrupt").exists(), "the damaged file is kept aside"
        assert _rows(run) == _rows(tmp_path / "ref")
        assert _same_weights(run, tmp_path / "ref"), name


def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_ones(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    state = {"step": 2, "model": {"w": torch.ones(3)}, "optimizer": {}, "rng": {}}
    run.save_checkpoint(state)
    run.save_checkpoint(dict(state, step=4))
    last = run.file("checkpoints/last.pt")
    before = last.read_bytes()

    def disk_full(obj, path):  # a full disk: a short file, and torch.save does not notice
        Path(path).write_bytes(b"PK\x03\x04 truncated")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError) as err:
        run.save_checkpoint(dict(state, step=6))
    assert "\n" not in str(err.value) and "previous checkpoints are kept" in str(err.value)
    assert last.read_bytes() == before and not run.file("checkpoints/last.tmp").exists()
    assert run.load_checkpoint()["step"] == 4


def test_a_damaged_teacher_cache_is_rebuilt(tmp_path, caplog):
    common = ["train.teacher_mode=cache", "train.cache_format=hidden", "eval.splits=[]", "train.max_steps=3"]
    train(_cfg(tmp_path, "a", *common), progress=False)
    signals = list((tmp_path / "cache").glob("*/signals.safetensors"))
    assert signals
    for path in signals:
        path.write_bytes(path.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="dpkd_lib"):
        train(_cfg(tmp_path, "b", *common), progress=False)
    assert sum("unreadable" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records) \
        == len(signals)
    assert _same_weights(tmp_path / "a", tmp_path / "b")


def test_eval_of_a_truncated_or_missing_model_is_one_line_naming_the_file(tmp_path):
    """Rows "eval --model DIR with a truncated model.safetensors" (old: 28-line traceback)
    and "eval --model /no/such/dir" (old: a message about the hub and the network)."""
    from dpkd_lib.evaluate import evaluate_saved
    train(_cfg(tmp_path, "run", "train.max_steps=1", "eval.splits=[]"), progress=False)
    cfg = load_config(SMOKE, ["eval.max_examples=2"], purpose="eval")
    model = tmp_path / "run" / "model"
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError) as err:
        evaluate_saved(cfg, model, tmp_path / "out", progress=False)
    message = str(err.value)
    assert "\n" not in message and str(weights) in message and "corrupt" in message
    with pytest.raises(ModelLoadError) as err:
        evaluate_saved(cfg, "/no/such/dir", tmp_path / "out", progress=False)
    message = str(err.value).lower()
    assert "/no/such/dir" in message and "no such model folder" in message
    assert "hub" not in message and "network" not in message
    (model / "config.json").write_text('{"model_type": ')  # a damaged config: about the folder, not the hub
    with pytest.raises(ModelLoadError) as err:
        evaluate_saved(cfg, model, tmp_path / "out", progress=False)
    assert "config" in str(err.value) and "network" not in str(err.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- params checked first

def _float_fields():
    for section in ("tokenizer", "student", "data", "train", "eval"):
        cls = typing.get_type_hints(config_mod.RunConfig)[section]
        for f in dataclasses.fields(cls):
            if typing.get_type_hints(cls)[f.name] is float:
                yield f"{section}.{f.name}"


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf"])
def test_every_float_param_refuses_nan_and_inf(value):
    """Row "train.beta=nan, train.lr=nan, train.kd_ratio=nan, train.lr=inf" (old: passed
    validation, failed after the models loaded)."""
    keys = list(_float_fields())
    assert {"train.beta", "train.lr", "train.kd_ratio", "eval.top_p", "student.lora_dropout"} <= set(keys)
    for key in keys:
        with pytest.raises(ConfigError, match=re.escape(key) + ".*not a finite number"):
            load_config(SMOKE, [f"{key}={value}"])


@pytest.mark.parametrize("override", ["eval.max_new_tokens=-1", "eval.top_p=2", "eval.batch_size=0",
                                      "eval.max_examples=-1", "eval.top_k=-1", "eval.temperature=0",
                                      "teacher.n_embd=30", "student.prune_to=2", "data.max_length=600"])
def test_eval_and_model_ranges_are_checked_before_any_work(override, tmp_path):
    """Rows "eval.max_new_tokens=-1, eval.top_p=2, eval.batch_size=0" (old: accepted, the
    whole run trained, then failed) and "eval.max_examples=-1" (old: evaluated all but one)."""
    extra = ["eval.sample_seeds=[1]"] if override.split("=")[0] in ("eval.top_p", "eval.top_k",
                                                                     "eval.temperature") else []
    for purpose in ("train", "eval") if override.startswith("eval") else ("train",):
        with pytest.raises(ConfigError, match=re.escape(override.split("=")[0])):
            load_config(SMOKE, [f"output_dir={tmp_path / 'run'}", override, *extra], purpose=purpose)
    assert not (tmp_path / "run").exists()


def test_a_run_stopped_before_its_first_checkpoint_is_replaced_without_force(tmp_path, monkeypatch):
    """The second half of the eval-range row (old: the corrected command was refused as
    "different params" until --force) and of the NaN row (old: a NaN loss message pointing at
    a checkpoint folder that did not exist)."""
    run = tmp_path / "run"
    _nan_on_call(monkeypatch, bad_call=1)
    with pytest.raises(TrainingFault) as err:
        train(_cfg(tmp_path, "run", "train.save_every=2", "eval.splits=[]"), progress=False)
    monkeypatch.undo()
    assert "no checkpoint was written yet" in str(err.value) and "checkpoints/" not in str(err.value)
    assert read_json(run / "manifest.json")["status"] == "failed" and not (run / "checkpoints").exists()
    summary = train(_cfg(tmp_path, "run", "train.save_every=2", "eval.splits=[]", "train.lr=0.0005"),
                    progress=False)
    assert summary["steps"] == 8
    aside = [p for p in tmp_path.iterdir() if ".replaced-" in p.name]
    assert len(aside) == 1 and read_json(aside[0] / "manifest.json")["status"] == "failed", "moved, not deleted"
    # a run with progress (a checkpoint) still needs --force
    _crash_at(monkeypatch, 5)
    with pytest.raises(RuntimeError):
        train(_cfg(tmp_path, "progress", "train.save_every=2", "eval.splits=[]"), progress=False)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="different params.*--force"):
        train(_cfg(tmp_path, "progress", "train.save_every=2", "eval.splits=[]", "train.lr=0.0005"),
              progress=False)


# ----------------------------------------------------------------------------- numerical faults

def test_skipping_stops_on_non_finite_weights_and_past_the_share(tmp_path, monkeypatch):
    """Row "train.nan_policy=skip with lr=inf" (old: exit 0, status finished, 7 of 8 steps
    skipped, valid NLL NaN). inf is now refused by the params check; a finite lr that blows
    the weights up gives the same run, which now stops (TrainingFault: exit 3) as failed."""
    with pytest.raises(TrainingFault, match="weights are not finite") as err:
        train(_cfg(tmp_path, "huge", "train.lr=1e30", "train.nan_policy=skip", "train.max_skipped_share=1",
                   "eval.splits=[]"), progress=False)
    assert "\n" not in str(err.value)
    manifest = read_json(tmp_path / "huge" / "manifest.json")
    assert manifest["status"] == "failed" and not (tmp_path / "huge" / "summary.json").exists()
    # the share: every loss from the 5th call on is NaN (sft_loss runs twice a step here)
    calls = {"n": 0}
    import dpkd_lib.losses as losses_mod
    original = losses_mod.sft_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        value = original(*args, **kwargs)
        return value * float("nan") if calls["n"] >= 5 else value
    monkeypatch.setattr(losses_mod, "sft_loss", flaky)
    with pytest.raises(TrainingFault, match=r"3 of 5 steps had a non-finite loss.*max_skipped_share=0.25"):
        train(_cfg(tmp_path, "share", "train.nan_policy=skip", "train.max_skipped_share=0.25",
                   "eval.splits=[]"), progress=False)
    assert read_json(tmp_path / "share" / "manifest.json")["status"] == "failed"


def test_every_json_file_is_strict_json(tmp_path):
    """Row "metrics.jsonl writes bare NaN / Infinity": non-finite numbers are null."""
    run = tmp_path / "run"
    train(_cfg(tmp_path, "run", "train.clip_grad=0", "eval.max_examples=4", "eval.max_new_tokens=8"),
          progress=False)

    def fail(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")
    for name in ("metrics.jsonl", "eval.jsonl"):
        rows = [json.loads(line, parse_constant=fail) for line in (run / name).read_text().splitlines()]
        assert rows
    for name in ("summary.json", "manifest.json"):
        json.loads((run / name).read_text(), parse_constant=fail)
    assert all(r["grad_norm"] is None for r in read_jsonl(run / "metrics.jsonl")), "no clipping: norm undefined"


# ----------------------------------------------------------------------------- interrupts

def test_sigterm_and_sigint_stop_in_one_line_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
    """Row "Ctrl-C (SIGINT) during train" (old: 34-line traceback, manifest left running).
    A real `train` process gets SIGTERM, its rerun SIGINT: each exits 130 with one line,
    manifest `interrupted` at the step of a checkpoint; the third run of the same command
    finishes with the uninterrupted run's metrics, summary and weights."""
    overrides = ["train.max_steps=40", "train.save_every=25", "eval.max_examples=4", "eval.max_new_tokens=8"]
    train(_cfg(tmp_path, "ref", *overrides), progress=False)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dpkd_lib", "train", "--params", str(SMOKE), "--no-progress",
           *[a for o in [f"output_dir={run}", f"cache_dir={tmp_path / 'cache'}", *overrides]
             for a in ("--set", o)]]
    steps = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline, wanted = time.time() + 180, (steps[-1] if steps else 0) + 3
        metrics = run / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= wanted:
                break
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=180)
        lines = _lines(err)
        assert proc.returncode == 130 and len(lines) == 1, err
        found = re.fullmatch(rf"stopped: interrupted \({sig.name}\) at step (\d+); rerun the same command "
                             r"to resume", lines[0])
        assert found, lines
        steps.append(int(found.group(1)))
        assert wanted <= steps[-1] < 40, "the signal must land mid-training"
        manifest = read_json(run / "manifest.json")
        assert manifest["status"] == "interrupted" and manifest["interrupted_at"] == steps[-1]
        assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["step"] == steps[-1]
    final = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert read_json(run / "manifest.json")["status"] == "finished"
    assert _comparable(read_json(run / "summary.json")) == _comparable(read_json(tmp_path / "ref" / "summary.json"))
    assert _rows(run) == _rows(tmp_path / "ref")
    assert _same_weights(run, tmp_path / "ref")


def test_an_interrupt_outside_the_loop_stops_at_once_and_is_recorded(tmp_path, monkeypatch):
    """Ctrl-C during set-up (models loading) or SIGTERM during the final evaluation: no
    waiting for a step's end, one line, manifest `interrupted`; the rerun finishes."""
    def kill_then(name, sig):
        original = getattr(train_mod.Trainer, name)

        def method(self, *args):
            os.kill(os.getpid(), sig)
            time.sleep(5)  # not reached: the signal stops the run at once
            return original(self, *args)
        monkeypatch.setattr(train_mod.Trainer, name, method)

    args = ["train.save_every=4", "eval.max_examples=2", "eval.max_new_tokens=4"]
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    kill_then("setup", signal.SIGINT)
    started = time.time()
    with pytest.raises(KeyboardInterrupt, match=r"^interrupted \(SIGINT\) during set-up; rerun the same "
                                                r"command to resume \(from step 0\)$"):
        train(_cfg(tmp_path, "run", *args), progress=False)
    assert time.time() - started < 4
    assert read_json(tmp_path / "run" / "manifest.json")["status"] == "interrupted"
    monkeypatch.undo()
    kill_then("final_eval", signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match=r"^interrupted \(SIGTERM\) during the final evaluation after "
                                                r"step 8; rerun the same command to resume \(from step 4\)$"):
        train(_cfg(tmp_path, "run", *args), progress=False)
    assert read_json(tmp_path / "run" / "manifest.json")["status"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) == before, "handlers restored"
    monkeypatch.undo()
    assert train(_cfg(tmp_path, "run", *args), progress=False)["steps"] == 8
    assert read_json(tmp_path / "run" / "manifest.json")["status"] == "finished"


# ----------------------------------------------------------------------------- study driver

def test_study_driver_names_file_and_line_of_a_params_error(tmp_path, monkeypatch, capsys):
    """Row "a YAML syntax error in params/<profile>/01_*.yaml" (old: a 63-line traceback
    that never named the file): one line, the file and the line, exit 2."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "00_a.ipynb").write_text("{}")
    (tmp_path / "notebooks" / "01_b.ipynb").write_text("{}")
    params = tmp_path / "params" / "p"
    params.mkdir(parents=True)
    (params / "00_a.yaml").write_text("x: 1\n")
    (params / "01_b.yaml").write_text("x: 1\nmethods: [sft, kd\nseeds: 3\n")
    monkeypatch.setattr(study, "REPO_ROOT", tmp_path)
    args = ["--profile", "p", "--results-root", str(tmp_path / "res"), "--quiet"]
    assert study.main(args) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and re.search(r"params/p/01_b\.yaml: line 3: not valid YAML", lines[0]), lines
    (params / "01_b.yaml").write_text("- a list\n")
    assert study.main(args) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and "01_b.yaml" in lines[0] and "mapping" in lines[0], lines


# ----------------------------------------------------------------------------- the tokenizer's corpus

def test_the_pydoc_corpus_is_shipped_not_read_from_the_running_python(monkeypatch):
    """Row "tokenizer.kind: bpe_local trained on the running CPython's pydoc_data" (old: two
    Python patch versions, two tokenizers). The corpus is a checked asset; a different
    pydoc_data changes nothing."""
    import gzip
    import hashlib

    from dpkd_lib import data as data_lib
    from dpkd_lib.tokenization import default_corpus_texts

    asset = Path(data_lib.__file__).parent / "assets" / data_lib.PYDOC_ASSET
    raw = gzip.decompress(asset.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == data_lib.PYDOC_SHA256 == \
        "b32b93153c281b2f92d482f0907dcca305fcef61740739b0d7d66619af59a221"
    assert asset.stat().st_size < 400_000
    corpus, texts = data_lib.pydoc_corpus(), default_corpus_texts(n_synthetic=50)
    if sys.version_info[:3] == (3, 11, 7):  # the asset is this Python's text: no result moved here
        from pydoc_data.topics import topics
        assert corpus == [t for t in (topics[k].strip() for k in sorted(topics)) if t]
    monkeypatch.setitem(sys.modules, "pydoc_data.topics",
                        types.SimpleNamespace(topics={"assignment": "another Python's help text"}))
    assert data_lib.pydoc_corpus() == corpus and default_corpus_texts(n_synthetic=50) == texts
    assert len(corpus) == 79 and sum(map(len, corpus)) == 464891
