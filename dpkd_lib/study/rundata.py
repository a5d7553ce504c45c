"""The committed record of every run: what the tables, intervals, figures and answer are
rebuilt from, without weights and without the run folders (which stay out of git).

Layout under a results root (``results/<profile>``)::

    data/<run>/summary.json        the run's summary (per-split metrics, as written)
    data/<run>/params.yaml         its resolved params
    data/<run>/labels.json         method, group, label, overrides (runs.run_grid)
    data/<run>/manifest.json       status, git commit, package versions, machine, wall time
    data/<run>/eval_rows.jsonl.gz  one row per prompt × decoding (× sampling seed): scores,
                                   the generated text, lengths, teacher-forced sums; the
                                   prompt and references are left out (they are the data
                                   split's, the same for every run)
    data/<run>/metrics.jsonl.gz    one row per logged training step (losses, rewards, probes)

JSON lines, gzipped with no time stamp (the same rows give the same bytes, so re-exporting
changes nothing in git): a lossless copy of the run's own eval.jsonl and metrics.jsonl,
types included (None stays None, an empty answer stays ""), so what is rebuilt from here is
what the run folders give. `export_run` writes it when a run finishes (runs.run_grid,
runs.evaluate_models); ``python -m dpkd_lib.study.report export RESULTS_ROOT`` exports the
finished runs of an older results root.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError
from ..io import dumps, read_jsonl

DATA = "data"
COPIED = ("summary.json", "params.yaml", "labels.json", "manifest.json",
          MEMORY_FILE := "memory.json")   # the measured peak per phase, when the run was measured
EVAL_ROWS, METRICS = "eval_rows.jsonl.gz", "metrics.jsonl.gz"
#: the pair's committed eval rows a continued study checks its rebuilt pair against (`restore_runs`)
PAIR_CHECK = ".restored_pair.json"
#: eval row fields that belong to the data split, not to the run (the same in every run)
SPLIT_FIELDS = ("prompt", "reference", "references")


def data_root(results_root: str | os.PathLike) -> Path:
    return Path(results_root) / DATA


def _write_if_changed(path: Path, blob: bytes) -> bool:
    """Write `blob` atomically unless the file already holds exactly it (git stays clean)."""
    if path.exists() and path.read_bytes() == blob:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


def _jsonl_gz(rows) -> bytes:
    text = "".join(dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return gzip.compress(text.encode("utf-8", errors="surrogateescape"), compresslevel=9, mtime=0)


def export_run(run_dir: str | os.PathLike, results_root: str | os.PathLike) -> Path | None:
    """Copy a finished run's record into ``<results_root>/data/<run name>``; returns that
    folder, or None when the run is not finished (nothing is written)."""
    from ..rundir import RESTORED   # rundir imports torch: tables are rebuilt without it
    run_dir = Path(run_dir)
    restored = (run_dir / RESTORED).exists()   # made from data/<run>: its rows are the record already
    try:
        if json.loads((run_dir / "manifest.json").read_text()).get("status") != "finished":
            return None
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    out = data_root(results_root) / run_dir.name
    for name in COPIED:   # labels.json too: run_grid rewrites it with the params' current labels
        if (run_dir / name).exists():
            _write_if_changed(out / name, (run_dir / name).read_bytes())
    if restored:
        return out
    rows = read_jsonl(run_dir / "eval.jsonl") if (run_dir / "eval.jsonl").exists() else []
    _write_if_changed(out / EVAL_ROWS, _jsonl_gz({k: v for k, v in r.items() if k not in SPLIT_FIELDS}
                                                for r in rows))
    metrics = read_jsonl(run_dir / "metrics.jsonl", torn_ok=True) if (run_dir / "metrics.jsonl").exists() else []
    _write_if_changed(out / METRICS, _jsonl_gz(metrics))
    return out


def restore_runs(results_root: str | os.PathLike) -> list[str]:
    """A study continued from its committed record (``make reproduce RESUME=1``; a long
    study run in parts on machines that keep only git): every finished run recorded in
    ``data/`` whose ``runs/<run>`` folder is missing gets one rebuilt from the record
    (params, summary, manifest, labels; no weights, no eval rows), so that `runs.run_grid`
    reuses it instead of training it again. A run other runs start from is not restored (its
    weights are what they need): the pair (group ``pair``) is built again and checked against
    its record (`check_rebuilt_pair`); a pilot's starts are trained again. A record made on
    another kind of machine is refused (ConfigError) before anything is written. Returns the
    restored run names."""
    from ..rundir import RESTORED, numerics
    records = []
    for record in exported_runs(results_root):
        try:
            labels = json.loads((record / "labels.json").read_text())
            manifest = json.loads((record / "manifest.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        records.append((record, labels, manifest))
    here = numerics()
    others = sorted({str(numerics(m.get("machine") or {})) for _, _, m in records} - {str(here)})
    if others:   # another CPU's vector units give other sums: the study's runs come from one model of machine
        raise ConfigError(f"{data_root(results_root)} holds runs made on {'; '.join(others)}, and this machine is "
                          f"{here}: a study continued here would mix machines (their sums differ); run it "
                          f"without RESUME=1 to train every run here")
    runs, restored, pair = Path(results_root) / "runs", [], {}
    for record, labels, manifest in records:
        run_dir = runs / record.name
        if labels.get("group") == "pair":
            pair[record.name] = _digest(record / EVAL_ROWS)
            continue
        if (str(labels.get("method", "")).startswith("pilot_start_") or manifest.get("status") != "finished"
                or (run_dir / "manifest.json").exists()):
            continue
        for name in COPIED:
            if (record / name).exists():
                _write_if_changed(run_dir / name, (record / name).read_bytes())
        _write_if_changed(run_dir / RESTORED, (dumps({"from": f"{DATA}/{record.name}"}) + "\n").encode())
        restored.append(record.name)
    if restored:   # what the rebuilt pair must evaluate to (check_rebuilt_pair), until it has
        _write_if_changed(runs / PAIR_CHECK, (dumps(pair, indent=1) + "\n").encode())
    return restored


def _digest(path: Path) -> str | None:
    """The rows file's hash (its bytes are a function of its rows: `_jsonl_gz`); None: no file."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def check_rebuilt_pair(results_root: str | os.PathLike, name: str, role: str) -> None:
    """After a continued study built pair run ``name`` again (runs.prepare_pair): its exported
    eval rows must be the committed ones `restore_runs` recorded, else the restored runs were
    trained from another model: they are removed (copies of their records; data/ keeps them)
    with the check itself, and a ConfigError says so. A pass clears ``name`` from the check."""
    from ..rundir import RESTORED
    runs = Path(results_root) / "runs"
    try:
        expected = json.loads((runs / PAIR_CHECK).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return
    if name not in expected:
        return
    if expected[name] is None or _digest(data_root(results_root) / name / EVAL_ROWS) != expected[name]:
        for marker in runs.glob(f"*/{RESTORED}"):
            shutil.rmtree(marker.parent)
        (runs / PAIR_CHECK).unlink()
        why = ("has no committed eval rows to check it against" if expected[name] is None else
               f"evaluates differently from its committed record in {data_root(results_root) / name} "
               f"(git diff shows it)")
        raise ConfigError(f"the rebuilt {role} ({name}) {why}: the runs restored from data/ were trained from "
                          f"another {role} (another machine or code), so they were removed; run again without "
                          f"RESUME=1 to train them from this one")
    del expected[name]
    if expected:
        _write_if_changed(runs / PAIR_CHECK, (dumps(expected, indent=1) + "\n").encode())
    else:
        (runs / PAIR_CHECK).unlink()


def export_all(results_root: str | os.PathLike) -> list[Path]:
    """`export_run` for every finished run under ``<results_root>/runs``."""
    runs = Path(results_root) / "runs"
    if not runs.is_dir():
        return []
    folders = sorted(p for p in runs.iterdir() if p.is_dir() and ".replaced-" not in p.name)
    return [out for out in (export_run(p, results_root) for p in folders) if out is not None]


def _read_jsonl_gz(path: Path) -> list[dict]:
    if not path.exists():
        return []
    text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="surrogateescape")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_eval_rows(folder: str | os.PathLike) -> list[dict]:
    """The exported per-prompt rows of one run (``data/<run>``); [] when it has none."""
    return _read_jsonl_gz(Path(folder) / EVAL_ROWS)


def read_metric_rows(folder: str | os.PathLike) -> list[dict]:
    """The exported per-step training log of one run; [] when it logged nothing."""
    return _read_jsonl_gz(Path(folder) / METRICS)


def recorded_seconds(results_root: str | os.PathLike) -> dict[str, float]:
    """{run: the wall time its committed record gives (data/<run>/summary.json ``wall_time_s``)}:
    how long each run took when it was made, on that machine, under that load and code."""
    out = {}
    for record in exported_runs(results_root):
        try:
            wall = json.loads((record / "summary.json").read_text()).get("wall_time_s")
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(wall, (int, float)) and math.isfinite(wall) and wall > 0:
            out[record.name] = float(wall)
    return out


def runs_to_train(results_root: str | os.PathLike) -> dict[str, float]:
    """`recorded_seconds` of the recorded runs with no finished run folder here (a fresh
    clone: every one; a continued study, RESUME=1: the pair and pilot starts, which are
    built again): what a study of this results root still has to train, at recorded times."""
    from ..rundir import RunDir   # imports torch: only the driver's progress line needs this
    runs = Path(results_root) / "runs"
    return {name: wall for name, wall in recorded_seconds(results_root).items()
            if not RunDir(runs / name).is_finished()}


def duration_text(seconds: float) -> str:
    """'40 min' up to 90 minutes, '3.4 h' beyond."""
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def exported_runs(results_root: str | os.PathLike) -> list[Path]:
    """The run folders under ``<results_root>/data`` (each holding a summary.json)."""
    root = data_root(results_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "summary.json").exists())
