"""Teacher signals computed once, stored on disk, reused by every method and seed.

With the data fixed, what a token-level objective needs from the teacher at each response
position is identical for every method, seed and epoch. So it is computed in one teacher
pass, saved as safetensors keyed by (teacher, tokenizer, data, format), and training runs
with no teacher body in memory — what lets a 13B 4-bit teacher be unloaded before a 7B
student trains on one 16 GB GPU, and what makes the 30-epoch recipe cheap.

Two formats:
- ``hidden`` (exact): the teacher's final (post-norm) hidden state at each position plus its
  output head, stored once. Teacher logits are one [N, H] × [H, V] matmul away, bit-for-bit
  what the online teacher's head produces from the same hidden states, so every token-level
  objective (kd, rkl, jsd, dpkd_token) and the pre-train KD term train exactly as online.
  Cost: H floats per position (576 for SmolLM2: ~2.3 KB in fp32).
- ``topk`` (compact): the teacher's top-k ids and log-probs per position (8·k bytes). DPKD
  needs log p(s) for the student's argmax s, which is only bounded when s is outside the
  top-k (see losses.dpkd_token_loss_from_teacher_topk); KD uses k tokens plus a rest bucket.
  For teachers whose hidden size makes ``hidden`` too large on disk.

A cache folder holds `signals.safetensors` and `index.json` (example id → (start, count)).
Keys name the teacher by its weights (`models.weights_fingerprint`), not only its path, so a
rebuilt teacher never meets the signals of the old one. A cache that cannot be read (a
truncated file, say) is rebuilt with a one-line warning.

The teacher's *sampled responses* (SeqKD's training data, DPKD-seq's chosen side) and its
log-probs of them are cached the same way, once per (teacher, data, seed, length), and
shared by every run that uses them.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import data as data_lib
from . import losses
from .objectives import response_hidden
from .choices import CACHE_FORMATS
from .io import atomic_write_text, read_json, write_json, write_jsonl

CACHE_VERSION = 3
log = logging.getLogger("dpkd_lib")


def cache_key(**identity) -> str:
    """A short stable key of what made a cache (teacher, tokenizer, data, format, ...)."""
    blob = json.dumps(dict(identity, v=CACHE_VERSION), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TeacherCache:
    """Per-position teacher signals over a data set, in one of the two formats."""

    def __init__(self, tensors: dict[str, torch.Tensor], index: dict, fmt: str):
        self.tensors, self.index, self.format = tensors, index, fmt

    @property
    def k(self) -> int:
        return self.tensors["topk_ids"].shape[1]

    def rows(self, example_ids, counts=None) -> torch.Tensor:
        """Row numbers of these examples' positions, concatenated in batch order: the same
        order in which `train.response_logits` flattens a batch."""
        rows = []
        for j, ex_id in enumerate(example_ids):
            start, count = self.index[ex_id]
            if counts is not None and counts[j] != count:
                raise ValueError(f"teacher cache has {count} positions for example {ex_id}, the batch "
                                 f"has {counts[j]}: the cache was built on other data; rebuild it")
            rows.append(torch.arange(start, start + count))
        return torch.cat(rows)

    def gather(self, example_ids, counts=None) -> tuple[torch.Tensor, torch.Tensor]:
        """topk format: ([1, N, k] ids, [1, N, k] log-probs)."""
        rows = self.rows(example_ids, counts)
        return (self.tensors["topk_ids"][rows].long().unsqueeze(0),
                self.tensors["topk_logps"][rows].unsqueeze(0))

    def teacher_logits(self, example_ids, counts=None, device=None) -> torch.Tensor:
        """hidden format: the teacher's logits [1, N, V] at these positions, exactly."""
        rows = self.rows(example_ids, counts)
        hidden = self.tensors["hidden"][rows]
        weight = self.tensors["head_weight"]
        if device is not None:
            hidden, weight = hidden.to(device), weight.to(device)
        logits = hidden @ weight.T
        if "head_bias" in self.tensors:
            logits = logits + self.tensors["head_bias"].to(logits.device)
        return logits.unsqueeze(0)

    def save(self, folder: Path, meta: dict) -> None:
        """Write into a temp folder and rename: a killed build never looks complete."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / "signals.safetensors"))
        atomic_write_text(tmp / "index.json", json.dumps({"meta": meta, "format": self.format,
                                                          "index": self.index}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)

    @classmethod
    def load(cls, folder: Path) -> "TeacherCache":
        tensors = load_file(str(Path(folder) / "signals.safetensors"))
        info = json.loads((Path(folder) / "index.json").read_text())
        index = {k: tuple(v) for k, v in info["index"].items()}
        return cls(tensors, index, info.get("format", "topk"))


def output_head(teacher) -> dict[str, torch.Tensor]:
    """The teacher's output head as plain fp32 tensors (for the exact `hidden` format)."""
    config = getattr(teacher, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError("teacher applies logit soft-capping after its head: the `hidden` cache "
                         "cannot reproduce it; use train.cache_format=topk")
    head = teacher.get_output_embeddings()
    weight = head.weight
    if not weight.dtype.is_floating_point:
        raise ValueError("teacher's output head is quantized: use train.cache_format=topk "
                         "(or keep lm_head unquantized)")
    out = {"head_weight": weight.detach().float().cpu().clone()}
    if getattr(head, "bias", None) is not None:
        out["head_bias"] = head.bias.detach().float().cpu().clone()
    return out


@torch.no_grad()
def compute_signals(teacher, examples, pad_id: int, k: int = 32, *, fmt: str = "topk",
                    batch_size: int = 8, device=None, temperature: float = 1.0,
                    progress: bool = True) -> TeacherCache:
    """One teacher pass over tokenised examples, keeping what `fmt` needs per position."""
    if fmt not in CACHE_FORMATS:
        raise ValueError(f"unknown cache format '{fmt}'; valid: {', '.join(CACHE_FORMATS)}")
    device = device or next(teacher.parameters()).device
    head = teacher.get_output_embeddings()
    parts: dict[str, list] = {"hidden": [], "topk_ids": [], "topk_logps": []}
    index, start = {}, 0
    for idx in tqdm(data_lib.sorted_batches(examples, batch_size), desc=f"teacher cache ({fmt})",
                    disable=not progress):
        chunk = [examples[i] for i in idx]
        batch = data_lib.collate_sft(chunk, pad_id)
        batch = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in batch.items()}
        hidden, _ = response_hidden(teacher, batch)
        if fmt == "hidden":
            parts["hidden"].append(hidden.float().cpu())
        else:
            logits = head(hidden.to(head.weight.dtype)).float()
            ids, logps = losses.teacher_topk(logits, min(k, logits.shape[-1]), temperature=temperature)
            parts["topk_ids"].append(ids.to(torch.int32).cpu())
            parts["topk_logps"].append(logps.float().cpu())
        for ex, count in zip(chunk, (batch["labels"][:, 1:] != -100).sum(1).tolist()):
            index[ex["id"]] = (start, count)
            start += count
    tensors = {name: torch.cat(p) for name, p in parts.items() if p}
    if fmt == "hidden":
        tensors |= output_head(teacher)
    return TeacherCache(tensors, index, fmt)


def load_or_build(folder: Path, build_teacher, examples, pad_id: int, k: int, *, meta: dict,
                  fmt: str = "topk", batch_size: int = 8, device=None,
                  progress: bool = True) -> TeacherCache:
    """Reuse the cache in `folder` if complete; otherwise load the teacher (a callable, so it
    is never loaded when the cache exists), compute, save, and free the teacher."""
    folder = Path(folder)
    if (folder / "index.json").exists() and (folder / "signals.safetensors").exists():
        try:
            cache = TeacherCache.load(folder)
            if cache.format == fmt and set(cache.index) >= {ex["id"] for ex in examples}:
                return cache
            log.warning("warning: teacher cache %s does not cover this data: rebuilding it", folder)
        except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt, never fatal
            log.warning("warning: teacher cache %s is unreadable (%s): rebuilding it", folder,
                        type(exc).__name__)
    teacher = build_teacher()
    cache = compute_signals(teacher, examples, pad_id, k, fmt=fmt, batch_size=batch_size,
                            device=device, progress=progress)
    del teacher
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cache.save(folder, meta)
    return cache


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
    `path` when it holds exactly these records, else `sample(records)` (one string per
    record; an empty sample keeps the dataset response) and written there."""
    if path.exists():
        try:
            cached = data_lib.read_jsonl(path)
            if [c.get("id") for c in cached] == [r.get("id") for r in records]:
                return cached
        except Exception as exc:  # noqa: BLE001 - unreadable: sample again
            log.warning("warning: %s is unreadable (%s): sampling again", path, type(exc).__name__)
    samples = sample(records)
    out = [dict(r, response=s if s.strip() else r["response"]) for r, s in zip(records, samples)]
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

