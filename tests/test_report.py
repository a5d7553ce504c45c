"""dpkd_lib.study.report on fabricated runs (exported as a study exports them, rundata.py):
collection, tables, the paired per-seed intervals, Holm at the Bonferroni level, and the
answer's words, which must follow the intervals. Expected numbers are worked out by hand in
the comments or computed independently (numpy over per-seed means, not the library's path)."""
import gzip
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from dpkd_lib.study import report, stats
from dpkd_lib.study import rundata


def fake_run(root, name, *, method, seed, test_rl, test_em=0.0, heldout_rl=None, group="released",
             objective=None, finished=True, metrics=None, eval_rows=None, label=None, **labels):
    d = root / "runs" / name
    d.mkdir(parents=True)
    params = {"output_dir": str(d), "train": {"objective": objective or method, "seed": seed,
                                              "max_steps": 10, "beta": 0.1, "loss_type": "sigmoid"},
              "student": {"lora": False}, "teacher": {"quantization": "none"}}
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    (d / "manifest.json").write_text(json.dumps({"status": "finished" if finished else "running"}))
    summary = {"run_id": name, "valid_nll": 2.0, "wall_time_s": 12.0, "eval": {"test": {}},
               "test_rouge_l": test_rl, "test_exact_match": test_em, "test_response_tokens": 20.0,
               "test_repetition_rate": 0.1, "test_n": 4, "test_nll": 1.5, "test_token_acc": 0.6}
    if heldout_rl is not None:
        summary["eval"]["heldout"] = {}
        summary.update(heldout_rouge_l=heldout_rl, heldout_exact_match=0.0)
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "labels.json").write_text(json.dumps({"name": name, "method": method, "group": group,
                                               **({"label": label} if label else {}), **labels}))
    if metrics is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if eval_rows is not None:
        (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    rundata.export_run(d, root)        # what runs.run_grid does when a run finishes
    return d


def greedy_rows(scores, split="test"):
    """eval.jsonl rows of greedy decoding: per prompt a ROUGE-L in [0, 1]."""
    return [{"id": f"p{i}", "split": split, "decoding": "greedy", "seed": None, "rouge_l": s,
             "exact_match": float(s > 0.9), "response_tokens": 5, "reference_tokens": 7,
             "bucket": "[5,10)"} for i, s in enumerate(scores)]


@pytest.fixture()
def results(tmp_path):
    # sft: 30, 31, 32 -> mean 31, sd 1 ; dpkd_token: 33, 34, 35 -> mean 34, sd 1
    for seed, v in zip((1, 2, 3), (30.0, 31.0, 32.0)):
        fake_run(tmp_path, f"sft_s{seed}", method="sft", seed=seed, test_rl=v, test_em=10.0 * seed)
    for seed, v in zip((1, 2, 3), (33.0, 34.0, 35.0)):
        fake_run(tmp_path, f"dpkd_token_s{seed}", method="dpkd_token", seed=seed, test_rl=v, heldout_rl=v - 10)
    fake_run(tmp_path, "teacher", method="teacher", seed=40, test_rl=60.0, group="pair")
    fake_run(tmp_path, "student_init", method="student_init", seed=40, test_rl=20.0, group="pair")
    fake_run(tmp_path, "broken_s1", method="sft", seed=9, test_rl=99.0, finished=False)
    return tmp_path


def test_collect_rows_and_columns(results):
    df = report.collect(results)
    assert "broken_s1" not in set(df["run"])                       # only finished runs
    assert list(df["method"].drop_duplicates())[:3] == ["teacher", "student_init", "sft"]
    row = df[(df["run"] == "dpkd_token_s2") & (df["split"] == "heldout")].iloc[0]
    assert row["rouge_l"] == 24.0 and row["seed"] == 2 and row["objective"] == "dpkd_token"
    assert df[df["run"] == "sft_s1"]["nll"].iloc[0] == 1.5


def test_main_table_mean_sd(results):
    table = report.main_table(report.collect(results), methods=["teacher", "student_init", "sft", "dpkd_token"],
                              splits=("test",), metrics=("rouge_l", "exact_match"))
    rows = table.set_index("method")
    assert rows.loc["SFT", "test ROUGE-L"] == "31.0 ± 1.0" and rows.loc["SFT", "test EM"] == "20.0 ± 10.0"
    assert rows.loc["teacher", "test ROUGE-L"] == "60.0" and rows.loc["DPKD-token", "seeds"] == 3


def per_prompt_frame(values: dict, seeds: dict | None = None, groups: dict | None = None):
    """{method: [S, P] array} -> per_example-style rows (ROUGE-L ×100, den 1); seeds 1..S
    unless `seeds` gives a method's own list; `groups` marks fixed models ("pair")."""
    rows = []
    for method, arr in values.items():
        for s, seed in enumerate((seeds or {}).get(method, range(1, arr.shape[0] + 1))):
            for p in range(arr.shape[1]):
                rows.append({"run": f"{method}_s{seed}", "method": method, "group": (groups or {}).get(method, "released"),
                             "seed": seed, "split": "test", "id": f"p{p:02d}", "sample_seed": None,
                             "num": arr[s, p], "den": 1.0})
    return pd.DataFrame(rows)


def t_by_hand(per_seed, level):
    """mean and t interval over per-seed values (S - 1 df), by hand (t quantile from mpmath)."""
    mpmath = pytest.importorskip("mpmath")
    x = np.asarray(per_seed, dtype=float)
    S = len(x)
    q = mpmath.findroot(lambda t: mpmath.betainc((S - 1) / 2, 0.5, 0, (S - 1) / (S - 1 + t * t),
                                                 regularized=True) / 2 - (1 - level) / 2, 3.0)
    half = float(q) * x.std(ddof=1) / math.sqrt(S)
    return x.mean(), (x.mean() - half, x.mean() + half)


def test_difference_pairs_seeds_both_methods_ran():
    """DPKD-seq ran seeds {1, 2}, SFT {1, 2, 3}: the difference and its interval use seeds 1
    and 2 of both sides only (seed 3 of SFT changes nothing), as a t over the two per-seed
    mean differences (1 df). The former bootstrap took all three SFT seeds and resampled the
    two sides independently."""
    g = np.random.default_rng(0)
    prompt = g.normal(0, 10, size=30)
    shift = np.array([-3.0, 0.0, 3.0])                 # a shared per-seed effect (same batches)
    sft = 50 + prompt + shift[:, None] + g.normal(0, 1, size=(3, 30))
    seq = 50 + prompt + shift[:2, None] + 2.0 + g.normal(0, 1, size=(2, 30))
    r = report.difference(per_prompt_frame({"dpkd_seq": seq, "sft": sft}), "dpkd_seq", "sft", "test", level=0.95)
    per_seed = (seq - sft[:2]).mean(axis=1)
    mean, ci = t_by_hand(per_seed, 0.95)
    assert r["seeds"] == [1, 2] and r["n_seeds"] == 2 and (r["n_seeds_a"], r["n_seeds_b"]) == (2, 3)
    assert r["delta"] == pytest.approx(mean) and (r["ci_lo"], r["ci_hi"]) == pytest.approx(ci)
    assert r["mean_b"] == pytest.approx(sft[:2].mean()) and r["interval"] == "seeds" and r["df"] == 1
    wild = sft.copy()
    wild[2] += 40.0                                    # SFT's third seed plays no part
    again = report.difference(per_prompt_frame({"dpkd_seq": seq, "sft": wild}), "dpkd_seq", "sft", "test")
    assert (again["delta"], again["ci_lo"], again["ci_hi"]) == pytest.approx((r["delta"], r["ci_lo"], r["ci_hi"]))
    # no seed in common: a clear error, not an unpaired comparison
    with pytest.raises(ValueError, match=r"no training seed in common \(dpkd_seq: \[1, 2\], sft: \[7, 9, 10\]\)"):
        report.difference(per_prompt_frame({"dpkd_seq": seq, "sft": sft}, seeds={"sft": [10, 7, 9]}),
                          "dpkd_seq", "sft", "test")


def test_a_fixed_model_pairs_with_every_seed_and_one_seed_is_prompt_sampling_only():
    g = np.random.default_rng(1)
    start = g.uniform(0, 100, size=(1, 40))
    sft = start + 5.0 + g.normal(0, 2.0, size=(3, 40))
    ex = per_prompt_frame({"sft": sft, "student_init": start, "alone_kd": sft[:1] - 1.0},
                          seeds={"student_init": [2]}, groups={"student_init": "pair"})
    r = report.difference(ex, "sft", "student_init", "test")
    mean, ci = t_by_hand((sft - start).mean(axis=1), 0.95)
    assert r["n_seeds"] == 3 and r["delta"] == pytest.approx(mean) and (r["ci_lo"], r["ci_hi"]) == pytest.approx(ci)
    one = report.difference(ex, "alone_kd", "student_init", "test")
    d = (sft[0] - 1.0) - start[0]
    half = float(stats.t_ppf(0.975, 39)) * d.std(ddof=1) / math.sqrt(40)
    assert one["interval"] == "prompt sampling only" and one["n_seeds"] == 1
    assert (one["ci_lo"], one["ci_hi"]) == pytest.approx((d.mean() - half, d.mean() + half))


def test_nll_is_token_weighted_per_seed():
    rows = []
    for method, seed, nll in (("a", 1, (2.0, 8.0)), ("a", 2, (4.0, 4.0)), ("b", 1, (2.0, 2.0)), ("b", 2, (6.0, 2.0))):
        for i, (v, n) in enumerate(zip(nll, (1.0, 3.0))):
            rows.append({"run": f"{method}{seed}", "method": method, "group": "x", "seed": seed, "split": "test",
                         "id": f"p{i}", "sample_seed": None, "num": v, "den": n})
    r = report.difference(pd.DataFrame(rows), "a", "b", "test")
    # per seed Σnum/Σden: a 10/4, 8/4; b 4/4, 8/4 -> differences 1.5, 0 -> mean 0.75
    assert r["delta"] == pytest.approx(0.75) and r["mean_a"] == pytest.approx(2.25)


def test_every_interval_at_the_bonferroni_level_and_holm_by_hand():
    """Four comparisons (two pairs x two splits): every interval at 1 - 0.05/4 (the former
    code drew the i-th at 1 - 0.05/(m - i)); p-values from the same t; Holm's step-down by
    hand; an interval that excludes 0 is always a rejection."""
    g = np.random.default_rng(2)
    sft = 40 + g.normal(0, 5, size=60) + g.normal(0, 1, size=(3, 60))
    values = {"sft": sft, "dpkd_token": sft + 6.0 + g.normal(0, 1, size=(3, 60)),
              "kd": sft + 1.0 + g.normal(0, 1, size=(3, 60))}
    ex = per_prompt_frame(values)
    ex = pd.concat([ex, ex.assign(split="heldout", num=ex["num"] + g.normal(0, 3, size=len(ex)))])
    comps = report.compare(ex, [["dpkd_token", "sft"], ["kd", "sft"]], ["test", "heldout"])
    assert all(r["ci_level"] == pytest.approx(1 - 0.05 / 4) for r in comps)
    p = [r["p"] for r in comps]
    order = np.argsort(p)
    running, still = 0.0, True
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (4 - rank) * p[i]))
        still = still and p[i] <= 0.05 / (4 - rank)
        assert comps[i]["p_holm"] == pytest.approx(running) and comps[i]["rejected"] == still
    for r in comps:
        if r["ci_lo"] > 0 or r["ci_hi"] < 0:
            assert r["rejected"]
        lone = report.difference(ex, r["a"], r["b"], r["split"], level=1 - 0.05 / 4)
        assert lone["p"] == pytest.approx(r["p"]) and lone["ci_lo"] == pytest.approx(r["ci_lo"])
        assert r["mdd"] > 0 and np.isfinite(r["mdd"])


def test_compare_words_follow_the_intervals():
    g = np.random.default_rng(2)
    prompt = g.normal(0, 5, size=60)
    sft = 40 + prompt + g.normal(0, 1, size=(3, 60))
    better = sft + 4.0 + g.normal(0, 1, size=(3, 60))
    tied = sft + g.normal(0, 1, size=(3, 60))
    ex = per_prompt_frame({"sft": sft, "dpkd_token": better, "kd": tied, "rkl": tied[:1]})
    comps = report.compare(ex, [["dpkd_token", "sft"], ["kd", "sft"], ["sft", "dpkd_token"], ["rkl", "sft"]],
                           ["test"], effect=0.1)
    verdicts = {(r["a"], r["b"]): r["verdict"] for r in comps}
    assert verdicts == {("dpkd_token", "sft"): "better", ("kd", "sft"): "no difference shown",
                        ("sft", "dpkd_token"): "worse", ("rkl", "sft"): "not compared (one seed)"}
    for r in comps:   # a call is made only when Holm rejects
        sentence = report.comparison_sentence(r)
        assert f"{r['delta']:+.1f} [{r['ci_lo']:+.1f}, {r['ci_hi']:+.1f}]" in sentence
        assert ("beats" in sentence) == (r["verdict"] == "better")
        assert ("not told apart" in sentence) == (r["verdict"] == "no difference shown")
        assert ("prompt sampling only" in sentence) == (r["verdict"] == "not compared (one seed)")
    (tied_r,) = [r for r in comps if r["a"] == "kd"]
    sentence = report.comparison_sentence(tied_r)
    assert f"detect with 80 % power at this level is {tied_r['mdd']:.1f}" in sentence
    assert (tied_r["ci_hi"] - tied_r["ci_lo"]) / 2 > 0.1 and "wider than the effect sought (0.1)" in sentence
    (rkl,) = [r for r in comps if r["a"] == "rkl"]
    assert math.isnan(rkl["p"]) and not rkl["rejected"] and len(comps) == 4 and comps[0]["ci_level"] == 1 - 0.05 / 4
    text = report.answer_text(comps)
    assert text.splitlines()[0].startswith("- DPKD-token beats SFT on test ROUGE-L")
    assert "drawn at 98.8 % for all 4 declared comparisons (Bonferroni)" in text.splitlines()[4]
    table = report.comparisons_table(comps).set_index("a")
    assert table.loc["KD", "mdd"] == pytest.approx(tied_r["mdd"]) and table.loc["KD", "seeds"] == "1,2,3"
    assert table.loc["RKL", "interval"] == "prompt sampling only" and table.loc["KD", "effect"] == 0.1


def test_a_holm_rejection_whose_bonferroni_interval_reaches_zero_says_so():
    r = {"a": "kd", "b": "sft", "split": "test", "metric": "rouge_l", "delta": 1.0, "ci_lo": -0.1, "ci_hi": 2.1,
         "ci_level": 0.99375, "p_holm": 0.04, "verdict": "better", "n_seeds": 3, "mdd": 2.0}
    assert "though the interval, drawn at the level of all comparisons at once, reaches 0" in \
        report.comparison_sentence(r)


def test_lower_is_better_for_nll():
    g = np.random.default_rng(3)
    a = 1.0 + g.normal(0, 0.01, size=(3, 10))
    b = 2.0 + g.normal(0, 0.01, size=(3, 10))
    (r,) = report.compare(per_prompt_frame({"a": a, "b": b}), [["a", "b"]], ["test"], metric="nll")
    assert r["verdict"] == "better" and "beats" in report.comparison_sentence(r)


def test_gap_closed_and_its_words():
    g = np.random.default_rng(4)
    start = np.full((1, 20), 10.0)
    teacher = np.full((1, 20), 30.0) + g.normal(0, 1, size=(1, 20))
    sft = 15.0 + g.normal(0, 0.5, size=(2, 20))
    alone = 12.0 + g.normal(0, 0.5, size=(1, 20))
    ex = per_prompt_frame({"student_init": start, "teacher": teacher, "sft": sft, "alone_sft": alone},
                          seeds={"student_init": [1], "teacher": [1]},
                          groups={"student_init": "pair", "teacher": "pair"})
    moved = report.gap_closed(ex, ["sft", "alone_sft"], "test", labels={"alone_sft": "SFT (alone)"})
    m, lone = moved
    assert m["moved"] == pytest.approx(sft.mean() - 10.0) and m["gap"] == pytest.approx(teacher.mean() - 10.0)
    assert m["share"] == pytest.approx(m["moved"] / m["gap"]) and m["n_seeds"] == 2 and m["interval"] == "seeds"
    assert lone["interval"] == "prompt sampling only" and lone["n_seeds"] == 1
    line = report.answer_text([], moved)
    assert line.startswith(f"- test ROUGE-L: the teacher is {m['gap']:+.1f} [")
    assert f"SFT {m['moved']:+.1f} [{m['moved_ci'][0]:+.1f}, {m['moved_ci'][1]:+.1f}] (2 seeds; " in line
    assert "SFT (alone)" in line and "(one seed: prompt sampling only; " in line
    flat = per_prompt_frame({"student_init": start, "teacher": start + 0.0, "sft": sft},
                            groups={"student_init": "pair", "teacher": "pair"})
    flat.loc[flat["method"] == "teacher", "num"] += np.tile([0.1, -0.1], 10)
    assert "no gap to close" in report.answer_text([], report.gap_closed(flat, ["sft"], "test"))
    table = report.moved_table(moved)
    assert list(table["interval"]) == ["seeds", "prompt sampling only"]


def test_study_answer_covers_every_arm_and_nothing_without_a_split(tmp_path):
    g = np.random.default_rng(5)
    scores = {"teacher": [0.9] * 12, "student_init": [0.1] * 12}
    for name, (method, group, seed) in {"sft_s1": ("sft", "released", 1), "sft_s2": ("sft", "released", 2),
                                        "dpkd_token_s1": ("dpkd_token", "released", 1),
                                        "dpkd_token_s2": ("dpkd_token", "released", 2),
                                        "alone_kd_s1": ("alone_kd", "alone", 1)}.items():
        scores[name] = list(g.uniform(0.1, 0.5, size=12))
        fake_run(tmp_path, name, method=method, seed=seed, test_rl=0.0, group=group,
                 label="KD alone" if group == "alone" else None, eval_rows=greedy_rows(scores[name]))
    for name in ("teacher", "student_init"):
        fake_run(tmp_path, name, method=name, seed=40, test_rl=0.0, group="pair",
                 eval_rows=greedy_rows(scores[name]))
    df = report.collect(tmp_path)
    arms = {"released": {"methods": {"sft": {}, "dpkd_token": {}}},
            "alone": {"prefix": "alone_", "methods": {"kd": {}}}}
    primary = {"metric": "rouge_l", "decoding": "greedy", "splits": ["test"], "alpha": 0.05,
               "comparisons": [["dpkd_token", "sft"]]}
    assert report.arm_methods(arms) == ["sft", "dpkd_token", "alone_kd"]
    comps, moved, text = report.study_answer(df, arms, primary)
    assert [(r["a"], r["b"], r["split"]) for r in comps] == [("dpkd_token", "sft", "test")]
    assert [m["method"] for m in moved] == ["sft", "dpkd_token", "alone_kd"]
    assert moved[2]["label"] == "KD alone" and "KD alone" in text
    start = np.mean(scores["student_init"]) * 100
    assert moved[0]["moved"] == pytest.approx(np.mean(scores["sft_s1"] + scores["sft_s2"]) * 100 - start)
    assert text == report.answer_text(comps, moved)
    assert report.study_answer(df, arms, primary, splits=[]) == ([], [], "")


def test_two_primary_metrics_are_one_holm_family(tmp_path):
    g = np.random.default_rng(6)
    for method in ("sft", "kd"):
        for seed in (1, 2, 3):
            rows = greedy_rows(list(g.uniform(0.1, 0.5, size=10))) + [
                {"id": f"p{i}", "split": "test", "decoding": "teacher_forced", "nll_sum": float(g.uniform(1, 3)),
                 "correct": 1, "n_tokens": 2} for i in range(10)]
            fake_run(tmp_path, f"{method}_s{seed}", method=method, seed=seed, test_rl=0.0, eval_rows=rows)
    primary = {"metric": ["rouge_l", "nll"], "decoding": "greedy", "splits": ["test"], "alpha": 0.05,
               "comparisons": [["kd", "sft"]], "effect": {"rouge_l": 1.0, "nll": 0.05}}
    comps = report.compare_all(report.collect(tmp_path), primary)
    assert [r["metric"] for r in comps] == ["rouge_l", "nll"] and [r["effect"] for r in comps] == [1.0, 0.05]
    assert all(r["ci_level"] == pytest.approx(1 - 0.05 / 2) for r in comps)
    adj, _ = stats.holm([r["p"] for r in comps])
    assert [r["p_holm"] for r in comps] == pytest.approx(list(adj))


def test_export_is_lossless_deterministic_and_only_for_finished_runs(tmp_path):
    rows = greedy_rows([0.5, 0.0]) + [{"id": "p0", "split": "test", "decoding": "greedy", "seed": None,
                                       "rouge_l": 0.0, "sample": "", "prompt": "long prompt", "references": ["r"]}]
    metrics = [{"step": 1, "loss": 1.5}, {"step": 2, "loss": 1.25, "gnorm_total": 3.0}]
    d = fake_run(tmp_path, "sft_s1", method="sft", seed=1, test_rl=1.0, eval_rows=rows, metrics=metrics)
    out = tmp_path / "data" / "sft_s1"
    back = rundata.read_eval_rows(out)
    assert back[2] == {"id": "p0", "split": "test", "decoding": "greedy", "seed": None, "rouge_l": 0.0, "sample": ""}
    assert back[:2] == greedy_rows([0.5, 0.0]) and rundata.read_metric_rows(out) == metrics
    assert json.loads((out / "summary.json").read_text()) == json.loads((d / "summary.json").read_text())
    blob = (out / rundata.EVAL_ROWS).read_bytes()
    assert gzip.decompress(blob).decode().count("\n") == 3
    before = (out / rundata.EVAL_ROWS).stat().st_mtime_ns
    assert rundata.export_run(d, tmp_path) == out and (out / rundata.EVAL_ROWS).read_bytes() == blob
    assert (out / rundata.EVAL_ROWS).stat().st_mtime_ns == before          # unchanged: not rewritten
    fake_run(tmp_path, "kd_s1", method="kd", seed=1, test_rl=1.0, finished=False)
    assert not (tmp_path / "data" / "kd_s1").exists()
    import shutil
    shutil.rmtree(tmp_path / "data")           # an older results root: runs/ only
    assert report.main(["export", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["sft_s1"]
    assert (out / rundata.EVAL_ROWS).read_bytes() == blob                  # the same bytes again
    # the tables read data/ alone: without the run folders nothing changes
    before = report.collect(tmp_path).drop(columns="run_dir")
    shutil.rmtree(tmp_path / "runs")
    pd.testing.assert_frame_equal(report.collect(tmp_path).drop(columns="run_dir"), before)
    assert len(report.per_example(report.collect(tmp_path))) == 3


def test_write_results_from_data_alone_and_a_clear_error_without_it(tmp_path, capsys):
    import shutil

    import matplotlib
    matplotlib.use("Agg")
    g = np.random.default_rng(8)
    for name, method, group, seed in (("teacher", "teacher", "pair", 40), ("student_init", "student_init", "pair", 40),
                                      ("sft_s1", "sft", "released", 1), ("sft_s2", "sft", "released", 2),
                                      ("kd_s1", "kd", "released", 1), ("kd_s2", "kd", "released", 2)):
        fake_run(tmp_path, name, method=method, seed=seed, test_rl=0.0, group=group,
                 eval_rows=greedy_rows(list(g.uniform(0.1, 0.6, size=8))),
                 metrics=[{"step": s, "loss": 2.0 - 0.1 * s} for s in range(1, 13)])
    shutil.rmtree(tmp_path / "runs")
    design = {"profile": "x", "primary": {"metric": "rouge_l", "decoding": "greedy", "splits": ["test", "heldout"],
                                          "alpha": 0.05, "comparisons": [["kd", "sft"]]},
              "arms": {"released": {"methods": {"sft": {}, "kd": {}}}}, "reference_runs": None, "paper_column": False}
    out = report.write_results(tmp_path, design)
    tables = tmp_path / "tables"
    assert (tables / "answer.md").read_text().strip() == out["answer"]
    comps, moved, answer = report.study_answer(report.collect(tmp_path), design["arms"], design["primary"], ["test"])
    assert answer == out["answer"] and len(pd.read_csv(tables / "comparisons.csv")) == 1   # heldout: not evaluated
    assert pd.read_csv(tables / "moved.csv")["method"].tolist() == ["SFT", "KD"]
    training = pd.read_csv(tables / "training.csv").set_index("run")
    # loss 2.0 - 0.1 s over steps 1..12: steps 1-5 average 1.7, steps 8-12 average 1.0
    assert training.loc["sft_s1", ["loss first", "loss last"]].tolist() == pytest.approx([1.7, 1.0])
    assert "distill first" not in training and training.loc["kd_s2", "logged steps"] == 12
    assert list(training.index) == ["sft_s1", "sft_s2", "kd_s1", "kd_s2"]
    assert (tmp_path / "figures" / "comparisons.png").exists() and (tmp_path / "figures" / "curves.png").exists()
    assert json.loads((tmp_path / "data" / "design.json").read_text()) == design
    assert report.rebuild(tmp_path)["answer"] == out["answer"]          # the recorded design is enough
    assert report.main(["rebuild", str(tmp_path / "elsewhere")]) == 2
    assert "no exported runs under" in capsys.readouterr().out


def test_per_example_reads_greedy_rows_and_teacher_forced_sums(tmp_path):
    rows = greedy_rows([0.5, 1.0]) + [
        {"id": "p0", "split": "test", "decoding": "teacher_forced", "nll_sum": 6.0, "correct": 2, "n_tokens": 4},
        {"id": "p1", "split": "test", "decoding": "teacher_forced", "nll_sum": 2.0, "correct": 1, "n_tokens": 1},
        {"id": "p0", "split": "test", "decoding": "sample", "seed": 10, "rouge_l": 0.1}]
    fake_run(tmp_path, "sft_s1", method="sft", seed=1, test_rl=75.0, eval_rows=rows)
    df = report.collect(tmp_path)
    rl = report.per_example(df, metric="rouge_l")
    assert sorted(rl["num"]) == [50.0, 100.0] and set(rl["den"]) == {1.0}
    nll = report.per_example(df, metric="nll")
    assert nll["num"].sum() / nll["den"].sum() == pytest.approx(8.0 / 5)   # token-weighted
    assert len(report.per_example(df, metric="rouge_l", decoding="sample")) == 1


def test_update_split_shares_sum_to_one(tmp_path):
    # g_ce = (3, 0), g_distill = (1, 1): total (4, 1); shares <g_t, g>/|g|^2 = 12/17 and 5/17
    g_ce, g_d = np.array([3.0, 0.0]), np.array([1.0, 1.0])
    tot = g_ce + g_d
    probe = {"gnorm_total": float(np.linalg.norm(tot))}
    for name, g in (("ce", g_ce), ("distill", g_d)):
        probe[f"gnorm_{name}"] = float(np.linalg.norm(g))
        probe[f"gcos_{name}"] = float(g @ tot / np.linalg.norm(g) / np.linalg.norm(tot))
    metrics = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9, **probe}]
    fake_run(tmp_path, "dpkd_token_s1", method="dpkd_token", seed=1, test_rl=1.0, metrics=metrics)
    split = report.update_split(report.collect(tmp_path)).set_index("term")
    assert split.loc["ce", "share"] == pytest.approx(12 / 17) and split.loc["distill", "share"] == pytest.approx(5 / 17)
    assert split["share"].sum() == pytest.approx(1.0) and set(split["n_probes"]) == {1}
    import matplotlib
    matplotlib.use("Agg")
    fig = report.update_split_figure(split.reset_index())
    assert report.savefig(fig, tmp_path, "update_split").stat().st_size > 1000


def test_write_table_and_markdown(tmp_path):
    df = pd.DataFrame({"method": ["SFT", "a|b"], "x": [1.23456, float("nan")]})
    csv, md = report.write_table(df, tmp_path / "tables" / "main")
    assert csv.read_text().splitlines()[0] == "method,x"
    text = md.read_text().splitlines()
    assert text[0] == "| method | x |" and text[2] == "| SFT | 1.23 |" and text[3] == "| a\\|b | – |"


def test_curves_monitors_and_colours(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    for i in range(12):   # twelve ablation lines: tab10 alone would draw two in one colour
        fake_run(tmp_path, f"abl_{i}", method=f"abl_{i}", seed=1, test_rl=1,
                 metrics=[{"step": s, "loss": float(i + s)} for s in range(1, 4)])
    df = report.collect(tmp_path)
    fig = report.curves(df, metrics=("loss",))
    colours = [tuple(line.get_color()) for line in fig.axes[0].get_lines()]
    assert len(colours) == 12 and len(set(colours)) == 12
    mon = report.final_monitors(df, last=2).set_index("run")
    assert math.isnan(mon.loc["abl_1", "reward_margin"]) and mon.loc["abl_1", "response_tokens"] == 20.0


def test_paper_numbers():
    t = report.paper_table().set_index("set")
    assert t.loc["DollyEval", "DPKD-token"] == 24.6 and t.loc["DollyEval", "SFT"] == 23.3
    assert t.loc["S-NI", "SeqKD"] == 16.4      # the paper's Table 1 (the released code's table says 16.0)
    assert "5-seed" in report.PAPER_NOTE and "one seed" in report.PAPER_NOTE


def test_buckets_from_greedy_rows_mean_sd_over_training_seeds(tmp_path):
    # greedy rows carry seed None (evaluate_splits): they are one decoding, not missing values.
    # Two prompts per run, bucket [0,5) (ROUGE-L a) and [10,20) (ROUGE-L b).
    def rows(a, b):
        return [{"id": "p0", "split": "test", "decoding": "greedy", "seed": None, "rouge_l": a,
                 "exact_match": 1.0, "response_tokens": 3, "reference_tokens": 4, "bucket": "[0,5)"},
                {"id": "p1", "split": "test", "decoding": "greedy", "seed": None, "rouge_l": b,
                 "exact_match": 0.0, "response_tokens": 9, "reference_tokens": 12, "bucket": "[10,20)"},
                {"id": "p0", "split": "test", "decoding": "sample", "seed": 1, "rouge_l": 0.0,
                 "exact_match": 0.0, "response_tokens": 3, "reference_tokens": 4, "bucket": "[0,5)"}]
    fake_run(tmp_path, "sft_s1", method="sft", seed=1, test_rl=0.0, eval_rows=rows(0.2, 0.5))
    fake_run(tmp_path, "sft_s2", method="sft", seed=2, test_rl=0.0, eval_rows=rows(0.4, 0.1))
    table = report.buckets(report.collect(tmp_path), split="test", methods=["sft"]).set_index("bucket")
    assert list(table.index) == ["[0,5)", "[10,20)"] and list(table["n_seeds"]) == [2, 2]
    assert table.loc["[0,5)", "rouge_l"] == pytest.approx(30.0)          # (20 + 40) / 2; sample row not read
    assert table.loc["[0,5)", "rouge_l_sd"] == pytest.approx(math.sqrt(200.0))
    assert table.loc["[10,20)", "rouge_l"] == pytest.approx(30.0)        # (50 + 10) / 2
    assert table.loc["[0,5)", "exact_match"] == pytest.approx(100.0)
