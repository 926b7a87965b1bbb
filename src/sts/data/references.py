"""Reference records: which of a domain's records a score reads and which the ground truth measures.

A domain's reference records (MMLU-Pro's chains of thought) serve twice: their loss change after
fine-tuning is `sts validate`'s ground truth (cot_nll), and their loss gradient is the gradient
scores' domain side. A score that reads the very records it is judged on is an in-sample check
(`grad` is then the exact first-order term of the measured quantity), so the two are split:
the evaluation records are a domain's first `evaluation` records in file order (what the
committed experiments measured, so their evaluations stay valid), the probe records a seeded
draw from the records after them. `probe_split` is the one rule; `sts validate` records both
lists in its outputs, and `docs/results/probes` draws the shipped probes with the same function.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sts.data.examples import Example, has_reference, normalised, question_stem
from sts.errors import UserError, warn


def draw(records: list[Example], n: int, seed: int, domain: str) -> list[Example]:
    """`n` of `records` in a seeded random order (the first n of it: a smaller draw is a prefix
    of a larger one, so a curve over n compares nested sets). The seed is mixed with the
    domain's name so that domains do not share one permutation."""
    order = list(records)
    random.Random(f"{seed}:{domain}").shuffle(order)
    return order[:n]


def probe_draw(domains: dict[str, list[Example]], n: int, seed: int) -> dict[str, list[Example]]:
    """The records `sts predict`'s gradient and lookahead scores read of each domain of reference
    chains of thought: all of them where it has at most `n` (the embedded domains ship exactly
    their probe records, sides computed), else `n` drawn by `draw`, as `probe_split` draws them. The
    validated form read 10 a domain (docs/results/probes); a user's file of 100 references a domain
    would otherwise cost ten times the backward passes for no measured gain. A domain of plain
    questions (answer texts, a form judged on 100 a domain: docs/results/heldout/SHIPPED.md) is read whole."""
    return {d: draw(q, n, seed, d) if len(q) > n and all(has_reference(e) for e in q) else q
            for d, q in domains.items()}


@dataclass
class ReferenceSplit:
    """Per domain: the records the ground truth measures and the disjoint ones the score reads."""

    evaluation: dict[str, list[Example]]
    probes: dict[str, list[Example]]
    seed: int
    source: str = ""  # the dataset spec the probes come from

    def describe(self) -> dict[str, object]:
        """Both lists by record id, for a run's outputs (what was read, what was measured)."""
        return {"seed": self.seed, "spec": self.source,
                "evaluation": {d: [e.uid for e in q] for d, q in self.evaluation.items()},
                "probes": {d: [e.uid for e in q] for d, q in self.probes.items()}}


def _stems(exs: list[Example]) -> set[str]:
    return {normalised(question_stem(e)) for e in exs}


def probe_split(records: dict[str, list[Example]], evaluation: int, probes: int, seed: int,
                given: dict[str, list[Example]] | None = None, source: str = "") -> ReferenceSplit:
    """Each domain's first `evaluation` records are measured; `probes` records drawn (seeded)
    from the rest are read by the score, or `given` probe records (a user's own), which must
    not share a question with the evaluated ones (refused: that is the in-sample check again).
    A domain with no record left to probe is refused too, with what to do."""
    evaluated = {d: q[:evaluation] for d, q in records.items()}
    if given is not None:
        chosen = {d: q for d, q in given.items() if d in evaluated}
        for d, q in chosen.items():
            shared = _stems(q) & _stems(evaluated[d])
            if shared:
                raise UserError(f"--probes: {len(shared)} probe record(s) of {d} are also evaluated records; "
                                "a score must not read the records it is judged on: give disjoint probes")
    else:
        chosen = {d: draw(q[evaluation:], probes, seed, d) for d, q in records.items()}
        short = [f"{d} {len(q)}" for d, q in chosen.items() if 0 < len(q) < probes]
        if short:
            warn(f"fewer than {probes} probe records are left after the evaluated ones ({', '.join(short)}): "
                 "their domain sides read what there is")
    empty = [d for d in evaluated if not chosen.get(d)]
    if empty:
        raise UserError(f"no probe record is left for {', '.join(empty)} after the {evaluation} evaluated "
                        "record(s) a domain: give more reference records, lower --reference-examples, "
                        "or give --probes")
    return ReferenceSplit(evaluated, chosen, seed, source)
