"""Reading results back: tables, statistics, the answer in words, figures. Reads only the
committed record of each run under ``<results_root>/data`` (rundata.py: summaries, per-prompt
rows, per-step logs; no model, no run folder), so `write_results` rebuilds every table,
interval, figure and answer sentence of ``results/<profile>`` from git alone:

    python -m dpkd_lib.study.report rebuild results/<profile>      (make tables PROFILE=<profile>)

Statistics (docs/design.md §7; the numbers are stats.py's). Training seeds are the unit of
replication: a comparison of methods a and b pairs seed s of a with seed s of b (same batches,
same pre-train blocks) on the seeds both ran, and every model is scored on the same prompts.
Per common seed, the mean over prompts of the per-prompt difference (a ratio metric such as
the token-weighted NLL through `stats.ratio_contributions`); the interval is Student's t over
those per-seed differences on S − 1 degrees of freedom (`stats.paired_interval`), which holds
its coverage at 2-3 seeds where the former bootstrap over seeds and prompts did not. A model
built once (the teacher, the starting student: group "pair") is the same for every seed. One
common seed leaves only the prompts: such a row is labelled "prompt sampling only" and never
compared. The declared comparisons are Holm-corrected together and every one of their
intervals is drawn at the Bonferroni level 1 − α/m, so an interval that excludes 0 is a Holm
rejection; beside each, the minimum detectable difference (80 % power at that level). The
words of the answer are generated from these intervals (`answer_text`), never typed.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from . import stats
from ..evaluate import bucket_table as run_bucket_table
from ..evaluate import mean_sd
from ..io import atomic_write_text
from .rundata import exported_runs, read_eval_rows, read_metric_rows
from .runs import DISPLAY, PILOT_READOUTS, as_list, check_primary, family_size, strip_seed

METHOD_ORDER = ["teacher", "student_init", "sft", "no_distill", "kd", "rkl", "jsd", "skl", "srkl", "seqkd",
                "dpkd_token", "dpkd_seq"]
METRIC_LABELS = {"rouge_l": "ROUGE-L", "exact_match": "EM", "nll": "NLL", "token_acc": "tok-acc",
                 "response_tokens": "resp. len", "distinct_2": "distinct-2", "repetition_rate": "repetition",
                 "sample_rouge_l": "ROUGE-L (T=1)", "sample_exact_match": "EM (T=1)",
                 "ended_rate": "ended by EOS", "empty_rate": "empty", "kl": "KL(teacher‖student)",
                 "valid_nll": "valid NLL", "wall_time_s": "wall s"}
LOWER_IS_BETTER = {"nll", "valid_nll", "repetition_rate", "kl"}
#: groups of models built once and shared by every seed of every method (a fixed reference)
FIXED_GROUPS = ("pair",)
#: power at which the minimum detectable difference of a comparison is stated
POWER = 0.8
# docs/method.md §5 (ROUGE-L). The baselines appear to be MiniLLM's published 5-seed means; DPKD
# is one seed. S-NI SeqKD: 16.4 in the paper's Table 1 (the released code's table has 16.0).
PAPER_NUMBERS = {
    ("gpt2-120M", "DollyEval"): {"teacher": 27.6, "sft": 23.3, "kd": 22.8, "seqkd": 22.7,
                                  "minillm": 24.6, "dpkd_token": 24.6},
    ("gpt2-120M", "SelfInst"): {"teacher": 14.3, "sft": 10.0, "kd": 10.8, "seqkd": 10.1,
                                 "minillm": 13.2, "dpkd_token": 13.8},
    ("gpt2-120M", "S-NI"): {"teacher": 27.6, "sft": 16.3, "kd": 13.4, "seqkd": 16.4,
                             "minillm": 25.3, "dpkd_token": 25.4},
}
PAPER_NOTE = ("Paper column: DPKD is one seed; the SFT/KD/SeqKD/MiniLLM columns appear to be "
              "MiniLLM's published 5-seed means.")
PAPER_ABLATIONS = {"full": 24.62, "no pre-train term": 23.47, "no length normalisation": 22.79,
                   "IPO": 18.78, "CPO": 24.31, "SimPO": 24.46}
PARAM_COLUMNS = {
    "objective": ("train", "objective"), "seed": ("train", "seed"), "steps": ("train", "max_steps"),
    "beta": ("train", "beta"), "loss_type": ("train", "loss_type"), "lr": ("train", "lr"),
    "kd_ratio": ("train", "kd_ratio"), "lm_coef": ("train", "lm_coef"),
    "length_normalize": ("train", "length_normalize"), "teacher_mode": ("train", "teacher_mode"),
    "student_lora": ("student", "lora"), "teacher_quantization": ("teacher", "quantization"),
}
SPLIT_METRICS = ("rouge_l", "exact_match", "response_tokens", "ended_rate", "empty_rate", "distinct_2",
                 "repetition_rate", "truncated_rate", "n", "sample_rouge_l", "sample_rouge_l_sd",
                 "sample_exact_match", "nll", "token_acc", "kl")


def label(method: str) -> str:
    return DISPLAY.get(method, method)


# ----------------------------------------------------------------------------- collection

def _get(params: dict, path: tuple) -> Any:
    node = params
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def iter_runs(results_root: str | Path):
    """(folder, params, summary, labels) of every run exported under results_root/data
    (only finished runs are exported)."""
    for folder in exported_runs(results_root):
        try:
            params = yaml.safe_load((folder / "params.yaml").read_text()) or {}
            summary = json.loads((folder / "summary.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError, yaml.YAMLError):
            continue
        try:
            labels = json.loads((folder / "labels.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            labels = {}
        yield folder, params, summary, labels


def collect(results_root: str | Path):
    """One row per exported run × eval split: run, method, label, group, the params of
    `PARAM_COLUMNS`, split, and the split's metrics from summary.json (`SPLIT_METRICS`:
    greedy ROUGE-L / EM ×100 and its response statistics, T=1 sampling as ``sample_*``,
    teacher-forced NLL / token accuracy), valid_nll, wall_time_s; ``run_dir`` is the run's
    folder under data/. A run evaluated on no split gets one row with split "valid"."""
    import pandas as pd

    rows = []
    for run_dir, params, summ, labels in iter_runs(results_root):
        method = labels.get("method", strip_seed(run_dir.name))
        base = {"run": run_dir.name, "method": method, "group": labels.get("group", ""),
                "label": labels.get("label", label(method)), "run_dir": str(run_dir)}
        base |= {col: _get(params, path) for col, path in PARAM_COLUMNS.items()}
        base |= {"valid_nll": summ.get("valid_nll"), "wall_time_s": summ.get("wall_time_s")}
        splits = list(summ.get("eval") or {})
        if not splits:
            rows.append(dict(base, split="valid"))
        for split in splits:
            rows.append(dict(base, split=split, **{m: summ.get(f"{split}_{m}") for m in SPLIT_METRICS}))
    df = pd.DataFrame(rows)
    if not df.empty:
        df["_order"] = [METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)
                        for m in df["method"]]
        df = df.sort_values(["_order", "method", "seed", "split"], kind="stable").drop(columns="_order")
        df = df.reset_index(drop=True)
    return df


def read_rows(run_dir: str | Path) -> list[dict]:
    """A run's per-prompt evaluation rows (data/<run>/eval_rows.jsonl.gz)."""
    return read_eval_rows(run_dir)


def per_example(df, *, metric: str = "rouge_l", decoding: str = "greedy"):
    """Per-(run, split, example) values of `metric` from the runs' exported rows: columns
    run, method, group, seed, split, id, sample_seed, num, den (the metric is Σnum/Σden:
    ROUGE-L and EM ×100 with den 1; teacher-forced ``nll`` / ``token_acc`` as sums over a
    reference's tokens, and ``kl`` (KL(teacher ‖ student), eval.teacher_kl) as each reference's mean
    over its positions, whatever `decoding` says; the pair's teacher, never scored against
    itself, has KL 0 on every reference it was scored on)."""
    import pandas as pd

    out = []
    for _, r in df.drop_duplicates("run").iterrows():
        for row in read_rows(r["run_dir"]):
            if metric in ("nll", "token_acc", "kl"):
                if row.get("decoding") != "teacher_forced":
                    continue
                if metric == "kl":   # the mean over a reference's positions, then over prompts (summary's kl)
                    if "kl" in row:
                        num, den = row["kl"], 1.0
                    elif r["method"] == "teacher" and r.get("group") == "pair":
                        num, den = 0.0, 1.0   # KL(teacher || teacher) = 0: the pair's teacher, not scored against itself
                    else:
                        continue
                else:
                    num = row["nll_sum"] if metric == "nll" else row["correct"]
                    den = row["n_tokens"]
            else:
                if row.get("decoding", "greedy") != decoding:
                    continue
                num, den = 100.0 * row[metric], 1.0
            out.append({"run": r["run"], "method": r["method"], "group": r.get("group", ""),
                        "seed": r["seed"], "split": row["split"], "id": str(row["id"]),
                        "sample_seed": row.get("seed"), "num": num, "den": den})
    return pd.DataFrame(out, columns=["run", "method", "group", "seed", "split", "id", "sample_seed",
                                      "num", "den"])


# ----------------------------------------------------------------------------- statistics

def aggregate(df, by: Sequence[str] = ("method", "split"),
              metrics: Sequence[str] = ("rouge_l", "exact_match", "nll", "token_acc")):
    """Mean, sd and n over training seeds (runs) for each group: a long numeric table."""
    import pandas as pd

    rows = []
    for key, g in df.groupby(list(by), sort=False, dropna=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for m in metrics:
            if m in g:
                row[m], row[f"{m}_sd"], row[f"{m}_n"] = mean_sd(g[m])
        row["n_seeds"] = int(g["run"].nunique()) if "run" in g else len(g)
        rows.append(row)
    return pd.DataFrame(rows)


def fmt_mean_sd(mean: float, sd: float, digits: int = 1) -> str:
    """'24.6 ± 0.3'; one seed (sd NaN) prints the mean alone; missing prints '–'."""
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if sd is None or math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _digits(metric: str, digits: int = 1) -> int:
    """Decimals to print a metric with: per-token quantities 3, shares 2, scores `digits`."""
    if metric in ("nll", "valid_nll", "token_acc", "repetition_rate", "kl"):
        return 3
    return 2 if metric in ("ended_rate", "empty_rate", "truncated_rate") else digits


def main_table(df, *, methods: Sequence[str] | None = None, splits: Sequence[str] = ("test", "heldout"),
               metrics: Sequence[str] = ("rouge_l", "exact_match", "nll"), digits: int = 1,
               group: str | Sequence[str] | None = None, label_col: str = "method"):
    """Paper-style table: one row per method, "mean ± sd" over training seeds per
    (split, metric), and the number of seeds."""
    import pandas as pd

    data = df if group is None else df[df["group"].isin([group] if isinstance(group, str) else group)]
    if methods is not None:
        data = data[data["method"].isin(methods)]
    data = data[data["split"].isin(splits)]
    agg = aggregate(data, by=("method", "split"), metrics=metrics)
    rows = []
    for method in (list(methods) if methods is not None else list(dict.fromkeys(data["method"]))):
        sub = agg[agg["method"] == method]
        if sub.empty:
            continue
        name = data.loc[data["method"] == method, "label"].iloc[0] if label_col == "label" else label(method)
        row = {"method": name}
        for split in splits:
            s = sub[sub["split"] == split]
            for m in metrics:
                row[f"{split} {METRIC_LABELS.get(m, m)}"] = "–" if s.empty or m not in s else \
                    fmt_mean_sd(s[m].iloc[0], s[f"{m}_sd"].iloc[0], _digits(m, digits))
        row["seeds"] = int(sub["n_seeds"].max())
        rows.append(row)
    return pd.DataFrame(rows)


def _seed_key(seed):
    """Seeds in numeric order (2 before 10), anything else after, by its text."""
    try:
        return (0, float(seed), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(seed))


def _matrix(ex, method: str, split: str):
    """{seed: frame of num, den by prompt id} of one method on one split (mean over sampling
    seeds, if any), and whether the method is a fixed model (one run of a FIXED_GROUPS group)."""
    sel = ex[(ex["method"] == method) & (ex["split"] == split)]
    out = {seed: g.groupby("id")[["num", "den"]].mean().sort_index()
           for seed, g in sel.groupby("seed", dropna=False)}
    fixed = len(out) == 1 and "group" in sel and bool(sel["group"].isin(FIXED_GROUPS).all())
    return out, fixed


def paired_differences(ex, a: str, b: str, split: str) -> dict:
    """The matrix of paired differences a − b [S, P] on `split` (`per_example` rows): one row
    per training seed both methods ran (a fixed model, the teacher or the starting student,
    pairs with every seed of the other side), one column per prompt both were scored on; a
    ratio metric is linearised per seed (`stats.ratio_contributions`), so a row's mean is that
    seed's Σnum/Σden of a minus b's. Also: seeds, n_seeds_a/b (all runs of each side),
    mean_a/mean_b (over the paired seeds), n_prompts. A ValueError when two trained methods
    share no seed: an unpaired comparison is not what the design declares."""
    A, fixed_a = _matrix(ex, a, split)
    B, fixed_b = _matrix(ex, b, split)
    if not A or not B:
        missing = [m for m, M in ((a, A), (b, B)) if not M]
        raise ValueError(f"{a} vs {b} on {split}: no per-prompt rows for {', '.join(missing)}; "
                         f"run it (or check the method name and split)")
    only = lambda M: next(iter(M.values()))  # noqa: E731
    if fixed_a and fixed_b:      # two single models (the gap teacher − start): one row
        seeds, pick_a, pick_b = [next(iter(A))], (lambda s: only(A)), (lambda s: only(B))
    elif fixed_a:                # a model built once is the same for every seed of the other side
        seeds, pick_a, pick_b = sorted(B, key=_seed_key), (lambda s: only(A)), B.__getitem__
    elif fixed_b:
        seeds, pick_a, pick_b = sorted(A, key=_seed_key), A.__getitem__, (lambda s: only(B))
    else:
        seeds = sorted(set(A) & set(B), key=_seed_key)
        if not seeds:
            raise ValueError(f"{a} vs {b} on {split}: no training seed in common ({a}: {sorted(A, key=_seed_key)}, "
                             f"{b}: {sorted(B, key=_seed_key)}); train both on the same seeds to compare them")
        pick_a, pick_b = A.__getitem__, B.__getitem__
    frames = [pick_a(s) for s in seeds] + [pick_b(s) for s in seeds]
    ids = sorted(set.intersection(*(set(f.index) for f in frames)))
    if len(ids) < 2:
        scored = min(len(f.index) for f in frames)
        why = ("the runs were evaluated on different prompts (check eval.max_examples)" if scored >= 2 else
               "too few prompts were scored at all (teacher-forced readouts keep only the references "
               "that fit data.max_length and data.max_prompt; check those and eval.max_examples)")
        raise ValueError(f"{a} vs {b} on {split}: {len(ids)} prompt(s) scored for both; {why}")
    side = lambda pick: stats.ratio_contributions(  # noqa: E731
        np.stack([pick(s).loc[ids, "num"].to_numpy(float) for s in seeds]),
        np.stack([pick(s).loc[ids, "den"].to_numpy(float) for s in seeds]))
    ca, cb = side(pick_a), side(pick_b)
    return {"a": a, "b": b, "split": split, "d": ca - cb, "seeds": seeds, "n_seeds_a": len(A),
            "n_seeds_b": len(B), "mean_a": float(ca.mean()), "mean_b": float(cb.mean()),
            "n_prompts": len(ids)}


def difference(ex, a: str, b: str, split: str, *, level: float = 0.95) -> dict:
    """a − b on `split` with its interval at `level` (`paired_differences`, then
    `stats.paired_interval`): delta, ci_lo, ci_hi, ci_level, p, se, df, seed_sd, n_seeds (the
    paired seeds), seeds, interval ("seeds" or "prompt sampling only"), n_seeds_a/b,
    mean_a/b, n_prompts."""
    pd_ = paired_differences(ex, a, b, split)
    r = stats.paired_interval(pd_["d"], level)
    return {"a": a, "b": b, "split": split, "delta": float(r["mean"]), "ci_lo": float(r["lo"]),
            "ci_hi": float(r["hi"]), "ci_level": level, "p": float(r["p"]), "se": float(r["se"]),
            "df": float(r["df"]), "seed_sd": float(r["seed_sd"]), "n_seeds": r["n_seeds"],
            "seeds": [_plain_seed(s) for s in pd_["seeds"]],
            "interval": r["kind"], "n_seeds_a": pd_["n_seeds_a"], "n_seeds_b": pd_["n_seeds_b"],
            "mean_a": pd_["mean_a"], "mean_b": pd_["mean_b"], "n_prompts": pd_["n_prompts"]}


def _plain_seed(seed):
    """A seed as the params wrote it: 2, not 2.0 (a float column of a DataFrame); NaN -> None."""
    if isinstance(seed, (float, np.floating)):
        return None if math.isnan(seed) else (int(seed) if float(seed).is_integer() else float(seed))
    return seed.item() if isinstance(seed, np.generic) else seed


#: what every per-method table shows after the declared metrics: ROUGE-L always with the
#: response length beside it (mean new tokens, share ended by EOS, share empty)
REPORTED = ("rouge_l", "exact_match", "nll", "response_tokens", "ended_rate", "empty_rate", "repetition_rate")


def shown_metrics(primary: dict, rest: Sequence[str] = REPORTED) -> tuple[str, ...]:
    """The columns of a per-method table: the declared metrics first, then `rest`."""
    return tuple(dict.fromkeys([*as_list(primary["metric"]), *rest]))


def _effect_of(effect, metric: str):
    """The effect sought for `metric`: a number, a {metric: number} mapping, or None."""
    if isinstance(effect, dict):
        return effect.get(metric)
    return effect


def compare(ex, pairs: Sequence[Sequence[str]], splits: Sequence[str], *, metric: str = "rouge_l",
            alpha: float = 0.05, power: float = POWER, effect: float | None = None, m: int | None = None,
            holm_correct: bool = True) -> list[dict]:
    """The declared comparisons (method a vs method b) on every split: one dict per (pair,
    split) from `difference` at the Bonferroni level 1 − α/m (m = pairs × splits unless
    given), plus metric, p_holm, rejected, mdd (`stats.mdd`: the smallest difference found
    with probability `power` at level α/m, from the comparison's se and df), effect (the
    effect sought, if declared) and verdict: "better" / "worse" (Holm rejects),
    "no difference shown", or "not compared (one seed)" (one common seed: the interval is
    prompt sampling only; it counts in m, as declared, but has no p and is never rejected)."""
    m = m or len(pairs) * len(splits)
    level = stats.bonferroni_level(m, alpha)
    results = []
    for (a, b), split in ((p, s) for p in pairs for s in splits):
        r = dict(difference(ex, a, b, split, level=level), metric=metric, effect=effect)
        one_seed = r["interval"] == stats.PROMPTS_ONLY
        r["mdd"] = float("nan") if one_seed else stats.mdd(r["se"], r["df"], alpha / m, power)
        if one_seed:
            r["p"] = float("nan")
        results.append(r)
    return _holm_verdicts(results, alpha) if holm_correct else results


def _holm_verdicts(results: list[dict], alpha: float) -> list[dict]:
    """Holm's step-down over `results` (`stats.holm`): p_holm, rejected and the verdict."""
    adjusted, rejected = stats.holm([r["p"] for r in results], alpha)
    for r, p_adj, rej in zip(results, adjusted, rejected):
        r.update(p_holm=float(p_adj), rejected=bool(rej))
        lower = r["metric"] in LOWER_IS_BETTER
        if r["interval"] == stats.PROMPTS_ONLY:
            r["verdict"] = "not compared (one seed)"
        elif rej:
            r["verdict"] = "better" if ((r["delta"] < 0) if lower else (r["delta"] > 0)) else "worse"
        else:
            r["verdict"] = "no difference shown"
    return results


def compare_all(df, primary: dict, splits: Sequence[str] | None = None) -> list[dict]:
    """Every declared comparison of notebook 01's ``primary`` (metric: one name or a list;
    decoding; splits; alpha; comparisons; optional effect, the effect sought, and
    planned_mdd, the pilot's minimum detectable difference at the declared seeds: each a
    number or {metric: number}) as one Holm family over metrics × pairs × splits."""
    check_primary(primary)
    splits = list(primary["splits"] if splits is None else splits)
    m = family_size(primary, splits)
    results = []
    for metric in as_list(primary["metric"]):
        ex = per_example(df, metric=metric, decoding=primary.get("decoding", "greedy"))
        found = compare(ex, primary["comparisons"], splits, metric=metric, alpha=primary["alpha"],
                        effect=_effect_of(primary.get("effect"), metric), m=m, holm_correct=False)
        results += [dict(r, planned_mdd=_effect_of(primary.get("planned_mdd"), metric)) for r in found]
    return _holm_verdicts(results, primary["alpha"])


def gap_closed(ex, methods: Sequence[str], split: str, *, start: str = "student_init",
               teacher: str = "teacher", level: float = 0.95, labels: dict | None = None,
               metric: str = "rouge_l") -> list[dict]:
    """How far each method moved the starting student toward the teacher on `split`: moved =
    method − start with its interval at `level` (`difference`: over the method's seeds, or
    "prompt sampling only" for a method run with one seed, as arm (b)'s are), the gap =
    teacher − start (two single models: its interval is prompt sampling only) and the share
    moved / gap, a point estimate (no interval). ``labels`` names the methods in the answer
    (an arm's "KD alone"); default `label`."""
    present = set(ex.loc[ex["split"] == split, "method"])
    if start not in present or teacher not in present:
        return []
    gap = difference(ex, teacher, start, split, level=level)
    out = []
    for method in methods:
        if method not in present:
            continue
        moved = difference(ex, method, start, split, level=level)
        out.append({"method": method, "label": (labels or {}).get(method) or label(method),
                    "split": split, "metric": metric, "moved": moved["delta"],
                    "moved_ci": (moved["ci_lo"], moved["ci_hi"]), "level": level,
                    "n_seeds": moved["n_seeds"], "interval": moved["interval"],
                    "gap": gap["delta"], "gap_ci": (gap["ci_lo"], gap["ci_hi"]),
                    "share": moved["delta"] / gap["delta"] if gap["delta"] else float("nan")})
    return out


def arm_methods(arms: dict) -> list[str]:
    """The method of every run of every arm of notebook 01's params (``prefix`` + key), in
    the params' order: what `study_answer` reports the moves of."""
    return [arm.get("prefix", "") + method for arm in arms.values() for method in arm["methods"]]


def study_answer(df, arms: dict, primary: dict, splits: Sequence[str] | None = None
                 ) -> tuple[list[dict], list[dict], str]:
    """The study's answer from collected runs (notebook 01 shows it, `write_results` writes
    it): the declared comparisons (`compare_all`: Holm over every metric, pair and split, each
    interval at the Bonferroni level), how far every method of every arm moved the start
    (`gap_closed`, named by the arms' labels, per primary metric) and the text
    (`answer_text`). ``splits`` default to the primary ones; none gives ``([], [], "")``."""
    splits = list(primary["splits"] if splits is None else splits)  # [] (no eval split yet): nothing
    if not splits:
        return [], [], ""
    runs = df[df["group"].isin(["pair", *arms])]
    comparisons = compare_all(runs, primary, splits)
    labels = dict(zip(df["method"], df["label"]))
    moved = []
    for metric in as_list(primary["metric"]):
        ex = per_example(runs, metric=metric, decoding=primary.get("decoding", "greedy"))
        moved += [m for split in splits for m in gap_closed(ex, arm_methods(arms), split, labels=labels,
                                                            metric=metric)]
    return comparisons, moved, answer_text(comparisons, moved)


def _ci(r: dict, digits: int = 1) -> str:
    return f"{r['delta']:+.{digits}f} [{r['ci_lo']:+.{digits}f}, {r['ci_hi']:+.{digits}f}]"


def _moved_ci(m: dict) -> str:
    """A `gap_closed` row's change from the start and its interval, in its readout's decimals."""
    k = _digits(m.get("metric", "rouge_l"))
    return f"{m['moved']:+.{k}f} [{m['moved_ci'][0]:+.{k}f}, {m['moved_ci'][1]:+.{k}f}]"


def _seeds_words(r: dict) -> str:
    n = r["n_seeds"]
    return f"{n} paired seed{'s' if n != 1 else ''}"


def comparison_sentence(r: dict) -> str:
    """One plain sentence per comparison, from its interval and power (and nothing else)."""
    a, b, name = label(r["a"]), label(r["b"]), METRIC_LABELS.get(r["metric"], r["metric"])
    k = _digits(r["metric"])
    if r["verdict"] == "not compared (one seed)":
        return (f"{a} and {b} are not compared on {r['split']} {name}: they share one training seed, "
                f"so Δ = {_ci(r, k)} ({100 * r['ci_level']:.1f} % CI) is prompt sampling only.")
    where = (f"{r['split']} {name}: Δ = {_ci(r, k)} ({100 * r['ci_level']:.1f} % CI over "
             f"{_seeds_words(r)}, Holm p = {r['p_holm']:.3f})")
    excludes = r["ci_lo"] > 0 or r["ci_hi"] < 0
    if r["verdict"] in ("better", "worse"):
        verb = "beats" if r["verdict"] == "better" else "is worse than"
        text = f"{a} {verb} {b} on {where}"
        if not excludes:
            text += (f"; Holm's step-down rejects it, though the interval, drawn at the level of all "
                     f"comparisons at once, reaches 0")
        return text + "."
    text = f"{a} and {b} are not told apart on {where}: the interval includes 0"
    if not math.isnan(r.get("mdd", float("nan"))):
        text += (f"; the smallest difference these seeds detect with {100 * POWER:.0f} % power at this "
                 f"level is {r['mdd']:.{k}f}")
    effect = r.get("effect")
    half = (r["ci_hi"] - r["ci_lo"]) / 2
    if effect is not None and half > effect:
        text += f", and the interval (±{half:.{k}f}) is wider than the effect sought ({effect:.{k}f})"
    return text + "."


def answer_text(comparisons: Sequence[dict], moved: Sequence[dict] = ()) -> str:
    """The study's answer in Markdown, every sentence generated from the intervals: one
    bullet per comparison, then how far each method moved the student toward the teacher."""
    lines = [f"- {comparison_sentence(r)}" for r in comparisons]
    if comparisons:
        m, level = len(comparisons), comparisons[0]["ci_level"]
        lines.append(f"- How: each Δ is the mean over paired training seeds of the per-seed mean difference "
                     f"over prompts; its interval is Student's t over those per-seed differences (S − 1 df), "
                     f"drawn at {100 * level:.1f} % for all {m} declared comparison{'s' if m > 1 else ''} "
                     f"(Bonferroni), and Holm's step-down on their p-values decides.")
    for key in dict.fromkeys((m["split"], m.get("metric", "rouge_l")) for m in moved):
        sel = [m for m in moved if (m["split"], m.get("metric", "rouge_l")) == key]
        split, metric = key
        k, gap, lower = _digits(metric), sel[0]["gap"], metric in LOWER_IS_BETTER
        towards = gap < 0 if lower else gap > 0

        def item(m):
            how = (f"{m['n_seeds']} seeds" if m["interval"] == stats.SEEDS
                   else "one seed: prompt sampling only")
            share = f"; {100 * m['share']:.0f} % of the gap" if towards else ""
            return f"{m['label']} {_moved_ci(m)} ({how}{share})"
        name = METRIC_LABELS.get(metric, metric)
        gap_ci = f"{gap:+.{k}f} [{sel[0]['gap_ci'][0]:+.{k}f}, {sel[0]['gap_ci'][1]:+.{k}f}]"
        where = (f"the teacher is {gap_ci} from the starting student (prompt sampling only)" if towards else
                 f"the teacher is not better than the starting student ({gap_ci}): there is no gap to close")
        level = 100 * sel[0].get("level", 0.95)
        lines.append(f"- {split} {name}: {where}. Change from the start ({level:.0f} % CI): "
                     f"{'; '.join(item(m) for m in sel)}.")
    return "\n".join(lines)


def comparisons_table(comparisons: Sequence[dict]):
    """The declared comparisons, one row each: everything a sentence of the answer quotes
    (delta, interval and its level, seeds, p, Holm p, verdict, mdd) and what it rests on
    (means of both sides on the paired seeds, the per-seed sd of the difference, se, df)."""
    import pandas as pd
    return pd.DataFrame([{
        "a": r.get("a_label") or label(r["a"]), "b": label(r["b"]), "split": r["split"],
        "metric": METRIC_LABELS.get(r["metric"], r["metric"]), "delta": r["delta"],
        "ci": f"[{r['ci_lo']:+.2f}, {r['ci_hi']:+.2f}]", "ci_lo": r["ci_lo"], "ci_hi": r["ci_hi"],
        "ci_level": r["ci_level"], "half_width": (r["ci_hi"] - r["ci_lo"]) / 2, "p": r["p"],
        "p_holm": r["p_holm"], "verdict": r["verdict"], "mdd": r["mdd"],
        "effect": float("nan") if r.get("effect") is None else r["effect"],
        "planned_mdd": float("nan") if r.get("planned_mdd") is None else r["planned_mdd"],
        "seeds": ",".join(str(s) for s in r["seeds"]) if r["interval"] == stats.SEEDS else "1",
        "n_seeds": r["n_seeds"], "runs": f"{r['n_seeds_a']}/{r['n_seeds_b']}", "interval": r["interval"],
        "mean_a": r["mean_a"], "mean_b": r["mean_b"], "seed_sd": r["seed_sd"], "se": r["se"], "df": r["df"],
        "prompts": r["n_prompts"]} for r in comparisons])


def moved_table(moved: Sequence[dict]):
    """How far each method moved the start (`gap_closed`), one row per method × split × metric."""
    import pandas as pd
    return pd.DataFrame([{
        "method": m["label"], "split": m["split"], "metric": METRIC_LABELS.get(m.get("metric"), m.get("metric")),
        "moved": m["moved"], "ci_lo": m["moved_ci"][0], "ci_hi": m["moved_ci"][1], "ci_level": m["level"],
        "n_seeds": m["n_seeds"], "interval": m["interval"], "gap": m["gap"], "gap_ci_lo": m["gap_ci"][0],
        "gap_ci_hi": m["gap_ci"][1], "share": m["share"]} for m in moved])


# ----------------------------------------------------------------------------- buckets, curves

def buckets(df, *, split: str = "test", methods: Sequence[str] | None = None, edges=None):
    """Greedy ROUGE-L and EM by reference-length bucket (paper Tables 4/5), per method: per
    run from its eval.jsonl (evaluate.bucket_table), then mean ± sd over training seeds."""
    import pandas as pd

    runs = df[df["split"] == split].drop_duplicates("run")
    if methods is not None:
        runs = runs[runs["method"].isin(methods)]
    per_run = []
    for _, r in runs.iterrows():
        rows = [x for x in read_rows(r["run_dir"])
                if x.get("split") == split and x.get("decoding", "greedy") == "greedy"]
        if rows:
            t = run_bucket_table(rows, edges=edges)
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
                    "rouge_l": rl, "rouge_l_sd": rl_sd, "exact_match": em, "exact_match_sd": em_sd,
                    "n_seeds": n})
    res = pd.DataFrame(out)
    res["_lo"] = [float(b[1:].split(",")[0]) for b in res["bucket"]]
    res["_m"] = [METHOD_ORDER.index(m) if m in METHOD_ORDER else 99 for m in res["method"]]
    return res.sort_values(["_m", "method", "_lo"]).drop(columns=["_lo", "_m"]).reset_index(drop=True)


def read_metrics(run_dir: str | Path):
    """A run's per-step training log (data/<run>/metrics.jsonl.gz) as a DataFrame."""
    import pandas as pd
    return pd.DataFrame(read_metric_rows(run_dir))


def curves(df, metrics: Sequence[str] = ("nll_ref", "kd_term", "dpkd_token_term", "dpkd_seq_term"), *,
           methods: Sequence[str] | None = None, smooth: int = 5, ncols: int = 2, title: str = ""):
    """Training curves from metrics.jsonl, one quantity per panel with its unit: each entry
    of `metrics` is a key of `CURVE_PANELS` (a quantity and the objectives it is defined
    for: KD's KL and DPKD's preference loss never share an axis, per-token and per-sequence
    quantities neither) or a logged column drawn for every run. Per method, the mean over its
    seeds (band: min..max), moving average over `smooth` steps; the objective-alone arm is
    dashed. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    import pandas as pd

    runs = df.drop_duplicates("run")
    if methods is not None:
        runs = runs[runs["method"].isin(methods)]
    panels = [CURVE_PANELS.get(m, {"metric": m, "title": m, "ylabel": QUANTITY_UNITS.get(m, "")})
              for m in metrics]
    panels = [p for p in panels if _panel_runs(runs, p).shape[0]] or panels[:1]
    n = len(panels)
    ncols = min(ncols, n)
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.0 * nrows + 0.6), squeeze=False)
    looks = line_looks(runs)
    cache = {}
    for ax, panel in zip(axes.flat, panels):
        for method, g in _panel_runs(runs, panel).groupby("method", sort=False):
            series = []
            for _, r in g.iterrows():
                m = cache.setdefault(r["run_dir"], read_metrics(r["run_dir"]))
                if panel["metric"] in m and "step" in m:
                    s = m.set_index("step")[panel["metric"]].astype(float).dropna()
                    series.append(s.rolling(max(1, smooth), min_periods=1).mean())
            if not series:
                continue
            both = pd.concat(series, axis=1)
            colour, style = looks[method]
            line = ax.plot(both.index, both.mean(axis=1), color=colour, ls=style,
                           label=f"{g['label'].iloc[0]}" + (f" (n={len(series)})" if len(series) > 1 else ""))[0]
            if len(series) > 1:
                ax.fill_between(both.index, both.min(axis=1), both.max(axis=1), color=line.get_color(),
                                alpha=0.15, lw=0)
        if panel.get("ref") is not None:
            ax.axhline(panel["ref"][0], color="gray", ls=":", lw=1)
            ax.annotate(panel["ref"][1], (1, panel["ref"][0]), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=7, color="gray")
        ax.set_title(panel["title"])
        ax.set_ylabel(panel["ylabel"])
        ax.set_xlabel("training step")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    legend = {}   # one legend for the figure: a method looks the same in every panel
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    rows = math.ceil(len(legend) / 4)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, (0.25 * rows + 0.1) / fig.get_figheight(), 1, 1))
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(4, len(legend)))
    return fig


TERM_LABELS = {"ce": "CE (dataset)", "distill": "objective term", "pt_ce": "CE (pre-train)",
               "pt_kd": "KD (pre-train)"}


def update_split(df, methods: Sequence[str] | None = None):
    """Where each method's update comes from: per run, the mean over its gradient-probe steps
    of each loss term's share of the raw gradient (its gradient projected on the total,
    |g_t|·cos(g_t, g) / |g|; the shares sum to 1), its gradient norm and cosine, and, for runs
    logged with it, its share of the AdamW update (``adam_share``: the term's gradient through
    the optimiser's preconditioner, projected on the whole update); then the mean over seeds.
    Long format: method, term, share, share_sd, gnorm, gcos, n_runs, n_probes[, adam_share]."""
    import pandas as pd

    rows = []
    runs = df.drop_duplicates("run")
    if methods is not None:
        runs = runs[runs["method"].isin(methods)]
    for _, r in runs.iterrows():
        m = read_metrics(r["run_dir"])
        if "gnorm_total" not in m:
            continue
        probes = m.dropna(subset=["gnorm_total"])
        for term in TERM_LABELS:
            if f"gnorm_{term}" not in probes:
                continue
            share = probes[f"gnorm_{term}"] * probes[f"gcos_{term}"] / probes["gnorm_total"]
            # the term's share of the AdamW update (runs logged with it; objectives.gradient_split)
            adam = probes[f"adam_share_{term}"].dropna() if f"adam_share_{term}" in probes else []
            rows.append({"method": r["method"], "label": r["label"], "run": r["run"], "term": term,
                         "share": float(share.mean()), "gnorm": float(probes[f"gnorm_{term}"].mean()),
                         "gcos": float(probes[f"gcos_{term}"].mean()), "n_probes": len(probes),
                         "adam_share": float(adam.mean()) if len(adam) else float("nan")})
    per_run = pd.DataFrame(rows)
    if per_run.empty:
        return per_run
    out = []
    for (method, term), g in per_run.groupby(["method", "term"], sort=False):
        share, sd, n = mean_sd(g["share"])
        out.append({"method": method, "label": g["label"].iloc[0], "term": term, "share": share,
                    "share_sd": sd, "gnorm": float(g["gnorm"].mean()), "gcos": float(g["gcos"].mean()),
                    "n_runs": n, "n_probes": int(g["n_probes"].sum()), "adam_share": float(g["adam_share"].mean())})
    out = pd.DataFrame(out)
    return out.drop(columns="adam_share") if out["adam_share"].isna().all() else out


def update_split_figure(split_df, title: str = "Which loss term drives the gradient"):
    """Stacked bars per method: each loss term's share of the raw gradient (its projection
    on the total gradient, `update_split`; the shares sum to 1, a negative share pulls
    against the total). When `update_split` carries an AdamW-update share per term
    (`ADAM_SHARE_COLUMNS`), a second panel shows what the optimizer's step made of it."""
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(split_df["method"]))
    adam = next((c for c in ADAM_SHARE_COLUMNS if c in split_df and split_df[c].notna().any()), None)
    panels = [("share", "share of the raw gradient\n(projection on the total gradient)")]
    if adam:
        panels.append((adam, "share of the AdamW update\n(projection on the step taken)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(4.8, 0.95 * len(methods) + 2.2), 3.6 * len(panels)),
                             squeeze=False, sharex=True)
    axes = axes.T
    colours = dict(zip(TERM_LABELS, ["#4C72B0", "#C44E52", "#8C8C8C", "#CCB974"]))
    labels = [split_df.loc[split_df["method"] == m, "label"].iloc[0] for m in methods]
    for ax, (column, ylabel) in zip(axes[0], panels):
        bottom_pos, bottom_neg = np.zeros(len(methods)), np.zeros(len(methods))
        for term, name in TERM_LABELS.items():
            vals = np.array([float(split_df[(split_df["method"] == m) & (split_df["term"] == term)][column].sum())
                             for m in methods])
            if not vals.any():
                continue
            base = np.where(vals >= 0, bottom_pos, bottom_neg)
            ax.bar(range(len(methods)), vals, bottom=base, label=name, color=colours[term], width=0.7)
            if term == "distill":   # the term under test: its share written on the bar
                for i, (v, b) in enumerate(zip(vals, base)):
                    if v:
                        ax.annotate(f"{100 * v:.0f} %", (i, b + v / 2), ha="center", va="center",
                                    fontsize=7, color="white" if abs(v) > 0.12 else "black",
                                    xytext=(0, 0 if abs(v) > 0.12 else 6), textcoords="offset points")
            bottom_pos += np.clip(vals, 0, None)
            bottom_neg += np.clip(vals, None, 0)
        ax.set_xticks(range(len(methods)), [textwrap_label(x, 12) for x in labels], rotation=0, fontsize=7)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="x", visible=False)
    axes[0][0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), title="loss term")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def final_monitors(df, *, last: int = 10, split: str = "test"):
    """Reward-hacking monitors per run: the mean of the last `last` logged steps of
    reward_margin, reward_accuracy, grad_weight, student_nll_ref and argmax_disagree, beside
    the run's greedy response length, repetition and teacher-forced NLL on `split`."""
    import pandas as pd

    rows = []
    for _, r in df[df["split"] == split].drop_duplicates("run").iterrows():
        m = read_metrics(r["run_dir"])
        row = {"run": r["run"], "method": r["method"], "label": r.get("label", r["method"])}
        for col in ("reward_margin", "reward_accuracy", "grad_weight", "student_nll_ref",
                    "argmax_disagree", "distill"):
            row[col] = float(m[col].tail(last).mean()) if col in m else float("nan")
        for col in ("response_tokens", "repetition_rate", "nll", "rouge_l", "exact_match"):
            row[col] = r.get(col)
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the design pilot
# Notebook 01 §2; runs.run_pilot makes the runs, valid split only. Stage 1 chose the start
# and the budget (`pilot_table`: each setting's gain over the start in units of its seed sd).
# Stage 2 sizes the final design: `pilot_noise` (each candidate readout's seed sd, move from
# the start and move on a rerun), `pilot_design` (per declared comparison and readout, the
# variance components of the paired difference and the minimum detectable difference at the
# corrected level as seeds grow, also as a share of SFT's move, which puts readouts of
# different units on one scale) and `pilot_lrs` / `pilot_chosen_rates` / `pilot_rates` (each objective alone at each
# rate of pilot.lr_grid).

PILOT_START = "pilot_start_student_init"


def run_labels(df) -> dict:
    """{run: its labels.json} for every run of collect's frame `df` (read once per run)."""
    return {r: json.loads((Path(d) / "labels.json").read_text()) for r, d in dict(zip(df["run"], df["run_dir"])).items()}


def _pilot_labelled(df):
    """collect's frame with each run's pilot labels (stage, objective, setting, start)."""
    labels = run_labels(df)
    # the pilot's own name of a method ("objective" in its labels: an arm's method, e.g.
    # dpkd_token_b1), not the params' train.objective, which two methods of one arm may share
    return df.assign(stage=[labels[r].get("stage") for r in df["run"]],
                     pilot_method=[labels[r].get("objective") for r in df["run"]],
                     setting=[labels[r].get("setting") for r in df["run"]],
                     start=[labels[r].get("start") for r in df["run"]])


def pilot_frame(runs, split: str = "valid"):
    """The runs on `split` with their pilot labels (stage, pilot_method, setting, start), from
    a results root or collect's frame of one."""
    df = collect(runs) if isinstance(runs, (str, Path)) else runs
    if df.empty:
        return df.assign(stage=[])
    return _pilot_labelled(df[df["split"] == split].reset_index(drop=True))


def pilot_table(results_root: str | Path, *, metrics: Sequence[str] = ("rouge_l", "nll")):
    """Stage 1 (and any pilot run with a setting), on its split: per start × method ×
    setting, the mean ± sd over seeds of each metric, the starting student's and the teacher's
    value, and the gain over the start in units of the seed sd."""
    import pandas as pd

    df = collect(results_root)
    if df.empty:
        return pd.DataFrame()
    df = _pilot_labelled(df)
    pilot = df[df["group"] == "pilot"]
    teacher = df[df["method"] == "pilot_teacher"]   # evaluated as a ready-made model (group "pair")
    rows = []
    for (start, method, setting), g in pilot[pilot["setting"].notna()].groupby(
            ["start", "pilot_method", "setting"], sort=False):
        row = {"start": start, "method": label(method), "setting": setting, "seeds": g["run"].nunique()}
        base = df[df["method"] == f"pilot_start_{start}"]
        for m in metrics:
            mean, sd, _ = mean_sd(g[m])
            row[m] = fmt_mean_sd(mean, sd, _digits(m, 1))
            row[f"{m} start"] = float(base[m].mean()) if not base.empty else float("nan")
            row[f"{m} teacher"] = float(teacher[m].mean()) if not teacher.empty else float("nan")
            gain = mean - row[f"{m} start"]
            row[f"{m} gain/sd"] = gain / sd if sd and not math.isnan(sd) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _value(df, method: str, column: str) -> np.ndarray:
    return df.loc[df["method"] == method, column].to_numpy(float)


def pilot_noise(df, *, readouts: Sequence[str] = tuple(PILOT_READOUTS)):
    """Stage 2's noise per readout × method of ``pilot.variance`` (`pilot_frame`): mean and
    seed sd over training seeds, the move from the start (mean − start), |move| / seed sd,
    and the rerun's move (``pilot.rerun``: the same seed under one changed setting) beside
    the seed sd. Response length (mean new tokens, share ended by EOS, share empty) follows
    the greedy readout."""
    import pandas as pd

    var = df[df["stage"] == "variance"]
    rerun = df[df["stage"] == "rerun"]
    rows = []
    for name in readouts:
        column = PILOT_READOUTS[name][2]
        start = _value(df, PILOT_START, column)
        for objective, g in var.groupby("pilot_method", sort=False):
            vals = g[column].to_numpy(float)
            mean, sd = float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
            move = mean - float(start.mean()) if start.size else float("nan")
            again = rerun[rerun["pilot_method"] == objective]
            first = g[g["seed"].isin(again["seed"])]
            re = (float(again[column].mean() - first[column].mean())
                  if not again.empty and not first.empty else float("nan"))
            row = {"readout": name, "method": label(objective), "seeds": len(vals),
                   "mean": mean, "seed sd": sd, "move from start": move,
                   "|move| / sd": abs(move) / sd if sd else float("nan"), "rerun Δ": re}
            if name == "greedy ROUGE-L":
                row |= {"new tokens": float(g["response_tokens"].mean()),
                        "ended %": 100 * float(g["ended_rate"].mean()),
                        "empty %": 100 * float(g["empty_rate"].mean())}
            rows.append(row)
    return pd.DataFrame(rows)


def pilot_design(df, comparisons: Sequence[Sequence[str]], *, m: int, alpha: float = 0.05,
                 seeds: Sequence[int] = (3, 4, 5, 6, 8), readouts: Sequence[str] = tuple(PILOT_READOUTS),
                 split: str = "valid", power: float = 0.8):
    """For each readout × declared comparison (a, b) of the ``pilot.variance`` methods: Δ on
    `split`, the variance components of the paired difference (seed_sd, prompt_sd), the sd of
    one seed's mean difference, and the MDD at each number of `seeds` per method at the
    Bonferroni level α/m (80 % power), in the readout's units and as a share of SFT's move
    from the start ("mdd/SFT move": the smallest difference found, against what SFT did).
    A comparison with fewer than two shared seeds has no row (no seed component to measure)."""
    import pandas as pd

    var = df[df["stage"] == "variance"]
    name_of = dict(zip(var["pilot_method"], var["method"]))
    rows = []
    for readout in readouts:
        metric, decoding, column = PILOT_READOUTS[readout]
        ex = per_example(df, metric=metric, decoding=decoding if decoding != "teacher_forced" else "greedy")
        sft_move = abs(float(_value(var, name_of.get("sft", ""), column).mean() - _value(df, PILOT_START, column).mean())) \
            if "sft" in name_of else float("nan")
        for a, b in comparisons:
            if a not in name_of or b not in name_of:
                continue
            pdiff = paired_differences(ex, name_of[a], name_of[b], split)
            if len(pdiff["seeds"]) < 2:   # one shared seed: no seed component to measure yet
                continue
            vc = stats.variance_components(pdiff["d"])
            row = {"readout": readout, "comparison": f"{label(a)} − {label(b)}",
                   "seeds": len(pdiff["seeds"]), "Δ": float(pdiff["d"].mean()),
                   "seed sd": vc["seed_sd"], "prompt sd": vc["prompt_sd"],
                   "sd of a seed's Δ": stats.seed_sd_of_mean(vc["seed_sd"], vc["prompt_sd"], vc["n_prompts"])}
            for s in seeds:
                mdd = stats.mdd_for_seeds(s, vc["seed_sd"], vc["prompt_sd"], vc["n_prompts"],
                                          alpha=alpha, m=m, power=power)
                row[f"mdd S={s}"] = mdd
                row[f"mdd/SFT move S={s}"] = mdd / sft_move if sft_move else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def pilot_lrs(df, *, readouts: Sequence[str] = tuple(PILOT_READOUTS)):
    """``pilot.lr_grid``: each objective alone at each rate on the pilot's split, every
    readout and the response length, with the start's values as the first row."""
    import pandas as pd

    grid = df[df["stage"] == "lr_grid"]
    rows = []
    start = df[df["method"] == PILOT_START]
    for who, g in [("start", start)] + [(o, x) for o, x in grid.groupby("pilot_method", sort=False)]:
        for lr, h in (g.groupby("lr", sort=True) if who != "start" else [(float("nan"), g)]):
            row = {"objective": "start" if who == "start" else label(who),
                   "lr": "–" if who == "start" else f"{lr:g}"}
            for name in readouts:
                row[name] = float(h[PILOT_READOUTS[name][2]].mean())
            row |= {"new tokens": float(h["response_tokens"].mean()),
                    "ended %": 100 * float(h["ended_rate"].mean()), "empty %": 100 * float(h["empty_rate"].mean())}
            rows.append(row)
    return pd.DataFrame(rows)


def pilot_chosen_rates(df, readout: str) -> dict:
    """{objective: the rate of ``pilot.lr_grid`` with the best `readout` on the pilot's split}."""
    column = PILOT_READOUTS[readout][2]
    grid = df[df["stage"] == "lr_grid"]
    out = {}
    for objective, g in grid.groupby("pilot_method", sort=False):
        means = g.groupby("lr")[column].mean()
        out[objective] = float(means.idxmin() if column in LOWER_IS_BETTER else means.idxmax())
    return out


def pilot_rates(df, lr_grid: dict, arms: dict):
    """``pilot.lr_grid``'s choice beside what its arm trains at: for each method of the arm,
    its objective, the grid's rate with the best ``choose_on`` readout on the pilot's split
    (a method shares its objective's rate: β 1 DPKD-token's, Algorithm 1 DPKD-seq's), and the
    ``train.lr`` its overrides (else the arm's common) give the final run."""
    import pandas as pd

    readout = lr_grid["choose_on"]
    chosen = pilot_chosen_rates(df, readout)
    arm = arms[lr_grid["arm"]]
    rows = []
    for method, spec in arm["methods"].items():
        spec = spec or {}
        objective = spec.get("objective", method)
        trains_at = (spec.get("overrides") or {}).get("train.lr", (arm.get("common") or {}).get("train.lr"))
        pick = chosen.get(objective)
        rows.append({"method": spec.get("label", label(method)), "objective": label(objective),
                     f"best on valid ({readout})": "not in the grid" if pick is None else f"{pick:g}",
                     "the final run trains at": "base params" if trains_at is None else f"{float(trains_at):g}",
                     "as chosen": None if pick is None else bool(trains_at is not None and float(trains_at) == pick)})
    return pd.DataFrame(rows)


def step_seconds(run_dir: str | Path) -> float:
    """A run's median time per optimiser step (metrics.jsonl ``time_s``), the first step left
    out (it warms up kernels and caches); NaN when nothing was logged."""
    m = read_metrics(run_dir)
    if "time_s" not in m or m.empty:
        return float("nan")
    times = m["time_s"].to_numpy(float)
    return float(np.median(times[1:] if len(times) > 1 else times))


def memory_table(df):
    """Notebook 02: for each run that was measured (`runs.run_grid(measure=True)`:
    data/<run>/memory.json), per phase the planner's bytes for the shapes it trained on (kept
    in the record, `gpu_check.planned_bytes`) beside the measured peak (GiB; CPU: the process's
    RSS, which also holds the interpreter and libraries, given as "before training"), their
    ratio, and the phase's time."""
    import pandas as pd
    from ..config import from_dict
    from ..gpu.gpu_check import planned_against_measured, planned_bytes
    from .rundata import MEMORY_FILE

    gib = 2 ** 30
    rows = []
    for run, folder in dict(zip(df["run"], df["run_dir"])).items():
        path = Path(folder) / MEMORY_FILE
        if not path.exists():
            continue
        measured = json.loads(path.read_text())
        # the plan the run kept (runs.run_grid); a record without one is planned from its params,
        # which needs its models' folders (a live run folder, not a committed record)
        planned = measured.get("planned_bytes") or planned_bytes(
            from_dict(yaml.safe_load((Path(folder) / "params.yaml").read_text())), measured)
        rows.append({"run": run, "phase": "before training", "planned GiB": float("nan"),
                     "measured GiB": measured["baseline_bytes"] / gib, "measured / planned": float("nan"),
                     "time s": float("nan")})
        for phase, p in planned_against_measured(measured, planned).items():
            want = p["predicted_bytes"]
            rows.append({"run": run, "phase": phase, "planned GiB": want / gib if want else float("nan"),
                         "measured GiB": p["peak_bytes"] / gib,
                         "measured / planned": p["peak_bytes"] / want if want else float("nan"),
                         "time s": p["time_s"]})
    return pd.DataFrame(rows)


def reference_runs_of(df) -> dict:
    """{run: the run it is set against} from the runs' labels (``reference_run``)."""
    return {run: labels["reference_run"] for run, labels in run_labels(df).items() if labels.get("reference_run")}


def step_time_table(df, pairs: dict):
    """Seconds per optimiser step (`step_seconds`) of each run beside the run it is set
    against: ``pairs`` = {run: reference run} (notebook 02: each LoRA + 4-bit run against
    notebook 01's full-precision run of the same method and seed)."""
    import pandas as pd

    where = dict(zip(df["run"], df["run_dir"]))
    rows = []
    for run, ref in pairs.items():
        if run not in where:
            continue
        mine = step_seconds(where[run])
        theirs = step_seconds(where[ref]) if ref in where else float("nan")
        rows.append({"run": run, "s / step": mine, "against": ref, "its s / step": theirs,
                     "ratio": mine / theirs if theirs else float("nan")})
    return pd.DataFrame(rows)


def run_means(df, column: str):
    """The mean of a logged column (metrics.jsonl) over each run's steps, by run."""
    out = {}
    for _, r in df.drop_duplicates("run").iterrows():
        m = read_metrics(r["run_dir"])
        out[r["run"]] = float(m[column].mean()) if column in m else float("nan")
    return out


def ablation_table(df, reference_runs: dict, *, splits: Sequence[str] = ("test", "heldout"),
                   metrics: Sequence[str] = ("rouge_l", "exact_match", "nll")):
    """Each ablation beside the runs it changes one thing of (its reference method's runs of
    notebook 01 on the ablation's seeds; ``reference_runs`` names seed 1's, for an ablation
    made before runs were labelled), mean ± sd over seeds, with the effective gradient weight
    of its preference term (`grad_weight`: the mean over training and seeds of |dℓ/d log
    q(chosen)|, objectives.chosen_grad_weight)."""
    import pandas as pd

    abl = df[df["group"] == "ablation"]
    labels = run_labels(abl)
    abl = abl.assign(_order=[labels[r].get("order", 99) for r in abl["run"]]).sort_values("_order", kind="stable")
    wanted = {labels[r].get("reference_run") for r in abl["run"]} - {None} or set(reference_runs.values())
    ref = df[df["run"].isin(wanted)].copy()
    ref["label"] = [f"{label(m)} (reference)" for m in ref["method"]]
    ref["method"] = "ref_" + ref["method"]
    both = pd.concat([ref, abl], ignore_index=True)
    order = list(dict.fromkeys(ref["method"])) + list(dict.fromkeys(abl["method"]))
    table = main_table(both, methods=order, splits=splits, metrics=metrics, label_col="label")
    weights = run_means(both, "grad_weight")
    table["grad weight"] = [float(np.nanmean([weights.get(r, float("nan")) for r in set(both.loc[both["method"] == m, "run"])]))
                            for m in order if m in set(both["method"])]
    return table


def ablation_seed_sd(df, bases: Sequence[str], metrics: Sequence[str], pilot_root=None) -> dict:
    """{(base method, metric): (seed sd, where it was measured)}: how far a training seed alone
    moves each reference method's readout, the yardstick of a one-seed ablation. From the
    reference method's own runs when it has two seeds or more (mean of the splits' sd), else
    from the pilot's stage 2 (`pilot_noise`, on valid) when ``pilot_root`` holds one."""
    import pandas as pd

    out = {}
    own = aggregate(df[df["method"].isin(list(bases))], by=("method", "split"), metrics=metrics)
    noise = None
    readout = {metric: next((n for n, (m, how, _) in PILOT_READOUTS.items() if m == metric and how != "sample"), None)
               for metric in metrics}   # the pilot's name of each metric's (non-sampled) readout
    for base in bases:
        for metric in metrics:
            mine = own[(own["method"] == base) & (own["n_seeds"] >= 2)] if len(own) else own
            if len(mine):
                out[(base, metric)] = (float(mine[f"{metric}_sd"].mean()), f"{int(mine['n_seeds'].min())} seeds")
                continue
            if noise is None:
                pf = pilot_frame(pilot_root) if pilot_root and Path(pilot_root, "data").exists() else None
                noise = pilot_noise(pf) if pf is not None and (pf["stage"] == "variance").any() else pd.DataFrame()
            row = noise[(noise["readout"] == readout[metric]) & (noise["method"] == label(base))] if len(noise) else noise
            if len(row) and not math.isnan(float(row["seed sd"].iloc[0])):
                out[(base, metric)] = (float(row["seed sd"].iloc[0]), f"the pilot, {int(row['seeds'].iloc[0])} seeds on valid")
    return out


def ablation_words(comparisons: Sequence[dict], table, seed_sd: dict) -> str:
    """Notebook 03's reading, generated from its tables: per ablation, its difference from its
    reference on each declared readout and split, its preference term's gradient weight beside
    the reference's, and, where it ran one seed (not compared), the difference in units of the
    reference method's seed sd (`ablation_seed_sd`): a move under 2 sd is within what a seed
    alone moves."""
    if not comparisons:
        return ""
    weights = dict(zip(table["method"], table["grad weight"])) if "grad weight" in table else {}
    by_ablation: dict[str, list[dict]] = {}
    for r in comparisons:
        by_ablation.setdefault(r["a"], []).append(r)
    order = {name: i for i, name in enumerate(table["method"])} if "method" in table else {}
    lines, far = [], []
    for a, rows in sorted(by_ablation.items(),   # the table's row order (the params')
                          key=lambda item: order.get(item[1][0].get("a_label"), len(order))):
        name, base = rows[0].get("a_label") or label(a), rows[0]["b"]
        parts, big = [], []
        for metric in dict.fromkeys(r["metric"] for r in rows):
            k, readout = _digits(metric), METRIC_LABELS.get(metric, metric)
            got = [r for r in rows if r["metric"] == metric]
            text = f"{readout} " + ", ".join(f"{r['delta']:+.{k}f} ({r['split']})" for r in got)
            sd = seed_sd.get((base, metric))
            if sd and all(r["verdict"] == "not compared (one seed)" for r in got):
                units = [abs(r["delta"]) / sd[0] for r in got]
                text += f" = {min(units):.1f}–{max(units):.1f} seed sd"
                if min(units) >= 2:
                    big.append(readout)
            elif any(r["verdict"] in ("better", "worse") for r in got):
                big.append(readout)
            parts.append(text)
        w, w0 = weights.get(name, float("nan")), weights.get(f"{label(base)} (reference)", float("nan"))
        weight = (f"; gradient weight {w:.2f} against the reference's {w0:.2f}"
                  if not (math.isnan(w) or math.isnan(w0)) else "")
        lines.append(f"**{name}** against {label(base)}: {'; '.join(parts)}{weight}.")
        if big:
            far.append(f"{name} ({', '.join(big)})")
    sds = sorted({(label(b), METRIC_LABELS.get(m, m), v, where) for (b, m), (v, where) in seed_sd.items()})
    if sds:
        lines.append("Seed sd used as the yardstick: " + "; ".join(f"{b} {m} {v:.3f} ({where})" for b, m, v, where in sds) + ".")
    lines.append(("Moved by 2 seed sd or more on every split (one seed: a lead for a seeded rerun, not a finding): "
                  + "; ".join(far) + ".") if far else
                 "No ablation moved a declared readout by 2 seed sd or more on every split.")
    return "\n".join(f"- {line}" for line in lines)


def ablation_comparisons(df, splits: Sequence[str], *, metric: str = "rouge_l", alpha: float = 0.05,
                         decoding: str = "greedy") -> list[dict]:
    """Each ablation against its reference method (the run of notebook 01 it changes one thing
    of) on the seeds both ran, as `compare` does it: t over the paired seeds, Holm over the
    ablations × splits, each interval at the Bonferroni level. An ablation with one common
    seed is "not compared (one seed)": its interval is prompt sampling only."""
    abl = df[df["group"] == "ablation"]
    if abl.empty:
        return []
    labels = run_labels(abl)
    pairs = list(dict.fromkeys((labels[r]["method"], labels[r]["base"]) for r in abl["run"]))
    bases = {b for _, b in pairs}
    ex = per_example(df[(df["group"] == "ablation") | df["method"].isin(bases)], metric=metric, decoding=decoding)
    names = {labels[r]["method"]: labels[r].get("label") for r in abl["run"]}
    return [dict(r, a_label=names.get(r["a"])) for r in compare(ex, pairs, splits, metric=metric, alpha=alpha)]


def declared_ablation_comparisons(df, splits: Sequence[str], primary: dict) -> list[dict]:
    """`ablation_comparisons` on each metric notebook 01 declares (``primary``), at its α and
    decoding: a Holm family per metric (what notebook 03 shows, tables/ablation_comparisons)."""
    return [r for metric in as_list(primary["metric"]) for r in ablation_comparisons(
        df, splits, metric=metric, alpha=primary["alpha"], decoding=primary.get("decoding", "greedy"))]


def main_figure(df, methods: Sequence[str], splits: Sequence[str], metric: str = "rouge_l", *,
                moved: Sequence[dict] | None = None):
    """Each method's change from the starting student on each split, with its 95 % interval
    (`gap_closed`: pass ``moved`` to reuse the answer's numbers): the differences the study
    is about on their own scale. The start is the 0 line; the teacher, far above on a
    small-compute profile, is written at the edge instead of setting the scale. Arm (a)
    methods solid, objective-alone runs (``alone_``) open."""
    import matplotlib.pyplot as plt

    if moved is None:
        ex = per_example(df[df["method"].isin(["teacher", "student_init", *methods])], metric=metric)
        labels = dict(zip(df["method"], df["label"]))
        moved = [m for split in splits for m in gap_closed(ex, methods, split, labels=labels, metric=metric)]
    moved = [m for m in moved if m["split"] in splits]
    families = dict(zip(df["method"], df["objective"])) if "objective" in df else {}
    metrics = list(dict.fromkeys(m.get("metric", metric) for m in moved)) or [metric]   # one row of panels each
    fig, axes = plt.subplots(len(metrics), len(splits), figsize=(4.4 * len(splits) + 1.6,
                                                                 (0.42 * len(methods) + 1.6) * len(metrics)),
                             squeeze=False, sharey=True)
    for row, met in enumerate(metrics):
        name, k = METRIC_LABELS.get(met, met), _digits(met)
        for ax, split in zip(axes[row], splits):
            sel = [m for m in moved if m["split"] == split and m.get("metric", metric) == met]
            if not sel:
                ax.set_title(f"{split}: no runs")
                continue
            lo = min(m["moved_ci"][0] for m in sel)
            hi = max(m["moved_ci"][1] for m in sel)
            for i, m in enumerate(sel):
                colour = method_colour(m["method"], families.get(m["method"]))
                alone = str(m["method"]).startswith("alone_")
                ax.errorbar(m["moved"], i, xerr=[[m["moved"] - m["moved_ci"][0]], [m["moved_ci"][1] - m["moved"]]],
                            fmt="o", color=colour, mfc="white" if alone else colour, capsize=3, ms=6)
            ax.axvline(0, color="black", lw=0.8)
            gap = sel[0]["gap"]
            span = max(hi, 0) - min(lo, 0)
            if gap is not None and not math.isnan(gap) and min(lo, 0) - 0.1 * span <= gap <= max(hi, 0) + 0.6 * span:
                ax.axvline(gap, color="gray", ls="--", lw=1)
                ax.annotate(f"teacher {gap:+.{k}f}", (gap, 1.0), xycoords=("data", "axes fraction"), ha="center",
                            va="bottom", fontsize=7, color="gray")
            elif gap is not None and not math.isnan(gap):
                ax.annotate(f"teacher: {gap:+.{k}f} {'→' if gap > 0 else '←'}\n(off this scale)",
                            (0.98 if gap > 0 else 0.02, 0.02), xycoords="axes fraction",
                            ha="right" if gap > 0 else "left", va="bottom", fontsize=7, color="gray")
            ax.set_yticks(range(len(sel)), [m["label"] for m in sel])
            arms = [str(m["method"]).startswith("alone_") for m in sel]
            if any(arms) and not all(arms):   # arm (a) above, the objective-alone arm (b) below
                cut = arms.index(True) - 0.5
                ax.axhline(cut, color="gray", lw=0.6)
                ax.annotate("objective alone ↓", (0.99, cut), xycoords=("axes fraction", "data"), ha="right",
                            va="top", fontsize=7, color="gray", xytext=(0, -2), textcoords="offset points")
            ax.set_xlabel(f"change in {name} from the start" + (" (lower is better)" if met in LOWER_IS_BETTER else ""))
            ax.set_title(split if len(metrics) == 1 else f"{split}: {name}")
            ax.grid(axis="y", visible=False)
    axes[0][0].invert_yaxis()   # shared: once, the first method on top
    fig.suptitle(f"How far each method moved the starting student (95 % intervals; 0 = the start)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))   # the teacher's label clear of the title
    return fig


def difference_figure(comparisons: Sequence[dict]):
    """The declared comparisons, a panel per readout (each on its own scale: nats of NLL and of
    KL are not one axis): each difference a − b with its interval at the level its family needs
    (Bonferroni, 1 − α/m), coloured by its Holm verdict, the value written beside it; where the
    statistics give a minimum detectable difference (``mdd``), its ±mdd is marked as grey ticks."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    def has_mdd(r: dict) -> bool:
        mdd = r.get("mdd")
        return mdd is not None and not (isinstance(mdd, float) and math.isnan(mdd))

    groups: dict[str, list[dict]] = {}
    for r in comparisons:
        groups.setdefault(r["metric"], []).append(r)
    sizes = [len(rows) for rows in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, squeeze=False, gridspec_kw={"height_ratios": sizes},
                             figsize=(7.2, 0.42 * len(comparisons) + 1.1 * len(groups) + 0.6))
    verdicts = {"better": "#55A868", "worse": "#C44E52", "no difference shown": "#555555",
                "not compared (one seed)": "#BBBBBB"}
    for ax, (metric, rows) in zip(axes[:, 0], groups.items()):
        k = _digits(metric)
        for i, r in enumerate(rows):
            ax.errorbar(r["delta"], i, xerr=[[r["delta"] - r["ci_lo"]], [r["ci_hi"] - r["delta"]]], fmt="o",
                        color=verdicts.get(r["verdict"], "#555555"), capsize=3, ms=5)
            if has_mdd(r):
                ax.plot([-r["mdd"], r["mdd"]], [i, i], "|", color="gray", ms=10, mew=1.5)
            ax.annotate(f"{r['delta']:+.{k}f} [{r['ci_lo']:+.{k}f}, {r['ci_hi']:+.{k}f}]  {100 * r['ci_level']:.1f} %",
                        (1.01, i), xycoords=("axes fraction", "data"), va="center", fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(rows)), [f"{label(r['a'])} − {label(r['b'])}  ({r['split']})" for r in rows])
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlabel(f"difference in {METRIC_LABELS.get(metric, metric)} (a − b)", fontsize=9)
        ax.grid(axis="y", visible=False)
    handles = [Line2D([], [], color=c, marker="o", ls="", label=v) for v, c in verdicts.items()
               if any(r["verdict"] == v for r in comparisons)]
    if any(has_mdd(r) for r in comparisons):   # one-seed rows have none (NaN): no legend entry for it
        handles.append(Line2D([], [], color="gray", marker="|", ls="", ms=10, label="± minimum detectable"))
    axes[0, 0].set_title("The declared comparisons, each interval at its Bonferroni level")
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles))
    return fig


def buckets_figure(df, methods: Sequence[str], splits: Sequence[str]):
    """Greedy ROUGE-L and EM by reference-length bucket, per method (`buckets`, mean ± sd over
    seeds). The scale is the methods' own: the teacher is a black tick per bucket, written
    at the top where it is off the scale; the legend sits below the panels."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(splits), figsize=(5.6 * len(splits), 6.2), squeeze=False)
    families = dict(zip(df["method"], df["objective"])) if "objective" in df else {}
    handles = {}
    for col, split in enumerate(splits):
        bt = buckets(df, split=split, methods=methods)
        if bt.empty:
            continue
        names = list(dict.fromkeys(bt["bucket"]))
        here = [m for m in dict.fromkeys(bt["method"]) if m != "teacher"]
        width = 0.8 / max(1, len(here))
        counts = bt.groupby("bucket")["n_examples"].max()
        for row, metric in enumerate(("rouge_l", "exact_match")):
            ax = axes[row][col]
            for i, m in enumerate(here):
                sub = bt[bt["method"] == m].set_index("bucket").reindex(names)
                bars = ax.bar([j + i * width for j in range(len(names))], sub[metric], width,
                              yerr=sub[f"{metric}_sd"].fillna(0), capsize=2, label=label(m),
                              color=method_colour(m, families.get(m)), error_kw={"lw": 0.8})
                handles.setdefault(label(m), bars)
            top = max(1.0, float(np.nanmax((bt[bt["method"] != "teacher"][metric]
                                            + bt[bt["method"] != "teacher"][f"{metric}_sd"].fillna(0)).to_numpy())))
            ax.set_ylim(0, top * 1.3)
            teacher = bt[bt["method"] == "teacher"].set_index("bucket").reindex(names)[metric]
            for j, v in enumerate(teacher):
                if np.isnan(v):
                    continue
                x0, x1 = j - width / 2, j - width / 2 + 0.8
                if v <= top * 1.25:
                    ax.plot([x0, x1], [v, v], color="black", lw=1.5)
                else:
                    ax.annotate(f"teacher {v:.0f} ↑", ((x0 + x1) / 2, top * 1.27), ha="center", va="top",
                                fontsize=7)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], [f"{b}\nn={counts[b]}" for b in names])
            ax.set_xlabel("reference length (tokens)")
            ax.set_ylabel(f"{METRIC_LABELS[metric]} (greedy, ×100)")
            ax.set_title(f"{split}: {METRIC_LABELS[metric]} by reference length")
            ax.grid(axis="x", visible=False)
    from matplotlib.lines import Line2D
    items = list(handles.items()) + [("teacher", Line2D([], [], color="black", lw=1.5))]
    fig.legend([h for _, h in items], [n for n, _ in items], loc="lower center", ncol=min(6, len(items)),
               bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


# ----------------------------------------------------------------------------- outputs

def to_markdown(df, floatfmt: str = ".2f") -> str:
    """A GitHub Markdown table (no `tabulate` dependency)."""
    cols = [str(c) for c in df.columns]

    def cell(v):
        if isinstance(v, float):
            return "–" if math.isnan(v) else format(v, floatfmt)
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row.tolist()) + " |" for _, row in df.iterrows()]
    return "\n".join(lines) + "\n"


def write_table(df, path_stem: str | Path, floatfmt: str = ".2f") -> tuple[Path, Path]:
    """Write `df` as <stem>.csv and <stem>.md (atomically); returns both paths."""
    stem = Path(path_stem)
    csv, md = stem.with_suffix(".csv"), stem.with_suffix(".md")
    atomic_write_text(csv, df.to_csv(index=False))
    atomic_write_text(md, to_markdown(df, floatfmt))
    return csv, md


def savefig(fig, results_root: str | Path, name: str, dpi: int = 120) -> Path:
    """Save a figure as <results_root>/figures/<name>.png (temp file + rename)."""
    import io as _io
    buffer = _io.BytesIO()
    fig.savefig(buffer, dpi=dpi, bbox_inches="tight", format="png")
    path = Path(results_root) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.png.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return path


def write_text(text: str, path: str | Path) -> Path:
    """Write a text file atomically; returns its path."""
    atomic_write_text(path, text.rstrip("\n") + "\n")
    return Path(path)


def tables_dir(results_root: str | Path) -> Path:
    path = Path(results_root) / "tables"
    path.mkdir(parents=True, exist_ok=True)
    return path


def paper_table():
    """docs/method.md §5 as a DataFrame (rows: set; columns: methods), for the paper profile."""
    import pandas as pd
    return pd.DataFrame([{"student ← teacher": k[0], "set": k[1], **{label(m): v for m, v in vals.items()}}
                         for k, vals in PAPER_NUMBERS.items()])


# ----------------------------------------------------------------------------- rebuild

TRAINING_COLUMNS = ("loss", "ce", "distill", "pt_ce", "pt_kd", "student_nll_ref", "reward_margin",
                    "reward_accuracy", "grad_weight", "grad_norm")


def training_table(df, *, window: int = 5, columns: Sequence[str] = TRAINING_COLUMNS):
    """Where each run's training log started and ended: per run and logged column, the mean
    of its first and of its last `window` logged values (``<col> first`` / ``<col> last``),
    beside the run's steps; a column a run did not log is left out (NaN)."""
    import pandas as pd

    rows = []
    for _, r in df.drop_duplicates("run").iterrows():
        m = read_metrics(r["run_dir"])
        if m.empty:
            continue
        row = {"run": r["run"], "method": r["label"], "seed": _plain_seed(r["seed"]),
               "logged steps": int(m["step"].max()) if "step" in m else len(m)}
        for col in columns:
            vals = m[col].dropna().astype(float) if col in m else pd.Series(dtype=float)
            row[f"{col} first"] = float(vals.head(window).mean()) if len(vals) else float("nan")
            row[f"{col} last"] = float(vals.tail(window).mean()) if len(vals) else float("nan")
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.dropna(axis=1, how="all") if not out.empty else out

#: the training-curve panels of notebook 01 (both arms) and of notebook 03's monitors (`curves`)
MAIN_CURVES = ("nll_ref", "kd_term", "dpkd_token_term", "dpkd_seq_term", "token_margin", "seq_margin")
MONITOR_CURVES = ("token_margin", "seq_margin", "nll_ref", "grad_weight", "argmax_disagree")

#: the notebooks whose params declare the study's design (read by `study_design`)
DESIGN_NOTEBOOKS = {"main": "01_gpt2_120m", "ablations": "03_ablations_implicit_reward", "figures": "04_figures"}
DESIGN_FILE = "design.json"


def study_design(profile: str, params_dir: str | Path = "params") -> dict:
    """What `write_results` needs from a profile's params: notebook 01's primary (the declared
    comparisons), arms and pilot.lr_grid (the rate each objective alone trains at), notebook
    03's reference runs (None when the profile skips 03), notebook 04's paper_column."""
    from .driver import load_params
    main = load_params(Path(params_dir), profile, DESIGN_NOTEBOOKS["main"])
    abl = load_params(Path(params_dir), profile, DESIGN_NOTEBOOKS["ablations"])
    fig = load_params(Path(params_dir), profile, DESIGN_NOTEBOOKS["figures"])
    return {"profile": profile, "primary": main["primary"], "arms": main["arms"],
            "lr_grid": (main.get("pilot") or {}).get("lr_grid"),
            "reference_runs": None if "skip" in abl else abl.get("reference_runs"),
            "pilot_root": (main.get("pilot") or {}).get("results_root"),   # the yardstick of one-seed ablations
            "paper_column": bool(fig.get("paper_column", False))}


def monitor_runs(df):
    """The runs notebook 03 watches for reward hacking: the ablations and the DPKD runs of the
    released mix (arm (a))."""
    return df[(df["group"] == "ablation") | ((df["group"] == "released")
                                             & df["objective"].isin(["dpkd_token", "dpkd_seq"]))]


#: the monitors' panels: (x column, x label, y column, y label)
MONITOR_AXES = (("reward_margin", "reward margin β·Δ (last steps)", "student_nll_ref", "NLL of the data (nats per token)"),
                ("grad_weight", "gradient weight |∂ℓ/∂ log q(chosen)|", "rouge_l", "test ROUGE-L (greedy)"),
                ("response_tokens", "greedy response length (tokens)", "repetition_rate", "repeated 4-grams (share)"))


def monitors_figure(mon):
    """Reward-hacking monitors (`final_monitors`), one labelled point per run: the margin
    against the NLL of the data (a margin that grows while that NLL rises is reward hacking),
    the gradient weight against ROUGE-L, response length against repetition."""
    import matplotlib.pyplot as plt

    mon = mon.copy()
    twice = mon["label"].duplicated(keep=False)   # several seeds of one method: name the run
    mon["label"] = mon["label"].where(~twice, mon["label"] + " · " + mon["run"])
    with style():
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        for ax, (xk, xl, yk, yl) in zip(axes, MONITOR_AXES):
            for _, r in mon.iterrows():
                ax.scatter(r[xk], r[yk], s=25)
                ax.annotate(str(r["label"])[:22], (r[xk], r[yk]), fontsize=6)
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
        fig.suptitle("Reward-hacking monitors, one point per run")
        fig.tight_layout()
    return fig


def _require_data(root: Path) -> None:
    if not exported_runs(root):
        raise ValueError(f"no exported runs under {root / 'data'}: run the study first "
                         f"(python -m dpkd_lib.study), or export older runs with "
                         f"python -m dpkd_lib.study.report export {root}")


def write_results(results_root: str | Path, design: dict) -> dict:
    """Every table, figure and the answer of ``results_root`` from its exported runs (data/)
    alone: what notebooks 03 and 04 write. ``design``: `study_design` of the profile (it is
    recorded as data/design.json, so a later rebuild needs nothing else). Returns
    {"paths": written files, "tables": {name: DataFrame}, "figures": {name: Figure},
    "comparisons", "moved", "answer"}; a results root with no exported run is a ValueError."""
    from ..io import dumps

    root = Path(results_root)
    _require_data(root)
    df = collect(root)
    # keys in the params' order (not sorted): the arms' order is the tables' row order
    atomic_write_text(root / "data" / DESIGN_FILE, dumps(design, indent=2, ensure_ascii=False) + "\n")
    primary, arms = design["primary"], design["arms"]
    tables_path, out = tables_dir(root), {"paths": [root / "data" / DESIGN_FILE], "tables": {}, "figures": {}}
    splits = [s for s in primary["splits"] if s in set(df["split"])]

    def table(name, frame, floatfmt=".2f"):
        out["tables"][name] = frame
        out["paths"].extend(write_table(frame, tables_path / name, floatfmt=floatfmt))

    def figure(name, fig):
        out["figures"][name] = fig
        out["paths"].append(savefig(fig, root, name))

    pilot = pilot_frame(df)   # notebook 01 §2, on the valid split
    if (pilot["stage"] == "variance").any():
        table("pilot_noise", pilot_noise(pilot), ".3f")
        table("pilot_design", pilot_design(pilot, primary["comparisons"], m=family_size(primary),
                                           alpha=primary["alpha"]), ".3f")
    if (pilot["stage"] == "lr_grid").any():
        table("pilot_lrs", pilot_lrs(pilot), ".3f")
        if (design.get("lr_grid") or {}).get("choose_on"):
            table("pilot_rates", pilot_rates(pilot, design["lr_grid"], arms))
    if not df["group"].isin(list(arms)).any():   # a pilot's own folder (pilot.results_root): its tables only
        out.update(comparisons=[], moved=[], answer="")
        return out

    metrics = shown_metrics(primary)
    for name, arm in arms.items():
        methods = ["teacher", "student_init"] + [arm.get("prefix", "") + m for m in arm["methods"]]
        frame = main_table(df, methods=methods, splits=splits, metrics=metrics, label_col="label")
        if design.get("paper_column") and name == "released":   # docs/method.md §5 (test = DollyEval)
            paper = PAPER_NUMBERS[("gpt2-120M", "DollyEval")]
            present = [m for m in methods if m in set(df["method"])]
            frame.insert(1, "paper: DollyEval ROUGE-L", [f"{paper[m]:.1f}" if m in paper else "–" for m in present])
        table(f"main_{name}", frame)
    table("main_numeric", aggregate(df, by=("method", "split"), metrics=(
        "rouge_l", "exact_match", "nll", "token_acc", "kl", "response_tokens", "ended_rate", "empty_rate",
        "repetition_rate", "sample_rouge_l", "wall_time_s")), ".3f")

    comparisons, moved, answer = study_answer(df, arms, primary, splits)
    table("comparisons", comparisons_table(comparisons), ".3f")
    table("moved", moved_table(moved), ".3f")
    table("training", training_table(df[df["group"].isin(list(arms))]), ".3f")
    out["paths"].append(write_text(answer, tables_path / "answer.md"))
    out.update(comparisons=comparisons, moved=moved, answer=answer)
    if comparisons:
        figure("comparisons", difference_figure(comparisons))
    figure("main_moved", main_figure(df, arm_methods(arms), splits, moved=moved))   # the declared metrics

    split_df = update_split(df[df["group"].isin(list(arms))])
    if not split_df.empty:
        table("update_split", split_df, ".3f")
        figure("update_split", update_split_figure(split_df))

    if design.get("reference_runs") and not df[df["group"] == "ablation"].empty:
        abl = ablation_table(df, design["reference_runs"], splits=splits,
                             metrics=shown_metrics(primary, ("rouge_l", "response_tokens")))
        table("ablations", abl)
        abl_comparisons = declared_ablation_comparisons(df, splits, primary)
        table("ablation_comparisons", comparisons_table(abl_comparisons), ".3f")
        seed_sd = ablation_seed_sd(df, list(design["reference_runs"]), as_list(primary["metric"]),
                                   design.get("pilot_root"))
        out["paths"].append(write_text(ablation_words(abl_comparisons, abl, seed_sd), tables_path / "ablation_words.md"))
    if design.get("reference_runs"):   # notebook 03's monitors
        fam = monitor_runs(df)
        if not fam.empty:
            figure("monitors_scatter", monitors_figure(final_monitors(fam, last=10)))
            figure("monitors_curves", curves(fam, metrics=MONITOR_CURVES, ncols=3))
    lora = df[df["group"] == "lora"]
    if not lora.empty:   # notebook 02: its runs, their measured memory and time per step
        table("lora_4bit", main_table(lora, splits=splits, metrics=("rouge_l", "exact_match", "nll"),
                                      label_col="label"))
        memory, steps = memory_table(lora), step_time_table(df, reference_runs_of(lora))
        table("lora_4bit_memory", memory, ".3f")
        table("lora_4bit_step_time", steps, ".3f")
        moved_lora, full = lora_moved(df, splits)
        table("lora_4bit_moved", moved_brief(moved_lora))
        out["paths"].append(write_text(lora_words(memory, steps, moved_lora, full), tables_path / "lora_4bit_words.md"))

    released = [arms["released"].get("prefix", "") + m for m in arms["released"]["methods"]] \
        if "released" in arms else []
    for split in splits:
        table(f"buckets_{split}", buckets(df, split=split, methods=["teacher", "student_init", *released]))
    figure("buckets", buckets_figure(df, ["teacher", "student_init", *released], splits))
    figure("curves", curves(df[df["group"].isin(list(arms))], metrics=MAIN_CURVES, ncols=3))
    return out


def rebuild(results_root: str | Path, profile: str | None = None, params_dir: str | Path = "params") -> dict:
    """`write_results` from the committed files alone: the design recorded in
    data/design.json (or, with `profile`, that profile's params)."""
    root = Path(results_root)
    _require_data(root)
    recorded = root / "data" / DESIGN_FILE
    if profile is None and recorded.exists():
        design = json.loads(recorded.read_text())
    else:
        profile = profile or root.name
        design = study_design(profile, params_dir)
    return write_results(root, design)


def main(argv=None) -> int:
    """``python -m dpkd_lib.study.report rebuild RESULTS_ROOT [--profile P]`` and
    ``python -m dpkd_lib.study.report export RESULTS_ROOT`` (run folders → data/)."""
    import argparse

    from ..errors import ConfigError
    from .rundata import export_all

    parser = argparse.ArgumentParser(prog="python -m dpkd_lib.study.report",
                                     description="Rebuild a results root's tables, figures and answer.")
    sub = parser.add_subparsers(dest="command", required=True)
    rb = sub.add_parser("rebuild", help="every table, interval, figure and answer sentence from data/")
    rb.add_argument("results_root", help="e.g. results/cpu")
    rb.add_argument("--profile", default=None,
                    help="take the design from params/<profile>/ (default: data/design.json, "
                         "else the folder's name)")
    rb.add_argument("--params-dir", default="params")
    ex = sub.add_parser("export", help="copy the finished runs of runs/ into data/ (older results roots)")
    ex.add_argument("results_root")
    args = parser.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    try:
        if args.command == "export":
            done = export_all(args.results_root)
            print(f"exported {len(done)} finished run(s) to {Path(args.results_root) / 'data'}")
            return 0
        out = rebuild(args.results_root, args.profile, args.params_dir)
    except (ValueError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    finally:
        plt.close("all")
    for path in out["paths"]:
        print(path)
    return 0


# ----------------------------------------------------------------------------- figure style

#: One look for every figure of the study (`style`; the figure functions above are wrapped in it
#: at the end of this file, so a notebook's own plots can use the same context).
STYLE = {"figure.dpi": 100, "savefig.dpi": 120, "axes.spines.top": False, "axes.spines.right": False,
         "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6, "axes.titlesize": 10,
         "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8,
         "legend.frameon": False, "figure.titlesize": 11, "lines.linewidth": 1.6}
#: one colour per objective family in every figure (the objective-alone arm: same colour,
#: dashed line or open marker); the teacher and the start in greys
FAMILY_COLOURS = {"sft": "#4C72B0", "kd": "#DD8452", "rkl": "#8172B3", "jsd": "#937860", "skl": "#DA8BC3",
                  "srkl": "#8C8C8C", "seqkd": "#CCB974", "dpkd_token": "#55A868", "dpkd_seq": "#C44E52",
                  "no_distill": "#64B5CD", "teacher": "#333333", "student_init": "#AAAAAA"}
#: the update_split column that holds a term's share of the AdamW update (absent for runs
#: logged before the probe measured it)
ADAM_SHARE_COLUMNS = ("adam_share",)
#: units of the logged quantities (metrics.jsonl), for panels drawn from a raw column
QUANTITY_UNITS = {"loss": "total loss (its terms differ by method)", "ce": "nats per token",
                  "student_nll_ref": "nats per token", "distill": "objective term",
                  "reward_margin": "β·Δ", "grad_weight": "|∂ℓ/∂ log q(chosen)|",
                  "argmax_disagree": "share of positions", "reward_accuracy": "share of pairs",
                  "grad_norm": "L2 norm", "lr": "learning rate", "response_tokens": "tokens"}
_KD = ("kd", "rkl", "jsd", "skl", "srkl")
#: the training-curve panels (`curves`): one quantity, defined for some objectives
CURVE_PANELS = {
    "nll_ref": {"metric": "student_nll_ref", "title": "NLL of the dataset responses",
                "ylabel": "nats per token"},
    "kd_term": {"metric": "distill", "objectives": _KD, "title": "KD term: divergence to the teacher",
                "ylabel": "nats per token"},
    "dpkd_token_term": {"metric": "distill", "objectives": ("dpkd_token",),
                        "title": "DPKD-token term −log σ(βΔ)", "ylabel": "per position",
                        "ref": (math.log(2), "ln 2: argmaxes agree")},
    "dpkd_seq_term": {"metric": "distill", "objectives": ("dpkd_seq",),
                      "title": "DPKD-seq term −log σ(βΔ)", "ylabel": "per sequence pair",
                      "ref": (math.log(2), "ln 2: no preference")},
    "token_margin": {"metric": "reward_margin", "objectives": ("dpkd_token",),
                     "title": "DPKD-token reward margin β·Δ (≤ 0 by construction)",
                     "ylabel": "per position", "ref": (0.0, "0: argmaxes agree")},
    "seq_margin": {"metric": "reward_margin", "objectives": ("dpkd_seq",),
                   "title": "DPKD-seq reward margin β·Δ", "ylabel": "per sequence pair",
                   "ref": (0.0, "0: no preference")},
    "argmax_disagree": {"metric": "argmax_disagree", "objectives": ("dpkd_token",),
                        "title": "DPKD-token: positions whose argmaxes differ", "ylabel": "share of positions"},
    "grad_weight": {"metric": "grad_weight", "objectives": ("dpkd_token", "dpkd_seq"),
                    "title": "preference term's gradient weight", "ylabel": "|∂ℓ/∂ log q(chosen)|"},
}


@contextlib.contextmanager
def style():
    """The study's figure style as a context: ``with report.style(): fig, ax = plt.subplots()``.
    Keeps the interactive flag as the figure left it: a notebook's inline backend switches it
    on at the first figure, and rc_context would switch it off again on leaving, so that no
    later figure of the kernel is shown."""
    import matplotlib
    import matplotlib.pyplot as plt
    with plt.rc_context(STYLE):
        try:
            yield
        finally:
            interactive = matplotlib.is_interactive()
    matplotlib.interactive(interactive)


def _styled(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with style():
            return fn(*args, **kwargs)
    return wrapper


def family(method: str, objective: str | None = None) -> str:
    """The objective family a method's colour follows: its objective where known (an arm's
    ``alone_kd`` is KD), else the method name without the ``alone_`` prefix."""
    if method in ("teacher", "student_init"):
        return method
    if objective and isinstance(objective, str):
        return objective
    return str(method).removeprefix("alone_")


def method_colour(method: str, objective: str | None = None) -> str:
    return FAMILY_COLOURS.get(family(method, objective), "#17BECF")


def line_looks(runs) -> dict:
    """{method: (colour, linestyle)} for the runs of one figure: the family colour; solid for
    arm (a), dashed for the objective-alone arm, and a further style (dash-dot, dotted) for a
    second method of the same family and arm. When a family has more methods than styles
    (ablations of one objective) or is unknown, every method gets its own colour from
    tab10/tab20 instead, solid."""
    import matplotlib.pyplot as plt

    order = list(dict.fromkeys(runs["method"]))
    objectives = dict(zip(runs["method"], runs["objective"])) if "objective" in runs else {}
    groups = dict(zip(runs["method"], runs["group"])) if "group" in runs else {}
    styles = {False: ["-", "-."], True: ["--", ":"]}
    looks, used = {}, {}
    for m in order:
        fam = family(m, objectives.get(m))
        alone = groups.get(m) == "alone" or str(m).startswith("alone_")
        k = used.get((fam, alone), 0)
        used[(fam, alone)] = k + 1
        if fam not in FAMILY_COLOURS or k >= len(styles[alone]):
            break
        looks[m] = (FAMILY_COLOURS[fam], styles[alone][k])
    else:
        return looks
    cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    return {m: (cmap(i % cmap.N), "-") for i, m in enumerate(order)}


def _panel_runs(runs, panel: dict):
    wanted = panel.get("objectives")
    if wanted is None or "objective" not in runs:
        return runs
    return runs[runs["objective"].isin(wanted)]


def textwrap_label(text: str, width: int) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


def arm_table(df, arm: dict, splits: Sequence[str], metrics: Sequence[str] = ("rouge_l", "nll", "repetition_rate")):
    """One arm's compact table for the notebooks: teacher, start and the arm's methods, mean ±
    sd over seeds on each split (`main_table`)."""
    methods = ["teacher", "student_init"] + [arm.get("prefix", "") + m for m in arm["methods"]]
    return main_table(df, methods=methods, splits=splits, metrics=metrics, label_col="label")


def split_table(split_df):
    """`update_split` as one compact row per method: each term's share of the raw gradient
    in %, (and of the AdamW update where logged), the number of probes."""
    import pandas as pd

    if split_df.empty:
        return pd.DataFrame()
    adam = next((c for c in ADAM_SHARE_COLUMNS if c in split_df and split_df[c].notna().any()), None)
    rows = []
    for method, g in split_df.groupby("method", sort=False):
        row = {"method": g["label"].iloc[0]}
        for term, name in TERM_LABELS.items():
            t = g[g["term"] == term]
            row[f"{name}: % of gradient"] = "–" if t.empty else f"{100 * float(t['share'].iloc[0]):.0f}"
            if adam:
                row[f"{name}: % of AdamW update"] = "–" if t.empty else f"{100 * float(t[adam].iloc[0]):.0f}"
        row["runs × probes"] = f"{int(g['n_runs'].max())} × {int(g['n_probes'].max()) // max(1, int(g['n_runs'].max()))}"
        rows.append(row)
    return pd.DataFrame(rows)



# ----------------------------------------------------------------------------- notebook text

def comparisons_brief(comparisons: Sequence[dict], *, wide: bool = False):
    """The declared comparisons as a compact table for a notebook: a − b, split, Δ with its
    interval, the interval's (Bonferroni) level, Holm p, verdict, seeds; the minimum detectable
    difference where the statistics give one (``mdd``). ``wide``: one row per comparison and
    split, each metric's Δ [interval] and verdict side by side (many comparisons on several
    metrics: notebook 03; tables/ has the long form)."""
    import pandas as pd

    def num(x, digits):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"

    rows = []
    for r in comparisons:
        digits = _digits(r["metric"])
        row = {"comparison": f"{r.get('a_label') or label(r['a'])} − {label(r['b'])}", "split": r["split"],
               "metric": METRIC_LABELS.get(r["metric"], r["metric"]), "Δ [interval]": _ci(r, digits),
               "level": f"{100 * r['ci_level']:.1f} %", "Holm p": num(r["p_holm"], 3), "verdict": r["verdict"]}
        if r.get("mdd") is not None:
            row["detectable ±"] = num(r["mdd"], digits)
        if r.get("planned_mdd") is not None:
            row["planned ±"] = num(r["planned_mdd"], digits)
        if "n_seeds_a" in r:
            row["seeds"] = f"{r['n_seeds_a']}/{r['n_seeds_b']}"
        rows.append(row)
    long = pd.DataFrame(rows)
    if not wide or long.empty:
        return long
    out = {}
    for row in rows:
        one = out.setdefault((row["comparison"], row["split"]), {"comparison": row["comparison"], "split": row["split"]})
        one[f"{row['metric']}: Δ [interval]"] = row["Δ [interval]"]
        one[f"{row['metric']}: verdict"] = row["verdict"]
        one["_level"], one["_seeds"] = row["level"], row.get("seeds")
    frame = pd.DataFrame(list(out.values()))
    frame = frame[[c for c in frame.columns if not c.startswith("_")] + ["_level", "_seeds"]]   # shared columns last
    return frame.rename(columns={"_level": "level", "_seeds": "seeds"}).dropna(axis=1, how="all")


def moved_brief(moved: Sequence[dict]):
    """How far each method moved the start (`gap_closed`) for a notebook: one row per method,
    one column per split (and readout, where there are several), 'change [interval]' in the
    readout's own decimals (a single-seed row says its interval is prompt sampling only);
    `moved_table` is the full table written to tables/."""
    import pandas as pd

    several = len({m.get("metric", "rouge_l") for m in moved}) > 1
    rows = {}

    def column(m: dict) -> str:
        name = f" {METRIC_LABELS.get(m.get('metric', 'rouge_l'), m.get('metric'))}" if several else ""
        return f"{m['split']}{name}: change from the start [{m.get('level', 0.95):.0%}]"

    for m in moved:
        row = rows.setdefault(m["method"], {"method": m["label"]})
        one_seed = " (1 seed: prompt sampling only)" if m.get("n_seeds", 2) < 2 else ""
        row[column(m)] = _moved_ci(m) + one_seed
    for key in dict.fromkeys((m["split"], m.get("metric", "rouge_l")) for m in moved):
        first = next(m for m in moved if (m["split"], m.get("metric", "rouge_l")) == key)
        rows.setdefault("teacher", {"method": "teacher (the gap)"})[column(first)] = \
            f"{first['gap']:+.{_digits(key[1])}f}"
    return pd.DataFrame(list(rows.values()))


def lora_moved(df, splits: Sequence[str], metrics: Sequence[str] = ("rouge_l", "nll")) -> tuple[list[dict], dict]:
    """Notebook 02's moves: how far each LoRA + 4-bit-teacher run (group ``lora``) moved the
    start on each readout and split (`gap_closed`), beside notebook 01's full-precision run of
    the same method and seed (its ``reference_run``). Returns (moved, {LoRA method: full method})."""
    lora = df[df["group"] == "lora"]
    method_of = dict(zip(df["run"], df["method"]))
    full = {method_of[run]: method_of[ref] for run, ref in reference_runs_of(lora).items() if ref in method_of}
    mine = list(dict.fromkeys(lora["method"]))
    names = dict(zip(df["method"], df["label"]))
    names |= {m: f"{names[m]} (LoRA, 4-bit teacher)" for m in mine} | {
        m: f"{names[m]} (full precision, notebook 01)" for m in full.values()}
    keep = df[df["method"].isin(["teacher", "student_init", *mine, *full.values()])]
    moved = []
    for metric in metrics:
        ex = per_example(keep, metric=metric)
        moved += [m for s in splits for m in gap_closed(ex, [*mine, *full.values()], s, labels=names, metric=metric)]
    return moved, full


def lora_words(memory, steps, moved: Sequence[dict], pairs: dict) -> str:
    """Notebook 02's reading, generated from its tables: the measured peak against the plan per
    phase (`memory_table`), the time per step against notebook 01's full-precision run of the
    same method and seed (`step_time_table`), and, per readout and split, how far each LoRA run
    moved the start beside how far that full-precision run did (`gap_closed` rows of both;
    ``pairs`` = {LoRA run's method: full-precision run's method})."""
    lines = []
    ratios = memory["measured / planned"].dropna() if len(memory) else []
    if len(ratios):
        lines.append(f"Memory: in the {len(ratios)} phases the planner covers, the measured peak was "
                     f"{ratios.min():.2f}–{ratios.max():.2f} times the plan (on a CPU the process's resident "
                     f"memory, interpreter and libraries included).")
    if len(steps) and steps["ratio"].notna().any():
        each = ", ".join(f"{run} {mine:.2f} s against {theirs:.2f} s"
                         for run, mine, theirs in steps[["run", "s / step", "its s / step"]].to_numpy())
        lines.append(f"Time: {steps['ratio'].min():.1f}–{steps['ratio'].max():.1f} times the seconds per step "
                     f"of notebook 01's full-precision run of the same method and seed ({each}).")
    by = {(m["method"], m["split"], m.get("metric", "rouge_l")): m for m in moved}
    shares: dict[str, list[float]] = {}
    for split, metric in dict.fromkeys((m["split"], m.get("metric", "rouge_l")) for m in moved):
        both = [(by[(m, split, metric)], by[(f, split, metric)]) for m, f in pairs.items()
                if (m, split, metric) in by and (f, split, metric) in by]
        if both:
            lines.append(f"{split} {METRIC_LABELS.get(metric, metric)}, change from the start through LoRA against "
                         f"full precision: " + "; ".join(f"{label(f['method'])} {_moved_ci(m)} against {_moved_ci(f)}" for m, f in both)
                         + " (one seed each: prompt sampling only).")
            if metric in LOWER_IS_BETTER:   # the per-token readouts, whose moves are far above their noise
                shares.setdefault(METRIC_LABELS.get(metric, metric), []).extend(
                    m["moved"] / f["moved"] for m, f in both if f["moved"])
    for name, got in shares.items():
        lines.append(f"So at this rate and budget the LoRA student moved {name} {100 * min(got):.0f}–"
                     f"{100 * max(got):.0f} % as far as full fine-tuning did.")
    return "\n".join(f"- {line}" for line in lines)


def _moved_words(m: dict) -> str:
    """How far one method moved the start on one readout, in its own decimals, and which way
    is better (lower NLL and KL are)."""
    metric, (lo, hi) = m.get("metric", "rouge_l"), m["moved_ci"]
    ci = _moved_ci(m)
    if m.get("n_seeds", 2) < 2:   # no seed-to-seed variation in the interval
        ci += ", one seed: prompt sampling only"
    if lo > 0 or hi < 0:
        better = (hi < 0) == (metric in LOWER_IS_BETTER)
        return (f"moved the starting student {'up' if lo > 0 else 'down'}, {'better' if better else 'worse'} "
                f"({ci}; the interval excludes 0)")
    return f"is not shown to move the starting student ({ci}; the interval includes 0)"


def verdict_text(comparisons: Sequence[dict]) -> str:
    """The answer's headline from the intervals: how many declared comparisons are called
    (each called one in a sentence, `comparison_sentence`), and, per readout, the range of
    differences the intervals over seeds leave open. Where every pair shares one training seed
    (cpu_full), none can be made: the headline says so rather than read the prompt-only intervals."""
    if not comparisons:
        return "No declared comparison could be computed (no evaluated runs)."
    called = [r for r in comparisons if r["verdict"] in ("better", "worse")]
    over_seeds = [r for r in comparisons if r["verdict"] != "not compared (one seed)"]
    m = len(comparisons)
    if not over_seeds:
        head = (f"**None of the {m} declared comparisons can be made here**: each pair of methods shares "
                f"one training seed, so each difference below is prompt sampling only, not a comparison "
                f"of methods (training seeds are the unit of replication).")
    elif not called:
        head = f"**None of the {m} declared comparisons is called**: every interval over seeds includes 0."
    else:
        head = f"**{len(called)} of the {m} declared comparisons {'is' if len(called) == 1 else 'are'} called.**"
    lines = [head, ""] + [f"- {comparison_sentence(r)}" for r in comparisons
                          if r in called or r["verdict"] == "not compared (one seed)"]
    for metric in dict.fromkeys(r["metric"] for r in over_seeds):
        rows = [r for r in over_seeds if r["metric"] == metric]
        k, name = _digits(metric), METRIC_LABELS.get(metric, metric)
        lo = min(rows, key=lambda r: r["ci_lo"])
        hi = max(rows, key=lambda r: r["ci_hi"])
        lines.append(f"- {name}: the intervals leave open differences from {lo['ci_lo']:+.{k}f} "
                     f"({label(lo['a'])} − {label(lo['b'])}, {lo['split']}) to {hi['ci_hi']:+.{k}f} "
                     f"({label(hi['a'])} − {label(hi['b'])}, {hi['split']}): true differences of that size, "
                     f"either way, are not ruled out by these seeds and prompts.")
    return "\n".join(lines)


def mechanism_text(split_df, moved: Sequence[dict], split: str) -> str:
    """Why, in words generated from the numbers: in the mixed arm, the share of the raw
    gradient each method's own objective term carries (`update_split`); then what each
    objective did alone on `split` (its change from the start and whether its 95 % interval
    excludes 0)."""
    lines = []
    if split_df is not None and not split_df.empty:
        mixed = split_df[~split_df["method"].astype(str).str.startswith("alone_")]
        shares = {}
        for method, g in mixed.groupby("method", sort=False):
            own = g.loc[g["term"] == "distill", "share"]
            if own.empty:
                continue
            ce = float(g.loc[g["term"].isin(["ce", "pt_ce"]), "share"].sum())
            shares[method] = float(own.iloc[0])
            lines.append(f"In the mixed arm, {g['label'].iloc[0]}'s own term carries {100 * shares[method]:.0f} % "
                         f"of the raw gradient; the two cross-entropy terms carry {100 * ce:.0f} %.")
        dpkd = {m: v for m, v in shares.items() if str(m).startswith("dpkd")}
        if dpkd and max(dpkd.values()) < 0.5:
            lines.append(f"So in every mixed DPKD run the cross-entropy terms, not the DPKD term, drive most "
                         f"of the update (the DPKD term at most {100 * max(dpkd.values()):.0f} %).")
    for m in moved:
        if m["split"] == split and str(m["method"]).startswith("alone_"):
            name = METRIC_LABELS.get(m.get("metric", "rouge_l"), m.get("metric", "rouge_l"))
            lines.append(f"Alone ({split} {name}), {m['label']} {_moved_words(m)}.")
    return "\n".join(f"- {line}" for line in lines)


# every figure of this module in the one style
main_figure, difference_figure, buckets_figure, curves, update_split_figure = (
    _styled(main_figure), _styled(difference_figure), _styled(buckets_figure), _styled(curves),
    _styled(update_split_figure))


if __name__ == "__main__":
    import sys
    sys.exit(main())
