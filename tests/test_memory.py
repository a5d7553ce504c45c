"""The memory planner: arithmetic invariants, the refusal message, plans from params files,
the per-card table of docs/gpu_memory.md (regenerated and compared), and one measured check (a
tiny training workload in a fresh subprocess, perf/calibrate.py)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from dpkd_lib import errors
from dpkd_lib.gpu import memory as M
from dpkd_lib.config import load_config
from dpkd_lib.gpu import calibrate

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = M.ModelShape.of("HuggingFaceTB/SmolLM2-135M-Instruct")
STUDENT6 = SMOLLM2.pruned(6)
QWEN7, QWEN14 = M.ModelShape.of("Qwen/Qwen2.5-7B-Instruct"), M.ModelShape.of("Qwen/Qwen2.5-14B-Instruct")
LLAMA7, LLAMA13 = M.ModelShape.of("meta-llama/Llama-2-7b-hf"), M.ModelShape.of("meta-llama/Llama-2-13b-hf")


def colab_plan(teacher=QWEN14, student=QWEN7, **kw) -> M.MemoryPlan:
    """The colab 4-bit pair as qlora_train.yaml ships it (on a T4: fp16)."""
    base = dict(teacher=teacher, student=student, teacher_dtype="4bit", teacher_compute_dtype="float16",
                student_mode="qlora", student_dtype="float16", teacher_mode="cache",
                gradient_checkpointing=True, batch_size=4, seq_len=512, response_fraction=0.5,
                loss="lean", device="cuda", lora_r=16, label="colab")
    return M.MemoryPlan(**dict(base, **kw))


def cpu_plan(**kw) -> M.MemoryPlan:
    base = dict(student=STUDENT6, teacher=SMOLLM2, teacher_mode="online", batch_size=8,
                seq_len=256, response_fraction=0.2, device="cpu")
    return M.MemoryPlan(**dict(base, **kw))


def total(plan) -> int:
    return M.estimate(plan)["total"]


# --------------------------------------------------------------------------- shapes

def test_shapes_come_from_the_stand_ins():
    # the full-size counts against the published ones: tests/test_standins.py
    assert M.ModelShape.of("MiniLLM/teacher-gpt2-1.5B").n_layer == 48
    assert M.ModelShape.of("org/unknown") is None
    # pruning keeps embeddings and head: 6 of 30 layers of SmolLM2 is ~49.5M
    assert STUDENT6.n_params() == pytest.approx(49.55e6, rel=0.01)
    cfg = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
           "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
           "vocab_size": 49152, "tie_word_embeddings": True}
    assert M.ModelShape.from_hf_config(cfg).n_params() == SMOLLM2.n_params()
    assert M.MemoryPlanError is errors.MemoryPlanError  # one exception per concept


# --------------------------------------------------------------------------- estimate

@pytest.mark.parametrize("plan", [
    cpu_plan(),
    cpu_plan(teacher_mode="cache", student_mode="lora"),
    cpu_plan(task="teacher_inference", teacher_dtype="4bit"),
    colab_plan(),
    colab_plan(cache_format="topk"),
    colab_plan(LLAMA13, LLAMA7, teacher_mode="online", gradient_checkpointing=False),
])
def test_breakdown_sums_to_total(plan):
    est = M.estimate(plan)
    assert sum(est["components"].values()) == est["total"]
    assert all(v >= 0 for v in est["components"].values())
    assert est["total"] == max(est["phases"].values()) or plan.device == "cpu"


def test_monotonic_in_batch_sequence_and_bits():
    assert total(cpu_plan(batch_size=4)) < total(cpu_plan(batch_size=8)) < total(cpu_plan(batch_size=16))
    assert total(cpu_plan(seq_len=128)) < total(cpu_plan(seq_len=256)) < total(cpu_plan(seq_len=512))
    by_bits = [total(cpu_plan(teacher_dtype=d, teacher_compute_dtype="bfloat16"))
               for d in ("4bit", "8bit", "bfloat16", "float32")]
    assert by_bits == sorted(by_bits) and len(set(by_bits)) == 4


def test_lora_below_full_qlora_below_lora_cached_below_online():
    big = LLAMA7
    plan = M.MemoryPlan(student=big, teacher=LLAMA13,
                        teacher_dtype="4bit", teacher_compute_dtype="float16",
                        student_dtype="float16", batch_size=4, seq_len=512, device="cuda")
    full, lora, qlora = (total(replace(plan, student_mode=m)) for m in ("full", "lora", "qlora"))
    assert qlora < lora < full
    assert total(replace(plan, teacher_mode="cache")) < total(plan)
    assert total(cpu_plan(student_mode="lora")) < total(cpu_plan())
    assert total(cpu_plan(teacher_mode="cache")) < total(cpu_plan())
    assert total(cpu_plan(gradient_checkpointing=True)) < total(cpu_plan())


def test_qlora_upcasts_embeddings_and_4bit_counts_quant_state():
    s = QWEN7
    est = M.estimate(M.MemoryPlan(student=s, student_mode="qlora", student_dtype="float16",
                                  teacher_mode="none", device="cuda"))
    w = est["components"]["student_weights"]
    expected = s.linear_params() * M.NF4_BYTES + s.other_params() * 4 + s.lora_params(16) * 4
    assert w == pytest.approx(expected, rel=0.01)
    assert M.NF4_BYTES > 0.5


# --------------------------------------------------------------------------- refusal

def test_check_fits_names_the_fixes_largest_saving_first():
    est = M.estimate(colab_plan(teacher_mode="online", teacher_dtype="bfloat16",
                                teacher_compute_dtype="bfloat16", gradient_checkpointing=False))
    with pytest.raises(M.MemoryPlanError) as err:
        M.check_fits(est, 16 * M.GiB)
    msg = str(err.value)
    assert "budget is 16.00 GiB" in msg
    for fix in ("cache the teacher", "use teacher 4bit", "gradient checkpointing", "batch"):
        assert fix in msg
    savings = [float(line.split("saves ")[1].split(" GiB")[0])
               for line in msg.splitlines() if "saves " in line]
    assert savings == sorted(savings, reverse=True)
    assert M.check_fits(est, est["total"]) is est


def test_cache_formats_on_the_colab_pair():
    """The exact `hidden` cache keeps the 14B teacher's head (152k × 5120, fp16 on a T4) on the
    GPU and computes its logits one chunk of the lean loss at a time; its rows come from disk:
    host memory holds one batch's rows, the data set's hidden states are on disk. Top-k keeps
    no head."""
    hidden, topk = M.estimate(colab_plan()), M.estimate(colab_plan(cache_format="topk"))
    head = QWEN14.vocab * QWEN14.hidden * 2
    assert hidden["components"]["teacher_head"] == head and "teacher_head" not in topk["components"]
    rows = 4 * 512 // 2  # batch × seq × response share
    chunk = 256 * QWEN14.vocab * 4 * M.TEACHER_LOGIT_COPIES  # one chunk's fp32 logits
    assert hidden["phases"]["forward"] - topk["phases"]["forward"] == pytest.approx(
        head + rows * QWEN14.hidden * 2 + chunk - rows * 32 * 12, rel=1e-6)
    plain = M.estimate(colab_plan(loss="plain"))  # every row's teacher logits at once
    assert plain["components"]["teacher_signal"] > rows * QWEN14.vocab * 4 * M.TEACHER_LOGIT_COPIES
    plan = colab_plan(cache_positions=10_000)
    est = M.estimate(plan)
    assert est["disk"]["teacher_cache"] == 10_000 * QWEN14.hidden * 2 + head
    assert est["host"]["teacher_cache_rows"] == rows * QWEN14.hidden * 2 + 64 * M.MiB
    big = M.estimate(colab_plan(cache_positions=1_000_000))  # 100x the data: same host, GPU
    assert big["host"] == est["host"] and big["total"] == est["total"]
    assert "teacher_cache" not in est["components"]  # host memory, not the GPU's
    cpu = M.estimate(cpu_plan(teacher_mode="cache", cache_positions=10_000))
    assert cpu["components"]["teacher_cache_rows"] < 10_000 * SMOLLM2.hidden * 4  # a batch, not the set
    assert cpu["disk"]["teacher_cache"] > 10_000 * SMOLLM2.hidden * 4


def test_cards_say_what_fits_and_what_to_change():
    t4, l4 = M.CARDS[0], M.CARDS[2]
    qwen = load_config(ROOT / "params/colab/qlora_train.yaml",
                       ["train.objective=dpkd_token", "train.teacher_mode=cache"])
    on_t4 = M.card_verdict(qwen, t4)
    # the exact cache fits a T4: its head in fp16, its teacher logits one chunk at a time
    assert on_t4["fits"] and on_t4["changes"] == [] and on_t4["dtype"] == "fp16"
    assert on_t4["train"]["total"] <= t4.bytes and on_t4["build"]["total"] <= t4.bytes
    # a top-k cache is built from the teacher's full logits: its build needs a smaller batch
    topk = load_config(ROOT / "params/colab/qlora_train.yaml", ["train.objective=dpkd_token",
                       "train.teacher_mode=cache", "train.cache_format=topk"])
    assert M.card_verdict(topk, t4)["changes"] == ["eval.batch_size=4"]
    assert M.card_verdict(qwen, l4)["fits"] and M.card_verdict(qwen, l4)["dtype"] == "bf16"
    llama = load_config(ROOT / "params/colab/qlora_llama2_train.yaml",
                        ["train.objective=dpkd_token", "train.teacher_mode=cache"])
    assert M.card_verdict(llama, t4)["fits"]
    # the 14B teacher online next to the 7B student: cache it first
    online = load_config(ROOT / "params/colab/qlora_train.yaml", ["train.objective=dpkd_token"])
    verdict = M.card_verdict(online, t4)
    assert not verdict["fits"] and verdict["changes"][0] == "train.teacher_mode=cache"
    # fix_path's changes, applied, fit
    plan = M.plan_from_config(online, device="cuda", capability=t4.capability)
    assert M.fix_path(plan, t4.bytes) == ["train.teacher_mode=cache"]
    assert M.estimate(replace(plan, teacher_mode="cache"))["total"] <= t4.bytes


def test_gpu_memory_page_is_current():
    """docs/gpu_memory.md is generated (python -m dpkd_lib.gpu.memory --doc) and current, with
    the 4-bit pairs' exact caches fitting a T4 and their host memory and disk shown."""
    assert M.update_doc(ROOT / "docs" / "gpu_memory.md", check=True), \
        "docs/gpu_memory.md is stale: python -m dpkd_lib.gpu.memory --doc"
    text = (ROOT / "docs" / "gpu_memory.md").read_text()
    table = M.card_table()
    assert table in text
    assert len([line for line in table.splitlines() if line.startswith("| colab") or
                line.startswith("| paper")]) == len(M.PROFILE_RUNS)
    for card in M.CARDS:
        assert card.name in table
    for pair in ("Qwen2.5 14B → 7B", "Llama-2 13B → 7B"):
        row = next(line for line in table.splitlines() if pair in line).split(" | ")
        assert row[7] == "fits (fp16)"  # T4, exact cache
        assert float(row[5]) < 0.5 and float(row[6].lstrip("≤ ")) > 30  # host GiB, disk GiB


# --------------------------------------------------------------------------- from params

def test_plan_from_smoke_params():
    cfg = load_config(ROOT / "params/smoke/train.yaml")
    plan = M.plan_from_config(cfg, device="cpu")
    assert plan.student.n_layer == cfg.student.n_layer and plan.student.vocab == cfg.tokenizer.vocab_size
    assert plan.teacher.n_layer == cfg.teacher.n_layer and plan.teacher_mode == "online"
    assert plan.batch_size == cfg.train.batch_size and plan.seq_len == cfg.data.max_length
    assert plan.pretrain_batch == cfg.train.batch_size  # lm_coef > 0 with a pydoc corpus
    est = M.estimate(plan)
    assert est["total"] > 0
    M.plan_from_config(cfg, device_budget=64 * M.GiB, device="cpu")  # fits: no error
    with pytest.raises(M.MemoryPlanError, match="Changes that help"):
        M.plan_from_config(cfg, device_budget=1, device="cpu")


def test_plan_from_config_cache_mode_and_unknown_saved_model(tmp_path):
    cfg = load_config(ROOT / "params/smoke/train.yaml", ["train.teacher_mode=cache"])
    assert M.plan_from_config(cfg, device="cpu").teacher_mode == "cache"
    cpu = ROOT / "params/cpu/base_train.yaml"
    if not cpu.exists():
        pytest.skip("no cpu params")
    cfg = load_config(cpu, ["student.source=saved", f"student.name_or_path={tmp_path}",
                            "student.prune_to=0", "teacher.source=smollm2", "teacher.prune_to=0",
                            "train.objective=dpkd_token"])
    with pytest.raises(M.MemoryPlanError, match="shapes="):
        M.plan_from_config(cfg, device="cpu")  # an empty folder has no config.json
    plan = M.plan_from_config(cfg, device="cpu", shapes={"student": STUDENT6})
    assert plan.teacher.n_layer == 30 and plan.student.n_layer == 6


def test_plan_from_local_config_json(tmp_path):
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300).save_pretrained(tmp_path)
    cfg = load_config(ROOT / "params/smoke/train.yaml",  # the tiny-model keys back to their defaults
                      ["student.source=saved", f"student.name_or_path={tmp_path}",
                       "student.n_layer=2", "student.n_embd=64", "student.seed=0"])
    plan = M.plan_from_config(cfg, device="cpu")
    assert (plan.student.n_layer, plan.student.hidden, plan.student.n_kv_head) == (3, 64, 2)


# --------------------------------------------------------------------------- one measurement

def test_tiny_workload_measured_within_tolerance():
    """A tiny training step in a fresh interpreter (peak RSS after loading) against the plan
    with the same interpreter's import-time RSS as framework term. Loose: the CPU heap and
    other processes make RSS noisy; the bench reports the real spread."""
    res = calibrate.measure_workload(dict(name="tiny", model="tiny", n_layer=2, hidden=128, vocab=4096,
                                          batch=4, seq=128, teacher="cache", steps=2))
    assert res["measured"] > res["import_rss"]
    assert abs(res["rel_error"]) < 0.35, res


def test_colab_qlora_params_plan_and_cache_build():
    path = ROOT / "params/colab/qlora_train.yaml"
    if not path.exists():
        pytest.skip("no colab params")
    cached = load_config(path, ["train.objective=dpkd_token", "train.teacher_mode=cache"])
    plan = M.plan_from_config(cached, device="cuda", capability=(7, 5))  # stand-in shapes: no download
    assert plan.student_mode == "qlora" and plan.teacher_mode == "cache" and plan.cache_format == "hidden"
    M.check_fits(M.estimate(plan), 15 * M.GiB)  # the exact cache fits a T4
    M.check_fits(M.estimate(replace(plan, cache_format="topk")), 15 * M.GiB)
    build = M.teacher_cache_plan(plan, batch_size=4)
    assert build.task == "teacher_inference" and build.teacher_dtype == "4bit"
    M.check_fits(M.estimate(build), 15 * M.GiB)
    online = load_config(path, ["train.objective=dpkd_token"])
    with pytest.raises(M.MemoryPlanError) as err:
        M.plan_from_config(online, device_budget=15 * M.GiB, device="cuda", capability=(7, 5))
    first_fix = [line for line in str(err.value).splitlines() if "saves" in line][0]
    assert "cache the teacher" in first_fix


def test_paper_and_colab_gpt2_params_plan_offline():
    for name in ("params/paper/base_train.yaml", "params/colab/base_train.yaml"):
        path = ROOT / name
        if not path.exists():
            continue
        cfg = load_config(path, ["train.objective=dpkd_token"])
        plan = M.plan_from_config(cfg, device="cuda")  # MiniLLM checkpoints: known GPT-2 shapes
        assert plan.student.arch == "gpt2" and plan.teacher.n_layer == 48
        assert M.estimate(plan)["total"] > plan.teacher.n_params() * 2
