"""The offline, seeded, Dolly-format instruction set of the default profile (docs/design.md §4).

Why it exists: databricks-dolly-15k has no offline copy, and a CPU study needs a task where
a pretrained teacher clearly beats a pruned student. So we generate records with Dolly's
fields (``instruction``, ``context``, ``response``, ``category``) whose answers are
*checkable*: for a given instruction and context exactly one response is correct, which
makes exact match meaningful (and ROUGE-L informative for the long ones).

How it is built:

- A **family** is one task (e.g. "ask one attribute of a fictional person"). Its builder
  draws the content and returns the fields of the instruction, the context and the unique
  response. Each phrasing of the instruction is one **template**; the record's
  ``template`` field names it (``category.family.k``).
- Every category has templates that appear only in the ``heldout`` split (new phrasings,
  and whole families with new output formats): our stand-in for SelfInst / S-NI, which
  test instruction following beyond the training distribution.
- closed_qa, information_extraction and summarization read a passage about *invented*
  people, companies and towns, so the answer has to be copied from the context (where a
  pretrained teacher shines and a pruned student struggles). open_qa / general_qa ask
  about real facts shipped in ``assets/facts.json``.
- Responses range from one word to ~80 words so the reference-length buckets of the
  paper's Tables 4/5 have data.

Determinism: each split draws from its own ``random.Random`` seeded by a string (stable
across Python processes, unlike ``hash``); nothing iterates over a set. The eval splits
are drawn first and train skips their (instruction, context) pairs, so there is no
train/test overlap, and changing ``n_train`` leaves test, valid and heldout unchanged.
"""
from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable

from ..choices import SPLITS

CATEGORY_WEIGHTS = {
    "closed_qa": 0.18,
    "information_extraction": 0.16,
    "open_qa": 0.10,
    "general_qa": 0.06,
    "classification": 0.10,
    "summarization": 0.10,
    "brainstorming": 0.10,
    "arithmetic": 0.10,
    "string_manipulation": 0.10,
}
CATEGORIES = tuple(CATEGORY_WEIGHTS)
# Within a category families are drawn uniformly, except these (the long-response families,
# weighted up so that the 41-80-word reference bucket is not nearly empty).
FAMILY_WEIGHTS = {
    "summarization.bullets": 3.0,
    "summarization.decisions": 1.5,
    "general_qa.countries": 2.5,
    "brainstorming.times_table": 2.0,
    "brainstorming.number_words": 1.5,
    "arithmetic.steps": 2.0,
    "information_extraction.timeline": 1.5,
    "information_extraction.directory": 1.5,
}

# (fields used by the instruction phrasing, context, response)
Built = tuple[dict[str, Any], str, str]
Builder = Callable[[random.Random, "Assets"], Built]


# --------------------------------------------------------------------------- assets


@dataclass(frozen=True)
class Assets:
    facts: dict
    lex: dict


@functools.lru_cache(maxsize=1)
def load_assets() -> Assets:
    """The shipped fact table and word lists (read once per process)."""
    base = resources.files("dpkd_lib") / "assets"
    facts = json.loads((base / "facts.json").read_text(encoding="utf-8"))
    lex = json.loads((base / "lexicon.json").read_text(encoding="utf-8"))
    return Assets(facts=facts, lex=lex)


# --------------------------------------------------------------------------- text helpers

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ORDINALS = "first second third fourth fifth sixth seventh eighth".split()
_MASS_NOUNS = ("spinach", "kale", "garlic", "asparagus", "broccoli", "lettuce", "celery",
               "cauliflower", "cabbage", "beetroot")


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000 ("forty-two", "one hundred and five")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" and {number_words(rest)}" if rest else "")


def cap(text: str) -> str:
    """Upper-case the first character only ("the Netherlands" -> "The Netherlands")."""
    return text[:1].upper() + text[1:]


def lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def join_and(items: list[str], conj: str = "and") -> str:
    """"a", "a and b", "a, b and c"."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


def with_article(noun: str) -> str:
    """"an apple", "a pear", "spinach" (mass nouns take none)."""
    if noun in _MASS_NOUNS:
        return noun
    if noun[0] in "aeio" or (noun[0] == "u" and not noun.startswith("uk")):
        return f"an {noun}"
    return f"a {noun}"


def _distinct(rng: random.Random, draw: Callable[[], Any], k: int) -> list:
    """k distinct values from ``draw`` (kept in draw order, so deterministic)."""
    out: list = []
    while len(out) < k:
        value = draw()
        if value not in out:
            out.append(value)
    return out


# --------------------------------------------------------------------------- fictional names


def _person_name(rng: random.Random, A: Assets, gender: str | None = None) -> tuple[str, str, str]:
    """(full name, first name, gender) of an invented person."""
    gender = gender or rng.choice(("f", "m"))
    first = rng.choice(A.lex["first_names_female" if gender == "f" else "first_names_male"])
    return f"{first} {rng.choice(A.lex['last_names'])}", first, gender


def _people(rng: random.Random, A: Assets, k: int) -> list[tuple[str, str, str]]:
    """k invented people with distinct full *and* first names (so questions are unambiguous)."""
    out: list[tuple[str, str, str]] = []
    while len(out) < k:
        person = _person_name(rng, A)
        if all(person[0] != p[0] and person[1] != p[1] for p in out):
            out.append(person)
    return out


def _town(rng: random.Random, A: Assets) -> str:
    return rng.choice(A.lex["town_heads"]) + rng.choice(A.lex["town_tails"])


def _towns(rng: random.Random, A: Assets, k: int) -> list[str]:
    return _distinct(rng, lambda: _town(rng, A), k)


def _company(rng: random.Random, A: Assets) -> tuple[str, str]:
    """(company name, what it makes)."""
    suffix, product = rng.choice(A.lex["company_kinds"])
    name = rng.choice(A.lex["company_heads"]) + rng.choice(A.lex["company_tails"])
    return f"{name} {suffix}", product


# --------------------------------------------------------------------------- passages


@dataclass(frozen=True)
class Field:
    """One checkable fact of a passage: how to ask it, state it, and label it."""

    kind: str  # year | count | town | person | thing: which distractors make sense
    question: str
    claim: str
    label: str


@dataclass
class Passage:
    values: dict[str, Any]
    sentences: list[tuple[str, tuple[str, ...]]]  # rendered sentence, fields it states
    fields: dict[str, Field]

    @property
    def text(self) -> str:
        return " ".join(s for s, _ in self.sentences)

    def keys(self) -> list[str]:
        """The fields stated in the passage, in order of appearance."""
        return [k for _, ks in self.sentences for k in ks]

    def sentence_of(self, key: str) -> str:
        return next(s for s, ks in self.sentences if key in ks)

    def fmt(self, template: str, **extra: Any) -> str:
        return template.format(**self.values, **extra)


def _f(kind: str, question: str, claim: str, label: str) -> Field:
    return Field(kind, question, claim, label)


PERSON_SENTENCES = (
    ("{name} was born in {birth_year} in {birthplace}.", ("birth_year", "birthplace")),
    ("{Pron} graduated from the {university} in {grad_year} with a degree in {subject}.",
     ("university", "grad_year", "subject")),
    ("{Pron} then worked as {a_profession} for {work_years} years.", ("profession", "work_years")),
    ("In {found_year}, {pron} founded {company}, a company that makes {product}.",
     ("found_year", "company", "product")),
    ("{Pron} married {spouse} in {marry_year}, and they have {children} children.",
     ("spouse", "marry_year", "children")),
    ("In {poss} free time, {first} plays the {instrument}.", ("instrument",)),
    ("In {award_year}, {pron} received the {award} for {poss} work.", ("award_year", "award")),
)
PERSON_FIELDS = {
    "birth_year": _f("year", "In what year was {name} born?", "{name} was born in {v}", "Birth year"),
    "birthplace": _f("town", "Where was {name} born?", "{name} was born in {v}", "Birthplace"),
    "university": _f("thing", "Which university did {name} graduate from?",
                     "{name} graduated from the {v}", "University"),
    "grad_year": _f("year", "In what year did {name} graduate?", "{name} graduated in {v}",
                    "Graduation year"),
    "subject": _f("thing", "What did {name} get a degree in?", "{name} has a degree in {v}", "Degree"),
    "profession": _f("thing", "What did {name} work as after graduating?",
                     "{name} worked as {v} after graduating", "Profession"),
    "work_years": _f("count", "For how many years did {name} work as {a_profession}?",
                     "{name} worked as {a_profession} for {v} years", "Years worked"),
    "found_year": _f("year", "In what year did {name} found {company}?",
                     "{name} founded {company} in {v}", "Year founded"),
    "company": _f("thing", "Which company did {name} found?", "{name} founded {v}", "Company"),
    "product": _f("thing", "What does {company} make?", "{company} makes {v}", "Product"),
    "spouse": _f("person", "Who did {name} marry?", "{name} married {v}", "Spouse"),
    "marry_year": _f("year", "In what year did {name} marry {spouse}?",
                     "{name} married {spouse} in {v}", "Wedding year"),
    "children": _f("count", "How many children do {name} and {spouse} have?",
                   "{name} and {spouse} have {v} children", "Children"),
    "instrument": _f("thing", "What instrument does {first} play?", "{first} plays the {v}",
                     "Instrument"),
    "award_year": _f("year", "In what year did {name} receive the {award}?",
                     "{name} received the {award} in {v}", "Award year"),
    "award": _f("thing", "What award did {name} receive?", "{name} received the {v}", "Award"),
}
# Chronological events of a person, for the timeline family: year field -> event text.
PERSON_EVENTS = {
    "birth_year": "born in {birthplace}",
    "grad_year": "graduated from the {university}",
    "found_year": "founded {company}",
    "marry_year": "married {spouse}",
    "award_year": "received the {award}",
}

COMPANY_SENTENCES = (
    ("{company} was founded in {found_year} by {founder} in {town}.", ("found_year", "founder", "town")),
    ("The company makes {product}.", ("product",)),
    ("Its headquarters are in {hq}.", ("hq",)),
    ("Today it employs about {employees} people.", ("employees",)),
    ("Its current chief executive is {ceo}.", ("ceo",)),
    ("In {factory_year}, it opened a second factory in {factory_town}.", ("factory_year", "factory_town")),
    ("Last year its sales reached {revenue} million dollars.", ("revenue",)),
)
COMPANY_FIELDS = {
    "found_year": _f("year", "In what year was {company} founded?", "{company} was founded in {v}",
                     "Year founded"),
    "founder": _f("person", "Who founded {company}?", "{company} was founded by {v}", "Founder"),
    "town": _f("town", "In which town was {company} founded?", "{company} was founded in {v}",
               "Founding town"),
    "product": _f("thing", "What does {company} make?", "{company} makes {v}", "Product"),
    "hq": _f("town", "Where are the headquarters of {company}?",
             "the headquarters of {company} are in {v}", "Headquarters"),
    "employees": _f("count", "About how many people does {company} employ?",
                    "{company} employs about {v} people", "Employees"),
    "ceo": _f("person", "Who is the chief executive of {company}?",
              "the chief executive of {company} is {v}", "Chief executive"),
    "factory_year": _f("year", "In what year did {company} open its second factory?",
                       "{company} opened its second factory in {v}", "Second factory year"),
    "factory_town": _f("town", "Where is the second factory of {company}?",
                       "the second factory of {company} is in {v}", "Second factory town"),
    "revenue": _f("count", "How many million dollars did {company} make in sales last year?",
                  "{company} made {v} million dollars in sales last year", "Sales (million dollars)"),
}

TOWN_SENTENCES = (
    ("{town} is a small town on the banks of the {river} River.", ("river",)),
    ("It was founded in {found_year} by {founder}.", ("found_year", "founder")),
    ("About {population} people live there.", ("population",)),
    ("The town is famous for its {festival}, held every {festival_month}.", ("festival", "festival_month")),
    ("Its mayor is {mayor}.", ("mayor",)),
    ("The nearest city, {city}, is {km} kilometres away.", ("city", "km")),
)
TOWN_FIELDS = {
    "river": _f("thing", "On which river does {town} lie?", "{town} lies on the {v} River", "River"),
    "found_year": _f("year", "In what year was {town} founded?", "{town} was founded in {v}",
                     "Year founded"),
    "founder": _f("person", "Who founded {town}?", "{town} was founded by {v}", "Founder"),
    "population": _f("count", "About how many people live in {town}?",
                     "about {v} people live in {town}", "Population"),
    "festival": _f("thing", "Which festival is {town} famous for?", "{town} is famous for its {v}",
                   "Festival"),
    "festival_month": _f("thing", "In which month is the {festival} of {town} held?",
                         "the {festival} of {town} is held in {v}", "Festival month"),
    "mayor": _f("person", "Who is the mayor of {town}?", "the mayor of {town} is {v}", "Mayor"),
    "city": _f("town", "What is the nearest city to {town}?", "the nearest city to {town} is {v}",
               "Nearest city"),
    "km": _f("count", "How many kilometres is {town} from the nearest city?",
             "{town} is {v} kilometres from the nearest city", "Distance (km)"),
}


def _distinct_years(rng: random.Random, anchors: list[tuple[int, int, int]]) -> list[int]:
    """Years ``base + U(lo, hi)`` chained on the previous one, all distinct."""
    years: list[int] = []
    for offset_lo, offset_hi, base_idx in anchors:
        base = years[base_idx] if base_idx >= 0 else 0
        while True:
            year = base + rng.randint(offset_lo, offset_hi)
            if year not in years:
                years.append(year)
                break
    return years


def person_values(rng: random.Random, A: Assets) -> dict[str, Any]:
    (name, first, gender), (spouse, _, _) = _people(rng, A, 2)
    birthplace, uni_town = _towns(rng, A, 2)
    company, product = _company(rng, A)
    profession, subject = rng.choice(A.lex["professions"])
    birth, grad, found, marry, award_year = _distinct_years(
        rng, [(1930, 1965, -1), (21, 25, 0), (3, 15, 1), (24, 36, 0), (4, 15, 2)])
    pron, poss = ("she", "her") if gender == "f" else ("he", "his")
    return {
        "name": name, "first": first, "pron": pron, "Pron": cap(pron), "poss": poss,
        "birth_year": birth, "birthplace": birthplace, "university": f"University of {uni_town}",
        "grad_year": grad, "subject": subject, "profession": profession,
        "a_profession": with_article(profession),
        "work_years": rng.randint(2, 12), "found_year": found, "company": company,
        "product": product, "spouse": spouse, "marry_year": marry, "children": rng.randint(2, 5),
        "instrument": rng.choice(A.lex["instruments"]), "award_year": award_year,
        "award": f"{rng.choice(A.lex['award_heads'])} {rng.choice(A.lex['award_tails'])}",
    }


def company_values(rng: random.Random, A: Assets) -> dict[str, Any]:
    company, product = _company(rng, A)
    (founder, _, _), (ceo, _, _) = _people(rng, A, 2)
    town, hq, factory_town = _towns(rng, A, 3)
    found, factory = _distinct_years(rng, [(1890, 1995, -1), (3, 25, 0)])
    return {
        "company": company, "product": product, "founder": founder, "ceo": ceo, "town": town,
        "hq": hq, "factory_town": factory_town, "found_year": found, "factory_year": factory,
        "employees": rng.randint(4, 500) * 10, "revenue": rng.randint(2, 900),
    }


def town_values(rng: random.Random, A: Assets) -> dict[str, Any]:
    town, river, city = _towns(rng, A, 3)
    (founder, _, _), (mayor, _, _) = _people(rng, A, 2)
    return {
        "town": town, "river": river, "city": city,
        "founder": founder, "mayor": mayor, "found_year": rng.randint(1100, 1890),
        "population": rng.randint(12, 900) * 10, "festival": f"{rng.choice(A.lex['foods'])} festival",
        "festival_month": rng.choice(A.lex["months"]), "km": rng.randint(5, 120),
    }


PASSAGE_KINDS = {
    "person": (person_values, PERSON_SENTENCES, PERSON_FIELDS),
    "company": (company_values, COMPANY_SENTENCES, COMPANY_FIELDS),
    "town": (town_values, TOWN_SENTENCES, TOWN_FIELDS),
}


def make_passage(rng: random.Random, A: Assets, kind: str | None = None, *, min_sentences: int = 3,
                 must: tuple[int, ...] = (), shuffle: bool = False) -> Passage:
    """A passage of ``kind`` keeping the first sentence, ``must`` and a random subset of the
    rest (in their natural order unless ``shuffle``: then all but the first are shuffled)."""
    kind = kind or rng.choice(tuple(PASSAGE_KINDS))
    make_values, sentences, fields = PASSAGE_KINDS[kind]
    values = make_values(rng, A)
    rest = [i for i in range(1, len(sentences))]
    n_keep = rng.randint(max(min_sentences - 1, len(must)), len(rest))
    optional = [i for i in rest if i not in must]
    chosen = sorted(set(must) | set(rng.sample(optional, n_keep - len(must))))
    if shuffle:
        rng.shuffle(chosen)
    order = [0] + chosen
    rendered = [(sentences[i][0].format(**values), sentences[i][1]) for i in order]
    return Passage(values=values, sentences=rendered, fields=fields)


def _distractor(rng: random.Random, A: Assets, field: Field, value: Any) -> Any:
    """A plausible wrong value of the same kind, for yes/no questions."""
    if field.kind in ("year", "count"):
        return value + rng.choice((-1, 1)) * rng.randint(1, 9 if field.kind == "year" else 3)
    if field.kind == "town":
        return _other(rng, value, lambda: _town(rng, A))
    if field.kind == "person":
        return _other(rng, value, lambda: _person_name(rng, A)[0])
    return None  # "thing": no generic distractor; callers pick another field


def _other(rng: random.Random, value: Any, draw: Callable[[], Any]) -> Any:
    while True:
        candidate = draw()
        if candidate != value:
            return candidate


# --------------------------------------------------------------------------- closed_qa


def b_closed_span(rng: random.Random, A: Assets) -> Built:
    """One attribute of an invented entity, answered by copying a span of the passage."""
    p = make_passage(rng, A)
    key = rng.choice(p.keys())
    question = p.fmt(p.fields[key].question)
    return {"question": question, "q": lower_first(question)}, p.text, str(p.values[key])


def b_closed_sentence(rng: random.Random, A: Assets) -> Built:
    """The answer is the whole sentence of the passage that states the attribute."""
    p = make_passage(rng, A)
    key = rng.choice(p.keys())
    question = p.fmt(p.fields[key].question)
    return {"question": question, "q": lower_first(question)}, p.text, p.sentence_of(key)


def _claim(rng: random.Random, A: Assets) -> tuple[Passage, str, bool]:
    p = make_passage(rng, A)
    keys = [k for k in p.keys() if p.fields[k].kind != "thing"]
    key = rng.choice(keys)
    truth = rng.random() < 0.5
    value = p.values[key] if truth else _distractor(rng, A, p.fields[key], p.values[key])
    return p, p.fmt(p.fields[key].claim, v=value), truth


def b_closed_yesno(rng: random.Random, A: Assets) -> Built:
    p, claim, truth = _claim(rng, A)
    return {"claim": claim}, p.text, "Yes" if truth else "No"


def b_closed_truefalse(rng: random.Random, A: Assets) -> Built:
    p, claim, truth = _claim(rng, A)
    return {"claim": cap(claim)}, p.text, "True" if truth else "False"


def b_closed_who(rng: random.Random, A: Assets) -> Built:
    """Two short bios; ask which person has a given attribute (answer: a name)."""
    people = [person_values(rng, A) for _ in range(2)]
    while any(people[1][k] == people[0][k] for k in ("name", "first", "instrument", "birthplace", "company")):
        people[1] = person_values(rng, A)  # every question must pick out exactly one person
    order = [0, 3, 5]  # born, founded, hobby
    text = " ".join(PERSON_SENTENCES[i][0].format(**v) for v in people for i in order)
    target = rng.choice(people)
    question = rng.choice((
        "Who founded {company}?", "Which of the two people plays the {instrument}?",
        "Who was born in {birthplace}?")).format(**target)
    return {"question": question, "q": lower_first(question)}, text, target["name"]


# --------------------------------------------------------------------------- information_extraction


def _pick_fields(rng: random.Random, p: Passage) -> list[str]:
    keys = p.keys()
    k = rng.randint(2, min(4, len(keys)))
    return sorted(rng.sample(keys, k), key=keys.index)


def b_extract_fields(rng: random.Random, A: Assets) -> Built:
    """Named fields copied from the passage, one 'Label: value' line each."""
    p = make_passage(rng, A, min_sentences=3)
    keys = _pick_fields(rng, p)
    labels = [p.fields[k].label for k in keys]
    response = "\n".join(f"{lab}: {p.values[k]}" for lab, k in zip(labels, keys))
    return {"labels": join_and([lab.lower() for lab in labels])}, p.text, response


def b_extract_json(rng: random.Random, A: Assets) -> Built:
    """Held-out output format: the same fields as a JSON object."""
    p = make_passage(rng, A, min_sentences=3)
    keys = _pick_fields(rng, p)
    labels = [p.fields[k].label for k in keys]
    obj = {_snake(lab): str(p.values[k]) for lab, k in zip(labels, keys)}
    return {"labels": join_and([lab.lower() for lab in labels])}, p.text, json.dumps(obj)


def _snake(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_").replace("__", "_")


def b_extract_years(rng: random.Random, A: Assets) -> Built:
    p = make_passage(rng, A, kind=rng.choice(("person", "company")), min_sentences=3)
    years = [str(p.values[k]) for k in p.keys() if p.fields[k].kind == "year"]
    if len(years) < 2:
        return b_extract_years(rng, A)
    return {}, p.text, ", ".join(years)


def b_extract_names(rng: random.Random, A: Assets) -> Built:
    p = make_passage(rng, A, min_sentences=3)
    names = [p.values["name"]] if "name" in p.values else []
    names += [str(p.values[k]) for k in p.keys() if p.fields[k].kind == "person"]
    if not names:
        return b_extract_names(rng, A)
    return {}, p.text, ", ".join(names)


def b_extract_timeline(rng: random.Random, A: Assets) -> Built:
    """Events of a life in chronological order from a passage whose sentences are shuffled:
    long (25-40 words), all copied spans, but reordered."""
    p = make_passage(rng, A, kind="person", must=(1, 3, 4, 6), shuffle=True)
    events = sorted((p.values[k], p.fmt(e)) for k, e in PERSON_EVENTS.items())
    response = "\n".join(f"{year}: {event}" for year, event in events)
    return {"name": p.values["name"]}, p.text, response


def _directory(rng: random.Random, A: Assets) -> tuple[list[dict], str]:
    n = rng.randint(3, 6)
    people = _people(rng, A, n)
    towns = [_town(rng, A) for _ in range(n)]
    jobs = [rng.choice(A.lex["professions"])[0] for _ in range(n)]
    rows = [{"name": p[0], "town": t, "job": j, "year": rng.randint(1940, 2000)}
            for p, t, j in zip(people, towns, jobs)]
    phrasing = ("{name} is {a_job} from {town} and was born in {year}.",
                "{name}, born in {year}, works as {a_job} in {town}.")
    text = " ".join(rng.choice(phrasing).format(a_job=with_article(r["job"]), **r) for r in rows)
    return rows, text


def b_extract_directory(rng: random.Random, A: Assets) -> Built:
    """A list of people; one line per person (long: up to ~40 words)."""
    rows, text = _directory(rng, A)
    attrs = rng.choice((("job",), ("town",), ("year",), ("job", "town"), ("job", "town", "year")))
    nouns = {"job": "profession", "town": "town", "year": "birth year"}
    response = "\n".join(" - ".join([r["name"]] + [str(r[a]) for a in attrs]) for r in rows)
    return ({"attr": join_and([nouns[a] for a in attrs]), "form": " - ".join(["Name"] + [nouns[a] for a in attrs])},
            text, response)


def b_extract_contact(rng: random.Random, A: Assets) -> Built:
    n = rng.randint(2, 5)
    people = _people(rng, A, n)
    domain = rng.choice(("mail.com", "post.net", "example.org", f"{_town(rng, A).lower()}.org"))
    phones = _distinct(rng, lambda: f"555-{rng.randint(100, 9999):04d}", n)
    rows = [{"name": p[0], "email": f"{p[0].split()[0].lower()}.{p[0].split()[1].lower()}@{domain}",
             "phone": ph} for p, ph in zip(people, phones)]
    text = " ".join(f"You can reach {r['name']} at {r['email']} or on {r['phone']}." for r in rows)
    target = rng.choice(rows)
    mode = rng.choice(("email", "phone", "all"))
    if mode == "all":
        return ({"question": "What are all the email addresses in the text, in order, separated by commas?"},
                text, ", ".join(r["email"] for r in rows))
    what = "email address" if mode == "email" else "phone number"
    return {"question": f"What is the {what} of {target['name']}?"}, text, target[mode]


# --------------------------------------------------------------------------- summarization


def b_sum_bio(rng: random.Random, A: Assets) -> Built:
    """Compress a biography into one fixed-form sentence."""
    p = make_passage(rng, A, kind="person", must=(2, 3))
    response = p.fmt("{name}, born in {birthplace} in {birth_year}, worked as {a_profession} "
                     "and founded {company} in {found_year}.")
    return {}, p.text, response


def _news(rng: random.Random, A: Assets) -> tuple[dict, str]:
    (mayor, _, _), = _people(rng, A, 1)
    v = {"town": _town(rng, A), "facility": rng.choice(A.lex["facilities"]), "mayor": mayor,
         "cost": rng.randint(2, 90), "month": rng.choice(A.lex["months"]),
         "weekday": rng.choice(A.lex["weekdays"]), "duration": rng.randint(6, 30),
         "residents": rng.randint(20, 400)}
    sentences = [
        "The {town} council approved a new {facility} on {weekday}.",
        "The project will cost {cost} million dollars.",
        "Construction will begin in {month} and should take {duration} months.",
        "Mayor {mayor} said the town had waited a long time for it.",
        "{residents} residents attended the meeting.",
    ]
    body = sentences[1:]
    rng.shuffle(body)
    return v, " ".join(s.format(**v) for s in [sentences[0]] + body)


def b_sum_news(rng: random.Random, A: Assets) -> Built:
    v, text = _news(rng, A)
    return {}, text, ("{town} will build a new {facility} costing {cost} million dollars, "
                      "with construction starting in {month}.").format(**v)


def b_sum_headline(rng: random.Random, A: Assets) -> Built:
    v, text = _news(rng, A)
    return {}, text, "{town} approves {cost} million dollar {facility}".format(**v)


def b_sum_decisions(rng: random.Random, A: Assets) -> Built:
    """Meeting notes: keep only the decisions, as a bulleted list (long: up to ~50 words)."""
    people = _people(rng, A, 3)
    fill = {"month": rng.choice(A.lex["months"]), "town": _town(rng, A), "pct": rng.choice((5, 10, 15, 20, 25)),
            "weekday": rng.choice(A.lex["weekdays"]), "n": rng.randint(3, 30)}
    actions = [a.format(**fill) for a in rng.sample(A.lex["actions"], rng.randint(2, 6))]
    fillers = [f.format(person=rng.choice(people)[0])
               for f in rng.sample(A.lex["fillers"], rng.randint(2, 4))]
    leads = ("The team agreed to {a}.", "It was decided to {a}.", "Everyone voted to {a}.",
             "{person} proposed to {a}, and the group approved it.")
    decisions = [rng.choice(leads).format(a=a, person=rng.choice(people)[0]) for a in actions]
    # Decisions keep their relative order; fillers are interleaved at random positions.
    lines = list(decisions)
    for f in fillers:
        lines.insert(rng.randint(0, len(lines)), f)
    response = "\n".join(f"- {cap(a)}." for a in actions)
    return {}, " ".join(lines), response


def b_sum_bullets(rng: random.Random, A: Assets) -> Built:
    """Every sentence of a passage as a bullet (long: 45-85 words, all copied)."""
    p = make_passage(rng, A, min_sentences=5)
    return {}, p.text, "\n".join(f"- {s}" for s, _ in p.sentences)


def b_sum_review(rng: random.Random, A: Assets) -> Built:
    product = rng.choice(A.lex["review_products"])
    pro1, pro2, con = rng.sample(A.lex["pros"], 3)
    month = rng.choice(A.lex["months"])
    text = (f"I bought this {product} in {month}. The {pro1} is great and the {pro2} is even better. "
            f"However, the {con} is a real disappointment. I use it every day.")
    return {"product": product}, text, f"Pros: {pro1}, {pro2}. Cons: {con}."


# --------------------------------------------------------------------------- classification


def _group(rng: random.Random, A: Assets) -> tuple[str, dict]:
    groups = A.lex["classification_groups"]
    name = rng.choice(sorted(groups))
    return name, groups[name]


_GROUP_NOUN = {"fruit_vegetable": "foods", "animal_class": "animals", "instrument_family": "instruments"}


def _items(rng: random.Random, g: dict, labels: list[str], n: int) -> list[tuple[str, str]]:
    pool = [(item, lab) for lab in labels for item in g["items"][lab]]
    chosen = rng.sample(pool, n)
    if len({lab for _, lab in chosen}) < 2:  # make it a real classification
        chosen[-1] = rng.choice([x for x in pool if x[1] != chosen[0][1]])
        if len({i for i, _ in chosen}) < n:
            return _items(rng, g, labels, n)
    return chosen


def b_cls_multi(rng: random.Random, A: Assets) -> Built:
    name, g = _group(rng, A)
    labels = g["labels"] if len(g["labels"]) <= 3 else rng.sample(g["labels"], rng.randint(2, 3))
    chosen = _items(rng, g, labels, rng.randint(3, 7))
    fields = {"noun": _GROUP_NOUN[name], "labels": join_and(labels, "or"),
              "items": ", ".join(i for i, _ in chosen)}
    return fields, "", "\n".join(f"{i}: {lab}" for i, lab in chosen)


def b_cls_grouped(rng: random.Random, A: Assets) -> Built:
    """Held-out output format: items grouped under each label."""
    name, g = _group(rng, A)
    labels = g["labels"] if len(g["labels"]) <= 3 else rng.sample(g["labels"], rng.randint(2, 3))
    chosen = _items(rng, g, labels, rng.randint(4, 7))
    present = [lab for lab in labels if any(lab == c for _, c in chosen)]
    response = "\n".join(f"{lab}: " + ", ".join(i for i, c in chosen if c == lab) for lab in present)
    fields = {"noun": _GROUP_NOUN[name], "labels": join_and(labels, "or"),
              "items": ", ".join(i for i, _ in chosen)}
    return fields, "", response


def b_cls_single(rng: random.Random, A: Assets) -> Built:
    name, g = _group(rng, A)
    label = rng.choice(g["labels"])
    item = rng.choice(g["items"][label])
    other = rng.choice([lab for lab in g["labels"] if lab != label])
    pair = [label, other] if rng.random() < 0.5 else [other, label]
    suffix = " instrument" if name == "instrument_family" else ""
    options = f"{with_article(pair[0])} or {with_article(pair[1])}{suffix}"
    return {"a_item": with_article(item), "item": item, "options": options}, "", label


def b_cls_odd_one_out(rng: random.Random, A: Assets) -> Built:
    name, g = _group(rng, A)
    label, other = rng.sample(g["labels"], 2)
    items = rng.sample(g["items"][label], 3) + [rng.choice(g["items"][other])]
    odd = items[-1]
    rng.shuffle(items)
    suffix = " instrument" if name == "instrument_family" else ""
    return {"label": f"{label}{suffix}", "items": ", ".join(items)}, "", odd


def b_cls_sentiment(rng: random.Random, A: Assets) -> Built:
    positive = rng.random() < 0.5
    adjs = rng.sample(A.lex["positive_adjectives" if positive else "negative_adjectives"], 2)
    product = rng.choice(A.lex["review_products"])
    verdict = rng.choice(("I would buy it again.", "I recommend it to everyone.") if positive
                         else ("I am returning it.", "I would not recommend it."))
    text = f"This {product} is {adjs[0]} and {adjs[1]}. {verdict}"
    return {}, text, "positive" if positive else "negative"


def b_cls_parity(rng: random.Random, A: Assets) -> Built:
    nums = _distinct(rng, lambda: rng.randint(1, 199), rng.randint(3, 7))
    return ({"nums": ", ".join(map(str, nums))}, "",
            "\n".join(f"{n}: {'even' if n % 2 == 0 else 'odd'}" for n in nums))


def b_cls_country_city(rng: random.Random, A: Assets) -> Built:
    countries = rng.sample(A.facts["countries"], rng.randint(3, 6))
    items = [(c["capital"], "city") if rng.random() < 0.5 else (c["name"], "country") for c in countries]
    items = [(cap(i) if lab == "country" and i.startswith("the ") else i, lab) for i, lab in items]
    return {"items": "; ".join(i for i, _ in items)}, "", "\n".join(f"{i}: {lab}" for i, lab in items)


# --------------------------------------------------------------------------- open_qa / general_qa


def _country(rng: random.Random, A: Assets) -> dict:
    c = dict(rng.choice(A.facts["countries"]))
    c["Name"] = cap(c["name"])
    return c


def b_open_capital(rng, A) -> Built:
    c = _country(rng, A)
    return {"country": c["name"], "Country": c["Name"]}, "", c["capital"]


def b_open_currency(rng, A) -> Built:
    c = _country(rng, A)
    return {"country": c["name"], "Country": c["Name"]}, "", c["currency"]


def b_open_continent(rng, A) -> Built:
    c = _country(rng, A)
    return {"country": c["name"], "Country": c["Name"]}, "", c["continent"]


def b_open_symbol(rng, A) -> Built:
    e = rng.choice(A.facts["elements"])
    return {"element": e["name"].lower()}, "", e["symbol"]


def b_open_element_of_symbol(rng, A) -> Built:
    e = rng.choice(A.facts["elements"])
    return {"symbol": e["symbol"]}, "", e["name"]


def b_open_atomic_number(rng, A) -> Built:
    e = rng.choice(A.facts["elements"])
    return {"element": e["name"].lower()}, "", str(e["number"])


def b_open_planet(rng, A) -> Built:
    p = rng.choice(A.facts["planets"])
    return {"ordinal": ORDINALS[p["order"] - 1]}, "", p["name"]


def b_open_author(rng, A) -> Built:
    b = rng.choice(A.facts["books"])
    return {"title": b["title"]}, "", b["author"]


def b_open_book_year(rng, A) -> Built:
    b = rng.choice(A.facts["books"])
    return {"title": b["title"]}, "", str(b["year"])


def describe_country(c: dict) -> str:
    return (f"{cap(c['name'])} is a country in {c['continent']}. Its capital is {c['capital']} "
            f"and its currency is the {c['currency']}.")


def b_gen_country(rng, A) -> Built:
    c = _country(rng, A)
    return {"country": c["name"]}, "", describe_country(c)


def b_gen_countries(rng, A) -> Built:
    """Two to four country descriptions in the order asked (long: 36-72 words)."""
    countries = rng.sample(A.facts["countries"], rng.randint(2, 4))
    return ({"countries": join_and([c["name"] for c in countries])}, "",
            " ".join(describe_country(c) for c in countries))


def b_gen_country_bullets(rng, A) -> Built:
    c = _country(rng, A)
    return ({"country": c["name"]}, "",
            f"- It is in {c['continent']}.\n- Its capital is {c['capital']}.\n"
            f"- Its currency is the {c['currency']}.")


def b_gen_element(rng, A) -> Built:
    e = rng.choice(A.facts["elements"])
    return ({"element": e["name"].lower()}, "",
            f"{e['name']} is a chemical element with the symbol {e['symbol']} and atomic number "
            f"{e['number']}. It is {with_article(e['kind'])}.")


def b_gen_book(rng, A) -> Built:
    b = rng.choice(A.facts["books"])
    return {"title": b["title"]}, "", f"{b['title']} is a novel by {b['author']}, first published in {b['year']}."


def b_gen_planet(rng, A) -> Built:
    p = rng.choice(A.facts["planets"])
    return ({"planet": p["name"]}, "",
            f"{p['name']} is the {ORDINALS[p['order'] - 1]} planet from the Sun. It is {with_article(p['kind'])}.")


# --------------------------------------------------------------------------- brainstorming (ordered lists)


def b_list_number_words(rng, A) -> Built:
    a = rng.randint(1, 80)
    b = a + rng.randint(4, 40)
    return {"a": a, "b": b}, "", ", ".join(number_words(n) for n in range(a, b + 1))


def b_list_multiples(rng, A) -> Built:
    n, k = rng.randint(5, 15), rng.randint(2, 30)
    return {"n": n, "k": k}, "", ", ".join(str(k * i) for i in range(1, n + 1))


def b_list_times_table(rng, A) -> Built:
    k, n = rng.randint(2, 25), rng.randint(5, 15)
    return {"k": k, "n": n}, "", "\n".join(f"{i} x {k} = {i * k}" for i in range(1, n + 1))


def b_list_months(rng, A) -> Built:
    months = A.lex["months"]
    start, n = rng.randrange(12), rng.randint(2, 11)
    return ({"month": months[start], "n": n}, "",
            ", ".join(months[(start + i) % 12] for i in range(1, n + 1)))


def b_list_days(rng, A) -> Built:
    days = A.lex["weekdays"]
    start, n = rng.randrange(7), rng.randint(2, 6)
    return {"day": days[start], "n": n}, "", ", ".join(days[(start + i) % 7] for i in range(1, n + 1))


def b_list_elements(rng, A) -> Built:
    contiguous = [e for e in A.facts["elements"] if e["number"] <= 36]
    a = rng.randint(1, 30)
    b = min(36, a + rng.randint(2, 11))
    chosen = [e for e in contiguous if a <= e["number"] <= b]
    return {"a": a, "b": b}, "", ", ".join(f"{e['name']} ({e['symbol']})" for e in chosen)


def b_list_capitals(rng, A) -> Built:
    countries = rng.sample(A.facts["countries"], rng.randint(3, 8))
    return ({"countries": join_and([c["name"] for c in countries])}, "",
            "\n".join(f"{cap(c['name'])}: {c['capital']}" for c in countries))


def b_list_letters(rng, A) -> Built:
    a = rng.randint(0, 20)
    b = rng.randint(a + 3, 25)
    letters = [chr(ord("A") + i) for i in range(a, b + 1)]
    return {"l1": letters[0], "l2": letters[-1]}, "", ", ".join(letters)


def b_list_countdown(rng, A) -> Built:
    a = rng.randint(0, 80)
    b = a + rng.randint(5, 25)
    return {"a": a, "b": b}, "", ", ".join(str(n) for n in range(b, a - 1, -1))


def b_list_evens(rng, A) -> Built:
    a = rng.randint(1, 80)
    b = a + rng.randint(8, 40)
    return {"a": a, "b": b}, "", ", ".join(str(n) for n in range(a, b + 1) if n % 2 == 0)


# --------------------------------------------------------------------------- arithmetic


def b_arith_binary(rng, A) -> Built:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 20)
    else:
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        if op == "-" and b > a:
            a, b = b, a
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    return {"expr": f"{a} {op} {b}", "words": f"{a} {word} {b}"}, "", str(result)


def _story_fields(rng, A) -> dict:
    (name, first, gender), = _people(rng, A, 1)
    items, gain, loss = rng.choice(A.lex["word_problem_items"])
    return {"name": name, "first": first, "items": items, "gain": gain, "loss": loss,
            "pron": "she" if gender == "f" else "he"}


def b_arith_story(rng, A) -> Built:
    f = _story_fields(rng, A)
    a, b = rng.randint(5, 90), rng.randint(2, 60)
    if rng.random() < 0.5:
        text = "{name} has {a} {items} and {gain} {b} more. How many {items} does {first} have now?"
        result = a + b
    else:
        a, b = max(a, b) + 1, min(a, b)
        text = "{name} has {a} {items} and {loss} {b} of them. How many {items} does {first} have left?"
        result = a - b
    return {"story": text.format(a=a, b=b, **f)}, "", str(result)


def b_arith_two_step(rng, A) -> Built:
    f = _story_fields(rng, A)
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    c = rng.randint(1, a + b - 1)
    story = (f"{f['name']} started with {a} {f['items']}. Then {f['pron']} {f['gain']} {b} more "
             f"and {f['loss']} {c}. How many {f['items']} does {f['first']} have in the end?")
    return {"story": story}, "", str(a + b - c)


def _numbers(rng) -> list[int]:
    return _distinct(rng, lambda: rng.randint(1, 999), rng.randint(3, 8))


def b_arith_sort(rng, A) -> Built:
    nums = _numbers(rng)
    desc = rng.random() < 0.5
    return ({"nums": ", ".join(map(str, nums)), "order": "largest to smallest" if desc else "smallest to largest",
             "dir": "descending" if desc else "ascending"},
            "", ", ".join(map(str, sorted(nums, reverse=desc))))


def b_arith_extreme(rng, A) -> Built:
    nums = _numbers(rng)
    big = rng.random() < 0.5
    return ({"nums": ", ".join(map(str, nums)), "which": "largest" if big else "smallest"}, "",
            str(max(nums) if big else min(nums)))


def b_arith_steps(rng, A) -> Built:
    """Running sum written out step by step (long: up to ~40 words)."""
    nums = [rng.randint(1, 99) for _ in range(rng.randint(3, 12))]
    steps, total = [], nums[0]
    for n in nums[1:]:
        steps.append(f"{total} + {n} = {total + n}.")
        total += n
    return {"nums": ", ".join(map(str, nums))}, "", " ".join(steps) + f" The total is {total}."


def b_arith_average(rng, A) -> Built:
    n = rng.randint(2, 6)
    nums = [rng.randint(1, 99) for _ in range(n - 1)]
    last = rng.randint(1, 99)
    while (sum(nums) + last) % n:
        last += 1
    nums.append(last)
    return {"nums": ", ".join(map(str, nums))}, "", str(sum(nums) // n)


# --------------------------------------------------------------------------- string manipulation


def _word(rng, A) -> str:
    return rng.choice(A.lex["words"])


def _text(rng, A) -> str:
    if rng.random() < 0.4:
        return rng.choice(A.lex["phrases"])
    return " ".join(rng.sample(A.lex["words"], rng.randint(3, 7)))


def b_str_reverse(rng, A) -> Built:
    w = _word(rng, A)
    return {"word": w}, "", w[::-1]


def b_str_length(rng, A) -> Built:
    w = _word(rng, A)
    return {"word": w}, "", str(len(w))


def b_str_count_letter(rng, A) -> Built:
    w = _word(rng, A)
    letter = rng.choice(w) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return {"word": w, "letter": letter}, "", str(w.count(letter))


def b_str_upper(rng, A) -> Built:
    t = _text(rng, A)
    return {}, t, t.upper()


def b_str_sort_words(rng, A) -> Built:
    words = rng.sample(A.lex["words"], rng.randint(3, 8))
    return {"words": ", ".join(words)}, "", ", ".join(sorted(words))


def b_str_acronym(rng, A) -> Built:
    t = _text(rng, A)
    return {}, t, "".join(w[0] for w in t.split()).upper()


def b_str_title(rng, A) -> Built:
    t = _text(rng, A)
    return {}, t, " ".join(cap(w) for w in t.split())


def b_str_hyphens(rng, A) -> Built:
    w = _word(rng, A)
    return {"word": w}, "", "-".join(w)


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    """One instruction phrasing of one family; ``heldout`` ones never reach train/valid/test."""

    name: str
    category: str
    family: str
    phrasing: str
    builder: Builder
    heldout: bool

    def build(self, rng: random.Random, A: Assets) -> tuple[str, str, str]:
        fields, context, response = self.builder(rng, A)
        return self.phrasing.format(**fields), context, response


# category, family, builder, in-distribution phrasings, held-out phrasings.
# A family with no in-distribution phrasing is held out as a whole (a new task format).
FAMILIES: tuple[tuple[str, str, Builder, tuple[str, ...], tuple[str, ...]], ...] = (
    ("closed_qa", "span", b_closed_span,
     ("{question}", "Based on the passage, {q}", "Read the text and answer the question: {question}",
      "Using only the reference text, answer this: {question}"),
     ("Given this paragraph, {q} Reply with just the answer.",)),
    ("closed_qa", "sentence", b_closed_sentence,
     ("Answer with the full sentence from the passage that contains the answer: {question}",
      "Quote the sentence of the text that answers this question: {question}"),
     ("Which sentence in the passage answers the question \"{question}\"? Copy it exactly.",)),
    ("closed_qa", "yesno", b_closed_yesno,
     ("According to the passage, is it true that {claim}? Answer yes or no.",
      "Based on the text, is it correct that {claim}? Reply with yes or no."),
     ("Does the passage support the statement that {claim}? Answer yes or no.",)),
    ("closed_qa", "true_false", b_closed_truefalse, (),
     ("True or false, according to the text: {claim}.",)),
    ("closed_qa", "who", b_closed_who, (),
     ("Read the two short biographies and answer: {question}",)),

    ("information_extraction", "fields", b_extract_fields,
     ("Extract the following details from the text: {labels}. Write each on its own line as 'Label: value'.",
      "From the passage, pull out the {labels}. Put each on a separate line in the form 'Label: value'."),
     ("List the {labels} given in this text, one per line, formatted as 'Label: value'.",)),
    ("information_extraction", "json", b_extract_json, (),
     ("Return the {labels} mentioned in the text as a JSON object.",)),
    ("information_extraction", "years", b_extract_years,
     ("List all the years mentioned in the passage, in the order they appear, separated by commas.",
      "Extract every year from the text in order of appearance, comma-separated."),
     ("Which years appear in this text? Give them in order, separated by commas.",)),
    ("information_extraction", "names", b_extract_names,
     ("List the names of all the people mentioned in the text, in order of appearance, separated by commas.",
      "Extract the full names of the people in this passage, in the order they appear, separated by commas."),
     ("Who is mentioned in the text? Give every full name in order, separated by commas.",)),
    ("information_extraction", "timeline", b_extract_timeline,
     ("Create a timeline of {name}'s life from the passage: one line per event, in chronological order, formatted as 'YEAR: event'.",
      "Using the text, list the events of {name}'s life in chronological order, one per line as 'YEAR: event'."),
     ("Put the events of {name}'s life described in the text in order, earliest first, as lines of the form 'YEAR: event'.",)),
    ("information_extraction", "directory", b_extract_directory,
     ("List each person in the text with their {attr}, one per line, in the form '{form}'.",
      "For every person mentioned, write their name and {attr} as '{form}', one per line, in the order they appear."),
     ("Go through the text and give each person's {attr} ('{form}', one line each, same order as the text).",)),
    ("information_extraction", "contact", b_extract_contact,
     ("Answer from the contact list: {question}", "Using the text below, answer: {question}"),
     ("Look up the answer in these contact details. {question}",)),

    ("summarization", "bio", b_sum_bio,
     ("Summarize the passage in one sentence.", "Write a one-sentence summary of this biography.",
      "Give me a single-sentence summary of the text below."),
     ("In one sentence, who is this text about and what did they do?",)),
    ("summarization", "news", b_sum_news,
     ("Summarize this news report in one sentence.", "Write a one-sentence summary of the article."),
     ("What is the key point of this news story? Answer in one sentence.",)),
    ("summarization", "headline", b_sum_headline, (),
     ("Write a short headline for this news story.",)),
    ("summarization", "decisions", b_sum_decisions,
     ("Summarize the decisions made in these meeting notes as a bulleted list.",
      "What was decided in this meeting? List each decision as a bullet point."),
     ("Give me only the action items from these notes, one bullet per item.",)),
    ("summarization", "bullets", b_sum_bullets,
     ("Rewrite the passage as a bulleted list with one sentence per bullet.",
      "Turn this text into bullet points, one for each sentence."),
     ("Break the text into a list of bullet points, keeping each sentence as it is.",)),
    ("summarization", "review", b_sum_review,
     ("Summarize the pros and cons mentioned in this review of a {product}.",
      "List the pros and cons from this {product} review."),
     ("What does the reviewer like and dislike about the {product}? Summarize as pros and cons.",)),

    ("classification", "multi", b_cls_multi,
     ("Classify each of the following {noun} as {labels}: {items}",
      "Tell me whether each of these {noun} is {labels}: {items}"),
     ("For each of these {noun}, say if it is {labels}: {items}",)),
    ("classification", "grouped", b_cls_grouped, (),
     ("Sort the following {noun} into groups ({labels}): {items}",)),
    ("classification", "single", b_cls_single,
     ("Is {a_item} {options}?", "Would you classify {a_item} as {options}?"),
     ("Which is {a_item}: {options}?",)),
    ("classification", "odd_one_out", b_cls_odd_one_out, (),
     ("Which one of these is not a {label}: {items}?",)),
    ("classification", "sentiment", b_cls_sentiment,
     ("Is the sentiment of this review positive or negative?",
      "Classify the following review as positive or negative."),
     ("Does the customer like the product? Answer positive or negative.",)),
    ("classification", "parity", b_cls_parity,
     ("Classify each number as even or odd: {nums}", "Tell me which of these numbers are even and which are odd: {nums}"),
     ("Label every number in this list as even or odd: {nums}",)),
    ("classification", "country_city", b_cls_country_city,
     ("Classify each of the following as a country or a city: {items}",
      "Which of these are countries and which are cities? {items}"),
     ("Tell me if each name is a country or a city: {items}",)),

    ("open_qa", "capital", b_open_capital,
     ("What is the capital of {country}?", "Name the capital city of {country}.",
      "Which city is the capital of {country}?"),
     ("{Country} has its capital in which city?",)),
    ("open_qa", "currency", b_open_currency,
     ("What is the currency of {country}?", "Which currency is used in {country}?"),
     ("Name the official currency of {country}.",)),
    ("open_qa", "continent", b_open_continent,
     ("On which continent is {country}?", "Which continent is {country} in?"),
     ("{Country} is located on which continent?",)),
    ("open_qa", "symbol", b_open_symbol,
     ("What is the chemical symbol for {element}?", "What is the symbol of the element {element}?"),
     ("Give the chemical symbol of {element}.",)),
    ("open_qa", "element_of_symbol", b_open_element_of_symbol,
     ("Which element has the chemical symbol {symbol}?", "What element does the symbol {symbol} stand for?"),
     ("Name the element whose symbol is {symbol}.",)),
    ("open_qa", "atomic_number", b_open_atomic_number,
     ("What is the atomic number of {element}?", "How many protons does an atom of {element} have?"),
     ("State the atomic number of {element}.",)),
    ("open_qa", "planet", b_open_planet,
     ("Which planet is {ordinal} from the Sun?", "What is the {ordinal} planet from the Sun?"),
     ("Name the {ordinal} planet of the solar system, counting outward from the Sun.",)),
    ("open_qa", "author", b_open_author,
     ("Who wrote {title}?", "Who is the author of {title}?", "Name the author of the novel {title}."),
     ("{title} was written by whom?",)),
    ("open_qa", "book_year", b_open_book_year,
     ("In what year was {title} first published?", "When was {title} first published?"),
     ("What year did {title} first come out?",)),

    ("general_qa", "country", b_gen_country,
     ("Tell me about {country}.", "Give me a short description of {country}."),
     ("What should I know about {country}? Two sentences, please.",)),
    ("general_qa", "countries", b_gen_countries,
     ("Tell me about {countries}.", "Give me a short description of each of these countries: {countries}."),
     ("Describe {countries}, in that order.",)),
    ("general_qa", "country_bullets", b_gen_country_bullets, (),
     ("Give me three facts about {country} as a bulleted list.",)),
    ("general_qa", "element", b_gen_element,
     ("Tell me about the element {element}.", "Give me a short description of the chemical element {element}."),
     ("What is {element}?",)),
    ("general_qa", "book", b_gen_book,
     ("Tell me about the book {title}.", "What is {title}?"),
     ("Give me one sentence about the novel {title}.",)),
    ("general_qa", "planet", b_gen_planet,
     ("Tell me about the planet {planet}.", "Give me a short description of {planet}."),
     ("What kind of planet is {planet}, and where is it?",)),

    ("brainstorming", "number_words", b_list_number_words,
     ("Write out the numbers from {a} to {b} in words, separated by commas.",
      "List the numbers {a} to {b} spelled out in English, separated by commas."),
     ("Spell out every number between {a} and {b} (inclusive) in English words, separated by commas.",)),
    ("brainstorming", "multiples", b_list_multiples,
     ("List the first {n} multiples of {k}.", "Give me the first {n} multiples of {k}, separated by commas."),
     ("What are the first {n} multiples of {k}?",)),
    ("brainstorming", "times_table", b_list_times_table,
     ("Write the multiplication table of {k} from 1 to {n}.", "Give me the {k} times table up to {n} x {k}."),
     ("Show me {k} multiplied by each number from 1 to {n}, one line each.",)),
    ("brainstorming", "months", b_list_months,
     ("List the {n} months that come after {month}.", "Name the next {n} months after {month}."),
     ("Which {n} months follow {month}? List them in order.",)),
    ("brainstorming", "days", b_list_days,
     ("List the {n} days of the week that come after {day}.", "Name the next {n} days after {day}."),
     ("Which {n} days follow {day}? List them in order.",)),
    ("brainstorming", "elements", b_list_elements,
     ("List the chemical elements with atomic numbers {a} to {b}, with their symbols.",
      "Name the elements from atomic number {a} to {b} and give each symbol in parentheses."),
     ("Which elements have atomic numbers between {a} and {b}? Give each with its symbol.",)),
    ("brainstorming", "capitals", b_list_capitals,
     ("Name the capitals of {countries}.", "List the capital cities of {countries}, one per line."),
     ("What are the capitals of {countries}? One line per country.",)),
    ("brainstorming", "letters", b_list_letters,
     ("List the letters of the alphabet from {l1} to {l2}.", "Write the letters from {l1} to {l2}, separated by commas."),
     ("Which letters come from {l1} through {l2}?",)),
    ("brainstorming", "countdown", b_list_countdown, (),
     ("Count down from {b} to {a}, separated by commas.",)),
    ("brainstorming", "evens", b_list_evens, (),
     ("List the even numbers between {a} and {b}.",)),

    ("arithmetic", "binary", b_arith_binary,
     ("What is {expr}?", "Compute {expr}.", "Calculate {words}."),
     ("Work out {words} and give only the result.",)),
    ("arithmetic", "story", b_arith_story,
     ("{story}", "Solve this word problem: {story}"),
     ("Answer with a number only. {story}",)),
    ("arithmetic", "two_step", b_arith_two_step, (), ("{story}",)),
    ("arithmetic", "sort", b_arith_sort,
     ("Sort these numbers from {order}: {nums}", "Arrange the following numbers in {dir} order: {nums}"),
     ("Put these numbers in {dir} order, separated by commas: {nums}",)),
    ("arithmetic", "extreme", b_arith_extreme,
     ("What is the {which} number in this list: {nums}?", "Which is the {which} of these numbers: {nums}?"),
     ("Find the {which} value among {nums}.",)),
    ("arithmetic", "steps", b_arith_steps,
     ("Add up these numbers step by step: {nums}", "Show your work as you add these numbers one at a time: {nums}"),
     ("Sum {nums}, writing each partial sum.",)),
    ("arithmetic", "average", b_arith_average, (),
     ("What is the average of {nums}?",)),

    ("string_manipulation", "reverse", b_str_reverse,
     ("Reverse the letters of the word '{word}'.", "Write the word '{word}' backwards."),
     ("Spell '{word}' in reverse order.",)),
    ("string_manipulation", "length", b_str_length,
     ("How many letters are in the word '{word}'?", "Count the letters in '{word}'."),
     ("What is the length of the word '{word}'?",)),
    ("string_manipulation", "count_letter", b_str_count_letter,
     ("How many times does the letter '{letter}' appear in '{word}'?",
      "Count how often '{letter}' occurs in the word '{word}'."),
     ("In '{word}', how many '{letter}'s are there?",)),
    ("string_manipulation", "upper", b_str_upper,
     ("Convert the following text to uppercase.", "Rewrite the text in capital letters."),
     ("Change every letter of the text to upper case.",)),
    ("string_manipulation", "sort_words", b_str_sort_words,
     ("Sort these words in alphabetical order: {words}", "Put the following words in alphabetical order: {words}"),
     ("Alphabetize this list: {words}",)),
    ("string_manipulation", "acronym", b_str_acronym,
     ("Form an acronym from the first letters of the words in the text.",
      "Write the first letter of each word of the text in capitals, with no spaces."),
     ("Make an uppercase abbreviation from the initial letters of these words.",)),
    ("string_manipulation", "title_case", b_str_title, (),
     ("Capitalize the first letter of every word in the text.",)),
    ("string_manipulation", "hyphens", b_str_hyphens, (),
     ("Spell the word '{word}' with hyphens between the letters.",)),
)


@functools.lru_cache(maxsize=1)
def templates() -> tuple[Template, ...]:
    """All templates, named ``category.family.k`` (k counts in-distribution phrasings first)."""
    out = []
    for category, family, builder, seen, held in FAMILIES:
        for k, phrasing in enumerate(seen + held):
            out.append(Template(f"{category}.{family}.{k}", category, family, phrasing, builder,
                                heldout=k >= len(seen)))
    return tuple(out)


def heldout_template_names() -> list[str]:
    return [t.name for t in templates() if t.heldout]


def _by_category_family(heldout: bool) -> dict[str, dict[str, list[Template]]]:
    grouped: dict[str, dict[str, list[Template]]] = {c: {} for c in CATEGORIES}
    for t in templates():
        if t.heldout == heldout:
            grouped[t.category].setdefault(t.family, []).append(t)
    return grouped


# --------------------------------------------------------------------------- generation


def _draw(rng: random.Random, pool: dict[str, dict[str, list[Template]]]) -> Template:
    """Category by weight, then family (``FAMILY_WEIGHTS``, default 1), then phrasing uniformly."""
    cats = list(CATEGORY_WEIGHTS)
    category = rng.choices(cats, weights=[CATEGORY_WEIGHTS[c] for c in cats])[0]
    families = list(pool[category])
    weights = [FAMILY_WEIGHTS.get(f"{category}.{f}", 1.0) for f in families]
    family = rng.choices(families, weights=weights)[0]
    return rng.choice(pool[category][family])


def _generate_split(split: str, n: int, seed: int, seen: set[tuple[str, str]],
                    A: Assets) -> list[dict]:
    rng = random.Random(f"dpkd-synthetic:{seed}:{split}")
    pool = _by_category_family(heldout=(split == "heldout"))
    records: list[dict] = []
    misses = 0
    while len(records) < n:
        template = _draw(rng, pool)
        instruction, context, response = template.build(rng, A)
        key = (instruction, context)
        if key in seen:  # keep every (instruction, context) unique across all splits
            misses += 1
            if misses > 50 * n + 1000:
                raise RuntimeError(f"synthetic split {split!r}: cannot draw {n} unique records")
            continue
        seen.add(key)
        records.append({
            "id": f"syn{seed}-{split}-{len(records):05d}",
            "instruction": instruction,
            "context": context,
            "response": response,
            "category": template.category,
            "template": template.name,
        })
    return records


def generate_synthetic(n_train: int = 2000, n_valid: int = 200, n_test: int = 300,
                       n_heldout: int = 300, seed: int = 0) -> dict[str, list[dict]]:
    """The synthetic Dolly-format set: {"train", "valid", "test", "heldout"} -> records.

    Records: {"id", "instruction", "context", "response", "category", "template"}.
    train/valid/test use in-distribution templates; heldout uses only templates that never
    appear in the other three. Same arguments -> identical output, in any process.
    """
    sizes = {"heldout": n_heldout, "test": n_test, "valid": n_valid, "train": n_train}
    for name, size in sizes.items():
        if size < 0:
            raise ValueError(f"n_{name} must be >= 0, got {size}")
    A = load_assets()
    seen: set[tuple[str, str]] = set()
    # Eval splits first: train skips their pairs, and n_train cannot change them.
    out = {split: _generate_split(split, sizes[split], seed, seen, A)
           for split in ("heldout", "test", "valid", "train")}
    return {split: out[split] for split in SPLITS}
