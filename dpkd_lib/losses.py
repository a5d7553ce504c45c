"""Losses of the DPKD study: SFT, word-level KD divergences, the token-level DPKD loss of the
released code, and the DPO-family sequence-level preference loss of the paper.

Conventions (docs/design.md §5; every function here follows them):

* ``logits`` are ``[B, T, V]`` (any leading shape ``[..., V]`` works, with ``labels`` of
  shape ``[...]``) and already aligned: ``logits[..., i, :]`` scores ``labels[..., i]``.
  Positions whose label is ``-100`` (:data:`IGNORE_INDEX`) are ignored; for the KD losses
  the label value is only used as a mask.
* Token losses return the *flat* mean over unmasked positions of the whole batch
  (sum over unmasked positions / their count), as a 0-dim tensor. With no unmasked position
  they return 0, still connected to the graph (a zero gradient, never NaN).
* ``temperature`` divides student and teacher logits before the softmax. No T² factor is
  applied here; an objective that wants one multiplies the loss itself.
* Inputs may be fp32 or bf16 (or fp16); the maths runs in fp32, or float64 when the input is
  float64 (so ``gradcheck`` works). All log-probabilities come from ``log_softmax`` /
  ``logsumexp`` and all sigmoids from ``logsigmoid``: finite for logits of ±1e4.
* Notation: p = teacher, q = student (as in docs/method.md). Teacher logits are always detached:
  no loss sends gradient into the teacher.

Memory-light ("lean") variants. Every token loss takes ``chunk_size=None``. With ``None`` the
loss is computed the plain way on all ``B·T`` positions (full-vocabulary log-softmaxes of
student and teacher, as the released code does). With an integer, the unmasked positions are
first gathered (``x[mask]``, typically ~20 % of positions), then processed ``chunk_size`` rows
at a time, each chunk under ``torch.utils.checkpoint`` so that the backward pass recomputes the
chunk instead of keeping its fp32 ``[chunk, V]`` intermediates alive. The DPKD chunk computes
only the four log-probabilities it needs (gather minus ``logsumexp``). Value and gradient equal
the plain path to fp32 rounding (tests/test_losses.py checks this).

Teacher cache. :func:`teacher_topk` stores a teacher's top-k token ids and log-probs per
position; :func:`dpkd_token_loss_from_teacher_topk` and :func:`forward_kl_from_teacher_topk`
(and :func:`soft_cross_entropy_from_teacher_topk`) then train with no teacher in memory. They
are exact when k = V; their approximation for k < V is documented on each function.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

from .choices import LOSS_TYPE_PARAMS, LOSS_TYPES  # noqa: E402  (valid loss types, defined once)

#: what a preference-loss setting means when the caller leaves it out
_PREFERENCE_DEFAULTS = {"label_smoothing": 0.0, "reference_free": False, "gamma": 0.0,
                        "dpop_lambda": 50.0, "cpo_alpha": 1.0}

__all__ = [
    "IGNORE_INDEX",
    "LOSS_TYPES",
    "TokenPreferenceLogps",
    "TeacherHidden",
    "sft_loss",
    "forward_kl",
    "reverse_kl",
    "soft_cross_entropy",
    "js_divergence",
    "skew_forward_kl",
    "skew_reverse_kl",
    "dpkd_token_logps",
    "dpkd_token_loss",
    "sequence_logps",
    "preference_loss",
    "token_preference_loss",
    "implicit_rewards",
    "teacher_topk",
    "dpkd_token_logps_from_teacher_topk",
    "dpkd_token_loss_from_teacher_topk",
    "forward_kl_from_teacher_topk",
    "soft_cross_entropy_from_teacher_topk",
]


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------
def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _up(x: Tensor) -> Tensor:
    return x.to(_compute_dtype(x))


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """Upcast, then divide by the temperature (skipped at T = 1: saves a [.., V] copy)."""
    x = _up(logits)
    return x if temperature == 1.0 else x / temperature


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_shapes(student_logits: Tensor, labels: Tensor, *others: Tuple[str, Tensor]) -> None:
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(student_logits.shape)} do not match labels {tuple(labels.shape)}: "
            "expected logits [..., V] with labels [...]"
        )
    for name, t in others:
        if t.shape[: labels.dim()] != labels.shape:
            raise ValueError(
                f"{name} {tuple(t.shape)} does not match labels {tuple(labels.shape)}"
            )


def _check_chunk(chunk_size: Optional[int]) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


class TeacherHidden:
    """A teacher's signal as its final hidden states [..., H] and output head (weight [V, H],
    bias [V] or None), which every token loss accepts in place of ``teacher_logits``. The
    logits are ``F.linear(hidden, weight, bias)`` in the head's dtype, then fp32: what the
    online teacher's head computes. The lean losses (``chunk_size``) compute them chunk by
    chunk, so the teacher's [N, V] logits never exist at once (teacher_cache.py's exact
    cache); the plain ones compute them whole."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None):
        self.hidden, self.weight, self.bias = hidden, weight, bias

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    def logits(self) -> Tensor:
        return F.linear(self.hidden.to(self.weight.dtype), self.weight, self.bias).float()

    def detach(self) -> "TeacherHidden":
        return TeacherHidden(self.hidden.detach(), self.weight.detach(),
                             None if self.bias is None else self.bias.detach())

    def __getitem__(self, index) -> "TeacherHidden":  # rows: a mask or a slice of positions
        return TeacherHidden(self.hidden[index], self.weight, self.bias)


def _logits(teacher) -> Tensor:
    """Teacher logits of a chunk: the tensor itself, or computed from `TeacherHidden`."""
    return teacher.logits() if isinstance(teacher, TeacherHidden) else teacher


def _kl_terms(w: Tensor, logw: Tensor, logm: Tensor) -> Tensor:
    """Elementwise w·(log w − log m) with the convention 0·log 0 = 0.

    The difference itself is masked (not only the product) so that a −inf log-prob where
    w = 0 (e.g. a teacher logit of −inf on padded vocabulary) yields neither a NaN value
    nor a NaN gradient.
    """
    pos = w > 0
    diff = torch.where(pos, logw - logm, torch.zeros_like(logw))
    return w * diff


def _mean(values: Tensor) -> Tensor:
    """Flat mean of a [N] vector; 0 (with a grad path) when N = 0."""
    return values.sum() / max(values.numel(), 1)


def _per_position(
    row_fn: Callable[..., Tuple[Tensor, ...]],
    labels: Tensor,
    tensors: Sequence[Tensor],
    chunk_size: Optional[int],
) -> Tuple[Tuple[Tensor, ...], Tensor]:
    """Evaluate ``row_fn`` at the unmasked positions; return its outputs as [N] vectors.

    ``row_fn(*rows)`` maps tensors of shape ``[..., X]`` (same leading shape as ``labels``)
    to a tuple of tensors of that leading shape. Also returns ``mask`` (labels != -100).

    chunk_size None (plain): ``row_fn`` runs on the full [B, T, ...] tensors, then the unmasked
    positions are selected. Integer (lean): the unmasked rows are gathered first
    (``x[mask]`` copies only those rows; its backward keeps only the mask), then ``row_fn``
    runs per chunk under non-reentrant checkpointing, so autograd keeps for each chunk only
    its inputs (views of the gathered rows), not its fp32 intermediates.
    """
    _check_chunk(chunk_size)
    mask = labels != IGNORE_INDEX
    if chunk_size is None:
        outs = row_fn(*tensors)
        return tuple(o[mask] for o in outs), mask
    rows = [_rows(x, mask) for x in tensors]
    return _chunked(row_fn, rows, chunk_size), mask


class _GatherRows(torch.autograd.Function):
    """``x[mask]`` whose backward fills one zero tensor in place. PyTorch's own backward for a
    boolean index builds the zero tensor and then an out-of-place copy of it: a second
    full [B, T, V] tensor at the peak of the lean path."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        ctx.shape = x.shape
        return x[mask]

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.shape)
        out[mask] = grad
        return out, None


def _rows(x: Tensor, mask: Tensor) -> Tensor:
    return _GatherRows.apply(x, mask) if x.requires_grad else x[mask]


def _chunked(row_fn, rows: Sequence[Tensor], chunk_size: int) -> Tuple[Tensor, ...]:
    """``row_fn`` over [N, ...] rows, ``chunk_size`` rows at a time, outputs concatenated.

    Each chunk runs under non-reentrant checkpointing when a gradient is needed: the
    backward pass recomputes the chunk, so only its inputs (views of ``rows``) stay alive.
    """
    n = rows[0].shape[0]
    if n == 0:
        # run once on the empty rows: [0]-shaped outputs that are still on the graph
        return tuple(row_fn(*rows))
    use_ckpt = torch.is_grad_enabled() and any(r.requires_grad for r in rows)
    pieces = []
    for start in range(0, n, chunk_size):
        chunk = [r[start : start + chunk_size] for r in rows]
        if use_ckpt:
            out = checkpoint(row_fn, *chunk, use_reentrant=False, preserve_rng_state=False)
        else:
            out = row_fn(*chunk)
        pieces.append(out)
    return tuple(torch.cat(parts) for parts in zip(*pieces))


# ----------------------------------------------------------------------------------------
# SFT and word-level KD divergences (per-row functions: [..., V] -> [...])
# ----------------------------------------------------------------------------------------
def _sft_rows(s: Tensor, y: Tensor) -> Tuple[Tensor]:
    # −log q(y) = logsumexp(z) − z_y ; masked labels (-100) are clamped to a valid id and
    # their value discarded by the mask.
    s = _up(s)
    y = y.clamp_min(0).unsqueeze(-1)
    return (torch.logsumexp(s, -1) - s.gather(-1, y).squeeze(-1),)


def sft_loss(student_logits: Tensor, labels: Tensor, chunk_size: Optional[int] = None) -> Tensor:
    """Token-mean cross-entropy −log q(label) over positions with label != -100."""
    _check_shapes(student_logits, labels)
    (nll,), _ = _per_position(_sft_rows, labels, (student_logits, labels), chunk_size)
    return _mean(nll)


def _forward_kl_rows(s: Tensor, t: Tensor, temperature: float) -> Tuple[Tensor]:
    # KL(p‖q) = Σ_v p_v (log p_v − log q_v)
    lq = F.log_softmax(_scaled(s, temperature), -1)
    lp = F.log_softmax(_scaled(t, temperature), -1)
    return (_kl_terms(lp.exp(), lp, lq).sum(-1),)


def _reverse_kl_rows(s: Tensor, t: Tensor, temperature: float) -> Tuple[Tensor]:
    # KL(q‖p) = Σ_v q_v (log q_v − log p_v)
    lq = F.log_softmax(_scaled(s, temperature), -1)
    lp = F.log_softmax(_scaled(t, temperature), -1)
    return (_kl_terms(lq.exp(), lq, lp).sum(-1),)


def _soft_ce_rows(s: Tensor, t: Tensor, temperature: float) -> Tuple[Tensor]:
    # H(p, q) = −Σ_v p_v log q_v   (0·log q = 0 where p_v = 0)
    lq = F.log_softmax(_scaled(s, temperature), -1)
    lp = F.log_softmax(_scaled(t, temperature), -1)
    p = lp.exp()
    return (-(p * torch.where(p > 0, lq, torch.zeros_like(lq))).sum(-1),)


def _log_mixture(w: float, la: Tensor, lb: Tensor) -> Tensor:
    """log(w·a + (1−w)·b) from log a, log b, computed with logaddexp (stable)."""
    if w <= 0.0:
        return lb
    if w >= 1.0:
        return la
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def _jsd_rows(s: Tensor, t: Tensor, beta: float, temperature: float) -> Tuple[Tensor]:
    # m = β p + (1−β) q ;  JSD_β = β·KL(p‖m) + (1−β)·KL(q‖m)
    lq = F.log_softmax(_scaled(s, temperature), -1)
    lp = F.log_softmax(_scaled(t, temperature), -1)
    lm = _log_mixture(beta, lp, lq)
    kl_pm = _kl_terms(lp.exp(), lp, lm).sum(-1)
    kl_qm = _kl_terms(lq.exp(), lq, lm).sum(-1)
    return (beta * kl_pm + (1.0 - beta) * kl_qm,)


def _skew_fkl_rows(s: Tensor, t: Tensor, alpha: float, temperature: float) -> Tuple[Tensor]:
    # SKL_α = KL(p ‖ α p + (1−α) q)
    lq = F.log_softmax(_scaled(s, temperature), -1)
    lp = F.log_softmax(_scaled(t, temperature), -1)
    return (_kl_terms(lp.exp(), lp, _log_mixture(alpha, lp, lq)).sum(-1),)


def _skew_rkl_rows(s: Tensor, t: Tensor, alpha: float, temperature: float) -> Tuple[Tensor]:
    # SRKL_α = KL(q ‖ α q + (1−α) p)
    lq = F.log_softmax(_scaled(s, temperature), -1)
    lp = F.log_softmax(_scaled(t, temperature), -1)
    return (_kl_terms(lq.exp(), lq, _log_mixture(alpha, lq, lp)).sum(-1),)


def _teacher_loss(row_fn, student_logits, teacher_logits, labels, chunk_size, **kw) -> Tensor:
    _check_shapes(student_logits, labels, ("teacher_logits", teacher_logits))
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
            f"{tuple(student_logits.shape)} differ (slice the teacher's padded vocabulary first)"
        )
    _check_temperature(kw.get("temperature", 1.0))
    fn = functools.partial(row_fn, **kw)
    teacher = teacher_logits.detach()
    if isinstance(teacher, TeacherHidden):
        if chunk_size is None:
            teacher = teacher.logits()
        else:  # the teacher's logits per chunk, inside the chunk's checkpoint (no gradient)
            _check_chunk(chunk_size)
            mask = labels != IGNORE_INDEX
            head = (teacher.weight, teacher.bias)

            def fn(s, h, _fn=fn):
                with torch.no_grad():
                    t = TeacherHidden(h, *head).logits()
                return _fn(s, t)
            (vals,) = _chunked(fn, [_rows(student_logits, mask), teacher.hidden[mask]], chunk_size)
            return _mean(vals)
    (vals,), _ = _per_position(fn, labels, (student_logits, teacher), chunk_size)
    return _mean(vals)


def forward_kl(student_logits, teacher_logits, labels, temperature=1.0, chunk_size=None) -> Tensor:
    """Token-mean forward KL(p‖q) = Σ_v p log(p/q), p = teacher (mode-covering; classic KD)."""
    return _teacher_loss(_forward_kl_rows, student_logits, teacher_logits, labels, chunk_size,
                         temperature=temperature)


def reverse_kl(student_logits, teacher_logits, labels, temperature=1.0, chunk_size=None) -> Tensor:
    """Token-mean reverse KL(q‖p) = Σ_v q log(q/p), q = student (mode-seeking)."""
    return _teacher_loss(_reverse_kl_rows, student_logits, teacher_logits, labels, chunk_size,
                         temperature=temperature)


def soft_cross_entropy(student_logits, teacher_logits, labels, temperature=1.0,
                       chunk_size=None) -> Tensor:
    """Token-mean H(p, q) = −Σ_v p log q: MiniLLM's word-level KD / pre-train KD term.

    Equals forward_kl + H(p); same gradient in the student, different value.
    """
    return _teacher_loss(_soft_ce_rows, student_logits, teacher_logits, labels, chunk_size,
                         temperature=temperature)


def js_divergence(student_logits, teacher_logits, labels, beta=0.5, temperature=1.0,
                  chunk_size=None) -> Tensor:
    """Token-mean generalized Jensen–Shannon divergence (GKD convention, Agarwal et al. 2024).

    With p the teacher and q the student, m = β·p + (1−β)·q and
        JSD_β(p, q) = β·KL(p‖m) + (1−β)·KL(q‖m).
    β = 0.5 is the usual symmetric JSD (at most log 2); both β → 0 and β → 1 give 0 (the
    divergence is not rescaled by 1/(β(1−β))). β must lie in [0, 1].
    """
    _check_unit("beta", beta)
    return _teacher_loss(_jsd_rows, student_logits, teacher_logits, labels, chunk_size,
                         beta=beta, temperature=temperature)


def skew_forward_kl(student_logits, teacher_logits, labels, alpha=0.1, temperature=1.0,
                    chunk_size=None) -> Tensor:
    """DistiLLM skew KL: KL(p ‖ α·p + (1−α)·q). α = 0 is forward KL, α = 1 gives 0."""
    _check_unit("alpha", alpha)
    return _teacher_loss(_skew_fkl_rows, student_logits, teacher_logits, labels, chunk_size,
                         alpha=alpha, temperature=temperature)


def skew_reverse_kl(student_logits, teacher_logits, labels, alpha=0.1, temperature=1.0,
                    chunk_size=None) -> Tensor:
    """DistiLLM skew reverse KL: KL(q ‖ α·q + (1−α)·p). α = 0 is reverse KL, α = 1 gives 0."""
    _check_unit("alpha", alpha)
    return _teacher_loss(_skew_rkl_rows, student_logits, teacher_logits, labels, chunk_size,
                         alpha=alpha, temperature=temperature)


# ----------------------------------------------------------------------------------------
# DPO-family preference loss (sequence level; also the per-token core of DPKD)
# ----------------------------------------------------------------------------------------
def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def _preference_settings(loss_type: str, given: dict) -> dict:
    """The settings `loss_type` uses, defaults filled in. A setting it does not use is an
    error, never silently dropped (SimPO's γ given to the sigmoid loss, say)."""
    _check_loss_type(loss_type)
    used = LOSS_TYPE_PARAMS[loss_type]
    unused = [k for k, v in given.items() if v is not None and k not in used]
    if unused:
        raise ValueError(f"{', '.join(unused)} not used by loss_type {loss_type!r} "
                         f"(it uses: {', '.join(used) or 'nothing but beta'})")
    return {k: (given.get(k) if given.get(k) is not None else _PREFERENCE_DEFAULTS[k]) for k in used}


def _smoothed_sigmoid_loss(z: Tensor, label_smoothing: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z): conservative DPO (ε = 0 is plain −log σ(z))."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    *,
    label_smoothing: Optional[float] = None,
    reference_free: Optional[bool] = None,
    gamma: Optional[float] = None,
    dpop_lambda: Optional[float] = None,
    cpo_alpha: Optional[float] = None,
) -> Tensor:
    """Per-pair DPO-family loss (elementwise: [B] in, [B] out; any shape works).

    π_c, π_r: policy (student) log-probs of the chosen / rejected response; ref_c, ref_r:
    reference (teacher, in DPKD) log-probs. The DPO logit is
        h = (π_c − π_r) − (ref_c − ref_r),
    with ref_c = ref_r = 0 when ``reference_free`` (then the ref arguments may be None).
    Reference log-probs are detached: the reference (the teacher, in DPKD) is frozen.
    Each loss type takes only the settings it uses (``choices.LOSS_TYPE_PARAMS``); passing
    another one is an error. ε = ``label_smoothing`` (default 0). Variants, each formula next
    to its branch below:

    * "sigmoid" DPO / cDPO:  −(1−ε)·log σ(βh) − ε·log σ(−βh)
    * "ipo"  (Azar et al. 2023, eq. 17):  (h − 1/(2β))²
    * "hinge" (SLiC-style):  max(0, 1 − βh)
    * "dpop" DPO-Positive as the released DPKD code writes it (penalty outside the sigmoid):
          −(1−ε)·log σ(βh) − ε·log σ(−βh) + λ·max(0, ref_c − π_c)
      λ = ``dpop_lambda`` (default 50, the released code's and Smaug's). Pal et al. 2024 put
      the penalty inside the sigmoid, σ(β[h − λ·max(0, ref_c − π_c)]); the released form's
      penalty is not scaled by β and does not saturate. With ``reference_free`` ref_c = 0.
    * "simpo" (Meng et al. 2024; reference-free by construction, refs ignored):
          z = β·(π_c − π_r) − γ,  loss = −(1−ε)·log σ(z) − ε·log σ(−z)
      The caller passes length-normalised log-probs (sequence_logps(..., average=True)).
      γ = ``gamma`` (default 0) is the target margin.
    * "cpo" (Xu et al. 2024; reference-free, refs ignored):
          loss = −(1−ε)·log σ(z) − ε·log σ(−z) + α·(−π_c),  z = β·(π_c − π_r)
      i.e. the reference-free preference term plus the CPO NLL regulariser on the chosen
      response, α = ``cpo_alpha`` (default 1, the CPO paper's).
    """
    kw = _preference_settings(loss_type, dict(label_smoothing=label_smoothing,
                                              reference_free=reference_free, gamma=gamma,
                                              dpop_lambda=dpop_lambda, cpo_alpha=cpo_alpha))
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    eps = float(kw.get("label_smoothing", 0.0))
    _check_unit("label_smoothing", eps)
    dtype = torch.promote_types(_compute_dtype(chosen_logps), rejected_logps.dtype)
    pi_c = chosen_logps.to(dtype)
    pi_r = rejected_logps.to(dtype)

    if loss_type == "simpo":  # −log σ(β(π_c − π_r) − γ)
        return _smoothed_sigmoid_loss(beta * (pi_c - pi_r) - kw["gamma"], eps)
    if loss_type == "cpo":  # −log σ(β(π_c − π_r)) − α·π_c
        return _smoothed_sigmoid_loss(beta * (pi_c - pi_r), eps) - kw["cpo_alpha"] * pi_c

    if kw["reference_free"]:
        ref_c = ref_r = torch.zeros_like(pi_c)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type {loss_type!r} needs reference log-probs "
                             "(or reference_free=True)")
        ref_c = ref_chosen_logps.detach().to(dtype)
        ref_r = ref_rejected_logps.detach().to(dtype)
    h = (pi_c - pi_r) - (ref_c - ref_r)

    if loss_type == "sigmoid":  # −(1−ε) log σ(βh) − ε log σ(−βh)
        return _smoothed_sigmoid_loss(beta * h, eps)
    if loss_type == "ipo":  # (h − 1/(2β))²
        return (h - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":  # max(0, 1 − βh)
        return torch.relu(1.0 - beta * h)
    # loss_type == "dpop":  −log σ(βh) + λ·max(0, ref_c − π_c)   (released DPKD code)
    return _smoothed_sigmoid_loss(beta * h, eps) + kw["dpop_lambda"] * torch.relu(ref_c - pi_c)


def token_preference_loss(lp: "TokenPreferenceLogps", beta: float = 0.1,
                          loss_type: str = "sigmoid", **settings) -> Tensor:
    """Token-level DPKD from its four log-probs (`dpkd_token_logps`): the preference loss at
    each position, flat mean over positions. ``settings``: see :func:`preference_loss`."""
    return _mean(preference_loss(lp.policy_chosen, lp.policy_rejected, lp.ref_chosen,
                                 lp.ref_rejected, beta=beta, loss_type=loss_type, **settings))


def implicit_rewards(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    beta: float = 0.1,
    reference_free: bool = False,
) -> Tuple[Tensor, Tensor]:
    """DPO implicit rewards β·(π − ref), detached, for logging.

    Returns (chosen_rewards, rejected_rewards); reward margin = chosen − rejected, reward
    accuracy = mean(chosen > rejected). A None reference (or ``reference_free``) counts as 0.
    """
    def one(pi: Tensor, ref: Optional[Tensor]) -> Tensor:
        pi = _up(pi.detach())
        if reference_free or ref is None:
            return beta * pi
        return beta * (pi - ref.detach().to(pi.dtype))

    return one(chosen_logps, ref_chosen_logps), one(rejected_logps, ref_rejected_logps)


def _sequence_logp_rows(s: Tensor, y: Tensor) -> Tuple[Tensor]:
    # log q(y) = z_y − logsumexp(z)
    (nll,) = _sft_rows(s, y)
    return (-nll,)


def sequence_logps(logits: Tensor, labels: Tensor, average: bool = False,
                   chunk_size: Optional[int] = None) -> Tensor:
    """Per-sequence Σ_i log q(labels_i) over unmasked positions ([B, T, V], [B, T] -> [B]).

    ``average=True`` divides by each row's count of unmasked labels (length normalisation of
    the paper's experiments and of SimPO); a row with no unmasked label gives 0.
    """
    _check_shapes(logits, labels)
    if labels.dim() != 2:
        raise ValueError(f"sequence_logps expects labels [B, T], got {tuple(labels.shape)}")
    (lp,), mask = _per_position(_sequence_logp_rows, labels, (logits, labels), chunk_size)
    # put the [N] values back at their [B, T] places (masked_scatter keeps the row-major
    # order of x[mask]) and sum each row: deterministic, unlike index_add on a GPU
    out = lp.new_zeros(labels.shape).masked_scatter(mask, lp).sum(-1)
    if average:
        out = out / mask.sum(-1).clamp_min(1).to(out.dtype)
    return out


# ----------------------------------------------------------------------------------------
# DPKD token level (docs/method.md §2)
# ----------------------------------------------------------------------------------------
class TokenPreferenceLogps(NamedTuple):
    """The four DPKD log-probabilities at each unmasked position ([N] each, flat order).

    chosen = the teacher's greedy token t, rejected = the student's greedy token s:
    policy_* = log q(·), ref_* = log p(·) at the given temperature. ``chosen_ids``,
    ``rejected_ids`` are t and s (t == s marks an agreeing position).
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_ids: Tensor
    rejected_ids: Tensor


def _dpkd_rows_plain(s: Tensor, t: Tensor, temperature: float):
    # As in the released code: full-vocabulary log-softmax of both models, then gather.
    # Greedy tokens come from the untempered logits (same argmax; avoids ties that a
    # division could create by rounding), and carry no gradient.
    t_id = _up(t).argmax(-1, keepdim=True)            # teacher greedy token ("chosen")
    s_id = _up(s.detach()).argmax(-1, keepdim=True)   # student greedy token ("rejected")
    lq = F.log_softmax(_scaled(s, temperature), -1)
    lp = F.log_softmax(_scaled(t, temperature), -1)
    return (lq.gather(-1, t_id).squeeze(-1), lq.gather(-1, s_id).squeeze(-1),
            lp.gather(-1, t_id).squeeze(-1), lp.gather(-1, s_id).squeeze(-1),
            t_id.squeeze(-1), s_id.squeeze(-1))


@torch.no_grad()
def _dpkd_teacher_side(s: Tensor, t: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    """ids [n, 2] = (t, s) and teacher log-probs lp [n, 2] = (log p(t), log p(s))."""
    ids = torch.cat([_up(t).argmax(-1, keepdim=True), _up(s).argmax(-1, keepdim=True)], -1)
    zt = _scaled(t, temperature)
    return ids, zt.gather(-1, ids) - torch.logsumexp(zt, -1, keepdim=True)


def _dpkd_student_side(s: Tensor, ids: Tensor, temperature: float) -> Tuple[Tensor]:
    # log q(v) = z_v − logsumexp(z) for the two ids only: no [n, V] log-softmax is built.
    zs = _scaled(s, temperature)
    return (zs.gather(-1, ids) - torch.logsumexp(zs, -1, keepdim=True),)


def _dpkd_lean(student_logits, teacher_logits, labels, temperature, chunk_size):
    """Lean DPKD: the teacher side (argmaxes, 2 log-probs) is computed chunk by chunk with
    no graph and its rows are then dropped; only the student side is differentiated, each
    chunk under checkpointing. Autograd keeps the gathered student rows and [N, 2] tensors."""
    mask = labels != IGNORE_INDEX
    s_rows = _rows(student_logits, mask)
    n = s_rows.shape[0]
    with torch.no_grad():
        t_rows = teacher_logits[mask]
        parts = [_dpkd_teacher_side(s_rows[i:i + chunk_size], _logits(t_rows[i:i + chunk_size]),
                                    temperature) for i in range(0, n, chunk_size)]
        del t_rows
    if parts:
        ids, lp = (torch.cat(x) for x in zip(*parts))
    else:
        ids = torch.zeros(0, 2, dtype=torch.long, device=s_rows.device)
        lp = torch.zeros(0, 2, dtype=_compute_dtype(s_rows), device=s_rows.device)
    fn = functools.partial(_dpkd_student_side, temperature=temperature)
    (lq,) = _chunked(fn, (s_rows, ids), chunk_size)
    return lq[:, 0], lq[:, 1], lp[:, 0], lp[:, 1], ids[:, 0], ids[:, 1]


def dpkd_token_logps(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                     temperature: float = 1.0, chunk_size: Optional[int] = None
                     ) -> TokenPreferenceLogps:
    """log q(t), log q(s), log p(t), log p(s) and t, s at each unmasked position ([N] each).

    t = argmax teacher logits, s = argmax student logits (ties: first index; argmax carries
    no gradient). Teacher values are detached. See :func:`dpkd_token_loss`.
    """
    _check_shapes(student_logits, labels, ("teacher_logits", teacher_logits))
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                         f"{tuple(student_logits.shape)} differ")
    _check_temperature(temperature)
    _check_chunk(chunk_size)
    if chunk_size is None:
        fn = functools.partial(_dpkd_rows_plain, temperature=temperature)
        outs, _ = _per_position(fn, labels, (student_logits, _logits(teacher_logits.detach())), None)
    else:
        outs = _dpkd_lean(student_logits, teacher_logits.detach(), labels, temperature,
                          chunk_size)
    return TokenPreferenceLogps(*outs)


def dpkd_token_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    **settings,
) -> Tensor:
    """Token-level DPKD loss of the released code (docs/method.md §2), flat mean over positions.

    At each unmasked position: t = argmax p, s = argmax q (not differentiated),
        Δ = [log q(t) − log q(s)] − [log p(t) − log p(s)]   (teacher bracket dropped if
                                                              ``reference_free``)
    and ℓ = preference_loss(log q(t), log q(s), log p(t), log p(s), ...), i.e. for
    "sigmoid" ℓ = −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ), for "ipo" ℓ = (Δ − 1/(2β))², for "dpop"
    the sigmoid loss plus λ·max(0, log p(t) − log q(t)) (see :func:`preference_loss` for
    every variant; ``settings`` are its loss-type settings). Where t == s, Δ = 0 exactly: the position adds log 2 ("sigmoid",
    ε = 0; (1/(2β))² for "ipo") with zero gradient and still counts in the denominator
    ("dpop" and "cpo" keep a gradient there through their log q(t) terms). Log-probs are at
    ``temperature``. ``chunk_size``: see the module docstring (same value and gradient).
    """
    _preference_settings(loss_type, settings)  # fail before the forward work
    lg = dpkd_token_logps(student_logits, teacher_logits, labels, temperature, chunk_size)
    return token_preference_loss(lg, beta=beta, loss_type=loss_type, **settings)


# ----------------------------------------------------------------------------------------
# Teacher cache: top-k teacher log-probs
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0
                 ) -> Tuple[Tensor, Tensor]:
    """The teacher's top-k token ids and log-probs (at ``temperature``) per position.

    Returns (ids [..., k] int64, logps [..., k] fp32 or wider), sorted by decreasing
    log-prob, so ids[..., 0] is the teacher's greedy token. Only topk and logsumexp run over
    the vocabulary (no log-softmax is kept).
    """
    _check_temperature(temperature)
    k = min(int(k), teacher_logits.shape[-1])
    z = _up(teacher_logits)
    vals, ids = z.topk(k, dim=-1, largest=True, sorted=True)
    if temperature != 1.0:
        vals, z = vals / temperature, z / temperature
    return ids, vals - torch.logsumexp(z, -1, keepdim=True)


def _log_residual_mass(topk_logps: Tensor) -> Tensor:
    """log(1 − Σ_k p_k) of the teacher mass outside the top-k, computed in float64 (−inf
    when the top-k already hold all the mass to float64 precision)."""
    lse = torch.logsumexp(topk_logps.double(), -1)
    return torch.log((-torch.expm1(lse)).clamp_min(0.0))


@torch.no_grad()
def _dpkd_teacher_side_topk(s: Tensor, topk_ids: Tensor, topk_logps: Tensor
                            ) -> Tuple[Tensor, Tensor]:
    """ids (t, s) and (log p(t), log p(s) or its bound) from a top-k cache; any leading shape."""
    lpk = _up(topk_logps)
    best = lpk.argmax(-1, keepdim=True)              # robust to an unsorted cache
    t_id = topk_ids.gather(-1, best)                 # teacher greedy token
    s_id = _up(s).argmax(-1, keepdim=True)           # student greedy token
    lp_t = lpk.gather(-1, best)
    # log p(s): exact when s is among the cached ids ...
    hit = topk_ids == s_id
    lp_s_exact = torch.where(hit, lpk, torch.full_like(lpk, -math.inf)).amax(-1, keepdim=True)
    # ... else the upper bound u = min(k-th log-prob, log residual mass): p(s) is at most the
    # smallest cached probability and at most the uncached mass. An unusable (−inf) residual
    # falls back to the k-th log-prob.
    kth = lpk.amin(-1, keepdim=True)
    log_res = _log_residual_mass(topk_logps).to(lpk.dtype).unsqueeze(-1)
    bound = torch.where(torch.isfinite(log_res), torch.minimum(kth, log_res), kth)
    lp_s = torch.where(hit.any(-1, keepdim=True), lp_s_exact, bound)
    return torch.cat([t_id, s_id], -1), torch.cat([lp_t, lp_s], -1)


def dpkd_token_logps_from_teacher_topk(student_logits, labels, teacher_topk_ids,
                                       teacher_topk_logps, temperature=1.0, chunk_size=None
                                       ) -> TokenPreferenceLogps:
    """:func:`dpkd_token_logps` from a teacher top-k cache (see
    :func:`dpkd_token_loss_from_teacher_topk` for the approximation)."""
    _check_shapes(student_logits, labels, ("teacher_topk_ids", teacher_topk_ids),
                  ("teacher_topk_logps", teacher_topk_logps))
    if teacher_topk_ids.shape != teacher_topk_logps.shape:
        raise ValueError("teacher_topk_ids and teacher_topk_logps must have the same shape")
    _check_temperature(temperature)
    _check_chunk(chunk_size)
    mask = labels != IGNORE_INDEX
    s_rows = _rows(student_logits, mask)
    ids, lp = _dpkd_teacher_side_topk(s_rows.detach(), teacher_topk_ids[mask],
                                      teacher_topk_logps[mask])
    fn = functools.partial(_dpkd_student_side, temperature=temperature)
    if chunk_size is None:
        (lq,) = fn(s_rows, ids)
    else:
        (lq,) = _chunked(fn, (s_rows, ids), chunk_size)
    lp = lp.to(lq.dtype)
    return TokenPreferenceLogps(lq[:, 0], lq[:, 1], lp[:, 0], lp[:, 1], ids[:, 0], ids[:, 1])


def dpkd_token_loss_from_teacher_topk(
    student_logits: Tensor,
    labels: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    **settings,
) -> Tensor:
    """:func:`dpkd_token_loss` given only the teacher's top-k ids and log-probs per position
    (``teacher_topk_ids``, ``teacher_topk_logps``: [..., k], e.g. from :func:`teacher_topk`
    at the same ``temperature``; ``temperature`` here scales the student only).

    t = the cached id with the largest log-prob, and log p(t) is exact. log p(s) is exact
    when the student's greedy token s is cached. Otherwise it is replaced by the upper bound
        u = min(log p_(k), log(1 − Σ_{j ≤ k} p_(j)))
    (p(s) is at most the k-th largest probability and at most the uncached mass). Hence the
    teacher bracket log p(t) − log p(s) is underestimated, Δ is overestimated by
    u − log p(s) ≥ 0, and the "sigmoid" loss is a lower bound of the exact one, off by at most
    β·(u − log p(s)) per such position (log σ is 1-Lipschitz). Exact for k = V.
    """
    _preference_settings(loss_type, settings)  # fail before the forward work
    lg = dpkd_token_logps_from_teacher_topk(student_logits, labels, teacher_topk_ids,
                                            teacher_topk_logps, temperature, chunk_size)
    return token_preference_loss(lg, beta=beta, loss_type=loss_type, **settings)


def _topk_bucket_rows(s: Tensor, topk_ids: Tensor, topk_logps: Tensor, temperature: float,
                      full_vocab: bool):
    """Forward KL and soft CE between the (k+1)-bucket coarsenings of p and q: the k cached
    tokens plus one 'rest' bucket. Returns (kl, ce) per row."""
    zs = _scaled(s, temperature)
    lse = torch.logsumexp(zs, -1, keepdim=True)
    lq_k = zs.gather(-1, topk_ids) - lse                       # student log q on cached ids
    lp_k = topk_logps.to(zs.dtype)
    p_k = lp_k.exp()
    kl = _kl_terms(p_k, lp_k, lq_k).sum(-1)
    ce = -(p_k * lq_k).sum(-1)
    if full_vocab:  # k = V: no rest bucket
        return kl, ce
    # student rest mass: logsumexp over the uncached logits (stable, no 1 − Σ cancellation);
    # cached entries get the most negative finite value, so they add exp(−huge) = 0 and an
    # all-cached row gives a finite value instead of a NaN gradient.
    cached = torch.zeros_like(zs, dtype=torch.bool).scatter(-1, topk_ids, True)
    floor = torch.finfo(zs.dtype).min
    lq_rest = torch.logsumexp(zs.masked_fill(cached, floor), -1) - lse.squeeze(-1)
    lp_rest = _log_residual_mass(topk_logps).to(zs.dtype)       # teacher rest mass
    p_rest = lp_rest.exp()
    kl = kl + _kl_terms(p_rest, lp_rest, lq_rest)
    ce = ce - p_rest * torch.where(p_rest > 0, lq_rest, torch.zeros_like(lq_rest))
    return kl, ce


def _topk_loss(which, student_logits, labels, topk_ids, topk_logps, temperature, chunk_size):
    _check_shapes(student_logits, labels, ("topk_ids", topk_ids), ("topk_logps", topk_logps))
    if topk_ids.shape != topk_logps.shape:
        raise ValueError("topk_ids and topk_logps must have the same shape")
    _check_temperature(temperature)
    fn = functools.partial(_topk_bucket_rows, temperature=temperature,
                           full_vocab=topk_ids.shape[-1] >= student_logits.shape[-1])
    (kl, ce), _ = _per_position(fn, labels, (student_logits, topk_ids, topk_logps.detach()),
                                chunk_size)
    return _mean(kl if which == "kl" else ce)


def forward_kl_from_teacher_topk(student_logits, labels, topk_ids, topk_logps,
                                 temperature=1.0, chunk_size=None) -> Tensor:
    """Forward KL(p‖q) from a teacher top-k cache (ids, log-probs [..., k] at ``temperature``).

    Both distributions are coarsened to k + 1 buckets: the k cached tokens, and one 'rest'
    bucket holding the teacher's uncached mass 1 − Σ p_k against the student's mass on the
    uncached tokens. The result is the KL between the coarsened distributions: exact for
    k = V, and otherwise a lower bound of the full KL (data-processing / log-sum inequality).
    """
    return _topk_loss("kl", student_logits, labels, topk_ids, topk_logps, temperature,
                      chunk_size)


def soft_cross_entropy_from_teacher_topk(student_logits, labels, topk_ids, topk_logps,
                                         temperature=1.0, chunk_size=None) -> Tensor:
    """H(p, q) from a teacher top-k cache with the same k + 1 buckets as
    :func:`forward_kl_from_teacher_topk`: −Σ_k p_k log q_k − p_rest·log q_rest. Exact for
    k = V; otherwise at most the full H(p, q) (coarsening can only merge mass)."""
    return _topk_loss("ce", student_logits, labels, topk_ids, topk_logps, temperature,
                      chunk_size)
