"""Data: records, prompts, tokenized examples, batches, and the loaders of every data source.

A **record** is a dict ``{"id", "instruction", "context", "response", "category"}`` (the
synthetic set adds ``template``; MiniLLM eval files may add ``references``, a list). Every
source is mapped to records first, so the rest of the pipeline has one input format.

Prompts follow MiniLLM exactly (its ``process_data_dolly.py``, Alpaca style; docs/method.md §4),
because ROUGE-L numbers are only comparable under the same template. Prompt and response
are tokenized separately and concatenated, so ``prompt_len`` is exact and the loss mask can
never leak into the prompt. Labels follow the Hugging Face convention (unshifted, same
length as ``input_ids``, -100 where no loss is taken); the trainer shifts.

Bad records are never silently dropped: ``build_sft_dataset`` counts every drop by reason in
a :class:`FilterReport`, can raise on the first bad record instead (``bad_data="error"``),
and refuses to return an empty data set (a zero-step "successful" run is a bug). A file's
line that is JSON but not an object becomes a :class:`NotARecord` (file and line), which
``load_splits`` drops and counts as ``not_a_record`` in every split, with any other record
no split can use; an empty file, train split or evaluation split is named in one line.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import hub
from .choices import DATA_SOURCES, SPLITS
from .errors import DataError
from .io import numbered_jsonl, read_jsonl, write_jsonl  # noqa: F401  (data files: strict JSON lines)

PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_TEMPLATE_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

IGNORE_INDEX = -100
DROP_REASONS = (
    "not_a_record",
    "missing_field",
    "not_a_string",
    "empty_instruction",
    "empty_response",
    "invalid_unicode",
    "duplicate_id",
    "prompt_too_long",
    "response_too_short",
    "too_long",
)
NO_NETWORK_MESSAGE = "no network: use the cpu profile (synthetic data) or data.path=LOCAL.jsonl"
DOLLY_REPO = "databricks/databricks-dolly-15k"
DOLLY_FILE = "databricks-dolly-15k.jsonl"


# --------------------------------------------------------------------------- prompts


def format_prompt(record: Mapping[str, Any]) -> str:
    """The MiniLLM/Alpaca prompt for a record; the context block only when it is non-empty
    (MiniLLM tests ``len(input) == 0``, so whitespace-only context still counts as input)."""
    context = record.get("context") or ""
    if len(context) == 0:
        return PROMPT_TEMPLATE.format(instruction=record["instruction"])
    return PROMPT_TEMPLATE_WITH_CONTEXT.format(instruction=record["instruction"], input=context)


# --------------------------------------------------------------------------- validation


class Dropped(NamedTuple):
    """Why a record was not turned into an example (reason is one of ``DROP_REASONS``)."""

    reason: str
    detail: str


def _has_lone_surrogate(text: str) -> bool:
    """True if ``text`` cannot be encoded as UTF-8: lone surrogates, which is what invalid
    bytes become when a file is read with ``errors="surrogateescape"`` (see ``read_jsonl``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class NotARecord(NamedTuple):
    """A line of a data file that holds JSON but not an object (``[1, 2]``, ``null``,
    ``"text"``, ``3``). The loaders keep it in its place, so that it is dropped and counted
    as ``not_a_record`` (or refused, naming file and line) like any other bad record."""

    kind: str  # the JSON type: array, null, string, number, boolean
    where: str  # "file:line"


_JSON_KINDS = {list: "array", type(None): "null", str: "string", int: "number", float: "number",
               bool: "boolean"}


def validate_record(record: Any) -> Dropped | None:
    """Structural checks that need no tokenizer. None when the record is usable."""
    if isinstance(record, NotARecord):
        return Dropped("not_a_record", f"a JSON {record.kind}, not an object")  # its id is its file:line
    if not isinstance(record, Mapping):
        return Dropped("not_a_record", f"record is a {type(record).__name__}, not a mapping")
    for key in ("instruction", "response"):
        if key not in record or record[key] is None:
            return Dropped("missing_field", f"no {key!r}")
    for key in ("instruction", "context", "response"):
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            return Dropped("not_a_string", f"{key!r} is a {type(value).__name__}")
    if not record["instruction"].strip():
        return Dropped("empty_instruction", "instruction is empty or whitespace")
    if not record["response"].strip():
        return Dropped("empty_response", "response is empty or whitespace")
    for key in ("instruction", "context", "response"):
        if _has_lone_surrogate(record.get(key) or ""):
            return Dropped("invalid_unicode", f"{key!r} is not valid UTF-8")
    return None


# --------------------------------------------------------------------------- tokenization


def _bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer itself adds one (Llama-style), else []. Probed once per
    tokenizer: GPT-2 and the SmolLM2 GGUF tokenizer add none."""
    cached = getattr(tokenizer, "_dpkd_bos_prefix", None)
    if cached is not None:
        return cached
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    prefix = [bos] if bos is not None and probe and probe[0] == bos else []
    try:
        tokenizer._dpkd_bos_prefix = prefix
    except AttributeError:  # some tokenizers forbid new attributes; probing again is cheap
        pass
    return prefix


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos token: responses could never end")
    return int(eos)


def pad_id_of(tokenizer) -> int:
    """The pad id to use for a tokenizer: its pad token, else its eos token."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else _eos_id(tokenizer)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_example(record: Mapping[str, Any], tokenizer, max_length: int, max_prompt: int,
                     *, min_response_tokens: int = 0) -> dict | Dropped:
    """One record -> one SFT example, or the reason it is dropped.

    input_ids = [bos?] + prompt ids + response ids + [eos]
    labels    = -100 over the prompt, then response ids + [eos]   (unshifted, HF convention)

    No EOS when the record says ``response_ended: false`` (a teacher sample cut at its limit).

    Too long is dropped, never truncated: a truncated response teaches the model to stop
    mid-sentence, and a truncated prompt changes the task. Returns a dict with id,
    input_ids, labels, prompt_len, response_len (response tokens + eos), prompt, response.
    """
    bad = validate_record(record)
    if bad is not None:
        return bad
    prompt = format_prompt(record)
    prompt_ids = _bos_prefix(tokenizer) + _encode(tokenizer, prompt)
    if len(prompt_ids) > max_prompt:
        return Dropped("prompt_too_long", f"{len(prompt_ids)} prompt tokens > max_prompt {max_prompt}")
    response_ids = _encode(tokenizer, record["response"])
    if len(response_ids) < min_response_tokens:
        return Dropped("response_too_short",
                       f"{len(response_ids)} response tokens < min_response_tokens {min_response_tokens}")
    # a teacher sample cut at its length limit (``response_ended`` false) did not end: no EOS
    target = response_ids + ([_eos_id(tokenizer)] if record.get("response_ended", True) else [])
    total = len(prompt_ids) + len(target)
    if total > max_length:
        return Dropped("too_long", f"{total} tokens > max_length {max_length}")
    return {
        "id": str(record.get("id", "")),
        "input_ids": prompt_ids + target,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target,
        "prompt_len": len(prompt_ids),
        "response_len": len(target),
        "prompt": prompt,
        "response": record["response"],
        **({"references": list(record["references"])} if record.get("references") else {}),
    }


@dataclass
class FilterReport:
    """What ``build_sft_dataset`` kept and dropped (per reason); goes into run manifests."""

    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    first_dropped: dict[str, str] = field(default_factory=dict)  # reason -> first record id

    @property
    def total(self) -> int:
        return self.kept + sum(self.dropped.values())

    def add_drop(self, reason: str, record_id: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.first_dropped.setdefault(reason, record_id)

    def absorb(self, other: "FilterReport | None") -> None:
        """Count `other`'s drops here too (records dropped before this report's filter)."""
        for reason, n in (other.dropped.items() if other is not None else ()):
            self.dropped[reason] = self.dropped.get(reason, 0) + n
            self.first_dropped.setdefault(reason, other.first_dropped[reason])

    def as_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "total": self.total, "dropped": dict(self.dropped),
                "first_dropped": dict(self.first_dropped)}

    def __str__(self) -> str:
        n_drop = sum(self.dropped.values())
        text = f"kept {self.kept}/{self.total} records"
        if n_drop:
            reasons = ", ".join(f"{r}={self.dropped[r]}" for r in DROP_REASONS if r in self.dropped)
            text += f"; dropped {n_drop} ({reasons})"
        return text


def build_sft_dataset(records: Iterable[Mapping[str, Any]], tokenizer, *, max_length: int = 512,
                      max_prompt: int = 256, min_response_tokens: int = 0,
                      bad_data: str = "drop", source: str = "") -> tuple[list[dict], FilterReport]:
    """Validate and tokenize records into SFT examples.

    bad_data="drop": skip bad records, counting each by reason in the report;
    bad_data="error": raise ``DataError`` (a ValueError) naming the first bad record and why.
    An empty result raises ``DataError`` with the report, whatever the policy; ``source``
    (e.g. the file) then opens the message.
    """
    if bad_data not in ("drop", "error"):
        raise ValueError(f"bad_data must be 'drop' or 'error', got {bad_data!r}")
    if max_prompt >= max_length:
        raise ValueError(f"max_prompt ({max_prompt}) must be smaller than max_length ({max_length})")
    report = FilterReport()
    examples: list[dict] = []
    seen_ids: set[str] = set()
    for index, record in enumerate(records):
        record_id = _record_id(record, index)
        if record_id in seen_ids:
            out: dict | Dropped = Dropped("duplicate_id", f"id {record_id!r} appears twice")
        else:
            out = tokenize_example(record, tokenizer, max_length, max_prompt,
                                   min_response_tokens=min_response_tokens)
        if isinstance(out, Dropped):
            if bad_data == "error":
                raise DataError(f"bad record {record_id!r} (#{index}): {out.reason}: {out.detail}"
                                f"{_BAD_DATA_FIX}")
            report.add_drop(out.reason, record_id)
            continue
        seen_ids.add(record_id)
        out["id"] = record_id
        examples.append(out)
        report.kept += 1
    if not examples:
        raise DataError(f"{source + ': ' if source else ''}no usable records after filtering: {report}")
    return examples, report


_BAD_DATA_FIX = "; fix the record, or set data.bad_data=drop to drop and count bad records"


def _record_id(record: Any, index: int) -> str:
    if isinstance(record, NotARecord):
        return record.where
    if isinstance(record, Mapping) and record.get("id") not in (None, ""):
        return str(record["id"])
    return f"#{index}"


# --------------------------------------------------------------------------- batching


def collate_sft(examples: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded training batch: input_ids, attention_mask, labels (-100 on padding), ids."""
    if not examples:
        raise ValueError("collate_sft: empty batch")
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "ids": [ex.get("id", "") for ex in examples]}


def sorted_batches(examples: Sequence[Mapping[str, Any]], batch_size: int) -> list[list[int]]:
    """Indices of tokenised ``examples`` in batches of ``batch_size``, shortest first (a
    stable sort on len(input_ids)): the least padding for a pass where order does not matter
    (scoring, caching, evaluation). A caller that needs the rows back in their own order maps
    its results through these indices."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0,
                           drop_last: bool = False, mega_batches: int = 50) -> list[list[int]]:
    """Batches of indices whose members have similar lengths, in a random batch order.

    Why: random batches pad every row to the longest one (~160 tokens against ~90 on the
    synthetic set, docs/design.md §3 cost notes). We shuffle all indices (seeded by seed and
    epoch), cut them into mega-batches of ``mega_batches`` batches, sort each mega-batch by
    length, cut it into batches, and shuffle the batch order. Sorting only inside
    mega-batches keeps the data order random at the scale of an epoch.
    Every index appears exactly once (unless drop_last drops the one short batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(f"length-grouped:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * max(1, mega_batches)
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        mega = sorted(order[start:start + chunk], key=lambda i: (-lengths[i], i))
        batches += [mega[j:j + batch_size] for j in range(0, len(mega), batch_size)]
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    return batches


def random_batches(n: int, batch_size: int, seed: int, epoch: int = 0,
                   drop_last: bool = False) -> list[list[int]]:
    """Plain shuffled batches (the baseline that ``length_grouped_batches`` is compared to)."""
    rng = random.Random(f"random-batches:{seed}:{epoch}")
    order = list(range(n))
    rng.shuffle(order)
    batches = [order[j:j + batch_size] for j in range(0, n, batch_size)]
    return [b for b in batches if len(b) == batch_size] if drop_last else batches


def mean_padded_length(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Mean padded row length (batch max) over all rows: what the model actually computes."""
    rows = sum(len(b) for b in batches)
    return sum(max(lengths[i] for i in b) * len(b) for b in batches if b) / max(rows, 1)


def collate_prompts(items: Sequence[Mapping[str, Any]], tokenizer, max_prompt: int) -> dict[str, Any]:
    """Left-padded prompt batch for generation (design §7): input_ids, attention_mask, ids,
    prompts, references.

    Accepts records (formatted here) or examples from ``tokenize_example`` (their prompt ids
    are reused). Left padding puts every prompt's last token at the same position, so one
    batched ``generate`` call continues all rows. A prompt longer than ``max_prompt`` keeps
    its last ``max_prompt`` tokens (the "### Response:" cue must survive); eval sets are
    filtered by ``build_sft_dataset`` first, so this is a safety net.
    """
    if not items:
        raise ValueError("collate_prompts: empty batch")
    pad = pad_id_of(tokenizer)
    rows, prompts, refs, ids = [], [], [], []
    for index, item in enumerate(items):
        if "input_ids" in item and "prompt_len" in item:
            ids_ = list(item["input_ids"][: item["prompt_len"]])
            prompt = item.get("prompt") or tokenizer.decode(ids_)
        else:
            prompt = format_prompt(item)
            ids_ = _bos_prefix(tokenizer) + _encode(tokenizer, prompt)
        rows.append(ids_[-max_prompt:])
        prompts.append(prompt)
        refs.append(list(item["references"]) if item.get("references") else [item.get("response", "")])
        ids.append(_record_id(item, index))
    input_ids, attention = left_pad(rows, pad)
    return {"input_ids": input_ids, "attention_mask": attention, "ids": ids, "prompts": prompts,
            "references": refs}


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask). Left padding keeps every
    prompt's last token at the last position, which is where generation continues."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    if device is not None:
        input_ids, mask = input_ids.to(device), mask.to(device)
    return input_ids, mask


# --------------------------------------------------------------------------- pre-training corpus


PYDOC_ASSET = "pydoc_topics.json.gz"
# sha256 of the asset's uncompressed JSON: CPython 3.11.7's pydoc_data.topics
PYDOC_SHA256 = "b32b93153c281b2f92d482f0907dcca305fcef61740739b0d7d66619af59a221"


def pydoc_topics() -> dict[str, str]:
    """CPython's help topics (``pydoc_data.topics``) as shipped in ``dpkd_lib/assets``: the
    text of Python 3.11.7, whatever Python runs. (``pydoc_data`` is regenerated at every
    CPython release, 17 of its 79 topics differ between 3.11.2 and 3.11.7; read from the running
    Python, it made the local tokenizer and the pre-train corpus, so every result, depend on
    the patch version.) Checked against PYDOC_SHA256 on every read."""
    import gzip
    from importlib import resources

    path = resources.files("dpkd_lib") / "assets" / PYDOC_ASSET
    raw = gzip.decompress(path.read_bytes())
    if hashlib.sha256(raw).hexdigest() != PYDOC_SHA256:
        raise DataError(f"{path}: the pydoc corpus asset is damaged (sha256 differs from "
                        f"data.PYDOC_SHA256); restore it from git")
    return json.loads(raw)["topics"]


def pydoc_corpus() -> list[str]:
    """Offline English prose for the pre-training term L_PT and the local BPE tokenizer:
    the CPython help topics of `pydoc_topics`, ~460k characters, in sorted-key order."""
    topics = pydoc_topics()
    texts = [topics[key].strip() for key in sorted(topics)]
    return [t for t in texts if t]


def pretrain_blocks(texts: Iterable[str], tokenizer, block_size: int,
                    max_blocks: int | None = None) -> torch.Tensor:
    """Concatenate texts (eos between documents) and cut into [N, block_size] blocks.

    The tail shorter than a block is dropped; tokenizing stops once ``max_blocks`` are
    filled. Raises DataError when the corpus cannot fill one block.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    eos = _eos_id(tokenizer)
    need = None if max_blocks is None else max_blocks * block_size
    stream: list[int] = []
    for text in texts:
        stream += _encode(tokenizer, text) + [eos]
        if need is not None and len(stream) >= need:
            break
    n_blocks = len(stream) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise DataError(f"pre-train corpus has {len(stream)} tokens: not one block of {block_size}")
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


# --------------------------------------------------------------------------- files


def _to_record(raw: Any, default_id: str, where: str = "") -> dict | NotARecord:
    """Map Dolly ({instruction, context, response, category}), Alpaca/MiniLLM
    ({instruction, input, output}) or our own fields onto a record. Values are passed
    through unchanged (validation happens in ``load_splits`` and ``build_sft_dataset``); a
    value that is not an object becomes a `NotARecord` (``where``: its file and line)."""
    if not isinstance(raw, Mapping):
        return NotARecord(_JSON_KINDS.get(type(raw), type(raw).__name__), where or default_id)
    rec = dict(raw)
    if "context" not in rec and "input" in rec:
        rec["context"] = rec.pop("input")
    if "response" not in rec and "output" in rec:
        output = rec.pop("output")
        if isinstance(output, list):  # several references (MiniLLM eval files)
            rec["references"] = output
            output = output[0] if output else ""
        rec["response"] = output
    rec.setdefault("context", "")
    rec.setdefault("category", "")
    if rec.get("id") in (None, ""):
        rec["id"] = default_id
    return rec


def load_jsonl_records(path: str | os.PathLike, id_prefix: str | None = None) -> list[dict]:
    """Records from a JSONL file in Dolly, Alpaca/MiniLLM or our format."""
    prefix = id_prefix or Path(path).stem
    return [_to_record(raw, f"{prefix}-{i:05d}", f"{path}:{line}")
            for i, (line, raw) in enumerate(numbered_jsonl(path))]


_PROMPT_MARKERS = ("### Instruction:\n", "\n\n### Input:\n", "\n\n### Response:\n")


def _parse_prompt(prompt: str) -> tuple[str, str] | None:
    """(instruction, input) back out of a prompt built with our templates, else None."""
    start, mid, end = _PROMPT_MARKERS
    if start not in prompt or not prompt.endswith(end):
        return None
    body = prompt.split(start, 1)[1][: -len(end)]
    if mid in body:
        instruction, context = body.split(mid, 1)
        return instruction, context
    return body, ""


def load_minillm_processed(path: str | os.PathLike) -> list[dict]:
    """Records from one of MiniLLM's processed JSONL files.

    Its ``process_data_dolly.py`` writes {"instruction", "prompt", "input", "output"}; some
    eval files carry only {"prompt", "output"} (output possibly a list of references). A
    ``prompt`` in our template is parsed back into instruction/context so that
    ``format_prompt`` rebuilds the identical string; any other prompt becomes the
    instruction.
    """
    records = []
    for i, (line, raw) in enumerate(numbered_jsonl(path)):
        if not isinstance(raw, Mapping):
            records.append(_to_record(raw, "", f"{path}:{line}"))
            continue
        raw = dict(raw)
        prompt = raw.pop("prompt", None)
        if "instruction" not in raw and isinstance(prompt, str):
            parsed = _parse_prompt(prompt)
            raw["instruction"], raw["input"] = parsed if parsed else (prompt, "")
        records.append(_to_record(raw, f"{Path(path).stem}-{i:05d}"))
    return records


def load_dolly_hub(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """databricks-dolly-15k from the Hugging Face hub (one JSONL file, ~13 MB).

    A copy already in the hub cache is used without any network call. Otherwise, offline
    (HF_HUB_OFFLINE etc.) or with the hub unreachable, this fails at once with a message
    naming the offline ways; any download failure becomes the same one-line DataError.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError(f"huggingface_hub is not installed; {NO_NETWORK_MESSAGE}") from None
    kwargs = dict(repo_type="dataset", cache_dir=str(cache_dir) if cache_dir else None)
    try:
        local = hf_hub_download(DOLLY_REPO, DOLLY_FILE, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - not cached: try the network below
        local = None
    if local is None:
        if hub.offline():
            raise DataError(f"cannot get {DOLLY_REPO} (offline mode, no cached copy): {NO_NETWORK_MESSAGE}")
        if not hub.reachable():
            raise DataError(f"cannot get {DOLLY_REPO} (hub unreachable): {NO_NETWORK_MESSAGE}")
        try:
            local = hf_hub_download(DOLLY_REPO, DOLLY_FILE, etag_timeout=10, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure has the same remedy
            raise DataError(f"cannot get {DOLLY_REPO} ({type(exc).__name__}): {NO_NETWORK_MESSAGE}") from None
    records = []
    for i, (line, raw) in enumerate(numbered_jsonl(local)):
        rec = _to_record(raw, f"dolly-{i:05d}", f"{local}:{line}")
        if isinstance(rec, dict):
            rec["id"] = f"dolly-{i:05d}"
        records.append(rec)
    return records


def minillm_dolly_split(records: Sequence[Mapping[str, Any]], seed: int, n_valid: int = 1000,
                        n_test: int = 500, *, tokenizer=None, min_response_tokens: int = 11,
                        max_prompt: int = 256) -> dict[str, list[dict]]:
    """MiniLLM's Dolly processing as a split: {"train", "valid", "test"}.

    With a tokenizer, records are first filtered as in MiniLLM (response >= 11 tokens,
    prompt <= 256 tokens, docs/method.md §4) so the split sizes are the published ones; without
    one, that filtering is left to ``build_sft_dataset``. A seeded shuffle then takes
    ``n_test`` for DollyEval, ``n_valid`` for validation and the rest for training.
    """
    kept = [dict(r) if isinstance(r, Mapping) else r for r in records]
    if tokenizer is not None:
        def ok(rec: dict) -> bool:
            out = tokenize_example(rec, tokenizer, max_length=10**9, max_prompt=max_prompt,
                                   min_response_tokens=min_response_tokens)
            return not isinstance(out, Dropped)
        kept = [r for r in kept if ok(r)]
    if n_valid + n_test >= len(kept):
        raise DataError(f"{len(kept)} records cannot give {n_valid} valid + {n_test} test + a train split")
    rng = random.Random(f"minillm-dolly:{seed}")
    rng.shuffle(kept)
    return {"train": kept[n_valid + n_test:], "valid": kept[n_test:n_test + n_valid],
            "test": kept[:n_test]}




def _load_split_dir(folder: Path, reader) -> dict[str, list[dict]]:
    """{split: records} from ``folder/{train,valid,test,heldout}.jsonl`` (train required)."""
    out = {s: reader(folder / f"{s}.jsonl") for s in SPLITS if (folder / f"{s}.jsonl").is_file()}
    if "train" not in out:
        raise FileNotFoundError(f"{folder}: no train.jsonl (expected train/valid/test[/heldout].jsonl)")
    return out


def load_records(source: str, path: str | os.PathLike | None = None, seed: int = 0,
                 **sizes: int) -> dict[str, list[dict]]:
    """Records by split for a data source (``DataConfig.source``).

    synthetic: ``generate_synthetic(seed=seed, **sizes)`` (n_train, n_valid, n_test, n_heldout).
    jsonl: a folder with train/valid/test[/heldout].jsonl, or one file split MiniLLM-style.
    dolly_hub: Dolly-15k from the hub, split MiniLLM-style (needs network or a cached copy).
    minillm: a folder of MiniLLM processed files ({split}.jsonl), or one file split as above.
    For the MiniLLM-style split, ``n_valid``/``n_test`` in sizes override 1000/500.
    """
    if source not in DATA_SOURCES:
        raise ValueError(f"unknown data source {source!r}; valid sources: {', '.join(DATA_SOURCES)}")
    if source == "synthetic":
        from .datasets.synthetic import generate_synthetic

        return generate_synthetic(seed=seed, **sizes)
    split_sizes = {k: sizes[k] for k in ("n_valid", "n_test", "tokenizer", "min_response_tokens",
                                         "max_prompt") if k in sizes}
    if source == "dolly_hub":
        return minillm_dolly_split(load_dolly_hub(), seed, **split_sizes)
    if not path:
        raise FileNotFoundError(f"data source {source!r} needs a path (data.path=FILE.jsonl or a folder)")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path not found: {path}")
    reader = load_jsonl_records if source == "jsonl" else load_minillm_processed
    if path.is_dir():
        return _load_split_dir(path, reader)
    records = reader(path)
    if not records:
        raise DataError(f"{path}: the file holds no records (it is empty); point data.path at "
                        f"a JSONL file with one record per line")
    try:
        return minillm_dolly_split(records, seed, **split_sizes)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None


def data_hash(records: Any) -> str:
    """sha256 of the canonical JSON of records (a list, or a dict of splits): the data
    identity written into run manifests and teacher-cache keys. ASCII-escaped so that even
    records with lone surrogates hash."""
    blob = json.dumps(records, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def load_splits(dcfg, tokenizer=None, *, reports: dict | None = None) -> dict[str, list[dict]]:
    """Records by split for a params file's ``data`` section (config.DataConfig), with
    ``train_slice`` applied to the train split (the builds and the methods train on disjoint
    slices of one generated set). Dolly from the hub and MiniLLM's files are filtered first as
    MiniLLM processes them (``min_response_tokens``, ``max_prompt``, with `tokenizer`), so
    the valid and test splits hold only kept records (docs/method.md §4); any other data is
    filtered after the split, where every drop is counted in the run's manifest.

    Records that no split can use (a line that is not an object, a missing or empty field:
    `validate_record`) are dropped here from every split, or refused naming file and line
    with ``data.bad_data: error``; ``reports`` (a dict) receives a `FilterReport` per split
    with drops. An empty train split is a DataError naming where it came from."""
    from .config import parse_slice

    sizes = {"n_valid": dcfg.n_valid, "n_test": dcfg.n_test}
    if dcfg.source == "synthetic":
        sizes |= {"n_train": dcfg.n_train, "n_heldout": dcfg.n_heldout}
    elif dcfg.source in ("dolly_hub", "minillm"):
        sizes |= {"tokenizer": tokenizer, "min_response_tokens": dcfg.min_response_tokens,
                  "max_prompt": dcfg.max_prompt}
    splits = load_records(dcfg.source, path=dcfg.path or None, seed=dcfg.data_seed, **sizes)
    if dcfg.train_slice:
        part = splits["train"][parse_slice(dcfg.train_slice)]
        if not part:
            raise DataError(f"data.train_slice {dcfg.train_slice!r} selects no record of the "
                            f"{len(splits['train'])} in the train split")
        splits["train"] = part
    for name in list(splits):
        splits[name], report = _usable(splits[name], dcfg.bad_data, split_source(dcfg, name))
        if report.dropped and reports is not None:
            reports[name] = report
        if name == "train" and not splits[name]:
            raise DataError(f"{split_source(dcfg, name)}: no usable records in the train split "
                            f"({report}); give it records with an instruction and a response")
    return splits


def _usable(records, bad_data: str, source: str) -> tuple[list, FilterReport]:
    """The records that pass `validate_record`, and a report of the others (bad_data error:
    the first one raises, naming its file and line or its id)."""
    report, kept = FilterReport(), []
    for index, record in enumerate(records):
        bad = validate_record(record)
        if bad is None:
            kept.append(record)
            report.kept += 1
            continue
        record_id = _record_id(record, index)
        if bad_data == "error":
            raise DataError(f"{source}: bad record {record_id!r}: {bad.reason}: {bad.detail}{_BAD_DATA_FIX}")
        report.add_drop(bad.reason, record_id)
    return kept, report


def split_source(dcfg, split: str) -> str:
    """Where a split's records come from, in words for messages: its file, or the setting
    that sized it."""
    if dcfg.source in ("jsonl", "minillm") and dcfg.path and Path(dcfg.path).is_dir():
        return str(Path(dcfg.path) / f"{split}.jsonl")
    if dcfg.source in ("jsonl", "minillm"):
        return f"the {split} split of {dcfg.path}"
    if dcfg.source == "dolly_hub":
        return f"the {split} split of {DOLLY_REPO}"
    size = {"train": "n_train", "valid": "n_valid", "test": "n_test", "heldout": "n_heldout"}[split]
    return f"the synthetic {split} split (data.{size}={getattr(dcfg, size)})"


def check_eval_splits(splits: Mapping[str, Sequence], dcfg, names: Sequence[str],
                      skip_empty: bool) -> None:
    """Refuse, before any model loads, an evaluation split (``eval.splits``) without
    records, unless ``eval.skip_empty_splits`` asks to skip it (it is then listed in the
    summary's ``eval_skipped_splits``)."""
    for name in names:
        if splits.get(name) or skip_empty:
            continue
        where = split_source(dcfg, name)
        missing = where.endswith(".jsonl") and not Path(where).exists()
        state = "does not exist" if missing else "holds no records"
        raise DataError(f"eval.splits names {name!r} but {where} {state}; give it records, remove "
                        f"{name!r} from eval.splits, or set eval.skip_empty_splits=true")


def pretrain_texts(path: str | os.PathLike) -> list[str]:
    """The ``text`` of every line of a pre-train JSONL file (data.pretrain_path); a line
    that is not an object with a string ``text`` is refused, naming file and line."""
    texts = []
    for line, raw in numbered_jsonl(path):
        text = raw.get("text") if isinstance(raw, Mapping) else None
        if not isinstance(text, str):
            kind = _JSON_KINDS.get(type(raw), type(raw).__name__)
            got = "an object without one" if isinstance(raw, Mapping) else f"a JSON {kind}"
            raise DataError(f"{path}:{line}: expected an object with a string 'text' (a pre-train "
                            f"document), got {got}")
        texts.append(text)
    if not texts:
        raise DataError(f"{path}: the pre-train file holds no documents; fill it or set data.pretrain_source")
    return texts

