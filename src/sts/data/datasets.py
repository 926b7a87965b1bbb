"""Dataset specs -> `Example`s with domain labels.

A spec is a local file (.jsonl/.json/.txt/.parquet/.csv), a directory written by `datasets`
(`save_to_disk`) or holding data files, a Hugging Face hub id (optionally `ID:split`), or
`embedded:NAME`. The schema is detected from the record fields, so users never have to say
which dataset they are pointing at.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from sts.data import embedded
from sts.data.examples import Dataset, Example, Seal, SealedExample, normalised, question_stem, stem_digest
from sts.data.records import examples_from_records, read_records
from sts.errors import UserError, warn


def sealed_dataset() -> Dataset:
    """The embedded reference domains: MMLU-Pro's 14 categories, each known by its probe records'
    seals (`embedded.references_manifest`); their statistics ship in the package's cache."""
    manifest = json.loads(embedded.references_manifest().read_text())
    examples: list[Example] = [
        SealedExample("", None, r["domain"], r["uid"], seal=Seal(r["record"], r["stem"], r["tokens"]))
        for r in manifest["records"]]
    return Dataset(embedded.REFERENCE_DOMAINS, "sealed", examples)


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
