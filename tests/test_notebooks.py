"""The study notebooks: the committed .ipynb files are the source; executed with papermill in
the smoke profile, in order, exactly as `make reproduce PROFILE=smoke` does (dpkd_lib.study.driver).

Checks that every notebook runs, that the figure notebook writes the tables, answer and
figures it builds from what 01-03 wrote (and needs no model to do so), that executed copies
carry no absolute path, that the driver reuses unchanged notebooks, keeps failed copies and
names the failing cell, and that every profile has params for every notebook.
"""
import ast
import json
import os
import shutil
import uuid
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from dpkd_lib.study import report, driver as study
from dpkd_lib.config import ConfigError, from_dict
from dpkd_lib.gpu import gpu_check

pytestmark = pytest.mark.notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
STEMS = [p.stem for p in NOTEBOOKS]
PROFILES = ("smoke", "cpu", "cpu_full", "paper", "colab")


@pytest.fixture(scope="module")
def smoke():
    """The smoke study into a results root inside the repo (as `make reproduce` writes it:
    notebooks see it as a relative path), removed afterwards."""
    root = ROOT / "results" / f".test-smoke-{uuid.uuid4().hex[:8]}"
    try:
        status = study.run_study("smoke", results_root=root, log_output=False)
        yield root, status
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- committed files

def test_there_are_five_notebooks_and_no_generator():
    assert len(STEMS) == 5 and STEMS[0].startswith("00_") and STEMS[-1].startswith("04_")
    assert not list((ROOT / "notebooks").glob("*.py")), "the notebooks are the source: no generator"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=STEMS)
def test_committed_without_outputs_with_a_user_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    (cell,) = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    values = {node.targets[0].id: ast.literal_eval(node.value)
              for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)}
    assert values == {"profile": "cpu", "results_root": None, "force": False}   # only what a user sets
    assert set(values) == set(study.INJECTED)
    # the first cell fetches the repo on Colab / Kaggle and hands over to tools/colab_setup.py
    # (tests/test_colab_setup.py runs it): short, the same in every notebook, collapsed
    first = nbformat.read(NOTEBOOKS[0], as_version=4).cells[0].source
    assert code[0].source == first and len(first.splitlines()) <= 15 and "tools/colab_setup.py" in first
    assert code[0].metadata.get("jupyter", {}).get("source_hidden")
    # settings by name: cfg = notebook_setup(...), then cfg.pair, cfg.arms; nothing poured into globals()
    assert code[2].source.splitlines()[-1] == f'cfg = notebook_setup(profile, "{path.stem}", results_root)'
    assert not any("globals()" in c.source for c in code)
    assert "upstream" in nb.metadata.get("dpkd", {})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=STEMS)
def test_title_cell_states_what_the_default_profile_runs(path):
    """The title cell says which pair on which data the default profile runs, in the words
    generated from the params (study.runs_here), so it cannot drift from them."""
    nb = nbformat.read(path, as_version=4)
    title = nb.cells[1]
    assert title.cell_type == "markdown" and title.source.startswith(f"# {path.stem[:2]} · ")
    assert study.runs_here("cpu", path.stem, ROOT / "params") in title.source


def test_notebook_setup_is_quiet_under_the_driver_and_live_in_jupyterlab():
    """Under the driver (DPKD_BATCH=1) every tqdm.auto bar is silent and library
    deprecation warnings are off; opened by hand the bar stays (cfg.progress)."""
    import subprocess
    import sys
    script = (
        "import warnings, tqdm.auto\n"
        "from dpkd_lib.study.driver import notebook_setup\n"
        "cfg = notebook_setup('smoke', '01_gpt2_120m')\n"
        "bar = tqdm.auto.tqdm(range(3), desc='bar-shown')\n"
        "list(bar); bar.close()\n"
        "warnings.warn('old api', FutureWarning)\n"
        "print('progress', cfg.progress, type(cfg.arms).__name__, cfg.results_root)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DPKD_BATCH", "TQDM_DISABLE")}   # conftest sets it
    live = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    batch = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(env, DPKD_BATCH="1"),
                           capture_output=True, text=True, timeout=300)
    assert live.returncode == batch.returncode == 0, live.stderr + batch.stderr
    assert "bar-shown" in live.stderr and "progress True dict results/smoke" in live.stdout
    assert "bar-shown" not in batch.stderr and "progress False dict results/smoke" in batch.stdout
    assert "FutureWarning" not in live.stderr + batch.stderr
    with pytest.raises(AttributeError, match=r"params/smoke/00_theory.yaml has no 'arms' \(it has: seed, steps\)"):
        study.NotebookConfig("smoke", "00_theory", {"seed": 0, "steps": 1}, "r", True).arms


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_has_params_for_every_notebook(profile):
    for stem in STEMS:
        params = study.load_params(ROOT / "params", profile, stem)
        if set(params) == {"skip"}:
            continue
        smoke = study.load_params(ROOT / "params", "smoke", stem)   # smoke runs every notebook
        assert set(params) == set(smoke), f"params/{profile}/{stem}.yaml keys differ from smoke's"
        if "base_params" in params:
            assert (ROOT / params["base_params"]).exists()


def test_missing_or_broken_params_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "params" / "nowhere").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no params file .*nowhere/00_theory\.yaml"):
        study.run_study("nowhere", results_root=tmp_path / "res", params_dir=tmp_path / "params")
    with pytest.raises(study.StudyError, match="matches no notebook"):
        study.select(NOTEBOOKS, "99")
    assert [p.stem for p in study.select(NOTEBOOKS, "03")] == ["03_ablations_implicit_reward"]


def _tiny_notebook(folder, stem, body):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("profile = 'p'\nresults_root = None\nforce = False")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / f"{stem}.ipynb")


def _tiny_profile(tmp_path, notebooks: dict):
    """Profile "p" of tiny notebooks ({stem: (body, params yaml)}) in tmp_path; returns their
    folder, the profile's params folder, the results root and `run` (run_study on them)."""
    nbdir, pdir, res = tmp_path / "nb", tmp_path / "params" / "p", tmp_path / "res"
    nbdir.mkdir()
    pdir.mkdir(parents=True)
    for stem, (body, params) in notebooks.items():
        _tiny_notebook(nbdir, stem, body)
        (pdir / f"{stem}.yaml").write_text(params)

    def run():
        return study.run_study("p", results_root=res, notebooks_dir=nbdir, params_dir=tmp_path / "params",
                               log_output=False)
    return nbdir, pdir, res, run


def test_failed_notebook_is_kept_and_named(tmp_path):
    _, _, res, run = _tiny_profile(tmp_path, {"00_fail": ("raise ValueError(f'boom {profile}')", "{}\n")})
    with pytest.raises(study.StudyError) as err:
        run()
    assert "00_fail" in str(err.value) and "ValueError: boom p" in str(err.value) and "cell" in str(err.value)
    assert (res / "notebooks" / "00_fail.failed.ipynb").exists()
    assert not (res / "notebooks" / "00_fail.ipynb").exists()
    status = json.loads((res / "notebooks" / "status.json").read_text())
    assert status["notebooks"]["00_fail"]["status"] == "failed"


def test_an_edited_text_cell_makes_the_executed_copy_stale(tmp_path):
    """The executed copy is what a reader opens: a changed sentence re-executes the notebook
    (a reused copy once kept the text it was run with), an unchanged notebook is reused."""
    nbdir, _, res, run_study = _tiny_profile(tmp_path, {"00_a": ("y = 1", "x: 3\n")})

    def run():
        run_study()
        return nbformat.read(res / "notebooks" / "00_a.ipynb", as_version=4)

    first = run()
    assert run().cells[1].outputs == first.cells[1].outputs   # unchanged: reused
    nb = nbformat.read(nbdir / "00_a.ipynb", as_version=4)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("## A section added after the first run"))
    nbformat.write(nb, nbdir / "00_a.ipynb")
    assert [c.source for c in run().cells if c.cell_type == "markdown"] == ["## A section added after the first run"]


def test_a_profile_can_skip_a_notebook(tmp_path):
    """`skip: <reason>` leaves a notebook out of a profile; the others still run, and a skip
    with other parameters beside it is an error before anything runs."""
    _, pdir, res, run = _tiny_profile(tmp_path, {"00_a": ("y = 1", "x: 3\n"),
                                                 "01_b": ("raise ValueError('must not run')",
                                                          "skip: not part of this profile\n")})
    status = run()
    assert status["notebooks"]["00_a"]["status"] == "finished"
    assert status["notebooks"]["01_b"] == {"status": "skipped", "reason": "not part of this profile"}
    assert not (res / "notebooks" / "01_b.ipynb").exists() and not (res / "notebooks" / "01_b.failed.ipynb").exists()
    (pdir / "01_b.yaml").write_text("skip: reason\nx: 2\n")
    with pytest.raises(ConfigError, match="'skip' takes the reason"):
        run()


# ----------------------------------------------------------------------------- the smoke study

def _markdown_outputs(path) -> list[str]:
    """The Markdown a notebook displayed, one string per output (unescaped, unlike _outputs_text)."""
    nb = nbformat.read(path, as_version=4)
    return [o.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", [])]


def _outputs_text(path):
    nb = nbformat.read(path, as_version=4)
    parts = [json.dumps(nb.metadata)]
    for c in nb.cells:
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            parts.append(json.dumps(o))
    return "\n".join(parts)


def test_every_notebook_executes_in_order_with_no_absolute_path(smoke):
    root, status = smoke
    out = root / "notebooks"
    for stem in STEMS:
        assert (out / f"{stem}.ipynb").exists(), stem
        assert not (out / f"{stem}.failed.ipynb").exists()
        entry = status["notebooks"][stem]
        assert entry["status"] == "finished" and entry["wall_s"] > 0
        text = _outputs_text(out / f"{stem}.ipynb")
        assert any(c.get("outputs") for c in nbformat.read(out / f"{stem}.ipynb", as_version=4).cells
                   if c.cell_type == "code")
        for machine_path in (str(ROOT), "/tmp/", os.path.expanduser("~") + "/", "site-packages"):
            assert machine_path not in text, f"{stem}: executed copy holds {machine_path!r}"
        assert f'"results_root": "results/{root.name}"' in text   # injected relative to the repo root
    assert not list(out.glob(".*.running.ipynb"))


def test_executed_notebooks_are_quiet_and_compact(smoke):
    """No progress-bar walls, no leaked warnings, no raw DataFrame dumps, no long output:
    what a reader of the executed copy sees is tables, figures and one line per run."""
    root, _ = smoke
    for stem in STEMS:
        nb = nbformat.read(root / "notebooks" / f"{stem}.ipynb", as_version=4)
        for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
            text = ""
            for out in cell.get("outputs", []):
                assert out.get("name") != "stderr", f"{stem} code cell {i}: stderr output {out.get('text', '')[:200]!r}"
                assert "text/html" not in out.get("data", {}), f"{stem} code cell {i}: a raw DataFrame"
                text += out.get("text", "") + out.get("data", {}).get("text/markdown", "")
            assert "it/s]" not in text and "%|" not in text, f"{stem} code cell {i}: a progress bar"
            assert "Warning" not in text, f"{stem} code cell {i}: {text[:300]}"
            assert len(text.splitlines()) <= 40, f"{stem} code cell {i}: {len(text.splitlines())} lines"


def test_figures_notebook_wrote_the_answer_from_the_runs(smoke):
    root, _ = smoke
    main_params = study.load_params(ROOT / "params", "smoke", "01_gpt2_120m")
    abl_params = study.load_params(ROOT / "params", "smoke", "03_ablations_implicit_reward")
    primary, arms = main_params["primary"], main_params["arms"]
    tables, figures = root / "tables", root / "figures"
    for name in ("main_released", "main_alone", "main_numeric", "comparisons", "update_split", "ablations",
                 "lora_4bit", "buckets_test", "buckets_heldout"):
        assert (tables / f"{name}.csv").exists() and (tables / f"{name}.md").exists(), name
    for name in ("main_moved", "comparisons", "update_split", "buckets", "curves", "monitors_scatter",
                 "theory_kl_modes", "theory_token_vs_sequence"):
        assert (figures / f"{name}.png").stat().st_size > 1000, name
    main = pd.read_csv(tables / "main_released.csv")
    assert list(main["method"])[:2] == ["teacher", "student (start)"]
    assert len(main) == 2 + len(arms["released"]["methods"])
    assert main.set_index("method").loc["SFT", "seeds"] == len(arms["released"]["methods"]["sft"]["seeds"])
    # the answer is exactly what the run folders imply (04 reads only results/)
    df = report.collect(root)
    runs = df[df["group"].isin(["pair", *arms])]
    every_method = [arm.get("prefix", "") + m for arm in arms.values() for m in arm["methods"]]
    labels = dict(zip(df["method"], df["label"]))
    metrics = report.as_list(primary["metric"])
    assert metrics == ["nll", "kl"], "smoke declares both teacher-forced readouts"
    comps, moved = report.compare_all(runs, primary), []
    for metric in metrics:   # every declared metric is read, each from its own per-prompt rows
        ex = report.per_example(runs, metric=metric, decoding=primary["decoding"])
        assert {"teacher", "student_init", "sft"} <= set(ex["method"]), metric   # the start and teacher read too
        moved += [m for s in primary["splits"] for m in report.gap_closed(ex, every_method, s, labels=labels,
                                                                          metric=metric)]
    assert {(r["metric"], r["a"], r["b"]) for r in comps} == {
        (m, a, b) for m in metrics for a, b in primary["comparisons"]}
    assert {m["method"] for m in moved} >= {"alone_sft", "sft"} and "SFT (alone)" in report.answer_text([], moved)
    assert {m["metric"] for m in moved} == set(metrics)
    assert (tables / "answer.md").read_text().strip() == report.answer_text(comps, moved)
    # notebook 01 states the same verdict, generated from the same intervals
    shown = _markdown_outputs(root / "notebooks" / "01_gpt2_120m.ipynb")
    assert report.verdict_text(comps) in shown
    assert len(pd.read_csv(tables / "comparisons.csv")) == len(metrics) * len(primary["comparisons"]) * len(
        primary["splits"])
    ablations = pd.read_csv(tables / "ablations.csv")
    assert len(ablations) == len(abl_params["ablations"]) + len(set(abl_params["reference_runs"].values()))
    assert "grad weight" in ablations
    # an ablation run on two seeds is compared with its reference on both (t over the seeds),
    # one on one seed is not compared; each against its own base method
    cmp = pd.read_csv(tables / "ablation_comparisons.csv")
    assert len(cmp) == len(metrics) * len(abl_params["ablations"]) * len(abl_params["primary_splits"])
    two = cmp[cmp["a"] == "token: β 0.5"]
    assert set(two["interval"]) == {"seeds"} and set(two["seeds"]) == {"1,2"} and (two["b"] == "DPKD-token").all()
    assert set(cmp[cmp["a"] != "token: β 0.5"]["verdict"]) == {"not compared (one seed)"}
    assert set(cmp[cmp["a"].str.startswith("seq")]["b"]) == {"DPKD-seq"}
    split = pd.read_csv(tables / "update_split.csv")
    sums = split.groupby("method")["share"].sum()
    assert ((sums - 1).abs() < 1e-4).all(), "each method's update shares sum to one (fp32 norms)"


def test_every_run_is_finished_and_labelled(smoke):
    root, _ = smoke
    runs = [p for p in (root / "runs").iterdir() if p.is_dir()]
    assert len(runs) >= 2 + 17 + 2 + 10
    for run in runs:
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "finished", run.name
        labels = json.loads((run / "labels.json").read_text())
        assert labels["name"] == run.name
        summary = json.loads((run / "summary.json").read_text(), parse_constant=pytest.fail)
        assert "eval" in summary


def test_rerun_reuses_everything(smoke):
    root, status = smoke
    again = study.run_study("smoke", results_root=root, log_output=False)
    assert again["last_invocation"]["executed"] == []
    for stem in STEMS:
        assert again["notebooks"][stem]["token"] == status["notebooks"][stem]["token"]


def test_figures_notebook_needs_no_model(smoke, tmp_path):
    """04 reads only results/: it runs on a copy of the results without any model folder."""
    root, _ = smoke
    copy = tmp_path / "smoke"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("model", "checkpoints", "teacher_cache"))
    for table in (copy / "tables").glob("*"):
        table.unlink()
    status = study.run_study("smoke", results_root=copy, only="04", force=True, log_output=False)
    assert status["notebooks"]["04_figures"]["status"] == "finished"
    assert (copy / "tables" / "main_released.csv").exists() and (copy / "figures" / "curves.png").exists()


def test_every_table_and_figure_rebuilds_from_the_exported_data_alone(smoke, tmp_path):
    """`python -m dpkd_lib.study.report rebuild` (make tables) on a copy of the study's data/ alone,
    no run folder, no model, no table: every table the notebooks wrote comes back identical,
    and every figure built from runs (the theory figures of 00 come from formulas)."""
    import subprocess
    import sys
    root, _ = smoke
    copy = tmp_path / "smoke"
    shutil.copytree(root / "data", copy / "data")
    assert {p.name for p in (copy / "data").iterdir() if p.is_dir()} == \
        {p.name for p in (root / "runs").iterdir() if p.is_dir()}
    done = subprocess.run([sys.executable, "-m", "dpkd_lib.study.report", "rebuild", str(copy), "--profile", "smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    written = sorted((root / "tables").iterdir())
    assert len(written) >= 19                 # main_*, comparisons, answer, buckets_*, ablations, ...
    for table in written:
        assert (copy / "tables" / table.name).read_text() == table.read_text(), table.name
    for name in ("moved.csv", "moved.md"):   # the change from the start, one row per method x split
        assert (copy / "tables" / name).exists()
    for fig in (root / "figures").glob("*.png"):
        if not fig.name.startswith("theory_"):
            assert (copy / "figures" / fig.name).stat().st_size > 1000, fig.name
    assert json.loads((copy / "data" / report.DESIGN_FILE).read_text())["profile"] == "smoke"
    # each run's summary agrees with its own per-prompt rows (the rows are what the tables rest on)
    df = report.collect(copy)
    ex = report.per_example(df, metric="rouge_l")
    for (run, split), g in ex.groupby(["run", "split"]):
        row = df[(df["run"] == run) & (df["split"] == split)].iloc[0]
        assert g["num"].mean() == pytest.approx(row["rouge_l"], abs=1e-9), (run, split)


def test_notebook_run_by_hand_takes_its_profiles_params(tmp_path):
    """Opened in JupyterLab with `profile` edited in the parameters cell (no driver), a
    notebook reads params/<profile>/<notebook>.yaml itself."""
    import papermill as pm
    out = tmp_path / "00.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "00_theory.ipynb"), str(out), kernel_name="python3",
                        parameters={"profile": "smoke", "results_root": str(tmp_path / "res")},
                        cwd=str(ROOT / "notebooks"), progress_bar=False)
    text = _outputs_text(out)
    assert "profile 'smoke': params/smoke/00_theory.yaml" in text
    assert (tmp_path / "res" / "figures" / "theory_kl_modes.png").exists()


# ----------------------------------------------------------------------------- GPU profiles on CPU

#: every run of a GPU profile shrunk to a CPU-sized path check: synthetic data (Dolly needs the
#: network), two steps, two prompts; everything else (pairs from hub ids, 4-bit, LoRA, caches,
#: sampling seeds, the notebooks' own overrides) is the profile's
GPU_PROFILE_SHRINK = (
    "data.source=synthetic", "data.n_train=16", "data.n_valid=2", "data.n_test=2", "data.n_heldout=2",
    "data.min_response_tokens=0", "data.pretrain_max_blocks=4", "train.max_steps=2",
    "train.t_max_steps=0", "train.batch_size=2", "train.save_every=0", "train.eval_every=0",
    "eval.max_examples=2", "eval.batch_size=2", "eval.max_new_tokens=8", "train.grad_probe_every=1")
#: 00 is the same toy computation in every profile (smoke runs its code). 03 is smoke's ablation
#: set (paper extends cpu_full, which extends smoke) on the pair 01 loads: smoke executes its
#: cells, and every profile's ablation runs resolve in test_runs (they took 100 s of the suite
#: here, a fifth of this test). colab's 01 and 03 are paper's on colab's base, which on a CPU
#: differs from paper's only in sizes (dtype auto is fp32 there): its own paths are 01's pair and
#: 02's QLoRA
GPU_PROFILE_NOTEBOOKS = {"paper": ["01_gpt2_120m", "02_lora_4bit", "04_figures"],
                         "colab": ["01_gpt2_120m", "02_lora_4bit", "04_figures"]}


@pytest.mark.parametrize("profile", ("paper", "colab"))
def test_gpu_profile_notebooks_execute_on_cpu_with_standins(profile, monkeypatch):
    """The paper and colab notebooks under papermill as `make reproduce` runs them, with hub
    ids built as scaled-down random stand-ins (DPKD_STANDINS) and every run shrunk
    (DPKD_CHECK_OVERRIDES): a notebook step those profiles need cannot rot unseen."""
    from dpkd_lib.study import runs
    monkeypatch.setenv("DPKD_STANDINS", "24,64")
    monkeypatch.setenv(runs.CHECK_OVERRIDES_ENV, ";".join(GPU_PROFILE_SHRINK))
    root = ROOT / "results" / f".test-{profile}-{uuid.uuid4().hex[:8]}"
    stems = GPU_PROFILE_NOTEBOOKS[profile]
    try:
        for stem in stems:
            status = study.run_study(profile, only=stem, results_root=root, log_output=False)
        assert {s: e["status"] for s, e in status["notebooks"].items()} == {s: "finished" for s in stems}
        assert "DPKD_STANDINS=24,64" in _outputs_text(root / "notebooks" / "01_gpt2_120m.ipynb")
        run_dirs = [p for p in (root / "runs").iterdir() if (p / "params.yaml").exists()]
        assert len(run_dirs) >= 15
        for run_dir in run_dirs:
            manifest = json.loads((run_dir / "manifest.json").read_text())
            assert manifest["status"] == "finished", run_dir.name
        for table in ("main_released", "main_alone", "comparisons", "update_split", "lora_4bit"):
            assert len(pd.read_csv(root / "tables" / f"{table}.csv")), table
        assert (root / "tables" / "answer.md").read_text().strip()
        lora = pd.read_csv(root / "tables" / "lora_4bit.csv")
        assert len(lora) >= 2      # SFT and DPKD-token with the 4-bit teacher and a LoRA student
        # the teacher signals came from stand-ins, never from a download
        assert any("standin:" in p.read_text() for p in (root / "teacher_cache").rglob("*.json"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_pilot_reads_valid_only_and_sizes_the_design_from_its_rows(smoke):
    """Notebook 01's pilot stage 2 (runs.pilot_runs) in the smoke study: every pilot run read
    the valid split only; the rerun changed what it says (threads); each readout's seed sd is
    the sd of the runs' own summaries; the design table's Δ of reference NLL is rebuilt by hand
    from the per-prompt rows (per seed Σnll/Σtokens, a − b, mean over the seeds both ran) and
    its mdd falls as seeds grow; the learning-rate table and the chosen rate follow the runs."""
    import gzip
    import statistics
    import yaml
    root, _ = smoke
    data = root / "data"
    pilot_runs = [p for p in data.iterdir() if p.name.startswith("pilot_")]
    assert len(pilot_runs) >= 6 + 1 + 4
    for run in pilot_runs:
        assert list(json.loads((run / "summary.json").read_text())["eval"]) == ["valid"], run.name
    threads = lambda name: yaml.safe_load((data / name / "params.yaml").read_text())["threads"]  # noqa: E731
    assert (threads("pilot_rerun_sft_s1"), threads("pilot_var_sft_s1")) == (2, 1)

    pf = report.pilot_frame(root)
    noise = report.pilot_noise(pf)
    summary = lambda name: json.loads((data / name / "summary.json").read_text())  # noqa: E731
    nll = {s: summary(f"pilot_var_sft_s{s}")["valid_nll"] for s in (1, 2)}
    row = noise[(noise["readout"] == "reference NLL") & (noise["method"] == "SFT")].iloc[0]
    assert row["seed sd"] == pytest.approx(statistics.stdev(nll.values()))
    start = summary("pilot_start_student_init")["valid_nll"]
    assert row["move from start"] == pytest.approx(statistics.mean(nll.values()) - start)
    assert row["rerun Δ"] == pytest.approx(summary("pilot_rerun_sft_s1")["valid_nll"] - nll[1], abs=1e-9)
    assert noise[noise["method"] == "KD"]["rerun Δ"].isna().all()   # no rerun of KD: nothing claimed

    def ratio(name):
        rows = [json.loads(line) for line in gzip.open(data / name / "eval_rows.jsonl.gz", "rt")]
        tf = [r for r in rows if r["decoding"] == "teacher_forced"]
        return sum(r["nll_sum"] for r in tf) / sum(r["n_tokens"] for r in tf)
    design = report.pilot_design(pf, [["dpkd_token", "sft"], ["dpkd_token", "kd"]], m=4)
    d = design[(design["readout"] == "reference NLL") & (design["comparison"] == "DPKD-token − SFT")].iloc[0]
    assert d["Δ"] == pytest.approx(statistics.mean(ratio(f"pilot_var_dpkd_token_s{s}") - ratio(f"pilot_var_sft_s{s}")
                                                   for s in (1, 2)), abs=1e-9)
    mdds = [d[f"mdd S={s}"] for s in (3, 4, 5, 6, 8)]
    assert all(a > b > 0 for a, b in zip(mdds, mdds[1:]))

    lrs = report.pilot_lrs(pf)
    assert len(lrs) == 1 + 2 * 2 and lrs.iloc[0]["objective"] == "start"
    kl = {lr: summary(f"pilot_lr_kd_{lr}_s1")["valid_kl"] for lr in ("0.001", "0.002")}
    assert report.pilot_chosen_rates(pf, "KL(teacher‖student)")["kd"] == float(min(kl, key=kl.get))
    # the rate each arm-(b) method trains at, beside the grid's best on the declared readout
    nll_kd = {lr: summary(f"pilot_lr_kd_{lr}_s1")["valid_nll"] for lr in ("0.001", "0.002")}
    rates = pd.read_csv(root / "tables" / "pilot_rates.csv", dtype=str).set_index("objective")
    assert rates.loc["KD", "best on valid (reference NLL)"] == min(nll_kd, key=nll_kd.get)
    assert rates.loc["SFT", "best on valid (reference NLL)"] == "not in the grid"
    assert (root / "tables" / "pilot_design.csv").exists() and (root / "tables" / "pilot_lrs.csv").exists()


def test_lora_notebook_measures_memory_and_step_time_beside_the_plan(smoke):
    """Notebook 02 trains with run_grid(measure=True): each run's memory.json (exported with its
    record) gives the measured peak per phase, which the tables set beside the planner's bytes
    for the same shapes; its time per step is set beside notebook 01's full-precision run of
    the same method and seed."""
    root, _ = smoke
    mem = pd.read_csv(root / "tables" / "lora_4bit_memory.csv")
    lora_runs = {p.name for p in (root / "data").iterdir() if p.name.startswith("lora4bit_")}
    assert set(mem["run"]) == lora_runs and len(lora_runs) == 2
    for run in lora_runs:
        record = json.loads((root / "data" / run / "memory.json").read_text())
        assert record["device"] == "cpu" and record["peak_bytes"] > record["baseline_bytes"] > 0
        steps = mem[(mem["run"] == run) & mem["phase"].isin(["forward", "backward", "optimizer"])]
        assert len(steps) == 3
        assert ((steps["measured / planned"] > 0.5) & (steps["measured / planned"] < 2.0)).all(), steps
        assert steps["measured GiB"].tolist() == pytest.approx(
            [record["phases"][p]["peak_bytes"] / 2 ** 30 for p in steps["phase"]], abs=1e-3)
        # the plan is kept in the record beside the peaks: a saved model's shapes come from its
        # folder, which a committed record (and a rebuild from it) has not
        assert steps["planned GiB"].tolist() == pytest.approx(
            [record["planned_bytes"][p] / 2 ** 30 for p in steps["phase"]], abs=1e-3)
        params = yaml.safe_load((root / "runs" / run / "params.yaml").read_text())
        assert record["planned_bytes"] == gpu_check.planned_bytes(from_dict(params), record)
    times = pd.read_csv(root / "tables" / "lora_4bit_step_time.csv")
    assert sorted(times["against"]) == ["dpkd_token_s1", "sft_s1"]
    assert (times["s / step"] > 0).all() and (times["its s / step"] > 0).all()
    # the notebook reads its tables in words: the plan's ratio range and the step-time ratios it shows
    text = "\n".join(_markdown_outputs(root / "notebooks" / "02_lora_4bit.ipynb"))
    ratios = mem["measured / planned"].dropna()
    assert f"the measured peak was {ratios.min():.2f}–{ratios.max():.2f} times the plan" in text
    assert f"{times['ratio'].min():.1f}–{times['ratio'].max():.1f} times the seconds per step" in text
    assert "NLL, change from the start through LoRA against full precision: DPKD-token" in text


def test_ablation_notebook_reads_each_ablation_beside_its_gradient_weight_and_seed_noise(smoke):
    """Notebook 03 ends with its reading in words (report.ablation_words): one line per
    ablation with its differences from its reference and its gradient weight beside the
    reference's, and the seed sd it is measured against."""
    root, _ = smoke
    text = "\n".join(_markdown_outputs(root / "notebooks" / "03_ablations_implicit_reward.ipynb"))
    params = study.load_params(ROOT / "params", "smoke", "03_ablations_implicit_reward")
    for spec in params["ablations"].values():
        assert f"**{spec['label']}** against " in text
    assert "gradient weight" in text and "Seed sd used as the yardstick" in text
