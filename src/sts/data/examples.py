"""Examples and datasets: a record as the pipeline reads it (`Example`), a sealed record whose
text does not ship (`SealedExample`, known by its digests), and a named set of them (`Dataset`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from sts.data import embedded
from sts.errors import UserError

LETTERS = "ABCDEFGHIJKLMNOP"


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


def normalised(text: str) -> str:
    """Lower case, single spaces: how two copies of a question are recognised."""
    return " ".join(text.lower().split())


def question_stem(e: Example) -> str:
    """The question without its lettered options (MMLU-Pro re-lettered and extended MMLU's
    options, so the stem is what identifies a question across the two)."""
    return e.prompt.split("\nA. ")[0] if e.choices else e.prompt
