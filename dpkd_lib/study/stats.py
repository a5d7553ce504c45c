"""The study's statistics: intervals over training seeds, Holm's correction, power and sizing.

Training seeds are the unit of replication (docs/design.md §7). A comparison of methods a
and b is a matrix of paired differences ``d[s, p]``: seed s of a minus the same seed of b
(same batches, same pre-train blocks), on prompt p (every model sees the same prompts). Its
model: d[s, p] = δ + u_s + v_p + e_sp, with u the seed effect (sd σ_u), v a prompt × method
effect shared by every seed and e the per-(seed, prompt) noise (sd σ_e). The estimand is
the difference on the study's prompts, δ + mean(v); each seed's mean difference is it plus
u_s plus mean_p(e_sp), independent across seeds, so Student's t over the S per-seed means on
S − 1 degrees of freedom is exact for normal seed effects at any S ≥ 2 (`paired_interval`):
the prompt noise is inside each seed's mean. One seed leaves only the prompts: that
interval is labelled "prompt sampling only" and is never used to compare methods.

Why not the bootstrap used before: resampling 2-3 seeds with replacement cannot see how far
a new seed would fall, and resampling prompts as well counts their noise twice. Its coverage
of a nominal 95 % therefore depends on what the between-seed sd (1.1-1.9 ROUGE-L in the cpu
study) is made of: 75-77 % at 3 seeds and 59-66 % at 2 when it is the seeds' own (per-prompt
effects shared by both methods), 89-99 % when per-prompt noise of sd 12-15 makes much of it.
This interval covers 94.8-95.1 % in every case (tests/test_stats.py measures both).

Several declared comparisons: Holm's step-down decides (`holm`) and every interval is drawn
at the Bonferroni level 1 − α/m (`bonferroni_level`), so an interval that excludes 0 is
always a Holm rejection. Power: `mdd` (the minimum detectable difference of a t test at a
corrected level, exact noncentral t), `mdd_for_seeds`, `design_table` and `seeds_needed`
size a design from variance components (`variance_components` measures them).

Plain numpy (no scipy in the environment): the t distribution through the regularised
incomplete beta function (continued fraction), the noncentral t's power by quadrature over
the chi distribution; both are checked against mpmath and simulation in the tests.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# ----------------------------------------------------------------------------- distributions

_LGAMMA = np.frompyfunc(math.lgamma, 1, 1)


def _lgamma(x) -> np.ndarray:
    return np.asarray(_LGAMMA(np.asarray(x, dtype=float)), dtype=float)


def _betacf(a, b, x, iters: int = 400) -> np.ndarray:
    """Continued fraction of the incomplete beta function (modified Lentz), vectorised."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < tiny, tiny, d)
    d = 1.0 / d
    h = d.copy()
    for m in range(1, iters + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        h = h * d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        delta = d * c
        h = h * delta
        if np.all(np.abs(delta - 1.0) < 1e-15):
            break
    return h


def betainc(a, b, x) -> np.ndarray:
    """The regularised incomplete beta function I_x(a, b), elementwise."""
    a, b, x = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (a, b, x)))
    out = np.where(x <= 0, 0.0, 1.0)
    inner = (x > 0) & (x < 1)
    if not inner.any():
        return out
    a, b, x = a[inner], b[inner], x[inner]
    front = np.exp(_lgamma(a + b) - _lgamma(a) - _lgamma(b) + a * np.log(x) + b * np.log1p(-x))
    direct = x < (a + 1.0) / (a + b + 2.0)   # where the fraction converges fast; else symmetry
    val = np.empty_like(x)
    if direct.any():
        val[direct] = front[direct] * _betacf(a[direct], b[direct], x[direct]) / a[direct]
    if (~direct).any():
        nd = ~direct
        val[nd] = 1.0 - front[nd] * _betacf(b[nd], a[nd], 1.0 - x[nd]) / b[nd]
    out[inner] = val
    return out


def t_sf(t, df) -> np.ndarray:
    """P(T > t) of Student's t on `df` degrees of freedom (any df > 0, not only integers)."""
    t, df = np.broadcast_arrays(np.asarray(t, dtype=float), np.asarray(df, dtype=float))
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return np.where(t >= 0, tail, 1.0 - tail)


def t_ppf(q, df) -> np.ndarray:
    """The q-quantile of Student's t on `df` degrees of freedom (bisection on the beta
    argument y = df / (df + t²), which keeps the far tails of 1-2 df exact)."""
    q, df = np.broadcast_arrays(np.asarray(q, dtype=float), np.asarray(df, dtype=float))
    if np.any((q <= 0) | (q >= 1)):
        raise ValueError("t_ppf: q must lie strictly between 0 and 1")
    tail = np.where(q > 0.5, 1.0 - q, q)           # the one-sided tail beyond |t|
    lo, hi = np.zeros_like(q), np.ones_like(q)     # 0.5·I_y(df/2, 1/2) rises with y
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        below = 0.5 * betainc(df / 2.0, 0.5, mid) < tail
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    y = 0.5 * (lo + hi)
    t = np.sqrt(df * (1.0 - y) / y)
    return np.where(q > 0.5, t, np.where(q == 0.5, 0.0, -t))


def norm_cdf(x) -> np.ndarray:
    """Φ(x), elementwise (erfc by Chebyshev fit, relative error < 1.2e-7: Numerical Recipes)."""
    z = np.abs(np.asarray(x, dtype=float)) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    return np.where(np.asarray(x) >= 0, 1.0 - 0.5 * erfc, 0.5 * erfc)


# ----------------------------------------------------------------------------- intervals

SEEDS = "seeds"                          # t over per-seed mean differences, S - 1 df
PROMPTS_ONLY = "prompt sampling only"    # one seed: the prompts are the only replication

def ratio_contributions(num, den) -> np.ndarray:
    """Per-(seed, prompt) values whose mean over prompts is each seed's Σnum / Σden (the
    token-weighted NLL, say), linearised so that their spread over prompts is the ratio's:
    c = R_s + (num − R_s·den) / mean(den). With den ≡ 1 this is num itself."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    ratio = num.sum(axis=-1, keepdims=True) / den.sum(axis=-1, keepdims=True)
    return ratio + (num - ratio * den) / den.mean(axis=-1, keepdims=True)


def paired_interval(d, level: float = 0.95) -> dict:
    """Interval for the mean of paired differences ``d`` [..., S, P] (leading axes: independent
    data sets, vectorised for simulation). Returns: mean, se, df, lo, hi, p (two-sided, H0:
    δ = 0, from the same t and df, so the interval excludes 0 exactly when p < 1 − level),
    seed_sd (sd of the S per-seed mean differences), n_seeds, n_prompts, kind, level.

    S ≥ 2 ("seeds"): Student's t over the S per-seed mean differences, S − 1 df; the target is
    the difference on these prompts, and every seed's mean carries its own prompt noise.
    S = 1 ("prompt sampling only"): the prompts alone, t on P − 1 df; it says nothing about a
    new training seed, so it is never used to compare methods."""
    d = np.asarray(d, dtype=float)
    if d.ndim < 2:
        raise ValueError("paired_interval: give d as [..., seeds, prompts]")
    S, P = d.shape[-2:]
    if S < 1 or P < 2:
        raise ValueError(f"paired_interval: {S} seed(s) x {P} prompt(s); need 1+ seeds and 2+ prompts")
    mean = d.mean(axis=(-2, -1))
    if S == 1:
        se = d[..., 0, :].std(axis=-1, ddof=1) / math.sqrt(P)
        df, seed_sd, kind = float(P - 1), np.full(mean.shape, np.nan), PROMPTS_ONLY
    else:
        seed_sd = d.mean(axis=-1).std(axis=-1, ddof=1)
        se, df, kind = seed_sd / math.sqrt(S), float(S - 1), SEEDS
    q = float(t_ppf(0.5 + level / 2.0, df))
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = np.where(se > 0, np.abs(mean) / se, np.where(mean == 0, 0.0, np.inf))
    p = np.minimum(1.0, 2.0 * t_sf(stat, df))
    return {"mean": mean, "se": se, "df": df, "lo": mean - q * se, "hi": mean + q * se, "p": p,
            "seed_sd": seed_sd, "n_seeds": S, "n_prompts": P, "kind": kind, "level": level}


def bonferroni_level(m: int, alpha: float = 0.05) -> float:
    """The confidence level of each of m intervals that hold together at 1 − alpha."""
    if m < 1:
        raise ValueError("bonferroni_level: m must be at least 1")
    return 1.0 - alpha / m


def holm(p: Sequence[float], alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down: (adjusted p-values, rejected) in the input order. A NaN p (a
    comparison that could not be made) counts in m, is never rejected and stops nothing."""
    p = np.asarray(p, dtype=float)
    m = len(p)
    order = np.argsort(np.where(np.isnan(p), np.inf, p), kind="stable")
    adj, rejected = np.full(m, np.nan), np.zeros(m, dtype=bool)
    running, still = 0.0, True
    for rank, i in enumerate(order):
        if np.isnan(p[i]):
            continue
        running = max(running, min(1.0, (m - rank) * p[i]))
        still = still and p[i] <= alpha / (m - rank)
        adj[i], rejected[i] = running, still
    return adj, rejected


# ----------------------------------------------------------------------------- power

def _power_curve(df: float, alpha: float, grid: int = 20001):
    """The power of the two-sided t test at level `alpha` on `df` degrees of freedom as a
    function of the noncentrality λ = δ / se: P(|T'| > c) = E_U[Φ(λ − cU) + Φ(−λ − cU)] over
    U = sqrt(χ²_df / df), by the trapezoid rule on a fine grid of U's density."""
    if df < 1:
        raise ValueError(f"t power: df {df} < 1")
    c = float(t_ppf(1.0 - alpha / 2.0, df))
    u = np.linspace(0.0, 1.0 + 12.0 / math.sqrt(df), grid)
    dens = np.zeros_like(u)
    pos = u > 0
    dens[pos] = np.exp(math.log(2.0) + (df / 2.0) * math.log(df / 2.0) - math.lgamma(df / 2.0)
                       + (df - 1.0) * np.log(u[pos]) - df * u[pos] ** 2 / 2.0)
    dens[0] = math.sqrt(2.0 / math.pi) if df == 1 else 0.0

    def power(lam) -> np.ndarray:
        lam = np.atleast_1d(np.asarray(lam, dtype=float))
        inner = norm_cdf(lam[:, None] - c * u[None, :]) + norm_cdf(-lam[:, None] - c * u[None, :])
        return np.trapezoid(inner * dens[None, :], u, axis=1)
    return power


def t_power(delta, se, df: float, alpha: float = 0.05) -> np.ndarray:
    """Power of the two-sided t test at level `alpha` on `df` degrees of freedom when the true
    difference is `delta` and the estimate's standard error `se` (exact noncentral t)."""
    lam = np.asarray(delta, dtype=float) / np.asarray(se, dtype=float)
    return _power_curve(float(df), alpha)(lam.ravel()).reshape(lam.shape)


def mdd(se: float, df: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable difference: the smallest true difference the two-sided t test at
    level `alpha` (a corrected level: alpha / m for Bonferroni-level intervals) detects with
    probability `power`, for an estimate with standard error `se` on `df` degrees of freedom
    (the exact noncentral t, not the normal shortcut (z + z)·se). NaN when se or df is."""
    if not (np.isfinite(se) and np.isfinite(df)) or se <= 0 or df < 1:
        return float("nan")
    curve = _power_curve(float(df), alpha)
    lo, hi = 0.0, 1.0
    while float(curve(hi)[0]) < power:
        lo, hi = hi, 2.0 * hi
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(curve(mid)[0]) < power else (lo, mid)
    return 0.5 * (lo + hi) * float(se)


def seed_sd_of_mean(seed_sd: float, prompt_sd: float, n_prompts: int) -> float:
    """sd of one seed's mean difference over `n_prompts` prompts: sqrt(σ_u² + σ_e² / P)."""
    return math.sqrt(seed_sd ** 2 + prompt_sd ** 2 / n_prompts)


def mdd_for_seeds(n_seeds: int, seed_sd: float, prompt_sd: float, n_prompts: int, *,
                  alpha: float = 0.05, m: int = 1, power: float = 0.8) -> float:
    """MDD of a comparison with `n_seeds` seeds per method, from the variance components of
    the paired difference: seed_sd (σ_u, the seed effect), prompt_sd (σ_e, per-prompt noise
    within a seed), n_prompts; at the Bonferroni level alpha / m with t on S − 1 df."""
    if n_seeds < 2:
        return float("nan")
    sd = seed_sd_of_mean(seed_sd, prompt_sd, n_prompts)
    return mdd(sd / math.sqrt(n_seeds), n_seeds - 1, alpha / m, power)


def design_table(seed_sd: float, prompt_sd: float, n_prompts: int, *, seeds: Sequence[int] = range(2, 11),
                 alpha: float = 0.05, m: int = 1, power: float = 0.8):
    """For sizing: the MDD at each number of seeds (rows: seeds, mdd, per_seed_sd)."""
    import pandas as pd
    sd = seed_sd_of_mean(seed_sd, prompt_sd, n_prompts)
    return pd.DataFrame([{"seeds": s, "per_seed_sd": sd,
                          "mdd": mdd_for_seeds(s, seed_sd, prompt_sd, n_prompts, alpha=alpha, m=m, power=power)}
                         for s in seeds])


def seeds_needed(effect: float, seed_sd: float, prompt_sd: float, n_prompts: int, *,
                 alpha: float = 0.05, m: int = 1, power: float = 0.8, budget: int = 20) -> int | None:
    """The fewest seeds per method whose MDD (`mdd_for_seeds`) is at most `effect`, or None
    when even `budget` seeds do not reach it."""
    if effect <= 0:
        raise ValueError(f"seeds_needed: effect {effect} must be positive")
    for s in range(2, budget + 1):
        if mdd_for_seeds(s, seed_sd, prompt_sd, n_prompts, alpha=alpha, m=m, power=power) <= effect:
            return s
    return None


def variance_components(d) -> dict:
    """Method-of-moments variance components of paired differences d [S, P] (S ≥ 2):
    seed_sd (σ_u), prompt_sd (σ_e: per-(seed, prompt) noise), interaction_sd (σ_v: the
    prompt × method effect shared by seeds), each floored at 0, and per_seed_sd (the sd of the
    S per-seed means, what `mdd_for_seeds` rebuilds from the first two)."""
    d = np.asarray(d, dtype=float)
    S, P = d.shape
    if S < 2:
        raise ValueError("variance_components: need at least 2 seeds")
    seed_means, prompt_means, mean = d.mean(1), d.mean(0), d.mean()
    ms_seed = P * seed_means.var(ddof=1)
    ms_prompt = S * prompt_means.var(ddof=1)
    ms_err = ((d - seed_means[:, None] - prompt_means[None, :] + mean) ** 2).sum() / ((S - 1) * (P - 1))
    return {"seed_sd": math.sqrt(max(0.0, (ms_seed - ms_err) / P)), "prompt_sd": math.sqrt(ms_err),
            "interaction_sd": math.sqrt(max(0.0, (ms_prompt - ms_err) / S)),
            "per_seed_sd": float(seed_means.std(ddof=1)), "n_seeds": S, "n_prompts": P}


# ----------------------------------------------------------------------------- simulation

def simulate_differences(n_sets: int, n_seeds: int, n_prompts: int, *, delta: float = 0.0,
                         seed_sd: float = 1.0, prompt_sd: float = 12.0, interaction_sd: float = 0.0,
                         rng: np.random.Generator | int = 0) -> np.ndarray:
    """`n_sets` data sets of paired differences [n_sets, S, P] from the crossed model of the
    module docstring with known truth `delta` (normal effects)."""
    rng = np.random.default_rng(rng)
    u = rng.normal(0.0, seed_sd, size=(n_sets, n_seeds, 1))
    v = rng.normal(0.0, interaction_sd, size=(n_sets, 1, n_prompts))
    e = rng.normal(0.0, prompt_sd, size=(n_sets, n_seeds, n_prompts))
    return delta + u + v + e


def coverage(d, truth: float, level: float = 0.95) -> float:
    """The share of data sets d [N, S, P] whose `paired_interval` holds `truth`."""
    r = paired_interval(d, level)
    return float(np.mean((r["lo"] <= truth) & (truth <= r["hi"])))
