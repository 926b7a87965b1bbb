"""Dataset specs -> `Example`s with domain labels.

A spec is a local file (.jsonl/.json/.txt/.parquet/.csv), a directory written by `datasets`
(`save_to_disk`) or holding data files, a Hugging Face hub id (optionally `ID:split`), or
`embedded:NAME`. The schema is detected from the record fields, so users never have to say
which dataset they are pointing at.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sts.data import embedded
from sts.errors import UserError, warn

LETTERS = "ABCDEFGHIJKLMNOP"

# Fields that identify each known schema, checked in this order (most specific first).
SCHEMAS: dict[str, tuple[str, ...]] = {
    "mmlu_pro": ("question", "options", "answer", "category"),
    "mmlu": ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic"),
    "limo": ("question", "solution", "answer"),
    "math": ("problem", "solution"),
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "text": ("text",),
}

# MMLU subject -> MMLU-Pro category, from MMLU-Pro's `src` field (see shared/DESIGN.md).
_CATEGORY_SUBJECTS: dict[str, tuple[str, ...]] = {
    "business": ("business_ethics", "marketing", "management"),
    "law": ("professional_law", "jurisprudence", "international_law"),
    "psychology": ("professional_psychology", "high_school_psychology"),
    "biology": ("high_school_biology", "college_biology"),
    "chemistry": ("high_school_chemistry", "college_chemistry"),
    "history": ("prehistory", "high_school_us_history", "high_school_european_history",
                "high_school_world_history"),
    "other": ("us_foreign_policy", "public_relations", "high_school_government_and_politics",
              "security_studies", "sociology", "human_sexuality", "global_facts",
              "miscellaneous", "professional_accounting", "high_school_geography"),
    "health": ("virology", "college_medicine", "clinical_knowledge", "human_aging",
               "medical_genetics", "anatomy", "professional_medicine", "nutrition"),
    "economics": ("high_school_macroeconomics", "high_school_microeconomics", "econometrics"),
    "math": ("abstract_algebra", "high_school_statistics", "elementary_mathematics",
             "college_mathematics", "high_school_mathematics"),
    "physics": ("astronomy", "college_physics", "high_school_physics", "conceptual_physics"),
    "computer science": ("high_school_computer_science", "college_computer_science",
                         "machine_learning", "computer_security"),
    # moral_scenarios is not in MMLU-Pro; philosophy is its nearest category.
    "philosophy": ("formal_logic", "moral_disputes", "world_religions", "logical_fallacies",
                   "philosophy", "moral_scenarios"),
    "engineering": ("electrical_engineering",),
}
MMLU_TO_CATEGORY: dict[str, str] = {
    subject: category for category, subjects in _CATEGORY_SUBJECTS.items() for subject in subjects
}


@dataclass(frozen=True)
class Example:
    """One record, normalised: a prompt (user turn), an optional response (what SFT trains
    on), a domain label, and for multiple-choice records the options and the correct letter."""

    prompt: str
    response: str | None
    domain: str | None
    uid: str
    history: tuple[tuple[str, str], ...] = ()  # earlier (role, content) chat turns
    choices: tuple[str, ...] = ()
    answer: str | None = None
    cot: str | None = None  # a reference chain of thought (MMLU-Pro's cot_content), if any


@dataclass(frozen=True)
class Seal:
    """What stands in for a record whose text does not ship: the embedded reference domains
    (`embedded:mmlu-pro-cot`) ship their statistics (gradient sides, SAE readouts) keyed by these
    digests, never the records; `scripts/ship_domain_stats.py` writes both from the real records."""

    record: str  # sha256 of the record (`record_digest` of the Example it was sealed from)
    stem: str  # sha256 of its normalised question stem: decontamination against a training set
    tokens: int  # its tokens under the embedded model's tokenizer (question and reference): the plan line's


@dataclass(frozen=True)
class SealedExample(Example):
    """A record known only by its seal: anything that must read its text refuses (`unsealed`)."""

    seal: Seal = field(kw_only=True)


def record_digest(e: Example) -> str:
    """sha256 of a record as the cache keys read it (every field)."""
    import hashlib

    return hashlib.sha256(json.dumps(asdict(e), sort_keys=True).encode()).hexdigest()


def stem_digest(e: Example) -> str:
    import hashlib

    return hashlib.sha256(normalised(question_stem(e)).encode()).hexdigest()


def seal(e: Example, tokens: int) -> SealedExample:
    """`e` without its text: its id, its domain and its seal."""
    return SealedExample("", None, e.domain, e.uid, seal=Seal(record_digest(e), stem_digest(e), tokens))


def has_reference(e: Example) -> bool:
    """Whether a record holds a reference chain of thought (a sealed embedded record always does)."""
    return bool(e.cot) or isinstance(e, SealedExample)


def unsealed(examples: Iterable[Example], what: str) -> None:
    """Refuse, in one line, to compute `what` on records whose text did not ship."""
    if any(isinstance(e, SealedExample) for e in examples):
        raise UserError(f"{what} needs the records' text, and {embedded.REFERENCE_DOMAINS} ships only their "
                        "statistics for the embedded model, SAE and LoRA recipe: give --domains a file of "
                        "MMLU-Pro records with cot_content (its chain-of-thought layout)")


def sealed_dataset() -> Dataset:
    """The embedded reference domains: MMLU-Pro's 14 categories, each known by its probe records'
    seals (`embedded.references_manifest`); their statistics ship in the package's cache."""
    manifest = json.loads(embedded.references_manifest().read_text())
    examples: list[Example] = [
        SealedExample("", None, r["domain"], r["uid"], seal=Seal(r["record"], r["stem"], r["tokens"]))
        for r in manifest["records"]]
    return Dataset(embedded.REFERENCE_DOMAINS, "sealed", examples)


@dataclass
class Dataset:
    spec: str
    schema: str
    examples: list[Example]
    skipped: int = 0
    fields: tuple[str, ...] = field(default_factory=tuple)

    def domains(self) -> list[str]:
        """Domain labels in first-seen order."""
        return list(dict.fromkeys(e.domain for e in self.examples if e.domain is not None))

    def by_domain(self) -> dict[str, list[Example]]:
        out: dict[str, list[Example]] = {}
        for e in self.examples:
            out.setdefault(e.domain or "all", []).append(e)
        return out


# --- raw records -----------------------------------------------------------------------

def _read_jsonl(path: Path, skip_bad_lines: bool) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if not skip_bad_lines:
                    raise UserError(
                        f"{path}: line {lineno} is not a valid JSON object ({exc}); fix it, "
                        "or pass --skip-bad-lines to skip malformed lines with a warning"
                    ) from None
                bad.append(lineno)
                continue
            records.append(record)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        warn(f"{path}: skipped {len(bad)} malformed line(s): {shown}")
    return records


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); for one record per line use .jsonl") from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}: take the first list
        lists = [v for v in data.values() if isinstance(v, list)]
        if not lists:
            raise UserError(f"{path}: expected a JSON list of records or an object holding one")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a JSON list of objects (records)")
    return data


def _read_txt(path: Path, chunk_chars: int = 4000) -> list[dict[str, Any]]:
    """Plain text -> `text` records of whole lines, about chunk_chars characters each."""
    records: list[dict[str, Any]] = []
    lines: list[str] = []
    size = 0
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            lines.append(line)
            size += len(line)
            if size >= chunk_chars:
                records.append({"text": "".join(lines).strip()})
                lines, size = [], 0
    if "".join(lines).strip():
        records.append({"text": "".join(lines).strip()})
    return [r for r in records if r["text"]]


def _records_from_hf(ds: Any, spec: str, split: str | None) -> list[dict[str, Any]]:
    """A `datasets` Dataset or DatasetDict -> plain records (split: asked, else test, else train)."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split is None:
            split = next((s for s in ("test", "train") if s in ds), names[0])
        if split not in ds:
            raise UserError(f"{spec}: no split {split!r}; splits are {', '.join(names)}")
        ds = ds[split]
    return [dict(r) for r in ds]


def _embedded_records(name: str) -> list[dict[str, Any]]:
    """Raw records of an embedded dataset: MMLU's JSONL as is; CHAMP's problems as MATH-style
    records (the problem, its solution steps joined into one worked solution, its category)."""
    path = embedded.dataset_file(name)
    if name == "mmlu":
        return _read_jsonl(path, skip_bad_lines=False)
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    return [{"problem": p["_text"], "solution": "\n".join(s["_text"] for s in p["solution"]["steps"]),
             "subject": p.get("category"), "id": key}
            for key, p in problems.items()]


def read_records(spec: str, skip_bad_lines: bool = False) -> list[dict[str, Any]]:
    """Load the raw records a spec points at."""
    if spec.startswith("embedded:"):
        return _embedded_records(spec.removeprefix("embedded:"))
    path = Path(spec)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path, skip_bad_lines)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".txt":
            return _read_txt(path)
        if suffix in (".parquet", ".csv"):
            import datasets

            return _records_from_hf(
                datasets.load_dataset(suffix[1:], data_files=str(path), split="train"), spec, None
            )
        raise UserError(f"{spec}: unsupported file type {suffix!r}; use .jsonl, .json, .txt, .parquet or .csv")
    if path.is_dir():
        import datasets

        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _records_from_hf(datasets.load_from_disk(str(path)), spec, None)
        return _records_from_hf(datasets.load_dataset(str(path)), spec, None)
    looks_like_path = spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in (
        ".jsonl", ".json", ".parquet", ".csv")
    if looks_like_path:
        raise UserError(f"dataset not found: {spec} (give an existing file or directory, or a hub id "
                        "such as TIGER-Lab/MMLU-Pro)")
    hub_id, _, split = spec.partition(":")
    try:
        import datasets

        loaded = datasets.load_dataset(hub_id, split=split or None)
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise UserError(f"dataset not found: {spec} is not a local file or directory, and the hub "
                        f"could not load {hub_id!r} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); check the path or id") from None
    return _records_from_hf(loaded, spec, split or None)


# --- schema detection and normalisation ------------------------------------------------

def detect_schema(fields: Iterable[str]) -> str | None:
    present = set(fields)
    for name, required in SCHEMAS.items():
        if present.issuperset(required):
            return name
    return None


def format_choices(question: str, choices: Sequence[str]) -> str:
    """Question followed by lettered options, the layout MMLU-style evaluations use."""
    lines = [question.strip()] + [f"{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(choices)]
    return "\n".join(lines)


def _mc_example(question: str, choices: Sequence[str], letter: str, domain: str | None,
                uid: str, cot: str | None = None) -> Example:
    """A multiple-choice record; its response is the chain of thought where one is given
    (MMLU-Pro's `cot_content`, "A: Let's think step by step. ... The answer is (X)."),
    else the answer itself."""
    idx = LETTERS.index(letter)
    response = f"The answer is ({letter}) {str(choices[idx]).strip()}"
    reference = None
    if cot and str(cot).strip():
        response = reference = str(cot).strip().removeprefix("A:").strip()
    return Example(prompt=format_choices(question, choices), response=response, domain=domain,
                   uid=uid, choices=tuple(str(c) for c in choices), answer=letter, cot=reference)


class _Skip(Exception):
    """A record that is malformed for its schema: reported and skipped."""


def _to_example(schema: str, r: dict[str, Any], uid: str) -> Example:
    if schema == "mmlu_pro":
        options = [o for o in r["options"] if o not in (None, "N/A")]
        letter = str(r["answer"]).strip().upper()
        if letter not in LETTERS[: len(options)]:
            raise _Skip(f"answer {r['answer']!r} is not one of the {len(options)} options")
        return _mc_example(r["question"], options, letter, str(r["category"]),
                           str(r.get("question_id", uid)), r.get("cot_content"))
    if schema == "mmlu":
        options = [r[f"answer_{c}"] for c in "abcd"]
        letter = str(r["correct_answer"]).strip().upper()
        if letter not in "ABCD" or len(letter) != 1:
            raise _Skip(f"correct_answer {r['correct_answer']!r} is not a letter A-D")
        subject = str(r["topic"]).strip().lower().replace(" ", "_")
        return _mc_example(r["question"], options, letter, MMLU_TO_CATEGORY.get(subject, subject), uid)
    if schema == "limo":
        solution = str(r["solution"]).strip()
        answer = str(r["answer"]).strip()
        if answer and answer not in solution[-200:]:
            solution += f"\n\nThe final answer is {answer}."
        return Example(str(r["question"]), solution, r.get("category") or r.get("subject"), uid)
    if schema == "math":
        return Example(str(r["problem"]), str(r["solution"]), r.get("subject") or r.get("type"), uid)
    if schema == "alpaca":
        prompt = str(r["instruction"]).strip()
        if r.get("input"):
            prompt += "\n\n" + str(r["input"]).strip()
        return Example(prompt, str(r["output"]), r.get("category"), uid)
    if schema == "chat":
        msgs = r["messages"]
        if not msgs or not isinstance(msgs, list):
            raise _Skip("empty messages")
        turns = [(str(m["role"]), str(m["content"])) for m in msgs]
        if turns[-1][0] == "assistant":
            *before, (_, response) = turns
        else:
            before, response = turns, None
        if not before:
            raise _Skip("no user turn before the assistant turn")
        *history, (_, prompt) = before
        return Example(prompt, response, r.get("domain") or r.get("category"), uid, tuple(history))
    if schema == "text":
        return Example(str(r["text"]), None, r.get("domain") or r.get("category"), uid)
    raise AssertionError(schema)


def examples_from_records(records: list[dict[str, Any]], spec: str) -> Dataset:
    if not records:
        raise UserError(f"{spec}: no records found; check the file is not empty")
    fields = tuple(records[0].keys())
    schema = detect_schema(fields)
    if schema is None:
        known = "; ".join(f"{n} ({', '.join(f)})" for n, f in SCHEMAS.items())
        raise UserError(f"{spec}: no usable fields; found {', '.join(fields) or 'none'}; "
                        f"known schemas: {known}")
    examples: list[Example] = []
    skipped: list[str] = []
    for i, r in enumerate(records):
        missing = [f for f in SCHEMAS[schema] if f not in r]
        try:
            if missing:
                raise _Skip(f"missing field(s) {', '.join(missing)}")
            examples.append(_to_example(schema, r, uid=str(i)))
        except _Skip as why:
            skipped.append(f"record {i + 1}: {why}")
    if skipped:
        warn(f"{spec}: skipped {len(skipped)} malformed {schema} record(s): "
             + "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
    if not examples:
        raise UserError(f"{spec}: every record was malformed for schema {schema}")
    return Dataset(spec=spec, schema=schema, examples=examples, skipped=len(skipped), fields=fields)


def select(ds: Dataset, max_examples: int | None = None, per_domain: bool = False,
           keep: Callable[[Example], bool] | None = None, spec: str | None = None) -> Dataset:
    """A filtered copy: examples passing `keep`, capped in total or per domain."""
    examples = [e for e in ds.examples if keep is None or keep(e)]
    if max_examples is not None:
        if per_domain:
            counts: dict[str | None, int] = {}
            kept = []
            for e in examples:
                if counts.get(e.domain, 0) < max_examples:
                    counts[e.domain] = counts.get(e.domain, 0) + 1
                    kept.append(e)
            examples = kept
        else:
            examples = examples[:max_examples]
    return Dataset(spec=spec or ds.spec, schema=ds.schema, examples=examples, skipped=ds.skipped,
                   fields=ds.fields)


def split_selector(spec: str) -> tuple[str, set[str] | None, slice | None]:
    """`SPEC#category=a,b` -> (SPEC, {a, b}, None): a dataset restricted to some domains (e.g. one
    category of MMLU-Pro's chain-of-thought file as a training set; `domain=` works too).
    `SPEC#rows=400:500` -> (SPEC, None, records 400 to 499): a slice of the file's records in
    their order (e.g. the part of a file no earlier run trained on)."""
    base, sep, selector = spec.rpartition("#")
    if not sep:
        return spec, None, None
    key, eq, values = selector.partition("=")
    if key == "rows" and eq:
        start, colon, end = values.partition(":")
        if colon and start.strip().isdigit() and end.strip().isdigit() and int(start) < int(end):
            return base, None, slice(int(start), int(end))
        raise UserError(f"{spec}: a row selector reads SPEC#rows=START:END, START < END (got #{selector})")
    if key not in ("category", "domain") or not eq or not values.strip():
        raise UserError(f"{spec}: a selector reads SPEC#category=NAME[,NAME...] or SPEC#rows=START:END "
                        f"(got #{selector})")
    return base, {v.strip() for v in values.split(",") if v.strip()}, None


def load_dataset(spec: str, skip_bad_lines: bool = False, max_examples: int | None = None,
                 per_domain: bool = False,
                 keep: Callable[[Example], bool] | None = None) -> Dataset:
    """Load a dataset spec (optionally `SPEC#category=NAME`). `max_examples` caps the total,
    or each domain if `per_domain`."""
    base, wanted, rows = split_selector(spec)
    ds = sealed_dataset() if base == embedded.REFERENCE_DOMAINS else examples_from_records(
        read_records(base, skip_bad_lines), base)
    ds.spec = spec
    if rows is not None:
        if rows.start >= len(ds.examples):
            raise UserError(f"{spec}: {base} has {len(ds.examples)} records, none from row {rows.start}")
        ds = replace(ds, examples=ds.examples[rows])
    if wanted is not None:
        missing = wanted - set(ds.domains())
        if missing:
            raise UserError(f"{base} has no domain {', '.join(sorted(missing))}; its domains: "
                            f"{', '.join(ds.domains()) or 'none (no domain labels)'}")
        ds = select(ds, keep=lambda e: e.domain in wanted)
    return select(ds, max_examples, per_domain, keep)


@dataclass
class DomainDemos:
    """The demonstrations of each domain for STS_ICL, and where they came from."""

    demos: dict[str, tuple[Example, ...]]
    source: str  # a dataset spec, or "first questions" (each domain's own, left out of scoring)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "per_domain": {d: [e.uid for e in exs] for d, exs in self.demos.items()}}


def domain_demonstrations(groups: dict[str, list[Example]], m: int, spec: str | None = None,
                          skip_bad_lines: bool = False) -> tuple[DomainDemos, dict[str, list[Example]]]:
    """m demonstrations per domain: the first m records of each domain in `spec`, or without
    it each domain's own first m questions (with their answers), which are then left out of
    that domain's questions. Returns the demonstrations and the questions left to score."""
    if m < 1:
        raise UserError(f"--domain-demos-n must be at least 1 (got {m})")
    if spec is None:
        short = [f"{d} ({len(q)})" for d, q in groups.items() if len(q) <= m]
        if short:
            raise UserError(f"domain(s) {', '.join(short)} have no questions left after taking "
                            f"{m} as demonstrations; lower --domain-demos-n or give --domain-demos")
        return (DomainDemos({d: tuple(q[:m]) for d, q in groups.items()}, "first questions"),
                {d: q[m:] for d, q in groups.items()})
    pool = load_dataset(spec, skip_bad_lines).by_domain()
    pool = {d: [e for e in exs if e.response] for d, exs in pool.items()}
    short = [f"{d} ({len(pool.get(d, []))})" for d in groups if len(pool.get(d, [])) < m]
    if short:
        raise UserError(f"{spec} has fewer than {m} demonstrations with an answer for domain(s) "
                        f"{', '.join(short)}; lower --domain-demos-n or add records of those domains")
    demos = {d: tuple(pool[d][:m]) for d in groups}
    # A demonstration is never also a scored question.
    shown = {d: {e.prompt for e in exs} for d, exs in demos.items()}
    return DomainDemos(demos, spec), {d: [e for e in q if e.prompt not in shown[d]] for d, q in groups.items()}


# --- contamination ---------------------------------------------------------------------------

def normalised(text: str) -> str:
    """Lower case, single spaces: how two copies of a question are recognised."""
    return " ".join(text.lower().split())


def question_stem(e: Example) -> str:
    """The question without its lettered options (MMLU-Pro re-lettered and extended MMLU's
    options, so the stem is what identifies a question across the two)."""
    return e.prompt.split("\nA. ")[0] if e.choices else e.prompt


def decontaminate(groups: dict[str, list[Example]], against: Iterable[Example]
                  ) -> tuple[dict[str, list[Example]], dict[str, int]]:
    """Leave out every domain question whose normalised stem appears in `against` (the
    training sets in play, or a set a training set was drawn from). Returns the questions
    kept and, per domain, how many were left out."""
    seen = {normalised(question_stem(e)) for e in against}
    digests = {stem_digest(e) for e in against} if any(
        isinstance(e, SealedExample) for q in groups.values() for e in q) else set()
    kept = {d: [e for e in q if (e.seal.stem not in digests if isinstance(e, SealedExample)
                                 else normalised(question_stem(e)) not in seen)] for d, q in groups.items()}
    return kept, {d: len(groups[d]) - len(kept[d]) for d in groups}


def clean_questions(domains: str, against: list[str], per_domain: int | None, skip_bad_lines: bool = False,
                    examples: tuple[Example, ...] = ()) -> tuple[dict[str, list[Example]], dict[str, int]]:
    """A domain set's questions (the first `per_domain` of each domain that remain), without
    those found in the `against` datasets or among `examples` (the training examples in play);
    what was left out is warned about and returned per domain."""
    ds = load_dataset(domains, skip_bad_lines)
    seen = list(examples) + [e for spec in against for e in load_dataset(spec, skip_bad_lines).examples]
    sources = against + (["the training set(s)"] if examples else [])
    groups, removed = decontaminate(ds.by_domain(), seen)
    if sum(removed.values()):
        per = ", ".join(f"{d} {n}" for d, n in removed.items() if n)
        warn(f"left out {sum(removed.values())} question(s) found in {', '.join(sources)} ({per})")
    gone = [d for d, q in groups.items() if not q]
    if gone:
        warn(f"domain(s) {', '.join(gone)} have no question left after that and are not scored")
    kept = {id(e) for q in groups.values() for e in q}
    return select(ds, per_domain, per_domain=True, keep=lambda e: id(e) in kept).by_domain(), removed


def training_and_domains(train: str, domains: str, max_train: int | None, max_examples: int | None,
                         skip_bad_lines: bool = False, exclude: list[str] | None = None
                         ) -> tuple[Dataset, dict[str, list[Example]]]:
    """The training set and the domain questions, with every question that appears in the
    training set, or in an `exclude` dataset, left out (the counts are warned about)."""
    sets, groups = sets_and_domains([train], domains, max_train, max_examples, skip_bad_lines, exclude)
    return sets[train], groups


def sets_and_domains(trains: list[str], domains: str, max_train: int | None, max_examples: int | None,
                     skip_bad_lines: bool = False, exclude: list[str] | None = None
                     ) -> tuple[dict[str, Dataset], dict[str, list[Example]]]:
    """Several training sets and one set of domain questions that none of them holds: the
    sets compared are scored on the same questions."""
    sets = {t: load_dataset(t, skip_bad_lines, max_train) for t in trains}
    held = tuple(e for ds in sets.values() for e in ds.examples)
    groups, _ = clean_questions(domains, list(exclude or []), max_examples, skip_bad_lines, examples=held)
    if len(groups) < 2:
        warn(f"{domains} has a single domain ({next(iter(groups))}); a ranking needs several")
    return sets, groups
