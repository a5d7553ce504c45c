"""What one training step minimises, for every objective (docs/method.md §2).

    loss = (1 - k)·CE(dataset response) + k·objective + λ·L_pt
    L_pt = (1 - k)·CE(pre-train) + k·H(p, q)(pre-train)       pretrain_loss "released"
         = CE(pre-train)                                      pretrain_loss "ce"

k = ``train.kd_ratio`` (0 for ``sft`` and ``seqkd``, which have no teacher term), λ =
``train.lm_coef``. With k = λ = 0.5 this is the released DPKD runner's step; with k = 1 and
``pretrain_loss: ce`` it is the paper's Algorithm 1, L_DPKD + λ·L_PT.

`step_loss` is the one place this mix is written: training, the benchmarks and the memory
harness all call it. The teacher reaches it through a small interface, so the same step runs
with the teacher model in memory (`OnlineTeacher`) or with its signals read from a cache
built once (`CachedTeacher`, see teacher_cache.py).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from . import losses, precision
from .choices import LOSS_TYPE_PARAMS, MIX_OBJECTIVES, REFERENCE_FREE_LOSS_TYPES, TOKEN_OBJECTIVES


# ----------------------------------------------------------------------------- forward helpers

def response_hidden(model, batch):
    """Final (post-norm) hidden states at response positions, flattened: ([N, H], [N]).
    Position i predicts token i + 1 (shift); rows are in batch order."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=True, logits_to_keep=1, use_cache=False)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    return out.hidden_states[-1][:, :-1][mask], labels[mask]


def response_logits(model, batch):
    """Logits at response positions only, flattened: ([1, N, V], [1, N]).

    Only ~1/5 of positions carry a loss, and the vocabulary head is over half of a small
    student's FLOPs, so the head is applied to the gathered final hidden states of those
    positions, not to the whole [B, T, H] tensor.
    """
    hidden, labels = response_hidden(model, batch)
    head = getattr(model, "module", model).get_output_embeddings()  # DDP wraps the model
    logits = head(hidden.to(head.weight.dtype) if head.weight.dtype.is_floating_point else hidden)
    return logits.float().unsqueeze(0), labels.unsqueeze(0)


def full_logits(model, input_ids):
    """Logits of a pre-train block, flattened like `response_logits`: ([1, N, V], [1, N]),
    where row j scores the block's token j + 1."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
    return logits.float().reshape(1, -1, logits.shape[-1]), input_ids[:, 1:].reshape(1, -1)


def response_counts(batch) -> list[int]:
    """Response positions per row of a batch (the order `response_hidden` flattens them in)."""
    return (batch["labels"][:, 1:] != -100).sum(1).tolist()


def row_logps(logits, labels, batch, average: bool) -> Tensor:
    """Per-sequence log-probs [B] from response-row logits ([1, N, V], as `response_logits`
    returns them): each row's positions are passed to `losses.sequence_logps` on their own."""
    rows = (batch["labels"][:, 1:] != -100).nonzero()[:, 0]
    n_rows = batch["labels"].shape[0]
    return torch.cat([losses.sequence_logps(logits[:, rows == r], labels[:, rows == r], average=average)
                      for r in range(n_rows)])


# ----------------------------------------------------------------------------- the teacher

class TopK(NamedTuple):
    """The teacher's top-k token ids and log-probs at each position ([1, N, k] each)."""
    ids: Tensor
    logps: Tensor


class OnlineTeacher:
    """The teacher model itself, run without gradient at every step."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def response(self, batch) -> Tensor:
        return response_logits(self.model, batch)[0]

    @torch.no_grad()
    def pretrain(self, ids, names) -> Tensor:
        return full_logits(self.model, ids)[0]

    @torch.no_grad()
    def sequence_logps(self, batch, average: bool) -> Tensor:
        logits, labels = response_logits(self.model, batch)
        return row_logps(logits, labels, batch, average)


class CachedTeacher:
    """Teacher signals read from caches built once (teacher_cache.TeacherCache): the batch's
    rows of the teacher's hidden states with its head (`hidden` format: exact logits, which
    the lean losses compute chunk by chunk, `losses.TeacherHidden`) or the teacher's top-k
    (`topk` format). No teacher model."""

    def __init__(self, cache, pretrain_cache=None, device=None):
        self.cache, self.pretrain_cache, self.device = cache, pretrain_cache, device

    def _signal(self, cache, ids, counts):
        if cache.format == "topk":
            return TopK(*cache.gather(ids, counts))
        return cache.teacher_hidden(ids, counts, self.device)

    def response(self, batch):
        return self._signal(self.cache, batch["ids"], response_counts(batch))

    def pretrain(self, ids, names):
        return self._signal(self.pretrain_cache, names, None)

    def sequence_logps(self, batch, average):
        raise ValueError("DPKD-seq scores sampled responses: it needs the teacher model "
                         "(train.teacher_mode: online)")


# ----------------------------------------------------------------------------- the terms

def preference_kwargs(t) -> dict:
    """The preference-loss settings of `t`'s loss type (and only those: choices.py)."""
    return {name: getattr(t, name) for name in LOSS_TYPE_PARAMS[t.loss_type]}


def rewards_reference_free(t) -> bool:
    """Whether the loss measures its rewards without the teacher: ``reference_free``, or a
    loss type that ignores the reference (simpo, cpo). The logged rewards follow the loss."""
    return bool(t.reference_free) or t.loss_type in REFERENCE_FREE_LOSS_TYPES


def distill_term(t, s_logits, signal, labels) -> tuple[Tensor, dict]:
    """The objective's token-level term on response positions, next to its formula.
    `signal` is the teacher's logits (or `losses.TeacherHidden`), or its top-k (`TopK`)
    from a compact cache."""
    obj, chunk = t.objective, (t.loss_chunk_size or None)
    if obj == "dpkd_token":  # released code: teacher argmax chosen, student argmax rejected
        if isinstance(signal, TopK):  # log p(s) bounded where s is outside the top-k
            lp = losses.dpkd_token_logps_from_teacher_topk(s_logits, labels, *signal, chunk_size=chunk)
        else:
            lp = losses.dpkd_token_logps(s_logits, signal, labels, temperature=t.temperature,
                                         chunk_size=chunk)
        loss = losses.token_preference_loss(lp, beta=t.beta, loss_type=t.loss_type,
                                            **preference_kwargs(t))
        return loss, token_reward_stats(t, lp)
    if isinstance(signal, TopK):  # compact cache: kd (config checks), k tokens + a rest bucket
        return losses.forward_kl_from_teacher_topk(s_logits, labels, *signal, chunk_size=chunk), {}
    kw = dict(temperature=t.temperature, chunk_size=chunk)
    if obj == "kd":  # forward KL(p || q): mode covering (gradient equals soft CE's)
        return losses.forward_kl(s_logits, signal, labels, **kw), {}
    if obj == "rkl":  # reverse KL(q || p): mode seeking
        return losses.reverse_kl(s_logits, signal, labels, **kw), {}
    if obj == "jsd":  # generalised Jensen-Shannon (GKD / DistiLLM's family)
        return losses.js_divergence(s_logits, signal, labels, beta=t.jsd_beta, **kw), {}
    if obj == "skl":  # DistiLLM skew KL(p || a p + (1-a) q)
        return losses.skew_forward_kl(s_logits, signal, labels, alpha=t.skew_alpha, **kw), {}
    if obj == "srkl":  # DistiLLM skew reverse KL(q || a q + (1-a) p)
        return losses.skew_reverse_kl(s_logits, signal, labels, alpha=t.skew_alpha, **kw), {}
    raise ValueError(f"objective '{obj}' has no token-level term")


def chosen_grad_weight(t, pc, pr, rc, rr, tied=None) -> float:
    """Mean |dℓ/d log q(chosen)| of the preference loss at these log-probs: the scale of the
    update the term gives (β·σ(−βh) for the sigmoid loss, the analogue for the others), so
    that an ablation that changes this scale is not read as a change of form. Where chosen
    and rejected are the same token (`tied`), both log-probs move together: the sum counts."""
    with torch.enable_grad():
        c, r = pc.detach().clone().requires_grad_(True), pr.detach().clone().requires_grad_(True)
        loss = losses.preference_loss(c, r, rc, rr, beta=t.beta, loss_type=t.loss_type,
                                      **preference_kwargs(t))
        g_c, g_r = torch.autograd.grad(loss.sum(), (c, r))
    weight = torch.where(tied, g_c + g_r, g_c) if tied is not None else g_c
    return weight.abs().mean().item() if weight.numel() else float("nan")


@torch.no_grad()
def token_reward_stats(t, lp) -> dict:
    """Implicit token rewards β·log(q/p) of the chosen (teacher argmax) and rejected (student
    argmax) tokens: their means, margin, how often chosen beats rejected where they differ,
    how often they differ, and the effective gradient weight (`chosen_grad_weight`)."""
    r_c, r_r = losses.implicit_rewards(lp.policy_chosen, lp.policy_rejected, lp.ref_chosen,
                                       lp.ref_rejected, beta=t.beta, reference_free=rewards_reference_free(t))
    differ = lp.chosen_ids != lp.rejected_ids
    acc = (r_c > r_r)[differ].float().mean().item() if differ.any() else float("nan")
    return {"reward_chosen": r_c.mean().item(), "reward_rejected": r_r.mean().item(),
            "reward_margin": (r_c - r_r).mean().item(), "reward_accuracy": acc,
            "argmax_disagree": differ.float().mean().item(),
            "grad_weight": chosen_grad_weight(t, lp.policy_chosen, lp.policy_rejected,
                                              lp.ref_chosen, lp.ref_rejected, tied=~differ)}


def sequence_preference(t, student, teacher, pair) -> tuple[Tensor, dict]:
    """The paper's DPKD (sequence level): the teacher's response is chosen, the student's own
    sample rejected; log-probs length-normalised unless `length_normalize` is off. A pair
    may carry the teacher's log-probs of its chosen side (``ref_chosen``, computed once)."""
    avg = t.length_normalize
    logps = {}
    for side in ("chosen", "rejected"):
        batch = pair[side]
        s_logits, labels = response_logits(student, batch)
        logps[side] = row_logps(s_logits, labels, batch, avg)
        ref = pair.get("ref_" + side)
        logps["ref_" + side] = ref if ref is not None else teacher.sequence_logps(batch, avg)
    per_pair = losses.preference_loss(
        logps["chosen"], logps["rejected"], logps["ref_chosen"], logps["ref_rejected"],
        beta=t.beta, loss_type=t.loss_type, **preference_kwargs(t))
    r_c, r_r = losses.implicit_rewards(logps["chosen"], logps["rejected"], logps["ref_chosen"],
                                       logps["ref_rejected"], beta=t.beta,
                                       reference_free=rewards_reference_free(t))
    stats = {"reward_chosen": r_c.mean().item(), "reward_rejected": r_r.mean().item(),
             "reward_margin": (r_c - r_r).mean().item(),
             "reward_accuracy": (r_c > r_r).float().mean().item(),
             "grad_weight": chosen_grad_weight(t, *(logps[k] for k in
                                                    ("chosen", "rejected", "ref_chosen", "ref_rejected"))),
             "rejected_len": float((pair["rejected"]["labels"] != -100).sum(1).float().mean())}
    for side, lengths in pair.get("lengths", {}).items():  # train.sample_stats of each side
        stats |= {f"{side}_{k}": v for k, v in lengths.items()}
    return per_pair.mean(), stats


# ----------------------------------------------------------------------------- the step

@dataclass
class StepLoss:
    """One micro-batch's loss: ``total`` = Σ ``terms`` (each already weighted);
    ``parts`` are the unweighted values for the log, ``stats`` the monitors."""
    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


def step_loss(t, student, teacher, batch, *, pretrain=None, pair=None,
              response_scale: float = 1.0) -> StepLoss:
    """The loss of one micro-batch (module docstring), with its weighted terms.

    t: the train section (config.TrainConfig). teacher: `OnlineTeacher`, `CachedTeacher` or
    None (objectives without a teacher term). batch: a collated SFT batch on the device.
    pretrain: (block ids [B, T], block names) or None. pair: DPKD-seq's {"chosen",
    "rejected"} batches (+ optional "ref_chosen" log-probs). response_scale multiplies the
    response terms (several processes: see train.Trainer.token_share).
    """
    # no_distill (the control) keeps the mix's weights with the distillation slot empty
    k = t.kd_ratio if t.objective in MIX_OBJECTIVES else 0.0
    device = batch["input_ids"].device.type
    amp = precision.resolve(t.autocast_dtype, device)  # "auto": by the card (fp32 on CPU)
    autocast = torch.autocast(device, dtype=getattr(torch, amp), enabled=amp != "float32")
    raw, stats = {}, {}
    with autocast:
        # DPKD-seq with k = 1 gives the dataset CE no weight: it is logged (the reference-NLL
        # monitor), not differentiated, which saves a backward pass through the batch
        with torch.no_grad() if t.objective == "dpkd_seq" and k == 1 else contextlib.nullcontext():
            s_logits, labels = response_logits(student, batch)
            raw["ce"] = losses.sft_loss(s_logits, labels, chunk_size=t.loss_chunk_size or None)
        if t.objective == "dpkd_seq":
            raw["distill"], stats = sequence_preference(t, student, teacher, pair)
        elif k > 0 and t.objective in TOKEN_OBJECTIVES:
            raw["distill"], stats = distill_term(t, s_logits, teacher.response(batch), labels)
        if pretrain is not None:
            pt_ids, pt_names = pretrain
            pt_logits, pt_labels = full_logits(student, pt_ids)
            raw["pt_ce"] = losses.sft_loss(pt_logits, pt_labels, chunk_size=t.loss_chunk_size or None)
            if k > 0 and t.pretrain_loss == "released":
                signal = teacher.pretrain(pt_ids, pt_names)
                if isinstance(signal, TopK):  # top-k plus one bucket for the rest (exact at k = V)
                    raw["pt_kd"] = losses.soft_cross_entropy_from_teacher_topk(pt_logits, pt_labels, *signal)
                else:
                    raw["pt_kd"] = losses.soft_cross_entropy(pt_logits, signal, pt_labels)
    released = t.pretrain_loss == "released"
    weights = {"ce": (1 - k) * response_scale, "distill": k * response_scale,
               "pt_ce": t.lm_coef * ((1 - k) if released else 1.0), "pt_kd": t.lm_coef * k}
    terms = {name: weights[name] * value for name, value in raw.items() if weights[name] != 0}
    total = sum(terms.values())
    stats["response_tokens"] = int((labels != -100).sum())
    return StepLoss(total, terms, {name: v.item() for name, v in raw.items()}, stats)


def adam_preconditioner(optimizer):
    """A function (param, this step's gradient G) -> what Adam divides this step's update by,
    in float64: 1 / (sqrt(v̂) + eps), v̂ = (β2·v + (1 − β2)·G²) / (1 − β2^(t+1)) with v and t
    from the optimizer's state (AdamW, or accelerate's wrapper of it; none yet: v = 0, t = 0,
    so the first step gives v̂ = G²). G enters v̂ as it does in Adam's own step: with the
    state alone, a weight no earlier batch reached (an embedding row, v = 0) would divide by
    eps and swamp every other. Momentum is left out."""
    opt = getattr(optimizer, "optimizer", optimizer)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}

    def precondition(param, step_grad: Tensor) -> Tensor:
        group, state = group_of[id(param)], opt.state.get(param, {})
        beta2 = group["betas"][1]
        if "exp_avg_sq" in state:
            v, t = state["exp_avg_sq"].double(), float(state["step"])
        else:
            v, t = torch.zeros_like(step_grad), 0.0
        v_hat = (beta2 * v + (1.0 - beta2) * step_grad * step_grad) / (1.0 - beta2 ** (t + 1.0))
        return 1.0 / (v_hat.sqrt() + group["eps"])
    return precondition


def gradient_split(terms: dict[str, Tensor], params, optimizer=None, *, clip: float = 0.0,
                   scale: float = 1.0) -> dict[str, float]:
    """Where the update comes from: each weighted term's gradient alone (one extra backward
    per term; call on a sample of steps only). Gradients are not accumulated. Returns

    * raw gradient: ``gnorm_<term>``, ``gcos_<term>`` (cosine with the total gradient),
      ``gnorm_total`` and ``grad_share_<term>`` = <g_i, g> / |g|², the term's share of the
      raw gradient (its projection on the total; the shares sum to 1);
    * with ``optimizer`` (AdamW), the same for the update: this step's gradient is G = c·g
      (``scale`` = 1 / grad_accum, then clipped to norm ``clip`` as the step clips it;
      exact with one micro-batch per step), D = `adam_preconditioner`, and u_i = D·c·g_i is
      how far Adam moves for the term (per unit of learning rate, momentum left out);
      ``adam_norm_<term>``, ``adam_cos_<term>``, ``adam_norm_total`` and
      ``adam_share_<term>`` = <u_i, u> / |u|², u = Σ u_i: the term's share of the AdamW
      update. Under Adam a small gradient on weights that rarely move can move them far:
      the raw share does not say how much of the step a term makes. Weight decay, from no
      term, is left out.

    Norms and dot products are summed in float64, one parameter at a time: over tens of
    millions of float32 entries a float32 sum is off by ~0.2 % (a term's cosine with itself
    came out 1.005), and no flat copy of the gradients is made."""
    params = [p for p in params if p.requires_grad]
    grads = {name: torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
             for name, value in terms.items()}
    precondition = adam_preconditioner(optimizer) if optimizer is not None else None
    spaces = ("grad", "adam") if precondition else ("grad",)
    sq = {space: dict.fromkeys(grads, 0.0) for space in spaces}
    dot = {space: dict.fromkeys(grads, 0.0) for space in spaces}
    sq_total = dict.fromkeys(spaces, 0.0)

    def parts_of(i):
        return {name: g[i].double() for name, g in grads.items() if g[i] is not None}
    factor = scale
    if precondition and clip > 0:  # the step's clipping factor, from the total gradient's norm
        norm = math.sqrt(sum(float((sum(p.values()) ** 2).sum()) for p in map(parts_of, range(len(params))) if p))
        factor = scale * min(1.0, clip / (scale * norm)) if norm > 0 else scale
    for i, param in enumerate(params):
        parts = parts_of(i)
        if not parts:
            continue
        total = sum(parts.values())
        d = {"grad": None, "adam": factor * precondition(param, factor * total) if precondition else None}
        for space in spaces:
            t = total if d[space] is None else d[space] * total
            sq_total[space] += float((t * t).sum())
            for name, g in parts.items():
                u = g if d[space] is None else d[space] * g
                sq[space][name] += float((u * u).sum())
                dot[space][name] += float((u * t).sum())
    out = {}
    for space in spaces:
        norm_key, cos_key, share_key = (("gnorm", "gcos", "grad_share") if space == "grad"
                                        else ("adam_norm", "adam_cos", "adam_share"))
        norm_total = math.sqrt(sq_total[space])
        out[f"{norm_key}_total"] = norm_total
        for name in grads:
            norm = math.sqrt(sq[space][name])
            out[f"{norm_key}_{name}"] = norm
            out[f"{cos_key}_{name}"] = dot[space][name] / (norm * norm_total) if norm > 0 and norm_total > 0 else 0.0
            out[f"{share_key}_{name}"] = dot[space][name] / sq_total[space] if sq_total[space] > 0 else 0.0
    return out
