"""`sts correlate`: does STS predict the real accuracy change? Pearson and Spearman across
domains, with bootstrap 95% intervals, and the paper-style scatter plot.

Accuracy changes come either from two `sts evaluate` runs (base and tuned, on the same
questions) or from a per-question prediction table (question_id + one column of answer
letters per model, as MMLU-Pro publishes) with the question file that gives each question's
domain and correct answer.

The bootstrap resamples, in each replicate, the questions within each domain (paired: the
same questions for base and tuned) and, where the prediction carries per-example shifts
(`sts_samples.safetensors`, icl/sft), the training examples behind the shifted features S.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats as sps

from sts.choices import PAPER_DOMAINS, Metric, Protocol, parse
from sts.errors import UserError

if TYPE_CHECKING:  # evaluate pulls in torch; correlate itself needs only numpy/scipy
    from sts.engine.evaluation import Evaluation


@dataclass
class DomainChange:
    """Per-question values of a metric (correctness 0/1 for accuracy) of the base and tuned
    model on one domain, paired. The change is `gain * (tuned - base)`: 100 for accuracies and
    probabilities (points), -1 for NLLs (nats/token gained)."""

    base: np.ndarray
    tuned: np.ndarray
    gain: float = 100.0

    @property
    def questions(self) -> int:
        return int(self.base.shape[0])

    @property
    def delta(self) -> float:
        """The change: points, or nats/token gained."""
        return self.gain * float(self.tuned.mean() - self.base.mean())

    @property
    def sem(self) -> float:
        """Standard error of the change (paired differences)."""
        if self.questions < 2:
            return float("nan")
        return abs(self.gain) * float(np.std(self.tuned - self.base, ddof=1) / np.sqrt(self.questions))

    def resampled(self, idx: np.ndarray) -> float:
        return self.gain * float(self.tuned[idx].mean() - self.base[idx].mean())


@dataclass
class Correlation:
    pearson: float
    spearman: float
    pearson_ci: tuple[float, float]
    spearman_ci: tuple[float, float]
    domains: int
    replicates: int
    resampled: list[str] = field(default_factory=list)  # what the bootstrap resampled
    protocol: str = Protocol.SIGNED
    protocol_note: str = Protocol.SIGNED.note
    domains_used: list[str] = field(default_factory=list)
    metric: str = "acc"  # the ground truth: acc, nll, acc_norm, p_correct, cot_nll
    # the lowest and highest Pearson with each domain left out in turn: whether one domain
    # carries the correlation
    pearson_loo: tuple[float, float] = (float("nan"), float("nan"))


def leave_one_out(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(min, max) of Pearson with each domain (entry) left out in turn."""
    rs = [_pearson(np.delete(x, i), np.delete(y, i)) for i in range(len(x))]
    rs = [r for r in rs if r == r]
    return (min(rs), max(rs)) if rs else (float("nan"), float("nan"))


def protocol_domains(changes: dict[str, DomainChange], domains: list[str], protocol: str) -> list[str]:
    """The domains a protocol correlates over: all of them, or (`paper`) the PAPER_DOMAINS / 2
    with the largest and as many with the smallest absolute change (ties broken by name)."""
    if parse(Protocol, protocol, "protocol") is not Protocol.PAPER:
        return list(domains)
    if len(domains) < PAPER_DOMAINS:
        raise UserError(f"the paper protocol picks {PAPER_DOMAINS} domains (the largest and smallest absolute "
                        f"changes) but only {len(domains)} are shared; use --protocol signed or abs")
    half = PAPER_DOMAINS // 2
    ordered = sorted(domains, key=lambda d: (abs(changes[d].delta), d))
    return sorted(ordered[:half] + ordered[-half:])


def changes_from_evaluations(base: Evaluation, tuned: Evaluation, metric: str = "acc") -> dict[str, DomainChange]:
    """Pair two `Evaluation`s question by question on one metric (questions in only one, or
    without the metric, are dropped)."""
    gain = parse(Metric, metric, "metric").gain
    tuned_by_id = {(r.domain, r.question_id): r for r in tuned.results}
    pairs: dict[str, list[tuple[float, float]]] = {}
    for r in base.results:
        t = tuned_by_id.get((r.domain, r.question_id))
        if t is not None and (a := r.value(metric)) is not None and (b := t.value(metric)) is not None:
            pairs.setdefault(r.domain, []).append((a, b))
    if not pairs:
        raise UserError(f"the base and tuned evaluations share no questions with metric {metric}; evaluate "
                        "both on the same --domains and --max-examples (cot_nll needs records with cot_content)")
    return {d: DomainChange(np.array([a for a, _ in p], float), np.array([b for _, b in p], float), gain)
            for d, p in sorted(pairs.items())}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")  # undefined for a constant vector
    return float(np.corrcoef(x, y)[0, 1])  # the reference's formula


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    return _pearson(sps.rankdata(x), sps.rankdata(y))  # Spearman = Pearson of average ranks


def resampled_changes(changes: list[DomainChange], rng: np.random.Generator, replicates: int) -> np.ndarray:
    """[replicates, len(changes)]: each change recomputed on its questions drawn with
    replacement (paired: the same draw for base and tuned)."""
    out = np.empty((replicates, len(changes)))
    for i, c in enumerate(changes):
        idx = rng.integers(0, c.questions, (replicates, c.questions))
        out[:, i] = c.gain * (c.tuned[idx].mean(1) - c.base[idx].mean(1))
    return out


def _pearson_rows(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pearson of x with each row of ys (nan where a row or x is constant)."""
    xc = x - x.mean()
    yc = ys - ys.mean(axis=-1, keepdims=True)
    denom = np.sqrt((xc ** 2).sum()) * np.sqrt((yc ** 2).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (yc @ xc) / denom
    r[(denom == 0) | (np.ptp(ys, axis=-1) == 0)] = np.nan
    return np.clip(r, -1.0, 1.0)


def correlate(sts: dict[str, float], changes: dict[str, DomainChange], replicates: int = 1000,
              seed: int = 0, resample_sts: Callable[[np.random.Generator], dict[str, float]] | None = None,
              protocol: str = "signed", metric: str = "acc") -> Correlation:
    """Pearson and Spearman over the domains present in both (or those the protocol picks),
    with percentile 95% intervals from `replicates` bootstrap replicates (replicates where a
    vector is constant are dropped). `paper` picks its PAPER_DOMAINS domains once, from the observed
    changes; the bootstrap keeps them fixed."""
    domains = sorted(set(sts) & set(changes))
    if len(domains) < 3:
        raise UserError(f"need at least 3 domains in both the STS scores and the accuracy changes "
                        f"(shared: {', '.join(domains) or 'none'}); check the domain names match")
    domains = protocol_domains(changes, domains, protocol)
    signed = protocol == "signed"
    x = np.array([sts[d] for d in domains])
    y = np.array([changes[d].delta if signed else abs(changes[d].delta) for d in domains])
    rng = np.random.default_rng(seed)
    boot = np.full((replicates, 2), np.nan)
    if resample_sts is None:  # questions only: all replicates at once
        yb = resampled_changes([changes[d] for d in domains], rng, replicates)
        yb = yb if signed else np.abs(yb)
        boot[:, 0] = _pearson_rows(x, yb)
        boot[:, 1] = _pearson_rows(sps.rankdata(x), sps.rankdata(yb, axis=1))
    for b in range(replicates if resample_sts is not None else 0):
        xb = x
        if resample_sts is not None:
            resampled = resample_sts(rng)
            xb = np.array([resampled[d] for d in domains])
        yb = np.empty(len(domains))
        for i, d in enumerate(domains):
            c = changes[d]
            yb[i] = c.resampled(rng.integers(0, c.questions, c.questions))
        yb = yb if signed else np.abs(yb)
        boot[b] = _pearson(xb, yb), _spearman(xb, yb)
    ok = boot[~np.isnan(boot).any(axis=1)]
    if len(ok) == 0:
        ci_p = ci_s = (float("nan"), float("nan"))
    else:
        lo, hi = np.percentile(ok, [2.5, 97.5], axis=0)
        ci_p, ci_s = (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))
    what = ["questions within each domain"] + (["training examples behind S"] if resample_sts else [])
    return Correlation(_pearson(x, y), _spearman(x, y), ci_p, ci_s, len(domains), len(ok), what,
                       protocol, parse(Protocol, protocol, "protocol").note, list(domains), metric, leave_one_out(x, y))


def signal(changes: dict[str, DomainChange]) -> dict[str, float]:
    """How much a metric tells domains apart: the spread of the changes across domains (their
    standard deviation) over the typical standard error of one domain's change (the root mean
    square of the standard errors). Near 1 or below, the differences a score should predict
    are noise; the share of the spread carried by the largest single domain tells whether one
    domain carries it."""
    deltas = np.array([c.delta for c in changes.values()])
    sems = np.array([c.sem for c in changes.values()])
    spread = float(deltas.std(ddof=1)) if len(deltas) > 1 else float("nan")
    noise = float(np.sqrt(np.nanmean(sems ** 2)))
    dev = (deltas - deltas.mean()) ** 2
    return {"spread": spread, "sem": noise, "signal": spread / noise if noise > 0 else float("nan"),
            "largest_share": float(dev.max() / dev.sum()) if dev.sum() > 0 else float("nan"),
            "mean_change": float(deltas.mean())}


def double_centre(m: np.ndarray) -> np.ndarray:
    """Remove row (training set) and column (domain) means: what is left is which training set
    moves which domain beyond how much any training set moves it and how much a set moves all."""
    return m - m.mean(axis=1, keepdims=True) - m.mean(axis=0, keepdims=True) + m.mean()


@dataclass
class MatrixCorrelation:
    """`pooled`: over all (training set, domain) cells; `specificity`: over the cells of the
    double-centred matrices (score and change)."""

    kind: str
    pearson: float
    spearman: float
    pearson_ci: tuple[float, float]
    spearman_ci: tuple[float, float]
    cells: int
    replicates: int
    metric: str = "acc"
    pearson_loo: tuple[float, float] = (float("nan"), float("nan"))  # each domain left out in turn


def correlate_matrix(scores: dict[str, dict[str, float]], changes: dict[str, dict[str, DomainChange]],
                     kind: str = "specificity", replicates: int = 1000, seed: int = 0,
                     metric: str = "acc") -> MatrixCorrelation:
    """Pooled or specificity correlation between a score matrix and a change matrix (training
    sets x domains, the domains every training set shares), with percentile 95% intervals
    from resampling each cell's questions."""
    trains = [t for t in scores if t in changes]
    domains = sorted(set.intersection(*(set(scores[t]) & set(changes[t]) for t in trains))) if trains else []
    if kind == "specificity" and (len(trains) < 2 or len(domains) < 2):
        raise UserError("the specificity correlation needs at least 2 training sets and 2 domains")
    if len(trains) * len(domains) < 3:
        raise UserError("a matrix correlation needs at least 3 (training set, domain) cells")
    x = np.array([[scores[t][d] for d in domains] for t in trains])
    y = np.array([[changes[t][d].delta for d in domains] for t in trains])
    rng = np.random.default_rng(seed)
    yb = np.stack([resampled_changes([changes[t][d] for d in domains], rng, replicates) for t in trains], 1)
    # Leaving a domain out re-centres the rest: the range is of the correlation as defined.
    centre = double_centre if kind == "specificity" else (lambda m: m)
    rs = [_pearson(centre(np.delete(x, i, 1)).ravel(), centre(np.delete(y, i, 1)).ravel())
          for i in range(x.shape[1])] if x.shape[1] > 2 else []
    rs = [r for r in rs if r == r]
    loo = (min(rs), max(rs)) if rs else (float("nan"), float("nan"))
    if kind == "specificity":
        x, y = double_centre(x), double_centre(y)
        yb = yb - yb.mean(axis=2, keepdims=True) - yb.mean(axis=1, keepdims=True) + yb.mean(axis=(1, 2), keepdims=True)
    elif kind != "pooled":
        raise UserError(f"unknown matrix correlation {kind!r}; use pooled or specificity")
    xf, yf = x.ravel(), y.ravel()
    flat = yb.reshape(replicates, -1)
    boot = np.stack([_pearson_rows(xf, flat), _pearson_rows(sps.rankdata(xf), sps.rankdata(flat, axis=1))], 1)
    ok = boot[~np.isnan(boot).any(axis=1)]
    if len(ok):
        lo, hi = np.percentile(ok, [2.5, 97.5], axis=0)
        ci_p, ci_s = (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))
    else:
        ci_p = ci_s = (float("nan"), float("nan"))
    return MatrixCorrelation(kind, _pearson(xf, yf), _spearman(xf, yf), ci_p, ci_s, xf.size, len(ok), metric, loo)


@dataclass
class SwapTest:
    """Does a score know its training set? Each set's changes correlated with its own scores and
    with every other set's (the same domains): a score that predicts only what any training
    does scores about as well with another set's scores (difference near 0)."""

    own: float  # median over sets of Pearson(own scores, own changes)
    other: float  # median over sets of the mean Pearson(another set's scores, own changes)
    difference: float  # own - other
    own_ci: tuple[float, float]
    other_ci: tuple[float, float]
    difference_ci: tuple[float, float]
    sets: int
    domains: int
    metric: str = "acc"


def _zscored(m: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm (nan for a constant row), so a dot product is Pearson."""
    c = m - m.mean(axis=-1, keepdims=True)
    norm = np.sqrt((c ** 2).sum(axis=-1, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, c / norm, np.nan)


def _swap(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[..., 2]: (median own Pearson, median over sets of the mean other-set Pearson) for
    x [sets, domains] and y [..., sets, domains] (a batch of replicates)."""
    r = np.einsum("...td,ud->...tu", _zscored(y), _zscored(x))  # changes of set t against scores of set u
    import warnings

    own = np.diagonal(r, axis1=-2, axis2=-1)
    off = ~np.eye(x.shape[0], dtype=bool)
    with warnings.catch_warnings():  # a constant replicate gives nan, dropped from the interval
        warnings.simplefilter("ignore", RuntimeWarning)
        other = np.nanmean(np.where(off, r, np.nan), axis=-1)
        return np.stack([np.nanmedian(own, axis=-1), np.nanmedian(other, axis=-1)], axis=-1)


def swap_test(scores: dict[str, dict[str, float]], changes: dict[str, dict[str, DomainChange]],
              replicates: int = 1000, seed: int = 0, metric: str = "acc") -> SwapTest:
    """The swap test over the domains every set shares, with percentile 95% intervals from
    resampling each cell's questions (as `correlate_matrix`)."""
    trains = [t for t in scores if t in changes]
    domains = sorted(set.intersection(*(set(scores[t]) & set(changes[t]) for t in trains))) if trains else []
    if len(trains) < 2 or len(domains) < 3:
        raise UserError("the swap test needs at least 2 training sets and 3 shared domains")
    x = np.array([[scores[t][d] for d in domains] for t in trains])
    y = np.array([[changes[t][d].delta for d in domains] for t in trains])
    rng = np.random.default_rng(seed)
    yb = np.stack([resampled_changes([changes[t][d] for d in domains], rng, replicates) for t in trains], 1)
    boot = _swap(x, yb)
    boot = np.column_stack([boot, boot[:, 0] - boot[:, 1]])
    boot = boot[~np.isnan(boot).any(axis=1)]
    own, other = (float(v) for v in _swap(x, y))
    cis = [(float(lo), float(hi)) for lo, hi in np.percentile(boot, [2.5, 97.5], axis=0).T] if len(boot) else \
        [(float("nan"), float("nan"))] * 3
    return SwapTest(own, other, own - other, cis[0], cis[1], cis[2], len(trains), len(domains), metric)


def own_domain_rank(scores: dict[str, float], changes: dict[str, DomainChange], domain: str) -> dict[str, int]:
    """The first check a user makes: where a set drawn from one domain ranks that domain, by its
    score and by the measured change (1 = moved most), over the domains both share."""
    shared = sorted(set(scores) & set(changes))
    if domain not in shared:
        raise UserError(f"domain {domain!r} is not among the scored and measured domains")
    by_score = sorted(shared, key=lambda d: (-scores[d], d))
    by_change = sorted(shared, key=lambda d: (-changes[d].delta, d))
    return {"score_rank": by_score.index(domain) + 1, "change_rank": by_change.index(domain) + 1,
            "domains": len(shared)}
