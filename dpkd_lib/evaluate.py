"""Evaluation for dpkd-study: sampling, MiniLLM-compatible metrics, length buckets, seeds.

What this module reproduces and why (see docs/method.md §3-§5 and docs/design.md §7):

* **Metrics** follow MiniLLM's ``rouge_metric.py`` (the scorer DPKD's numbers come from):

  - ``normalize_answer``: lowercase, drop ASCII punctuation, collapse whitespace. MiniLLM
    adapted SQuAD v1.1's normaliser but deliberately **does not remove the articles**
    a/an/the (its own comment says so), so neither do we: "The Cat." matches "the cat"
    but not "cat". Changing this would shift EM relative to every published number.
  - ``exact_match``: normalised prediction == normalised reference, max over references.
  - ``rouge_l``: rouge-score's ``RougeScorer(["rougeL"], use_stemmer=True)`` F-measure, max
    over references, applied to the **raw** texts (MiniLLM does not pass them through
    ``normalize_answer``; rouge-score's default tokenizer lowercases, keeps only
    ``[a-z0-9]`` runs and Porter-stems tokens longer than 3 characters). MiniLLM imports a
    HF tokenizer in that file but never uses it; its ``xlingual`` switch is a no-op there.
  - Dataset scores are means **x 100**. Per-example rows keep the raw 0-1 values.
    Unlike MiniLLM we do not round to 4 decimals and do not silently truncate
    predictions/references of different lengths (we raise instead).

* **Sampling** follows MiniLLM's protocol: temperature 1, top_k 0 (= no top-k filter),
  top_p 1, ``no_repeat_ngram_size`` switchable (6 in MiniLLM), 256 new tokens, several
  seeds. Batched, KV-cached ``model.generate`` with left padding (``generate`` builds the
  position ids from the attention mask, so a padded batch gives the same greedy output as
  one prompt at a time; tested).

  transformers v5 trap (checked on 5.24): a generation field left unset - not passed, or
  ``None`` inside a ``GenerationConfig`` object - is filled from the checkpoint's
  ``generation_config`` and then from the global default ``top_k=50``. So "top_k 0" has
  to be passed explicitly as ``top_k=0``; we always do, and we also pin every other field
  that changes the sampled distribution (repetition penalty, minimum length, suppressed
  tokens, typical/min-p, ...) so that a hub checkpoint's own defaults (say ``top_p=0.9``)
  cannot leak into the protocol.

  Randomness: by default (``rng="per_example"``) each prompt gets its own
  ``torch.Generator`` seeded from ``(seed, key)`` and samples by the Gumbel-max trick
  (``argmax(logits' + Gumbel noise)`` is an exact draw from ``softmax(logits')``, where
  ``logits'`` are the temperature/top-k/top-p processed logits). An example's sample then
  does not depend on the batch size, the batch it lands in or the order of the other
  prompts, which keeps numbers comparable between machines that batch differently, and the
  caller's global RNG is left untouched (a resumed training run stays on its RNG stream).
  ``rng="per_batch"`` instead uses transformers' own multinomial sampling under
  ``torch.manual_seed`` derived from ``(seed, batch index)`` inside ``torch.random.fork_rng``;
  it is reproducible only for the same batch size and prompt list. Either way: same seed
  -> same samples (on the same device type and library versions), different seeds ->
  different samples.

* **Reward-hacking checks** (docs/method.md §5): response length (tokens and words), distinct-n,
  within-response repetition, the share of empty and truncated (no EOS) responses, and
  teacher-forced NLL / token accuracy on the reference responses.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import string
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .data import left_pad
from .objectives import response_counts, response_logits

__all__ = [
    "normalize_answer",
    "exact_match",
    "rouge_l",
    "score_predictions",
    "distinct_n",
    "repetition_rate",
    "word_count",
    "DEFAULT_BUCKET_EDGES",
    "length_bucket",
    "bucket_table",
    "mean_sd",
    "generate_ids",
    "generate",
    "teacher_forced_metrics",
    "evaluate_generations",
    "evaluate_splits",
    "evaluate_model",
    "evaluate_saved",
    "reference_metrics",
    "ReferenceTeacher",
    "eval_teacher",
]

# ----------------------------------------------------------------------------- metrics

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, remove ASCII punctuation, collapse runs of whitespace.

    This is MiniLLM's normaliser (SQuAD v1.1 style **without** article removal): "a", "an"
    and "the" are kept, so "The Cat." -> "the cat". Only ``string.punctuation`` is removed
    (Unicode punctuation such as curly quotes survives), exactly as in MiniLLM.
    """
    lowered = s.lower()
    no_punct = "".join(ch for ch in lowered if ch not in _PUNCTUATION)
    return " ".join(no_punct.split())


def _as_references(references: str | Sequence[str]) -> list[str]:
    """Accept one reference string or a non-empty sequence of them."""
    if isinstance(references, str):
        return [references]
    refs = list(references)
    if not refs:
        raise ValueError("at least one reference is required")
    return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in _as_references(references)))


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    """One shared rouge-score scorer: building it (and its stemmer) per call would dominate
    evaluation time on thousands of examples."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure in [0, 1] (rouge-score, Porter stemmer on), max over references.

    Scored on the raw strings with rouge-score's default tokenizer, as MiniLLM does. An
    empty (or punctuation-only) prediction scores 0.
    """
    scorer = _rouge_scorer()
    return max(
        scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure
        for ref in _as_references(references)
    )


def score_predictions(
    predictions: Sequence[str], references_list: Sequence[str | Sequence[str]]
) -> dict[str, float]:
    """Dataset-level EM and ROUGE-L as in MiniLLM's ``compute_metrics``: means x 100.

    Returns ``{"exact_match", "rouge_l", "n"}``. Raises on a length mismatch rather than
    truncating to the shorter list as MiniLLM does (truncation hides data bugs).
    """
    if len(predictions) != len(references_list):
        raise ValueError(f"{len(predictions)} predictions but {len(references_list)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    em = sum(exact_match(p, r) for p, r in zip(predictions, references_list))
    rl = sum(rouge_l(p, r) for p, r in zip(predictions, references_list))
    n = len(predictions)
    return {"exact_match": 100.0 * em / n, "rouge_l": 100.0 * rl / n, "n": n}


def _words(text: str) -> list[str]:
    """Word tokens for length and diversity statistics: the EM-normalised text split on
    whitespace, so punctuation and case do not create spurious distinct n-grams and the
    counts do not depend on the model's tokenizer."""
    return normalize_answer(text).split()


def word_count(text: str) -> int:
    """Number of words of ``text`` (see ``_words``): a tokenizer-independent length."""
    return len(_words(text))


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int, mode: str = "corpus") -> float:
    """Distinct-n (Li et al., 2016) over word tokens (``_words``), in [0, 1].

    ``mode="corpus"`` (default, the original definition): unique n-grams across all texts /
    total n-grams across all texts. It falls when the model says the same thing to every
    prompt (mode collapse). ``mode="mean"``: the per-text ratio averaged over texts that
    have at least one n-gram; it falls when each response repeats itself. Texts shorter
    than n contribute no n-grams; with no n-grams at all the result is 0.0.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if mode == "corpus":
        total = 0
        unique: set[tuple[str, ...]] = set()
        for text in texts:
            grams = _ngrams(_words(text), n)
            total += len(grams)
            unique.update(grams)
        return len(unique) / total if total else 0.0
    if mode == "mean":
        ratios = []
        for text in texts:
            grams = _ngrams(_words(text), n)
            if grams:
                ratios.append(len(set(grams)) / len(grams))
        return sum(ratios) / len(ratios) if ratios else 0.0
    raise ValueError(f"unknown mode {mode!r}; use 'corpus' or 'mean'")


def repetition_rate(texts: Sequence[str], n: int = 4) -> float:
    """Share of a response's word n-grams that repeat an earlier n-gram of the same
    response, averaged over responses with at least one n-gram (0.0 if none).

    Equal to ``1 - distinct_n(texts, n, mode="mean")``; named separately because "the
    student loops" is the reward-hacking symptom docs/method.md §5 asks us to watch. Note that
    with ``no_repeat_ngram_size=k`` sampling, repetition of n-grams with n >= k is
    impossible by construction, so watch n < k (default 4 < MiniLLM's 6).
    """
    if not any(len(_words(t)) >= n for t in texts):
        return 0.0
    return 1.0 - distinct_n(texts, n, mode="mean")


# ----------------------------------------------------------------------------- buckets

DEFAULT_BUCKET_EDGES: tuple[float, ...] = (0, 5, 10, 20, 40, 80, math.inf)


def _fmt_edge(x: float) -> str:
    if math.isinf(x):
        return "inf"
    return str(int(x)) if float(x).is_integer() else str(x)


def length_bucket(n_tokens: float, edges: Sequence[float] = DEFAULT_BUCKET_EDGES) -> str:
    """Half-open bucket label ``"[lo,hi)"`` containing ``n_tokens`` (e.g. 5 -> "[5,10)").

    Used to break scores down by reference length as in the paper's Tables 4/5. Values
    below the first edge or at/above a finite last edge raise: a silently dropped example
    would bias the table.
    """
    edges = list(edges)
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be strictly increasing with >= 2 values, got {edges}")
    for lo, hi in zip(edges, edges[1:]):
        if lo <= n_tokens < hi:
            return f"[{_fmt_edge(lo)},{_fmt_edge(hi)})"
    raise ValueError(f"{n_tokens} outside bucket edges {edges}")


def _bucket_lower(label: str) -> float:
    """Sort key of a bucket label: its lower edge."""
    return float(label[1:].split(",")[0])


def mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample sd with ddof=1, n) of per-seed values, skipping None and NaN: the one
    seed-statistics helper. The sd of one value is NaN (unknown), never 0; the mean of no
    value is NaN."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / n
    if n == 1:
        return mean, float("nan"), 1
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)), n


def bucket_table(
    per_example: Sequence[Mapping[str, Any]] | Any,
    by: str = "bucket",
    edges: Sequence[float] | None = None,
):
    """Scores broken down by reference-length bucket (paper Tables 4/5) or another column.

    ``per_example`` are rows from ``evaluate_generations`` (list of dicts or a DataFrame).
    With ``edges`` the buckets are recomputed from ``reference_tokens``. For each group:
    ``n_examples`` (distinct ids), ``n_rows`` (examples x seeds), and ``rouge_l``,
    ``exact_match`` (x 100), ``response_tokens`` as the mean over seeds of the per-seed
    group means, plus ``rouge_l_sd`` / ``exact_match_sd`` over seeds (NaN with one seed).
    Bucket rows are ordered by their lower edge; other groupings alphabetically.
    """
    import pandas as pd

    df = pd.DataFrame(per_example).copy()
    if df.empty:
        raise ValueError("no rows")
    if edges is not None:
        df["bucket"] = [length_bucket(n, edges) for n in df["reference_tokens"]]
    if "seed" not in df:
        df["seed"] = 0
    rows = []
    for group, gdf in df.groupby(by, sort=False, dropna=False):
        # dropna=False: greedy rows carry seed None (evaluate_splits), one decoding, not a
        # missing value to drop
        per_seed = gdf.groupby("seed", dropna=False)[["rouge_l", "exact_match", "response_tokens"]].mean()
        rl_mean, rl_sd, _ = mean_sd(100.0 * per_seed["rouge_l"])
        em_mean, em_sd, _ = mean_sd(100.0 * per_seed["exact_match"])
        rows.append(
            {
                by: group,
                "n_examples": int(gdf["id"].nunique()) if "id" in gdf else len(gdf),
                "n_rows": len(gdf),
                "rouge_l": rl_mean,
                "rouge_l_sd": rl_sd,
                "exact_match": em_mean,
                "exact_match_sd": em_sd,
                "response_tokens": float(per_seed["response_tokens"].mean()),
            }
        )
    key = (lambda r: _bucket_lower(r[by])) if by == "bucket" else (lambda r: str(r[by]))
    return pd.DataFrame(sorted(rows, key=key)).reset_index(drop=True)


# ----------------------------------------------------------------------------- generation


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _derive_seed(seed: int, key: Any) -> int:
    """Stable 63-bit seed from (seed, key); ``hash()`` is salted per process, sha256 is not."""
    digest = hashlib.sha256(f"{int(seed)}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _PerRowGumbelSampler:
    """Logits processor that turns greedy decoding into exact per-row sampling.

    Applies temperature, top-k (k > 0) and top-p (p < 1) to the scores, then adds Gumbel
    noise drawn from the row's own generator, so that the subsequent ``argmax`` in
    ``generate(do_sample=False)`` is a draw from the filtered softmax. Each row draws one
    full-vocabulary noise vector per step whether or not it has finished, so its stream
    depends only on its own seed and the step number.
    """

    def __init__(self, row_seeds: Sequence[int], temperature: float, top_k: int, top_p: float):
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

        self.row_seeds = [int(s) for s in row_seeds]
        self.generators: list[torch.Generator] | None = None  # made on the scores' device
        self.temperature = float(temperature)
        self.top_k = TopKLogitsWarper(top_k=int(top_k)) if top_k > 0 else None
        self.top_p = TopPLogitsWarper(top_p=float(top_p)) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k is not None:
            scores = self.top_k(input_ids, scores)
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        if self.generators is None:  # lazily: with device_map the logits may not be on device 0
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.row_seeds]
        vocab = scores.shape[-1]
        tiny = torch.finfo(torch.float32).tiny
        noise = torch.stack(
            [torch.rand(vocab, generator=g, device=scores.device, dtype=torch.float32) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(noise.clamp_(min=tiny, max=1.0 - 1e-7)))
        return scores + gumbel


def _encode_prompts(tokenizer, prompts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    enc = tokenizer(list(prompts), add_special_tokens=add_special_tokens)
    ids = [list(x) for x in enc["input_ids"]]
    for p, x in zip(prompts, ids):
        if not x:
            raise ValueError(f"prompt encodes to zero tokens: {p!r}")
    return ids


def _special_ids(model, tokenizer) -> tuple[int | list[int] | None, int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    if pad is None:
        pad = 0
    return eos, int(pad)


def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    no_repeat_ngram_size: int = 0,
    do_sample: bool = True,
    seed: int = 0,
    keys: Sequence[Any] | None = None,
    rng: str = "per_example",
    add_special_tokens: bool = True,
    progress: bool = True,
) -> list[list[int]]:
    """Sample (or greedily decode) continuations; return the new token ids per prompt.

    Returned ids stop before the first EOS (EOS and the padding after it are dropped); a
    response that hit ``max_new_tokens`` has exactly that many ids. Order matches
    ``prompts``. Use this where the ids matter (e.g. on-policy student samples for the
    sequence-level DPKD loss) and ``generate`` where text matters.

    Prompts are encoded with ``add_special_tokens`` (as ``tokenizer.encode`` does in
    MiniLLM), sorted longest first (similar lengths share a batch, so less padding, and an
    out-of-memory error shows up on the first batch), left-padded by hand (the tokenizer is
    not mutated), and decoded with the KV cache. ``temperature == 0`` or ``do_sample=False``
    means greedy. ``top_k=0`` means no top-k filter (see the module docstring for the v5
    trap with ``None``). ``keys`` (default: the prompt's position) name each prompt for the
    per-example RNG; pass stable example ids to make a sample independent of which subset
    is evaluated. The model is put in eval mode and restored afterwards.
    """
    from tqdm.auto import tqdm

    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if top_k < 0 or not (0.0 < top_p <= 1.0):
        raise ValueError("need top_k >= 0 and 0 < top_p <= 1")
    if rng not in ("per_example", "per_batch"):
        raise ValueError(f"unknown rng {rng!r}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    prompts = list(prompts)
    if not prompts:
        return []
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if len(keys) != len(prompts):
        raise ValueError("keys must have one entry per prompt")

    greedy = (not do_sample) or temperature == 0
    device = _model_device(model)
    eos, pad = _special_ids(model, tokenizer)
    eos_set = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())

    if isinstance(prompts[0], str):
        encoded = _encode_prompts(tokenizer, prompts, add_special_tokens)
    else:  # token ids already (DPKD-seq samples from tokenised training prompts)
        encoded = [list(map(int, p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    out: list[list[int] | None] = [None] * len(prompts)

    # Explicit values override the checkpoint's generation_config (see module docstring).
    base_kwargs: dict[str, Any] = dict(
        max_new_tokens=int(max_new_tokens),
        min_length=0,
        min_new_tokens=None,
        num_beams=1,
        use_cache=True,
        no_repeat_ngram_size=int(no_repeat_ngram_size),
        repetition_penalty=1.0,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        exponential_decay_length_penalty=None,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    # Only meaningful with do_sample=True (transformers' own sampler, rng="per_batch").
    warper_kwargs: dict[str, Any] = dict(
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), typical_p=1.0,
        min_p=None, epsilon_cutoff=0.0, eta_cutoff=0.0,
    )

    was_training = model.training
    model.eval()
    n_batches = math.ceil(len(order) / batch_size)
    try:
        with torch.inference_mode():
            for b in tqdm(range(n_batches), desc="generate", disable=not progress):
                idx = order[b * batch_size : (b + 1) * batch_size]
                input_ids, attention_mask = left_pad([encoded[i] for i in idx], pad, device)
                kwargs = dict(base_kwargs)
                if greedy:
                    kwargs["do_sample"] = False
                    seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                elif rng == "per_example":
                    from transformers import LogitsProcessorList

                    sampler = _PerRowGumbelSampler(
                        [_derive_seed(seed, keys[i]) for i in idx], temperature, top_k, top_p
                    )
                    kwargs["do_sample"] = False
                    kwargs["logits_processor"] = LogitsProcessorList([sampler])
                    seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                else:
                    kwargs.update(do_sample=True, **warper_kwargs)
                    devices = [device] if device.type == "cuda" else []
                    with torch.random.fork_rng(devices=devices):
                        torch.manual_seed(_derive_seed(seed, f"batch{b}"))
                        seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                new = seqs[:, input_ids.shape[1]:].tolist()
                for row, i in enumerate(idx):
                    ids = new[row]
                    cut = next((j for j, t in enumerate(ids) if t in eos_set), len(ids))
                    out[i] = ids[:cut]
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def generate(model, tokenizer, prompts: Sequence[str], **options) -> list[str]:
    """``generate_ids`` (same options) decoded: new tokens only, special tokens skipped,
    whitespace stripped (as MiniLLM does before scoring). Defaults are MiniLLM's sampling
    protocol except ``no_repeat_ngram_size`` (pass 6 for MiniLLM's setting)."""
    ids = generate_ids(model, tokenizer, prompts, **options)
    return [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]


# ----------------------------------------------------------------------------- teacher forcing


def _plain_head(model) -> bool:
    """Whether the model's logits are its output embedding applied to its last hidden
    state, and nothing after it (Gemma-2's soft-capping and Cohere's logit scale are)."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    return getattr(model, "get_output_embeddings", lambda: None)() is not None


def teacher_forced_metrics(model, batches: Iterable[Mapping[str, torch.Tensor]], *,
                           max_batches: int | None = None,
                           teacher_logits: Callable[[Mapping[str, Any]], torch.Tensor] | None = None
                           ) -> dict[str, Any]:
    """Mean NLL per response token and argmax token accuracy on reference responses, and
    with ``teacher_logits`` KL(teacher ‖ student) at the same positions, from one pass of
    the model.

    ``batches`` yield right-padded ``{"input_ids", "attention_mask", "labels"}`` with
    **unshifted** labels (-100 on prompt and padding): position t's logits are scored
    against label t+1 here. The NLL is computed in fp32 over response positions only and
    averaged over all tokens of all batches (token-weighted, like the training loss). It is
    the reward-hacking canary of docs/method.md §5: a DPKD student whose preference margin grows
    while this NLL rises is gaming the objective. Returns ``nll``, ``perplexity``
    (exp(nll)), ``token_accuracy``, ``n_tokens`` and, when the batches carry ``ids``,
    ``per_example``: {id, nll_sum, correct, n_tokens} per example (what a bootstrap over
    examples resamples). The model's train/eval mode is restored.

    ``teacher_logits(batch)``: the teacher's logits [N, V] at the batch's response positions
    in `_response_position_logits`'s order (`ReferenceTeacher.logits_for`). Then KL_i =
    Σ_v p(v|h_i)·(log p(v|h_i) − log q(v|h_i)), p the teacher, q the model, h_i the
    reference prefix; each example row gains ``kl`` (the mean over its positions) and
    ``kl_sum``, and the result ``kl`` (the mean over examples: the per-prompt readout) and
    ``kl_token`` (the mean over all positions).
    """
    device = _model_device(model)
    total_nll = total_kl = 0.0
    correct = count = 0
    per_example = []
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode():
            for b, batch in enumerate(batches):
                if max_batches is not None and b >= max_batches:
                    break
                batch = {"attention_mask": None} | {k: (v.to(device) if torch.is_tensor(v) else v)
                                                    for k, v in batch.items()}
                selected, y, row_of = _response_position_logits(model, batch)
                # the sum as its own reduction, as before the KL joined this pass: the same bits
                total_nll += float(F.cross_entropy(selected, y, reduction="sum"))
                nll = F.cross_entropy(selected, y, reduction="none")
                hits = selected.argmax(dim=-1) == y
                correct += int(hits.sum())
                count += int(y.numel())
                kl = None
                if teacher_logits is not None:
                    t_logits = teacher_logits(batch).to(selected.device)
                    if t_logits.shape != selected.shape:
                        raise ValueError(f"teacher logits {tuple(t_logits.shape)} and student logits "
                                         f"{tuple(selected.shape)} differ: KL needs the same vocabulary")
                    log_p, log_q = F.log_softmax(t_logits, -1), F.log_softmax(selected, -1)
                    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
                    total_kl += float(kl.sum())
                for r, ex_id in enumerate(batch.get("ids", ())):
                    mine = row_of == r
                    row = {"id": ex_id, "nll_sum": float(nll[mine].sum()), "correct": int(hits[mine].sum()),
                           "n_tokens": int(mine.sum())}
                    if kl is not None:
                        row |= {"kl": float(kl[mine].mean()) if mine.any() else float("nan"),
                                "kl_sum": float(kl[mine].sum())}
                    per_example.append(row)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no response tokens (all labels are -100)")
    out = {"nll": total_nll / count, "token_accuracy": correct / count, "n_tokens": count,
           "per_example": per_example}
    out["perplexity"] = math.exp(min(out["nll"], 700.0))
    if teacher_logits is not None:
        out |= {"kl": sum(r["kl"] for r in per_example) / len(per_example) if per_example else float("nan"),
                "kl_token": total_kl / count}
    return out


def _response_position_logits(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [N, V] in float32, targets [N], row of each position [N]) at the response
    positions of a right-padded batch with unshifted labels: for a transformers model the
    vocabulary head on those positions only (objectives.response_logits; with length-sorted
    batches 2.95x cheaper on the cpu student than the head on every position: make bench)."""
    labels = batch["labels"]
    mask = labels[:, 1:] != -100
    if _plain_head(model):
        selected, y = response_logits(model, batch)
        return selected[0].float(), y[0], mask.nonzero()[:, 0]
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits[:, :-1][mask].float(), labels[:, 1:][mask], mask.nonzero()[:, 0]


class ReferenceTeacher:
    """The teacher of ``eval.teacher_kl``: its logits at the response positions of a split's
    references, for `teacher_forced_metrics`.

    Those logits are the same for every run evaluated on the split, so with a ``cache_dir``
    they are computed once (`teacher_cache`'s exact ``hidden`` format: the final hidden
    states of those positions and the head, in the very batches `reference_metrics` scores,
    so the logits are bit for bit the online ones) and every later run reads them: a run
    whose splits are cached never builds the teacher. On the cpu profile the teacher's pass
    over 300 references was most of each run's teacher-forced readouts (make bench, stage
    eval). Without ``cache_dir``, or for a teacher whose logits are not its head applied to
    its last hidden state (`_plain_head`), the teacher runs on each batch.

    ``build``: a callable returning the (frozen) teacher, called at most once; ``identity``:
    what names the teacher's signals (`teacher_cache.teacher_identity`)."""

    def __init__(self, build: Callable[[], Any], *, identity: Mapping[str, Any] | None = None,
                 cache_dir: str | os.PathLike | None = None, progress: bool = True):
        if cache_dir is not None and identity is None:
            raise ValueError("a cached ReferenceTeacher needs the teacher's identity")
        self._build, self.identity, self.cache_dir, self.progress = build, identity, cache_dir, progress
        self.caches: list = []   # the caches this teacher opened (closed by `close`)

    @functools.cached_property
    def model(self):
        """The teacher, built on first use and put in eval mode (dropout off) until `close`."""
        model = self._build()
        self._was_training = getattr(model, "training", False)
        model.eval()
        return model

    def _online(self, batch) -> torch.Tensor:
        model = self.model
        with torch.inference_mode():
            t_batch = {k: (v.to(_model_device(model)) if torch.is_tensor(v) else v) for k, v in batch.items()}
            return _response_position_logits(model, t_batch)[0]

    def logits_for(self, dataset: Sequence[Mapping[str, Any]], batch_size: int, pad_id: int,
                   device=None) -> Callable[[Mapping[str, Any]], torch.Tensor]:
        """``batch -> teacher logits`` for batches of ``dataset`` (tokenised, with ids) as
        `data.sorted_batches` (``batch_size``) groups them and `data.collate_sft` pads them."""
        if self.cache_dir is None:
            return self._online
        from . import teacher_cache as tc
        from .rundir import numerics
        # what decides the bits besides the teacher and the data: the batching, the device and
        # its kind, the thread count (summation order) and torch
        meta = dict(self.identity, format="hidden", use="eval references", batch_size=batch_size,
                    device=torch.device(device or "cpu").type, threads=torch.get_num_threads(),
                    torch=torch.__version__, machine=numerics())
        folder = tc.folder(self.cache_dir, meta, dataset)
        if not (folder / tc.INDEX).exists() and not _plain_head(self.model):
            return self._online   # no cache can hold what comes after the head (soft-capping, a scale)
        cache = tc.load_or_build(folder, lambda: self.model, dataset, pad_id, 0, meta=meta, fmt="hidden",
                                 batch_size=batch_size, device=device, progress=self.progress)
        self.caches.append(cache)
        return lambda batch: cache.teacher_hidden(batch["ids"], response_counts(batch), device)[0].logits()

    def close(self) -> None:
        """Close the cache files and give the teacher its mode back."""
        for cache in self.caches:
            cache.close()
        self.caches.clear()
        model = self.__dict__.pop("model", None)   # a later use builds (or takes) it again, in eval mode
        if model is not None:
            model.train(self._was_training)


# ----------------------------------------------------------------------------- end to end


def _references_of(example: Mapping[str, Any], key: str) -> list[str]:
    """References of an example: ``example[key]`` (list or str); falls back to a Dolly-style
    "response" or MiniLLM-style "output" field when ``key`` is absent."""
    for k in (key, "response", "output"):
        if k in example and example[k] is not None:
            return _as_references(example[k])
    raise KeyError(f"example has no {key!r} (or 'response'/'output') field: {sorted(example)}")


def evaluate_generations(
    model,
    tokenizer,
    examples: Sequence[Mapping[str, Any]],
    *,
    seeds: Sequence[int] = (10,),
    batch_size: int = 16,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    no_repeat_ngram_size: int = 0,
    do_sample: bool = True,
    rng: str = "per_example",
    prompt_key: str = "prompt",
    references_key: str = "references",
    prompt_fn: Callable[[Mapping[str, Any]], str] | None = None,
    bucket_edges: Sequence[float] = DEFAULT_BUCKET_EDGES,
    add_special_tokens: bool = True,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample once per seed for every example, score, and summarise.

    ``examples``: dicts with ``id`` (defaults to the position), the already formatted
    ``prompt`` (or pass ``prompt_fn(example) -> str``, e.g. ``data.format_prompt``),
    ``references`` (list or str) and optional ``category``.

    Per-example rows (one per example and seed; scores in [0, 1]): id, seed, category,
    prompt, sample, reference (the first), references, rouge_l, exact_match,
    response_tokens (generated ids before EOS: the new tokens), response_words,
    reference_tokens (first reference, model tokenizer, no special tokens), reference_words,
    truncated (hit ``max_new_tokens`` without EOS), ended_eos (stopped by EOS: not
    truncated), empty (no text after decoding), bucket (``length_bucket(reference_tokens)``).

    Summary (scores x 100): n, n_seeds, seeds, rouge_l / rouge_l_sd and exact_match /
    exact_match_sd (mean and sample sd over the per-seed means), response_tokens,
    response_words, distinct_1, distinct_2 (corpus level), repetition_rate (4-grams),
    empty_rate, ended_rate (share stopped by EOS), truncated_rate (all averaged over seeds), per_seed (the same per seed),
    generation (the sampling settings), generate_s (wall time of sampling).
    """
    examples = list(examples)
    if not examples:
        raise ValueError("no examples")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"need distinct seeds, got {seeds}")
    ids = [ex.get("id", i) for i, ex in enumerate(examples)]
    if len(set(map(str, ids))) != len(ids):
        raise ValueError("example ids must be unique")
    prompts = [prompt_fn(ex) if prompt_fn is not None else ex[prompt_key] for ex in examples]
    refs = [_references_of(ex, references_key) for ex in examples]
    ref_tokens = [len(tokenizer(r[0], add_special_tokens=False)["input_ids"]) for r in refs]

    rows: list[dict[str, Any]] = []
    per_seed: list[dict[str, Any]] = []
    gen_seconds = 0.0
    for seed in seeds:
        t0 = time.perf_counter()
        new_ids = generate_ids(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
            temperature=temperature, top_k=top_k, top_p=top_p,
            no_repeat_ngram_size=no_repeat_ngram_size, do_sample=do_sample, seed=seed,
            keys=[str(i) for i in ids], rng=rng, add_special_tokens=add_special_tokens,
            progress=progress,
        )
        gen_seconds += time.perf_counter() - t0
        samples = [tokenizer.decode(x, skip_special_tokens=True).strip() for x in new_ids]
        seed_rows = []
        for ex, ex_id, prompt, ref, n_ref, sample, gen in zip(
            examples, ids, prompts, refs, ref_tokens, samples, new_ids
        ):
            seed_rows.append(
                {
                    "id": ex_id,
                    "seed": seed,
                    "category": ex.get("category"),
                    "prompt": prompt,
                    "sample": sample,
                    "reference": ref[0],
                    "references": ref,
                    "rouge_l": rouge_l(sample, ref),
                    "exact_match": exact_match(sample, ref),
                    "response_tokens": len(gen),
                    "response_words": word_count(sample),
                    "reference_tokens": n_ref,
                    "reference_words": word_count(ref[0]),
                    "truncated": len(gen) >= max_new_tokens,
                    # response length at every evaluation (a DPKD student can learn to say
                    # nothing): whether the model stopped by EOS, and whether nothing was said
                    "ended_eos": len(gen) < max_new_tokens,
                    "empty": not sample,
                    "bucket": length_bucket(n_ref, bucket_edges),
                }
            )
        rows.extend(seed_rows)
        texts = [r["sample"] for r in seed_rows]
        n = len(seed_rows)
        per_seed.append(
            {
                "seed": seed,
                "rouge_l": 100.0 * sum(r["rouge_l"] for r in seed_rows) / n,
                "exact_match": 100.0 * sum(r["exact_match"] for r in seed_rows) / n,
                "response_tokens": sum(r["response_tokens"] for r in seed_rows) / n,
                "response_words": sum(r["response_words"] for r in seed_rows) / n,
                "distinct_1": distinct_n(texts, 1),
                "distinct_2": distinct_n(texts, 2),
                "repetition_rate": repetition_rate(texts, 4),
                "empty_rate": sum(r["empty"] for r in seed_rows) / n,
                "ended_rate": sum(r["ended_eos"] for r in seed_rows) / n,
                "truncated_rate": sum(r["truncated"] for r in seed_rows) / n,
            }
        )

    summary: dict[str, Any] = {"n": len(examples), "n_seeds": len(seeds), "seeds": seeds}
    for metric in ("rouge_l", "exact_match"):
        mean, sd, _ = mean_sd(s[metric] for s in per_seed)
        summary[metric] = mean
        summary[f"{metric}_sd"] = sd
    for metric in ("response_tokens", "response_words", "distinct_1", "distinct_2",
                   "repetition_rate", "empty_rate", "ended_rate", "truncated_rate"):
        summary[metric] = sum(s[metric] for s in per_seed) / len(per_seed)
    summary["per_seed"] = per_seed
    summary["generation"] = {
        "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
        "top_p": top_p, "no_repeat_ngram_size": no_repeat_ngram_size, "do_sample": do_sample,
        "rng": rng, "batch_size": batch_size,
    }
    summary["generate_s"] = gen_seconds
    return rows, summary


# ----------------------------------------------------------------------------- project glue

#: the flat summary's keys per split and decoding; response_tokens (mean new tokens),
#: ended_rate (share that stopped by EOS) and empty_rate (share with no text) sit beside ROUGE-L
_SPLIT_SUMMARY_KEYS = ("rouge_l", "rouge_l_sd", "exact_match", "exact_match_sd", "response_tokens",
                       "ended_rate", "empty_rate", "distinct_2", "repetition_rate", "truncated_rate", "n")


def reference_metrics(model, tokenizer, records, data_cfg, *, batch_size: int = 16,
                      teacher=None) -> dict[str, Any]:
    """Teacher-forced NLL and token accuracy on the references of `records`, tokenised as
    training tokenises them (``data_cfg``: max_length, max_prompt), with ``per_example``
    rows. With ``teacher`` (a model, or a `ReferenceTeacher`, which its caller closes), also
    KL(teacher ‖ student) on the same references, from the same pass of the model (`teacher_forced_metrics`: ``kl``,
    ``kl_token``; each row gains ``kl`` and ``kl_sum``). Without a reference that fits
    (every example too long) only ``note`` says why."""
    from .data import DataError, build_sft_dataset, collate_sft, pad_id_of, sorted_batches

    try:
        dataset, _ = build_sft_dataset(records, tokenizer, max_length=data_cfg.max_length,
                                       max_prompt=data_cfg.max_prompt)
    except DataError as err:
        return {"note": str(err)[:200]}
    pad = pad_id_of(tokenizer)
    device = _model_device(model)
    groups = sorted_batches(dataset, batch_size)  # pad less; the rows go back to the dataset's order
    batches = ({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in
                collate_sft([dataset[i] for i in idx], pad).items()} for idx in groups)
    logits, made_here = None, teacher is not None and not isinstance(teacher, ReferenceTeacher)
    if teacher is not None:
        if made_here:   # a model: run it on each batch
            teacher = ReferenceTeacher(lambda model=teacher: model)
        logits = teacher.logits_for(dataset, batch_size, pad, device)
    try:
        m = teacher_forced_metrics(model, batches, teacher_logits=logits)
    finally:
        if made_here:
            teacher.close()
    per_example = [None] * len(dataset)
    for row, i in zip(m["per_example"], (i for idx in groups for i in idx)):
        per_example[i] = row
    out = {"nll": m["nll"], "token_acc": m["token_accuracy"], "n_tokens": m["n_tokens"],
           "n_examples": len(dataset), "per_example": per_example}
    if teacher is not None:
        out |= {"kl": m["kl"], "kl_token": m["kl_token"]}
    return out


def evaluate_splits(model, tokenizer, splits: Mapping[str, Sequence[Mapping[str, Any]]],
                    eval_cfg: Any, data_cfg: Any, *, progress: bool = True, teacher=None
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The evaluation protocol on each split named in ``eval_cfg.splits``: the final
    evaluation of every training run (teacher, starting student and methods alike) and
    ``python -m dpkd_lib eval``. Per split, on the first ``max_examples`` records (0 = all;
    every model sees the same ones):

    * greedy decoding (``eval_cfg.greedy``): the primary generation metric;
    * T-sampling, once per seed of ``eval_cfg.sample_seeds`` (MiniLLM's protocol), on the
      first ``sample_max_examples`` of those records when set (sampling is the costly part);
    * teacher-forced NLL / token accuracy on the references (``eval_cfg.teacher_forced``);
    * KL(teacher ‖ student) on the same references (``eval_cfg.teacher_kl``, with
      ``teacher``, a model or a `ReferenceTeacher`: `teacher_forced_metrics`), the readout
      a KD student is trained towards.

    ``splits`` maps split names to Dolly-format records; prompts come from
    ``data.format_prompt``. Rows (one per example × decoding × seed) gain ``split`` and
    ``decoding`` ("greedy" with seed None, or "sample"). The summary is flat for
    summary.json: ``{split}_rouge_l``, ``{split}_exact_match`` (...) for greedy decoding,
    ``{split}_sample_rouge_l`` (...) for sampling, ``{split}_nll`` and ``{split}_token_acc``,
    ``{split}_kl`` (the mean over prompts of each prompt's mean KL) with ``teacher_kl``,
    plus ``eval`` = {split: {"greedy"|"sample"|"teacher_forced": full summaries}}. A split
    absent from ``splits`` (no held-out file, say) is listed in ``eval_skipped_splits``.
    """
    from .data import format_prompt

    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"eval": {}, "eval_skipped_splits": []}
    e = eval_cfg
    want_kl = bool(getattr(e, "teacher_kl", False))
    if want_kl and teacher is None:
        raise ValueError("eval.teacher_kl needs the teacher: pass teacher= (a run's teacher section)")
    decodings = ([("greedy", dict(seeds=(0,), do_sample=False))] if e.greedy else []) + \
        ([("sample", dict(seeds=tuple(e.sample_seeds), do_sample=True))] if e.sample_seeds else [])
    try:
        for split in e.splits:
            records = list(splits.get(split) or [])
            if not records:
                summary["eval_skipped_splits"].append(split)
                continue
            if e.max_examples:
                records = records[:e.max_examples]
            examples = [{"id": rec.get("id") or f"{split}#{i}", "prompt": format_prompt(rec),
                         "references": rec.get("references") or [rec["response"]],
                         "category": rec.get("category")} for i, rec in enumerate(records)]
            out = summary["eval"][split] = {}
            for name, how in decodings:
                subset = examples[:e.sample_max_examples] if name == "sample" and e.sample_max_examples else examples
                split_rows, out[name] = evaluate_generations(
                    model, tokenizer, subset, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                    temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
                    no_repeat_ngram_size=e.no_repeat_ngram_size, progress=progress, **how)
                for row in split_rows:
                    row.update(split=split, decoding=name, seed=row["seed"] if name == "sample" else None)
                rows.extend(split_rows)
                prefix = f"{split}_" if name == "greedy" else f"{split}_sample_"
                summary |= {prefix + key: out[name][key] for key in _SPLIT_SUMMARY_KEYS}
            if e.teacher_forced or want_kl:
                tf = reference_metrics(model, tokenizer, records, data_cfg, teacher=teacher if want_kl else None)
                rows.extend(dict(r, split=split, decoding="teacher_forced") for r in tf.pop("per_example", []))
                out["teacher_forced"] = tf
                if e.teacher_forced:
                    summary[f"{split}_nll"], summary[f"{split}_token_acc"] = tf.get("nll"), tf.get("token_acc")
                if want_kl:
                    summary[f"{split}_kl"] = tf.get("kl")
    finally:
        if isinstance(teacher, ReferenceTeacher):
            teacher.close()   # its cache files, and the teacher's mode
    return rows, summary


def eval_teacher(cfg: Any, tokenizer, device=None, *, model=None, identity: Mapping[str, Any] | None = None,
                 progress: bool = True) -> ReferenceTeacher | None:
    """The teacher `evaluate_splits` needs for ``eval.teacher_kl`` (None when it is off): the
    params' teacher section (``model`` when the caller holds it already, else built frozen on
    ``device`` if a split's signals are not in ``cfg.cache_dir`` yet). ``identity``: the
    teacher's `teacher_cache.teacher_identity` when the caller has it (it hashes the weights)."""
    if not getattr(cfg.eval, "teacher_kl", False):
        return None
    from .errors import ConfigError
    from .models import build_model
    from .precision import resolve
    from .teacher_cache import teacher_identity
    if cfg.teacher is None:
        raise ConfigError("eval.teacher_kl: KL(teacher || student) needs a teacher section; add one "
                          "or set eval.teacher_kl false")

    def build():
        if model is not None:
            return model
        teacher = build_model(cfg.teacher, tokenizer, trainable=False)
        if device is not None and cfg.teacher.quantization == "none":
            teacher = teacher.to(device)
        return teacher

    identity = dict(identity or teacher_identity(cfg, tokenizer),   # "auto" resolved: fp16 and bf16 differ
                    dtype=resolve(cfg.teacher.dtype, None if device is None else torch.device(device).type))
    return ReferenceTeacher(build, identity=identity, cache_dir=cfg.cache_dir or None, progress=progress)


def evaluate_model(cfg: Any, model, tokenizer, out_dir: str | os.PathLike, *,
                   progress: bool = True) -> dict[str, Any]:
    """`evaluate_splits` on the data of ``cfg`` (built as a training run builds it, so the
    examples match a run's own final evaluation); writes ``eval.jsonl`` and
    ``eval_summary.json`` to ``out_dir`` and returns the summary."""
    from pathlib import Path

    from .data import check_eval_splits, load_splits
    from .io import write_json, write_jsonl

    reports = {}  # records no split can use, dropped and counted (data.load_splits)
    splits = load_splits(cfg.data, tokenizer, reports=reports)
    check_eval_splits(splits, cfg.data, cfg.eval.splits, cfg.eval.skip_empty_splits)
    rows, summary = evaluate_splits(model, tokenizer, splits, cfg.eval, cfg.data, progress=progress,
                                    teacher=eval_teacher(cfg, tokenizer, _model_device(model), progress=progress))
    if reports:
        summary["data_dropped"] = {k: r.as_dict() for k, r in reports.items()}
    out = Path(out_dir)
    write_jsonl(out / "eval.jsonl", rows)
    write_json(out / "eval_summary.json", summary)
    return summary


def evaluate_saved(cfg: Any, model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   progress: bool = True) -> dict[str, Any]:
    """``python -m dpkd_lib eval``: a model saved by ``models.save_model`` (a run's
    ``model/``) through `evaluate_model`, with a params file validated for evaluation (no
    teacher or training section needed). The tokenizer is the one saved next to the model
    when present, else the params'."""
    from pathlib import Path

    from .config import position_needs
    from .io import check_writable_dir
    from .models import check_positions, check_vocab_fit, load_saved
    from .tokenization import build_tokenizer

    check_writable_dir(out_dir, "eval --out")  # before the model loads, not after its evaluation
    if getattr(cfg, "threads", 0):
        torch.set_num_threads(int(cfg.threads))
    model_dir = Path(model_dir)
    quant = cfg.student.quantization if cfg.student.quantization != "none" else None
    model = load_saved(model_dir, dtype=cfg.student.dtype, quantization=quant)
    if quant is None and torch.cuda.is_available():
        model = model.to("cuda")
    if (model_dir / "tokenizer_config.json").exists() or (model_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        from .errors import ModelLoadError
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:  # noqa: BLE001 - a damaged tokenizer file: one line naming the folder
            raise ModelLoadError(f"{model_dir}: the saved tokenizer (tokenizer.json, tokenizer_config.json) "
                                 f"cannot be read ({type(exc).__name__}: {str(exc)[:120]}): it is "
                                 f"incomplete or corrupt; rerun the run that wrote it") from None
    else:
        tokenizer = build_tokenizer(cfg.tokenizer)
    check_vocab_fit(model, tokenizer, f"the model in {model_dir}")
    check_positions(model, position_needs(cfg, "student", "eval"), f"the model in {model_dir}")
    summary = evaluate_model(cfg, model, tokenizer, out_dir, progress=progress)
    summary["model_dir"] = str(model_dir)
    return summary
