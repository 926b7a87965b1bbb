"""From scores to signed changes in the metric's own units, with intervals (`--calibrate`).

A library of measured runs on the same model and SAE (`sts.analysis.library`) holds, per training set,
its scores and the change each domain's metric showed after fine-tuning. The calibration fits
the simplest map that the library's leave-one-set-out error supports:

    M0:  change(set, D) = mu_D                          (what training of this kind did to D)
    M1:  change(set, D) = mu_D + beta * own(set, D)      (plus a slope on the set's own part)
    M2:  ... + gamma * (level(set) - mean level)         (plus one on the set's score level)

mu_D is the library's mean change of domain D, own is the set's score beyond the library's
typical score profile (z across domains, as `sts.analysis.library.decompose`), beta and gamma are least squares
on the library's cells with each set's own part and level (its mean score over the domains)
taken against the other sets. A larger model is kept only where its leave-one-set-out error
is below the smaller ones'. Intervals are split-conformal: each domain's
half-width is a quantile of the leave-one-set-out residuals, each divided by its domain's
spread of changes across sets, times that spread. A domain is "helps" when its interval lies
above zero, "hurts" below, else "no clear effect".

`evaluate` reports what a user may expect: the calibration refitted without each set in turn,
its error, sign accuracy and interval coverage on the set left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from sts import defaults
from sts.analysis.library import Library, LibrarySet, zscores
from sts.choices import Metric, parse
from sts.errors import UserError

HELPS, HURTS, UNCLEAR = "helps", "hurts", "no clear effect"


@dataclass
class Change:
    """A calibrated prediction for one domain, in the metric's gain units (positive: better)."""

    value: float
    low: float
    high: float

    @property
    def call(self) -> str:
        return HELPS if self.low > 0 else HURTS if self.high < 0 else UNCLEAR


@dataclass
class Fit:
    """mu_D, the library's typical z-scored score profile and mean score level, and the slopes
    on the set's own part and on its level (0 where the model leaves the term out)."""

    mean: dict[str, float]
    typical: dict[str, float]
    level: float  # the library's mean of each set's mean score over the domains
    slope: float  # on own(set, D)
    level_slope: float = 0.0  # on the set's mean score minus the library's (M2)

    def predict(self, scores: dict[str, float]) -> dict[str, float]:
        domains = sorted(self.mean)
        z = zscores(scores, domains)
        shift = self.level_slope * (_level(scores, domains) - self.level)
        return {d: self.mean[d] + shift + self.slope * (z[d] - self.typical[d]) for d in domains}


def _level(scores: dict[str, float], domains: list[str]) -> float:
    """A set's score level: its mean score over the domains (what z-scores remove)."""
    return float(np.mean([scores[d] for d in domains]))


@dataclass
class Calibration:
    metric: str
    units: str
    score: str
    model: str  # "M0", "M1" or "M2" (`Model`)
    fit: Fit
    spread: dict[str, float]  # per domain: RMS of the library's changes about mu_D
    halfwidth: float  # conformal quantile of |residual| / spread
    level: float
    sets: list[str]
    loso_rmse: dict[str, float] = field(default_factory=dict)  # within the library, per model

    def predict(self, scores: dict[str, float]) -> dict[str, Change]:
        missing = set(self.fit.mean) - set(scores)
        if missing:
            raise UserError(f"the calibration needs scores of domain(s) {', '.join(sorted(missing))}; "
                            "predict on the domains the library measured")
        out = {}
        for d, v in self.fit.predict(scores).items():
            h = self.halfwidth * self.spread[d]
            out[d] = Change(v, v - h, v + h)
        return out


def _domains(sets: dict[str, LibrarySet], score: str, metric: str) -> list[str]:
    common = set.intersection(*(set(s.scores[score]) & set(s.changes[metric]) for s in sets.values()))
    return sorted(common)


class Model(StrEnum):
    """A calibration model, simplest first (iteration order): the domains' mean change, plus a slope
    on the set's own part, plus one on its level. Stored by name ("M0") in calibration files."""

    M0 = "M0"
    M1 = "M1"
    M2 = "M2"

    @property
    def terms(self) -> tuple[str, ...]:
        return {"M0": (), "M1": ("own",), "M2": ("own", "level")}[self.value]

    @property
    def form(self) -> str:
        return {"M0": "domain mean", "M1": "domain mean + own-part slope",
                "M2": "domain mean + own-part and level slopes"}[self.value]


def _fit(sets: dict[str, LibrarySet], score: str, metric: str, domains: list[str], model: str) -> Fit:
    """mu and the typical profile over `sets`; the slopes (least squares) from each set's
    residual against the others' mean, on its own part against the others' typical profile
    and its level against the others' mean level."""
    z = {n: zscores(s.scores[score], domains) for n, s in sets.items()}
    lv = {n: _level(s.scores[score], domains) for n, s in sets.items()}
    mean = {d: float(np.mean([s.changes[metric][d] for s in sets.values()])) for d in domains}
    typical = {d: float(np.mean([z[n][d] for n in sets])) for d in domains}
    terms = Model(model).terms
    coef = {"own": 0.0, "level": 0.0}
    if terms and len(sets) >= 2:
        rows, ys = [], []
        for n, s in sets.items():
            others = [m for m in sets if m != n]
            for d in domains:
                ys.append(s.changes[metric][d] - np.mean([sets[m].changes[metric][d] for m in others]))
                x = {"own": z[n][d] - np.mean([z[m][d] for m in others]),
                     "level": lv[n] - np.mean([lv[m] for m in others])}
                rows.append([x[t] for t in terms])
        solution = np.linalg.lstsq(np.array(rows, dtype=float), np.array(ys, dtype=float), rcond=None)[0]
        coef |= {t: float(v) for t, v in zip(terms, solution)}
    return Fit(mean, typical, float(np.mean(list(lv.values()))), coef["own"], coef["level"])


def _residuals(sets: dict[str, LibrarySet], score: str, metric: str, domains: list[str],
               model: str) -> dict[str, dict[str, float]]:
    """Each set's change minus its prediction by the fit on the other sets."""
    out = {}
    for n, s in sets.items():
        fit = _fit({m: t for m, t in sets.items() if m != n}, score, metric, domains, model)
        pred = fit.predict(s.scores[score])
        out[n] = {d: s.changes[metric][d] - pred[d] for d in domains}
    return out


def _rmse(res: dict[str, dict[str, float]]) -> float:
    return float(np.sqrt(np.mean([r * r for by_d in res.values() for r in by_d.values()])))


def conformal_quantile(values: list[float], level: float) -> float:
    """The split-conformal quantile: the ceil((n + 1) level)-th smallest of n values (the
    largest when that exceeds n)."""
    ordered = sorted(values)
    rank = min(len(ordered), math.ceil((len(ordered) + 1) * level))
    return ordered[rank - 1]


def fit(sets: dict[str, LibrarySet], score: str, metric: str, level: float = defaults.INTERVAL_LEVEL,
        units: str = "") -> Calibration:
    """The calibration of `score` to `metric` on these library sets (at least 3)."""
    sets = _usable(sets, score, metric)
    if len(sets) < 3:
        raise UserError(f"a calibration needs at least 3 library sets with the {score} score and {metric} "
                        f"changes (found {len(sets)}); give a larger --calibrate library")
    domains = _domains(sets, score, metric)
    if len(domains) < 3:
        raise UserError(f"the library's sets share fewer than 3 domains with {metric} changes")
    res = {m.value: _residuals(sets, score, metric, domains, m) for m in Model}
    rmse = {m: _rmse(r) for m, r in res.items()}
    model = Model.M0.value
    for m in Model:  # a larger model only where it lowers the leave-one-set-out error
        if rmse[m.value] < rmse[model]:
            model = m.value
    f = _fit(sets, score, metric, domains, model)
    spread = {d: float(np.sqrt(np.mean([(s.changes[metric][d] - f.mean[d]) ** 2 for s in sets.values()])))
              for d in domains}
    floor = max(max(spread.values()) * 1e-6, 1e-12)  # a domain no set moved gets a tiny, not zero, spread
    spread = {d: max(v, floor) for d, v in spread.items()}
    normalised = [abs(r) / spread[d] for by_d in res[model].values() for d, r in by_d.items()]
    return Calibration(metric, units, score, model, f, spread, conformal_quantile(normalised, level), level,
                       sorted(sets), rmse)


@dataclass
class Evaluation:
    """The calibration refitted without each library set, judged on the set left out."""

    metric: str
    score: str
    cells: int
    rmse: float
    rmse_domain_mean: float  # M0 alone: what the score adds is the difference
    sign_accuracy: float  # sign of the predicted change = sign of the measured one
    coverage: float  # measured change inside the interval
    level: float
    called: int  # cells called helps or hurts
    calls_right: float  # of those, the fraction whose measured sign agrees
    models: dict[str, str]  # left-out set -> the model chosen without it


def evaluate(sets: dict[str, LibrarySet], score: str, metric: str,
             level: float = defaults.INTERVAL_LEVEL) -> Evaluation:
    sets = _usable(sets, score, metric)
    if len(sets) < 4:
        raise UserError(f"judging a calibration needs at least 4 library sets (found {len(sets)})")
    err, err0, sign, cover, calls = [], [], [], [], []
    models = {}
    for n, s in sets.items():
        cal = fit({m: t for m, t in sets.items() if m != n}, score, metric, level)
        models[n] = cal.model
        domains = sorted(cal.fit.mean)
        others = {m: t for m, t in sets.items() if m != n}
        base = _fit(others, score, metric, domains, Model.M0).predict(s.scores[score])
        for d, c in cal.predict(s.scores[score]).items():
            y = s.changes[metric][d]
            err.append(c.value - y)
            err0.append(base[d] - y)
            sign.append(np.sign(c.value) == np.sign(y))
            cover.append(c.low <= y <= c.high)
            if c.call != UNCLEAR:
                calls.append((c.call == HELPS) == (y > 0))
    return Evaluation(metric, score, len(err), float(np.sqrt(np.mean(np.square(err)))),
                      float(np.sqrt(np.mean(np.square(err0)))), float(np.mean(sign)), float(np.mean(cover)), level,
                      len(calls), float(np.mean(calls)) if calls else float("nan"), models)


def from_library(library: Library, score: str, leave_out: str | Sequence[str] | None = None,
                 level: float = defaults.INTERVAL_LEVEL) -> dict[str, Calibration]:
    """One calibration per metric the library measured (sets named `leave_out` left out: a set
    is never calibrated on its own outcome)."""

    sets, metrics = _members(library, leave_out)
    return {m: fit(sets, score, m, level, parse(Metric, m, "metric").units) for m in metrics}


def judge(library: Library, score: str, leave_out: str | Sequence[str] | None = None,
          level: float = defaults.INTERVAL_LEVEL) -> dict[str, Evaluation]:
    """`evaluate` on every metric of the library whose sets suffice (the same sets as
    `from_library` calibrates on)."""
    sets, metrics = _members(library, leave_out)
    return {m: evaluate(sets, score, m, level) for m in metrics if len(_usable(sets, score, m)) >= 4}


def _usable(sets: dict[str, LibrarySet], score: str, metric: str) -> dict[str, LibrarySet]:
    """The library sets that hold this score and a measured change in this metric."""
    return {n: s for n, s in sets.items() if score in s.scores and metric in s.changes}


def _members(library: Library, leave_out: str | Sequence[str] | None) -> tuple[dict[str, LibrarySet], list[str]]:
    """The library's sets without those named in `leave_out`, and the metrics they measured."""
    from sts.analysis.library import left_out

    sets = {n: s for n, s in library.sets.items() if not left_out(s.spec, leave_out)}
    return sets, sorted({m for s in sets.values() for m in s.changes})
