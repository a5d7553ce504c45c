"""Teacher signals computed once, stored on disk, reused by every method and seed.

Token-level objectives only need, at each response position, a few numbers from the teacher:
its top-k token ids and their log-probabilities (the argmax is the first). With the data
fixed, these are identical for every method, seed and epoch, so they are computed in one
pass, saved as safetensors keyed by (teacher, tokenizer, data, k), and training then runs
with no teacher in memory — what lets a 13B 4-bit teacher be unloaded before a 7B student
trains on one 16 GB GPU, and what makes the 30-epoch recipe cheap.

Layout of a cache folder: `signals.safetensors` with `topk_ids` [P, k] int32 and
`topk_logps` [P, k] float32 over all P response positions of the data set, and
`index.json` mapping example id → (start, count) plus the key fields.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import data as data_lib
from . import losses
from .results import atomic_write_text

FORMAT_VERSION = 1


def cache_key(teacher_params: dict, tokenizer_name: str, data_hash: str, k: int) -> str:
    blob = json.dumps({"teacher": teacher_params, "tokenizer": tokenizer_name,
                       "data": data_hash, "k": k, "v": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TeacherCache:
    def __init__(self, topk_ids: torch.Tensor, topk_logps: torch.Tensor, index: dict):
        self.topk_ids, self.topk_logps, self.index = topk_ids, topk_logps, index

    @property
    def k(self) -> int:
        return self.topk_ids.shape[1]

    def gather(self, example_ids, counts=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Signals of these examples' response positions, concatenated in batch order: the
        same order as `train.response_logits` flattens a batch. Returns [1, N, k] tensors."""
        rows = []
        for j, ex_id in enumerate(example_ids):
            start, count = self.index[ex_id]
            if counts is not None and counts[j] != count:
                raise ValueError(f"teacher cache has {count} positions for example {ex_id}, the batch "
                                 f"has {counts[j]}: the cache was built on other data; rebuild it")
            rows.append(torch.arange(start, start + count))
        rows = torch.cat(rows)
        return self.topk_ids[rows].long().unsqueeze(0), self.topk_logps[rows].unsqueeze(0)

    def save(self, folder: Path, meta: dict) -> None:
        """Write into a temp folder and rename: a killed build never looks complete."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({"topk_ids": self.topk_ids.contiguous(), "topk_logps": self.topk_logps.contiguous()},
                  str(tmp / "signals.safetensors"))
        atomic_write_text(tmp / "index.json", json.dumps({"meta": meta, "index": self.index}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)

    @classmethod
    def load(cls, folder: Path) -> "TeacherCache":
        tensors = load_file(str(Path(folder) / "signals.safetensors"))
        index = json.loads((Path(folder) / "index.json").read_text())["index"]
        return cls(tensors["topk_ids"], tensors["topk_logps"], {k: tuple(v) for k, v in index.items()})


@torch.no_grad()
def compute_signals(teacher, examples, pad_id: int, k: int, *, batch_size: int = 8,
                    device=None, temperature: float = 1.0, progress: bool = True) -> TeacherCache:
    """One teacher pass over tokenised examples; keeps top-k log-probs of response positions."""
    from .train import response_logits
    device = device or next(teacher.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    ids_parts, logp_parts, index, start = [], [], {}, 0
    starts = {}
    for b in tqdm(range(0, len(order), batch_size), desc="teacher cache", disable=not progress):
        chunk = [examples[i] for i in order[b:b + batch_size]]
        batch = data_lib.collate_sft(chunk, pad_id)
        batch = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in batch.items()}
        logits, _ = response_logits(teacher, batch)
        # k above the vocabulary just keeps every token (an exact cache)
        top_ids, top_logps = losses.teacher_topk(logits[0], min(k, logits.shape[-1]),
                                                 temperature=temperature)
        ids_parts.append(top_ids.to(torch.int32).cpu())
        logp_parts.append(top_logps.float().cpu())
        counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()
        for ex, count in zip(chunk, counts):
            starts[ex["id"]] = (start, count)
            start += count
    index.update(starts)
    return TeacherCache(torch.cat(ids_parts), torch.cat(logp_parts), index)


def load_or_build(folder: Path, build_teacher, examples, pad_id: int, k: int, *, meta: dict,
                  batch_size: int = 8, device=None, progress: bool = True) -> TeacherCache:
    """Reuse the cache in `folder` if complete; otherwise load the teacher (a callable, so it
    is never loaded when the cache exists), compute, save, and free the teacher."""
    folder = Path(folder)
    if (folder / "index.json").exists() and (folder / "signals.safetensors").exists():
        return TeacherCache.load(folder)
    teacher = build_teacher()
    cache = compute_signals(teacher, examples, pad_id, k, batch_size=batch_size, device=device,
                            progress=progress)
    del teacher
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cache.save(folder, meta)
    return cache
