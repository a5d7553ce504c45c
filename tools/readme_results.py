"""The README's results and docs/results.md's tables, written from the committed tables of the
cpu study (results/cpu/tables/), so that no number is typed by hand.

    python tools/readme_results.py          # rewrite the blocks between the markers
    python tools/readme_results.py --check  # exit 1 if a block is stale (tests/test_readme.py)

README.md: the block between `<!-- results:begin ... -->` and `<!-- results:end -->`.
docs/results.md: each `<!-- table:NAME -->` ... `<!-- /table -->` block holds
results/cpu/tables/NAME.md as it is. Run it after `make reproduce` (or `make tables`) changes
the tables. Needs pandas only.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "results" / "cpu" / "tables"
BEGIN = "<!-- results:begin (python tools/readme_results.py; tests/test_readme.py checks it) -->"
END = "<!-- results:end -->"
TABLE_BLOCK = re.compile(r"(<!-- table:([a-z_]+) -->\n)(.*?)(<!-- /table -->)", re.S)
SPLITS = {"test": "test", "heldout": "held-out templates"}


def signed(x: float, digits: int = 1) -> str:
    """+1.3 / −0.1 with a true minus sign (and no −0.0)."""
    text = f"{x:+.{digits}f}"
    if float(text) == 0:
        text = f"{0:.{digits}f}"
        return ("−" if x < 0 else "+") + text
    return text.replace("-", "−")


def interval(row) -> tuple[float, float]:
    """A comparison's interval: columns ci_lo / ci_hi, or the text column ci ("[-1.39, +1.29]")."""
    if "ci_lo" in row and "ci_hi" in row:
        return float(row["ci_lo"]), float(row["ci_hi"])
    lo, hi = (float(v) for v in re.findall(r"[-+]?\d+(?:\.\d+)?", str(row["ci"])))
    return lo, hi


def scores(tables: Path = TABLES) -> pd.DataFrame:
    """Greedy ROUGE-L per method of the released mix (rows) and split (columns): the first
    number of each cell of main_released.csv (mean over seeds)."""
    df = pd.read_csv(tables / "main_released.csv")
    cols = {split: f"{split} ROUGE-L" for split in SPLITS}
    out = pd.DataFrame({split: df[col].astype(str).str.split().str[0].astype(float)
                        for split, col in cols.items()})
    out.index = df["method"]
    return out


def comparison_lines(tables: Path = TABLES) -> list[str]:
    df = pd.read_csv(tables / "comparisons.csv")
    lines = []
    for (a, b), rows in df.groupby(["a", "b"], sort=False):
        parts, verdicts = [], []
        for _, r in rows.iterrows():
            lo, hi = interval(r)
            level = float(r["ci_level"]) * 100
            parts.append(f"{signed(r['delta'])} [{signed(lo)}, {signed(hi)}] on {SPLITS.get(r['split'], r['split'])} "
                         f"({level:.1f} %)")
            verdicts.append(str(r["verdict"]))
        verdict = verdicts[0] if len(set(verdicts)) == 1 else "; ".join(
            f"{SPLITS.get(s, s)}: {v}" for s, v in zip(rows["split"], verdicts))
        lines.append(f"- **{a} − {b}**: {', '.join(parts)}: {verdict}.")
    return lines


def answer_line(tables: Path = TABLES) -> str:
    """The answer in one sentence, from the verdicts of the declared comparisons."""
    df = pd.read_csv(tables / "comparisons.csv")
    shown = df[df["verdict"].isin(["better", "worse"])]
    n = len(df)
    pairs = (f"{' and '.join(dict.fromkeys(df['a']))} against {' and '.join(dict.fromkeys(df['b']))}, "
             f"on {' and '.join(SPLITS.get(x, x) for x in dict.fromkeys(df['split']))}")
    if shown.empty:
        return (f"- **The answer**: none of the {n} declared comparisons ({pairs}) shows a "
                "difference at this budget: no method is shown to beat another, nor to be worse.")
    found = "; ".join(f"{r['a']} {r['verdict']} than {r['b']} on {SPLITS.get(r['split'], r['split'])}"
                      for _, r in shown.iterrows())
    return (f"- **The answer**: {len(shown)} of the {n} declared comparisons ({pairs}) show a "
            f"difference: {found}; the others show none.")


def split_line(tables: Path = TABLES) -> str:
    """The distillation term's share of the update in the released mix, per method."""
    df = pd.read_csv(tables / "update_split.csv")
    share = "share" if "share" in df.columns else "grad_share"
    rows = df[(df["term"] == "distill") & ~df["method"].str.startswith("alone_")]
    parts = [f"{r['label']} {int(round(r[share] * 100)):d} %".replace(" -", " −") for _, r in rows.iterrows()]
    return ("- **Where the update comes from** (released mix, gradient probes): the distillation "
            f"term's share of the gradient is {', '.join(parts)}; the rest is the dataset CE and "
            "the pre-train terms.")


def results_block(tables: Path = TABLES) -> str:
    s = scores(tables)
    header = "| split | " + " | ".join(s.index) + " |"
    rule = "|---|" + "---:|" * len(s.index)
    rows = [f"| {SPLITS[split]} | " + " | ".join(f"{v:.1f}" for v in s[split]) + " |" for split in SPLITS]
    methods = [m for m in s.index if m not in ("teacher", "student (start)")]
    lo = min(s.loc[methods].min())
    hi = max(s.loc[methods].max())
    return "\n".join([
        BEGIN,
        "Greedy ROUGE-L (×100), mean over seeds, on the test prompts and on prompts of held-out "
        "templates (`results/cpu/tables/main_released.md`):",
        "",
        header, rule, *rows,
        "",
        answer_line(tables),
        f"- **Scores**: every method of the released mix scores {lo:.1f}–{hi:.1f} on the two "
        f"splits, the start {s.loc['student (start)'].min():.1f}–{s.loc['student (start)'].max():.1f} "
        f"and the teacher {s.loc['teacher'].min():.1f}–{s.loc['teacher'].max():.1f}.",
        "- **The declared comparisons** (difference in ROUGE-L, interval at its Holm level, "
        "`tables/comparisons.md`):",
        *["  " + line for line in comparison_lines(tables)],
        split_line(tables),
        END,
    ])


def fill_readme(text: str, tables: Path = TABLES) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md: no '{BEGIN}' ... '{END}' markers")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + results_block(tables) + text[end:]


def fill_tables(text: str, tables: Path = TABLES) -> str:
    def table(m):
        path = tables / f"{m.group(2)}.md"
        if not path.is_file():
            raise SystemExit(f"docs/results.md cites {path.relative_to(ROOT)}, which does not exist")
        return m.group(1) + path.read_text(encoding="utf-8").rstrip("\n") + "\n" + m.group(4)
    return TABLE_BLOCK.sub(table, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    args = ap.parse_args(argv)
    stale = []
    for path, fill in ((ROOT / "README.md", fill_readme), (ROOT / "docs" / "results.md", fill_tables)):
        old = path.read_text(encoding="utf-8")
        new = fill(old)
        if new != old:
            stale.append(path.relative_to(ROOT).as_posix())
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"stale: {', '.join(stale)}: python tools/readme_results.py", file=sys.stderr)
        return 1
    print(("rewrote " + ", ".join(stale)) if stale else "README.md and docs/results.md are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
