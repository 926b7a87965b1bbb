"""Mixtures of training sets: `--train A:0.7 --train B:0.3`.

A mixture is what `sts finetune` trains on when given weighted sets: `max_train` examples, a
share w_i of them drawn from set i (seeded; a set smaller than its share repeats). In
expectation each example of set i appears w_i N / n_i times, so every statistic that is a sum
over the examples' tokens (the SAE and raw statistics, the gradient sums) is, for the mixture,
the sum of its parts' statistics weighted by a_i = w_i / n_i. `sts predict` therefore predicts
a mixture from its parts' cached statistics, with no new model pass; the grid of `--mix-grid`
costs nothing beyond the parts.

One rule is a definition, not an identity: under the icl shift each example's demonstrations
come from its own part (as when the part is read alone), not from the mixture.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from typing import TypeVar

import torch

from sts.engine.stats import ExampleShifts, FeatureStats, PairedStats
from sts.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Part:
    spec: str
    weight: float | None  # None: a set on its own (no ":W" suffix)


def parse_part(text: str) -> Part:
    """`SPEC` or `SPEC:W` (W > 0: the set's share of a mixture). A spec may itself hold ':'
    (`embedded:champ`, `data.jsonl#rows=100:200`): only a trailing number that does not end a
    row selector is a weight."""
    head, sep, tail = text.rpartition(":")
    if sep and head and not re.search(r"#rows=\d*$", head):
        try:
            weight = float(tail)
        except ValueError:
            return Part(text, None)
        if not weight > 0:
            raise UserError(f"--train {text}: a mixture weight must be positive (got {tail})")
        return Part(head, weight)
    return Part(text, None)


@dataclass(frozen=True)
class Candidate:
    """One training set, or a mixture of several with weights summing to 1."""

    parts: tuple[Part, ...]

    @property
    def is_mixture(self) -> bool:
        return len(self.parts) > 1

    @property
    def name(self) -> str:
        if not self.is_mixture:
            return self.parts[0].spec
        return " + ".join(f"{p.weight:.2f} {p.spec}" for p in self.parts)


def candidates(train: list[str], grid: int | None = 0) -> list[Candidate]:
    """What `--train` (repeated) and `--mix-grid` ask to compare: unweighted sets each on their
    own, plus (grid N) every mixture of them on the grid of step 1/N; weighted sets are one
    mixture (weights normalised to sum 1)."""
    parts = [parse_part(t) for t in train]
    if not parts:
        raise UserError("give at least one --train")
    weighted = [p for p in parts if p.weight is not None]
    if weighted and len(weighted) != len(parts):
        raise UserError("weight every --train of a mixture (A:0.7 --train B:0.3) or none (compare the sets)")
    if len({p.spec for p in parts}) != len(parts):
        raise UserError("a training set is given twice in --train; give each once")
    if weighted:
        if len(parts) < 2:
            raise UserError(f"--train {train[0]}: a weight makes a mixture of several sets; drop it or add a set")
        if grid:
            raise UserError("--mix-grid mixes unweighted sets: drop the weights from --train")
        total = sum(p.weight or 0.0 for p in parts)
        return [Candidate(tuple(Part(p.spec, (p.weight or 0.0) / total) for p in parts))]
    out = [Candidate((p,)) for p in parts]
    if grid:
        if not 2 <= len(parts) <= 3:
            raise UserError(f"--mix-grid mixes 2 or 3 sets; {len(parts)} were given")
        for steps in grid_points(len(parts), grid):
            out.append(Candidate(tuple(Part(p.spec, s / grid) for p, s in zip(parts, steps) if s)))
    return out


def default_grid(train: list[str], target: list[str] | None) -> int:
    """--mix-grid when not given: `defaults.TARGET_MIX_GRID` when --target chooses among 2-3
    unweighted sets (a mixture of them is a candidate answer), else none."""
    from sts import defaults

    plain = all(parse_part(t).weight is None for t in train)
    return defaults.TARGET_MIX_GRID if target and plain and 2 <= len(train) <= 3 else 0


def grid_points(n_sets: int, n: int) -> list[tuple[int, ...]]:
    """Every split of n steps over n_sets sets with at least two sets present (the pure sets
    are candidates on their own)."""
    if n < 2:
        raise UserError(f"--mix-grid {n}: give at least 2 steps (2: the 50/50 mixture)")
    return [s for s in itertools.product(range(n + 1), repeat=n_sets)
            if sum(s) == n and sum(1 for x in s if x) >= 2]


def example_weights(candidate: Candidate, sizes: dict[str, int]) -> dict[str, float]:
    """a_i = w_i / n_i: the weight of each example of part i in the mixture's sums."""
    out = {}
    for p in candidate.parts:
        if sizes[p.spec] == 0:
            raise UserError(f"{p.spec} has no training examples; it cannot be part of a mixture")
        out[p.spec] = (p.weight if p.weight is not None else 1.0) / sizes[p.spec]
    return out


def _scaled(f: FeatureStats, a: float) -> FeatureStats:
    # count becomes fractional: the mixture's expected token count, which only divides sums
    return FeatureStats(f.count * a, f.sum * a, f.sum_sq * a, f.fires * a)  # type: ignore[arg-type]


def _add(x: FeatureStats, y: FeatureStats) -> FeatureStats:
    return FeatureStats(x.count + y.count, x.sum + y.sum, x.sum_sq + y.sum_sq, x.fires + y.fires)


def mix_paired(parts: list[tuple[PairedStats, float]]) -> PairedStats:
    """The weighted sum of paired statistics (a_i per part); per-example shifts are stacked with
    their part's weight, so a bootstrap still resamples examples."""
    a = b = None
    diff = torch.zeros_like(parts[0][0].sum_sq_diff)
    rows, cols, values, offset = [], [], [], 0
    for stats, w in parts:
        a = _scaled(stats.a, w) if a is None else _add(a, _scaled(stats.a, w))
        b = _scaled(stats.b, w) if b is None else _add(b, _scaled(stats.b, w))
        diff = diff + stats.sum_sq_diff * w
        e = stats.per_example
        if e is not None:
            rows.append(e.rows.long() + offset)
            cols.append(e.cols.long())
            values.append(e.values.double() * w)
            offset += max(e.examples, int(e.rows.max()) + 1 if e.rows.numel() else 0)
    per_example = None
    if len(rows) == len(parts):
        per_example = ExampleShifts(torch.cat(rows), torch.cat(cols), torch.cat(values), offset)
    assert a is not None and b is not None
    meta = {"mixture": [{"weight": w, **s.meta} for s, w in parts]}
    return PairedStats(a, b, diff, meta, per_example)


def mixed_examples(candidate: Candidate, pools: dict[str, list[T]], n: int, seed: int
                   ) -> tuple[list[T], dict[str, int]]:
    """What `sts finetune` trains on for a mixture: round(w_i n) examples of part i (the
    largest remainders get the rounding), each part drawn in a seeded order and repeated when
    it is smaller than its share, then shuffled together."""
    weights = [p.weight or 0.0 for p in candidate.parts]
    shares = [int(w * n) for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: -(weights[i] * n - shares[i]))
    for i in by_remainder[: n - sum(shares)]:
        shares[i] += 1
    rng = random.Random(seed)
    out: list[T] = []
    counts = {}
    for part, share in zip(candidate.parts, shares):
        counts[part.spec] = share
        pool = list(pools[part.spec])
        if not pool:
            raise UserError(f"{part.spec} has no training examples; it cannot be part of a mixture")
        order = pool[:]
        rng.shuffle(order)
        out.extend(order[i % len(order)] for i in range(share))
    rng.shuffle(out)
    return out, counts
