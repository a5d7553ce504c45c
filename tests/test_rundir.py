"""Run directories: atomic files, ids from params, the no-clobber rule, torn metric lines."""
import json
import os

import pytest

from dpkd_lib.config import ConfigError, load_config, to_dict
from dpkd_lib.io import atomic_write_text, read_jsonl
from dpkd_lib.rundir import RunDir, run_id

from test_config import SMOKE


def params(*overrides):
    return to_dict(load_config(SMOKE, list(overrides)))


def test_run_id_depends_on_params_not_on_output_dir():
    assert run_id(params()) == run_id(params("output_dir=/elsewhere"))
    assert run_id(params()) != run_id(params("train.beta=0.2"))


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "old")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"], "temp file left behind"


def test_a_torn_line_anywhere_but_last_is_an_error(tmp_path):
    from dpkd_lib.errors import DataError
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid JSON"):
        read_jsonl(path, torn_ok=True)


def test_prepare_refuses_to_clobber_and_names_keys(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.prepare(params()) == "fresh"
    run.write_manifest(status="finished")
    (run.path / "summary.json").write_text("{}")
    assert run.prepare(params()) == "finished"
    with pytest.raises(ConfigError, match=r"different params \(train.beta, train.lr\)"):
        run.prepare(params("train.beta=0.3", "train.lr=0.01"))
    assert json.loads((run.path / "manifest.json").read_text())["status"] == "finished"
    assert run.prepare(params("train.beta=0.3"), force=True) == "fresh"
    moved = [p for p in tmp_path.iterdir() if ".replaced-" in p.name]
    assert len(moved) == 1 and (moved[0] / "summary.json").exists(), "old run must be kept aside"


def test_unfinished_run_is_resumed_not_reused(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare(params())
    run.write_manifest(status="running")
    (run.path / "summary.json").write_text("{}")  # a summary without finished status is not proof
    assert run.prepare(params()) == "resume"


def test_torn_metrics_line_is_ignored_and_truncation_keeps_steps(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare(params())
    for step in (1, 2, 3):
        run.append_metrics({"step": step})
    with open(run.file("metrics.jsonl"), "a") as handle:
        handle.write('{"step": 4, "lo')
    assert [r["step"] for r in read_jsonl(run.file("metrics.jsonl"), torn_ok=True)] == [1, 2, 3]
    run.truncate_metrics(2)
    assert [r["step"] for r in read_jsonl(run.file("metrics.jsonl"))] == [1, 2]
