"""Which floating-point type a run computes in, including ``auto``.

A params file may say ``dtype: auto`` (model weights, the 4-bit compute dtype) or
``autocast_dtype: auto``. ``auto`` is resolved where the dtype is used, from the device the
run has: bfloat16 on a CUDA card of compute capability 8.0 or more (Ampere: A100, L4, H100),
float16 on older cards (T4 is 7.5, P100 6.0: no bf16 arithmetic), float32 on a CPU (fp16
matmuls are slow there and bf16 is not portable). The memory planner resolves it for a named
card the same way (``memory.CARDS`` hold their capabilities), so a plan says which it chose.
"""
from __future__ import annotations

from typing import Optional, Sequence

#: compute capability from which a CUDA card has bf16 arithmetic (Ampere)
BF16_CAPABILITY = (8, 0)


def auto_dtype(device: str = "cuda", capability: Optional[Sequence[int]] = None) -> str:
    """What ``auto`` means on ``device`` ("cpu" or "cuda"), for a card of ``capability``
    ((major, minor); None: ask the current CUDA card, float32 when there is none)."""
    if str(device).split(":")[0] != "cuda":
        return "float32"
    if capability is None:
        import torch
        if not torch.cuda.is_available():
            return "float32"
        capability = torch.cuda.get_device_capability()
    return "bfloat16" if tuple(capability) >= BF16_CAPABILITY else "float16"


def default_device() -> str:
    """"cuda" when a CUDA card is visible, else "cpu" (where models are built by default)."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve(name: str, device: Optional[str] = None,
            capability: Optional[Sequence[int]] = None) -> str:
    """A params dtype name with ``auto`` replaced by :func:`auto_dtype` (``device`` None: the
    device a model is built on here); any other name passes through."""
    if name != "auto":
        return name
    return auto_dtype(device or default_device(), capability)
