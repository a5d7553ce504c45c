"""The README is a front door whose numbers come from the committed tables of the cpu study.

- its results block and docs/results.md's copies of the tables are current
  (tools/readme_results.py --check);
- every number the README's results quote is checked here against results/cpu/tables/ read
  directly (main_numeric.csv's raw means, comparisons.csv's deltas, intervals, levels and
  verdicts, update_split.csv's shares); a verdict claims a difference exactly when Holm
  rejects at the declared α, with the estimate's sign, and the one-line answer counts them;
- no result number is typed by hand outside the generated block, nor in docs/results.md's
  prose of §2–§6 unless the tables hold it;
- the README stays short and every relative link of the README and docs/ resolves.
"""
from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dpkd_lib.study.runs import DISPLAY

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "results" / "cpu" / "tables"
README = ROOT / "README.md"
RESULTS_DOC = ROOT / "docs" / "results.md"

_spec = importlib.util.spec_from_file_location("readme_results", ROOT / "tools" / "readme_results.py")
rr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rr)

NUMBER = re.compile(r"[−+-]?\d+(?:\.\d+)?")
SPLIT_OF = {"test": "test", "held-out templates": "heldout"}
#: the declared readouts on which lower is better (written out here, not read from the code it checks)
LOWER_IS_BETTER = {"NLL", "KL(teacher‖student)"}
ALPHA = yaml.safe_load((ROOT / "params" / "cpu" / "01_gpt2_120m.yaml").read_text())["primary"]["alpha"]


def num(text: str) -> float:
    return float(text.replace("−", "-"))


def block() -> str:
    text = README.read_text(encoding="utf-8")
    assert rr.BEGIN in text and rr.END in text, "README.md lost its results markers"
    return text[text.index(rr.BEGIN) + len(rr.BEGIN):text.index(rr.END)]


@functools.lru_cache
def _method_keys(profile: str) -> dict:
    released = yaml.safe_load((ROOT / "params" / profile / "01_gpt2_120m.yaml").read_text())["arms"]["released"]
    labels = {v: k for k, v in DISPLAY.items()}
    labels.update({spec["label"]: m for m, spec in released["methods"].items() if (spec or {}).get("label")})
    return labels


def method_key(label: str, profile: str = "cpu") -> str:
    """The README's column label -> main_numeric.csv's method key: the released arm's labels
    in the profile's params, else the display names."""
    return _method_keys(profile)[label]


def close(shown: str, value: float, digits: int = 1) -> bool:
    return abs(num(shown) - value) <= 0.5 * 10 ** -digits + 1e-9


def test_blocks_are_current():
    assert rr.main(["--check"]) == 0, "python tools/readme_results.py"


#: the README table's readout -> main_numeric.csv's column
READOUT_COLUMN = {"NLL": "nll", "KL(teacher‖student)": "kl", "ROUGE-L": "rouge_l", "resp. len": "response_tokens"}


def test_the_score_table_matches_the_raw_means():
    lines = [l for l in block().splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]
    raw = pd.read_csv(TABLES / "main_numeric.csv").set_index(["method", "split"])
    declared = rr.declared(TABLES)
    assert header[:2] == ["split", "readout"]
    shown = [(SPLIT_OF[row[0]], row[1].removesuffix(" (declared)")) for row in rows]
    # every declared readout is shown, marked, on every split, with ROUGE-L beside it
    assert {(s, m) for s in SPLIT_OF.values() for m in declared + ["ROUGE-L"]} <= set(shown)
    assert all(row[1].endswith(" (declared)") == (m in declared) for row, (_, m) in zip(rows, shown))
    checked = 0
    for row, (split, readout) in zip(rows, shown):
        column = READOUT_COLUMN[readout]
        for label, cell in zip(header[2:], row[2:]):
            value = raw.loc[(method_key(label), split), column]
            if cell == "–":
                assert pd.isna(value), f"README {label} {split} {readout}: –, table {value}"
            else:
                assert close(cell, value, rr.digits(readout)), f"README {label} {split} {readout}: {cell}, table {value:.4f}"
            checked += 1
    assert checked == len(rows) * (len(header) - 2) >= 12


def test_every_comparison_and_its_verdict_match_the_table():
    table = pd.read_csv(TABLES / "comparisons.csv")
    bullets = re.findall(r"\*\*(.+?) − (.+?)\*\*, (.+?): (.+?): ([a-z ;:-]+)\.\n", block())
    assert len(bullets) == table.groupby(["metric", "a", "b"]).ngroups >= 4
    seen = 0
    for a, b, metric, parts, verdict in bullets:
        k = rr.digits(metric)
        for m in re.finditer(r"(\S+) \[(\S+), (\S+)\] on (test|held-out templates) \((\d+\.\d) %(?:; detects ±(\S+))?\)",
                             parts):
            delta, lo, hi, split, level, mdd = m.groups()
            row = table[(table["metric"] == metric) & (table["a"] == a) & (table["b"] == b)
                        & (table["split"] == SPLIT_OF[split])].iloc[0]
            ci_lo, ci_hi = rr.interval(row)
            assert close(delta, row["delta"], k), (a, b, split, delta, row["delta"])
            assert close(lo, ci_lo, k) and close(hi, ci_hi, k), (a, b, split, lo, hi, ci_lo, ci_hi)
            assert close(level, row["ci_level"] * 100), (a, b, split, level)
            assert (mdd is None) == pd.isna(row.get("mdd", float("nan"))), (a, b, split, mdd)
            if mdd is not None:
                assert close(mdd, row["mdd"], k), (a, b, split, mdd, row["mdd"])
            assert row["verdict"] in verdict, (a, b, split, verdict, row["verdict"])
            # the words follow the test: a difference is claimed exactly when Holm rejects at
            # the declared α, with the sign of the estimate (lower NLL or KL is better)
            claimed = row["verdict"] in ("better", "worse")
            assert claimed == (row["p_holm"] <= ALPHA), row.to_dict()
            if claimed:
                lower = metric in LOWER_IS_BETTER
                assert ((row["delta"] < 0) if lower else (row["delta"] > 0)) == (row["verdict"] == "better"), row.to_dict()
            seen += 1
    assert seen == len(table)


def test_the_answer_counts_the_verdicts():
    table = pd.read_csv(TABLES / "comparisons.csv")
    line = next(l for l in block().splitlines() if l.startswith("- **The answer**"))
    differ = table[table["verdict"].isin(["better", "worse"])]
    if differ.empty:
        assert re.search(rf"none of the {len(table)} declared comparisons \(.*\) shows a difference", line), line
    else:
        assert re.search(rf"{len(differ)} of the {len(table)} declared comparisons \(.*\) show a difference", line), line
        for _, r in differ.iterrows():
            assert f"{r['a']} {r['verdict']} than {r['b']}" in line, (line, r.to_dict())


def test_the_update_split_shares_match_the_table():
    table = pd.read_csv(TABLES / "update_split.csv")
    share = "share" if "share" in table.columns else "grad_share"
    line = next(l for l in block().splitlines() if "Where the update comes from" in l)
    quoted = re.findall(r"([A-Za-z][\w-]*) ([−-]?\d+) %", line)
    assert len(quoted) >= 3
    for label, pct in quoted:
        row = table[(table["label"] == label) & (table["term"] == "distill")]
        assert len(row) == 1, label
        assert abs(num(pct) - row[share].iloc[0] * 100) <= 0.5 + 1e-9, (label, pct)


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"no section '## {title}'"
    return m.group(1)


def _prose_numbers(text: str) -> list[str]:
    """Decimal numbers and percentages in prose (not in links, code spans or paths)."""
    text = re.sub(r"\]\([^)]*\)|`[^`]*`|!\[[^\]]*\]", "", text)
    return re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])|(?<![\w.])\d+ %", text)


def test_no_result_is_typed_by_hand_in_the_readme():
    finding = _section(README.read_text(encoding="utf-8"), "The finding")
    outside = finding.replace(block(), "")
    assert not _prose_numbers(outside), _prose_numbers(outside)


def test_the_results_page_quotes_only_numbers_the_tables_hold():
    text = RESULTS_DOC.read_text(encoding="utf-8")
    held = "\n".join(p.read_text(encoding="utf-8") for p in sorted(TABLES.glob("*.md")))
    held_numbers = set(_prose_numbers(held)) | set(re.findall(r"\d+\.\d+|\d+ %", held))
    quoted = []
    for title in ("2. The main table", "3. The declared comparisons", "4. The answer",
                  "5. Arm (b): each objective alone", "6. Where the update comes from"):
        prose = rr.TABLE_BLOCK.sub("", _section(text, title))
        quoted += [n for n in _prose_numbers(prose) if n not in held_numbers]
    assert not quoted, f"docs/results.md quotes numbers the tables do not hold: {quoted}"


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 150, f"README.md has {lines} lines: move detail to docs/"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    text = page.read_text(encoding="utf-8")
    dead = [target for target in LINK.findall(text)
            if not re.match(r"[a-z]+:", target) and not (page.parent / target).exists()]
    assert not dead, f"{page.relative_to(ROOT)}: dead links {dead}"


def test_the_pilots_learning_rate_table_is_its_committed_data():
    """docs/results.md §8's table of each objective alone at each rate: every cell is
    results/cpu_pilot/tables/pilot_lrs.csv's value (rates ascending, as the cell lists them),
    rounded as printed; the rate in bold is the one the params train that objective at."""
    lrs = pd.read_csv(ROOT / "results" / "cpu_pilot" / "tables" / "pilot_lrs.csv", dtype={"lr": str})
    text = _section(RESULTS_DOC.read_text(encoding="utf-8"), "8. The pilot")
    head, rows = None, []
    for line in text.split("### Each objective alone", 1)[1].splitlines():
        if line.startswith("| objective"):
            head = [c.strip() for c in line.strip("|").split("|")]
        elif head and line.startswith("| ") and not line.startswith("|---"):
            rows.append(dict(zip(head, (c.strip() for c in line.strip("|").split("|")))))
    assert len(rows) == 4
    column = {"greedy ROUGE-L": "greedy ROUGE-L", "reference NLL": "reference NLL", "KL": "KL(teacher‖student)",
              "new tokens": "new tokens", "ended %": "ended %"}
    for row in rows:
        name = row["objective"].split(" (")[0]
        data = lrs[lrs["objective"] == name].assign(rate=lambda d: pd.to_numeric(d["lr"], errors="coerce"))
        data = data.sort_values("rate")
        assert len(data), name
        for shown, col in column.items():
            cells = [c.strip("* ") for c in row[shown].split(" / ")]
            assert len(cells) == len(data), (name, shown)
            for cell, value in zip(cells, data[col]):
                decimals = len(cell.split(".")[1]) if "." in cell else 0
                assert float(cell) == pytest.approx(round(float(value), decimals), abs=1e-9), (name, shown, cell, value)
        bold = re.search(r"\*\*([\d.e-]+)\*\*", row["lr"])
        if bold:
            rates = pd.read_csv(ROOT / "results" / "cpu_pilot" / "tables" / "pilot_rates.csv", dtype=str)
            trains = set(rates[rates["objective"] == name]["the final run trains at"])
            assert {f"{float(bold.group(1)):g}"} == trains, (name, trains)
