"""Tests of dpkd_lib.losses against brute-force float64 references.

Every reference below is written differently from the library on purpose, so that a wrong
formula, mask, reduction or sign in the library makes a test fail instead of being copied:
explicit Python loops over positions, a softmax written by hand, first-index argmax by a
Python ``max``, probabilities (not log-probabilities) where a formula is stated on them, and
plain ``math`` floats for the per-pair preference formulas. The library computes in fp32, so
its fp32 results are compared with the float64 references at fp32 tolerances; float64 inputs
are also used for ``torch.autograd.gradcheck``.

Shapes are tiny (B=3, T=7, V≈50) so the whole file runs in a few seconds on one thread.
"""
import math

import pytest
import torch

from dpkd_lib import losses as L

B, T, V = 3, 7, 50
IGN = -100


# ----------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------
def make_inputs(seed=0, scale=3.0, v=V, agree=0.5):
    """float64 student/teacher logits and labels with scattered -100.

    The teacher is a noisy copy of the student at a random half of the positions, so that
    some positions have equal argmaxes (Δ = 0 in DPKD) and others do not.
    """
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, v, generator=g, dtype=torch.float64) * scale
    t = torch.randn(B, T, v, generator=g, dtype=torch.float64) * scale
    copy = torch.rand(B, T, 1, generator=g) < agree
    t = torch.where(copy, s * 1.3 + 0.1 * t, t)
    labels = torch.randint(0, v, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = IGN
    labels[0, 0] = IGN
    labels[1, :] = IGN           # a fully masked row (sequence_logps must give 0 there)
    labels[2, 3] = 5
    return s, t, labels


def positions(labels):
    return [(b, i) for b in range(labels.shape[0]) for i in range(labels.shape[1])
            if int(labels[b, i]) != IGN]


# ----------------------------------------------------------------------------------------
# brute-force float64 references (one position at a time)
# ----------------------------------------------------------------------------------------
def hand_log_softmax(z):
    m = max(z.tolist())
    e = torch.exp(z - m)
    return z - m - torch.log(e.sum())


def py_argmax(z):
    vals = z.tolist()
    return max(range(len(vals)), key=lambda i: vals[i])   # first index among ties


def neg_log_sigmoid(x):
    """−log σ(x) = log(1 + e^(−x)), written stably by hand."""
    return torch.log1p(torch.exp(-x.abs())) + torch.clamp(-x, min=0)


def xlog_ratio(a, b):
    """Σ a·log(a/b) with 0·log 0 = 0 (probabilities in)."""
    pos = a > 0
    safe_a = torch.where(pos, a, torch.ones_like(a))
    safe_b = torch.where(pos, b, torch.ones_like(b))
    return (a * torch.where(pos, torch.log(safe_a) - torch.log(safe_b), torch.zeros_like(a))).sum()


def ref_fkl(zs, zt):
    lp, lq = hand_log_softmax(zt), hand_log_softmax(zs)
    return (torch.exp(lp) * (lp - lq)).sum()


def ref_rkl(zs, zt):
    lp, lq = hand_log_softmax(zt), hand_log_softmax(zs)
    return (torch.exp(lq) * (lq - lp)).sum()


def ref_soft_ce(zs, zt):
    return -(torch.exp(hand_log_softmax(zt)) * hand_log_softmax(zs)).sum()


def ref_jsd(beta):
    def f(zs, zt):
        p, q = torch.exp(hand_log_softmax(zt)), torch.exp(hand_log_softmax(zs))
        m = beta * p + (1 - beta) * q
        return beta * xlog_ratio(p, m) + (1 - beta) * xlog_ratio(q, m)
    return f


def ref_skew_fkl(alpha):
    def f(zs, zt):
        p, q = torch.exp(hand_log_softmax(zt)), torch.exp(hand_log_softmax(zs))
        return xlog_ratio(p, alpha * p + (1 - alpha) * q)
    return f


def ref_skew_rkl(alpha):
    def f(zs, zt):
        p, q = torch.exp(hand_log_softmax(zt)), torch.exp(hand_log_softmax(zs))
        return xlog_ratio(q, alpha * q + (1 - alpha) * p)
    return f


def ref_token_mean(per_pos, s, t, labels, temperature=1.0):
    vals = [per_pos(s[b, i] / temperature, t[b, i] / temperature) for b, i in positions(labels)]
    return sum(vals) / len(vals)


def ref_dpkd_pos(zs, zt, beta, loss_type, eps, reference_free, dpop_lambda=50.0, gamma=0.0):
    """One position of docs/method.md §2, by hand (zs, zt already divided by the temperature)."""
    ti, si = py_argmax(zt), py_argmax(zs)
    lq, lp = hand_log_softmax(zs), hand_log_softmax(zt)
    lq_t, lq_s = lq[ti], lq[si]
    lp_t, lp_s = (0 * lp[ti], 0 * lp[si]) if reference_free else (lp[ti], lp[si])
    delta = (lq_t - lq_s) - (lp_t - lp_s)
    if loss_type == "sigmoid":
        return (1 - eps) * neg_log_sigmoid(beta * delta) + eps * neg_log_sigmoid(-beta * delta)
    if loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.clamp(1 - beta * delta, min=0)
    if loss_type == "dpop":  # the released code's form: penalty outside the sigmoid
        pen = torch.clamp(lp_t - lq_t, min=0)
        z = beta * delta
        return (1 - eps) * neg_log_sigmoid(z) + eps * neg_log_sigmoid(-z) + dpop_lambda * pen
    if loss_type == "simpo":
        z = beta * (lq_t - lq_s) - gamma
        return (1 - eps) * neg_log_sigmoid(z) + eps * neg_log_sigmoid(-z)
    if loss_type == "cpo":
        z = beta * (lq_t - lq_s)
        return (1 - eps) * neg_log_sigmoid(z) + eps * neg_log_sigmoid(-z) - lq_t
    raise AssertionError(loss_type)


def ref_dpkd(s, t, labels, beta=0.1, loss_type="sigmoid", eps=0.0, reference_free=False,
             temperature=1.0, **kw):
    return ref_token_mean(lambda zs, zt: ref_dpkd_pos(zs, zt, beta, loss_type, eps,
                                                      reference_free, **kw),
                          s, t, labels, temperature)


def ref_sft(s, labels):
    vals = [-hand_log_softmax(s[b, i])[int(labels[b, i])] for b, i in positions(labels)]
    return sum(vals) / len(vals)


def ref_sequence_logps(s, labels, average):
    out = []
    for b in range(labels.shape[0]):
        idx = [i for i in range(labels.shape[1]) if int(labels[b, i]) != IGN]
        tot = sum((hand_log_softmax(s[b, i])[int(labels[b, i])] for i in idx),
                  torch.zeros((), dtype=s.dtype))
        out.append(tot / len(idx) if (average and idx) else tot)
    return torch.stack(out)


# ----------------------------------------------------------------------------------------
# comparison helpers
# ----------------------------------------------------------------------------------------
def value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x)
    return out.detach(), g


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


def grad_tolerance(dtype, ref):
    """Tolerances that follow the dtype's resolution: the losses compute in fp32 and a bf16
    gradient is rounded once at the end, so two summation orders may land one bf16 ulp apart
    (seen on AMD EPYC without avx512). fp32 keeps the tight bounds."""
    eps = torch.finfo(dtype).eps
    return dict(rtol=max(1e-5, eps), atol=max(1e-7, eps * float(ref.abs().max())))


def used(loss_type, **settings):
    """Only the preference-loss settings `loss_type` uses (passing another is an error)."""
    return {k: v for k, v in settings.items() if k in L.LOSS_TYPE_PARAMS[loss_type]}


KD = {  # name -> (library call, per-position reference)
    "forward_kl": (lambda s, t, y, T, **k: L.forward_kl(s, t, y, temperature=T, **k), ref_fkl),
    "reverse_kl": (lambda s, t, y, T, **k: L.reverse_kl(s, t, y, temperature=T, **k), ref_rkl),
    "soft_ce": (lambda s, t, y, T, **k: L.soft_cross_entropy(s, t, y, temperature=T, **k),
                ref_soft_ce),
    "jsd_0.5": (lambda s, t, y, T, **k: L.js_divergence(s, t, y, temperature=T, **k),
                ref_jsd(0.5)),
    "jsd_0.2": (lambda s, t, y, T, **k: L.js_divergence(s, t, y, beta=0.2, temperature=T, **k),
                ref_jsd(0.2)),
    "skew_fkl": (lambda s, t, y, T, **k: L.skew_forward_kl(s, t, y, temperature=T, **k),
                 ref_skew_fkl(0.1)),
    "skew_rkl_0.3": (lambda s, t, y, T, **k: L.skew_reverse_kl(s, t, y, alpha=0.3,
                                                               temperature=T, **k),
                     ref_skew_rkl(0.3)),
}

DPKD_CASES = [  # (loss_type, label_smoothing, reference_free)
    ("sigmoid", 0.0, False), ("sigmoid", 0.2, False), ("sigmoid", 0.0, True),
    ("ipo", 0.0, False), ("hinge", 0.0, False), ("dpop", 0.0, False), ("dpop", 0.1, True),
    ("simpo", 0.0, False), ("cpo", 0.0, False),
]


# ----------------------------------------------------------------------------------------
# SFT, KD divergences
# ----------------------------------------------------------------------------------------
def test_sft_loss_value_and_grad():
    s, _, y = make_inputs(1)
    val, g = value_and_grad(lambda x: L.sft_loss(x, y), s.float())
    rval, rg = value_and_grad(lambda x: ref_sft(x, y), s)
    assert val.dtype == torch.float32 and val.dim() == 0
    assert_close(val, rval)
    assert_close(g, rg)


@pytest.mark.parametrize("name", list(KD))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_losses_value_and_grad(name, temperature):
    fn, ref = KD[name]
    s, t, y = make_inputs(2)
    val, g = value_and_grad(lambda x: fn(x, t.float(), y, temperature), s.float())
    rval, rg = value_and_grad(lambda x: ref_token_mean(ref, x, t, y, temperature), s)
    assert val.dim() == 0 and val.dtype == torch.float32
    assert_close(val, rval)
    assert_close(g, rg)


@pytest.mark.parametrize("name", list(KD))
def test_kd_losses_bf16_and_large_logits(name):
    fn, ref = KD[name]
    for scale, rtol, atol in [(3.0, 1e-4, 1e-5), (4e3, 1e-4, 1e-2)]:
        s, t, y = make_inputs(3, scale=scale)
        # ±1e4 logits, some exactly at the bounds
        s, t = s.clamp(-1e4, 1e4), t.clamp(-1e4, 1e4)
        s[0, 1, :3], t[2, 2, :3] = 1e4, -1e4
        for dtype in (torch.float32, torch.bfloat16):
            sd, td = s.to(dtype), t.to(dtype)
            val, g = value_and_grad(lambda x: fn(x, td, y, 1.5), sd)
            # the reference sees exactly the (rounded) values the library saw
            rval, rg = value_and_grad(lambda x: ref_token_mean(ref, x, td.double(), y, 1.5),
                                      sd.double())
            assert val.dtype == torch.float32 and torch.isfinite(val)
            assert torch.isfinite(g).all() and g.dtype == dtype
            assert_close(val, rval, rtol=rtol, atol=atol)
            # bf16 gradients are rounded to bf16 on the way out
            grtol = 1e-2 if dtype == torch.bfloat16 else 1e-4
            assert_close(g, rg, rtol=grtol, atol=1e-3 * rg.abs().max().item() + 1e-7)


def test_float64_stays_float64():
    s, t, y = make_inputs(4)
    assert L.forward_kl(s, t, y).dtype == torch.float64
    assert L.dpkd_token_loss(s, t, y).dtype == torch.float64
    assert L.sequence_logps(s, y).dtype == torch.float64
    assert L.sft_loss(s.bfloat16(), y).dtype == torch.float32


def test_kd_identities_and_conventions():
    s, t, y = make_inputs(5)
    s, t = s.float(), t.float()
    # H(p, q) = KL(p‖q) + H(p)
    ent = L.soft_cross_entropy(t, t, y)
    assert_close(L.soft_cross_entropy(s, t, y), L.forward_kl(s, t, y) + ent, atol=1e-5)
    # JSD at β = 0.5 is symmetric and at most log 2; β ∈ {0, 1} gives 0
    assert_close(L.js_divergence(s, t, y), L.js_divergence(t, s, y))
    assert L.js_divergence(s * 100, t * 100, y) <= math.log(2) + 1e-6
    assert float(L.js_divergence(s, t, y, beta=0.0)) == pytest.approx(0, abs=1e-7)
    assert float(L.js_divergence(s, t, y, beta=1.0)) == pytest.approx(0, abs=1e-7)
    # skew KL: α = 0 is the plain divergence, α = 1 is 0
    assert_close(L.skew_forward_kl(s, t, y, alpha=0.0), L.forward_kl(s, t, y))
    assert_close(L.skew_reverse_kl(s, t, y, alpha=0.0), L.reverse_kl(s, t, y))
    assert float(L.skew_forward_kl(s, t, y, alpha=1.0)) == pytest.approx(0, abs=1e-7)
    # no T² factor: temperature only rescales the logits
    assert_close(L.forward_kl(s, t, y, temperature=2.0), L.forward_kl(s / 2, t / 2, y))


def test_teacher_with_minus_inf_logits_padded_vocab():
    s, t, y = make_inputs(6)
    s, t = s.float(), t.float()
    t[..., -5:] = -math.inf        # padded vocabulary: p = 0 there
    for fn in (L.forward_kl, L.soft_cross_entropy, L.js_divergence, L.skew_forward_kl,
               L.skew_reverse_kl):
        for cs in (None, 4):
            val, g = value_and_grad(lambda x: fn(x, t, y, chunk_size=cs), s)
            assert torch.isfinite(val) and torch.isfinite(g).all(), fn.__name__
    # forward KL still matches the float64 reference (0·log 0 = 0)
    prob_fkl = lambda zs, zt: xlog_ratio(torch.exp(hand_log_softmax(zt)),
                                         torch.exp(hand_log_softmax(zs)))
    assert_close(L.forward_kl(s, t, y), ref_token_mean(prob_fkl, s.double(), t.double(), y))


# ----------------------------------------------------------------------------------------
# DPKD token loss
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,eps,ref_free", DPKD_CASES)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_dpkd_token_value_and_grad(loss_type, eps, ref_free, chunk_size):
    s, t, y = make_inputs(7)
    kw = dict(beta=0.3, loss_type=loss_type, temperature=1.7)
    extra = dict(dpop_lambda=5.0, gamma=0.4)
    val, g = value_and_grad(
        lambda x: L.dpkd_token_loss(x, t.float(), y, chunk_size=chunk_size, **kw,
                                    **used(loss_type, label_smoothing=eps, reference_free=ref_free,
                                           **extra)), s.float())
    rval, rg = value_and_grad(
        lambda x: ref_dpkd(x, t, y, 0.3, loss_type, eps, ref_free, 1.7, **extra), s)
    assert val.dim() == 0
    assert_close(val, rval, rtol=1e-5, atol=1e-5)
    assert_close(g, rg, rtol=1e-4, atol=1e-6)


def test_dpkd_inputs_have_both_agreeing_and_disagreeing_positions():
    s, t, y = make_inputs(7)
    lg = L.dpkd_token_logps(s, t, y)
    agree = (lg.chosen_ids == lg.rejected_ids)
    assert 0 < int(agree.sum()) < agree.numel()   # the tests above cover both kinds


def test_dpkd_delta_zero_positions_count_log2_with_zero_grad():
    # V = 4; positions 0 and 3 agree (Δ = 0), position 1 disagrees, position 2 is masked
    s = torch.tensor([[[3., 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 9], [0, 0, 0, 1]]])
    t = torch.tensor([[[2., 0, 1, 0], [0, 0, 3, 0], [9, 0, 0, 0], [0, 0, 0, 5]]])
    y = torch.tensor([[1, 1, IGN, 2]])
    beta = 0.1
    # position 1: t = 2, s = 1; log-sum-exps cancel: Δ = (0 − 2) − (3 − 0) = −5
    l1 = math.log1p(math.exp(-beta * -5.0))          # −log σ(βΔ)
    expected = (2 * math.log(2) + l1) / 3             # 3 unmasked positions
    for cs in (None, 1, 2, 100):
        x = s.clone().requires_grad_(True)
        tt = t.clone().requires_grad_(True)             # the teacher must get no gradient
        loss = L.dpkd_token_loss(x, tt, y, beta=beta, chunk_size=cs)
        loss.backward()
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert tt.grad is None
        assert torch.equal(x.grad[0, [0, 2, 3]], torch.zeros(3, 4))   # exactly zero
        assert x.grad[0, 1].abs().sum() > 0
        # reference_free: Δ = −2 at position 1
        rf = L.dpkd_token_loss(s, t, y, beta=beta, reference_free=True, chunk_size=cs)
        assert float(rf) == pytest.approx((2 * math.log(2) + math.log1p(math.exp(0.2))) / 3,
                                          rel=1e-6)
        # ipo: Δ = 0 gives (0 − 1/(2β))² = 25
        ipo = L.dpkd_token_loss(s, t, y, beta=beta, loss_type="ipo", chunk_size=cs)
        assert float(ipo) == pytest.approx((2 * 25 + (-5 - 5) ** 2) / 3, rel=1e-6)


def test_dpkd_all_positions_agree_is_exactly_log2():
    s, _, y = make_inputs(8)
    s = s.float()
    for cs in (None, 2):
        val, g = value_and_grad(lambda x: L.dpkd_token_loss(x, 2 * s + 1, y, chunk_size=cs), s)
        assert float(val) == pytest.approx(math.log(2), rel=1e-7)
        assert torch.equal(g, torch.zeros_like(g))


def test_dpkd_bf16_and_large_logits():
    for scale, rtol, atol in [(3.0, 1e-4, 1e-4), (4e3, 1e-4, 2e-2)]:
        s, t, y = make_inputs(9, scale=scale)
        s, t = s.clamp(-1e4, 1e4), t.clamp(-1e4, 1e4)
        for dtype in (torch.float32, torch.bfloat16):
            for loss_type in ("sigmoid", "ipo", "dpop"):
                sd, td = s.to(dtype), t.to(dtype)
                for cs in (None, 4):
                    val, g = value_and_grad(
                        lambda x: L.dpkd_token_loss(x, td, y, loss_type=loss_type,
                                                    temperature=2.0, chunk_size=cs), sd)
                    rval = ref_dpkd(sd.double(), td.double(), y, loss_type=loss_type,
                                    temperature=2.0)
                    assert torch.isfinite(val) and torch.isfinite(g).all()
                    assert_close(val, rval, rtol=rtol, atol=atol * max(1.0, abs(float(rval))))


def test_gradcheck_dpkd_token_loss():
    g = torch.Generator().manual_seed(10)
    s = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    t[0, 1] = s[0, 1] * 2          # one agreeing position
    y = torch.tensor([[1, 2, IGN], [IGN, 0, 3]])
    for loss_type in ("sigmoid", "ipo", "dpop", "cpo"):
        for cs in (None, 2):
            fn = lambda x: L.dpkd_token_loss(x, t, y, beta=0.5, loss_type=loss_type,
                                             temperature=1.3, chunk_size=cs,
                                             **used(loss_type, label_smoothing=0.1, dpop_lambda=2.0))
            assert torch.autograd.gradcheck(fn, (s.clone().requires_grad_(True),))


# ----------------------------------------------------------------------------------------
# no teacher gradient, all-masked batches, argument checks
# ----------------------------------------------------------------------------------------
TEACHER_LOSSES = [L.forward_kl, L.reverse_kl, L.soft_cross_entropy, L.js_divergence,
                  L.skew_forward_kl, L.skew_reverse_kl, L.dpkd_token_loss]


@pytest.mark.parametrize("fn", TEACHER_LOSSES, ids=lambda f: f.__name__)
def test_no_teacher_gradient_and_all_masked(fn):
    s, t, y = make_inputs(11)
    for cs in (None, 3):
        x = s.float().requires_grad_(True)
        tt = t.float().requires_grad_(True)
        fn(x, tt, y, chunk_size=cs).backward()
        assert tt.grad is None and x.grad is not None
        # every label masked: 0, still on the graph, zero (not NaN) gradient
        x = s.float().requires_grad_(True)
        out = fn(x, tt, torch.full_like(y, IGN), chunk_size=cs)
        out.backward()
        assert float(out.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
        assert tt.grad is None


def test_sft_and_sequence_logps_all_masked():
    s, _, y = make_inputs(12)
    for cs in (None, 2):
        x = s.float().requires_grad_(True)
        out = L.sft_loss(x, torch.full_like(y, IGN), chunk_size=cs)
        out.backward()
        assert float(out.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
        seq = L.sequence_logps(s, torch.full_like(y, IGN), average=True, chunk_size=cs)
        assert torch.equal(seq, torch.zeros(B, dtype=seq.dtype))


def test_argument_errors():
    s, t, y = make_inputs(13)
    with pytest.raises(ValueError):
        L.forward_kl(s, t[..., :-1], y)
    with pytest.raises(ValueError):
        L.dpkd_token_loss(s, t, y[:, :-1])
    with pytest.raises(ValueError):
        L.forward_kl(s, t, y, temperature=0.0)
    with pytest.raises(ValueError):
        L.dpkd_token_loss(s, t, y, beta=0.0)
    with pytest.raises(ValueError):
        L.forward_kl(s, t, y, chunk_size=0)
    with pytest.raises(ValueError):
        L.js_divergence(s, t, y, beta=1.5)
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        L.dpkd_token_loss(s, t, y, loss_type="kto")


# ----------------------------------------------------------------------------------------
# sequence level: sequence_logps, preference_loss, implicit_rewards
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps(average):
    s, _, y = make_inputs(14)
    for cs in (None, 1, 5):
        val, g = value_and_grad(lambda x: L.sequence_logps(x, y, average=average,
                                                           chunk_size=cs).sum(), s.float())
        rval, rg = value_and_grad(lambda x: ref_sequence_logps(x, y, average).sum(), s)
        assert_close(val, rval, atol=1e-5)
        assert_close(g, rg)
    out = L.sequence_logps(s.float(), y, average=average)
    assert out.shape == (B,) and float(out[1]) == 0.0          # row 1 is fully masked
    assert_close(out, ref_sequence_logps(s, y, average), atol=1e-5)


def ref_pair(pc, pr, rc, rr, beta, loss_type, eps, ref_free, gamma, lam, alpha):
    """One pair, in Python floats (math). Settings a loss type does not use are the
    library's defaults here (ε 0, no reference-free) so the reference cannot use them."""
    if "label_smoothing" not in L.LOSS_TYPE_PARAMS[loss_type]:
        eps = 0.0
    if "reference_free" not in L.LOSS_TYPE_PARAMS[loss_type]:
        ref_free = False
    nls = lambda z: math.log1p(math.exp(-z)) if z > -30 else -z   # −log σ(z)
    smooth = lambda z: (1 - eps) * nls(z) + eps * nls(-z)
    if ref_free:
        rc = rr = 0.0
    h = (pc - pr) - (rc - rr)
    return {
        "sigmoid": lambda: smooth(beta * h),
        "ipo": lambda: (h - 1 / (2 * beta)) ** 2,
        "hinge": lambda: max(0.0, 1 - beta * h),
        "dpop": lambda: smooth(beta * h) + lam * max(0.0, rc - pc),   # released code's form
        "simpo": lambda: smooth(beta * (pc - pr) - gamma),
        "cpo": lambda: smooth(beta * (pc - pr)) - alpha * pc,
    }[loss_type]()


def pair_inputs(n=16, seed=15):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-torch.rand(n, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    return pc, pr, rc, rr


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
@pytest.mark.parametrize("eps,ref_free", [(0.0, False), (0.2, False), (0.0, True)])
def test_preference_loss_formulas(loss_type, eps, ref_free):
    pc, pr, rc, rr = pair_inputs()
    kw = dict(beta=0.2, loss_type=loss_type, **used(loss_type, label_smoothing=eps, reference_free=ref_free,
                                                      gamma=0.7, dpop_lambda=3.0, cpo_alpha=0.5))
    out = L.preference_loss(pc.float(), pr.float(), rc.float(), rr.float(), **kw)
    exp = torch.tensor([ref_pair(*map(float, v), 0.2, loss_type, eps, ref_free, 0.7, 3.0, 0.5)
                        for v in zip(pc, pr, rc, rr)], dtype=torch.float64)
    assert out.shape == pc.shape and out.dtype == torch.float32
    assert_close(out, exp, rtol=1e-5, atol=1e-5)
    # simpo / cpo ignore the references
    if loss_type in ("simpo", "cpo"):
        alt = L.preference_loss(pc.float(), pr.float(), None, None, **kw)
        assert torch.equal(alt, out)


def test_preference_loss_specific_behaviour():
    pc, pr, rc, rr = pair_inputs()
    # reference-free equals passing zero references
    rf = L.preference_loss(pc, pr, rc, rr, reference_free=True)
    assert torch.equal(rf, L.preference_loss(pc, pr, torch.zeros_like(rc), torch.zeros_like(rr)))
    assert torch.equal(rf, L.preference_loss(pc, pr, None, None, reference_free=True))
    with pytest.raises(ValueError, match="reference"):
        L.preference_loss(pc, pr, None, None)
    # dpop equals sigmoid when the policy is above the reference on the chosen response
    hi = rc + 1.0
    assert_close(L.preference_loss(hi, pr, rc, rr, loss_type="dpop"),
                 L.preference_loss(hi, pr, rc, rr, loss_type="sigmoid"))
    # simpo's margin γ only shifts the logit
    a = L.preference_loss(pc, pr, None, None, loss_type="simpo", beta=2.0, gamma=0.5)
    b = L.preference_loss(pc + 0.25, pr, None, None, loss_type="simpo", beta=2.0, gamma=1.0)
    assert_close(a, b)
    # the reference gets no gradient
    ref = rc.clone().requires_grad_(True)
    x = pc.clone().requires_grad_(True)
    L.preference_loss(x, pr, ref, rr).sum().backward()
    assert ref.grad is None and x.grad is not None


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_a_setting_the_loss_type_does_not_use_is_refused(loss_type):
    pc, pr, rc, rr = pair_inputs()
    s, t, y = make_inputs(3)
    every = dict(label_smoothing=0.1, reference_free=True, gamma=0.3, dpop_lambda=2.0, cpo_alpha=0.5)
    for name, value in every.items():
        if name in L.LOSS_TYPE_PARAMS[loss_type]:
            out = L.preference_loss(pc, pr, rc, rr, loss_type=loss_type, **{name: value})
            assert not torch.equal(out, L.preference_loss(pc, pr, rc, rr, loss_type=loss_type)), name
        else:
            with pytest.raises(ValueError, match=f"{name} not used by loss_type '{loss_type}'"):
                L.preference_loss(pc, pr, rc, rr, loss_type=loss_type, **{name: value})
            with pytest.raises(ValueError, match=f"{name} not used"):
                L.dpkd_token_loss(s, t, y, loss_type=loss_type, **{name: value})


def test_unknown_loss_type_lists_valid_names():
    pc, pr, rc, rr = pair_inputs()
    assert isinstance(L.LOSS_TYPES, tuple) and {"sigmoid", "ipo", "simpo", "cpo",
                                                "dpop"} <= set(L.LOSS_TYPES)
    with pytest.raises(ValueError) as err:
        L.preference_loss(pc, pr, rc, rr, loss_type="nope")
    assert "'nope'" in str(err.value)
    assert all(name in str(err.value) for name in L.LOSS_TYPES)


def test_gradcheck_preference_loss():
    pc, pr, rc, rr = pair_inputs(n=5)
    for loss_type in L.LOSS_TYPES:
        fn = lambda a, b: L.preference_loss(a, b, rc, rr, beta=0.3, loss_type=loss_type,
                                            **used(loss_type, label_smoothing=0.1, gamma=0.2,
                                                   dpop_lambda=2.0))
        assert torch.autograd.gradcheck(fn, (pc.clone().requires_grad_(True),
                                             pr.clone().requires_grad_(True)))


def test_implicit_rewards():
    pc, pr, rc, rr = pair_inputs()
    x = pc.clone().requires_grad_(True)
    cr, rj = L.implicit_rewards(x, pr, rc, rr, beta=0.1)
    assert not cr.requires_grad and not rj.requires_grad
    assert_close(cr, 0.1 * (pc - rc))
    assert_close(rj, 0.1 * (pr - rr))
    # margin = β·h, the preference logit
    assert_close(cr - rj, 0.1 * ((pc - pr) - (rc - rr)))
    cr0, _ = L.implicit_rewards(pc, pr, rc, rr, beta=0.1, reference_free=True)
    assert_close(cr0, 0.1 * pc)


# ----------------------------------------------------------------------------------------
# lean (chunked, checkpointed) == plain
# ----------------------------------------------------------------------------------------
LEAN = {
    "sft": lambda s, t, y, cs: L.sft_loss(s, y, chunk_size=cs),
    "seq_logps": lambda s, t, y, cs: L.sequence_logps(s, y, average=True,
                                                      chunk_size=cs).sum(),
    "dpkd_sigmoid": lambda s, t, y, cs: L.dpkd_token_loss(s, t, y, label_smoothing=0.1,
                                                          temperature=2.0, chunk_size=cs),
    "dpkd_dpop": lambda s, t, y, cs: L.dpkd_token_loss(s, t, y, loss_type="dpop",
                                                       dpop_lambda=1.0, chunk_size=cs),
    **{name: (lambda f: lambda s, t, y, cs: f(s, t, y, 1.5, chunk_size=cs))(fn)
       for name, (fn, _) in KD.items()},
}


@pytest.mark.parametrize("name", list(LEAN))
def test_lean_equals_plain(name):
    fn = LEAN[name]
    s, t, y = make_inputs(16)
    for dtype in (torch.float32, torch.bfloat16):
        sd, td = s.to(dtype), t.to(dtype)
        val, g = value_and_grad(lambda x: fn(x, td, y, None), sd)
        for cs in (1, 4, 10_000):       # 1 row per chunk, several chunks, one chunk > N
            lval, lg = value_and_grad(lambda x: fn(x, td, y, cs), sd)
            assert_close(lval, val, rtol=1e-6, atol=1e-6)
            assert_close(lg, g, **grad_tolerance(dtype, g))


def test_lean_keeps_fewer_tensors_for_backward():
    """Bytes that autograd saves for backward (beyond the logits themselves)."""
    g = torch.Generator().manual_seed(17)
    s = torch.randn(2, 40, 300, generator=g).requires_grad_(True)
    t = torch.randn(2, 40, 300, generator=g)
    y = torch.randint(0, 300, (2, 40), generator=g)
    y[:, :32] = IGN                    # 20 % response positions

    def saved_bytes(fn):
        storages = {}

        def pack(x):
            st = x.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn()
        storages.pop(s.untyped_storage().data_ptr(), None)
        return sum(storages.values())

    full = s.numel() * 4
    for fn in (L.dpkd_token_loss, L.forward_kl):
        plain = saved_bytes(lambda: fn(s, t, y))
        lean = saved_bytes(lambda: fn(s, t, y, chunk_size=8))
        assert plain >= full                 # at least one full fp32 [B, T, V] tensor
        assert lean <= 0.45 * full, (fn.__name__, lean / full)
    # lean DPKD keeps only the gathered student rows (20 % of positions)
    assert saved_bytes(lambda: L.dpkd_token_loss(s, t, y, chunk_size=8)) <= 0.21 * full


# ----------------------------------------------------------------------------------------
# teacher top-k cache
# ----------------------------------------------------------------------------------------
def test_teacher_topk():
    s, t, y = make_inputs(18)
    ids, lp = L.teacher_topk(t.float(), 5, temperature=2.0)
    assert ids.shape == (B, T, 5) and ids.dtype == torch.long
    for b, i in [(0, 0), (2, 6), (1, 3)]:
        ls = hand_log_softmax(t[b, i] / 2.0)
        order = sorted(range(V), key=lambda v: -float(ls[v]))[:5]
        assert ids[b, i].tolist() == order
        assert_close(lp[b, i], ls[order])


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_topk_with_k_equal_v_is_exact(chunk_size):
    s, t, y = make_inputs(19)
    s, t = s.float(), t.float()
    ids, lp = L.teacher_topk(t, V, temperature=1.5)
    pairs = [
        (lambda x: L.dpkd_token_loss(x, t, y, loss_type="dpop", dpop_lambda=1.0,
                                     temperature=1.5),
         lambda x: L.dpkd_token_loss_from_teacher_topk(x, y, ids, lp, loss_type="dpop",
                                                       dpop_lambda=1.0, temperature=1.5,
                                                       chunk_size=chunk_size)),
        (lambda x: L.forward_kl(x, t, y, temperature=1.5),
         lambda x: L.forward_kl_from_teacher_topk(x, y, ids, lp, temperature=1.5,
                                                  chunk_size=chunk_size)),
        (lambda x: L.soft_cross_entropy(x, t, y, temperature=1.5),
         lambda x: L.soft_cross_entropy_from_teacher_topk(x, y, ids, lp, temperature=1.5,
                                                          chunk_size=chunk_size)),
    ]
    for exact, cached in pairs:
        ev, eg = value_and_grad(exact, s)
        cv, cg = value_and_grad(cached, s)
        assert_close(cv, ev, rtol=1e-5, atol=1e-5)
        assert_close(cg, eg, rtol=1e-4, atol=1e-6)


def test_topk_dpkd_small_k_bound():
    s, t, y = make_inputs(20, agree=0.3)
    s, t = s.float(), t.float()
    beta = 0.5
    exact = L.dpkd_token_logps(s, t, y)
    for k in (1, 3, 10):
        ids, lp = L.teacher_topk(t, k)
        approx = L.dpkd_token_logps_from_teacher_topk(s, y, ids, lp)
        # student terms, teacher argmax and log p(t) are exact
        for f in ("policy_chosen", "policy_rejected", "ref_chosen", "chosen_ids",
                  "rejected_ids"):
            assert_close(getattr(approx, f), getattr(exact, f))
        # log p(s): exact when s is cached, else an upper bound
        cached = (ids[y != IGN] == exact.rejected_ids[:, None]).any(-1)
        assert_close(approx.ref_rejected[cached], exact.ref_rejected[cached])
        gap = approx.ref_rejected - exact.ref_rejected
        assert (gap >= -1e-5).all()
        if k < 10:
            assert (~cached).any()          # the bound is exercised
        # per-position sigmoid loss: lower bound, off by at most β·gap (log σ is 1-Lipschitz)
        le = L.preference_loss(*exact[:4], beta=beta)
        la = L.preference_loss(*approx[:4], beta=beta)
        assert (la <= le + 1e-6).all() and (le - la <= beta * gap + 1e-5).all()
        mean = L.dpkd_token_loss_from_teacher_topk(s, y, ids, lp, beta=beta)
        assert_close(mean, la.mean())


def test_topk_dpkd_bound_value_by_hand():
    # teacher probs [0.5, 0.3, 0.15, 0.04, 0.01]; the student's greedy token is 4
    p = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01], dtype=torch.float64)
    t = p.log().float().view(1, 1, 5)
    s = torch.tensor([[[0., 0, 0, 0, 1]]])
    y = torch.tensor([[0]])
    for k, expected in [(1, 0.5), (2, 0.2), (3, 0.05), (4, 0.01)]:
        # k=1: min(p_1, rest) = min(.5, .5); k=2: min(.3, .2); k=3: min(.15, .05); k=4: exact
        ids, lp = L.teacher_topk(t, k)
        approx = L.dpkd_token_logps_from_teacher_topk(s, y, ids, lp)
        assert float(approx.ref_rejected) == pytest.approx(math.log(expected), abs=1e-5)
        assert float(approx.ref_chosen) == pytest.approx(math.log(0.5), abs=1e-5)
    p2 = torch.tensor([0.4, 0.2, 0.2, 0.2], dtype=torch.float64)   # k-th prob < rest mass
    ids, lp = L.teacher_topk(p2.log().float().view(1, 1, 4), 2)
    approx = L.dpkd_token_logps_from_teacher_topk(torch.tensor([[[0., 0, 0, 1]]]),
                                                  torch.tensor([[0]]), ids, lp)
    assert float(approx.ref_rejected) == pytest.approx(math.log(0.2), abs=1e-5)


def ref_bucket_kl(zs, zt, k):
    """Forward KL and soft CE between (k+1)-bucket coarsenings, by hand from probabilities."""
    p, q = torch.exp(hand_log_softmax(zt)), torch.exp(hand_log_softmax(zs))
    top = sorted(range(len(p)), key=lambda v: -float(p[v]))[:k]
    rest = [v for v in range(len(p)) if v not in top]
    pb = torch.stack([p[v] for v in top] + [p[rest].sum()])
    qb = torch.stack([q[v] for v in top] + [q[rest].sum()])
    return xlog_ratio(pb, qb), -(pb * torch.log(qb)).sum()


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_topk_forward_kl_small_k(chunk_size):
    s, t, y = make_inputs(21)
    for k in (1, 4):
        ids, lp = L.teacher_topk(t.float(), k, temperature=1.2)
        kl_fn = lambda x: L.forward_kl_from_teacher_topk(x, y, ids, lp, temperature=1.2,
                                                         chunk_size=chunk_size)
        ce_fn = lambda x: L.soft_cross_entropy_from_teacher_topk(x, y, ids, lp,
                                                                 temperature=1.2,
                                                                 chunk_size=chunk_size)
        for fn, j in ((kl_fn, 0), (ce_fn, 1)):
            val, g = value_and_grad(fn, s.float())
            rval, rg = value_and_grad(
                lambda x: ref_token_mean(lambda a, b: ref_bucket_kl(a, b, k)[j], x, t, y, 1.2),
                s)
            assert_close(val, rval, rtol=1e-5, atol=1e-5)
            assert_close(g, rg, rtol=1e-4, atol=1e-6)
        # coarsening can only lose divergence / cross-entropy
        full_kl = L.forward_kl(s.float(), t.float(), y, temperature=1.2)
        assert 0 <= float(kl_fn(s.float())) <= float(full_kl) + 1e-6
        full_ce = L.soft_cross_entropy(s.float(), t.float(), y, temperature=1.2)
        assert float(ce_fn(s.float())) <= float(full_ce) + 1e-6


@pytest.mark.parametrize("reference_free", [False, True])
def test_token_reward_stats_follow_reference_free(reference_free):
    """The logged token rewards are the ones the loss uses: β·(log q − log p) with the
    teacher, β·log q without it (reference_free, and the loss types that ignore the
    reference). They used to be measured against the teacher whatever reference_free said."""
    from types import SimpleNamespace

    from dpkd_lib.objectives import token_reward_stats
    pc, pr = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-3.0, -0.5, -0.5])
    rc, rr = torch.tensor([-0.2, -4.0, -1.0]), torch.tensor([-2.5, -1.0, -1.0])
    ids_c, ids_r = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 3])
    lp = L.TokenPreferenceLogps(pc, pr, rc, rr, ids_c, ids_r)
    beta = 0.5
    t = SimpleNamespace(beta=beta, loss_type="sigmoid", label_smoothing=0.0, reference_free=reference_free)
    out = token_reward_stats(t, lp)
    ref_c, ref_r = (0 * rc, 0 * rr) if reference_free else (rc, rr)
    want_c, want_r = beta * (pc - ref_c), beta * (pr - ref_r)
    assert out["reward_chosen"] == pytest.approx(float(want_c.mean()))
    assert out["reward_rejected"] == pytest.approx(float(want_r.mean()))
    assert out["reward_margin"] == pytest.approx(float((want_c - want_r).mean()))
    # accuracy over the positions where the tokens differ (the first two)
    assert out["reward_accuracy"] == pytest.approx(float((want_c > want_r)[:2].float().mean()))
    # the rewards differ between the two settings on these numbers: the test can tell them apart
    assert (beta * (pc - rc)).mean() != pytest.approx(float((beta * pc).mean()))
    simpo = SimpleNamespace(beta=beta, loss_type="simpo", label_smoothing=0.0, gamma=0.0, reference_free=False)
    assert token_reward_stats(simpo, lp)["reward_chosen"] == pytest.approx(float((beta * pc).mean()))
