"""The README's results and the results pages' tables, written from the committed tables of the
cpu study (results/cpu/tables/) and of cpu_full (results/cpu_full/tables/), so that no number
is typed by hand.

    python tools/readme_results.py          # rewrite the blocks between the markers
    python tools/readme_results.py --check  # exit 1 if a block is stale (tests/test_readme.py)

README.md: the block between `<!-- results:begin ... -->` and `<!-- results:end -->`.
docs/results.md (docs/results_cpu_full.md): each `<!-- table:NAME -->` ... `<!-- /table -->`
block holds results/cpu/tables/NAME.md (results/cpu_full/tables/NAME.md) as it is. Run it
after `make reproduce` (or `make tables`) changes the tables. Needs pandas only.
"""
from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "results" / "cpu" / "tables"
#: each results page and the tables its blocks copy
PAGES = {ROOT / "docs" / "results.md": TABLES,
         ROOT / "docs" / "results_cpu_full.md": ROOT / "results" / "cpu_full" / "tables"}
BEGIN = "<!-- results:begin (python tools/readme_results.py; tests/test_readme.py checks it) -->"
END = "<!-- results:end -->"
TABLE_BLOCK = re.compile(r"(<!-- table:([a-z0-9_]+) -->\n)(.*?)(<!-- /table -->)", re.S)
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


#: readouts in nats: three decimals; scores (ROUGE-L, ×100) and lengths: one
NATS = ("NLL", "KL(teacher‖student)")
SHOWN = ("ROUGE-L", "resp. len")   # reported beside the declared readouts, never tested


def digits(metric: str) -> int:
    return 3 if metric in NATS else 1


def comparisons(tables: Path = TABLES) -> pd.DataFrame:
    """comparisons.csv; tables from before several readouts were declared have no metric
    column: theirs was ROUGE-L."""
    df = pd.read_csv(tables / "comparisons.csv")
    if "metric" not in df:
        df["metric"] = "ROUGE-L"
    return df


def declared(tables: Path = TABLES) -> list[str]:
    """The declared readouts, in their order: the metric column of comparisons.csv."""
    return list(dict.fromkeys(comparisons(tables)["metric"]))


def scores(tables: Path = TABLES) -> pd.DataFrame:
    """Per method of the released mix (columns), one row per split × readout (the declared
    ones, then ROUGE-L and response length): the first number of each cell of
    main_released.csv (the mean over seeds)."""
    df = pd.read_csv(tables / "main_released.csv")
    rows, readouts = {}, dict.fromkeys([*declared(tables), *SHOWN])
    for split in SPLITS:
        for metric in readouts:
            col = f"{split} {metric}"
            if col in df:
                rows[(split, metric)] = pd.to_numeric(df[col].astype(str).str.split().str[0], errors="coerce").values
    return pd.DataFrame(rows, index=df["method"]).T


def _cell(v: float, metric: str) -> str:
    return "–" if pd.isna(v) else f"{v:.{digits(metric)}f}"


def comparison_lines(tables: Path = TABLES) -> list[str]:
    df = comparisons(tables)
    lines = []
    for (metric, a, b), rows in df.groupby(["metric", "a", "b"], sort=False):
        k, parts, verdicts = digits(metric), [], []
        for _, r in rows.iterrows():
            lo, hi = interval(r)
            level = float(r["ci_level"]) * 100
            mdd = f"; detects ±{r['mdd']:.{k}f}" if "mdd" in r and pd.notna(r["mdd"]) else ""
            parts.append(f"{signed(r['delta'], k)} [{signed(lo, k)}, {signed(hi, k)}] on "
                         f"{SPLITS.get(r['split'], r['split'])} ({level:.1f} %{mdd})")
            verdicts.append(str(r["verdict"]))
        verdict = verdicts[0] if len(set(verdicts)) == 1 else "; ".join(
            f"{SPLITS.get(s, s)}: {v}" for s, v in zip(rows["split"], verdicts))
        lines.append(f"- **{a} − {b}**, {metric}: {', '.join(parts)}: {verdict}.")
    return lines


def answer_line(tables: Path = TABLES) -> str:
    """The answer in one sentence, from the verdicts of the declared comparisons."""
    df = comparisons(tables)
    shown = df[df["verdict"].isin(["better", "worse"])]
    n = len(df)
    pairs = (f"{' and '.join(dict.fromkeys(df['a']))} against {' and '.join(dict.fromkeys(df['b']))}, "
             f"on {' and '.join(dict.fromkeys(df['metric']))}, "
             f"on {' and '.join(SPLITS.get(x, x) for x in dict.fromkeys(df['split']))}")
    if shown.empty:
        return (f"- **The answer**: none of the {n} declared comparisons ({pairs}) shows a "
                "difference at this budget: no method is shown to beat another, nor to be worse.")
    found = "; ".join(f"{r['a']} {r['verdict']} than {r['b']} on {r['metric']}, {SPLITS.get(r['split'], r['split'])}"
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
    s, tested = scores(tables), declared(tables)
    header = "| split | readout | " + " | ".join(s.columns) + " |"
    rule = "|---|---|" + "---:|" * len(s.columns)
    rows = [f"| {SPLITS[split]} | {metric}{' (declared)' if metric in tested else ''} | "
            + " | ".join(_cell(v, metric) for v in s.loc[(split, metric)]) + " |" for split, metric in s.index]
    return "\n".join([
        BEGIN,
        f"The declared readouts ({', '.join(tested)}) and, reported beside them, greedy "
        "ROUGE-L (×100) and response length (new tokens); mean over seeds, on the test prompts and "
        "on prompts of held-out templates (`results/cpu/tables/main_released.md`):",
        "",
        header, rule, *rows,
        "",
        answer_line(tables),
        "- **The declared comparisons** (difference and its interval at the level shown; where "
        "recorded, the smallest difference the seeds detect with 80 % power; `tables/comparisons.md`):",
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
            raise SystemExit(f"a results page cites {path.relative_to(ROOT)}, which does not exist")
        return m.group(1) + path.read_text(encoding="utf-8").rstrip("\n") + "\n" + m.group(4)
    return TABLE_BLOCK.sub(table, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    args = ap.parse_args(argv)
    stale = []
    for path, fill in ((ROOT / "README.md", fill_readme),
                       *((page, functools.partial(fill_tables, tables=tables)) for page, tables in PAGES.items()
                         if page.exists())):
        old = path.read_text(encoding="utf-8")
        new = fill(old)
        if new != old:
            stale.append(path.relative_to(ROOT).as_posix())
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"stale: {', '.join(stale)}: python tools/readme_results.py", file=sys.stderr)
        return 1
    print(("rewrote " + ", ".join(stale)) if stale else "README.md and the results pages are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
