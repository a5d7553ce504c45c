"""Teacher signals computed once, stored on disk, reused by every method and seed.

With the data fixed, what a token-level objective needs from the teacher at each response
position is identical for every method, seed and epoch. So it is computed in one teacher
pass, saved as safetensors keyed by (teacher, tokenizer, data, format), and training runs
with no teacher body in memory — what lets a 13B 4-bit teacher be unloaded before a 7B
student trains on one 16 GB GPU, and what makes the 30-epoch recipe cheap.

Two formats:
- ``hidden`` (exact): the teacher's final (post-norm) hidden state at each position, in the
  dtype the teacher computed it in, plus its output head, stored once. Teacher logits are
  one [N, H] × [H, V] matmul away (`losses.TeacherHidden`), bit-for-bit what the online
  teacher's head produces from the same hidden states, so every token-level objective (kd,
  rkl, jsd, dpkd_token) and the pre-train KD term train exactly as online. The lean losses
  compute those logits chunk by chunk, so the teacher's [N, V] logits never exist at once.
  Cost: H values per position (576 for SmolLM2: ~2.3 KB in fp32; 5120 for a 13-14B teacher:
  10 KB in fp16).
- ``topk`` (compact, biased): the teacher's top-k ids and log-probs per position (8·k
  bytes). DPKD needs log p(s) for the student's argmax s, which is only bounded when s is
  outside the top-k (losses.dpkd_token_loss_from_teacher_topk); KD uses k tokens plus a
  rest bucket. Both are biased estimates of the exact loss (as RS-KD, arXiv 2503.16870,
  shows for top-k KD): the option for a disk too small for ``hidden``.

Bounded by disk, not by RAM. A cache folder holds `signals.safetensors` (a standard
safetensors file) and `index.json` (example id → (first row, rows)). The file is written
while the teacher pass goes: its header (every tensor's dtype, shape and place; the row
count is known from the tokenised examples before the pass) first, its full size reserved
(`posix_fallocate`: a disk too small fails before the teacher pass, in one line), then each
batch's rows in order, so the build holds one batch. Training reads only the rows of the
current batch with positioned reads (`SignalFile`): memory is O(batch) whatever the cache's
size. (safetensors' own `safe_open` maps the whole file: that address space counts against
a memory limit such as `prlimit --as`, and every page it touches stays in the process's
RSS, so a 30-epoch run would end up holding the cache.) The head is read once per device.

Crash-safe, shared: a build writes `<key>.tmp-<pid>/` and renames it when complete, so a
killed build never looks complete; a build's temp folder is removed on any error, and a
killed one's (its pid dead) when the cache folder is next opened. Builds of one key take a
lock (`<key>.lock`, fcntl.flock): a second run waits and then reads the first one's cache.
A full disk stops the build with one line naming the file, the bytes it needed and the bytes
free. Keys name the teacher by its weights (`models.weights_fingerprint`), not only its
path, so a rebuilt teacher never meets the signals of the old one. A cache that cannot be
read (a truncated file, say) is rebuilt with a one-line warning.

The teacher's *sampled responses* (SeqKD's training data, DPKD-seq's chosen side) and its
log-probs of them are cached once per (teacher, data, seed, length) and shared by every run
that uses them. They are not streamed: one response and one float per training record, they
are the training set itself, which a run holds in memory anyway (the per-position signals
above are what grows to tens of GB).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import data as data_lib
from . import losses
from .objectives import response_hidden
from .choices import CACHE_FORMATS
from .config import to_dict
from .errors import OutOfResources, human_bytes
from .io import atomic_write_text, read_json, write_json, write_jsonl

#: 4: streamed file, hidden states and head in the teacher's own dtype (3: fp32, in memory)
CACHE_VERSION = 4
SIGNALS, INDEX = "signals.safetensors", "index.json"
log = logging.getLogger("dpkd_lib")

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}
_NAMES = {v: k for k, v in _DTYPES.items()}
#: a header larger than this is not one we wrote (safetensors' own limit is 100 MB)
_MAX_HEADER = 100_000_000


def teacher_identity(cfg, tokenizer) -> dict:
    """What makes a run's teacher signals what they are: the teacher's settings and its
    weights (a saved teacher is named by a hash of its files, not by where it lies), the
    tokenizer and its vocabulary size. ``cfg`` is a RunConfig with a teacher section."""
    from .models import weights_fingerprint   # here: the cache itself loads without transformers
    teacher = to_dict(cfg.teacher)
    if teacher["source"] == "saved":
        teacher.pop("name_or_path")
    return {"teacher": teacher, "weights": weights_fingerprint(cfg.teacher),
            "tokenizer": to_dict(cfg.tokenizer), "vocab": len(tokenizer)}


def cache_key(**identity) -> str:
    """A short stable key of what made a cache (teacher, tokenizer, data, format, ...)."""
    blob = json.dumps(dict(identity, v=CACHE_VERSION), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the file

def _layout(specs: dict) -> tuple[bytes, dict, int]:
    """The safetensors header of tensors `specs` ({name: (dtype, shape)}, laid out in that
    order): (header bytes, {name: (dtype, shape, first byte)}, data bytes). The JSON is
    padded with spaces to 8 bytes, as safetensors does."""
    meta, where, offset = {}, {}, 0
    for name, (dtype, shape) in specs.items():
        size = math.prod(shape) * dtype.itemsize
        meta[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        where[name] = (dtype, tuple(shape), offset)
        offset += size
    blob = json.dumps(meta, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, where, offset


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


class SignalWriter:
    """A safetensors file written rows first to last as they come: one batch in memory."""

    def __init__(self, path: Path, specs: dict):
        self.path = Path(path)
        header, self.where, data = _layout(specs)
        self.base, self.size = len(header), len(header) + data
        self.filled = {name: 0 for name in specs}  # bytes written, per tensor
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:  # reserve the whole file now: a disk too small fails before the teacher pass
                os.posix_fallocate(self.fd, 0, self.size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise  # ENOSPC among them; a file system that cannot reserve: the writes tell
            self._write(memoryview(header), 0)
        except BaseException:
            self.abort()
            raise

    def _write(self, view: memoryview, offset: int) -> None:
        while view.nbytes:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def append(self, name: str, tensor: torch.Tensor) -> None:
        """The next rows of tensor `name` (its dtype, its row shape)."""
        dtype, shape, begin = self.where[name]
        if tensor.dtype != dtype or tuple(tensor.shape[1:]) != shape[1:]:
            raise ValueError(f"{self.path}: {name} rows {tuple(tensor.shape)} {tensor.dtype} do not "
                             f"match its header {shape} {dtype}")
        view = _as_bytes(tensor)
        end = begin + math.prod(shape) * dtype.itemsize
        at = begin + self.filled[name]
        if at + view.nbytes > end:
            raise ValueError(f"{self.path}: more rows of {name} than its header's {shape[0]}")
        self._write(view, self.base + at)
        self.filled[name] += view.nbytes

    def close(self) -> None:
        """Check every tensor is complete, then flush to disk."""
        try:
            for name, (dtype, shape, _) in self.where.items():
                if self.filled[name] != math.prod(shape) * dtype.itemsize:
                    raise ValueError(f"{self.path}: {name} has {self.filled[name]} of "
                                     f"{math.prod(shape) * dtype.itemsize} bytes")
            os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class MemoryWriter:
    """The same sink in memory (preallocated tensors): the in-memory cache of `compute_signals`
    with no folder, which the bench and the tests set against the file."""

    def __init__(self, specs: dict):
        self.tensors = {name: torch.empty(shape, dtype=dtype) for name, (dtype, shape) in specs.items()}
        self.filled = {name: 0 for name in specs}

    def append(self, name: str, tensor: torch.Tensor) -> None:
        n = tensor.shape[0]
        self.tensors[name][self.filled[name]:self.filled[name] + n] = tensor.detach().cpu()
        self.filled[name] += n


class SignalFile:
    """A safetensors file read by rows: positioned reads (`os.preadv`) of the wanted rows into
    one buffer of their size, nothing mapped, nothing else read. Checks on open that the file
    is as long as its header says (a truncated cache is refused here, not mid-run)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0).ljust(8, b"\0"))
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise ValueError(f"{self.path}: not a safetensors file (header length {n}, file {size} bytes)")
            meta = json.loads(os.pread(self.fd, n, 8))
            meta.pop("__metadata__", None)
            self.base = 8 + n
            self.where = {name: (_DTYPES[m["dtype"]], tuple(m["shape"]), m["data_offsets"][0])
                          for name, m in meta.items()}
            data = max((m["data_offsets"][1] for m in meta.values()), default=0)
            if self.base + data != size:
                raise ValueError(f"{self.path}: {size} bytes, its header says {self.base + data}: "
                                 f"truncated or damaged")
        except BaseException:
            self.close()
            raise

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple:
        return self.where[name][1]

    def rows(self, name: str, ranges) -> torch.Tensor:
        """Rows [a, b) of tensor `name` for each (a, b) of `ranges`, concatenated."""
        dtype, shape, begin = self.where[name]
        row = math.prod(shape[1:]) * dtype.itemsize
        total = sum(b - a for a, b in ranges)
        buf = torch.empty(total * row, dtype=torch.uint8)
        view, pos = memoryview(buf.numpy()), 0
        for a, b in ranges:
            if not 0 <= a <= b <= shape[0]:
                raise IndexError(f"{self.path}: rows {a}:{b} of {name}, which has {shape[0]}")
            want, offset = view[pos:pos + (b - a) * row], self.base + begin + a * row
            while want.nbytes:
                n = os.preadv(self.fd, [want], offset)
                if n == 0:
                    raise ValueError(f"{self.path}: ends before rows {a}:{b} of {name}")
                want, offset = want[n:], offset + n
            pos += (b - a) * row
        return buf.view(dtype).reshape(total, *shape[1:])

    def read(self, name: str) -> torch.Tensor:
        return self.rows(name, [(0, self.shape(name)[0])]).reshape(self.shape(name))

    def close(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = close


# ----------------------------------------------------------------------------- the cache

class TeacherCache:
    """Per-position teacher signals over a data set, in one of the two formats, held in a
    `SignalFile` (read by rows) or, for the in-memory form, a dict of tensors."""

    def __init__(self, store, index: dict, fmt: str):
        self.store, self.index, self.format = store, index, fmt
        self._heads: dict = {}

    @property
    def k(self) -> int:
        return self._shape("topk_ids")[1]

    def _shape(self, name) -> tuple:
        return tuple(self.store[name].shape) if isinstance(self.store, dict) else self.store.shape(name)

    def _take(self, name: str, ranges) -> torch.Tensor:
        if isinstance(self.store, dict):
            whole = self.store[name]
            return torch.cat([whole[a:b] for a, b in ranges]) if ranges else whole[:0].clone()
        return self.store.rows(name, ranges)

    def ranges(self, example_ids, counts=None) -> list[tuple[int, int]]:
        """(first row, end) of these examples' positions, in batch order: the same order in
        which `objectives.response_logits` flattens a batch."""
        out = []
        for j, ex_id in enumerate(example_ids):
            start, count = self.index[ex_id]
            if counts is not None and counts[j] != count:
                raise ValueError(f"teacher cache has {count} positions for example {ex_id}, the batch "
                                 f"has {counts[j]}: the cache was built on other data; rebuild it")
            out.append((start, start + count))
        return out

    def rows(self, example_ids, counts=None) -> torch.Tensor:
        """Row numbers of these examples' positions, concatenated in batch order."""
        return torch.cat([torch.arange(a, b) for a, b in self.ranges(example_ids, counts)])

    def gather(self, example_ids, counts=None) -> tuple[torch.Tensor, torch.Tensor]:
        """topk format: ([1, N, k] ids, [1, N, k] log-probs)."""
        ranges = self.ranges(example_ids, counts)
        return (self._take("topk_ids", ranges).long().unsqueeze(0),
                self._take("topk_logps", ranges).unsqueeze(0))

    def head(self, device=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """hidden format: the teacher's output head (weight [V, H], bias [V] or None) on
        `device`, read once per device and kept."""
        key = str(device)
        if key not in self._heads:
            self._heads[key] = (self._to_device("head_weight", device), self._to_device("head_bias", device))
        return self._heads[key]

    def _to_device(self, name: str, device, block: int = 64 * 1024 ** 2) -> Optional[torch.Tensor]:
        """Tensor `name` on `device`, read from the file in blocks of ~64 MiB: a 14B teacher's
        head (1.5 GB in fp16) never sits whole in host memory on its way to the GPU."""
        if name not in self.store:
            return None
        if isinstance(self.store, dict):
            return self.store[name].to(device)
        dtype, shape, _ = self.store.where[name]
        if device is None or torch.device(device).type == "cpu":
            return self.store.read(name)
        out = torch.empty(shape, dtype=dtype, device=device)
        step = max(1, block // max(1, math.prod(shape[1:]) * dtype.itemsize))
        for a in range(0, shape[0], step):
            b = min(a + step, shape[0])
            out[a:b] = self.store.rows(name, [(a, b)]).reshape(b - a, *shape[1:]).to(device)
        return out

    def teacher_hidden(self, example_ids, counts=None, device=None) -> losses.TeacherHidden:
        """hidden format: these positions' hidden states [1, N, H] and the head, from which
        the losses compute the teacher's logits (chunk by chunk in the lean ones)."""
        hidden = self._take("hidden", self.ranges(example_ids, counts))
        if device is not None:
            hidden = hidden.to(device)
        return losses.TeacherHidden(hidden.unsqueeze(0), *self.head(device))

    def teacher_logits(self, example_ids, counts=None, device=None) -> torch.Tensor:
        """hidden format: the teacher's logits [1, N, V] at these positions, exactly."""
        return self.teacher_hidden(example_ids, counts, device).logits()

    @classmethod
    def load(cls, folder: Path) -> "TeacherCache":
        """Open a complete cache folder: the index in memory, the signals read by rows."""
        info = json.loads((Path(folder) / INDEX).read_text())
        index = {k: tuple(v) for k, v in info["index"].items()}
        return cls(SignalFile(Path(folder) / SIGNALS), index, info.get("format", "topk"))

    def close(self) -> None:
        if isinstance(self.store, SignalFile):
            self.store.close()


def output_head(teacher) -> dict[str, torch.Tensor]:
    """The teacher's output head in its own dtype (for the exact `hidden` format)."""
    config = getattr(teacher, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError("teacher applies logit soft-capping after its head: the `hidden` cache "
                         "cannot reproduce it; use train.cache_format=topk")
    head = teacher.get_output_embeddings()
    weight = head.weight
    if not weight.dtype.is_floating_point:
        raise ValueError("teacher's output head is quantized: use train.cache_format=topk "
                         "(or keep lm_head unquantized)")
    out = {"head_weight": weight.detach()}
    if getattr(head, "bias", None) is not None:
        out["head_bias"] = head.bias.detach()
    return out


def _response_counts(ex) -> int:
    """Response positions of one tokenised example (as `objectives.response_counts` counts
    them in a batch): labels after the first that are not -100."""
    return sum(1 for y in ex["labels"][1:] if y != -100)


def plan_index(examples, batch_size: int) -> tuple[list[list[int]], dict, int]:
    """The pass's batches (`data.sorted_batches`), example id → (first row, rows) in that
    order, and the row count: all known before the teacher runs."""
    batches = data_lib.sorted_batches(examples, batch_size)
    index, start = {}, 0
    for idx in batches:
        for i in idx:
            count = _response_counts(examples[i])
            index[examples[i]["id"]] = (start, count)
            start += count
    return batches, index, start


def signal_specs(fmt: str, n_rows: int, *, hidden=None, head=None, k: int = 0) -> dict:
    """{name: (dtype, shape)} of a cache's tensors."""
    if fmt == "hidden":
        specs = {"hidden": (hidden.dtype, (n_rows, hidden.shape[-1]))}
        return specs | {name: (t.dtype, tuple(t.shape)) for name, t in head.items()}
    return {"topk_ids": (torch.int32, (n_rows, k)), "topk_logps": (torch.float32, (n_rows, k))}


@torch.no_grad()
def compute_signals(teacher, examples, pad_id: int, k: int = 32, *, fmt: str = "topk",
                    batch_size: int = 8, device=None, temperature: float = 1.0,
                    progress: bool = True, path: Optional[Path] = None) -> TeacherCache:
    """One teacher pass over tokenised examples, keeping what `fmt` needs per position:
    streamed into the safetensors file `path` (then read by rows), or, with no path, into
    tensors in memory."""
    if fmt not in CACHE_FORMATS:
        raise ValueError(f"unknown cache format '{fmt}'; valid: {', '.join(CACHE_FORMATS)}")
    device = device or next(teacher.parameters()).device
    head = teacher.get_output_embeddings()
    head_tensors = output_head(teacher) if fmt == "hidden" else {}
    batches, index, n_rows = plan_index(examples, batch_size)
    k = min(k, head.weight.shape[0])
    sink = None
    try:
        for idx in tqdm(batches, desc=f"teacher cache ({fmt})", disable=not progress):
            chunk = [examples[i] for i in idx]
            batch = data_lib.collate_sft(chunk, pad_id)
            batch = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in batch.items()}
            hidden, _ = response_hidden(teacher, batch)
            if sink is None:  # the hidden states' dtype is known now: the file's header
                specs = signal_specs(fmt, n_rows, hidden=hidden, head=head_tensors, k=k)
                sink = SignalWriter(path, specs) if path is not None else MemoryWriter(specs)
            if fmt == "hidden":
                sink.append("hidden", hidden)
            else:
                logits = head(hidden.to(head.weight.dtype)).float()
                ids, logps = losses.teacher_topk(logits, k, temperature=temperature)
                sink.append("topk_ids", ids.to(torch.int32))
                sink.append("topk_logps", logps.float())
        if sink is None:  # no examples
            specs = signal_specs(fmt, 0, hidden=torch.empty(0, head.weight.shape[1], dtype=head.weight.dtype),
                                 head=head_tensors, k=k)
            sink = SignalWriter(path, specs) if path is not None else MemoryWriter(specs)
        for name, tensor in head_tensors.items():
            sink.append(name, tensor)
        if path is None:
            return TeacherCache(sink.tensors, index, fmt)
        sink.close()
    except BaseException:
        if isinstance(sink, SignalWriter):
            sink.abort()
        raise
    return TeacherCache(SignalFile(path), index, fmt)


# ----------------------------------------------------------------------------- the folder

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(cache_dir: Path) -> list[Path]:
    """Remove the temp folders (`<key>.tmp-<pid>`) of builds whose process is dead (killed
    mid-build); returns them. Live builds' folders stay."""
    removed = []
    for tmp in Path(cache_dir).glob("*.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1]
        if tmp.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def build_lock(folder: Path):
    """Hold `<key>.lock` (fcntl.flock) for a build: a second process building the same
    cache waits here, then finds it complete. The OS drops the lock of a dead process."""
    lock = folder.with_name(folder.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("teacher cache %s is being built by another process: waiting for it", folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open_complete(folder: Path, fmt: str, examples, warn: bool = True) -> Optional[TeacherCache]:
    """The cache in `folder` if complete, of format `fmt` and covering `examples`; None (with
    a one-line warning when there is something unusable) otherwise."""
    if not ((folder / INDEX).exists() and (folder / SIGNALS).exists()):
        return None
    try:
        cache = TeacherCache.load(folder)
        if cache.format == fmt and set(cache.index) >= {ex["id"] for ex in examples}:
            return cache
        cache.close()
        if warn:
            log.warning("warning: teacher cache %s does not cover this data: rebuilding it", folder)
    except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt, never fatal
        if warn:
            log.warning("warning: teacher cache %s is unreadable (%s): rebuilding it", folder,
                        type(exc).__name__)
    return None


def _disk_full(exc: OSError, folder: Path, needed: Optional[int]) -> OutOfResources:
    """One line for a full disk: what could not be written, what it needed, what is free."""
    try:
        free = human_bytes(shutil.disk_usage(folder.parent).free)
    except OSError:
        free = "unknown"
    need = f"needs {human_bytes(needed)}" if needed else "size unknown"
    return OutOfResources(f"no space left for the teacher cache {folder / SIGNALS} ({need}, "
                          f"{free} free on its disk; nothing was kept): free space or point "
                          f"cache_dir at a larger disk, then rerun")


def build(folder: Path, teacher, examples, pad_id: int, k: int, *, meta: dict, fmt: str,
          batch_size: int = 8, device=None, progress: bool = True) -> TeacherCache:
    """Compute the cache into `<folder>.tmp-<pid>/` and rename it `folder` when complete. On
    any error (a full disk: one line) the temp folder is removed and nothing is kept."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cache = compute_signals(teacher, examples, pad_id, k, fmt=fmt, batch_size=batch_size,
                                device=device, progress=progress, path=tmp / SIGNALS)
        cache.close()
        atomic_write_text(tmp / INDEX, json.dumps({"meta": meta, "format": fmt, "index": cache.index}))
        if folder.exists():  # a damaged or foreign cache (under the build lock: not a live one)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(exc, folder, _planned_bytes(teacher, examples, fmt, k, batch_size)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TeacherCache.load(folder)


def _planned_bytes(teacher, examples, fmt: str, k: int, batch_size: int) -> Optional[int]:
    """The signals file's size, from the teacher's head (the hidden states' dtype taken as
    the head's) and the examples' row count."""
    try:
        weight = teacher.get_output_embeddings().weight
        _, _, n_rows = plan_index(examples, batch_size)
        if fmt == "hidden":
            per_row = weight.shape[1] * weight.element_size()
            return n_rows * per_row + weight.numel() * weight.element_size()
        return n_rows * min(k, weight.shape[0]) * 8
    except Exception:  # noqa: BLE001 - only for the message
        return None


def load_or_build(folder: Path, build_teacher, examples, pad_id: int, k: int, *, meta: dict,
                  fmt: str = "topk", batch_size: int = 8, device=None,
                  progress: bool = True) -> TeacherCache:
    """Reuse the cache in `folder` if complete; otherwise load the teacher (a callable, so it
    is never loaded when the cache exists), compute, save, and free the teacher. Builds of
    one folder are serialised (`build_lock`): a run that waited reads the other's cache.
    Stale temp folders of dead builds are removed first."""
    folder = Path(folder)
    if folder.parent.is_dir():
        for tmp in clean_stale(folder.parent):
            log.warning("removed %s, left by a teacher-cache build that was killed", tmp)
    cache = _open_complete(folder, fmt, examples)
    if cache is not None:
        return cache
    folder.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(folder):
        if (folder / INDEX).exists():  # another process finished it while we waited
            cache = _open_complete(folder, fmt, examples, warn=False)
            if cache is not None:
                return cache
        teacher = build_teacher()
        try:
            return build(folder, teacher, examples, pad_id, k, meta=meta, fmt=fmt,
                         batch_size=batch_size, device=device, progress=progress)
        finally:
            del teacher
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def folder(cache_dir, meta: dict, examples) -> Path:
    """The cache folder of these signals: keyed by the teacher (params and weights), the
    tokenizer, the format and the tokenised examples."""
    return Path(cache_dir) / cache_key(**meta, data=data_lib.data_hash(examples))


# ----------------------------------------------------------------------------- teacher samples

def responses_path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / "responses" / f"{key}.jsonl"


def scores_path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / "sequence_logps" / f"{key}.json"


def load_or_sample(path: Path, records, sample, *, write: bool = True) -> list[dict]:
    """`records` with the teacher's sampled response in place of the dataset's: read from
    `path` when it holds exactly these records (each with ``response_ended``), else
    `sample(records)` (one (text, ended by EOS) pair per record; an empty sample keeps the
    dataset response, which ends) and written there."""
    if path.exists():
        try:
            cached = data_lib.read_jsonl(path)
            if [c.get("id") for c in cached] == [r.get("id") for r in records] and \
                    all("response_ended" in c for c in cached):   # older files did not say: sample again
                return cached
        except Exception as exc:  # noqa: BLE001 - unreadable: sample again
            log.warning("warning: %s is unreadable (%s): sampling again", path, type(exc).__name__)
    samples = sample(records)
    out = [dict(r, response=text, response_ended=bool(ended)) if text.strip() else dict(r, response_ended=True)
           for r, (text, ended) in zip(records, samples)]
    if write:
        write_jsonl(path, out)
    return out


def score_rows(rows, score, pad_id: int, *, batch_size: int = 16) -> list[float]:
    """`score(collated batch) -> [B] tensor` over tokenised rows, in length-sorted batches;
    returns one float per row, in the rows' order."""
    out = [0.0] * len(rows)
    for idx in data_lib.sorted_batches(rows, batch_size):
        values = score(data_lib.collate_sft([rows[i] for i in idx], pad_id))
        for i, v in zip(idx, values.tolist()):
            out[i] = float(v)
    return out


def load_or_score(path: Path, rows, score, pad_id: int, *, write: bool = True) -> dict[str, float]:
    """{row id: teacher sequence log-prob} of tokenised rows, computed once (`score_rows`)
    and kept in `path` (a json file) for every run that scores the same rows."""
    ids = [r["id"] for r in rows]
    if path.exists():
        try:
            cached = read_json(path)
            if set(cached) >= set(ids):
                return cached
        except Exception as exc:  # noqa: BLE001 - unreadable: score again
            log.warning("warning: %s is unreadable (%s): scoring again", path, type(exc).__name__)
    unique = list({r["id"]: r for r in rows}.values())
    scores = dict(zip([r["id"] for r in unique], score_rows(unique, score, pad_id)))
    if write:
        write_json(path, scores)
    return scores

