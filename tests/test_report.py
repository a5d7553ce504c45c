"""dpkd_lib.report on fabricated run folders: collection, tables, the paired bootstrap, Holm,
and the answer's words, which must follow the intervals. Expected numbers are worked out by
hand in the comments or computed independently (numpy loops, not the library's vectorised
resampling)."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from dpkd_lib import report


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


def bootstrap_by_hand(a, b, n_boot, seed, paired):
    """The same estimator with explicit loops (independent of the library's indexing)."""
    rng = np.random.default_rng(seed)
    P = a.shape[1]
    p_idx = rng.integers(0, P, size=(n_boot, P))
    sa = rng.integers(0, a.shape[0], size=(n_boot, a.shape[0]))
    sb = sa if paired else rng.integers(0, b.shape[0], size=(n_boot, b.shape[0]))
    out = []
    for k in range(n_boot):
        ma = np.mean([a[i, j] for i in sa[k] for j in p_idx[k]])
        mb = np.mean([b[i, j] for i in sb[k] for j in p_idx[k]])
        out.append(ma - mb)
    return np.array(out)


def per_prompt_frame(values: dict):
    """{method: [S, P] array} -> per_example-style rows (ROUGE-L ×100, den 1)."""
    rows = []
    for method, arr in values.items():
        for s in range(arr.shape[0]):
            for p in range(arr.shape[1]):
                rows.append({"run": f"{method}_s{s}", "method": method, "seed": s + 1, "split": "test",
                             "id": f"p{p}", "sample_seed": None, "num": arr[s, p], "den": 1.0})
    return pd.DataFrame(rows)


def test_bootstrap_difference_matches_a_loop_and_pairs_by_seed():
    g = np.random.default_rng(0)
    prompt = g.normal(0, 10, size=30)                 # shared prompt difficulty
    seed_shift = np.array([-3.0, 0.0, 3.0])           # shared per-seed effect (same batches)
    a = 50 + prompt + seed_shift[:, None] + 2.0 + g.normal(0, 1, size=(3, 30))
    b = 50 + prompt + seed_shift[:, None] + g.normal(0, 1, size=(3, 30))
    ex = per_prompt_frame({"a": a, "b": b})
    r = report.bootstrap_difference(ex, "a", "b", "test", n_boot=300, seed=5, levels=(0.95,))
    assert r["paired"] and r["n_prompts"] == 30 and r["delta"] == pytest.approx(a.mean() - b.mean())
    order = sorted(range(30), key=lambda j: f"p{j}")   # the library orders prompts by id
    boot = bootstrap_by_hand(a[:, order], b[:, order], 300, 5, paired=True)
    assert r["ci_0.95"] == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])))
    lo, hi = r["ci_0.95"]
    assert lo > 0 and lo < 2.0 < hi                    # the true +2 is inside, 0 is not
    # pairing removes the shared seed and prompt effects: unpaired seeds give a wider interval
    ex_unpaired = per_prompt_frame({"a": a, "b": b[::-1]})
    ex_unpaired.loc[ex_unpaired["method"] == "b", "seed"] += 10   # no common seeds
    u = report.bootstrap_difference(ex_unpaired, "a", "b", "test", n_boot=300, seed=5, levels=(0.95,))
    assert not u["paired"] and (u["ci_0.95"][1] - u["ci_0.95"][0]) > 2 * (hi - lo)


def test_bootstrap_against_a_single_model_and_a_null_difference():
    g = np.random.default_rng(1)
    base = g.uniform(0, 100, size=(1, 40))
    same = np.repeat(base, 3, axis=0) + g.normal(0, 0.5, size=(3, 40))
    r = report.bootstrap_difference(per_prompt_frame({"m": same, "start": base}), "m", "start", "test",
                                    n_boot=500, levels=(0.95,))
    assert r["n_seeds_b"] == 1 and r["ci_0.95"][0] < 0 < r["ci_0.95"][1] and r["p"] > 0.05


def test_holm_step_down_by_hand():
    # p sorted: 0.001 (m=4: 0.0125 ok), 0.012 (0.0167 ok), 0.04 (0.025 fails), 0.002?? -> order
    results = [{"p": 0.04}, {"p": 0.001}, {"p": 0.012}, {"p": 0.2}]
    for r in results:
        for level in report.holm_levels(4):
            r[f"ci_{level:g}"] = (-1.0, 1.0)
    out = report.holm(results)
    assert [r["rejected"] for r in out] == [False, True, True, False]
    # adjusted p: max over the step-down of (m - rank) * p, capped at 1
    assert [r["p_holm"] for r in out] == pytest.approx([0.08, 0.004, 0.036, 0.2])
    assert out[1]["ci_level"] == pytest.approx(1 - 0.05 / 4) and out[3]["ci_level"] == pytest.approx(0.95)


def test_compare_words_follow_the_intervals():
    g = np.random.default_rng(2)
    prompt = g.normal(0, 5, size=60)
    sft = 40 + prompt + g.normal(0, 1, size=(3, 60))
    better = sft + 4.0 + g.normal(0, 1, size=(3, 60))
    tied = sft + g.normal(0, 1, size=(3, 60))
    ex = per_prompt_frame({"sft": sft, "dpkd_token": better, "kd": tied})
    comps = report.compare(ex, [["dpkd_token", "sft"], ["kd", "sft"], ["sft", "dpkd_token"]], ["test"],
                           n_boot=800)
    verdicts = {(r["a"], r["b"]): r["verdict"] for r in comps}
    assert verdicts == {("dpkd_token", "sft"): "better", ("kd", "sft"): "no difference shown",
                        ("sft", "dpkd_token"): "worse"}
    for r in comps:   # a call is made only when the Holm-level interval excludes 0
        assert r["verdict"] == "no difference shown" or r["ci_lo"] > 0 or r["ci_hi"] < 0
        sentence = report.comparison_sentence(r)
        assert f"{r['delta']:+.1f} [{r['ci_lo']:+.1f}, {r['ci_hi']:+.1f}]" in sentence
        assert ("beats" in sentence) == (r["verdict"] == "better")
        assert ("not told apart" in sentence) == (r["verdict"] == "no difference shown")
    text = report.answer_text(comps)
    assert text.splitlines()[0].startswith("- DPKD-token beats SFT on test ROUGE-L")


def test_lower_is_better_for_nll():
    a = np.full((2, 10), 1.0)
    b = np.full((2, 10), 2.0)
    ex = per_prompt_frame({"a": a, "b": b})
    (r,) = report.compare(ex, [["a", "b"]], ["test"], metric="nll", n_boot=200)
    assert r["verdict"] == "better" and "beats" in report.comparison_sentence(r)


def test_gap_closed_and_its_words():
    start = np.full((1, 20), 10.0)
    teacher = np.full((1, 20), 30.0)
    sft = np.full((2, 20), 15.0)
    ex = per_prompt_frame({"student_init": start, "teacher": teacher, "sft": sft})
    (m,) = report.gap_closed(ex, ["sft"], "test", n_boot=200)
    assert m["moved"] == pytest.approx(5.0) and m["gap"] == pytest.approx(20.0) and m["share"] == pytest.approx(0.25)
    line = report.answer_text([], [m])
    assert line == ("- test: the teacher is +20.0 above the starting student. Change from the start "
                    "(95 % CI): SFT +5.0 [+5.0, +5.0] (25 % of the gap).")
    flat = per_prompt_frame({"student_init": start, "teacher": start, "sft": sft})
    assert "no gap to close" in report.answer_text([], report.gap_closed(flat, ["sft"], "test", n_boot=50))


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
    comps, moved, text = report.study_answer(df, arms, primary, n_boot=200)
    assert [(r["a"], r["b"], r["split"]) for r in comps] == [("dpkd_token", "sft", "test")]
    assert [m["method"] for m in moved] == ["sft", "dpkd_token", "alone_kd"]
    assert moved[2]["label"] == "KD alone" and "KD alone" in text
    start = np.mean(scores["student_init"]) * 100
    assert moved[0]["moved"] == pytest.approx(np.mean(scores["sft_s1"] + scores["sft_s2"]) * 100 - start)
    assert text == report.answer_text(comps, moved)
    assert report.study_answer(df, arms, primary, splits=[], n_boot=200) == ([], [], "")


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
