"""docs/ agrees with the code: params.md is the generator's output, every `docs/*.md §N`
cited in the code exists, every valid value in choices.py is documented."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from dpkd_lib import choices, config
from dpkd_lib.params_reference import field_docs, params_reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# "docs/method.md §2", "method.md §3-§5", "design.md §7" (the docs/ prefix is optional)
CITATION = re.compile(r"(?:docs/)?\b(method|design|params)\.md\s*§\s*(\d+)(?:\s*[-–]\s*§?\s*(\d+))?")
CITING = [*sorted((ROOT / "dpkd_lib").rglob("*.py")), *sorted((ROOT / "params").rglob("*.yaml")),
          *sorted((ROOT / "notebooks").glob("*.ipynb")), ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def test_params_md_is_current():
    assert (DOCS / "params.md").read_text(encoding="utf-8") == params_reference(), \
        "docs/params.md is stale: python -m dpkd_lib.params_reference > docs/params.md"


def _sections(doc: str) -> set[int]:
    text = (DOCS / f"{doc}.md").read_text(encoding="utf-8")
    return {int(n) for n in re.findall(r"^#{1,6}\s+(\d+)\.\s", text, flags=re.M)}


def test_every_cited_section_exists():
    sections = {doc: _sections(doc) for doc in ("method", "design", "params")}
    cited = []
    for path in CITING:
        if not path.is_file():
            continue
        for m in CITATION.finditer(path.read_text(encoding="utf-8")):
            doc, first, last = m.group(1), int(m.group(2)), int(m.group(3) or m.group(2))
            cited += [(path.relative_to(ROOT), doc, n) for n in range(first, last + 1)]
    assert cited, "no citation found: the pattern is broken"
    missing = [f"{where}: {doc}.md §{n}" for where, doc, n in cited if n not in sections[doc]]
    assert not missing, "cited sections with no heading:\n" + "\n".join(missing)


def _choice_values():
    for name, value in vars(choices).items():
        if name.startswith("_"):
            continue
        if isinstance(value, tuple):
            yield from ((name, v) for v in value)
        elif isinstance(value, dict):
            for key, vs in value.items():
                yield name, key
                yield from ((name, v) for v in vs)


def test_every_valid_value_is_in_params_md():
    text = (DOCS / "params.md").read_text(encoding="utf-8")
    values = list(_choice_values())
    assert len(values) > 50
    missing = [f"{name}: {v}" for name, v in values if f"`{v}`" not in text]
    assert not missing, missing


@pytest.mark.parametrize("kind", sorted(config.SECTIONS))
def test_every_parameter_has_a_comment(kind):
    docs, _ = field_docs(config.SECTIONS[kind])
    assert set(docs) == {f.name for f in dataclasses.fields(config.SECTIONS[kind])}
    assert not [name for name, doc in docs.items() if not doc], \
        f"{kind}: fields without a trailing comment (docs/params.md prints it)"


def test_rules_name_real_fields_and_real_choices():
    """CHOICES, RANGES and USES refer to fields that exist, and the choices are choices.py's
    own tuples (defined once)."""
    own = {id(v) for v in vars(choices).values() if isinstance(v, tuple)}
    for table in (config.CHOICES, config.RANGES, config.USES):
        for kind, rules in table.items():
            fields = {f.name for f in dataclasses.fields(config.SECTIONS[kind])}
            assert set(rules) <= fields, (kind, set(rules) - fields)
    assert all(id(options) in own for rules in config.CHOICES.values() for options in rules.values())
