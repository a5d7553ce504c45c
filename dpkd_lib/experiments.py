"""Experiment helpers the notebooks call: run grids, build the teacher/student pair, collect
results into a table, compare methods against seed noise, plot, and write tables/figures.

No training logic lives only in a notebook: a notebook names its runs (a name and a list of
dotted overrides of a base params file) and calls `run_grid`; every number it shows comes
back through `collect`, which reads only the run folders under ``<results_root>/runs``.

Layout under a results root (``results/<profile>`` by default)::

    runs/<name>/          one train() run: params.yaml, manifest.json, metrics.jsonl,
                          eval.jsonl, summary.json, model/ (gitignored), plus two files
                          written here: labels.json (method, group, display name) and
                          teacher_forced.json (NLL / token accuracy on each eval split)
    teacher_cache/        cached teacher top-k signals (teacher_mode: cache)
    tables/<name>.{csv,md}
    figures/<name>.png
    notebooks/            executed notebooks (dpkd_lib.study)
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

DISPLAY = {"sft": "SFT", "kd": "KD", "rkl": "RKL", "jsd": "JSD", "seqkd": "SeqKD",
           "dpkd_token": "DPKD-token", "dpkd_seq": "DPKD-seq", "teacher": "teacher",
           "student_init": "student (start)"}
METHOD_ORDER = ["teacher", "student_init", "sft", "kd", "rkl", "jsd", "seqkd", "dpkd_token",
                "dpkd_seq"]
METRIC_LABELS = {"rouge_l": "ROUGE-L", "exact_match": "EM", "nll": "NLL", "token_acc": "tok-acc",
                 "response_tokens": "resp. len", "distinct_2": "distinct-2",
                 "valid_nll": "valid NLL", "wall_time_s": "wall s"}
# Lower is better for these (used only to word verdicts).
LOWER_IS_BETTER = {"nll", "valid_nll", "repetition_rate"}

# method.md §5 (ROUGE-L; single seed for DPKD). Columns are our method keys.
PAPER_NUMBERS = {
    ("gpt2-120M", "DollyEval"): {"teacher": 27.6, "sft": 23.3, "kd": 22.8, "seqkd": 22.7,
                                  "minillm": 24.6, "dpkd_token": 24.6},
    ("gpt2-120M", "SelfInst"): {"teacher": 14.3, "sft": 10.0, "kd": 10.8, "seqkd": 10.1,
                                 "minillm": 13.2, "dpkd_token": 13.8},
    ("gpt2-120M", "S-NI"): {"teacher": 27.6, "sft": 16.3, "kd": 13.4, "seqkd": 16.0,
                             "minillm": 25.3, "dpkd_token": 25.4},
}
PAPER_ABLATIONS = {"full": 24.62, "no pre-train term": 23.47, "no length normalisation": 22.79,
                   "IPO": 18.78, "CPO": 24.31, "SimPO": 24.46}


# ----------------------------------------------------------------------------- run specs

def _override(key: str, value: Any) -> str:
    """A dotted override whose value survives YAML parsing (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def as_overrides(overrides) -> list[str]:
    """Overrides as `load_config` takes them, from a list of "key=value" strings or a mapping
    {dotted key: value} (the form the notebooks' params files use: no "=" in a papermill
    parameter line). None gives []."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [_override(k, v) for k, v in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return [str(o) for o in overrides]


def method_runs(methods: dict, *, prefix: str = "", group: str = "main") -> list[tuple[str, list, dict]]:
    """Run specs from a notebook's `methods` parameter.

    ``methods`` maps a method key to ``{"seeds": [...], "overrides": {...} or [...],
    "objective": <default: the key>}``; each (method, seed) becomes the run
    ``<prefix><method>_s<seed>`` (method ``<prefix><method>``) with ``train.objective`` and
    ``train.seed`` set, then the method's own overrides.
    """
    runs = []
    for method, spec in methods.items():
        spec = spec or {}
        objective = spec.get("objective", method)
        for seed in spec.get("seeds", [1]):
            name = f"{prefix}{method}_s{seed}"
            overrides = [f"train.objective={objective}", f"train.seed={seed}"] + as_overrides(spec.get("overrides"))
            runs.append((name, overrides, {"method": f"{prefix}{method}", "group": group,
                                           "label": spec.get("label", DISPLAY.get(method, method))}))
    return runs


def _as_spec(run) -> tuple[str, list, dict]:
    if isinstance(run, dict):
        return run["name"], as_overrides(run.get("overrides")), dict(run.get("labels", {}))
    name, overrides, *rest = run
    return name, as_overrides(overrides), dict(rest[0]) if rest else {}


def run_config(base_params: str | Path, name: str, overrides: Sequence[str], results_root,
               pair: Sequence[str] = ()):
    """The RunConfig of run `name`: base params, then the pair's overrides, the run's folder
    and teacher cache under `results_root`, then the run's own overrides."""
    from .config import load_config
    root = Path(results_root)
    return load_config(base_params, [
        _override("output_dir", str(root / "runs" / name)),
        _override("train.cache_dir", str(root / "teacher_cache")),
    ] + list(pair) + as_overrides(overrides))


def run_grid(base_params: str | Path, runs: Iterable, results_root: str | Path, *,
             force: bool = False, pair: Sequence[str] = (), teacher_forced: bool = True,
             progress: bool = True, verbose: bool = True) -> list[dict]:
    """Train (or reuse) every run into ``<results_root>/runs/<name>``; returns their summaries.

    ``runs``: (name, overrides[, labels]) tuples or {"name", "overrides", "labels"} dicts.
    A finished run with the same resolved params is reused (train() returns its summary);
    ``force`` recomputes. Every config is resolved (and so validated) before the first
    run starts. After each run its labels and the teacher-forced metrics on the eval
    splits are stored next to it (see `teacher_forced_eval`).
    """
    from .train import train
    specs = [_as_spec(r) for r in runs]
    names = [s[0] for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate run names: {sorted(dup)}")
    configs = [(name, run_config(base_params, name, ov, results_root, pair), labels, ov)
               for name, ov, labels in specs]
    summaries = []
    for i, (name, cfg, labels, ov) in enumerate(configs, 1):
        run_dir = Path(cfg.output_dir)
        was_finished = _finished(run_dir)
        tick = time.time()
        summary = train(cfg, force=force, progress=progress)
        if teacher_forced and cfg.eval.splits:
            summary = dict(summary, teacher_forced=teacher_forced_eval(run_dir, cfg))
        labels = {"name": name, "method": labels.get("method", strip_seed(name)), **labels,
                  "overrides": list(ov)}
        _write_json_if_changed(run_dir / "labels.json", labels)
        summaries.append(summary)
        if verbose:
            how = "reused" if was_finished and not force else "trained"
            print(f"[grid {i}/{len(configs)}] {name}: {how} in {time.time() - tick:.0f} s "
                  f"(run wall time {summary.get('wall_time_s', float('nan')):.0f} s)", flush=True)
    return summaries


def run_overrides(results_root: str | Path, name: str) -> list[str]:
    """The run's own overrides as `run_grid` ran it (without the pair's): the starting point
    of an ablation that changes one thing."""
    path = Path(results_root) / "runs" / name / "labels.json"
    try:
        return list(json.loads(path.read_text())["overrides"])
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        raise FileNotFoundError(f"{path}: no record of run {name!r}; run the notebook that "
                                f"trains it first (01)") from None


def build_pair(base_params: str | Path, results_root: str | Path, *,
               teacher_build: Sequence[str] | None = None,
               student_build: Sequence[str] | None = None,
               force: bool = False, progress: bool = True) -> list[str]:
    """Build the teacher and the starting student once; return the overrides that load them.

    Each build is an ordinary train run (``runs/teacher`` and ``runs/student_init``) of the
    base params plus the given overrides; the built model's ``model/`` folder is then used
    by every later run through ``source: saved``. In the cpu profile the teacher build is
    SmolLM2-135M-Instruct + LoRA-SFT, merged and saved as a plain model
    (``student.lora: true``, ``student.merge_lora_on_save: true``), and the student build is
    SmolLM2 pruned to k layers + SFT. A build given as None keeps the base params' own
    teacher (or student) section, e.g. hub checkpoints in the paper profile.
    """
    runs, pair = [], []
    if teacher_build is not None:
        runs.append(("teacher", as_overrides(teacher_build), {"method": "teacher", "group": "pair",
                                                      "label": "teacher"}))
    if student_build is not None:
        runs.append(("student_init", as_overrides(student_build), {"method": "student_init", "group": "pair",
                                                           "label": "student (start)"}))
    summaries = run_grid(base_params, runs, results_root, force=force, progress=progress)
    root = Path(results_root)
    if teacher_build is not None:
        pair.append(_override("teacher", {"source": "saved",
                                          "name_or_path": str(root / "runs" / "teacher" / "model")}))
        # The teacher-signal cache is keyed by the teacher's params (its path), not its
        # weights: key the folder by the teacher run's id so a rebuilt teacher never meets
        # signals of the old one.
        teacher_id = summaries[0].get("run_id") or "teacher"
        pair.append(_override("train.cache_dir", str(root / "teacher_cache" / teacher_id)))
    if student_build is not None:
        pair.append(_override("student", {"source": "saved",
                                          "name_or_path": str(root / "runs" / "student_init" / "model")}))
    return pair


def pair_from_results(results_root: str | Path, *, teacher: bool = True,
                      student: bool = True) -> list[str]:
    """The overrides `build_pair` returned, for a later notebook: load the teacher and the
    starting student that notebook 01 built (an error says to run 01 first)."""
    from .results import read_json
    root, pair = Path(results_root), []
    for role, name, wanted in (("teacher", "teacher", teacher), ("student", "student_init", student)):
        if not wanted:
            continue
        run_dir = root / "runs" / name
        if not _finished(run_dir) or not (run_dir / "model").exists():
            raise FileNotFoundError(f"{run_dir} has no finished {role}: run notebook 01 first "
                                    f"(python -m dpkd_lib.study --only 01)")
        pair.append(_override(role, {"source": "saved", "name_or_path": str(run_dir / "model")}))
        if role == "teacher":
            teacher_id = read_json(run_dir / "summary.json").get("run_id") or "teacher"
            pair.append(_override("train.cache_dir", str(root / "teacher_cache" / teacher_id)))
    return pair


def evaluate_models(base_params: str | Path, models: dict, results_root: str | Path, *,
                    pair: Sequence[str] = (), force: bool = False, teacher_forced: bool = True,
                    progress: bool = True) -> list[dict]:
    """Evaluate models without training them (e.g. hub checkpoints of the paper profile) into
    run-like folders ``runs/<name>`` that `collect` reads like any run.

    ``models`` maps a name (``teacher``, ``student_init``, ...) to a model section
    (``{"source": "pretrained", "name_or_path": "MiniLLM/teacher-gpt2-1.5B"}``). The model
    is evaluated with the base params' eval and data sections, as the student of a run.
    """
    from . import evaluate as eval_lib
    from .config import to_dict
    from .results import RunDir, read_json, run_id, write_json
    out = []
    for name, section in models.items():
        cfg = run_config(base_params, name, [_override("student", section), "teacher=null",
                                             "train.objective=sft"], results_root, pair)
        params = to_dict(cfg)
        run = RunDir(cfg.output_dir)
        if run.is_finished() and not force and run.stored_params() == params:
            out.append(read_json(run.file("summary.json")))
            continue
        run.path.mkdir(parents=True, exist_ok=True)
        from .results import write_yaml
        write_yaml(run.file("params.yaml"), params)
        run.write_manifest(status="running", run_id=run_id(params), kind="eval_only")
        tick = time.time()
        model_dir = section.get("name_or_path") or ""
        summary = eval_lib.evaluate_saved(cfg, model_dir, run.path, progress=progress)
        summary.update(objective="eval_only", run_id=run_id(params), wall_time_s=time.time() - tick,
                       model_dir=str(model_dir))
        write_json(run.file("summary.json"), summary)
        run.write_manifest(status="finished", wall_time_s=summary["wall_time_s"])
        if teacher_forced:
            teacher_forced_eval(run.path, cfg, model_dir=model_dir)
        _write_json_if_changed(run.file("labels.json"), {"name": name, "method": name, "group": "pair",
                                                         "label": DISPLAY.get(name, name)})
        out.append(summary)
    return out


def _finished(run_dir: Path) -> bool:
    from .results import RunDir
    return RunDir(run_dir).is_finished()


def _write_json_if_changed(path: Path, obj: dict) -> None:
    from .results import write_json
    try:
        if json.loads(path.read_text()) == obj:
            return
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    write_json(path, obj)


def strip_seed(name: str) -> str:
    return re.sub(r"_s\d+$", "", name)


# ----------------------------------------------------------------------------- teacher forcing

def teacher_forced_eval(run_dir: str | Path, cfg=None, *, batch_size: int = 16,
                        force: bool = False, model_dir: str | Path | None = None) -> dict:
    """Teacher-forced NLL and token accuracy of a run's saved model on the references of
    each eval split (the same first ``eval.max_examples`` records that were sampled).

    Stored in ``<run>/teacher_forced.json`` keyed by the run id, so it is computed once.
    ``model_dir`` (default ``<run>/model``) is where the model is loaded from.
    If the run's summary already has ``<split>_nll`` (the library may compute it during
    the final evaluation), that is used and nothing is loaded.
    """
    import torch

    from . import data as data_lib
    from . import evaluate as eval_lib
    from . import models as model_lib
    from .config import from_dict
    from .results import read_json, write_json

    run_dir = Path(run_dir)
    if cfg is None:
        cfg = from_dict(yaml.safe_load((run_dir / "params.yaml").read_text()))
    summary = read_json(run_dir / "summary.json")
    splits = list(cfg.eval.splits)
    if all(f"{s}_nll" in summary for s in splits):
        return {s: {"nll": summary[f"{s}_nll"], "token_acc": summary.get(f"{s}_token_acc")}
                for s in splits}
    path = run_dir / "teacher_forced.json"
    run_id = summary.get("run_id")
    if path.exists() and not force:
        stored = read_json(path)
        if stored.get("run_id") == run_id and all(s in stored.get("splits", {}) for s in splits):
            return stored["splits"]
    from .train import build_tokenizer
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = build_tokenizer(cfg)
    quant = cfg.student.quantization if cfg.student.quantization != "none" else None
    model = model_lib.load_saved(model_dir or run_dir / "model", dtype=cfg.student.dtype,
                                 quantization=quant)
    if quant is None and torch.cuda.is_available():
        model = model.to("cuda")
    d = cfg.data
    records = data_lib.load_records(d.source, path=d.path or None, seed=d.data_seed,
                                    n_train=d.n_train, n_valid=d.n_valid, n_test=d.n_test,
                                    n_heldout=d.n_heldout)
    out = {}
    for split in splits:
        recs = list(records.get(split) or [])
        if cfg.eval.max_examples:
            recs = recs[: cfg.eval.max_examples]
        if not recs:
            continue
        try:
            dataset, _ = data_lib.build_sft_dataset(recs, tokenizer, max_length=d.max_length,
                                                    max_prompt=d.max_prompt)
        except data_lib.DataError as err:  # every reference too long for data.max_length
            out[split] = {"nll": None, "token_acc": None, "n_examples": 0, "note": str(err)[:200]}
            continue
        pad = data_lib.pad_id_of(tokenizer)
        batches = [data_lib.collate_sft(dataset[i:i + batch_size], pad)
                   for i in range(0, len(dataset), batch_size)]
        m = eval_lib.teacher_forced_metrics(model, batches)
        out[split] = {"nll": m["nll"], "token_acc": m["token_accuracy"], "n_tokens": m["n_tokens"],
                      "n_examples": len(dataset)}
    write_json(path, {"run_id": run_id, "splits": out})
    del model
    return out


# ----------------------------------------------------------------------------- collection

PARAM_COLUMNS = {
    "objective": ("train", "objective"), "seed": ("train", "seed"), "steps": ("train", "max_steps"),
    "beta": ("train", "beta"), "loss_type": ("train", "loss_type"),
    "label_smoothing": ("train", "label_smoothing"), "reference_free": ("train", "reference_free"),
    "length_normalize": ("train", "length_normalize"), "lm_coef": ("train", "lm_coef"),
    "kd_ratio": ("train", "kd_ratio"), "gamma": ("train", "gamma"), "lr": ("train", "lr"),
    "teacher_mode": ("train", "teacher_mode"), "student_lora": ("student", "lora"),
    "teacher_quantization": ("teacher", "quantization"),
}
SPLIT_METRICS = ("rouge_l", "rouge_l_sd", "exact_match", "exact_match_sd", "response_tokens",
                 "distinct_2", "repetition_rate", "truncated_rate", "n")


def _get(params: dict, path: tuple) -> Any:
    node = params
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def iter_runs(results_root: str | Path):
    """(run_dir, params, summary, labels) of every finished run under results_root/runs."""
    runs = Path(results_root) / "runs"
    if not runs.is_dir():
        return
    for run_dir in sorted(p for p in runs.iterdir() if p.is_dir() and ".replaced-" not in p.name):
        manifest = run_dir / "manifest.json"
        summary = run_dir / "summary.json"
        try:
            if json.loads(manifest.read_text()).get("status") != "finished" or not summary.exists():
                continue
            params = yaml.safe_load((run_dir / "params.yaml").read_text()) or {}
            summ = json.loads(summary.read_text())
        except (FileNotFoundError, json.JSONDecodeError, yaml.YAMLError):
            continue
        try:
            labels = json.loads((run_dir / "labels.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            labels = {}
        yield run_dir, params, summ, labels


def collect(results_root: str | Path):
    """One row per finished run x eval split, from the files under ``results_root/runs``.

    Columns: run, method, label, group, seed, objective and the other params of interest
    (`PARAM_COLUMNS`), split, rouge_l / exact_match (x100, mean over sampling seeds; the
    `_sd` columns are the sd over sampling seeds), nll / token_acc (teacher-forced on the
    split's references), response_tokens, distinct_2, repetition_rate, truncated_rate, n
    (examples), valid_nll, valid_token_acc, wall_time_s. A run without generation gets one
    row with split "valid".
    """
    import pandas as pd

    rows = []
    for run_dir, params, summ, labels in iter_runs(results_root):
        base = {"run": run_dir.name, "method": labels.get("method", strip_seed(run_dir.name)),
                "group": labels.get("group", ""), "run_dir": str(run_dir)}
        base["label"] = labels.get("label", DISPLAY.get(base["method"], base["method"]))
        for col, path in PARAM_COLUMNS.items():
            base[col] = _get(params, path)
        base.update(valid_nll=summ.get("valid_nll"), valid_token_acc=summ.get("valid_token_acc"),
                    wall_time_s=summ.get("wall_time_s"))
        tf = {}
        try:
            tf = json.loads((run_dir / "teacher_forced.json").read_text()).get("splits", {})
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        splits = list((summ.get("eval") or {}).keys()) or [
            s for s in ("test", "heldout", "valid", "train") if f"{s}_rouge_l" in summ]
        if not splits:
            rows.append(dict(base, split="valid"))
            continue
        for split in splits:
            row = dict(base, split=split)
            for m in SPLIT_METRICS:
                row[m] = summ.get(f"{split}_{m}", (summ.get("eval", {}).get(split) or {}).get(m))
            row["nll"] = summ.get(f"{split}_nll", (tf.get(split) or {}).get("nll"))
            row["token_acc"] = summ.get(f"{split}_token_acc", (tf.get(split) or {}).get("token_acc"))
            rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df["_order"] = [METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)
                        for m in df["method"]]
        df = df.sort_values(["_order", "method", "seed", "split"], kind="stable").drop(columns="_order")
        df = df.reset_index(drop=True)
    return df


# ----------------------------------------------------------------------------- statistics

def mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample sd with ddof=1, n); sd is NaN for fewer than two values."""
    vals = [float(v) for v in values if v is not None and not _isnan(v)]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / n
    if n == 1:
        return mean, float("nan"), 1
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)), n


def _isnan(v) -> bool:
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return True


def fmt_mean_sd(mean: float, sd: float, digits: int = 1) -> str:
    """'24.6 ± 0.3'; one seed (sd NaN) prints the mean alone; missing prints '–'."""
    if _isnan(mean):
        return "–"
    if _isnan(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def aggregate(df, by: Sequence[str] = ("method", "split"),
              metrics: Sequence[str] = ("rouge_l", "exact_match", "nll", "token_acc")):
    """Mean, sd and n over training seeds (runs) for each group: long numeric table."""
    import pandas as pd

    rows = []
    for key, g in df.groupby(list(by), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        for m in metrics:
            if m not in g:
                continue
            mean, sd, n = mean_sd(g[m])
            row[m], row[f"{m}_sd"], row[f"{m}_n"] = mean, sd, n
        row["n_seeds"] = int(g["run"].nunique()) if "run" in g else len(g)
        rows.append(row)
    return pd.DataFrame(rows)


def main_table(df, *, methods: Sequence[str] | None = None, splits: Sequence[str] = ("test", "heldout"),
               metrics: Sequence[str] = ("rouge_l", "exact_match", "nll"), digits: int = 1,
               group: str | None = None, label_col: str = "method"):
    """Paper-style table: one row per method, "mean ± sd" over training seeds per
    (split, metric), and the number of seeds. NLL gets 3 digits."""
    import pandas as pd

    data = df if group is None else df[df["group"].isin([group] if isinstance(group, str) else group)]
    if methods is not None:
        data = data[data["method"].isin(methods)]
    data = data[data["split"].isin(splits)]
    agg = aggregate(data, by=("method", "split"), metrics=metrics)
    order = list(methods) if methods is not None else list(dict.fromkeys(data["method"]))
    rows = []
    for method in order:
        sub = agg[agg["method"] == method]
        if sub.empty:
            continue
        label = data.loc[data["method"] == method, "label"].iloc[0] if "label" in data else method
        row = {"method": label if label_col == "label" else DISPLAY.get(method, method)}
        for split in splits:
            s = sub[sub["split"] == split]
            for m in metrics:
                col = f"{split} {METRIC_LABELS.get(m, m)}"
                if s.empty or m not in s:
                    row[col] = "–"
                    continue
                d = 3 if m in ("nll", "valid_nll", "token_acc") else digits
                row[col] = fmt_mean_sd(s[m].iloc[0], s[f"{m}_sd"].iloc[0], d)
        row["seeds"] = int(sub["n_seeds"].max())
        rows.append(row)
    return pd.DataFrame(rows)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the regularised incomplete beta (Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-12:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log(1 - x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def t_two_sided_p(t: float, dof: float) -> float:
    """Two-sided p-value of Student's t with (fractional) dof: I_{dof/(dof+t²)}(dof/2, 1/2)."""
    if _isnan(t) or _isnan(dof) or dof <= 0:
        return float("nan")
    if math.isinf(t):
        return 0.0
    return _betai(dof / 2.0, 0.5, dof / (dof + t * t))


def welch_t(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Welch's t statistic (mean(x) − mean(y)), Welch–Satterthwaite dof and two-sided p."""
    mx, sx, nx = mean_sd(x)
    my, sy, ny = mean_sd(y)
    if nx < 2 or ny < 2:
        return float("nan"), float("nan"), float("nan")
    vx, vy = sx * sx / nx, sy * sy / ny
    if vx + vy == 0:
        t = 0.0 if mx == my else math.copysign(math.inf, mx - my)
        return t, float(nx + ny - 2), (1.0 if mx == my else 0.0)
    t = (mx - my) / math.sqrt(vx + vy)
    dof = (vx + vy) ** 2 / (vx * vx / (nx - 1) + vy * vy / (ny - 1))
    return t, dof, t_two_sided_p(t, dof)


def noise_verdict(df, a: str, b: str, *, metric: str = "rouge_l", split: str = "test",
                  alpha: float = 0.05) -> dict:
    """Is method `a` different from method `b` beyond training-seed noise?

    Per-run values (one per training seed) of `metric` on `split`. "Beyond seed noise"
    needs both: Welch's t-test p < alpha, and |Δmean| > 2·pooled sd (pooled sd = sqrt of
    the mean of the two variances). With fewer than two seeds on a side the answer is
    "cannot tell". Returns the numbers and a plain sentence in ``text``.
    """
    sel = df[(df["split"] == split)] if "split" in df else df
    x = [v for v in sel.loc[sel["method"] == a, metric] if not _isnan(v)]
    y = [v for v in sel.loc[sel["method"] == b, metric] if not _isnan(v)]
    ma, sa, na = mean_sd(x)
    mb, sb, nb = mean_sd(y)
    name = METRIC_LABELS.get(metric, metric)
    la, lb = DISPLAY.get(a, a), DISPLAY.get(b, b)
    out = {"a": a, "b": b, "metric": metric, "split": split, "mean_a": ma, "sd_a": sa, "n_a": na,
           "mean_b": mb, "sd_b": sb, "n_b": nb, "delta": ma - mb}
    head = (f"{la} vs {lb}, {split} {name}: {fmt_mean_sd(ma, sa, 2)} (n={na}) vs "
            f"{fmt_mean_sd(mb, sb, 2)} (n={nb}), Δ = {ma - mb:+.2f}")
    if na < 2 or nb < 2:
        out.update(pooled_sd=float("nan"), t=float("nan"), dof=float("nan"), p=float("nan"),
                   verdict="cannot tell",
                   text=f"{head}. Cannot tell: fewer than two training seeds on one side, "
                        f"so the seed noise is unknown.")
        return out
    pooled = math.sqrt((sa * sa + sb * sb) / 2.0)
    t, dof, p = welch_t(x, y)
    beyond = (p < alpha) and abs(ma - mb) > 2 * pooled
    better = (ma < mb) if metric in LOWER_IS_BETTER else (ma > mb)
    if beyond:
        verdict = "better" if better else "worse"
        plain = (f"{la} is {verdict} than {lb}, beyond seed noise "
                 f"(|Δ| > 2 × pooled sd {pooled:.2f}, Welch p = {p:.3f}).")
    else:
        verdict = "within noise"
        plain = (f"The difference is within seed noise (pooled sd {pooled:.2f}, "
                 f"Welch t = {t:.2f}, dof {dof:.1f}, p = {p:.3f}); "
                 f"no claim that {la} differs from {lb}.")
    out.update(pooled_sd=pooled, t=t, dof=dof, p=p, verdict=verdict, text=f"{head}. {plain}")
    return out


# ----------------------------------------------------------------------------- buckets, curves

def read_eval_rows(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "eval.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bucket_table(df, *, split: str = "test", methods: Sequence[str] | None = None,
                 edges: Sequence[float] | None = None):
    """ROUGE-L and EM by reference-length bucket (paper Tables 4/5), per method.

    For every run of a method, the per-bucket scores (mean over sampling seeds) from its
    eval.jsonl; then mean ± sd over the method's training seeds. Long format: method,
    bucket, n_examples, rouge_l, rouge_l_sd, exact_match, exact_match_sd, n_seeds.
    """
    import pandas as pd

    from . import evaluate as eval_lib

    runs = df[df["split"] == split].drop_duplicates("run")
    if methods is not None:
        runs = runs[runs["method"].isin(methods)]
    per_run = []
    for _, r in runs.iterrows():
        rows = [x for x in read_eval_rows(r["run_dir"]) if x.get("split", split) == split]
        if not rows:
            continue
        t = eval_lib.bucket_table(rows, edges=edges)
        t["method"], t["run"] = r["method"], r["run"]
        per_run.append(t)
    if not per_run:
        return pd.DataFrame(columns=["method", "bucket", "n_examples", "rouge_l", "rouge_l_sd",
                                     "exact_match", "exact_match_sd", "n_seeds"])
    allr = pd.concat(per_run, ignore_index=True)
    out = []
    for (method, bucket), g in allr.groupby(["method", "bucket"], sort=False):
        rl, rl_sd, n = mean_sd(g["rouge_l"])
        em, em_sd, _ = mean_sd(g["exact_match"])
        out.append({"method": method, "bucket": bucket, "n_examples": int(g["n_examples"].max()),
                    "rouge_l": rl, "rouge_l_sd": rl_sd, "exact_match": em,
                    "exact_match_sd": em_sd, "n_seeds": n})
    res = pd.DataFrame(out)
    res["_lo"] = [float(b[1:].split(",")[0]) for b in res["bucket"]]
    res["_m"] = [METHOD_ORDER.index(m) if m in METHOD_ORDER else 99 for m in res["method"]]
    return res.sort_values(["_m", "method", "_lo"]).drop(columns=["_lo", "_m"]).reset_index(drop=True)


def read_metrics(run_dir: str | Path):
    import pandas as pd

    from .results import read_jsonl
    path = Path(run_dir) / "metrics.jsonl"
    return pd.DataFrame(read_jsonl(path)) if path.exists() else pd.DataFrame()


def curves(df, metrics: Sequence[str] = ("loss", "ce", "distill", "student_nll_ref"), *,
           methods: Sequence[str] | None = None, smooth: int = 5, ncols: int = 2, title: str = ""):
    """Training curves from metrics.jsonl: per method, the mean over its seeds (band = min..max
    over seeds), moving average over `smooth` steps. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    import pandas as pd

    runs = df.drop_duplicates("run")
    if methods is not None:
        runs = runs[runs["method"].isin(methods)]
    n = len(metrics)
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, min(ncols, n), figsize=(5.2 * min(ncols, n), 3.4 * nrows),
                             squeeze=False)
    # one colour per method in every panel; past ten methods tab10 would repeat colours
    order = list(dict.fromkeys(runs["method"]))
    cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    colours = {m: cmap(i % cmap.N) for i, m in enumerate(order)}
    for ax, metric in zip(axes.flat, metrics):
        for method, g in runs.groupby("method", sort=False):
            series = []
            for _, r in g.iterrows():
                m = read_metrics(r["run_dir"])
                if metric in m and "step" in m:
                    s = m.set_index("step")[metric].astype(float)
                    series.append(s.rolling(max(1, smooth), min_periods=1).mean())
            if not series:
                continue
            both = pd.concat(series, axis=1)
            label = g["label"].iloc[0] if "label" in g else method
            line = ax.plot(both.index, both.mean(axis=1), color=colours[method],
                           label=f"{label} (n={len(series)})")[0]
            if len(series) > 1:
                ax.fill_between(both.index, both.min(axis=1), both.max(axis=1),
                                color=line.get_color(), alpha=0.15)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02))
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def final_monitors(df, *, last: int = 10, split: str = "test"):
    """Reward-hacking monitors per run: the mean of the last `last` logged steps of
    reward_margin, reward_accuracy, student_nll_ref and argmax_disagree, beside the run's
    sampled response length, distinct-2 and teacher-forced NLL on `split`."""
    import pandas as pd

    rows = []
    for _, r in df[df["split"] == split].drop_duplicates("run").iterrows():
        m = read_metrics(r["run_dir"])
        row = {"run": r["run"], "method": r["method"], "label": r.get("label", r["method"])}
        for col in ("reward_margin", "reward_accuracy", "student_nll_ref", "argmax_disagree", "distill"):
            row[col] = float(m[col].tail(last).mean()) if col in m else float("nan")
        for col in ("response_tokens", "distinct_2", "nll", "rouge_l", "exact_match"):
            row[col] = r.get(col)
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- outputs

def to_markdown(df, floatfmt: str = ".2f") -> str:
    """A GitHub Markdown table (no `tabulate` dependency)."""
    cols = [str(c) for c in df.columns]

    def cell(v):
        if isinstance(v, float):
            return "–" if math.isnan(v) else format(v, floatfmt)
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(cell(v) for v in row.tolist()) + " |")
    return "\n".join(lines) + "\n"


def write_table(df, path_stem: str | Path, floatfmt: str = ".2f") -> tuple[Path, Path]:
    """Write `df` as <stem>.csv and <stem>.md (atomically); returns both paths."""
    from .results import atomic_write_text
    stem = Path(path_stem)
    csv, md = stem.with_suffix(".csv"), stem.with_suffix(".md")
    atomic_write_text(csv, df.to_csv(index=False))
    atomic_write_text(md, to_markdown(df, floatfmt))
    return csv, md


def savefig(fig, results_root: str | Path, name: str, dpi: int = 120) -> Path:
    """Save a figure as <results_root>/figures/<name>.png (temp file + rename)."""
    import os
    import tempfile
    folder = Path(results_root) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def tables_dir(results_root: str | Path) -> Path:
    path = Path(results_root) / "tables"
    path.mkdir(parents=True, exist_ok=True)
    return path


def paper_table():
    """method.md §5 as a DataFrame (rows: set; columns: methods), for the paper profile."""
    import pandas as pd
    rows = [{"student ← teacher": k[0], "set": k[1], **{DISPLAY.get(m, m): v for m, v in vals.items()}}
            for k, vals in PAPER_NUMBERS.items()]
    return pd.DataFrame(rows)


def gap_text(df, *, metric: str = "rouge_l", splits: Sequence[str] = ("test", "heldout")) -> str:
    """One sentence per split on the teacher–student gap (teacher vs the starting student)."""
    out = []
    for split in splits:
        sel = df[df["split"] == split]
        t = sel.loc[sel["method"] == "teacher", metric]
        s = sel.loc[sel["method"] == "student_init", metric]
        if t.empty or s.empty:
            continue
        out.append(f"{split}: teacher {METRIC_LABELS.get(metric, metric)} {t.mean():.1f} vs starting "
                   f"student {s.mean():.1f} (gap {t.mean() - s.mean():+.1f})")
    return "; ".join(out) if out else "no teacher/student_init runs found"


def answer_text(verdicts: Sequence[dict], df=None, *, metric: str = "rouge_l") -> str:
    """The study's answer in plain Markdown: one bullet per compared pair saying where
    (split × metric) the first method is better, worse or within seed noise, then, when
    `df` has the teacher and the starting student, how far each method moved the student
    on `metric` against the room the teacher left (the teacher–student gap)."""
    out = []
    for a, b in dict.fromkeys((v["a"], v["b"]) for v in verdicts):
        where = {}
        for v in verdicts:
            if (v["a"], v["b"]) == (a, b):
                where.setdefault(v["verdict"], []).append(
                    f"{v['split']} {METRIC_LABELS.get(v['metric'], v['metric'])}")
        la, lb = DISPLAY.get(a, a), DISPLAY.get(b, b)
        better, worse = where.pop("better", []), where.pop("worse", [])
        if better and worse:
            head = f"**{la} vs {lb}: mixed** — better on {', '.join(better)}, worse on {', '.join(worse)}"
        elif better:
            head = f"**{la} beats {lb}** beyond seed noise on {', '.join(better)}"
        elif worse:
            head = f"**{la} is worse than {lb}** beyond seed noise on {', '.join(worse)}"
        else:
            head = f"**{la} does not differ from {lb}** beyond seed noise"
        rest = "; ".join(f"{k} on {', '.join(v)}" for k, v in where.items())
        out.append(f"- {head}" + (f" ({rest})." if rest else "."))
    if df is not None and {"teacher", "student_init"} <= set(df["method"]):
        name = METRIC_LABELS.get(metric, metric)
        for split in [s for s in ("test", "heldout") if s in set(df["split"])]:
            sel = df[df["split"] == split]
            means = sel.groupby("method", sort=False)[metric].mean()
            start, gap = means["student_init"], means["teacher"] - means["student_init"]
            moved = {m: means[m] - start for m in means.index if m not in ("teacher", "student_init")}
            if not moved or _isnan(gap):
                continue
            listing = ", ".join(f"{DISPLAY.get(m, m)} {d:+.1f}" for m, d in moved.items())
            best = max(moved, key=moved.get)
            out.append(f"- {split} {name}: the teacher is {gap:+.1f} above the starting student. "
                       f"Change from the start, mean over seeds: {listing}. The best, "
                       f"{DISPLAY.get(best, best)}, closes {100 * moved[best] / gap:.0f} % of the gap.")
    return "\n".join(out)
