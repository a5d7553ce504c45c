"""The figure and notebook-text functions of dpkd_lib.study.report on small fake run folders: what
each figure shows (the teacher does not set the scale, one quantity per panel, the measured
quantity named on the axis) and words that follow the intervals."""
from __future__ import annotations

import json

import matplotlib
import pandas as pd
import pytest
import yaml

from dpkd_lib.study import report, rundata, driver as study

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def run(root, name, *, method, objective, group="released", metrics=None, label=None, seed=1):
    d = root / "runs" / name
    d.mkdir(parents=True)
    (d / "params.yaml").write_text(yaml.safe_dump({"train": {"objective": objective, "seed": seed}}))
    (d / "manifest.json").write_text(json.dumps({"status": "finished"}))
    (d / "summary.json").write_text(json.dumps({"eval": {"test": {}}, "test_rouge_l": 1.0}))
    (d / "labels.json").write_text(json.dumps({"name": name, "method": method, "group": group,
                                               **({"label": label} if label else {})}))
    rows = metrics or [{"step": s, "student_nll_ref": 3.0 - 0.1 * s, "distill": 0.7} for s in range(1, 5)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rundata.export_run(d, root)   # what report reads: the run's committed record under data/


def moved(method, split, delta, lo, hi, gap):
    return {"method": method, "label": report.label(method), "split": split, "moved": delta,
            "moved_ci": (lo, hi), "gap": gap, "share": delta / gap}


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]


def test_style_keeps_the_inline_backends_interactive_flag():
    """rc_context restores every rcParam on leaving, 'interactive' included: a kernel whose
    inline backend switched it on inside the first figure would show no later figure."""
    was = matplotlib.is_interactive()
    try:
        matplotlib.interactive(False)
        with report.style():
            matplotlib.interactive(True)     # what the inline backend does at the first figure
            assert plt.rcParams["axes.spines.top"] is False
        assert matplotlib.is_interactive()
        assert plt.rcParams["axes.spines.top"] is True
    finally:
        matplotlib.interactive(was)


def test_change_figure_keeps_the_methods_scale_and_names_the_teacher():
    df = pd.DataFrame({"method": ["sft", "dpkd_token", "alone_kd"], "objective": ["sft", "dpkd_token", "kd"]})
    far = [moved("sft", "test", 2.1, -0.4, 4.9, 39.0), moved("dpkd_token", "test", 2.1, -0.7, 5.1, 39.0),
           moved("alone_kd", "test", 0.0, -2.1, 1.8, 39.0)]
    fig = report.main_figure(df, ["sft", "dpkd_token", "alone_kd"], ["test"], moved=far)
    ax = fig.axes[0]
    assert ax.get_xlim()[1] < 10                          # the teacher's +39 does not set the scale
    assert any("teacher: +39.0" in t and "off this scale" in t for t in texts(fig))
    assert [t.get_text() for t in ax.get_yticklabels()][0] == "SFT"     # the first method on top
    assert ax.get_ylim()[0] > ax.get_ylim()[1]
    assert any("objective alone" in t for t in texts(fig))
    near = [dict(m, gap=4.0) for m in far]
    fig = report.main_figure(df, ["sft", "dpkd_token", "alone_kd"], ["test"], moved=near)
    assert any(abs(line.get_xdata()[0] - 4.0) < 1e-9 for line in fig.axes[0].get_lines()
               if len(set(line.get_xdata())) == 1)       # a reference line at the teacher
    assert any(t == "teacher +4.0" for t in texts(fig))
    plt.close("all")


def test_curves_give_each_quantity_its_own_panel(tmp_path):
    run(tmp_path, "kd_s1", method="kd", objective="kd")
    run(tmp_path, "dpkd_token_s1", method="dpkd_token", objective="dpkd_token",
        metrics=[{"step": s, "student_nll_ref": 3.0, "distill": 0.7, "reward_margin": -0.1} for s in (1, 2)])
    run(tmp_path, "dpkd_seq_s1", method="dpkd_seq", objective="dpkd_seq",
        metrics=[{"step": s, "student_nll_ref": 3.0, "distill": 0.69, "reward_margin": 0.2} for s in (1, 2)])
    run(tmp_path, "alone_dpkd_token_s1", method="alone_dpkd_token", objective="dpkd_token", group="alone",
        label="DPKD-token alone")
    df = report.collect(tmp_path)
    fig = report.curves(df, metrics=("nll_ref", "kd_term", "dpkd_token_term", "dpkd_seq_term", "token_margin",
                                     "seq_margin"), ncols=3)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    drawn = lambda ax: {line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")}  # noqa: E731
    assert drawn(panels["KD term: divergence to the teacher"]) == {"KD"}
    assert drawn(panels["DPKD-token term −log σ(βΔ)"]) == {"DPKD-token", "DPKD-token alone"}
    assert drawn(panels["DPKD-seq term −log σ(βΔ)"]) == {"DPKD-seq"}
    assert panels["DPKD-token term −log σ(βΔ)"].get_ylabel() == "per position"
    assert panels["DPKD-seq term −log σ(βΔ)"].get_ylabel() == "per sequence pair"
    assert drawn(panels["NLL of the dataset responses"]) == {"KD", "DPKD-token", "DPKD-seq", "DPKD-token alone"}
    assert all(ax.get_ylabel() and ax.get_xlabel() == "training step" for ax in panels.values())
    styles = {line.get_label(): line.get_linestyle() for line in panels["NLL of the dataset responses"].get_lines()}
    assert styles["DPKD-token alone"] == "--" and styles["DPKD-token"] == "-"
    plt.close("all")


def split_rows(adam=False):
    rows = []
    for method, lab, shares in (("sft", "SFT", {"ce": 0.74, "pt_ce": 0.26}),
                                ("dpkd_token", "DPKD-token", {"ce": 0.69, "distill": 0.05, "pt_ce": 0.15, "pt_kd": 0.11})):
        for term, share in shares.items():
            rows.append({"method": method, "label": lab, "term": term, "share": share, "share_sd": 0.01,
                         "gnorm": 1.0, "gcos": 0.9, "n_runs": 3, "n_probes": 12,
                         **({"adam_share": share * 0.8} if adam else {})})
    return pd.DataFrame(rows)


def test_update_split_figure_names_what_it_measures():
    fig = report.update_split_figure(split_rows())
    assert len(fig.axes) == 1 and "share of the raw gradient" in fig.axes[0].get_ylabel()
    assert "5 %" in texts(fig)
    fig = report.update_split_figure(split_rows(adam=True))
    assert len(fig.axes) == 2 and "AdamW update" in fig.axes[1].get_ylabel()
    table = report.split_table(split_rows(adam=True)).set_index("method")
    assert table.loc["DPKD-token", "objective term: % of gradient"] == "5" and table.loc["DPKD-token", "objective term: % of AdamW update"] == "4"
    assert table.loc["SFT", "objective term: % of gradient"] == "–" and table.loc["SFT", "runs × probes"] == "3 × 4"
    plt.close("all")


def test_buckets_figure_lets_the_methods_set_the_scale(monkeypatch):
    rows = []
    for method, rl in (("teacher", 45.0), ("student_init", 3.0), ("sft", 6.0), ("dpkd_token", 7.0)):
        for bucket, n in (("[0,5)", 50), ("[5,10)", 12)):
            rows.append({"method": method, "bucket": bucket, "n_examples": n, "rouge_l": rl, "rouge_l_sd": 0.5,
                         "exact_match": rl / 3, "exact_match_sd": float("nan"), "n_seeds": 1})
    monkeypatch.setattr(report, "buckets", lambda df, split, methods=None, edges=None: pd.DataFrame(rows))
    df = pd.DataFrame({"method": ["sft", "dpkd_token"], "objective": ["sft", "dpkd_token"]})
    fig = report.buckets_figure(df, ["teacher", "student_init", "sft", "dpkd_token"], ["test"])
    rouge = fig.axes[0]
    assert rouge.get_ylim()[1] < 45 and "teacher 45 ↑" in texts(fig)
    assert "ROUGE-L" in rouge.get_ylabel() and rouge.get_legend() is None and fig.legends
    plt.close("all")


def comparison(a, b, delta, lo, hi, verdict, level=0.95):
    return {"a": a, "b": b, "split": "test", "metric": "rouge_l", "delta": delta, "ci_lo": lo, "ci_hi": hi,
            "ci_level": level, "p_holm": 0.01 if verdict != "no difference shown" else 1.0, "verdict": verdict,
            "n_seeds": 3, "n_prompts": 150, "interval": "seeds", "mdd": 2.5}


def test_verdict_and_mechanism_words_follow_the_intervals():
    none = [comparison("dpkd_token", "sft", -0.1, -1.4, 1.3, "no difference shown"),
            comparison("dpkd_seq", "kd", 2.1, -1.3, 6.7, "no difference shown", 0.975)]
    text = report.verdict_text(none)
    assert text.startswith("**None of the 2 declared comparisons is called**")
    assert "ROUGE-L: the intervals leave open differences from -1.4 (DPKD-token − SFT, test) to +6.7 (DPKD-seq − KD, test)" in text
    # one training seed per method (cpu_full): no comparison is made, whatever the prompt-only intervals say
    single = [dict(comparison("dpkd_token", "kd", 0.27, 0.195, 0.345, "not compared (one seed)"), metric="kl",
                   n_seeds=1, interval="prompts")]
    text = report.verdict_text(single)
    assert text.startswith("**None of the 1 declared comparisons can be made here**") and "interval includes" not in text
    assert "not compared on test KL(teacher‖student): they share one training seed, so Δ = +0.270 [+0.195, +0.345]" in text
    one = [none[0], comparison("dpkd_seq", "kd", 2.1, 0.3, 6.7, "better", 0.975)]
    text = report.verdict_text(one)
    assert text.startswith("**1 of the 2 declared comparisons is called.**") and "DPKD-seq beats KD" in text
    moves = [moved("alone_sft", "test", 3.0, 0.2, 5.9, 39.0), moved("alone_kd", "test", 0.0, -2.1, 1.8, 39.0),
             moved("alone_dpkd_seq", "test", -3.6, -6.2, -1.5, 39.0), moved("alone_sft", "heldout", 3.3, 1.5, 5.6, 37.0)]
    words = report.mechanism_text(split_rows(), moves, "test")
    assert "DPKD-token's own term carries 5 % of the raw gradient; the two cross-entropy terms carry 84 %" in words
    assert "not the DPKD term, drive most of the update (the DPKD term at most 5 %)" in words
    assert "Alone (test ROUGE-L), SFT (alone) moved the starting student up, better (+3.0 [+0.2, +5.9]" in words.replace(
        "alone_sft", "SFT (alone)")
    assert "is not shown to move the starting student (+0.0 [-2.1, +1.8]" in words
    assert "moved the starting student down, worse (-3.6 [-6.2, -1.5]" in words
    nll = [dict(moved("alone_kd", "test", -0.384, -0.51, -0.26, -2.3), metric="nll")]
    assert "Alone (test NLL), KD alone moved the starting student down, better (-0.384 [-0.510, -0.260]" in \
        report.mechanism_text(None, nll, "test").replace("alone_kd", "KD alone")
    assert "heldout" not in words
    big = split_rows().assign(share=lambda d: d["share"].where(d["term"] != "distill", 0.6))
    assert "drive most" not in report.mechanism_text(big, [], "test")


def test_setup_table_and_title_line_come_from_the_params():
    line = study.runs_here("cpu", "01_gpt2_120m")
    assert line.startswith("01_gpt2_120m runs in the cpu profile: teacher SmolLM2-135M-Instruct + LoRA r16")
    assert "cut to its first 6 of 30 layers" in line and "synthetic Dolly-format" in line
    assert study.runs_here("cpu", "03_ablations_implicit_reward").startswith("03_ablations_implicit_reward is skipped")
    assert "Qwen/Qwen2.5-14B-Instruct (4bit)" in study.runs_here("colab", "02_lora_4bit")
    params = study.load_params(study.Path("params"), "cpu", "01_gpt2_120m")
    table = study.setup_table(study.NotebookConfig("cpu", "01_gpt2_120m", params, "r", True)).set_index("setup")
    assert "SFT ×4" in table.loc["arm: released mix", "in this run"]
    assert "80 steps, lr 0.0005, batch 8" in table.loc["arm: released mix", "in this run"]
    alone = table.loc["arm: objective alone", "in this run"]   # each objective at its own rate says so
    assert "DPKD-token alone, β 0.1 ×1 (lr 2e-05)" in alone and "KD alone ×1," in alone
    assert "80 steps, lr 0.0005 unless given, batch 8" in alone
    assert "nll and kl (greedy decoding for the scores)" in table.loc["declared", "in this run"]
    assert "Holm over 16 tests" in table.loc["declared", "in this run"]
    assert len(table) == 6


def test_lora_words_read_the_plan_the_step_times_and_the_moves_beside_full_precision():
    memory = pd.DataFrame({"run": ["l_sft_s1"] * 3, "phase": ["before training", "forward", "backward"],
                           "measured / planned": [float("nan"), 1.16, 0.96]})
    steps = pd.DataFrame({"run": ["l_sft_s1", "l_dpkd_token_s1"], "s / step": [3.5, 4.5], "against": ["sft_s1", "dpkd_token_s1"],
                          "its s / step": [1.75, 1.5], "ratio": [2.0, 3.0]})

    def mv(method, metric, delta, lo, hi):
        return {"method": method, "label": method, "split": "test", "metric": metric, "moved": delta,
                "moved_ci": (lo, hi), "n_seeds": 1, "gap": -2.3 if metric == "nll" else 39.0}
    moved = [mv("l_sft", "nll", -0.1, -0.12, -0.08), mv("sft", "nll", -0.4, -0.5, -0.3),
             mv("l_dpkd_token", "nll", -0.05, -0.07, -0.03), mv("dpkd_token", "nll", -0.5, -0.6, -0.4),
             mv("l_sft", "rouge_l", -1.5, -3.7, 0.7), mv("sft", "rouge_l", 3.1, -0.4, 6.6)]
    words = report.lora_words(memory, steps, moved, {"l_sft": "sft", "l_dpkd_token": "dpkd_token"})
    assert "in the 2 phases the planner covers, the measured peak was 0.96–1.16 times the plan" in words
    assert "2.0–3.0 times the seconds per step" in words and "l_sft_s1 3.50 s against 1.75 s" in words
    assert ("test NLL, change from the start through LoRA against full precision: SFT -0.100 [-0.120, -0.080] "
            "against -0.400 [-0.500, -0.300]; DPKD-token -0.050") in words
    assert "test ROUGE-L, change from the start through LoRA against full precision: SFT -1.5 [-3.7, +0.7] against +3.1" in words
    assert "moved NLL 10–25 % as far as full fine-tuning did" in words and "moved ROUGE-L" not in words
    table = report.moved_brief(moved)   # two readouts: a column per split and readout, each in its decimals
    assert list(table.columns[1:3]) == ["test NLL: change from the start [95%]", "test ROUGE-L: change from the start [95%]"]
    assert table.set_index("method").loc["l_sft", "test NLL: change from the start [95%]"].startswith("-0.100 [-0.120, -0.080]")


def test_ablation_words_set_a_one_seed_difference_against_the_seed_sd():
    def row(a, name, metric, split, delta, verdict="not compared (one seed)"):
        return {"a": a, "a_label": name, "b": "dpkd_token", "metric": metric, "split": split, "delta": delta,
                "verdict": verdict}
    comps = [row("abl_b", "token: β 0.5", "nll", "test", 0.061), row("abl_b", "token: β 0.5", "nll", "heldout", 0.082),
             row("abl_b", "token: β 0.5", "kl", "test", -0.014), row("abl_b", "token: β 0.5", "kl", "heldout", -0.019),
             row("abl_r", "token: reference-free", "nll", "test", 0.09), row("abl_r", "token: reference-free", "nll", "heldout", 0.07)]
    table = pd.DataFrame({"method": ["DPKD-token (reference)", "token: β 0.5", "token: reference-free"],
                          "grad weight": [0.04, 0.27, float("nan")]})
    sd = {("dpkd_token", "nll"): (0.033, "the pilot, 3 seeds on valid"), ("dpkd_token", "kl"): (0.057, "the pilot")}
    words = report.ablation_words(comps, table, sd)
    assert ("**token: β 0.5** against DPKD-token: NLL +0.061 (test), +0.082 (heldout) = 1.8–2.5 seed sd; "
            "KL(teacher‖student) -0.014 (test), -0.019 (heldout) = 0.2–0.3 seed sd; gradient weight 0.27 against "
            "the reference's 0.04.") in words
    assert "**token: reference-free** against DPKD-token: NLL +0.090 (test), +0.070 (heldout) = 2.1–2.7 seed sd." in words
    assert "not a finding): token: reference-free (NLL)." in words and "DPKD-token NLL 0.033 (the pilot, 3 seeds on valid)" in words
    # a compared ablation (several seeds) is not restated in seed sd
    called = [dict(r, verdict="no difference shown") for r in comps[:2]]
    assert "seed sd;" not in report.ablation_words(called, table, sd) and report.ablation_words([], table, sd) == ""
