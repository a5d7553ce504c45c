"""Stand-ins (dpkd_lib/gpu/standins.py): every checkpoint's architecture against its published size
(counted on the meta device: nothing is allocated), the planner reading the same numbers,
scaled builds that keep the architecture, in-memory 4-bit that survives a save and reload,
and hub ids served as stand-ins only inside `use_standins`."""
from __future__ import annotations

import pytest
import torch

from dpkd_lib import config as C
from dpkd_lib import hub, models
from dpkd_lib.gpu import memory, standins
from dpkd_lib.errors import ModelLoadError


@pytest.mark.parametrize("name", list(standins.SPECS))
def test_full_size_parameter_count_matches_the_published_one(name):
    spec = standins.SPECS[name]
    counted = standins.count_params(spec)  # a model built on the meta device
    assert counted == pytest.approx(spec.published_params, rel=0.01), (name, counted)
    # the memory planner counts the same architecture analytically, to the parameter
    assert memory.ModelShape.of(name).n_params() == counted


def test_aliases_and_unknown_ids():
    assert standins.spec("MiniLLM/teacher-gpt2-1.5B").name == "gpt2-xl"
    assert standins.spec("MiniLLM/SFT-gpt2-120M").name == "gpt2"
    assert standins.spec("meta-llama/llama-2-13b-chat-hf").name == "meta-llama/Llama-2-13b-hf"
    with pytest.raises(ModelLoadError, match="no stand-in for 'org/unknown'"):
        standins.spec("org/unknown")


def test_scaling_keeps_heads_groups_and_vocabulary():
    full = standins.SPECS["Qwen/Qwen2.5-14B-Instruct"]
    small = standins.scaled(full, depth=24, width=16)
    assert (small.n_layer, small.n_head, small.n_kv_head, small.vocab) == (2, 40, 8, 152064)
    assert small.head_dim == 8 and small.hidden == 320 and small.intermediate == 13824 // 16
    assert standins.scaled(full) is full
    tiny_heads = standins.scaled(standins.SPECS["gpt2-xl"], depth=100, width=1000)
    assert tiny_heads.n_layer == 1 and tiny_heads.head_dim == 2  # floors: one layer, rotary-safe


def test_scaled_4bit_build_is_the_checkpoint_class_and_deterministic():
    kw = dict(depth=24, width=64, device="cpu", quantization="4bit", seed=3)
    model = standins.build("Qwen/Qwen2.5-14B-Instruct", **kw)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.is_loaded_in_4bit
    assert model.config.vocab_size == 152064 and model.config.num_key_value_heads == 8
    assert model.get_output_embeddings().weight.shape == (152064, 80)  # untied head kept whole
    assert models.count_parameters(model) == standins.count_params(
        standins.scaled(standins.SPECS["Qwen/Qwen2.5-14B-Instruct"], 24, 64))
    ids = torch.randint(0, 50000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = standins.build("Qwen/Qwen2.5-14B-Instruct", **kw)(input_ids=ids).logits
    assert torch.isfinite(a).all() and a.std() > 0
    torch.testing.assert_close(a, b)
    gpt2 = standins.build("gpt2", depth=12, width=16, device="cpu")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # tied like the checkpoint
    assert gpt2.name_or_path == ""  # no folder holds these weights


def test_in_memory_qlora_student_saves_and_reloads(tmp_path):
    model = standins.build("meta-llama/Llama-2-7b-hf", depth=16, width=32, device="cpu",
                           quantization="4bit")
    model = models.apply_lora(model, r=4, dropout=0.0)
    ids = torch.randint(0, 32000, (2, 8), generator=torch.Generator().manual_seed(1))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    models.save_model(model, tmp_path / "m")
    assert (tmp_path / "m" / models.BASE_SUBDIR / "config.json").exists()  # the base is saved too
    reloaded = models.load_saved(tmp_path / "m", quantization="4bit")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def _section(**kw):
    return C.ModelConfig(**kw)


def test_hub_ids_are_stand_ins_only_inside_use_standins():
    qwen = _section(source="pretrained", name_or_path="Qwen/Qwen2.5-7B-Instruct", quantization="4bit",
                    lora=True, lora_r=4, gradient_checkpointing=True)
    tok_cfg = C.TokenizerConfig(kind="pretrained", path="Qwen/Qwen2.5-7B-Instruct")
    with pytest.raises(ModelLoadError):  # offline (tests set HF_HUB_OFFLINE): never downloaded
        models.build_model(qwen, None, trainable=True)
    real_key = models.weights_fingerprint(qwen)
    with standins.use_standins(depth=14, width=64, device="cpu") as provider:
        from dpkd_lib.tokenization import build_tokenizer
        tok = build_tokenizer(tok_cfg)
        student = models.build_model(qwen, tok, trainable=True)
        assert provider.built == ["Qwen/Qwen2.5-7B-Instruct"]
        assert len(tok) <= student.get_output_embeddings().out_features == 152064
        assert student.get_base_model().is_loaded_in_4bit
        assert any(p.requires_grad for n, p in student.named_parameters() if "lora_" in n)
        # teacher-cache keys name the stand-in: its signals never meet a real checkpoint's
        assert models.weights_fingerprint(qwen) != real_key
        assert "standin" in models.weights_fingerprint(qwen)
    assert hub.substitute() is None and models.weights_fingerprint(qwen) == real_key
    llama_tok = standins.StandIns().tokenizer("meta-llama/Llama-2-13b-hf")
    assert len(llama_tok) <= 32000  # GPT-2's 50k ids would not fit Llama's vocabulary
