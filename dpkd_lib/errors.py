"""Exceptions, one per concept. The user's to fix: printed as one line by the command line
and the study driver (exit 2), no traceback. `TrainingFault` is numerical (exit 3)."""
from __future__ import annotations

import errno
import re


class ConfigError(ValueError):
    """Bad params: the message names the key (and the file) and the fix."""


class DataError(ValueError):
    """Bad or empty data set (after filtering), with the per-reason report in the message."""


class ModelLoadError(OSError):
    """A model or tokenizer that cannot be loaded: no network for a hub id, a missing or
    corrupt folder, a missing wheel. (OSError: what transformers raises for the same.)"""


class VocabularyMismatch(ValueError):
    """Teacher and student do not share one vocabulary (DPKD compares token distributions)."""


class MemoryPlanError(ValueError):
    """A training plan that does not fit the device's memory; the message lists the fixes."""


class RunBusy(RuntimeError):
    """Another live process holds the run folder."""


class StudyError(RuntimeError):
    """The study driver could not run a notebook (missing params, a failed cell)."""


class OutOfResources(RuntimeError):
    """The machine ran out of memory or disk space: not the run's fault and not corruption.
    The message names what could not be allocated or written (and how much, when known);
    nothing already written is lost and the same command resumes once there is room."""


class TrainingFault(RuntimeError):
    """A numerical fault (NaN/inf loss or weights) that stopped training; the last good
    checkpoint stays."""


USER_ERRORS = (ConfigError, DataError, ModelLoadError, VocabularyMismatch, MemoryPlanError,
               RunBusy, OutOfResources, FileNotFoundError)

_NO_MEMORY = ("can't allocate memory", "DefaultCPUAllocator", "out of memory", "std::bad_alloc",
              "Cannot allocate memory")
_NO_SPACE = ("No space left on device", "Disk quota exceeded")


def _chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or what torch's allocators raise instead (a RuntimeError saying
    "DefaultCPUAllocator: can't allocate memory", CUDA's OutOfMemoryError), anywhere in the
    exception's chain."""
    return any(isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(
        m in str(e) for m in _NO_MEMORY)) or getattr(e, "errno", None) == errno.ENOMEM for e in _chain(exc))


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, also as the text of another library's error (safetensors raises its
    own SafetensorError, torch.save a RuntimeError), anywhere in the exception's chain."""
    return any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or
               any(m in str(e) for m in _NO_SPACE) for e in _chain(exc))


def allocation_size(exc: BaseException) -> str:
    """How much an allocator said it tried to allocate (" (it tried to allocate 1.2 GB)"),
    or "" when it did not say."""
    for e in _chain(exc):
        found = re.search(r"(?:tried to allocate|allocate) ([\d.]+ ?(?:bytes|[KMGT]i?B))", str(e), re.I)
        if found:
            amount = found.group(1)
            if amount.endswith("bytes"):
                amount = human_bytes(int(float(amount.split()[0])))
            return f" (it tried to allocate {amount})"
    return ""


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def out_of_resources(exc: BaseException, doing: str, kept: str, rerun: str = "rerun the same command to "
                     "resume") -> OutOfResources | None:
    """`exc` as one line if it is a memory or disk exhaustion, else None. ``doing`` says
    what was going on ("the final evaluation"), ``kept`` what stays, ``rerun`` how to go on."""
    if isinstance(exc, OutOfResources):
        return exc
    if is_out_of_memory(exc):
        return OutOfResources(f"not enough memory during {doing}{allocation_size(exc)}; {kept}; free memory "
                              f"(or lower the batch sizes), then {rerun}")
    if is_disk_full(exc):
        where = next((getattr(e, "filename", None) for e in _chain(exc) if getattr(e, "filename", None)), None)
        return OutOfResources(f"no space left on the disk during {doing}"
                              f"{f' (writing {where})' if where else ''}; {kept}; free space, then {rerun}")
    return None
