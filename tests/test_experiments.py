"""Table, verdict and collection logic of dpkd_lib.experiments on fabricated run folders.

Every expected number here was worked out by hand (shown in the comments)."""
import json
import math

import pandas as pd
import pytest
import yaml

from dpkd_lib import experiments as ex


def fake_run(root, name, *, method, seed, objective=None, test_rl, test_em=0.0, heldout_rl=None,
             nll=None, group="main", finished=True, metrics=None, eval_rows=None):
    d = root / "runs" / name
    d.mkdir(parents=True)
    params = {"output_dir": str(d), "train": {"objective": objective or method, "seed": seed,
                                              "max_steps": 10, "beta": 0.1, "loss_type": "sigmoid"},
              "student": {"lora": False}, "teacher": {"quantization": "none"}}
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    (d / "manifest.json").write_text(json.dumps({"status": "finished" if finished else "running"}))
    summary = {"run_id": name, "valid_nll": 2.0, "valid_token_acc": 0.5, "wall_time_s": 12.0,
               "eval": {"test": {}}, "test_rouge_l": test_rl, "test_exact_match": test_em,
               "test_rouge_l_sd": 0.0, "test_response_tokens": 20.0, "test_distinct_2": 0.5, "test_n": 4}
    if heldout_rl is not None:
        summary["eval"]["heldout"] = {}
        summary.update(heldout_rouge_l=heldout_rl, heldout_exact_match=0.0)
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "labels.json").write_text(json.dumps({"name": name, "method": method, "group": group}))
    if nll is not None:
        (d / "teacher_forced.json").write_text(json.dumps(
            {"run_id": name, "splits": {"test": {"nll": nll, "token_acc": 0.6}}}))
    if metrics is not None:
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if eval_rows is not None:
        (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    return d


@pytest.fixture()
def results(tmp_path):
    # sft: 30, 31, 32 -> mean 31, sd 1 ; dpkd_token: 33, 34, 35 -> mean 34, sd 1
    # kd: 30.5, 31.5, 29.0 -> mean 30.333.., sd sqrt(((1/6)^2 + (7/6)^2 + (4/3)^2) / 2) = 1.2583
    for seed, v in zip((1, 2, 3), (30.0, 31.0, 32.0)):
        fake_run(tmp_path, f"sft_s{seed}", method="sft", seed=seed, test_rl=v, test_em=10.0 * seed,
                 nll=1.0 + 0.1 * seed)
    for seed, v in zip((1, 2, 3), (33.0, 34.0, 35.0)):
        fake_run(tmp_path, f"dpkd_token_s{seed}", method="dpkd_token", seed=seed, test_rl=v, heldout_rl=v - 10)
    for seed, v in zip((1, 2, 3), (30.5, 31.5, 29.0)):
        fake_run(tmp_path, f"kd_s{seed}", method="kd", seed=seed, test_rl=v)
    fake_run(tmp_path, "rkl_s1", method="rkl", seed=1, test_rl=28.0)
    fake_run(tmp_path, "teacher", method="teacher", seed=40, test_rl=60.0, group="pair")
    fake_run(tmp_path, "student_init", method="student_init", seed=40, test_rl=20.0, group="pair")
    fake_run(tmp_path, "broken_s1", method="sft", seed=9, test_rl=99.0, finished=False)
    return tmp_path


def test_mean_sd_by_hand():
    mean, sd, n = ex.mean_sd([24.3, 24.6, 24.9])
    assert n == 3 and mean == pytest.approx(24.6) and sd == pytest.approx(0.3)
    assert ex.fmt_mean_sd(mean, sd) == "24.6 ± 0.3"
    m1, s1, n1 = ex.mean_sd([7.0])
    assert (m1, n1) == (7.0, 1) and math.isnan(s1)
    assert ex.fmt_mean_sd(m1, s1) == "7.0"  # one seed: no fake "± 0.0"
    assert ex.fmt_mean_sd(float("nan"), float("nan")) == "–"
    assert ex.mean_sd([1.0, None, float("nan"), 3.0])[:2] == (2.0, pytest.approx(math.sqrt(2)))


def test_t_distribution_p_values():
    # Textbook quantiles: t(0.975, 4) = 2.776 -> p = 0.05 ; t(0.995, 10) = 3.169 -> p = 0.01
    assert ex.t_two_sided_p(2.776, 4) == pytest.approx(0.05, abs=5e-4)
    assert ex.t_two_sided_p(3.169, 10) == pytest.approx(0.01, abs=2e-4)
    assert ex.t_two_sided_p(1.95996, 1e7) == pytest.approx(0.05, abs=1e-4)  # normal limit
    assert ex.t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    assert ex.t_two_sided_p(-2.776, 4) == ex.t_two_sided_p(2.776, 4)


def test_welch_by_hand():
    # means 34 and 31, sds 1 and 1, n 3 and 3: t = 3 / sqrt(1/3 + 1/3) = 3.674,
    # dof = (2/3)^2 / ((1/3)^2/2 + (1/3)^2/2) = 4, two-sided p just above 0.02
    t, dof, p = ex.welch_t([33.0, 34.0, 35.0], [30.0, 31.0, 32.0])
    assert t == pytest.approx(3.0 / math.sqrt(2.0 / 3.0))
    assert dof == pytest.approx(4.0)
    assert 0.02 < p < 0.025
    assert all(math.isnan(v) for v in ex.welch_t([1.0], [2.0, 3.0]))


def test_collect_rows_and_columns(results):
    df = ex.collect(results)
    # 3 sft + 3 dpkd(x2 splits) + 3 kd + rkl + teacher + student_init; the running run is skipped
    assert len(df) == 3 + 6 + 3 + 1 + 2
    assert "broken_s1" not in set(df["run"])
    assert list(dict.fromkeys(df["method"])) == ["teacher", "student_init", "sft", "kd", "rkl", "dpkd_token"]
    row = df[(df["run"] == "sft_s2") & (df["split"] == "test")].iloc[0]
    assert row["rouge_l"] == 31.0 and row["exact_match"] == 20.0 and row["seed"] == 2
    assert row["nll"] == pytest.approx(1.2) and row["token_acc"] == 0.6
    assert row["objective"] == "sft" and row["wall_time_s"] == 12.0
    assert set(df.loc[df["method"] == "dpkd_token", "split"]) == {"test", "heldout"}


def test_main_table_mean_sd(results):
    df = ex.collect(results)
    table = ex.main_table(df, methods=["teacher", "sft", "kd", "rkl", "dpkd_token"],
                          splits=("test", "heldout"), metrics=("rouge_l", "exact_match"))
    by = table.set_index("method")
    assert by.loc["SFT", "test ROUGE-L"] == "31.0 ± 1.0"
    assert by.loc["SFT", "test EM"] == "20.0 ± 10.0"      # 10, 20, 30
    assert by.loc["KD", "test ROUGE-L"] == "30.3 ± 1.3"   # 30.333, 1.2583
    assert by.loc["DPKD-token", "heldout ROUGE-L"] == "24.0 ± 1.0"
    assert by.loc["SFT", "heldout ROUGE-L"] == "–"
    assert by.loc["RKL", "test ROUGE-L"] == "28.0" and by.loc["RKL", "seeds"] == 1
    assert by.loc["SFT", "seeds"] == 3
    assert list(table["method"]) == ["teacher", "SFT", "KD", "RKL", "DPKD-token"]


def test_noise_verdicts_say_it_plainly(results):
    df = ex.collect(results)
    v = ex.noise_verdict(df, "dpkd_token", "sft")
    assert v["verdict"] == "better" and v["delta"] == pytest.approx(3.0)
    assert v["pooled_sd"] == pytest.approx(1.0) and v["dof"] == pytest.approx(4.0)
    assert "beyond seed noise" in v["text"]
    v2 = ex.noise_verdict(df, "kd", "sft")   # -0.67 with sds ~1.26 and 1
    assert v2["verdict"] == "within noise" and "within seed noise" in v2["text"]
    assert v2["pooled_sd"] == pytest.approx(math.sqrt((1.2583057 ** 2 + 1.0) / 2), rel=1e-5)
    v3 = ex.noise_verdict(df, "rkl", "sft")
    assert v3["verdict"] == "cannot tell" and "fewer than two" in v3["text"]
    v4 = ex.noise_verdict(df, "sft", "dpkd_token")
    assert v4["verdict"] == "worse"


def test_lower_is_better_for_nll(tmp_path):
    for seed, v in zip((1, 2, 3), (1.0, 1.1, 1.2)):
        fake_run(tmp_path, f"a_s{seed}", method="a", seed=seed, test_rl=1.0, nll=v)
        fake_run(tmp_path, f"b_s{seed}", method="b", seed=seed, test_rl=1.0, nll=v + 2.0)
    df = ex.collect(tmp_path)
    assert ex.noise_verdict(df, "a", "b", metric="nll")["verdict"] == "better"


def test_bucket_table_averages_over_training_seeds(tmp_path):
    def rows(rl_short, rl_long):
        return [{"id": "a", "seed": 10, "split": "test", "rouge_l": rl_short, "exact_match": 1.0,
                 "response_tokens": 3, "reference_tokens": 3, "bucket": "[0,5)"},
                {"id": "b", "seed": 10, "split": "test", "rouge_l": rl_long, "exact_match": 0.0,
                 "response_tokens": 30, "reference_tokens": 50, "bucket": "[40,80)"}]
    fake_run(tmp_path, "sft_s1", method="sft", seed=1, test_rl=1, eval_rows=rows(0.2, 0.4))
    fake_run(tmp_path, "sft_s2", method="sft", seed=2, test_rl=1, eval_rows=rows(0.4, 0.6))
    table = ex.bucket_table(ex.collect(tmp_path), split="test")
    short = table[table["bucket"] == "[0,5)"].iloc[0]
    assert short["rouge_l"] == pytest.approx(30.0)            # (20 + 40) / 2
    assert short["rouge_l_sd"] == pytest.approx(math.sqrt(200.0))  # sd of 20, 40
    assert short["exact_match"] == pytest.approx(100.0) and short["n_seeds"] == 2
    assert list(table["bucket"]) == ["[0,5)", "[40,80)"]


def test_write_table_and_markdown(tmp_path):
    df = pd.DataFrame({"method": ["SFT", "a|b"], "x": [1.23456, float("nan")]})
    csv, md = ex.write_table(df, tmp_path / "tables" / "main")
    assert csv.read_text().splitlines()[0] == "method,x"
    text = md.read_text().splitlines()
    assert text[0] == "| method | x |" and text[2] == "| SFT | 1.23 |" and text[3] == "| a\\|b | – |"


def test_curves_and_savefig(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    for seed in (1, 2):
        fake_run(tmp_path, f"sft_s{seed}", method="sft", seed=seed, test_rl=1,
                 metrics=[{"step": s, "loss": 3.0 - 0.1 * s + seed, "ce": 1.0} for s in range(1, 6)])
    df = ex.collect(tmp_path)
    fig = ex.curves(df, metrics=("loss", "ce", "reward_margin"))
    path = ex.savefig(fig, tmp_path, "curves")
    assert path == tmp_path / "figures" / "curves.png" and path.stat().st_size > 1000
    mon = ex.final_monitors(df, last=2)
    assert mon.set_index("run").loc["sft_s1", "reward_margin"] != mon.set_index("run").loc["sft_s1", "reward_margin"]  # NaN
    assert mon.set_index("run").loc["sft_s1", "response_tokens"] == 20.0


def test_method_runs_and_specs():
    runs = ex.method_runs({"sft": {"seeds": [1, 2]}, "dpkd_token": {"seeds": [3], "overrides": ["train.beta=0.5"]}})
    assert [r[0] for r in runs] == ["sft_s1", "sft_s2", "dpkd_token_s3"]
    assert runs[2][1] == ["train.objective=dpkd_token", "train.seed=3", "train.beta=0.5"]
    assert runs[0][2]["method"] == "sft" and runs[0][2]["label"] == "SFT"
    assert ex.strip_seed("dpkd_seq_s12") == "dpkd_seq"


def test_run_config_paths_follow_results_root(tmp_path):
    from dpkd_lib.config import ConfigError
    base = "params/smoke/train.yaml"
    cfg = ex.run_config(base, "kd_s1", ["train.objective=kd"], tmp_path / "res")
    assert cfg.output_dir == str(tmp_path / "res" / "runs" / "kd_s1")
    assert cfg.train.cache_dir == str(tmp_path / "res" / "teacher_cache")
    with pytest.raises(ConfigError):
        ex.run_config(base, "x", ["train.objectiv=kd"], tmp_path)


def test_paper_table_has_the_papers_numbers():
    t = ex.paper_table()
    row = t[(t["set"] == "DollyEval")].iloc[0]
    assert row["DPKD-token"] == 24.6 and row["SFT"] == 23.3 and row["teacher"] == 27.6


def test_answer_text_words_each_pair_and_the_gap_closed():
    import pandas as pd
    verdicts = [
        {"a": "dpkd_token", "b": "sft", "split": "test", "metric": "rouge_l", "verdict": "within noise"},
        {"a": "dpkd_token", "b": "sft", "split": "heldout", "metric": "rouge_l", "verdict": "better"},
        {"a": "dpkd_seq", "b": "sft", "split": "test", "metric": "nll", "verdict": "worse"},
        {"a": "kd", "b": "sft", "split": "test", "metric": "rouge_l", "verdict": "within noise"},
    ]
    df = pd.DataFrame([
        {"method": "teacher", "split": "test", "rouge_l": 30.0},
        {"method": "student_init", "split": "test", "rouge_l": 10.0},
        {"method": "sft", "split": "test", "rouge_l": 12.0},
        {"method": "sft", "split": "test", "rouge_l": 14.0},
        {"method": "dpkd_token", "split": "test", "rouge_l": 15.0},
    ])
    lines = ex.answer_text(verdicts, df).splitlines()
    assert lines[0] == ("- **DPKD-token beats SFT** beyond seed noise on heldout ROUGE-L "
                        "(within noise on test ROUGE-L).")
    assert lines[1] == "- **DPKD-seq is worse than SFT** beyond seed noise on test NLL."
    assert lines[2] == "- **KD does not differ from SFT** beyond seed noise (within noise on test ROUGE-L)."
    assert lines[3] == ("- test ROUGE-L: the teacher is +20.0 above the starting student. Change from "
                        "the start, mean over seeds: SFT +3.0, DPKD-token +5.0. The best, DPKD-token, "
                        "closes 25 % of the gap.")


def test_curves_give_every_method_its_own_colour(tmp_path):
    """Twelve ablation lines: tab10 alone would draw two of them in one colour."""
    import matplotlib
    matplotlib.use("Agg")
    for i in range(12):
        fake_run(tmp_path, f"abl_{i}", method=f"abl_{i}", seed=1, test_rl=1,
                 metrics=[{"step": s, "loss": float(i + s)} for s in range(1, 4)])
    fig = ex.curves(ex.collect(tmp_path), metrics=("loss",))
    colours = [tuple(line.get_color()) for line in fig.axes[0].get_lines()]
    assert len(colours) == 12 and len(set(colours)) == 12
