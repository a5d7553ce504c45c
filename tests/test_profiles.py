"""Every profile's path, proven on a CPU: each run config the profiles give (their base params
and what runs.run_config makes of them for every objective, as the notebooks call it) is
resolved and validated, its tokenizer, teacher and student are built — hub checkpoints as
scaled-down stand-ins of the same architecture classes (GPT-2, Qwen2, Llama; 4-bit where
the profile quantises) — and the offline profiles train a step through train.train. The GPU
profiles' training step runs in tests/test_gpu_check.py (the GPU check's CPU path, which is
train.train on their params). A function a profile needs can no longer hide behind a profile
that CI never runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpkd_lib import models
from dpkd_lib.study import runs
from dpkd_lib.gpu import standins
from dpkd_lib.choices import OBJECTIVES, TEACHER_OBJECTIVES, TOKEN_OBJECTIVES
from dpkd_lib.config import load_yaml, teacher_use
from dpkd_lib.tokenization import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
#: base params: every params file that is not a notebook's (0*.yaml)
BASES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "params").glob("*/*.yaml")
               if not p.name.startswith("0"))
#: the teacher a profile's notebooks build when its base params have none (runs.build_pair
#: saves it; the same source stands in for the saved folder here)
BUILT_TEACHER = {"smoke": {"source": "tiny", "arch": "gpt2", "seed": 1}, "cpu": {"source": "smollm2"},
                 "cpu_full": {"source": "smollm2"}}


def variants():
    """(objective, extra overrides) as the notebooks run them: token-level objectives with the
    teacher online and cached."""
    for objective in OBJECTIVES:
        yield objective, []
        if objective in TOKEN_OBJECTIVES:
            yield objective, ["train.teacher_mode=cache"]


def resolved(base: str, tmp: Path) -> list:
    """The RunConfig of every objective variant on ``base``, as runs.run_config gives it."""
    profile = base.split("/")[1]
    base_has_teacher = bool(load_yaml(ROOT / base).get("teacher"))
    out = []
    for objective, extra in variants():
        pair = None   # runs.run_config gives the pair's teacher only to the runs that use it
        if not base_has_teacher:
            pair = {"teacher": BUILT_TEACHER[profile]}
        name = f"{objective}{'_cache' if extra else ''}_s1"
        out.append(runs.run_config(ROOT / base, name, [f"train.objective={objective}",
                                                       "train.seed=1"] + extra, tmp, pair))
    return out


def test_every_base_and_every_objective_resolves(tmp_path):
    assert {"params/paper/base_train.yaml", "params/colab/qlora_train.yaml",
            "params/colab/qlora_llama2_train.yaml", "params/cpu/base_train.yaml",
            "params/smoke/base_train.yaml"} <= set(BASES)
    for base in BASES:
        for cfg in resolved(base, tmp_path):
            uses_teacher = bool(teacher_use(cfg))
            assert (cfg.teacher is not None) == uses_teacher, (base, cfg.train.objective)
            if cfg.train.objective in TEACHER_OBJECTIVES:
                assert uses_teacher
            assert Path(cfg.output_dir).parent == tmp_path / "runs"


def _sections(cfg) -> str:
    return json.dumps([cfg.tokenizer.__dict__, cfg.teacher and cfg.teacher.__dict__,
                       cfg.student.__dict__], sort_keys=True)


def test_every_profile_builds_its_tokenizer_teacher_and_student(tmp_path):
    """One build per distinct (tokenizer, teacher, student) over all bases and objectives; hub
    ids become stand-ins scaled by 24 in depth and 64 in width, with the checkpoint's class,
    vocabulary and quantisation."""
    configs = {}
    for base in BASES:
        for cfg in resolved(base, tmp_path):
            configs.setdefault(_sections(cfg), (base, cfg))
    seen = set()
    with standins.use_standins(depth=24, width=64, device="cpu") as provider:
        for base, cfg in configs.values():
            tok = build_tokenizer(cfg.tokenizer)
            student = models.build_model(cfg.student, tok, trainable=True)
            assert any(p.requires_grad for p in student.parameters())
            if cfg.student.quantization == "4bit":
                assert models._base(student).is_loaded_in_4bit, base
            if cfg.teacher is not None:
                teacher = models.build_model(cfg.teacher, tok, trainable=False)
                assert not any(p.requires_grad for p in teacher.parameters())
                if cfg.teacher.quantization == "4bit":
                    assert teacher.is_loaded_in_4bit, base
                models.check_same_vocab(tok, tok, teacher, student)
                seen.add(type(teacher).__name__)
            seen.add(type(models._base(student)).__name__)
    assert {"GPT2LMHeadModel", "Qwen2ForCausalLM", "LlamaForCausalLM"} <= seen
    assert {"MiniLLM/teacher-gpt2-1.5B", "MiniLLM/SFT-gpt2-120M", "Qwen/Qwen2.5-14B-Instruct",
            "Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-2-13b-hf",
            "meta-llama/Llama-2-7b-hf"} <= set(provider.built)


@pytest.mark.parametrize("base, objective, extra", [
    ("params/smoke/base_train.yaml", "sft", []),
    ("params/smoke/train.yaml", "dpkd_token", []),
    ("params/cpu/base_train.yaml", "dpkd_token", ["train.teacher_mode=cache"]),
])
def test_offline_profiles_train_a_step(tmp_path, base, objective, extra):
    """The offline profiles' own path (no stand-ins: tiny models, SmolLM2 from its wheel), one
    step of train.train on a few synthetic examples."""
    pair = {"teacher": BUILT_TEACHER["cpu"]} if base.startswith("params/cpu") and objective != "sft" else None
    small = ["data.n_train=2", "data.n_valid=2", "data.n_test=2", "data.n_heldout=0",
             "data.pretrain_max_blocks=2", "train.max_steps=1", "train.batch_size=2",
             "train.save_every=0", "eval.splits=[]"]
    cfg = runs.run_config(ROOT / base, "step", [f"train.objective={objective}"] + extra + small,
                          tmp_path, pair)
    from dpkd_lib.train import train
    summary = train(cfg, progress=False)
    assert summary["steps"] == 1 and summary["objective"] == objective
    assert (Path(cfg.output_dir) / "model").exists()


@pytest.mark.parametrize("profile", ["smoke", "cpu"])
def test_notebook_01_pilot_and_arms_resolve(tmp_path, profile):
    """Notebook 01's declared runs resolve on the profile's base: every arm's methods (the
    control no_distill among them, with the same kd_ratio and lm_coef as the mix), the pilot's
    readouts on the valid split, the learning-rate grid of each objective alone (every method
    named at every rate, nothing else changed), the variance stage (the arm's own training
    params) and the rerun (its one change applied)."""
    from dpkd_lib.study import driver as study
    from dpkd_lib.config import ConfigError
    params = study.load_params(ROOT / "params", profile, "01_gpt2_120m")
    base, pilot, arms = ROOT / params["base_params"], params["pilot"], params["arms"]
    pair = {"teacher": BUILT_TEACHER[profile]}
    released = {}
    for arm_name, arm in arms.items():
        for name, ov, labels in runs.arm_runs(arm_name, arm):
            cfg = runs.run_config(base, name, ov, tmp_path, pair)
            if arm_name == "released":
                released[cfg.train.objective] = cfg
    control, dpkd = released["no_distill"], released["dpkd_token"]
    assert control.teacher is not None and (control.train.kd_ratio, control.train.lm_coef) == \
        (dpkd.train.kd_ratio, dpkd.train.lm_coef) and control.train.lr == dpkd.train.lr
    split = runs.pilot_overrides(pilot)
    readouts = runs.run_config(base, "pilot_x", ["train.objective=sft", *split], tmp_path, pair)
    assert readouts.eval.splits == ["valid"] and readouts.eval.teacher_kl and readouts.teacher is not None
    assert len(readouts.eval.sample_seeds) >= 2
    assert "eval.teacher_kl" not in " ".join(runs.pilot_overrides(pilot, kl=False))
    if "lr_grid" in pilot:
        grid = pilot["lr_grid"]
        specs = runs.pilot_stage_runs(pilot, arms, "lr_grid")
        arm = arms[grid["arm"]]
        methods = grid.get("methods") or list(arm["methods"])
        assert len(specs) == len(methods) * len(grid["lrs"]) * len(grid.get("seeds", [1]))
        seen = set()
        for name, ov, labels in specs:
            cfg = runs.run_config(base, name, ov, tmp_path, pair)
            assert cfg.train.lr in grid["lrs"] and cfg.eval.splits == ["valid"] and cfg.eval.teacher_kl
            alone = runs.run_config(base, "same", [o for o in ov if not o.startswith(("train.lr=", "eval."))], tmp_path, pair)
            assert alone.train.objective == cfg.train.objective and alone.train.kd_ratio == cfg.train.kd_ratio
            seen.add((labels["objective"], cfg.train.lr))
        assert len(seen) == len(methods) * len(grid["lrs"])
        with pytest.raises(ConfigError, match="not an arm"):
            runs.pilot_runs(dict(pilot, lr_grid=dict(grid, arm="nowhere")), arms)
        with pytest.raises(ConfigError, match=r"pilot.lr_grid: unknown key\(s\) \['lr'\]; its keys are arm, choose_on, lrs, methods, overrides, seeds"):
            runs.pilot_runs(dict(pilot, lr_grid=dict(grid, lr=1e-4)), arms)
    if "variance" in pilot:
        # the design's methods at the design's budget: the same resolved params as the arm's own
        # runs but for the readouts (eval.*) and the pilot's common settings (threads)
        var = runs.pilot_stage_runs(pilot, arms, "variance")
        arm = arms[pilot["variance"]["arm"]]
        for name, ov, labels in var:
            seed = int(name.rsplit("_s", 1)[1])
            one = {labels["objective"]: dict(arm["methods"][labels["objective"]], seeds=[seed])}
            [(_, own, _)] = runs.method_runs(one, common=arm.get("common"))
            a = runs.run_config(base, "x", ov, tmp_path, pair).train
            b = runs.run_config(base, "x", own, tmp_path, pair).train
            assert a == b and labels["stage"] == "variance"
        with pytest.raises(ConfigError, match="not in arm"):
            runs.pilot_runs(dict(pilot, variance=dict(pilot["variance"], methods=["nothing"])), arms)
    if "rerun" in pilot:   # a rerun changes what it says it changes, after the pilot's common settings
        for name, ov, labels in runs.pilot_stage_runs(pilot, arms, "rerun"):
            cfg = runs.run_config(base, name, ov, tmp_path, pair)
            for key, value in pilot["rerun"]["overrides"].items():
                assert getattr(cfg, key) == value
