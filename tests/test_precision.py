"""`dtype: auto` (dpkd_lib/precision.py): fp16 on pre-Ampere cards (T4, P100), bf16 from
capability 8.0, float32 on CPU — for model weights, the 4-bit compute dtype, autocast and the
planner. The card is mocked: no GPU is needed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpkd_lib.gpu import memory
from dpkd_lib import models, precision
from dpkd_lib.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def card(monkeypatch):
    """Pretend a CUDA card of the given capability is present."""
    def use(capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return use


def test_auto_by_capability_and_device():
    assert precision.auto_dtype("cuda", (7, 5)) == "float16"  # T4
    assert precision.auto_dtype("cuda", (6, 0)) == "float16"  # P100
    assert precision.auto_dtype("cuda", (8, 0)) == "bfloat16"  # A100
    assert precision.auto_dtype("cuda", (9, 0)) == "bfloat16"  # H100
    assert precision.auto_dtype("cpu", (9, 0)) == "float32"
    assert precision.resolve("float16", "cpu") == "float16"  # only auto is resolved


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((8, 6), torch.bfloat16)])
def test_model_and_4bit_compute_dtype_follow_the_card(card, capability, expected):
    card(capability)
    assert models.resolve_dtype("auto") == expected
    qconfig = models._quantization_config("4bit", models.resolve_dtype("auto"))
    assert qconfig.bnb_4bit_compute_dtype == expected
    assert models.resolve_dtype("auto", "cpu") == torch.float32


def test_auto_on_cpu_is_float32_and_autocast_stays_off():
    assert models.resolve_dtype("auto") == torch.float32  # this machine has no CUDA card
    from dpkd_lib.config import TrainConfig
    from dpkd_lib.objectives import step_loss
    m = models.tiny_model("llama", 64, n_layer=1, n_embd=16, n_head=2)
    ids = torch.randint(0, 64, (2, 6))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    out = step_loss(TrainConfig(objective="sft", lm_coef=0.0, autocast_dtype="auto"), m, None, batch)
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)


def test_colab_profile_picks_fp16_on_t4_and_the_planner_says_so():
    cfg = load_config(ROOT / "params/colab/qlora_train.yaml",
                      ["train.objective=dpkd_token", "train.teacher_mode=cache"])
    assert cfg.student.dtype == "auto" and cfg.train.autocast_dtype == "auto"
    t4 = memory.plan_from_config(cfg, device="cuda", capability=(7, 5))
    assert (t4.student_dtype, t4.teacher_compute_dtype, t4.autocast_dtype) == ("float16",) * 3
    assert t4.auto_dtype == "float16" and "dtype auto = float16" in memory.format_plan(memory.estimate(t4))
    a100 = memory.plan_from_config(cfg, device="cuda", capability=(8, 0))
    assert a100.auto_dtype == "bfloat16" and a100.student_dtype == "bfloat16"
    assert memory.card_verdict(cfg, memory.CARDS[0])["dtype"] == "fp16"
    # the paper profile asks for bf16 outright: a T4 cannot, and the table says what to change
    paper = load_config(ROOT / "params/paper/base_train.yaml", ["train.objective=dpkd_token"])
    verdict = memory.card_verdict(paper, memory.CARDS[0])
    assert not verdict["fits"] and verdict["why"] == "no bf16 on this card"
