"""A prediction, the artifact `sts predict` returns and reports: every domain's score, what it was
read on, the shifted features that explain it and, with a library, its shared / own split and
calibrated changes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sts.analysis.library import Decomposition
from sts.defaults import DEFAULT_SCORE
from sts.prediction.config import PredictConfig
from sts.scores.score import spec_of
from sts.scores.selection import ShiftSamples


@dataclass
class FeatureReport:
    index: int
    shift: float
    contexts: list[dict[str, Any]] = field(default_factory=list)  # top activations in the data


@dataclass
class Attribution:
    """Each training example's term of a `grad` prediction (`GradientStats.contributions`):
    terms[i][j] is example i's part of domain j's score, (t_i / T) <g_i, g_D>, read in the form
    that was scored (sketched or exact). Each column sums to its domain's score: the printed score
    is that sum. Examples are those the score read, in the training set's order."""

    examples: list[dict[str, Any]]  # {"position", "id", "tokens", "excerpt"}
    domains: list[str]
    terms: list[list[float]]
    form: str  # "count sketch of 65536" or "exact"

    def column(self, domain: str) -> list[float]:
        j = self.domains.index(domain)
        return [row[j] for row in self.terms]

    def extremes(self, domain: str, n: int) -> tuple[list[int], list[int]]:
        """The rows of the n examples that push the domain's score most (largest terms) and least
        (smallest), each list in that order; ties break by the example's position (stable)."""
        col = self.column(domain)
        order = sorted(range(len(col)), key=lambda i: (-col[i], i))
        most = order[: min(n, len(order))]
        least = [i for i in sorted(range(len(col)), key=lambda i: (col[i], i)) if i not in most][:n]
        return most, least


@dataclass
class Prediction:
    config: PredictConfig  # as run (its `score` is the one this prediction holds)
    hook: str
    scores: dict[str, float]  # domain -> STS
    tokens: dict[str, int]  # domain -> tokens scored
    questions: dict[str, int]
    train_tokens: int
    features: list[FeatureReport]
    samples: ShiftSamples | None = None  # for bootstrapping S (icl/sft shifts)
    score: str = DEFAULT_SCORE
    demonstrations: dict[str, Any] | None = None  # the domain demonstrations (icl score)
    truncation: dict[str, Any] = field(default_factory=dict)  # ICL pairs cut to fit max_length
    generated: list[dict[str, str]] | None = None  # --responses generated: each prompt and its answer
    decomposition: Decomposition | None = None  # shared and own parts (a library of measured runs)
    decomposition_note: str = ""  # why there is none, when a library was asked for or is the default
    calibrations: dict[str, Any] = field(default_factory=dict)  # metric -> sts.analysis.calibration.Calibration
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> domain -> calibrated Change
    calibration_note: str = ""
    calibration_checks: dict[str, Any] = field(default_factory=dict)  # metric -> its leave-one-set-out Evaluation
    side: str = ""  # what the domain side read (`library.side_label`): the form whose record the report quotes
    attribution: Attribution | None = None  # grad: each training example's term of each domain's score

    @property
    def formula(self) -> str:
        return spec_of(self.score).formula

    def ranking(self) -> list[tuple[int, str, float, int]]:
        ordered = sorted(self.scores.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(i + 1, name, value, self.tokens[name]) for i, (name, value) in enumerate(ordered)]
