"""Reliability, third pass (issue 25, part A: run folders, checkpoints, resources, the study
driver). Each test names the case of the issue's table it covers: what happened on main
3c951d8, which the test catches, and what happens now."""
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dpkd_lib.models as models_mod
import dpkd_lib.rundir as rundir_mod
import dpkd_lib.train as train_mod
from dpkd_lib.config import ConfigError
from dpkd_lib.errors import OutOfResources, RunBusy
from dpkd_lib.io import read_json
from dpkd_lib.rundir import RunDir
from dpkd_lib.train import train

from test_config import ROOT, SMOKE
from test_reliability_2 import _cfg, _crash_at, _lines, _rows, _same_weights, _snapshot

ALLOC = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: " \
        "you tried to allocate 457000000 bytes. Error code 12 (Cannot allocate memory)"
COMMON = ["train.save_every=2", "eval.splits=[]"]


def _one_line(message: str) -> str:
    assert "\n" not in message and message.strip(), message
    return message


def _stopped_at_step_7(tmp_path, monkeypatch, name):
    """A run that died in step 7: checkpoints of steps 6 (last) and 4 (previous)."""
    _crash_at(monkeypatch, 6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_cfg(tmp_path, name, *COMMON), progress=False)
    monkeypatch.undo()
    return tmp_path / name


# ----------------------------------------------------------------------------- case 1

def test_a_memory_error_while_resuming_changes_nothing_and_the_rerun_resumes(tmp_path, monkeypatch):
    """Case 1 (old: any exception while loading meant corruption: the good last.pt moved to
    last.corrupt, metrics.jsonl cut to 0 rows). Now: one line "not enough memory to load the
    checkpoint …; nothing was changed", both checkpoints and metrics.jsonl byte for byte as
    they were; the rerun with memory resumes and ends with the uninterrupted run's weights."""
    train(_cfg(tmp_path, "ref", *COMMON), progress=False)
    run = _stopped_at_step_7(tmp_path, monkeypatch, "run")
    before = {p: (run / p).read_bytes() for p in ("checkpoints/last.pt", "checkpoints/previous.pt",
                                                  "metrics.jsonl")}
    for error in (MemoryError(), RuntimeError(ALLOC)):
        def no_memory(*args, **kwargs):
            raise error
        monkeypatch.setattr(torch, "load", no_memory)
        with pytest.raises(OutOfResources) as err:
            train(_cfg(tmp_path, "run", *COMMON), progress=False)
        monkeypatch.undo()
        message = _one_line(str(err.value))
        assert message.startswith(f"not enough memory to load the checkpoint {run / 'checkpoints' / 'last.pt'}")
        assert "nothing was changed" in message
        assert ("457.0 MB" in message) == isinstance(error, RuntimeError), "the size, when the allocator says it"
        assert {p: (run / p).read_bytes() for p in before} == before
        assert not list(run.glob("checkpoints/*.corrupt"))
        manifest = read_json(run / "manifest.json")
        assert manifest["status"] == "failed" and "not enough memory" in manifest["error"]
    summary = train(_cfg(tmp_path, "run", *COMMON), progress=False)
    assert summary["steps"] == 8 and _rows(run) == _rows(tmp_path / "ref")
    assert _same_weights(run, tmp_path / "ref")


RLIMIT_SCRIPT = r"""
import json, resource, sys
import torch
from dpkd_lib.rundir import RunDir
run = RunDir(sys.argv[1])
if sys.argv[2] == "write":
    run.save_checkpoint({"step": 6, "model": {"w": torch.ones(25_000_000)}, "optimizer": {}, "rng": {}})
    sys.exit(0)
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 40_000_000, vm + 40_000_000))  # a 100 MB checkpoint cannot fit
try:
    state = run.load_checkpoint()
    print(json.dumps({"loaded": state is not None}))
except Exception as err:
    print(json.dumps({"error": type(err).__name__, "message": str(err)}))
"""


def test_a_real_memory_limit_while_loading_keeps_the_checkpoint(tmp_path):
    """Case 1 with a real limit (resource.setrlimit(RLIMIT_AS) in a subprocess, as `prlimit
    --as` did in the issue): the allocator's error is not corruption."""
    script = tmp_path / "limit.py"
    script.write_text(RLIMIT_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    subprocess.run([sys.executable, str(script), str(run), "write"], check=True, env=env, timeout=120)
    last = run / "checkpoints" / "last.pt"
    size = last.stat().st_size
    out = subprocess.run([sys.executable, str(script), str(run), "load"], env=env, timeout=120,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result.get("error") == "OutOfResources", result
    assert "not enough memory to load the checkpoint" in result["message"]
    assert last.exists() and last.stat().st_size == size and not (run / "checkpoints" / "last.corrupt").exists()
    assert RunDir(run).load_checkpoint()["step"] == 6, "with memory it loads"


def test_a_checkpoint_whose_bytes_changed_is_moved_aside_even_if_it_parses(tmp_path, caplog):
    """Case 1, the other side: a damaged file is still moved aside. Damage that torch.load
    does not notice (bytes flipped inside a tensor, same size; old: loaded, resumed from
    wrong weights) fails the recorded sha256; a truncated one fails the recorded size."""
    run = RunDir(tmp_path / "run")
    state = {"step": 2, "model": {"w": torch.arange(4096, dtype=torch.float32)}, "optimizer": {}, "rng": {}}
    run.save_checkpoint(state)
    run.save_checkpoint(dict(state, step=4))
    last = run.file("checkpoints/last.pt")
    raw = bytearray(last.read_bytes())
    at = raw.index(torch.arange(4096, dtype=torch.float32).numpy().tobytes()[400:416])
    raw[at:at + 16] = bytes(16)
    last.write_bytes(bytes(raw))
    assert torch.load(last, weights_only=False)["step"] == 4, "torch.load does not see this damage"
    with caplog.at_level(logging.WARNING, logger="dpkd_lib"):
        state_read = run.load_checkpoint()
    assert state_read["step"] == 2 and run.file("checkpoints/last.corrupt").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "sha256 differs" in warnings[0] and "falling back" in warnings[0]
    previous = run.file("checkpoints/previous.pt")
    previous.write_bytes(previous.read_bytes()[:-100])
    assert run.load_checkpoint() is None and run.file("checkpoints/previous.corrupt").exists()


def test_an_io_error_while_loading_is_not_damage(tmp_path, monkeypatch):
    """Case 1, I/O: an EIO while reading a checkpoint (a failing disk, a network mount that
    went away; old: moved aside as corrupt) is one line, nothing moved."""
    run = RunDir(tmp_path / "run")
    run.save_checkpoint({"step": 2, "model": {"w": torch.ones(8)}, "optimizer": {}, "rng": {}})

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")
    for target in ("file_sha256", "torch"):
        if target == "torch":
            monkeypatch.setattr(torch, "load", eio)
            (tmp_path / "run" / "checkpoints" / "integrity.json").unlink()  # an older run: no record
        else:
            monkeypatch.setattr(rundir_mod, "file_sha256", eio)
        with pytest.raises(OSError, match=r"could not be read .*nothing was changed") as err:
            run.load_checkpoint()
        _one_line(str(err.value))
        monkeypatch.undo()
        assert run.file("checkpoints/last.pt").exists() and not run.file("checkpoints/last.corrupt").exists()
    assert run.load_checkpoint()["step"] == 2


# ----------------------------------------------------------------------------- case 2

def _disk_full_in_model_save(monkeypatch):
    """The model save writes part of its files into model.tmp-<pid>, then the disk is full
    (safetensors raises its own error type with the OS's words)."""
    original = models_mod._write_model

    class SafetensorError(Exception):
        pass

    def write(model, tmp, *args, **kwargs):
        Path(tmp).mkdir(parents=True, exist_ok=True)
        (Path(tmp) / "config.json").write_text("{}")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")
    monkeypatch.setattr(models_mod, "_write_model", write)
    return original


def test_a_full_disk_at_the_model_save_is_one_line_recorded_and_resumable(tmp_path, monkeypatch):
    """Case 2, model save (old: a raw SafetensorError traceback, the manifest left
    `running`, the temporary model folder left behind). Now: one line naming the model
    folder and the size it needs, the manifest `failed` with that reason, no temporary
    left; after freeing space the same command finishes like an uninterrupted run."""
    train(_cfg(tmp_path, "ref", *COMMON), progress=False)
    _disk_full_in_model_save(monkeypatch)
    with pytest.raises(OutOfResources) as err:
        train(_cfg(tmp_path, "run", *COMMON), progress=False)
    monkeypatch.undo()
    run = tmp_path / "run"
    message = _one_line(str(err.value))
    assert re.search(rf"the model could not be written to {re.escape(str(run / 'model'))}: no space left on "
                     r"the disk \(it needs about [\d.]+ [KM]B, .* free\)", message), message
    manifest = read_json(run / "manifest.json")
    assert manifest["status"] == "failed" and "no space left" in manifest["error"]
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name or ".old-" in p.name]
    assert train(_cfg(tmp_path, "run", *COMMON), progress=False)["steps"] == 8
    assert _rows(run) == _rows(tmp_path / "ref") and _same_weights(run, tmp_path / "ref")


def test_when_even_the_manifest_cannot_be_written_the_first_error_is_the_one_shown(tmp_path, monkeypatch):
    """Case 2, less space (old: the real message was masked by a second ENOSPC from the
    manifest write). Now the first error comes out, says the manifest could not be updated,
    and the run stays resumable (its manifest still says running)."""
    run = tmp_path / "run"
    _disk_full_in_model_save(monkeypatch)
    original = rundir_mod.write_json

    def manifest_write(path, obj):
        if Path(path).name == "manifest.json" and obj.get("status") == "failed":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, obj)
    monkeypatch.setattr(rundir_mod, "write_json", manifest_write)
    with pytest.raises(OutOfResources) as err:
        train(_cfg(tmp_path, "run", *COMMON), progress=False)
    monkeypatch.undo()
    message = _one_line(str(err.value))
    assert message.startswith("the model could not be written") and \
        "the manifest could not be updated: it still says running" in message
    assert read_json(run / "manifest.json")["status"] == "running"
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert train(_cfg(tmp_path, "run", *COMMON), progress=False)["steps"] == 8


def test_a_full_disk_at_a_checkpoint_is_one_line_with_the_size_needed(tmp_path, monkeypatch):
    """Case 2, checkpoint (old: "could not be written and read back (OSError: [Errno 28] …)"
    without what it needs). Now: one line naming the checkpoint, the size it needs, the
    free space; the manifest `failed` with it; no temporary; the rerun resumes from the
    previous checkpoint to the uninterrupted run's weights."""
    train(_cfg(tmp_path, "ref", *COMMON), progress=False)
    calls = {"n": 0}
    original = torch.save

    def save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint of step 4
            Path(path).write_bytes(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OutOfResources) as err:
        train(_cfg(tmp_path, "run", *COMMON), progress=False)
    monkeypatch.undo()
    run = tmp_path / "run"
    message = _one_line(str(err.value))
    assert re.search(r"checkpoint .*last\.pt could not be written: no space left on the disk \(it needs about "
                     r"[\d.]+ [KM]B, .* were free\); the previous checkpoints are kept", message), message
    assert read_json(run / "manifest.json")["status"] == "failed"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["integrity.json", "last.pt"]
    assert train(_cfg(tmp_path, "run", *COMMON), progress=False)["steps"] == 8
    assert _rows(run) == _rows(tmp_path / "ref") and _same_weights(run, tmp_path / "ref")


def test_stale_temporaries_of_dead_processes_are_removed_when_the_folder_is_next_opened(tmp_path, caplog):
    """Case 2, the way out (old: an empty <name>.tmp-<pid>/ stayed for good). A killed writer's
    temporaries (model folder, atomic JSON writes, checkpoint) go when the next run takes the
    folder's lock; a live process's are left alone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = tmp_path / "run"
    train(_cfg(tmp_path, "run", "train.max_steps=2", "eval.splits=[]"), progress=False)
    (run / "manifest.json").write_text(json.dumps(dict(read_json(run / "manifest.json"), status="interrupted")))
    stale = [run / f"model.tmp-{dead.pid}", run / f"model.old-{dead.pid}"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    stale += [run / f".manifest.json.{dead.pid}.ab12_x.tmp", run / "checkpoints" / "last.tmp"]
    for file in stale[2:]:
        file.parent.mkdir(exist_ok=True)
        file.write_text("half")
    live = run / f"model.tmp-{os.getppid()}"
    live.mkdir()
    with caplog.at_level(logging.INFO, logger="dpkd_lib"):
        train(_cfg(tmp_path, "run", "train.max_steps=2", "eval.splits=[]"), progress=False)
    assert not [p for p in stale if p.exists()], [p for p in stale if p.exists()]
    assert live.exists(), "a live process's temporary stays"
    assert any("removed temporaries of an earlier process" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- case 3

@pytest.mark.parametrize("where", ["loading", "training", "evaluation"])
def test_a_memory_error_anywhere_in_a_run_is_one_line_and_the_run_resumes(where, tmp_path, monkeypatch):
    """Case 3 (old: raw MemoryError / allocator RuntimeError tracebacks). Now one line
    naming the phase (and the size when the allocator says it), the manifest `failed`
    with it, the checkpoints kept; the same command then resumes and finishes."""
    args = ["train.save_every=4", "eval.max_examples=2", "eval.max_new_tokens=4"]
    target = {"loading": (models_mod, "build_model"), "training": (train_mod.Trainer, "step_loss"),
              "evaluation": (train_mod.Trainer, "final_eval")}[where]
    original = getattr(*target)
    calls = {"n": 0}

    def failing(*a, **kw):
        calls["n"] += 1
        if where != "training" or calls["n"] == 6:
            raise MemoryError() if where == "loading" else RuntimeError(ALLOC)
        return original(*a, **kw)
    monkeypatch.setattr(*target, failing)
    with pytest.raises(OutOfResources) as err:
        train(_cfg(tmp_path, "run", *args), progress=False)
    monkeypatch.undo()
    message = _one_line(str(err.value))
    phase = {"loading": "the set-up", "training": "training step 6",
             "evaluation": "the final evaluation after step 8"}[where]
    assert message.startswith(f"not enough memory during {phase}"), message
    assert ("it tried to allocate 457.0 MB" in message) == (where != "loading")
    assert "rerun the same command to resume" in message
    manifest = read_json(tmp_path / "run" / "manifest.json")
    assert manifest["status"] == "failed" and manifest["error"] == message
    assert train(_cfg(tmp_path, "run", *args), progress=False)["steps"] == 8


def test_the_command_line_says_a_memory_error_in_one_line(tmp_path):
    """Case 3 through `python -m dpkd_lib train` / `eval` (old: a traceback, exit 1)."""
    runner = tmp_path / "runner.py"
    runner.write_text(
        "import sys\n"
        "import dpkd_lib.train as t, dpkd_lib.evaluate as e\n"
        "def boom(*a, **k):\n    raise MemoryError()\n"
        "t.Trainer.step_loss = boom\ne.evaluate_model = boom\n"
        "from dpkd_lib.__main__ import main\nsys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, str(runner), "train", "--params", str(SMOKE), "--no-progress",
                          "--set", f"output_dir={run}", "--set", f"cache_dir={tmp_path / 'cache'}"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and len(_lines(out.stderr)) == 1, out.stderr[-3000:]
    assert out.stderr.startswith("error: not enough memory during training step 1"), out.stderr
    train(_cfg(tmp_path, "done", "train.max_steps=1", "eval.splits=[]"), progress=False)
    out = subprocess.run([sys.executable, str(runner), "eval", "--params", str(SMOKE), "--no-progress",
                          "--model", str(tmp_path / "done" / "model"), "--out", str(tmp_path / "ev")],
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and len(_lines(out.stderr)) == 1, out.stderr[-3000:]
    assert out.stderr.startswith("error: not enough memory during eval"), out.stderr


# ----------------------------------------------------------------------------- cases 4 and 5

def _study_repo(tmp_path, cell: str) -> Path:
    """A repo with one notebook running `cell` (the driver's REPO_ROOT) and a driver script."""
    import nbformat
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "params" / "p").mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("profile = 'p'\nresults_root = None\nforce = False")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(cell)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, repo / "notebooks" / "00_work.ipynb")
    (repo / "params" / "p" / "00_work.yaml").write_text("x: 1\n")
    (repo / "drive.py").write_text(
        "import sys\nfrom pathlib import Path\nimport dpkd_lib.study.driver as s\n"
        "s.REPO_ROOT = Path(sys.argv[1])\n"
        "sys.exit(s.main(['--profile', 'p', '--results-root', sys.argv[2], '--quiet', *sys.argv[3:]]))\n")
    return repo


def _driver(repo, results, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(repo / "drive.py"), str(repo), str(results), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline and not path.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    assert path.exists(), f"{path} never appeared"


def _stopped_line(stderr: str) -> str:
    """The driver's own lines (the kernel's start-up warning about TCP is not the driver's)."""
    lines = [line for line in _lines(stderr) if not line.startswith("[IPKernelApp]")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "ZMQError" not in stderr, stderr
    return lines[0]


def test_a_second_study_driver_on_one_results_root_refuses_naming_the_holder(tmp_path):
    """Case 4 (old: no lock; both used .00_theory.running.ipynb and rewrote status.json, the
    second died with FileNotFoundError or moved the first's notebook to .failed). Now the
    second exits 2 in one line naming the holder's pid, host and start, touching nothing;
    the first's temporary copy is its own (pid in the name) and stays until it ends."""
    repo = _study_repo(tmp_path, "import pathlib, time\npathlib.Path(results_root, 'started').touch()\n"
                                 "time.sleep(120)")
    results = tmp_path / "results"
    first = _driver(repo, results)
    try:
        _wait_for(results / "started", first)
        before = _snapshot(results)
        assert f".00_work.{first.pid}.running.ipynb" in {Path(p).name for p in before}
        second = _driver(repo, results)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        line = _stopped_line(err)
        assert re.fullmatch(rf"error: results root .* is in use by another process \(pid {first.pid}, host "
                            rf"\S+, since \d{{4}}-\d\d-\d\dT[\d:]+\); wait for it to finish or stop it, then "
                            r"rerun", line), line
        assert _snapshot(results) == before, "the second driver must not write anything"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 130


def test_sigterm_and_sigint_stop_the_study_driver_in_one_line(tmp_path):
    """Case 5 (old: SIGTERM exit 143 with no message, status.json `running`, a stray
    .NN.running.ipynb; SIGINT a kernel ZMQError traceback). A notebook trains a real smoke
    run; SIGTERM, then SIGINT to the driver: the training run inside saves a checkpoint and
    records `interrupted`, the driver exits 130 with one line, status.json says
    `interrupted`, no temporary notebook stays; the third driver finishes, resuming."""
    cell = ("import pathlib\nfrom dpkd_lib.config import load_config\nfrom dpkd_lib.train import train\n"
            f"cfg = load_config({str(SMOKE)!r}, ['output_dir=' + str(pathlib.Path(results_root, 'run')), "
            f"'cache_dir={tmp_path / 'cache'}', 'train.max_steps=60', 'train.save_every=20', "
            "'eval.splits=[]'])\nprint(train(cfg, progress=False)['steps'])")
    repo = _study_repo(tmp_path, cell)
    results = tmp_path / "results"
    metrics, marks = results / "run" / "metrics.jsonl", []
    for sig in (signal.SIGTERM, signal.SIGINT):
        driver = _driver(repo, results)
        deadline, wanted = time.time() + 240, (marks[-1] if marks else 0) + 3
        while time.time() < deadline and driver.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= wanted:
                break
            time.sleep(0.05)
        driver.send_signal(sig)
        out, err = driver.communicate(timeout=240)
        assert driver.returncode == 130, err
        assert _stopped_line(err) == (f"stopped: interrupted ({sig.name}) in notebook 00_work; rerun the same "
                                      f"command to go on (finished notebooks are reused, training runs resume)")
        status = read_json(results / "notebooks" / "status.json")["notebooks"]["00_work"]
        assert status["status"] == "interrupted"
        assert not list((results / "notebooks").glob(".*.ipynb")), "temporaries removed"
        manifest = read_json(results / "run" / "manifest.json")
        assert manifest["status"] == "interrupted", "the signal reached the training run in the kernel"
        marks.append(manifest["interrupted_at"])
        assert torch.load(results / "run" / "checkpoints" / "last.pt", weights_only=False)["step"] == marks[-1]
    final = _driver(repo, results)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert read_json(results / "run" / "manifest.json")["status"] == "finished"
    assert read_json(results / "notebooks" / "status.json")["notebooks"]["00_work"]["status"] == "finished"


# ----------------------------------------------------------------------------- case 12

def _read_only(monkeypatch):
    """A read-only mount, as the lock sees it (tests run as root, where chmod stops nothing):
    opening any .lock for writing fails with EROFS, as on a read-only mount."""
    original = os.open

    def open_(path, flags, *args, **kwargs):
        if str(path).endswith(".lock") and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return original(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", open_)


def test_a_finished_run_on_a_read_only_mount_is_reused_without_a_lock(tmp_path, monkeypatch):
    """Case 12, first half (old: `[Errno 30] … '.lock'`: a finished run on a read-only mount
    could not be reused). Now train, run_grid and evaluate_models read it from there, writing
    nothing; an unfinished one is refused in one line."""
    from dpkd_lib.study.runs import evaluate_models, run_grid
    base = ROOT / "params" / "smoke" / "base_train.yaml"
    results = tmp_path / "results"
    grid = [("sft_s1", ["train.max_steps=1", "eval.max_examples=2", "eval.max_new_tokens=4"])]
    model = {"source": "tiny", "n_layer": 1, "n_embd": 32, "seed": 5}
    for _ in range(2):  # trained, then reused: what a reuse returns
        done = run_grid(base, grid, results, progress=False, verbose=False)
        evaluated = evaluate_models(base, {"student_init": model}, results, progress=False)
    train(_cfg(tmp_path, "run", "train.max_steps=1", "eval.splits=[]"), progress=False)
    before = _snapshot(tmp_path)
    _read_only(monkeypatch)
    assert train(_cfg(tmp_path, "run", "train.max_steps=1", "eval.splits=[]"), progress=False)["steps"] == 1
    assert run_grid(base, grid, results, progress=False, verbose=False) == done
    assert evaluate_models(base, {"student_init": model}, results, progress=False) == evaluated
    assert _snapshot(tmp_path) == before, "nothing written"
    with pytest.raises(OSError) as err:
        train(_cfg(tmp_path, "run", "train.max_steps=2", "eval.splits=[]"), progress=False)
    message = _one_line(str(err.value))
    assert "cannot be written (Read-only file system)" in message and "different params" in message
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- case 14

def test_reuse_under_other_code_says_so_and_refuses_only_with_strict_code(tmp_path, monkeypatch, caplog):
    """Case 14 (old: finished runs were reused silently after a code edit). A run records
    the code fingerprint of dpkd_lib; reused under other code it says so in one line and is
    reused; DPKD_STRICT_CODE=1 (--strict-code) refuses in one line; --force recomputes."""
    args = ["train.max_steps=1", "eval.splits=[]"]
    train(_cfg(tmp_path, "run", *args), progress=False)
    manifest = tmp_path / "run" / "manifest.json"
    assert read_json(manifest)["code"] == rundir_mod.code_fingerprint()
    with caplog.at_level(logging.WARNING, logger="dpkd_lib"):
        train(_cfg(tmp_path, "run", *args), progress=False)
    assert not [r for r in caplog.records if "other code" in r.getMessage()], "same code: silent"
    manifest.write_text(json.dumps(dict(read_json(manifest), code="0123456789ab")))  # made by other code
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpkd_lib"):
        summary = train(_cfg(tmp_path, "run", *args), progress=False)
    notes = [r.getMessage() for r in caplog.records if "other code" in r.getMessage()]
    assert len(notes) == 1 and "0123456789ab" in notes[0] and "reused" in notes[0] and "\n" not in notes[0]
    assert summary["steps"] == 1 and read_json(manifest)["code"] == "0123456789ab", "reused, not rerun"
    monkeypatch.setenv(rundir_mod.STRICT_CODE_ENV, "1")
    with pytest.raises(ConfigError, match=r"made by other code .*--strict-code refuses.*--force"):
        train(_cfg(tmp_path, "run", *args), progress=False)
    train(_cfg(tmp_path, "run", *args), force=True, progress=False)
    assert read_json(tmp_path / "run" / "manifest.json")["code"] == rundir_mod.code_fingerprint()


def test_the_study_driver_says_when_a_reused_notebook_was_made_by_other_code(tmp_path):
    """Case 14 for notebooks: status.json records the code fingerprint; a reused notebook
    made by other code gets one line; --strict-code refuses it (exit 2, one line). (And
    case 4's clean-up: the driver removes dead drivers' temporary notebooks, not a live one's.)"""
    repo = _study_repo(tmp_path, "print('ok')")
    results = tmp_path / "results"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (results / "notebooks").mkdir(parents=True)
    stale = [results / "notebooks" / f".00_work.{dead.pid}.running.ipynb",  # case 4: a dead driver's copy
             results / "notebooks" / ".00_work.running.ipynb"]             # an older driver's
    live = results / "notebooks" / f".00_work.{os.getppid()}.running.ipynb"
    for path in (*stale, live):
        path.write_text("{}")
    first = _driver(repo, results)
    out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    assert not any(p.exists() for p in stale) and live.exists()
    assert "[study] removed temporary notebooks of a driver that died" in out
    status_file = results / "notebooks" / "status.json"
    status = read_json(status_file)
    assert status["notebooks"]["00_work"]["code"] == rundir_mod.code_fingerprint()
    status["notebooks"]["00_work"]["code"] = "0123456789ab"
    status_file.write_text(json.dumps(status))
    again = _driver(repo, results)
    out, err = again.communicate(timeout=180)
    assert again.returncode == 0, err
    assert "00_work: unchanged, reused" in out
    notes = [line for line in out.splitlines() if "other code" in line]
    assert len(notes) == 1 and "notebook 00_work" in notes[0] and "0123456789ab" in notes[0]
    strict = _driver(repo, results, "--strict-code")
    out, err = strict.communicate(timeout=180)
    assert strict.returncode == 2 and len(_lines(err)) == 1 and "--strict-code refuses" in err, err


# ----------------------------------------------------------------------------- items seen in the code

def test_save_every_0_still_checkpoints_before_the_final_evaluation(tmp_path, monkeypatch):
    """Old: with `save_every: 0` a stop in the final evaluation retrained the whole run. Now
    the end of training is checkpointed; the rerun goes straight to the evaluation."""
    args = ["train.save_every=0", "eval.max_examples=2", "eval.max_new_tokens=4"]
    original = train_mod.Trainer.final_eval

    def stop(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return original(self)
    monkeypatch.setattr(train_mod.Trainer, "final_eval", stop)
    with pytest.raises(KeyboardInterrupt, match=r"during the final evaluation after step 8; .*\(from step 8\)"):
        train(_cfg(tmp_path, "run", *args), progress=False)
    monkeypatch.undo()
    steps = {"n": 0}
    step_loss = train_mod.Trainer.step_loss

    def counted(self, index):
        steps["n"] += 1
        return step_loss(self, index)
    monkeypatch.setattr(train_mod.Trainer, "step_loss", counted)
    assert train(_cfg(tmp_path, "run", *args), progress=False)["steps"] == 8
    assert steps["n"] == 0, "no training step again"


def test_evaluate_models_holds_the_run_lock(tmp_path):
    """Old: runs.evaluate_models wrote params, manifest and eval files without the run
    folder's lock, under a process that held it. Now it takes the lock: RunBusy, nothing written."""
    from dpkd_lib.study.runs import evaluate_models
    base = ROOT / "params" / "smoke" / "base_train.yaml"
    results = tmp_path / "results"
    holder = RunDir(results / "runs" / "student_init")
    with holder.lock():
        before = _snapshot(results)
        with pytest.raises(RunBusy, match=f"pid {os.getpid()}"):
            evaluate_models(base, {"student_init": {"source": "tiny", "n_layer": 1, "n_embd": 32}}, results,
                            progress=False)
        assert _snapshot(results) == before


def test_a_resumed_run_reports_the_time_of_every_attempt(tmp_path, monkeypatch):
    """A run made in parts (a study continued across sessions) reports its whole cost: the
    resumed attempt's wall time plus what the earlier one spent up to the checkpoint it resumed
    from (kept in the checkpoint), not the last attempt's alone."""
    original = train_mod.Trainer.step_loss

    def slow(self, i):   # the first attempt's steps 0-5 take at least 1 s each
        time.sleep(1.0)
        return original(self, i)
    monkeypatch.setattr(train_mod.Trainer, "step_loss", slow)
    run = _stopped_at_step_7(tmp_path, monkeypatch, "run")   # dies in step 7, after the step-6 checkpoint
    first = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert first["step"] == 6 and first["elapsed_s"] >= 6.0
    tick = time.time()
    summary = train(_cfg(tmp_path, "run", *COMMON), progress=False)
    second = time.time() - tick
    assert summary["steps"] == 8
    assert summary["wall_time_s"] >= first["elapsed_s"] and summary["wall_time_s"] > second + 5.0
    assert read_json(run / "manifest.json")["wall_time_s"] == pytest.approx(summary["wall_time_s"])
