"""Params: YAML ↔ dataclasses, and early one-line errors for bad input (before any model loads)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpkd_lib.config import ConfigError, RunConfig, diff_keys, from_dict, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "params" / "smoke" / "train.yaml"


def test_smoke_params_load_and_round_trip():
    cfg = load_config(SMOKE)
    assert isinstance(cfg, RunConfig) and cfg.train.objective == "dpkd_token"
    again = from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)


def test_overrides_are_dotted_and_typed():
    cfg = load_config(SMOKE, ["train.lr=1e-4", "output_dir=/tmp/x", "eval.sample_seeds=[1,2]",
                              "train.reference_free=true"])
    assert cfg.train.lr == 1e-4 and cfg.output_dir == "/tmp/x"
    assert cfg.eval.sample_seeds == [1, 2] and cfg.train.reference_free is True


def test_int_accepted_for_float_but_not_the_reverse():
    assert load_config(SMOKE, ["train.beta=1"]).train.beta == 1.0
    with pytest.raises(ConfigError, match="train.max_steps: expected int"):
        load_config(SMOKE, ["train.max_steps=1.5"])


def test_diff_keys_names_nested_keys():
    a = to_dict(load_config(SMOKE))
    b = to_dict(load_config(SMOKE, ["train.beta=0.5", "data.n_train=10"]))
    assert diff_keys(a, b) == ["data.n_train", "train.beta"]


BAD_INPUTS = [
    # (overrides, words the one-line message must contain)
    (["train.lerning_rate=0.1"], ["unknown key 'train.lerning_rate'"]),
    (["train.bta=0.1"], ["unknown key 'train.bta'", "did you mean 'beta'"]),
    (["trian.lr=0.1"], ["unknown key 'trian'", "did you mean 'train'"]),
    (["train.beta=0"], ["train.beta", "out of range"]),
    (["train.beta=-1"], ["train.beta", "out of range"]),
    (["train.lr=0"], ["train.lr", "out of range"]),
    (["train.kd_ratio=1.5"], ["train.kd_ratio", "out of range"]),
    (["train.lm_coef=-0.1"], ["train.lm_coef", "out of range"]),
    (["train.label_smoothing=0.5"], ["train.label_smoothing", "out of range"]),
    (["data.max_prompt=300", "data.max_length=256"], ["data.max_prompt", "smaller than data.max_length"]),
    (["train.objective=dpo"], ["train.objective", "'dpo' is not one of", "dpkd_token"]),
    (["train.loss_type=hinge2"], ["train.loss_type", "sigmoid", "ipo"]),
    (["train.max_steps=abc"], ["train.max_steps: expected int"]),
    (["train.reference_free=maybe"], ["train.reference_free: expected bool"]),
    (["data.source=jsonl", "data.path=/nonexistent/x.jsonl"], ["data.path", "not found"]),
    (["data.source=jsonl"], ["data.path", "needs a file path"]),
    (["student.source=saved", "student.name_or_path=/nonexistent/model"], ["student.name_or_path", "not found"]),
    (["teacher=null"], ["teacher", "needs a teacher"]),
    (["student.quantization=3bit"], ["student.quantization", "4bit"]),
    (["tokenizer.kind=sentencepiece"], ["tokenizer.kind", "bpe_local"]),
    (["train"], ["--set expects key=value"]),
    (["train.teacher_mode=cache", "train.objective=seqkd"], ["train.teacher_mode", "seqkd"]),
    (["train.teacher_mode=cache", "train.cache_format=topk", "train.objective=rkl"], ["train.cache_format", "rkl"]),
    # every float finite, every range checked before work (eval's too)
    (["train.lr=nan"], ["train.lr", "not a finite number"]),
    (["train.lr=.inf"], ["train.lr", "not a finite number"]),
    (["train.beta=.nan"], ["train.beta", "not a finite number"]),
    (["train.kd_ratio=nan"], ["train.kd_ratio", "not a finite number"]),
    (["eval.max_new_tokens=-1"], ["eval.max_new_tokens", "out of range"]),
    (["eval.top_p=2"], ["eval.top_p", "out of range"]),
    (["eval.batch_size=0"], ["eval.batch_size", "out of range"]),
    (["eval.max_examples=-1"], ["eval.max_examples", "out of range"]),
    # a setting the run does not use is refused, never ignored
    (["train.objective=kd", "train.beta=0.5"], ["train.beta=0.5 is not used", "objective 'kd'", "dpkd_token"]),
    (["train.loss_type=ipo", "train.label_smoothing=0.1"], ["train.label_smoothing=0.1 is not used",
                                                            "loss_type sigmoid"]),
    (["train.gamma=0.5"], ["train.gamma=0.5 is not used", "loss_type simpo"]),
    (["eval.temperature=0.7"], ["eval.temperature=0.7 is not used", "eval.sample_seeds"]),
    (["train.lm_coef=0"], ["data.pretrain_source='pydoc' is not used", "lm_coef > 0"]),
]


def _cli(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "dpkd_lib", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


@pytest.mark.parametrize("overrides,expected", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_params_fail_early_with_one_line(overrides, expected, tmp_path):
    args = ["train", "--params", str(SMOKE), "--set", f"output_dir={tmp_path / 'run'}"]
    for o in overrides:
        args += ["--set", o]
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in expected:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "run").exists(), "a user error must not create the run directory"


def test_missing_params_file_and_bad_yaml(tmp_path):
    proc = _cli("train", "--params", str(tmp_path / "none.yaml"))
    assert proc.returncode == 2 and "params file not found" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    proc = _cli("train", "--params", str(bad))
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_section_must_be_mapping(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"train": 3}))
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(path)
