"""dpkd_lib.study.runs: how a notebook's params become run configs, and that every run of every
profile's notebooks resolves (types, ranges, unused settings) in milliseconds."""
import json
from pathlib import Path

import pytest

from dpkd_lib.study import runs, driver as study
from dpkd_lib.choices import TEACHER_OBJECTIVES
from dpkd_lib.config import ConfigError, parse_slice, teacher_use

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("smoke", "cpu", "cpu_full", "paper", "colab")
SMOKE_BASE = ROOT / "params" / "smoke" / "base_train.yaml"


def test_method_runs_and_arm_labels():
    specs = runs.method_runs({"sft": {"seeds": [1, 2]}, "dpkd_token": {"seeds": [3], "overrides": {"train.beta": 0.5}}},
                             common={"train.max_steps": 7})
    assert [r[0] for r in specs] == ["sft_s1", "sft_s2", "dpkd_token_s3"]
    assert specs[2][1] == ["train.max_steps=7", "train.objective=dpkd_token", "train.seed=3", "train.beta=0.5"]
    assert specs[0][2] == {"method": "sft", "group": "main", "label": "SFT"}
    arm = runs.arm_runs("alone", {"prefix": "alone_", "label": "alone", "methods": {"kd": {"seeds": [1]}}})
    assert arm[0][0] == "alone_kd_s1" and arm[0][2]["group"] == "alone" and arm[0][2]["arm"] == "alone"
    assert runs.strip_seed("dpkd_seq_s12") == "dpkd_seq"


def test_run_config_gives_the_pair_to_the_runs_that_use_it(tmp_path):
    teacher = tmp_path / "t"
    teacher.mkdir()
    pair = {"teacher": {"source": "saved", "name_or_path": str(teacher)},
            "student": {"source": "tiny", "seed": 7}}
    kd = runs.run_config(SMOKE_BASE, "kd_s1", ["train.objective=kd", "teacher.quantization=4bit"], tmp_path, pair)
    assert kd.teacher.source == "saved" and kd.teacher.quantization == "4bit"   # the rest of the section stays
    assert kd.output_dir == str(tmp_path / "runs" / "kd_s1") and kd.cache_dir == str(tmp_path / "teacher_cache")
    assert kd.student.seed == 7 and kd.student.n_layer == 2                       # weight keys replaced
    sft = runs.run_config(SMOKE_BASE, "sft_s1", ["train.objective=sft"], tmp_path, pair)
    assert sft.teacher is None                                                    # SFT gets no teacher
    data = runs.run_config(SMOKE_BASE, "x", ["train.objective=sft", "train.train_on=teacher_samples"], tmp_path, pair)
    assert data.teacher is not None                                               # it samples from the teacher
    with pytest.raises(ConfigError, match="run 'x'.*unknown key 'train.objectiv'"):
        runs.run_config(SMOKE_BASE, "x", ["train.objectiv=kd"], tmp_path)


def notebook_runs(profile, tmp_path):
    """Every run config the notebooks of `profile` would start, resolved (and so validated)."""
    p = {stem: study.load_params(ROOT / "params", profile, stem)
         for stem in ("01_gpt2_120m", "02_lora_4bit", "03_ablations_implicit_reward")}
    main = p["01_gpt2_120m"]
    base = ROOT / main["base_params"]
    saved = tmp_path / "model"
    saved.mkdir(exist_ok=True)
    built = {role: ({"source": "saved", "name_or_path": str(saved)} if "build" in how else how["model"])
             for role, how in main["pair"].items()}
    # as runs.prepare_pair: the teacher first, the start beside it (a run that uses it gets it)
    out = {"pair": [runs.run_config(base, role, runs.as_overrides(how["build"]), tmp_path,
                                    {"teacher": built["teacher"]} if role == "student" else None)
                    for role, how in main["pair"].items() if "build" in how]}
    specs = [run for name, arm in main["arms"].items() for run in runs.arm_runs(name, arm)]
    out["arms"] = {name: runs.run_config(base, name, ov, tmp_path, built) for name, ov, _ in specs}
    out["labels"] = {name: labels for name, _, labels in specs}
    pilot = main.get("pilot") or {}
    out["pilot"] = [runs.run_config(base, "p", runs.as_overrides(v), tmp_path) for v in pilot.get("starts", {}).values()]
    lora = p["02_lora_4bit"]
    if "skip" not in lora:
        pair = built if lora["use_built_pair"] else None
        out["lora"] = [runs.run_config(ROOT / lora["base_params"], n, ov, tmp_path, pair) for n, ov, _ in
                       runs.arm_runs("lora", {"prefix": lora["run_prefix"], "common": lora["common"],
                                              "methods": lora["methods"]})]
    abl = p["03_ablations_implicit_reward"]
    out["ablations"] = []
    if "skip" not in abl:
        ov_of = {name: ov for name, ov, _ in specs}
        for name, ov, _ in runs.ablation_runs(abl["ablations"], abl["reference_runs"], ov_of.__getitem__):
            out["ablations"].append(runs.run_config(ROOT / abl["base_params"], name, ov, tmp_path,
                                                    built if abl["use_built_pair"] else None))
    return main, out


@pytest.mark.parametrize("profile", PROFILES)
def test_every_notebook_run_of_every_profile_resolves(profile, tmp_path):
    main, out = notebook_runs(profile, tmp_path)
    assert out["arms"] and all(c.train.max_steps > 0 for c in out["arms"].values())
    for cfg in out["arms"].values():
        uses = cfg.train.objective in TEACHER_OBJECTIVES or cfg.train.train_on == "teacher_samples"
        assert (cfg.teacher is not None) == (uses or bool(teacher_use(cfg)))   # no_distill: its pre-train KD
    assert all(c.student.lora for c in out.get("lora", []))
    declared = {m for pair in main["primary"]["comparisons"] for m in pair}
    released = set(main["arms"]["released"]["methods"])
    assert declared <= released, "the declared comparisons name methods of arm (a)"


@pytest.mark.parametrize("profile", ("smoke", "cpu", "cpu_full"))
def test_the_offline_design(profile, tmp_path):
    """Issue 13's design, as params: methods train on examples the builds never saw, every
    method of an arm trains the same steps, arm (b) has nothing mixed in, Algorithm 1 is there
    (the default cpu profile, about 3.4 h, holds both arms, DPKD-seq and Algorithm 1 included, 4 seeds per
    method of the declared comparisons; cpu_full holds what it cannot: RKL / JSD / SeqKD beside
    seed 1 of every arm-(a) method, which notebooks 02 and 03 start from)."""
    main, out = notebook_runs(profile, tmp_path)
    span = lambda c: (parse_slice(c.data.train_slice).start, parse_slice(c.data.train_slice).stop)  # noqa: E731
    method_slices = {span(c) for c in out["arms"].values()}
    assert len(method_slices) == 1
    (m,) = method_slices
    for b in {span(c) for c in out["pair"]}:
        assert b[1] is not None and m[0] is not None and b[1] <= m[0], "fresh data for the methods"
    for arm in main["arms"]:
        steps = {c.train.max_steps for n, c in out["arms"].items() if out["labels"][n]["group"] == arm}
        assert len(steps) == 1, f"arm {arm}: every method the same steps"
    seeds = {}
    for n, c in out["arms"].items():
        if out["labels"][n]["group"] == "released":
            seeds.setdefault(c.train.objective, set()).add(c.train.seed)
    if profile == "cpu":   # the pilot's power (primary.planned_mdd): 4 seeds per declared method
        assert all(len(seeds[o]) >= 4 for o in ("sft", "kd", "dpkd_token", "dpkd_seq"))
    if profile in ("cpu", "cpu_full"):
        assert all(1 in s for s in seeds.values())   # seed 1: notebooks 02 and 03 start from it
        assert all(c.train.grad_probe_every > 0 for c in out["arms"].values())
        assert {c.eval.max_examples for c in out["arms"].values()} == {150}       # every model, 150 + 150
        assert all(c.data.n_test >= 150 and c.data.n_heldout >= 150 for c in out["arms"].values())
    alone = {n: c for n, c in out["arms"].items() if out["labels"][n]["group"] == "alone"}
    token = [c.train for c in alone.values() if c.train.objective != "dpkd_seq"]
    assert sorted(t.objective for t in token) == ["dpkd_token", "dpkd_token", "kd", "sft"]
    assert sorted(t.beta for t in token if t.objective == "dpkd_token") == [0.1, 1.0]
    for c in alone.values():
        if c.train.pretrain_loss != "ce":   # nothing mixed in (Algorithm 1 is checked below)
            assert c.train.lm_coef == 0.0 and (c.train.objective == "sft" or c.train.kd_ratio == 1.0)
    if profile == "cpu":
        assert set(main["arms"]) == {"released", "alone"}
        assert set(seeds) == {"sft", "kd", "dpkd_token", "dpkd_seq", "no_distill"}, "RKL / JSD / SeqKD: cpu_full only"
        assert len(seeds["no_distill"]) >= 3   # the mix's control, seeded like the mix
    if profile == "cpu_full":   # what cpu cannot hold, at one seed each
        assert {"rkl", "jsd", "seqkd"} <= set(seeds) and all(s == {1} for s in seeds.values())
    if profile in ("cpu", "cpu_full"):
        assert [["dpkd_seq", "sft"], ["dpkd_seq", "kd"]] == main["primary"]["comparisons"][2:]
    assert len(seeds["dpkd_seq"]) >= (1 if profile == "cpu_full" else 2)
    alg1 = [c for c in alone.values() if c.train.pretrain_loss == "ce"]
    assert len(alg1) == 1 and alg1[0].train.objective == "dpkd_seq" and alg1[0].train.kd_ratio == 1.0
    for c in alone.values():
        if c is not alg1[0]:
            assert c.train.lm_coef == 0.0 and (c.train.objective == "sft" or c.train.kd_ratio == 1.0)


def test_the_declaration_is_checked_and_its_family_counts_every_metric():
    """primary: a key nothing reads is refused by name before any run; m (Holm's family) is
    metrics × pairs × splits, so declaring two readouts doubles it."""
    primary = {"metric": "rouge_l", "decoding": "greedy", "splits": ["test", "heldout"], "alpha": 0.05,
               "comparisons": [["dpkd_token", "sft"], ["dpkd_token", "kd"]]}
    assert runs.family_size(primary) == 4
    assert runs.family_size(dict(primary, metric=["nll", "kl"])) == 8
    assert runs.family_size(primary, ["test"]) == 2
    assert runs.check_primary(dict(primary, planned_mdd={"nll": 0.01})) is not None
    with pytest.raises(ConfigError, match=r"primary: unknown key\(s\) \['mdd'\]"):
        runs.check_primary(dict(primary, mdd=0.01))
    with pytest.raises(ConfigError, match=r"pilot: unknown key\(s\) \['lr_gird'\]"):
        runs.check_pilot({"run": False, "lr_gird": {}})
    arms = {"alone": {"methods": {"kd": {}}}}
    with pytest.raises(ConfigError, match=r"pilot.lr_grid.choose_on: 'NLL' is not a pilot readout \(greedy ROUGE-L, "):
        runs.check_pilot({"lr_grid": {"arm": "alone", "lrs": [1e-4], "choose_on": "NLL"}}, arms)
    for profile in PROFILES:   # every profile's own declaration passes
        main = study.load_params(ROOT / "params", profile, "01_gpt2_120m")
        runs.check_primary(main["primary"]) and runs.check_pilot(main.get("pilot") or {}, main.get("arms"))


def test_progress_lines_estimate_the_time_left(tmp_path):
    """One line per run and per notebook says how much is left. Runs: each run left at the
    time its committed record gives, scaled by the pace of the runs trained so far against
    their own records (else at the mean time of the runs trained so far). Notebooks: the time
    each took when it last ran (the driver's status, else papermill's duration in the executed
    copy) plus the recorded runs not trained here: a fresh clone's notebook 01 was last
    executed in seconds (its runs reused), but its runs took hours."""
    assert runs.eta_text([], [("a", 60.0)]) == ""
    assert runs.eta_text(["a", "b", "c"], []) == " · 3 runs to train"
    assert runs.eta_text(["a", "b", "c"], [("x", 60.0), ("y", 180.0)]) == " · 3 runs to train, about 6 min"
    recorded = {"sft": 100.0, "seq": 1000.0, "seq2": 1000.0}
    # priced from the records before anything is trained; then at this grid's pace (here half the record)
    assert runs.eta_text(["seq", "seq2"], [], recorded) == " · 2 runs to train, about 33 min"
    assert runs.eta_text(["seq", "seq2"], [("sft", 50.0)], recorded) == " · 2 runs to train, about 17 min"
    assert runs.eta_text(["seq", "new"], [("sft", 50.0)], recorded) == " · 2 runs to train, about 9 min"
    assert runs.eta_text(["seq"] * 9, [("sft", 100.0)], recorded) == " · 9 runs to train, about 2.5 h"
    (tmp_path / "01_x.ipynb").write_text(json.dumps({"metadata": {"papermill": {"duration": 1800.0}}}))
    status = {"notebooks": {"00_y": {"wall_s": 120.0}}}
    assert study.recorded_wall("01_x", status, tmp_path) == 1800.0
    assert study.recorded_wall("00_y", status, tmp_path) == 120.0
    assert study.recorded_wall("02_z", status, tmp_path) is None
    text = study._time_left(["01_x", "02_z"], status, tmp_path)
    assert text == ("it took 30 min last time; about 30 min left for the 2 notebook(s) to run "
                    "(02_z not counted: never run here)")
    assert study._time_left(["02_z"], status, tmp_path) == "no recorded time for it"
    root = tmp_path / "results"
    for name, wall in (("sft_s1", 1200.0), ("seq_s1", 6000.0), ("kept_s1", 600.0)):
        (root / "data" / name).mkdir(parents=True)
        (root / "data" / name / "summary.json").write_text(json.dumps({"wall_time_s": wall}))
    (root / "runs" / "kept_s1").mkdir(parents=True)   # finished here: reused, not counted
    (root / "runs" / "kept_s1" / "manifest.json").write_text(json.dumps({"status": "finished"}))
    (root / "runs" / "kept_s1" / "summary.json").write_text("{}")
    assert study._time_left(["01_x"], status, tmp_path, root) == (
        "it took 30 min last time; about 2.5 h left for the 1 notebook(s) to run "
        "(2 runs recorded in data/ but not trained here: 2.0 h at their recorded times)")


def test_a_study_continues_from_its_committed_record(tmp_path):
    """`make reproduce RESUME=1` on a machine that kept only git (results/<profile>/data, no
    run folders, no weights): the finished method runs are put back from their record and
    reused, not trained again; the pair is built again and must evaluate exactly as its
    record says, else the restored runs came from another pair and the study stops."""
    import gzip
    import shutil
    from dpkd_lib.study import rundata
    main = study.load_params(ROOT / "params", "smoke", "01_gpt2_120m")
    base, root = ROOT / main["base_params"], tmp_path / "res"
    grid = [("kd_s1", ["train.objective=kd", "train.seed=1"], {"method": "kd", "group": "main", "label": "KD"})]
    pair = runs.prepare_pair(base, root, main["pair"], progress=False)
    runs.run_grid(base, grid, root, pair=pair, progress=False, verbose=False)
    record = {p.name: p.read_bytes() for p in (root / "data" / "kd_s1").iterdir()}
    shutil.rmtree(root / "runs")                                   # a fresh clone: data/ only

    assert rundata.restore_runs(root) == ["kd_s1"]                 # the pair is not restored: no weights
    assert not (root / "runs" / "teacher").exists()
    assert runs.run_overrides(root, "kd_s1") == grid[0][1]         # an ablation of 03 starts from it
    pair = runs.prepare_pair(base, root, main["pair"], progress=False)   # rebuilt, and it matches its record
    again = runs.run_grid(base, grid, root, pair=pair, progress=False, verbose=False)[0]
    assert again == json.loads(record["summary.json"]) and not (root / "runs" / "kd_s1" / "metrics.jsonl").exists(), "reused, not trained"
    assert {p.name: p.read_bytes() for p in (root / "data" / "kd_s1").iterdir()} == record

    assert not (root / "runs" / rundata.PAIR_CHECK).exists(), "both checked, the check is done"

    # a pair that evaluates differently from its record (another machine, other code): refused,
    # and the restored runs go with the refusal, so the next attempt trains them from this pair
    shutil.rmtree(root / "runs")
    rows = rundata.read_eval_rows(root / "data" / "teacher")
    rows[0]["rouge_l"] = rows[0]["rouge_l"] + 0.5
    (root / "data" / "teacher" / rundata.EVAL_ROWS).write_bytes(
        gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), mtime=0))
    assert rundata.restore_runs(root) == ["kd_s1"]
    with pytest.raises(ConfigError, match="rebuilt teacher .* evaluates differently from its committed record"):
        runs.prepare_pair(base, root, main["pair"], progress=False)
    assert not (root / "runs" / "kd_s1").exists() and not (root / "runs" / rundata.PAIR_CHECK).exists()
    runs.prepare_pair(base, root, main["pair"], progress=False)   # the rebuilt pair stands
    runs.run_grid(base, grid, root, pair=runs.pair_from_results(root), progress=False, verbose=False)
    assert (root / "runs" / "kd_s1" / "metrics.jsonl").exists(), "trained again from this pair"
    # a restored run whose params changed holds no progress: it is replaced, not refused
    shutil.rmtree(root / "runs" / "kd_s1")
    assert rundata.restore_runs(root) == ["kd_s1"]
    changed = [(n, ov + ["train.max_steps=3"], lab) for n, ov, lab in grid]
    runs.run_grid(base, changed, root, pair=runs.pair_from_results(root), progress=False, verbose=False)
    assert json.loads((root / "data" / "kd_s1" / "summary.json").read_text()) != json.loads(record["summary.json"])
    with pytest.raises(ConfigError, match="--resume .* --force"):
        study.run_study("smoke", results_root=tmp_path / "x", resume=True, force=True, log_output=False)


def test_a_study_is_not_continued_on_another_model_of_machine(tmp_path, monkeypatch):
    """Another CPU's vector units give other sums (the same seeds moved NLL by up to 0.07 on
    two CPUs): the record's machine is compared before anything is restored or built."""
    from dpkd_lib import rundir
    from dpkd_lib.study import rundata
    record = tmp_path / "res" / "data" / "sft_s1"
    record.mkdir(parents=True)
    (record / "summary.json").write_text("{}")
    (record / "labels.json").write_text(json.dumps({"method": "sft", "group": "main"}))
    here = rundir.machine()
    (record / "manifest.json").write_text(json.dumps({"status": "finished", "machine": here}))
    assert rundata.restore_runs(tmp_path / "res") == ["sft_s1"]            # the same machine: restored
    (record / "manifest.json").write_text(json.dumps({"status": "finished", "machine": dict(
        here, cpu_model="Other CPU @ 1.00GHz", vector_extensions=["sse4_2", "avx2"])}))
    with pytest.raises(ConfigError, match=r"made on \('Other CPU @ 1.00GHz', \('sse4_2', 'avx2'\).*without RESUME=1"):
        rundata.restore_runs(tmp_path / "res")


def test_a_measured_run_keeps_its_record_when_its_memory_plan_cannot_be_made(capsys):
    """runs._with_plan: a run resumed past its last training step measured no batch (no plan,
    silently: there is nothing to plan for), and a plan that fails costs one line, never the
    measured peaks (the run's record is exported after it)."""
    measured = {"device": "cpu", "baseline_bytes": 1, "peak_bytes": 2, "phases": {"eval": {}}, "batch": {}}
    assert runs._with_plan(None, measured, "r_s1") == measured
    assert capsys.readouterr().out == ""
    measured["batch"] = {"seq_len": 8, "response_fraction": 0.5}
    assert runs._with_plan(object(), measured, "r_s1") == measured   # not a RunConfig: planning fails
    out = capsys.readouterr().out
    assert out.startswith("note: r_s1: no memory plan kept beside its measured peaks (AttributeError") and out.count("\n") == 1


def test_a_grid_of_reused_runs_says_so_in_one_line_each(tmp_path, capsys, caplog, monkeypatch):
    """A notebook's run cell reusing a grid after a code change once printed two lines per run
    (a "made by other code" note and the run's line): 28 lines for 14 runs. Now a streak of
    reused runs shares one line, followed (before the next run trains) by one note per recorded
    fingerprint naming its runs; a run retrained (a restored record whose params changed) has
    its own line; a run that fails does not lose the streak before it."""
    import logging
    from dpkd_lib import rundir
    from dpkd_lib.train import train
    main = study.load_params(ROOT / "params", "smoke", "01_gpt2_120m")
    base, root = ROOT / main["base_params"], tmp_path / "res"
    pair = runs.prepare_pair(base, root, main["pair"], progress=False)
    grid = [(f"sft_s{seed}", ["train.objective=sft", f"train.seed={seed}", "train.max_steps=1", "eval.splits=[]"])
            for seed in (1, 2, 3, 4, 5)]
    runs.run_grid(base, [grid[0], grid[1], grid[3], grid[4]], root, pair=pair, progress=False, verbose=False)
    for name, code in (("sft_s1", "0123456789ab"), ("sft_s2", "0123456789ab"), ("sft_s4", "ba9876543210")):
        manifest = root / "runs" / name / "manifest.json"
        manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), code=code)))
    (root / "runs" / "sft_s5" / rundir.RESTORED).write_text("")   # a record put back, then its params changed
    grid[4] = ("sft_s5", [*grid[4][1], "train.max_steps=2"])
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="dpkd_lib"):
        runs.run_grid(base, grid, root, pair=pair, progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[1-2/5] reused, finished earlier: sft_s1, sft_s2"
    assert lines[1].startswith("[3/5] sft_s3: 1 steps, ") and lines[2] == "[4/5] reused, finished earlier: sft_s4"
    assert lines[3].startswith("[5/5] sft_s5: 2 steps, ") and len(lines) == 4
    notes = [r.getMessage() for r in caplog.records if "other code" in r.getMessage()]
    assert len(notes) == 2, notes
    assert "2 finished runs (sft_s1, sft_s2) were made by other code (code fingerprint 0123456789ab" in notes[0]
    assert "the finished run sft_s4 was made by other code (code fingerprint ba9876543210" in notes[1]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpkd_lib"):   # outside a grid: one note per run, as before
        train(runs.run_config(base, "sft_s1", grid[0][1], root, pair), progress=False)
    assert [r.getMessage() for r in caplog.records if "other code" in r.getMessage()][0].startswith(
        f"note: the finished run in {root / 'runs' / 'sft_s1'} was made by other code")

    monkeypatch.setenv(rundir.STRICT_CODE_ENV, "1")   # sft_s1 is refused after sft_s3 was reused
    with pytest.raises(ConfigError, match="--strict-code refuses"):
        runs.run_grid(base, [grid[2], grid[0]], root, pair=pair, progress=False)
    assert capsys.readouterr().out.splitlines() == ["[1/2] reused, finished earlier: sft_s3"]
