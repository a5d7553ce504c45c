"""Shape-faithful stand-ins: random models with the exact architecture of a named checkpoint.

The GPU profiles name hub checkpoints (GPT-2 XL → GPT-2 base for ``paper``; Qwen2.5-14B →
Qwen2.5-7B or Llama-2 13B → 7B in 4-bit for ``colab``). Whether their code path runs, and how
much memory it takes, depends on the architecture, not on the trained weights. So each
checkpoint's architecture is written here — the few numbers that define it, with where they
come from — and :func:`build` makes a randomly initialised model of it with no download:

* at full size, directly on the target device in the target dtype, 4-bit quantised layer by
  layer from memory (the full-precision model never exists at once): the GPU check
  (``python -m dpkd_lib.gpu.gpu_check``);
* scaled down in depth and width (``depth=4`` keeps a quarter of the layers, ``width=16``
  divides the head size and the MLP width by 16, keeping the number of heads, the GQA
  grouping and the vocabulary) so that the same code runs on a CPU in seconds (tests).

The memory planner (``memory.py``) reads its model shapes from :data:`SPECS` too: one source
of truth. ``tests/test_standins.py`` checks every full-size parameter count against the
published one (built on the meta device: nothing is allocated).

Inside :func:`use_standins`, ``models.build_model`` and ``tokenization.build_tokenizer`` serve
the hub ids of a params file as stand-ins (random weights, an offline tokenizer whose ids fit
the model's vocabulary), so every profile's run can be built and trained a step offline.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional

from .. import hub
from ..errors import ModelLoadError


@dataclass(frozen=True)
class Spec:
    """The numbers that define a decoder-only checkpoint's architecture (its config.json)."""

    name: str  # hub id
    family: str  # gpt2 | llama | qwen2 (transformers model_type)
    n_layer: int
    hidden: int
    intermediate: int
    n_head: int
    n_kv_head: int
    vocab: int
    tied: bool
    max_positions: int
    published_params: float  # the count the model card / paper gives
    source: str  # where the numbers come from
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_head


_HF = "https://huggingface.co/{}/blob/main/config.json"

#: The checkpoints the profiles name. Architecture numbers from each repository's
#: config.json; ``published_params`` is the size the model's publisher gives (OpenAI's GPT-2
#: release names its checkpoints 124M / 355M / 774M / 1558M; the others' model cards).
_GPT2 = "; OpenAI's release (github.com/openai/gpt-2, download_model.py): {}"
SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("gpt2", "gpt2", 12, 768, 3072, 12, 12, 50257, True, 1024, 124e6,
         _HF.format("openai-community/gpt2") + _GPT2.format("124M")),
    Spec("gpt2-medium", "gpt2", 24, 1024, 4096, 16, 16, 50257, True, 1024, 355e6,
         _HF.format("openai-community/gpt2-medium") + _GPT2.format("355M")),
    Spec("gpt2-large", "gpt2", 36, 1280, 5120, 20, 20, 50257, True, 1024, 774e6,
         _HF.format("openai-community/gpt2-large") + _GPT2.format("774M")),
    Spec("gpt2-xl", "gpt2", 48, 1600, 6400, 25, 25, 50257, True, 1024, 1558e6,
         _HF.format("openai-community/gpt2-xl") + _GPT2.format("1558M")),
    Spec("HuggingFaceTB/SmolLM2-135M-Instruct", "llama", 30, 576, 1536, 9, 3, 49152, True, 8192,
         135e6, _HF.format("HuggingFaceTB/SmolLM2-135M-Instruct") + "; model card: 135M",
         rope_theta=100000.0),
    Spec("Qwen/Qwen2.5-1.5B-Instruct", "qwen2", 28, 1536, 8960, 12, 2, 151936, True, 32768,
         1.54e9, _HF.format("Qwen/Qwen2.5-1.5B-Instruct") + "; model card: 1.54B parameters",
         rope_theta=1e6, norm_eps=1e-6),
    Spec("Qwen/Qwen2.5-7B-Instruct", "qwen2", 28, 3584, 18944, 28, 4, 152064, False, 32768,
         7.61e9, _HF.format("Qwen/Qwen2.5-7B-Instruct") + "; model card: 7.61B parameters",
         rope_theta=1e6, norm_eps=1e-6),
    Spec("Qwen/Qwen2.5-14B-Instruct", "qwen2", 48, 5120, 13824, 40, 8, 152064, False, 32768,
         14.7e9, _HF.format("Qwen/Qwen2.5-14B-Instruct") + "; model card: 14.7B parameters",
         rope_theta=1e6, norm_eps=1e-5),
    Spec("meta-llama/Llama-2-7b-hf", "llama", 32, 4096, 11008, 32, 32, 32000, False, 4096,
         6.74e9, _HF.format("meta-llama/Llama-2-7b-hf") + "; hub model page: 6.74B parameters",
         norm_eps=1e-5),
    Spec("meta-llama/Llama-2-13b-hf", "llama", 40, 5120, 13824, 40, 40, 32000, False, 4096,
         13.0e9, _HF.format("meta-llama/Llama-2-13b-hf") + "; Llama 2 paper and model card: 13B",
         norm_eps=1e-5),
)}

#: Other names of the same architectures (instruct / chat / base variants, mirrors, and
#: MiniLLM's released GPT-2 checkpoints, which the paper and colab profiles use).
ALIASES: dict[str, str] = {
    "openai-community/gpt2": "gpt2", "openai-community/gpt2-medium": "gpt2-medium",
    "openai-community/gpt2-large": "gpt2-large", "openai-community/gpt2-xl": "gpt2-xl",
    "MiniLLM/teacher-gpt2-1.5B": "gpt2-xl", "MiniLLM/init-gpt2-120M": "gpt2",
    "MiniLLM/init-gpt2-340M": "gpt2-medium", "MiniLLM/init-gpt2-760M": "gpt2-large",
    "MiniLLM/SFT-gpt2-120M": "gpt2", "MiniLLM/SFT-gpt2-340M": "gpt2-medium",
    "MiniLLM/SFT-gpt2-760M": "gpt2-large",
    "HuggingFaceTB/SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "Qwen/Qwen2.5-1.5B": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen2.5-7B": "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-14B": "Qwen/Qwen2.5-14B-Instruct",
    "meta-llama/Llama-2-7b-chat-hf": "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-chat-hf": "meta-llama/Llama-2-13b-hf",
}


def find(name: str) -> Optional[Spec]:
    """The spec of a hub id (or alias), case-insensitive; None when the study does not know it."""
    name = ALIASES.get(name, name)
    for key, spec in SPECS.items():
        if key.lower() == str(name).lower():
            return spec
    for alias, key in ALIASES.items():
        if alias.lower() == str(name).lower():
            return SPECS[key]
    return None


def spec(name: str) -> Spec:
    found = find(name)
    if found is None:
        raise ModelLoadError(f"no stand-in for {name!r}: dpkd_lib/gpu/standins.py knows "
                             f"{', '.join(SPECS)} (and their aliases); add its config numbers there")
    return found


# ----------------------------------------------------------------------------- configs

def scaled(s: Spec, depth: int = 1, width: int = 1) -> Spec:
    """``s`` with 1/depth of its layers (at least 1) and 1/width of its head size and MLP
    width (head size kept even and ≥ 2, for rotary embeddings); heads, GQA groups, vocabulary
    and tying unchanged. depth = width = 1 is ``s`` itself."""
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width are factors >= 1, got {depth}, {width}")
    if depth == width == 1:
        return s
    head = max(2, s.head_dim // width)
    head += head % 2
    return Spec(s.name, s.family, max(1, round(s.n_layer / depth)), s.n_head * head,
                max(2, s.intermediate // width), s.n_head, s.n_kv_head, s.vocab, s.tied,
                s.max_positions, s.published_params, s.source, s.rope_theta, s.norm_eps)


def config_dict(s: Spec) -> dict:
    """The transformers config of ``s`` as a plain dict (HF key names; no import needed)."""
    if s.family == "gpt2":
        return {"model_type": "gpt2", "vocab_size": s.vocab, "n_positions": s.max_positions,
                "n_embd": s.hidden, "n_layer": s.n_layer, "n_head": s.n_head,
                "n_inner": s.intermediate, "layer_norm_epsilon": s.norm_eps,
                "tie_word_embeddings": s.tied}
    return {"model_type": s.family, "vocab_size": s.vocab, "hidden_size": s.hidden,
            "intermediate_size": s.intermediate, "num_hidden_layers": s.n_layer,
            "num_attention_heads": s.n_head, "num_key_value_heads": s.n_kv_head,
            "max_position_embeddings": s.max_positions, "rms_norm_eps": s.norm_eps,
            "rope_theta": s.rope_theta, "tie_word_embeddings": s.tied}


def hf_config(s: Spec):
    """The transformers config object of ``s``."""
    from transformers import AutoConfig
    d = dict(config_dict(s))
    return AutoConfig.for_model(d.pop("model_type"), **d)


def count_params(s: Spec) -> int:
    """Parameters of ``s`` counted on a model built on the meta device (nothing allocated;
    tied weights once)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config(s))
    model.tie_weights()
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- building

def build(name: str | Spec, *, depth: int = 1, width: int = 1, dtype: str = "float32",
          device: Optional[str] = None, quantization: Optional[str] = None, seed: int = 0,
          pad_token_id: Optional[int] = None, eos_token_id: Optional[int] = None):
    """A randomly initialised model of checkpoint ``name``'s architecture (scaled by
    ``depth`` and ``width``), built directly on ``device`` (default: the CUDA card when there
    is one) in ``dtype`` ("auto" resolved for that device), 4-bit / 8-bit quantised from
    memory when ``quantization`` says so (layer by layer: only one layer is ever in full
    precision). Weights ~ N(0, 0.02), norms 1, biases 0; the same seed gives the same model
    on the same device. Its ``name_or_path`` is empty: no folder holds these weights."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .. import models, precision

    s = scaled(spec(name) if isinstance(name, str) else name, depth, width)
    device = str(device or precision.default_device())
    torch_dtype = models.resolve_dtype(dtype, device)
    config = hf_config(s)
    for key, value in (("pad_token_id", pad_token_id), ("eos_token_id", eos_token_id),
                       ("bos_token_id", eos_token_id)):
        if value is not None:
            setattr(config, key, value)
    std = float(getattr(config, "initializer_range", 0.02))
    gen = torch.Generator(device=device).manual_seed(seed)
    # parameters on the meta device, buffers (rotary tables) really on `device`
    with torch.device(device), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)

    def normal(shape):
        return torch.empty(shape, device=device, dtype=torch_dtype).normal_(0.0, std, generator=gen)

    quant = models._normalize_quantization(quantization)
    if quant is not None:  # the block linears: made and quantized one at a time
        models.quantize_in_memory(model, quant, dtype=torch_dtype, device=device,
                                  make_weight=lambda _, shape: normal(shape))
    model.tie_weights()  # tied weights are then one parameter, made once
    seen = set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for pname, param in list(module._parameters.items()):
            if param is None or not param.is_meta or id(param) in seen:
                continue
            seen.add(id(param))
            if is_norm and pname == "weight":
                value = torch.ones(param.shape, device=device, dtype=torch_dtype)
            elif pname == "bias":
                value = torch.zeros(param.shape, device=device, dtype=torch_dtype)
            else:
                value = normal(param.shape)
            module._parameters[pname] = torch.nn.Parameter(value)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"stand-in {s.name}: parameters left on the meta device: {left[:3]}")
    for key in ("pad_token_id", "eos_token_id"):
        if getattr(config, key, None) is not None:
            setattr(model.generation_config, key, getattr(config, key))
    models._set_source(model, "")
    return model.eval()


# ----------------------------------------------------------------------------- tokenizers

@functools.lru_cache(maxsize=4)
def offline_tokenizer(vocab: int):
    """An offline tokenizer whose ids all fit a model of ``vocab`` logits: GPT-2's BPE
    (50,257) when it fits, else SmolLM2's (49,152), else a local BPE of 2,048 tokens. The
    model keeps its checkpoint's vocabulary size; the extra rows are never used."""
    from .. import tokenization as tok_lib
    if vocab >= 50257:
        return tok_lib.gpt2_tokenizer()
    if vocab >= 49152:
        return tok_lib.smollm2_tokenizer(tok_lib.SMOLLM2_TOKENIZER_CACHE)
    return tok_lib.train_bpe_tokenizer(tok_lib.default_corpus_texts(), vocab_size=min(vocab, 2048))


class StandIns:
    """What :func:`use_standins` installs: builds hub ids as stand-ins (hub.substitute)."""

    def __init__(self, depth: int = 1, width: int = 1, device: Optional[str] = None, seed: int = 0):
        self.depth, self.width, self.device, self.seed = depth, width, device, seed
        self.built: list[str] = []  # the hub ids served so far (tests read it)

    def model(self, name: str, tokenizer, *, dtype: str = "float32", quantization=None):
        self.built.append(name)
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        return build(name, depth=self.depth, width=self.width, dtype=dtype, device=self.device,
                     quantization=quantization, seed=self.seed, pad_token_id=pad, eos_token_id=eos)

    def tokenizer(self, name: str):
        return offline_tokenizer(spec(name).vocab)

    def fingerprint(self, name: str) -> str:
        return f"standin:{spec(name).name}:d{self.depth}w{self.width}:s{self.seed}"


@contextlib.contextmanager
def use_standins(depth: int = 1, width: int = 1, *, device: Optional[str] = None, seed: int = 0):
    """Within the block, a params file's hub ids (``source: pretrained``, ``tokenizer.kind:
    pretrained``) are built as stand-ins scaled by ``depth`` / ``width`` instead of being
    downloaded: the rest of the run (quantisation, LoRA, caches, training, generation) is the
    real code. Yields the :class:`StandIns` provider. Teacher-cache keys name the stand-in,
    so its signals never mix with a real checkpoint's."""
    provider = StandIns(depth, width, device, seed)
    previous = hub.set_substitute(provider)
    try:
        yield provider
    finally:
        hub.set_substitute(previous)
