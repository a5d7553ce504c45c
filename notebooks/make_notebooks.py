"""Regenerate the study notebooks (committed without outputs) from this script.

    .venv/bin/python notebooks/make_notebooks.py

Each notebook: a first cell that installs the repo on Colab/Kaggle, a title, a `parameters`
cell whose defaults are the cpu profile's params/cpu/<notebook>.yaml (so a notebook opened
in JupyterLab runs the default profile as is), then prose and code side by side. The study
driver (`python -m dpkd_lib.study`) injects the chosen profile's values after it.
Editing a notebook by hand is fine too; this script only saves retyping the boilerplate.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

INSTALL = '''\
# Colab / Kaggle only: fetch and install the repo (elsewhere this cell does nothing).
import os, subprocess, sys
if "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG") or os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
    REPO_URL = os.environ.get("DPKD_REPO_URL", "https://github.com/OWNER/dpkd-study.git")
    if not os.path.isdir("dpkd-study"):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "dpkd-study"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "dpkd-study"], check=True)
    os.chdir("dpkd-study")
    sys.path.insert(0, os.getcwd())'''

SETUP = '''\
import os, sys
if repo_root is None:  # opened in JupyterLab: the repo is here or one folder up
    repo_root = next(p for p in (os.getcwd(), os.path.dirname(os.getcwd()))
                     if os.path.isdir(os.path.join(p, "dpkd_lib")))
sys.path.insert(0, os.path.abspath(repo_root))
from dpkd_lib.study import load_params, setup_notebook
ROOT = setup_notebook(repo_root)          # cwd = repo root; text progress bars under papermill
if not from_driver and profile != "cpu":  # run by hand with another profile: take its params file
    _params = load_params(ROOT / "params", profile, "{stem}")
    if "skip" in _params:
        raise SystemExit(f"profile {{profile!r}} skips this notebook: {{_params['skip']}}")
    globals().update(_params)
    print(f"parameters from params/{{profile}}/{stem}.yaml")
results_root = results_root or f"results/{{profile}}"
print(f"profile {{profile!r}}, results in {{results_root}}")'''


def md(text: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str, tags=()):
    cell = nbformat.v4.new_code_cell(textwrap.dedent(text).strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def params_cell(stem: str):
    values = yaml.safe_load((ROOT / "params" / "cpu" / f"{stem}.yaml").read_text()) or {}
    lines = ["# Parameters (defaults: the cpu profile, params/cpu/%s.yaml). The study driver" % stem,
             "# injects the chosen profile's values in a cell right after this one; run by hand",
             "# with another profile, the next cell loads params/<profile>/%s.yaml instead." % stem,
             'profile = "cpu"',
             "results_root = None   # None: results/<profile>",
             "repo_root = None      # None: found from the working directory",
             "force = False         # recompute finished runs",
             "from_driver = False   # True when python -m dpkd_lib.study runs the notebook"]
    for key, value in values.items():
        lines.append(f"{key} = {value!r}")   # one line each: papermill parses line by line
    return code("\n".join(lines), tags=("parameters",))


def notebook(stem: str, title_cells, body, upstream):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["dpkd"] = {"upstream": list(upstream)}
    nb.cells = [code(INSTALL), *title_cells, params_cell(stem), code(SETUP.format(stem=stem)), *body]
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating gives no spurious diff
        cell.id = f"c{i:02d}"
    path = HERE / f"{stem}.ipynb"
    nbformat.validate(nb)
    nbformat.write(nb, path)
    print("wrote", path)


# ============================================================================ 00 theory

THEORY = [
    md("""
    # 00 · DPKD in small distributions

    Direct Preference Knowledge Distillation (DPKD, arXiv 2406.19774) treats distillation as
    *"maximise an implicit reward while staying close to the teacher"* and trains the student
    with a DPO-style preference loss in which the **teacher is the reference model**. Before
    any language model appears, this notebook checks every piece of that argument on
    categorical distributions small enough to see whole, using the same loss functions
    (`dpkd_lib.losses`) the training runs use. Everything runs in seconds.

    Notation (method.md): $p$ the teacher, $q$ the student, $\\beta>0$.
    """),
]

THEORY_BODY = [
    code('''
    import math
    import matplotlib.pyplot as plt
    import torch
    from dpkd_lib import losses, experiments as ex
    torch.manual_seed(seed)
    LAB = lambda T=1: torch.zeros(1, T, dtype=torch.long)   # labels: only a mask for KD losses
    figs = {}
    '''),
    md("""
    ## 1 · Forward KL covers, reverse KL seeks

    Word-level KD minimises the **forward** KL $\\mathrm{KL}(p\\|q)$ at every position; MiniLLM
    and the DPKD objective are built on the **reverse** KL $\\mathrm{KL}(q\\|p)$. Fit a
    *unimodal* $q$ (a discretised Gaussian with a learnable mean and width) to a *bimodal*
    teacher $p$ by gradient descent on each. The forward KL pays dearly wherever $p>0$ and
    $q\\approx0$, so $q$ spreads over both modes (and puts mass in the valley between them,
    where $p$ has none); the reverse KL pays wherever $q>0$ and $p\\approx0$, so $q$ settles on
    one mode — which one depends on where it starts.
    """),
    code('''
    V = 40
    grid = torch.arange(V, dtype=torch.float32)
    bump = lambda mu, sd: -(grid - mu) ** 2 / (2 * sd ** 2)
    p_logits = torch.log_softmax(torch.logsumexp(torch.stack(
        [bump(10, 2.5) + math.log(0.6), bump(29, 2.5) + math.log(0.4)]), 0), -1)

    def fit_gaussian(divergence, mu0, sd0, steps=steps * 4, lr=0.1):
        mu = torch.tensor(float(mu0), requires_grad=True)
        log_sd = torch.tensor(math.log(sd0), requires_grad=True)
        opt = torch.optim.Adam([mu, log_sd], lr=lr)
        for _ in range(steps):
            q_logits = bump(mu, log_sd.exp()).view(1, 1, V)
            loss = divergence(q_logits, p_logits.view(1, 1, V), LAB())
            opt.zero_grad(); loss.backward(); opt.step()
        return torch.softmax(bump(mu, log_sd.exp()), -1).detach(), mu.item(), log_sd.exp().item(), loss.item()

    fits = {}
    for start in (13, 26):
        fits[f"forward KL, start {start}"] = fit_gaussian(losses.forward_kl, start, 2.0)
        fits[f"reverse KL, start {start}"] = fit_gaussian(losses.reverse_kl, start, 2.0)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(grid, p_logits.exp(), color="lightgray", label="teacher p")
    for name, (q, mu, sd, loss) in fits.items():
        ax.plot(grid, q, "--" if "forward" in name else "-", label=f"{name}: μ={mu:.1f}, σ={sd:.1f}")
        print(f"{name:<22} mean {mu:5.1f}  sd {sd:5.1f}  final divergence {loss:.3f}")
    ax.set_xlabel("category"); ax.legend(fontsize=7); ax.set_title("fitting a unimodal q to a bimodal p")
    figs["theory_kl_modes"] = fig
    '''),
    md("""
    ## 2 · The optimum of "reward minus KL" is $q^* \\propto p\\,e^{r/\\beta}$

    DPKD's starting point (method.md §1) is
    $\\max_q\\; \\mathbb{E}_{y\\sim q}[r(y)] - \\beta\\,\\mathrm{KL}(q\\|p)$, whose maximiser is
    $q^*(y) = p(y)\\,e^{r(y)/\\beta}/Z$. Check it numerically: pick a random teacher $p$ and
    reward $r$ over 40 categories, run gradient ascent on the student's logits (starting at
    $q=p$), and compare with the closed form. Smaller $\\beta$ lets the reward pull $q$ further
    from the teacher.
    """),
    code('''
    V2 = 40
    g = torch.Generator().manual_seed(seed)
    reward = torch.randn(V2, generator=g)
    logp = torch.log_softmax(torch.randn(V2, generator=g), -1)

    def ascend(beta, steps=steps * 20, lr=0.05):
        z = logp.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            q = torch.softmax(z, -1)
            objective = (q * reward).sum() - beta * losses.reverse_kl(z.view(1, 1, V2), logp.view(1, 1, V2), LAB())
            opt.zero_grad(); (-objective).backward(); opt.step()
        return torch.log_softmax(z.detach(), -1)

    betas = (0.5, 1.0, 2.0)
    learned = {b: ascend(b) for b in betas}
    fig, axes = plt.subplots(1, len(betas), figsize=(12, 3), sharey=True)
    for ax, b in zip(axes, betas):
        closed = torch.softmax(logp + reward / b, -1)
        ax.bar(torch.arange(V2), closed, color="lightgray", label="closed form p·exp(r/β)/Z")
        ax.plot(learned[b].exp(), "C1.", label="gradient ascent")
        ax.plot(logp.exp(), "k:", lw=1, label="teacher p")
        ax.set_title(f"β = {b}: max |q − q*| = {(learned[b].exp() - closed).abs().max():.1e}")
    axes[0].legend(fontsize=7)
    figs["theory_optimum"] = fig
    '''),
    md("""
    ## 3 · The implicit reward $\\beta\\log(q/p)$ recovers $r$ up to a constant

    Invert the optimum: $r(y) = \\beta\\log\\frac{q^*(y)}{p(y)} + \\beta\\log Z$. The constant
    $\\beta\\log Z$ is the same for every response to a prompt, so it cancels in any *difference*
    of rewards — which is all a Bradley–Terry preference ever uses. This is why DPKD can
    score a student response against a teacher response with no reward model: the reward
    implied by the student is $r_\\theta = \\beta\\log(q_\\theta/p)$ (`losses.implicit_rewards`).
    """),
    code('''
    for b in betas:
        r_hat, _ = losses.implicit_rewards(learned[b], learned[b], logp, logp, beta=b)
        offset = r_hat - reward
        print(f"β = {b}: implicit − true reward = {offset.mean():+.4f} ± {offset.std():.1e} "
              f"(−β·log Z = {-b * torch.logsumexp(logp + reward / b, -1):+.4f})")
    '''),
    md("""
    ## 4 · What the token-level DPKD loss does to a student

    The released code's loss (method.md §2) compares, at every position, the teacher's greedy
    token $t$ ("chosen") with the student's greedy token $s$ ("rejected"):
    $\\Delta = [\\log q(t)-\\log q(s)] - [\\log p(t)-\\log p(s)]$ and
    $\\ell = -\\log\\sigma(\\beta\\Delta)$. Train free student logits at 16 positions against a
    fixed teacher with it, with and without the teacher reference (`reference_free`), and
    compare with word-level KD (forward KL). Watch two things: how often the student's argmax
    agrees with the teacher's, and how far the whole distribution is from the teacher's
    (forward KL).
    """),
    code('''
    T, Vt = 16, 8
    t_logits = torch.randn(1, T, Vt, generator=torch.Generator().manual_seed(seed + 1)) * 2
    s_init = torch.randn(1, T, Vt, generator=torch.Generator().manual_seed(seed + 2))

    def train_token(loss_fn, steps=steps * 2, lr=0.5):
        s = s_init.clone().requires_grad_(True)
        opt = torch.optim.SGD([s], lr=lr)
        hist = []
        for step in range(steps + 1):
            loss = loss_fn(s)
            with torch.no_grad():
                hist.append({"step": step, "loss": loss.item(),
                             "agree": (s.argmax(-1) == t_logits.argmax(-1)).float().mean().item(),
                             "fkl": losses.forward_kl(s, t_logits, LAB(T)).item()})
            opt.zero_grad(); loss.backward(); opt.step()
        return hist

    token_runs = {
        "DPKD-token (teacher reference)": lambda s: losses.dpkd_token_loss(s, t_logits, LAB(T), beta=1.0),
        "DPKD-token, reference-free": lambda s: losses.dpkd_token_loss(s, t_logits, LAB(T), beta=1.0, reference_free=True),
        "KD (forward KL)": lambda s: losses.forward_kl(s, t_logits, LAB(T)),
    }
    token_hist = {name: train_token(fn) for name, fn in token_runs.items()}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3))
    for name, hist in token_hist.items():
        for ax, key in zip(axes, ("loss", "agree", "fkl")):
            ax.plot([h["step"] for h in hist], [h[key] for h in hist], label=name)
    for ax, title in zip(axes, ("loss", "argmax agreement with the teacher", "forward KL(p‖q)")):
        ax.set_title(title); ax.set_xlabel("step")
    axes[0].axhline(math.log(2), color="gray", ls=":", lw=1)
    axes[1].legend(fontsize=7)
    figs["theory_token_dpkd"] = fig
    for name, hist in token_hist.items():
        print(f"{name:<32} final loss {hist[-1]['loss']:.4f}  agreement {hist[-1]['agree']:.2f}  KL(p‖q) {hist[-1]['fkl']:.3f}")
    '''),
    md("""
    The token-level DPKD loss drives the student's argmax onto the teacher's within a few
    steps and then **stops**: where $t=s$, $\\Delta=0$ exactly, the position contributes
    $\\log 2$ (the dotted line) and no gradient. The rest of the distribution stays where it
    was, so $\\mathrm{KL}(p\\|q)$ plateaus well above zero, while KD keeps pulling it down.
    In the released runner the DPKD term is therefore always mixed with cross-entropy
    (`kd_ratio` 0.5) and a pre-training term: on its own it is an argmax-matching loss.
    Dropping the reference (`reference_free`) changes the push while $t\\neq s$ — the student's
    margin $\\log q(t)-\\log q(s)$ is raised whatever the teacher's own margin is — but not
    the end point: once the argmaxes agree both variants sit at $\\ln 2$ with the same
    distance from the teacher.
    """),
    md("""
    ## 5 · Token level vs sequence level

    The paper's objective is sequence-level and on-policy: sample a response $y_t\\sim p$
    (chosen) and $y_s\\sim q$ (rejected) and apply the Bradley–Terry loss to whole-sequence
    log-probabilities, optionally **length-normalised** (divided by $|y|$, the variant of the
    paper's experiments). Here sequences are 4 tokens from 6 categories with independent
    positions, so $\\log q(y)=\\sum_i\\log q_i(y_i)$ (`losses.sequence_logps`) and the
    per-pair loss is `losses.preference_loss`.

    At $q=p$ chosen and rejected responses have the same distribution, so the expected
    gradient of the teacher-referenced sequence loss vanishes: **$q=p$ is its fixed point**,
    unlike the token-level loss, which is satisfied by matching argmaxes.
    """),
    code('''
    L, Vs, B = 4, 6, 64
    p_seq = torch.randn(1, L, Vs, generator=torch.Generator().manual_seed(seed + 3)) * 1.5

    def seq_logp(logits, y, average):
        return losses.sequence_logps(logits.expand(y.shape[0], L, Vs), y, average=average)

    def train_seq(mode, steps=steps * 2, lr=0.05):
        s = torch.randn(1, L, Vs, generator=torch.Generator().manual_seed(seed + 4)).requires_grad_(True)
        opt = torch.optim.Adam([s], lr=lr)
        g = torch.Generator().manual_seed(seed)
        hist = []
        for step in range(steps + 1):
            if mode == "token":
                loss = losses.dpkd_token_loss(s, p_seq, LAB(L), beta=1.0)
            else:
                with torch.no_grad():
                    y_t = torch.multinomial(torch.softmax(p_seq[0], -1), B, True, generator=g).T
                    y_s = torch.multinomial(torch.softmax(s[0], -1), B, True, generator=g).T
                avg = mode == "sequence, length-normalised"
                loss = losses.preference_loss(
                    seq_logp(s, y_t, avg), seq_logp(s, y_s, avg), seq_logp(p_seq, y_t, avg),
                    seq_logp(p_seq, y_s, avg), beta=1.0,
                    reference_free=(mode == "sequence, reference-free")).mean()
            with torch.no_grad():
                hist.append({"step": step, "fkl": losses.forward_kl(s, p_seq, LAB(L)).item(),
                             "agree": (s.argmax(-1) == p_seq.argmax(-1)).float().mean().item()})
            opt.zero_grad(); loss.backward(); opt.step()
        return hist

    modes = ["token", "sequence", "sequence, length-normalised", "sequence, reference-free"]
    seq_hist = {m: train_seq(m) for m in modes}
    fig, ax = plt.subplots(figsize=(6, 3))
    for m, hist in seq_hist.items():
        ax.plot([h["step"] for h in hist], [h["fkl"] for h in hist], label=m)
        print(f"{m:<30} KL(p‖q) {hist[0]['fkl']:.3f} -> {hist[-1]['fkl']:.3f}   argmax agreement {hist[-1]['agree']:.2f}")
    ax.set_yscale("log"); ax.set_xlabel("step"); ax.set_title("KL(p‖q) per position"); ax.legend(fontsize=7)
    figs["theory_token_vs_sequence"] = fig
    '''),
    md("""
    With the teacher as reference, the sequence-level loss (plain or length-normalised)
    drives $\\mathrm{KL}(p\\|q)$ towards zero: it distils the whole distribution, as the
    paper's derivation promises. The token-level loss stops once the argmaxes agree. Without
    the reference, the sequence-level loss settles at a point away from the teacher: it now
    rewards a high *absolute* student probability of the teacher's samples over its own,
    which favours sharper distributions than $p$. On real models the two levels also differ
    in cost: the sequence level samples from the student at every step.
    """),
    md("""
    ## 6 · Gradient weights: why β = 0.1 is a gentle push

    For the sigmoid loss, $\\partial\\ell/\\partial\\Delta = -\\beta\\,\\sigma(-\\beta\\Delta)$: every
    position is pushed with weight $\\beta\\,\\sigma(-\\beta\\Delta)$ — close to $\\beta$ when the
    student's margin is far below the teacher's ($\\Delta\\ll0$), $\\beta/2$ at $\\Delta=0$, and
    fading once the margin is won. IPO's squared loss instead pulls $\\Delta$ to the fixed
    target $1/(2\\beta)$ with weight $2|\\Delta - 1/(2\\beta)|$, with no saturation at all. At the
    released $\\beta=0.1$ the DPKD term's push is at most $0.1$ per unit of $\\Delta$ (and $0.05$
    at the start, where $\\Delta\\approx0$); next to a cross-entropy term of weight 0.5, the CE
    dominates early training
    (design.md §3 saw the DPKD term sit near $\\ln 2$).
    """),
    code('''
    delta = torch.linspace(-40, 40, 401, requires_grad=True)
    fig, ax = plt.subplots(figsize=(7, 3))
    for b in (0.05, 0.1, 0.5, 1.0):
        loss = losses.preference_loss(delta, torch.zeros_like(delta), torch.zeros_like(delta),
                                      torch.zeros_like(delta), beta=b).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        ax.plot(delta.detach(), -grad, label=f"sigmoid, β={b}: β·σ(−βΔ)")
    b = 0.1
    loss = losses.preference_loss(delta, torch.zeros_like(delta), None, None, beta=b,
                                  loss_type="ipo", reference_free=True).sum()
    (grad,) = torch.autograd.grad(loss, delta)
    ax2 = ax.twinx()
    ax2.plot(delta.detach(), -grad, "k:", label="IPO, β=0.1 (right axis)")
    ax.set_xlabel("Δ (student margin minus teacher margin)"); ax.set_ylabel("−∂ℓ/∂Δ")
    ax.legend(fontsize=7, loc="upper right"); ax2.legend(fontsize=7, loc="lower left")
    figs["theory_gradient_weights"] = fig
    '''),
    md("""
    ## Figures

    Saved under `results/<profile>/figures/` (the figure notebook does not need them; they are
    for the README and the write-up).
    """),
    code('''
    for name, fig in figs.items():
        print(ex.savefig(fig, results_root, name))
    '''),
]

# ============================================================================ 01 main

MAIN = [
    md("""
    # 01 · Distilling a 120M-class student: every method, same budget, several seeds

    **Protocol.** One teacher, one starting student, and every method — SFT, word-level KD
    (forward KL), reverse KL, JSD, SeqKD, DPKD at the token level (the released code) and at
    the sequence level (the paper) — trains the *same number of steps from the same starting
    student*. SFT, KD and both DPKD variants get several training seeds, so each difference
    can be compared with the spread between seeds. Evaluation: ROUGE-L and exact match of
    sampled responses (MiniLLM's protocol), and teacher-forced NLL / token accuracy on the
    reference responses, on an in-distribution split (`test`) and, when the data has one, a
    held-out-template split (`heldout`, our stand-in for SelfInst / S-NI).

    **Profiles.** `paper`: MiniLLM's GPT-2 XL SFT teacher → GPT-2 base with the released
    runner's hyperparameters on Dolly-15k (method.md §3; every value's origin is in
    `params/paper/`). `cpu` (default, offline): SmolLM2-135M-Instruct adapted to the
    synthetic task once with LoRA-SFT as the teacher, and SmolLM2 depth-pruned to a few of
    its 30 layers + SFT as the student (design.md §3). `smoke`: tiny random models; the
    numbers mean nothing.
    """),
]

MAIN_BODY = [
    code('''
    import pandas as pd
    from IPython.display import Markdown, display
    from dpkd_lib import experiments as ex
    pd.set_option("display.width", 200)
    '''),
    md("""
    ## 1 · The teacher and the starting student

    Built once each, as ordinary training runs (`runs/teacher`, `runs/student_init`) whose
    saved models every later run loads. A finished build is reused, so re-running this
    notebook costs nothing here. Profiles whose teacher and student come ready-made from the
    hub (`paper`) evaluate them instead (`reference_models`).
    """),
    code('''
    pair = ex.build_pair(base_params, results_root, teacher_build=teacher_build,
                         student_build=student_build, force=force)
    if reference_models:
        ex.evaluate_models(base_params, reference_models, results_root, pair=pair, force=force)
    df = ex.collect(results_root)
    display(ex.main_table(df, methods=["teacher", "student_init"], metrics=("rouge_l", "exact_match", "nll", "token_acc")))
    print("Teacher–student gap (ROUGE-L):", ex.gap_text(df, metric="rouge_l"))
    print("Teacher–student gap (EM):     ", ex.gap_text(df, metric="exact_match"))
    '''),
    md("""
    Distillation only has something to transfer if the teacher is clearly better than the
    student it starts from; the gap above is the room every method competes for. (A
    teacher trained from scratch on a CPU budget was *not* better than its student — design.md
    §3 — which is why the cpu teacher is a real pretrained model.)

    ## 2 · Every method, same steps, same start
    """),
    code('''
    runs = [(name, ex.as_overrides(common_overrides) + ov, labels) for name, ov, labels in ex.method_runs(methods)]
    for name, ov, _ in runs:
        print(f"{name:<18} {' '.join(ov)}")
    summaries = ex.run_grid(base_params, runs, results_root, pair=pair, force=force)
    '''),
    code('''
    df = ex.collect(results_root)
    order = ["teacher", "student_init", *methods]
    table = ex.main_table(df, methods=order, metrics=("rouge_l", "exact_match", "nll", "token_acc"))
    display(table)
    '''),
    md("""
    Each cell is the mean ± sd over training seeds (one run per seed; each run's score is the
    mean over its sampling seeds); `seeds` is how many runs it rests on. NLL and token
    accuracy are teacher-forced on the reference responses (lower / higher is better).

    ## 3 · Beyond seed noise?

    A difference counts only if it is larger than the spread between training seeds: Welch's
    t-test (p < 0.05) **and** |Δmean| > 2 × pooled sd. Anything else is reported as within
    noise.
    """),
    code('''
    splits = sorted(set(df["split"]) & {"test", "heldout"}, key=["test", "heldout"].index)
    verdicts = []
    for a, b in compare:
        for split in splits:
            for metric in ("rouge_l", "nll"):
                v = ex.noise_verdict(df, a, b, metric=metric, split=split)
                verdicts.append(v)
                print("-", v["text"])
    '''),
    md("""
    ### The answer, in words

    Generated from the verdicts above and the table: which comparisons hold beyond seed
    noise, and how far each method moved the starting student against the room the teacher
    left. Before reading "within noise" as "DPKD does not help", check three things: how far
    *any* method moved the student (a budget that moves nobody cannot separate methods),
    whether the DPKD term had a gradient to give (`argmax_disagree` and `reward_margin`
    below, and notebook 03), and the seed spread itself.
    """),
    code('''
    display(Markdown(ex.answer_text(verdicts, df[df["group"].isin(["main", "pair"])])))
    '''),
    md("""
    ## 4 · Training curves

    Mean over seeds (band: min–max). `student_nll_ref` is the cross-entropy on the dataset
    responses of each batch, logged for every method but SeqKD (whose CE is on teacher
    samples): a DPKD student whose preference margin grows while this rises would be
    reward-hacking (method.md §5). Every distillation objective, DPKD-seq included, keeps
    the same `(1 − kd_ratio)·CE` on the dataset responses; DPKD-seq's chosen responses are
    the teacher's samples, a batch of their own.
    """),
    code('''
    fig = ex.curves(df[df["group"] == "main"], metrics=("loss", "student_nll_ref", "distill", "reward_margin"),
                    methods=[m for m in methods if m in set(df["method"])])
    '''),
]

# ============================================================================ 02 lora 4bit

LORA = [
    md("""
    # 02 · A 4-bit teacher and a LoRA student

    The recipe that lets a 13B/14B teacher teach a 7B student on one 16 GB GPU: the teacher
    loaded in 4-bit NF4 (bitsandbytes), the student trained through LoRA adapters (QLoRA
    when its base is also 4-bit), gradient checkpointing, and token-level teacher signals
    computed once (`teacher_mode: cache`) so that teacher and student never sit in memory
    together. The memory plan is printed **before** anything is loaded.

    Profiles: `cpu` runs the recipe on the offline pair of notebook 01 (SFT vs DPKD-token,
    one seed: a check that the path works and how much 4-bit costs, not a benchmark);
    `colab` runs Qwen2.5-14B-Instruct (4-bit) → Qwen2.5-7B-Instruct (QLoRA), or Llama-2
    13B → 7B with the params file's alternative.
    """),
]

LORA_BODY = [
    code('''
    from IPython.display import display
    from dpkd_lib import experiments as ex
    pair = ex.pair_from_results(results_root) if use_built_pair else []
    runs = [(name, ex.as_overrides(common_overrides) + ov,
             dict(labels, group="lora", label=labels["label"] + " · 4-bit teacher, LoRA student"))
            for name, ov, labels in ex.method_runs(methods, prefix=run_prefix)]
    configs = {name: ex.run_config(base_params, name, ov, results_root, pair) for name, ov, _ in runs}
    '''),
    md("""
    ## 1 · Memory plan (nothing loaded yet)

    `dpkd_lib.memory` estimates weights, adapters, optimizer state, activations and logits of
    each run from its config alone, and says whether it fits the device.
    """),
    code('''
    try:
        from dpkd_lib import memory
    except ImportError as err:   # the planner is optional for running the notebook
        memory = None
        print(f"memory planner not available ({err}); skipping the plan")
    budget = memory_budget_gib * 2**30 if memory_budget_gib else None
    if memory is not None:
        for name, cfg in configs.items():
            est = memory.estimate(memory.plan_from_config(cfg))
            print(f"== {name}"); print(memory.format_plan(est, budget)); print()
            if budget:
                memory.check_fits(est, budget)   # stops here, naming the fixes, before any load
    '''),
    md("## 2 · Train: SFT vs DPKD with a 4-bit teacher and a LoRA student"),
    code('''
    summaries = ex.run_grid(base_params, runs, results_root, pair=pair, force=force)
    df = ex.collect(results_root)
    lora = df[df["group"] == "lora"]
    display(ex.main_table(lora, methods=[run_prefix + m for m in methods],
                          metrics=("rouge_l", "exact_match", "nll"), label_col="label"))
    for a, b in [(run_prefix + "dpkd_token", run_prefix + "sft")]:
        if {a, b} <= set(lora["method"]):
            print(ex.noise_verdict(lora, a, b)["text"])
    '''),
    md("""
    One seed each: the table shows that the path works and where the numbers sit, but
    with one seed per method no difference between them can be called beyond noise (the
    verdict says "cannot tell"). For the size of seed noise, see notebook 01.
    """),
]

# ============================================================================ 03 ablations

ABL = [
    md("""
    # 03 · Ablations on the implicit reward

    Starting from DPKD as notebook 01 ran it (token level, β = 0.1, sigmoid loss, teacher
    reference, pre-train term on; and the sequence-level variant with length
    normalisation), change **one** thing at a time: β; teacher-referenced vs reference-free;
    the preference loss (sigmoid / IPO / SimPO / CPO / DPO-Positive) and label smoothing
    (conservative DPO); length normalisation of the sequence-level loss; the pre-training
    term (`lm_coef` 0); token vs sequence level. Same steps, same starting student, one
    training seed each — so read every difference against the seed spread measured in
    notebook 01 (printed below).

    Then the reward-hacking monitors of method.md §5 against each other: preference margin,
    student NLL on the reference responses, response length and distinct-2.
    """),
]

ABL_BODY = [
    code('''
    import matplotlib.pyplot as plt
    import pandas as pd
    from IPython.display import display
    from dpkd_lib import experiments as ex
    pair = ex.pair_from_results(results_root) if use_built_pair else []
    main = ex.collect(results_root)
    runs = []
    for i, (key, spec) in enumerate(ablations.items()):
        # the reference run exactly as notebook 01 ran it, then one change
        base_ov = ex.run_overrides(results_root, reference_runs[spec["base"]])
        runs.append((f"abl_{key}", base_ov + ex.as_overrides(spec["overrides"]),
                     {"method": f"abl_{key}", "group": "ablation", "label": spec.get("label", key),
                      "base": spec["base"], "reference_run": reference_runs[spec["base"]], "order": i}))
    for name, ov, _ in runs:
        print(f"{name:<26} {' '.join(ov)}")
    '''),
    code('''
    summaries = ex.run_grid(base_params, runs, results_root, pair=pair, force=force)
    df = ex.collect(results_root)
    '''),
    md("## 1 · The ablation table"),
    code('''
    ref_names = set(reference_runs.values())
    ref = df[df["run"].isin(ref_names)].copy()
    ref["method"] = ["ref_" + m for m in ref["method"]]
    ref["label"] = [f"{ex.DISPLAY.get(m[4:], m)} (notebook 01, seed {s})" for m, s in zip(ref["method"], ref["seed"])]
    abl = df[df["group"] == "ablation"]
    both = pd.concat([ref, abl], ignore_index=True)
    order = list(dict.fromkeys(ref["method"])) + [f"abl_{k}" for k in ablations]
    table = ex.main_table(both, methods=order, metrics=("rouge_l", "exact_match", "nll"), label_col="label")
    display(table)
    noise = ex.aggregate(main[main["method"].isin(["dpkd_token", "dpkd_seq"])], by=("method", "split"), metrics=("rouge_l", "nll"))
    print("Seed spread of the reference methods in notebook 01 (sd over training seeds):")
    for _, r in noise.iterrows():
        print(f"  {r['method']:<11} {r['split']:<8} ROUGE-L sd {r['rouge_l_sd']:.2f}   NLL sd {r['nll_sd']:.3f}   (n={r['n_seeds']})")
    '''),
    md("""
    An ablation differs from its reference only if the gap is well beyond those sds (a
    one-seed ablation cannot be tested formally; two sds of the reference is the bar we use
    in the text).

    ## 2 · Reward-hacking monitors

    For each DPKD-family run: the implicit-reward margin and the student's NLL on the
    dataset responses (both from the last logged training steps), against response length
    and distinct-2 of its sampled test responses. Reward hacking (DistiLLM-2) shows up as a
    growing margin together with a *rising* reference NLL, longer or more repetitive
    responses.

    Read the token-level margin with its construction in mind: where the two argmaxes
    differ, the student's greedy token s beats the teacher's t under the student
    (log q(t) − log q(s) ≤ 0) and t beats s under the teacher (log p(t) − log p(s) ≥ 0), so
    every token-level Δ is ≤ 0 and the reward accuracy is 0 by definition. The loss can only
    pull Δ up towards 0, and a position leaves the sum once the student's argmax becomes the
    teacher's; `argmax_disagree` is the token-level measure of progress. The sequence-level
    margin has no such bound.
    """),
    code('''
    fam = df[(df["group"] == "ablation") | ((df["group"] == "main") & df["objective"].isin(["dpkd_token", "dpkd_seq"]))]
    mon = ex.final_monitors(fam, last=10)
    display(mon.round(3))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    pairs = [("reward_margin", "student_nll_ref"), ("reward_margin", "response_tokens"), ("response_tokens", "distinct_2")]
    for ax, (xk, yk) in zip(axes, pairs):
        for _, r in mon.iterrows():
            ax.scatter(r[xk], r[yk], s=25)
            ax.annotate(str(r["label"])[:22], (r[xk], r[yk]), fontsize=6)
        ax.set_xlabel(xk); ax.set_ylabel(yk); ax.grid(alpha=0.3)
    fig.tight_layout()
    ex.savefig(fig, results_root, "monitors_scatter")
    fig2 = ex.curves(fam, metrics=("reward_margin", "student_nll_ref", "reward_accuracy", "argmax_disagree"), smooth=5)
    ex.savefig(fig2, results_root, "monitors_curves")
    '''),
]

# ============================================================================ 04 figures

FIG = [
    md("""
    # 04 · Tables and figures

    Reads **only** `results/<profile>/` (the run folders written by notebooks 01–03) and
    writes the study's tables (`tables/*.csv` and `*.md`) and figures (`figures/*.png`).
    """),
]

FIG_BODY = [
    code('''
    import json
    from pathlib import Path
    import matplotlib.pyplot as plt
    import pandas as pd
    from IPython.display import Markdown, display
    from dpkd_lib import experiments as ex
    df = ex.collect(results_root)
    if df.empty:
        raise SystemExit(f"no finished runs under {results_root}/runs: run notebooks 01-03 first")
    tables = ex.tables_dir(results_root)
    splits = [s for s in splits if s in set(df["split"])]
    written = []
    print(f"{df['run'].nunique()} runs, splits {splits}")
    '''),
    md("## 1 · Main table (mean ± sd over training seeds)"),
    code('''
    order = ["teacher", "student_init", *main_methods]
    main = ex.main_table(df, methods=order, splits=splits, metrics=("rouge_l", "exact_match", "nll"))
    if paper_column:   # method.md §5 beside ours (our test split = DollyEval in the paper profile)
        paper = ex.PAPER_NUMBERS[("gpt2-120M", "DollyEval")]
        present = [m for m in order if m in set(df.loc[df["split"].isin(splits), "method"])]
        main.insert(1, "paper: DollyEval ROUGE-L", [f"{paper[m]:.1f}" if m in paper else "–" for m in present])
    written += ex.write_table(main, tables / "main")
    numeric = ex.aggregate(df[df["method"].isin(order)], by=("method", "split"),
                           metrics=("rouge_l", "exact_match", "nll", "token_acc", "response_tokens", "distinct_2", "wall_time_s"))
    written += ex.write_table(numeric, tables / "main_numeric", floatfmt=".3f")
    display(main)
    '''),
    code('''
    verdicts = []
    for a, b in compare:
        for split in splits:
            for metric in ("rouge_l", "exact_match", "nll"):
                v = ex.noise_verdict(df, a, b, metric=metric, split=split)
                verdicts.append({k: v[k] for k in ("a", "b", "split", "metric", "mean_a", "sd_a", "n_a",
                                                  "mean_b", "sd_b", "n_b", "delta", "pooled_sd", "p", "verdict")})
                print("-", v["text"])
    written += ex.write_table(pd.DataFrame(verdicts), tables / "verdicts", floatfmt=".3f")
    answer = ex.answer_text(verdicts, df[df["group"].isin(["main", "pair"])])
    (tables / "answer.md").write_text(answer + "\\n")
    written.append(tables / "answer.md")
    display(Markdown(answer))
    '''),
    code('''
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 3.6), squeeze=False)
    present = [m for m in order if m in set(df["method"])]
    for ax, split in zip(axes[0], splits):
        agg = ex.aggregate(df[(df["split"] == split) & df["method"].isin(present)], by=("method",), metrics=("rouge_l",))
        agg = agg.set_index("method").loc[[m for m in present if m in set(agg["method"])]]
        ax.bar(range(len(agg)), agg["rouge_l"], yerr=agg["rouge_l_sd"].fillna(0), capsize=3,
               color=["gray" if m in ("teacher", "student_init") else "C0" for m in agg.index])
        for i, (m, r) in enumerate(agg.iterrows()):
            runs = df[(df["split"] == split) & (df["method"] == m)]["rouge_l"]
            ax.plot([i] * len(runs), runs, "k.", ms=4)
        ax.set_xticks(range(len(agg)), [ex.DISPLAY.get(m, m) for m in agg.index], rotation=30, ha="right")
        ax.set_title(f"{split}: ROUGE-L (bars: mean ± sd over seeds; dots: seeds)")
    fig.tight_layout()
    written.append(ex.savefig(fig, results_root, "main_rouge_l"))
    '''),
    md("## 2 · Ablations"),
    code('''
    abl = df[df["group"] == "ablation"]
    if abl.empty:
        print("no ablation runs (notebook 03)")
    else:
        # each ablation beside the run it changes one thing of (recorded by notebook 03)
        labels = {r: json.loads((Path(d) / "labels.json").read_text()) for r, d in zip(abl["run"], abl["run_dir"])}
        refs = sorted({l.get("reference_run") for l in labels.values() if l.get("reference_run")})
        ref = df[df["run"].isin(refs)].copy()
        ref["method"] = "ref_" + ref["run"]
        ref["label"] = [f"{ex.DISPLAY.get(m, m)} (reference, seed {s})" for m, s in zip(df.loc[ref.index, "method"], ref["seed"])]
        both = pd.concat([ref, abl], ignore_index=True)
        order = list(dict.fromkeys(ref["method"])) + sorted(set(abl["method"]), key=lambda m: labels[abl.loc[abl["method"] == m, "run"].iloc[0]].get("order", 99))
        table = ex.main_table(both, methods=order, splits=splits, metrics=("rouge_l", "exact_match", "nll"), label_col="label")
        written += ex.write_table(table, tables / "ablations")
        display(table)
    lora = df[df["group"] == "lora"]
    if not lora.empty:
        by_objective = dict(zip(lora["method"], lora["objective"]))
        order = sorted(by_objective, key=lambda m: ex.METHOD_ORDER.index(by_objective[m]))
        table = ex.main_table(lora, methods=order, splits=splits, metrics=("rouge_l", "exact_match", "nll"), label_col="label")
        written += ex.write_table(table, tables / "lora_4bit")
        display(table)
    '''),
    md("## 3 · By reference length (paper Tables 4–5)"),
    code('''
    fig, axes = plt.subplots(2, len(splits), figsize=(6 * len(splits), 6.5), squeeze=False)
    for col, split in enumerate(splits):
        bt = ex.bucket_table(df, split=split, methods=["teacher", "student_init", *bucket_methods])
        if bt.empty:
            continue
        written += ex.write_table(bt, tables / f"buckets_{split}")
        buckets = list(dict.fromkeys(bt["bucket"]))
        methods_here = list(dict.fromkeys(bt["method"]))
        width = 0.8 / max(1, len(methods_here))
        for row, metric in enumerate(("rouge_l", "exact_match")):
            ax = axes[row][col]
            for i, m in enumerate(methods_here):
                sub = bt[bt["method"] == m].set_index("bucket").reindex(buckets)
                ax.bar([j + i * width for j in range(len(buckets))], sub[metric], width,
                       yerr=sub[f"{metric}_sd"].fillna(0), capsize=2, label=ex.DISPLAY.get(m, m))
            counts = bt.groupby("bucket")["n_examples"].max()
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(buckets))],
                          [f"{b}\\nn={counts[b]}" for b in buckets])
            ax.set_title(f"{split}: {ex.METRIC_LABELS[metric]} by reference length (tokens)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    written.append(ex.savefig(fig, results_root, "buckets"))
    '''),
    md("## 4 · Training curves"),
    code('''
    fig = ex.curves(df[df["group"] == "main"], metrics=("loss", "student_nll_ref", "distill", "reward_margin"),
                    methods=[m for m in curve_methods if m in set(df["method"])])
    written.append(ex.savefig(fig, results_root, "curves"))
    '''),
    md("## Written"),
    code('''
    for path in written:
        print(path)
    display(Markdown((tables / "main.md").read_text()))
    '''),
]


def main():
    notebook("00_theory", THEORY, THEORY_BODY, upstream=[])
    notebook("01_gpt2_120m", MAIN, MAIN_BODY, upstream=[])
    notebook("02_lora_4bit", LORA, LORA_BODY, upstream=["01_gpt2_120m"])
    notebook("03_ablations_implicit_reward", ABL, ABL_BODY, upstream=["01_gpt2_120m"])
    notebook("04_figures", FIG, FIG_BODY,
             upstream=["01_gpt2_120m", "02_lora_4bit", "03_ablations_implicit_reward"])


if __name__ == "__main__":
    main()
