"""The study notebooks: executed with papermill in the smoke profile, in order, into a temp
results root, exactly as `make reproduce PROFILE=smoke` does (through dpkd_lib.study).

Checks that every notebook runs, that the figure notebook writes the tables and figures it
builds from what 01-03 wrote (and needs no model to do so), that the driver reuses
unchanged notebooks, keeps failed copies and names the failing cell, and that the committed
notebooks carry no outputs and the parameters every profile needs.
"""
import ast
import json
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from dpkd_lib import experiments as ex
from dpkd_lib import study

pytestmark = pytest.mark.notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
STEMS = [p.stem for p in NOTEBOOKS]
PROFILES = ("smoke", "cpu", "cpu_long", "paper", "colab")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("study") / "results" / "smoke"
    status = study.run_study("smoke", results_root=root, log_output=False)
    return root, status


# ----------------------------------------------------------------------------- committed files

def test_there_are_five_notebooks_in_order():
    assert len(STEMS) == 5 and STEMS[0].startswith("00_") and STEMS[-1].startswith("04_")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=STEMS)
def test_committed_without_outputs_with_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    first = code[0].source
    assert "google.colab" in first and "KAGGLE_KERNEL_RUN_TYPE" in first and "pip" in first
    assert "upstream" in nb.metadata.get("dpkd", {})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=STEMS)
def test_parameter_defaults_are_the_cpu_profile(path):
    """The parameters cell runs the default profile as is when opened in JupyterLab."""
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    values = {}
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.Assign):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    assert values["profile"] == "cpu"
    cpu = yaml.safe_load((ROOT / "params" / "cpu" / f"{path.stem}.yaml").read_text())
    for key, value in cpu.items():
        assert values.get(key) == value, f"{path.stem}: parameter {key} differs from params/cpu"


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_has_params_for_every_notebook(profile):
    cpu_keys = {stem: set(yaml.safe_load((ROOT / "params" / "cpu" / f"{stem}.yaml").read_text()))
                for stem in STEMS}
    for stem in STEMS:
        params = study.load_params(ROOT / "params", profile, stem)
        if set(params) == {"skip"}:  # the profile leaves this notebook out
            continue
        assert set(params) == cpu_keys[stem], f"params/{profile}/{stem}.yaml keys differ from cpu"
        if "base_params" in params:
            assert (ROOT / params["base_params"]).exists()


@pytest.mark.parametrize("profile", ("smoke", "cpu"))
def test_every_run_config_of_the_offline_profiles_resolves(profile, tmp_path):
    """Every run the notebooks would start validates (types, ranges, keys) in milliseconds."""
    p = {stem: study.load_params(ROOT / "params", profile, stem) for stem in STEMS}
    main = p["01_gpt2_120m"]
    base = ROOT / main["base_params"]
    builds = [ex.as_overrides(main["teacher_build"]), ex.as_overrides(main["student_build"])]
    for ov in builds:
        ex.run_config(base, "x", ov, tmp_path)
    n = 0
    for _, ov, _ in ex.method_runs(main["methods"]):
        cfg = ex.run_config(base, "x", ex.as_overrides(main["common_overrides"]) + ov, tmp_path)
        assert cfg.train.max_steps > 0
        n += 1
    seeds = {m: len(s.get("seeds", [1])) for m, s in main["methods"].items()}
    assert set(seeds) == {"sft", "kd", "rkl", "jsd", "seqkd", "dpkd_token", "dpkd_seq"}
    if profile == "cpu":
        assert all(seeds[m] >= 3 for m in ("sft", "kd", "dpkd_token", "dpkd_seq"))
        steps = {ex.run_config(base, "x", ex.as_overrides(main["common_overrides"]) + ov, tmp_path).train.max_steps
                 for _, ov, _ in ex.method_runs(main["methods"])}
        assert len(steps) == 1, "every method must train the same number of steps"
    lora = p["02_lora_4bit"]
    for _, ov, _ in ex.method_runs(lora["methods"]):
        cfg = ex.run_config(ROOT / lora["base_params"], "x", ex.as_overrides(lora["common_overrides"]) + ov, tmp_path)
        assert cfg.teacher.quantization == "4bit" or cfg.train.objective == "sft"
        assert cfg.student.lora


def test_missing_params_file_is_a_clear_error(tmp_path):
    (tmp_path / "params" / "nowhere").mkdir(parents=True)
    with pytest.raises(study.StudyError, match=r"no params file .*nowhere/00_theory\.yaml"):
        study.run_study("nowhere", results_root=tmp_path / "res", params_dir=tmp_path / "params")


def test_select_by_prefix():
    assert [p.stem for p in study.select(NOTEBOOKS, "03")] == ["03_ablations_implicit_reward"]
    with pytest.raises(study.StudyError, match="matches no notebook"):
        study.select(NOTEBOOKS, "99")


def test_failed_notebook_is_kept_and_named(tmp_path):
    nbdir, pdir = tmp_path / "nb", tmp_path / "params" / "p"
    nbdir.mkdir()
    pdir.mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("y = x + 1"),
                nbformat.v4.new_code_cell("raise ValueError(f'boom {x}')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, nbdir / "00_fail.ipynb")
    (pdir / "00_fail.yaml").write_text("x: 7\n")
    res = tmp_path / "res"
    with pytest.raises(study.StudyError) as err:
        study.run_study("p", results_root=res, notebooks_dir=nbdir, params_dir=tmp_path / "params",
                        log_output=False)
    assert "00_fail" in str(err.value) and "ValueError: boom 7" in str(err.value) and "cell" in str(err.value)
    assert (res / "notebooks" / "00_fail.failed.ipynb").exists()
    assert not (res / "notebooks" / "00_fail.ipynb").exists()
    status = json.loads((res / "notebooks" / "status.json").read_text())
    assert status["notebooks"]["00_fail"]["status"] == "failed"


# ----------------------------------------------------------------------------- the smoke study

def test_every_notebook_executes_in_order(smoke):
    root, status = smoke
    out = root / "notebooks"
    for stem in STEMS:
        assert (out / f"{stem}.ipynb").exists(), stem
        assert not (out / f"{stem}.failed.ipynb").exists()
        entry = status["notebooks"][stem]
        assert entry["status"] == "finished" and entry["wall_s"] > 0
        executed = nbformat.read(out / f"{stem}.ipynb", as_version=4)
        assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
    assert not list(out.glob(".*.running.ipynb"))


def test_figures_notebook_wrote_tables_from_the_runs(smoke):
    root, _ = smoke
    main_params = study.load_params(ROOT / "params", "smoke", "01_gpt2_120m")
    abl_params = study.load_params(ROOT / "params", "smoke", "03_ablations_implicit_reward")
    tables, figures = root / "tables", root / "figures"
    for name in ("main", "main_numeric", "verdicts", "ablations", "lora_4bit", "buckets_test", "buckets_heldout"):
        assert (tables / f"{name}.csv").exists() and (tables / f"{name}.md").exists(), name
    for name in ("main_rouge_l", "buckets", "curves", "monitors_scatter", "theory_kl_modes",
                 "theory_token_vs_sequence"):
        assert (figures / f"{name}.png").stat().st_size > 1000, name
    main = pd.read_csv(tables / "main.csv")
    expected = ["teacher", "student (start)"] + [ex.DISPLAY[m] for m in main_params["methods"]]
    assert list(main["method"]) == expected
    # the table is exactly what the run folders say (04 reads only results/)
    df = ex.collect(root)
    again = ex.main_table(df, methods=["teacher", "student_init", *main_params["methods"]],
                          splits=("test", "heldout"), metrics=("rouge_l", "exact_match", "nll"))
    assert again.astype(str).values.tolist() == main.fillna("–").astype(str).values.tolist()
    assert main.set_index("method").loc["SFT", "seeds"] == len(main_params["methods"]["sft"]["seeds"])
    ablations = pd.read_csv(tables / "ablations.csv")
    assert len(ablations) == len(abl_params["ablations"]) + len(set(abl_params["reference_runs"].values()))
    verdicts = pd.read_csv(tables / "verdicts.csv")
    assert set(verdicts["verdict"]) <= {"better", "worse", "within noise", "cannot tell"}
    answer = ex.answer_text(verdicts.to_dict("records"), df[df["group"].isin(["main", "pair"])])
    assert (tables / "answer.md").read_text().strip() == answer and "gap" in answer
    assert (root / "notebooks" / "status.json").exists()


def test_every_run_is_finished_and_labelled(smoke):
    root, _ = smoke
    runs = [p for p in (root / "runs").iterdir() if p.is_dir()]
    assert len(runs) >= 2 + 11 + 2 + 9
    for run in runs:
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "finished", run.name
        labels = json.loads((run / "labels.json").read_text())
        assert labels["name"] == run.name and "overrides" in labels
        assert (run / "teacher_forced.json").exists()


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
    assert (copy / "tables" / "main.csv").exists() and (copy / "figures" / "curves.png").exists()


def test_notebook_run_by_hand_takes_its_profiles_params(tmp_path):
    """Opened in JupyterLab/Colab with profile edited in the parameters cell (no driver), a
    notebook loads params/<profile>/<notebook>.yaml itself."""
    import papermill as pm
    out = tmp_path / "00.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "00_theory.ipynb"), str(out), kernel_name="python3",
                        parameters={"profile": "smoke", "results_root": str(tmp_path / "res")},
                        cwd=str(ROOT), progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "profile 'smoke'" in text and "parameters from params/smoke/00_theory.yaml" in text
    setup = next(c for c in nb.cells if c.cell_type == "code" and "load_params(ROOT" in c.source)
    assert "00_theory" in setup.source
    assert (tmp_path / "res" / "figures" / "theory_kl_modes.png").exists()


def test_a_profile_can_skip_a_notebook(tmp_path):
    """`skip: <reason>` leaves a notebook out of a profile; the others still run, and a skip
    with other parameters beside it is an error before anything runs."""
    nbdir, pdir = tmp_path / "nb", tmp_path / "params" / "p"
    nbdir.mkdir()
    pdir.mkdir(parents=True)
    for stem, body in (("00_a", "y = x + 1"), ("01_b", "raise ValueError('must not run')")):
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell("x = 1")
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, nbformat.v4.new_code_cell(body)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, nbdir / f"{stem}.ipynb")
    (pdir / "00_a.yaml").write_text("x: 3\n")
    (pdir / "01_b.yaml").write_text("skip: not part of this profile\n")
    res = tmp_path / "res"
    status = study.run_study("p", results_root=res, notebooks_dir=nbdir, params_dir=tmp_path / "params",
                             log_output=False)
    assert status["notebooks"]["00_a"]["status"] == "finished"
    assert status["notebooks"]["01_b"] == {"status": "skipped", "reason": "not part of this profile"}
    assert not (res / "notebooks" / "01_b.ipynb").exists() and not (res / "notebooks" / "01_b.failed.ipynb").exists()
    (pdir / "01_b.yaml").write_text("skip: reason\nx: 2\n")
    with pytest.raises(study.StudyError, match="'skip' takes the reason"):
        study.run_study("p", results_root=res, notebooks_dir=nbdir, params_dir=tmp_path / "params",
                        log_output=False)


def test_cpu_long_is_the_cpu_pair_with_five_times_the_budget(tmp_path):
    """Same teacher and student builds as cpu, every method the same 150 steps over the 1200
    training examples, three seeds each, and the notebooks it leaves out are the cpu ones."""
    cpu, long = (study.load_params(ROOT / "params", p, "01_gpt2_120m") for p in ("cpu", "cpu_long"))
    assert long["teacher_build"] == cpu["teacher_build"] and long["student_build"] == cpu["student_build"]
    base = ROOT / long["base_params"]
    cfgs = [ex.run_config(base, "x", ex.as_overrides(long["common_overrides"]) + ov, tmp_path)
            for _, ov, _ in ex.method_runs(long["methods"])]
    assert {c.train.max_steps for c in cfgs} == {150} and {c.data.n_train for c in cfgs} == {1200}
    assert all(len(m["seeds"]) >= 3 for m in long["methods"].values())
    skipped = [s for s in STEMS if "skip" in study.load_params(ROOT / "params", "cpu_long", s)]
    assert skipped == ["02_lora_4bit", "03_ablations_implicit_reward"]
