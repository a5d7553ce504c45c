"""Reliability, third pass, part B (issue 25): hostile data, command-line overrides, model
limits and the DDP decisions. Each test names the row of the issue's table it covers: what
happened on main 3c951d8 (which the test catches) and what happens now."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpkd_lib import data as D
from dpkd_lib import models
from dpkd_lib.config import ConfigError, DataConfig, TokenizerConfig, load_config, parse_override
from dpkd_lib.errors import DataError, VocabularyMismatch
from dpkd_lib.io import read_json
from dpkd_lib.datasets.synthetic import generate_synthetic
from dpkd_lib.tokenization import build_tokenizer
from dpkd_lib.train import train

from test_config import ROOT, SMOKE, _cli

BASE = ROOT / "params" / "smoke" / "base_train.yaml"
NOT_RECORDS = ["[1, 2]", "null", '"a string"', "3"]


def _lines(text):
    return [line for line in text.strip().splitlines() if line.strip()]


def _write(path, records, extra_lines=()):
    """JSONL with `records`, then the raw `extra_lines` (hostile ones) in between."""
    lines = [json.dumps(r) for r in records]
    for i, raw in enumerate(extra_lines):
        lines.insert(1 + 2 * i, raw)
    Path(path).write_text("".join(line + "\n" for line in lines))
    return path


def _folder(tmp_path, n_train=8, n_test=3, train_extra=(), test_extra=()):
    recs = generate_synthetic(n_train=n_train, n_valid=2, n_test=n_test, n_heldout=0, seed=3)
    folder = tmp_path / "data"
    folder.mkdir()
    _write(folder / "train.jsonl", recs["train"], train_extra)
    _write(folder / "valid.jsonl", recs["valid"])
    _write(folder / "test.jsonl", recs["test"], test_extra)
    return folder


def _jsonl(folder, **kw):
    return DataConfig(source="jsonl", path=str(folder), **kw)


#: the smoke profile switched to a folder of JSONL files: its synthetic sizes unset
JSONL_ARGS = ["--set", "data.source=jsonl", "--unset", "data.n_train", "--unset", "data.n_valid",
              "--unset", "data.n_test", "--unset", "data.n_heldout"]


# ----------------------------------------------------------------------------- case 6: lines that are not objects

def test_lines_that_are_not_objects_are_dropped_and_counted_with_file_and_line(tmp_path):
    """Row 6 (old: TypeError from dict(raw) in data.py for [1, 2] / null / 3, a ValueError
    with no file or line for "a string"). Now each such line is dropped as not_a_record, its
    file and line the first_dropped id; data.bad_data=error refuses the first, naming them."""
    folder = _folder(tmp_path, train_extra=NOT_RECORDS, test_extra=["null"])
    splits = D.load_splits(_jsonl(folder))
    assert len(splits["train"]) == 8 and len(splits["test"]) == 3
    reports = {}
    D.load_splits(_jsonl(folder), reports=reports)
    assert reports["train"].dropped == {"not_a_record": 4}
    assert reports["train"].first_dropped["not_a_record"] == f"{folder / 'train.jsonl'}:2"
    assert reports["test"].dropped == {"not_a_record": 1}
    with pytest.raises(DataError) as err:
        D.load_splits(_jsonl(folder, bad_data="error"))
    message = str(err.value)
    assert f"{folder / 'train.jsonl'}:2" in message and "not_a_record" in message and "array" in message
    assert "\n" not in message and "bad_data=drop" in message
    # one file split MiniLLM-style: the same lines reach the splits as not_a_record, no TypeError
    single = _write(tmp_path / "one.jsonl", generate_synthetic(n_train=12, n_valid=0, n_test=0, n_heldout=0,
                                                               seed=1)["train"], NOT_RECORDS)
    reports = {}
    splits = D.load_splits(DataConfig(source="jsonl", path=str(single), n_valid=2, n_test=2), reports=reports)
    assert sum(len(v) for v in splits.values()) == 12
    assert sum(r.dropped["not_a_record"] for r in reports.values()) == 4
    # MiniLLM's processed format and the pre-train corpus file: the same lines, no traceback
    assert isinstance(D.load_minillm_processed(single)[1], D.NotARecord)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a document"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:2: expected an object with a string 'text'.*JSON array"):
        D.pretrain_texts(corpus)
    # a line that is not JSON at all names file and line too
    (folder / "train.jsonl").write_text('{"instruction": "a", "response": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        D.load_splits(_jsonl(folder))


def test_a_jsonl_run_switched_from_the_command_line_counts_the_dropped_lines_in_its_manifest(tmp_path):
    """Rows 6 and 10b together, through the command line: the smoke profile switched to a
    folder of JSONL files with `--unset` for the synthetic sizes it sets (old: refused,
    "data.n_train=96 is not used by this run", and no way to unset a key). The manifest
    counts the dropped lines of the train split and of the test split."""
    folder = _folder(tmp_path, train_extra=NOT_RECORDS, test_extra=["null"])
    run = tmp_path / "run"
    args = ["train", "--params", str(BASE), "--set", f"output_dir={run}", "--set", f"cache_dir={tmp_path / 'c'}",
            "--set", f"data.path={folder}", "--set", "train.max_steps=1", "--set", "eval.splits=[test]",
            "--set", "eval.max_examples=2", "--no-progress"]
    proc = _cli(*args, *JSONL_ARGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = read_json(run / "manifest.json")["filter_report"]
    assert report["dropped"]["not_a_record"] == 4 and report["total"] == 12  # 8 records + 4 lines
    assert report["other_splits"]["test"]["dropped"] == {"not_a_record": 1}


# ----------------------------------------------------------------------------- case 7: empty files and splits

def test_empty_train_file_or_single_file_is_named(tmp_path):
    """Row 7 (old: "no usable records after filtering: kept 0/0 records", no file named;
    a single empty file: "0 records cannot give 200 valid ...", no file named)."""
    folder = _folder(tmp_path)
    (folder / "train.jsonl").write_text("\n\n")
    with pytest.raises(DataError) as err:
        D.load_splits(_jsonl(folder))
    assert str(folder / "train.jsonl") in str(err.value) and "\n" not in str(err.value)
    (folder / "train.jsonl").write_text("null\n[]\n")  # only lines that are not records
    with pytest.raises(DataError, match=r"train.jsonl.*not_a_record=2"):
        D.load_splits(_jsonl(folder))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError) as err:
        D.load_splits(DataConfig(source="jsonl", path=str(empty)))
    assert str(empty) in str(err.value) and "empty" in str(err.value)


def test_an_empty_evaluation_split_is_an_error_before_any_model_loads_unless_skipped(tmp_path, monkeypatch):
    """Row 7 (old: a run with an empty test file trained, then finished with only
    `eval_skipped_splits: [test]` in its summary and nothing printed). Now set-up refuses it
    in one line naming the file, before the first model is built; eval.skip_empty_splits=true
    skips it as before."""
    folder = _folder(tmp_path)
    (folder / "test.jsonl").write_text("")

    def no_model(*a, **k):
        raise AssertionError("a model was built before the empty split was found")
    monkeypatch.setattr(models, "build_model", no_model)
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.path={folder}", "data.source=jsonl",
                 "eval.splits=[test]"]
    cfg = load_config(BASE, overrides, unset=["data.n_train", "data.n_valid", "data.n_test", "data.n_heldout"])
    with pytest.raises(DataError) as err:
        train(cfg, progress=False)
    message = str(err.value)
    assert str(folder / "test.jsonl") in message and "eval.skip_empty_splits=true" in message
    assert "\n" not in message and not (tmp_path / "run" / "metrics.jsonl").exists()
    splits = D.load_splits(cfg.data)
    D.check_eval_splits(splits, cfg.data, ["test"], skip_empty=True)  # asked to skip: no error
    (folder / "test.jsonl").unlink()
    with pytest.raises(DataError, match=r"test.jsonl does not exist"):
        D.check_eval_splits(D.load_splits(cfg.data), cfg.data, ["test"], skip_empty=False)
    # a generated split sized 0 is named by its setting
    cfg = load_config(BASE, [f"output_dir={tmp_path / 'run2'}", "data.n_heldout=0", "eval.splits=[test, heldout]"])
    with pytest.raises(DataError, match=r"'heldout'.*data.n_heldout=0"):
        train(cfg, progress=False)


# ----------------------------------------------------------------------------- case 8: positions of every model

@pytest.fixture(scope="module")
def tok384():
    return build_tokenizer(TokenizerConfig(vocab_size=384))


def _saved_gpt2(folder, tok, positions, *, with_tokenizer=True, vocab=None):
    model = models.tiny_model("gpt2", vocab or len(tok), n_layer=1, n_embd=32, n_head=4, max_positions=positions,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    models.save_model(model, folder, tokenizer=tok if with_tokenizer else None)
    return folder


@pytest.mark.parametrize("source", ["saved", "pretrained"])
def test_generation_past_a_loaded_gpt2s_positions_is_refused_before_training(tmp_path, tok384, source):
    """Row 8 (old: a saved GPT-2 with eval.max_new_tokens past its positions trained and
    saved, then hit `IndexError: index out of range in self` in the final evaluation; the
    check covered `source: tiny` only). Now the student is checked once loaded, before step 1."""
    folder = _saved_gpt2(tmp_path / "gpt2", tok384, positions=320)
    cfg = load_config(BASE, [f"output_dir={tmp_path / 'run'}", f"student={{source: {source}, name_or_path: '{folder}'}}",
                             "eval.max_new_tokens=100", "data.max_length=320", "data.max_prompt=256"])
    with pytest.raises(ConfigError) as err:
        train(cfg, progress=False)
    message = str(err.value)
    assert "data.max_prompt + eval.max_new_tokens (356) exceeds the 320 positions of the student" in message
    assert str(folder) in message and "\n" not in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_eval_checks_positions_and_vocabulary_of_the_model_folder(tmp_path, tok384):
    """Rows 8 and 9 for `eval` (old: generation past the positions ran into IndexError; a
    384-token model folder without tokenizer files, evaluated with the 1024-token smoke
    params, gave a raw `IndexError`). Now one line, exit 2."""
    folder = _saved_gpt2(tmp_path / "gpt2", tok384, positions=320)
    proc = _cli("eval", "--params", str(BASE), "--model", str(folder), "--out", str(tmp_path / "out"),
                "--set", "eval.max_new_tokens=100", "--no-progress")
    assert proc.returncode == 2 and len(_lines(proc.stderr)) == 1, proc.stderr[-2000:]
    assert "exceeds the 320 positions" in proc.stderr and "Traceback" not in proc.stderr
    bare = _saved_gpt2(tmp_path / "bare", tok384, positions=512, with_tokenizer=False)
    proc = _cli("eval", "--params", str(SMOKE), "--model", str(bare), "--out", str(tmp_path / "out"),
                "--no-progress")
    assert proc.returncode == 2 and len(_lines(proc.stderr)) == 1, proc.stderr[-2000:]
    assert "VocabularyMismatch" in proc.stderr and "384 token embeddings" in proc.stderr
    assert "1024 tokens" in proc.stderr and not (tmp_path / "out" / "eval.jsonl").exists()


# ----------------------------------------------------------------------------- case 9: vocabularies

def test_a_model_folder_saved_with_another_tokenizer_is_refused_in_train(tmp_path, tok384):
    """Row 9, the reverse direction (old: a 1024-token model with its own 1024-token
    tokenizer trained silently under the 384-token params). Its folder's tokenizer differs
    from the one in use: refused before training. An embedding larger than the tokenizer is
    fine when the folder holds no tokenizer of its own (padded vocabularies)."""
    tok1024 = build_tokenizer(TokenizerConfig(vocab_size=1024))
    folder = _saved_gpt2(tmp_path / "big", tok1024, positions=512)
    cfg = load_config(BASE, [f"output_dir={tmp_path / 'run'}", f"student={{source: saved, name_or_path: '{folder}'}}"])
    with pytest.raises(VocabularyMismatch) as err:
        train(cfg, progress=False)
    assert "another tokenizer (1024 tokens)" in str(err.value) and "(384 tokens" in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "run" / "metrics.jsonl").exists()
    padded = models.tiny_model("llama", 400, n_layer=1, n_embd=32)
    models.check_vocab_fit(padded, tok384, "a padded model")  # 400 rows, 384 tokens, no folder: fine
    small = models.tiny_model("llama", 300, n_layer=1, n_embd=32)
    with pytest.raises(VocabularyMismatch, match="300 token embeddings but the tokenizer in use has 384"):
        models.check_vocab_fit(small, tok384, "a small model")


# ----------------------------------------------------------------------------- cases 10, 10b, 11: overrides

def test_set_values_keep_a_hash_and_a_key_can_be_unset(tmp_path):
    """Row 10 (old: `--set "output_dir=…/run #1"` went to `…/run`, silently) and row 10b
    (old: no way to unset a key; `--set data.n_train=null`: "expected int, got None")."""
    cfg = load_config(SMOKE, [f"output_dir={tmp_path}/run #1", "cache_dir=#cache"])
    assert cfg.output_dir == f"{tmp_path}/run #1" and cfg.cache_dir == "#cache"
    assert parse_override("eval.sample_seeds=[1, 2]")[1] == [1, 2]  # YAML values still YAML
    assert parse_override('output_dir="a #b"')[1] == "a #b"
    folder = _folder(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(BASE, ["data.source=jsonl", f"data.path={folder}"])
    assert "data.n_train=96 is not used" in str(err.value) and "--unset data.n_train" in str(err.value)
    cfg = load_config(BASE, ["data.source=jsonl", f"data.path={folder}"],
                      unset=["data.n_train", "data.n_valid", "data.n_test", "data.n_heldout"])
    assert cfg.data.n_train == DataConfig().n_train and cfg.data.source == "jsonl"
    cfg = load_config(SMOKE, ["train.objective=sft"], unset=["teacher"])
    assert cfg.teacher is None
    with pytest.raises(ConfigError, match=r"--unset data.n_trian: unknown key 'data.n_trian' \(did you mean 'n_train'"):
        load_config(BASE, [], unset=["data.n_trian"])
    proc = _cli("train", "--params", str(BASE), "--unset", "data.n_trian")
    assert proc.returncode == 2 and "unknown key 'data.n_trian'" in proc.stderr


def test_an_empty_output_dir_is_refused_before_anything_is_written(tmp_path):
    """Row 11 (old: `--set output_dir=` wrote params.yaml, model/ and checkpoints/ into the
    current folder; with --force, `ValueError: PosixPath('.') has an empty name`)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for extra in ([], ["--force"]):
        proc = subprocess.run([sys.executable, "-m", "dpkd_lib", "train", "--params", str(SMOKE),
                               "--set", "output_dir=", *extra], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=120)
        assert proc.returncode == 2 and _lines(proc.stderr) == [
            "error: " + str(SMOKE) + ": output_dir is empty (an unset shell variable?): name a folder, "
            "e.g. --set output_dir=results/my_run"], proc.stderr[-2000:]
        assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- case 12: eval --out

def test_eval_out_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """Row 12, second half (old: `eval --out` on a read-only folder failed only after the
    model had loaded). A file in the way (what fails for root too) and, unless root, a
    read-only folder."""
    from dpkd_lib.evaluate import evaluate_saved

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr(models, "load_saved", no_load)
    cfg = load_config(SMOKE, [], purpose="eval")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as err:
        evaluate_saved(cfg, tmp_path / "model", tmp_path / "file" / "out", progress=False)
    assert "eval --out" in str(err.value) and "choose a folder you can write to" in str(err.value)
    with pytest.raises(OSError, match="eval --out is empty"):  # not the current folder
        evaluate_saved(cfg, tmp_path / "model", "", progress=False)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OSError, match="eval --out .*locked/out cannot be written"):
            evaluate_saved(cfg, tmp_path / "model", locked / "out", progress=False)


# ----------------------------------------------------------------------------- DDP: decisions taken together

DDP_DRIVER = r'''
import json, os, sys
import dpkd_lib.losses as losses_mod
from dpkd_lib.config import load_config
from dpkd_lib.train import train

rank, calls, original = int(os.environ["RANK"]), {"n": 0}, losses_mod.sft_loss

def flaky(logits, labels, *args, **kwargs):  # rank 1 alone: a NaN in step 3's response CE
    calls["n"] += 1
    value = original(logits, labels, *args, **kwargs)
    return value * float("nan") if rank == 1 and calls["n"] == 5 else value

losses_mod.sft_loss = flaky
summary = train(load_config(sys.argv[1], sys.argv[2:]), progress=False)
with open(os.path.join(os.environ["OUT"], f"rank{rank}.json"), "w") as handle:
    json.dump({"skipped": summary["skipped_batches"], "steps": summary["steps"]}, handle)
'''


def test_two_processes_skip_a_nan_of_one_rank_together_and_save_every_ranks_rejected_samples(tmp_path):
    """Seen in the code (issue 25): under DDP a NaN-skip was decided per rank, so the other
    rank went on into backward's all-reduce (a hang, or collectives paired across steps);
    and only rank 0's pending DPKD-seq samples went into the checkpoint (a resumed rank 1
    took rank 0's rows as its rejected side). Two CPU processes (gloo), DPKD-seq with
    samples drawn two steps at a time, a NaN on rank 1 alone in step 3: both skip it, and
    the step-3 checkpoint holds each rank's own pending samples."""
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OUT=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(driver), str(SMOKE), f"output_dir={run}", f"cache_dir={tmp_path / 'cache'}",
           "train.objective=dpkd_seq", "train.seq_max_new_tokens=4", "train.rejected_every=2",
           "train.max_steps=4", "train.save_every=1", "train.nan_policy=skip", "train.max_skipped_share=0.5",
           "eval.splits=[]"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail("the two processes hung (a collective waited for a rank that had skipped its step)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"skipped": 1, "steps": 4}] * 2
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 3 and len(state["rejected_by_rank"]) == 2
    ids = [[row["id"] for row, _ in pending[3]] for pending in state["rejected_by_rank"]]
    assert all(ids) and not set(ids[0]) & set(ids[1])  # each rank's own rows of batch 3
