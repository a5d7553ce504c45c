"""The synthetic Dolly-format set: deterministic, split-clean, checkable, varied lengths."""
from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import time

import pytest

from dpkd_lib.datasets import synthetic
from dpkd_lib.datasets.synthetic import CATEGORIES, SPLITS, generate_synthetic, templates

FIELDS = ("id", "instruction", "context", "response", "category", "template")


@pytest.fixture(scope="module")
def data():
    return generate_synthetic(n_train=2000, n_valid=200, n_test=300, n_heldout=300, seed=0)


def _words(text: str) -> int:
    return len(text.split())


def _all(data):
    return [r for s in SPLITS for r in data[s]]


def test_sizes_fields_and_unique_ids(data):
    assert {s: len(data[s]) for s in SPLITS} == {"train": 2000, "valid": 200, "test": 300, "heldout": 300}
    ids = [r["id"] for r in _all(data)]
    assert len(set(ids)) == len(ids)
    for r in _all(data):
        assert tuple(r) == FIELDS
        assert all(isinstance(r[k], str) for k in FIELDS)
        assert r["instruction"].strip() and r["response"].strip()
        assert r["category"] in CATEGORIES
        assert r["template"].startswith(r["category"] + ".")


def test_same_seed_same_records_other_seed_differs(data):
    again = generate_synthetic(n_train=2000, n_valid=200, n_test=300, n_heldout=300, seed=0)
    assert again == data
    other = generate_synthetic(n_train=2000, n_valid=200, n_test=300, n_heldout=300, seed=1)
    assert other["train"] != data["train"] and other["test"] != data["test"]


def test_deterministic_across_processes_and_hash_seeds():
    """String-seeded RNGs and no set iteration: PYTHONHASHSEED must not matter."""
    code = ("import hashlib, json; from dpkd_lib.datasets.synthetic import generate_synthetic as g; "
            "print(hashlib.sha256(json.dumps(g(300, 30, 30, 30, seed=3)).encode()).hexdigest())")
    outs = []
    for hash_seed in ("1", "2"):
        env = {"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"}
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]), timeout=60)
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout.strip())
    assert outs[0] == outs[1]


def test_synthetic_module_does_not_import_torch():
    code = "import sys, dpkd_lib.datasets.synthetic; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert res.stdout.strip() == "False", res.stderr


def test_heldout_templates_never_in_train_valid_test(data):
    held = set(synthetic.heldout_template_names())
    for split in ("train", "valid", "test"):
        assert not held & {r["template"] for r in data[split]}, split
    assert {r["template"] for r in data["heldout"]} <= held


def test_every_category_has_a_heldout_template():
    by_cat = collections.defaultdict(lambda: [0, 0])
    for t in templates():
        by_cat[t.category][t.heldout] += 1
    for cat in CATEGORIES:
        assert by_cat[cat][0] >= 1 and by_cat[cat][1] >= 1, cat


def test_no_instruction_context_pair_shared_between_splits(data):
    keys = [(r["instruction"], r["context"]) for r in _all(data)]
    assert len(set(keys)) == len(keys)


def test_changing_n_train_keeps_eval_splits():
    small = generate_synthetic(n_train=50, n_valid=20, n_test=30, n_heldout=30, seed=5)
    large = generate_synthetic(n_train=400, n_valid=20, n_test=30, n_heldout=30, seed=5)
    for split in ("valid", "test", "heldout"):
        assert small[split] == large[split]


def test_category_coverage(data):
    for split in SPLITS:
        cats = collections.Counter(r["category"] for r in data[split])
        assert set(cats) == set(CATEGORIES), (split, cats)
    train = collections.Counter(r["category"] for r in data["train"])
    copy_share = (train["closed_qa"] + train["information_extraction"]) / len(data["train"])
    assert copy_share >= 0.30
    assert sum(bool(r["context"]) for r in data["train"]) / len(data["train"]) >= 0.40


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_response_length_spread(data, split):
    """Every reference-length bucket of the paper-style analysis has data (>= 3 %)."""
    buckets = [(1, 3), (4, 10), (11, 20), (21, 40), (41, 80)]
    words = [_words(r["response"]) for r in data[split]]
    for lo, hi in buckets:
        share = sum(lo <= w <= hi for w in words) / len(words)
        assert share >= 0.03, (split, lo, hi, share)
    assert max(words) <= 100


def _by_family(data, family):
    return [r for r in _all(data) if r["template"].rsplit(".", 1)[0] == family]


def test_copy_answers_are_spans_of_the_context(data):
    for fam in ("closed_qa.span", "closed_qa.sentence", "closed_qa.who", "information_extraction.contact"):
        rows = _by_family(data, fam)
        assert rows, fam
        for r in rows:
            for part in r["response"].split(", "):
                assert part in r["context"], (fam, r)
    for r in _by_family(data, "information_extraction.fields"):
        for line in r["response"].split("\n"):
            assert line.split(": ", 1)[1] in r["context"], r
    for r in _by_family(data, "summarization.bullets"):
        assert " ".join(line[2:] for line in r["response"].split("\n")) == r["context"]


def test_computed_answers_are_correct(data):
    for r in _by_family(data, "arithmetic.binary"):
        expr = re.search(r"(\d+) ([-+*]) (\d+)", r["instruction"]) or \
            re.search(r"(\d+) (plus|minus|times) (\d+)", r["instruction"])
        a, op, b = int(expr.group(1)), expr.group(2), int(expr.group(3))
        expected = {"+": a + b, "plus": a + b, "-": a - b, "minus": a - b, "*": a * b, "times": a * b}[op]
        assert r["response"] == str(expected), r
    for r in _by_family(data, "string_manipulation.reverse"):
        word = re.search(r"'(\w+)'", r["instruction"]).group(1)
        assert r["response"] == word[::-1]
    for r in _by_family(data, "arithmetic.sort"):
        nums = [int(x) for x in r["response"].split(", ")]
        assert nums in (sorted(nums), sorted(nums, reverse=True))
    for r in _by_family(data, "information_extraction.timeline"):
        years = [int(line.split(":")[0]) for line in r["response"].split("\n")]
        assert years == sorted(years) and all(str(y) in r["context"] for y in years)
    for r in _by_family(data, "information_extraction.json"):
        assert all(v in r["context"] for v in json.loads(r["response"]).values())


def test_yes_no_answers_are_balanced(data):
    answers = collections.Counter(r["response"] for r in _by_family(data, "closed_qa.yesno"))
    assert set(answers) == {"Yes", "No"}
    assert min(answers.values()) / sum(answers.values()) > 0.3


def test_fact_table_size_and_fast_generation():
    assets = synthetic.load_assets()
    n_facts = sum(len(assets.facts[k]) for k in ("countries", "elements", "planets", "books"))
    assert n_facts >= 100
    start = time.perf_counter()
    out = generate_synthetic(n_train=2400, n_valid=200, n_test=200, n_heldout=200, seed=11)
    assert sum(map(len, out.values())) == 3000
    assert time.perf_counter() - start < 2.0  # < 1 s on an idle core; margin for a shared one


def test_empty_splits_and_negative_sizes():
    out = generate_synthetic(n_train=0, n_valid=0, n_test=5, n_heldout=0)
    assert [len(out[s]) for s in SPLITS] == [0, 0, 5, 0]
    with pytest.raises(ValueError, match="n_train"):
        generate_synthetic(n_train=-1)


def test_text_helpers():
    assert synthetic.number_words(42) == "forty-two"
    assert synthetic.number_words(105) == "one hundred and five"
    assert synthetic.with_article("apple") == "an apple"
    assert synthetic.with_article("ukulele") == "a ukulele"
    assert synthetic.join_and(["a", "b", "c"], "or") == "a, b or c"
