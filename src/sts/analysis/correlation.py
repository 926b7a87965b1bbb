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

import csv
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats as sps

from sts import defaults, files
from sts.choices import PAPER_DOMAINS, Metric, Protocol, parse
from sts.errors import UserError, check_positive
from sts.files import atomic_path

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


# --- accuracy changes ---------------------------------------------------------------------------

def changes_from_evaluations(base: Evaluation, tuned: Evaluation, metric: str = "acc") -> dict[str, DomainChange]:
    """Pair two `Evaluation`s question by question on one metric (questions in only one, or
    without the metric, are dropped)."""
    from sts.engine.evaluation import GAIN

    if metric not in GAIN:
        raise UserError(f"unknown metric {metric!r}; use {', '.join(GAIN)}")
    tuned_by_id = {(r.domain, r.question_id): r for r in tuned.results}
    pairs: dict[str, list[tuple[float, float]]] = {}
    for r in base.results:
        t = tuned_by_id.get((r.domain, r.question_id))
        if t is not None and (a := r.value(metric)) is not None and (b := t.value(metric)) is not None:
            pairs.setdefault(r.domain, []).append((a, b))
    if not pairs:
        raise UserError(f"the base and tuned evaluations share no questions with metric {metric}; evaluate "
                        "both on the same --domains and --max-examples (cot_nll needs records with cot_content)")
    return {d: DomainChange(np.array([a for a, _ in p], float), np.array([b for _, b in p], float), GAIN[metric])
            for d, p in sorted(pairs.items())}


def changes_from_table(table: Path, questions: str, base_model: str, tuned_model: str
                       ) -> dict[str, DomainChange]:
    """Per-domain changes between two model columns of a prediction table. Questions come
    from a dataset spec with ids, domains and answers (MMLU-Pro: question_id, category,
    answer); an empty cell is an unanswered question and counts as wrong."""
    from sts.data.datasets import load_dataset

    if not Path(table).is_file():
        raise UserError(f"prediction table not found: {table}")
    key = {e.uid: (e.domain or "all", e.answer) for e in load_dataset(questions).examples}
    with open(table, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        if "question_id" not in columns:
            raise UserError(f"{table}: no question_id column; expected question_id + one column per model")
        missing = [m for m in (base_model, tuned_model) if m not in columns]
        if missing:
            models = ", ".join(c for c in columns if c != "question_id")
            raise UserError(f"{table}: no column {', '.join(missing)}; models there: {models}")
        pairs: dict[str, list[tuple[bool, bool]]] = {}
        for row in reader:
            q = key.get(str(row["question_id"]).strip())
            if q is None:
                continue
            domain, answer = q
            pairs.setdefault(domain, []).append(((row[base_model] or "").strip() == answer,
                                                 (row[tuned_model] or "").strip() == answer))
    if not pairs:
        raise UserError(f"no question_id of {table} is in {questions}; give the matching question file")
    return {d: DomainChange(np.array([a for a, _ in p], float), np.array([b for _, b in p], float))
            for d, p in sorted(pairs.items())}


# --- correlation and bootstrap -------------------------------------------------------------------

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


# --- transfer matrices: many training sets x domains ------------------------------------------------

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


# --- STS inputs --------------------------------------------------------------------------------

def load_sts(path: Path) -> tuple[dict[str, float], Callable[[np.random.Generator], dict[str, float]] | None]:
    """Scores from `sts predict`'s sts.json (or `sts score`'s JSON), and a resampler of the
    training examples when sts_samples.safetensors sits beside it. Reading the scores alone
    imports no torch (a notebook can read predictions without it); the samples need it."""
    if not Path(path).is_file():
        raise UserError(f"STS file not found: {path} (write it with `sts predict` or `sts score`)")
    try:
        scores = {str(k): float(v) for k, v in json.loads(Path(path).read_text())["scores"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path}: no 'scores' mapping of domain -> STS; give the sts.json of `sts predict`") from None
    samples_path = Path(path).parent / files.SAMPLES
    if not samples_path.is_file():
        return scores, None
    from sts.scores.selection import ShiftSamples

    samples = ShiftSamples.load(samples_path)
    if set(samples.domain_values) != set(scores):
        return scores, None
    return scores, resampler(samples)


def resampler(samples: object | None) -> Callable[[np.random.Generator], dict[str, float]] | None:
    """STS recomputed on a bootstrap resample of the training examples (None if unavailable)."""
    import torch

    from sts.scores.selection import ShiftSamples

    if not isinstance(samples, ShiftSamples) or samples.example_shift.shape[0] < 2:
        return None
    n = samples.example_shift.shape[0]

    def resample(rng: np.random.Generator) -> dict[str, float]:
        return samples.scores(torch.from_numpy(rng.integers(0, n, n)))

    return resample


# --- outputs -------------------------------------------------------------------------------------

def rows(sts: dict[str, float], changes: dict[str, DomainChange]) -> list[dict[str, float | str | int]]:
    return [{"domain": d, "sts": sts[d], "accuracy_base": 100 * float(changes[d].base.mean()),
             "accuracy_tuned": 100 * float(changes[d].tuned.mean()), "delta": changes[d].delta,
             "questions": changes[d].questions}
            for d in sorted(set(sts) & set(changes), key=lambda d: -sts[d])]


def to_json(corr: Correlation, sts: dict[str, float], changes: dict[str, DomainChange],
            label: str) -> dict:
    return {"label": label, **asdict(corr), "domains": rows(sts, changes)}


def write_csv(sts: dict[str, float], changes: dict[str, DomainChange], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["domain", "sts", "accuracy_base", "accuracy_tuned", "delta_points", "questions"])
        for r in rows(sts, changes):
            w.writerow([r["domain"], f"{r['sts']:.8g}", f"{r['accuracy_base']:.2f}",
                        f"{r['accuracy_tuned']:.2f}", f"{r['delta']:.2f}", r["questions"]])


def scatter(sts: dict[str, float], changes: dict[str, DomainChange], corr: Correlation, path: Path,
            title: str = "", xlabel: str = "STS") -> None:
    """One labelled point per domain, a least-squares line, rho and its interval in a corner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = corr.domains_used or sorted(set(sts) & set(changes))
    x = np.array([sts[d] for d in domains])
    y = np.array([changes[d].delta for d in domains])
    if corr.protocol != "signed":
        y = np.abs(y)
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.scatter(x, y, s=28, color="#3b6ea8", zorder=3)
    for d, xi, yi in zip(domains, x, y):
        ax.annotate(d, (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        grid = np.linspace(x.min(), x.max(), 50)
        ax.plot(grid, slope * grid + intercept, color="#c0392b", lw=1.2, zorder=2)
    ax.axhline(0, color="grey", lw=0.6, ls=":")
    lo, hi = corr.pearson_ci
    ax.text(0.03, 0.96, f"ρ = {corr.pearson:.2f} [{lo:.2f}, {hi:.2f}]\n"
                        f"Spearman = {corr.spearman:.2f} [{corr.spearman_ci[0]:.2f}, {corr.spearman_ci[1]:.2f}]",
            transform=ax.transAxes, va="top", fontsize=8,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.8"})
    ax.set_xlabel(xlabel)
    from sts.engine.evaluation import UNITS

    change = f"{corr.metric} change ({UNITS.get(corr.metric, '')})"
    ax.set_ylabel(change if corr.protocol == "signed" else f"|{change}|")
    if corr.protocol == "paper":
        ax.text(0.97, 0.03, f"{PAPER_DOMAINS} domains chosen from the outcome", transform=ax.transAxes,
                ha="right", fontsize=7, color="0.4")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=150)
    plt.close(fig)


def write(corr: Correlation, sts: dict[str, float], changes: dict[str, DomainChange], out_dir: Path,
          name: str = "correlation", title: str = "", xlabel: str = "STS") -> list[Path]:
    """NAME.json, NAME.csv and NAME.png in out_dir, each written atomically; the rows are the
    domains the protocol used."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if corr.domains_used:
        sts = {d: v for d, v in sts.items() if d in corr.domains_used}
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.csv", out_dir / f"{name}.png"]
    with atomic_path(paths[0]) as tmp:
        tmp.write_text(json.dumps(to_json(corr, sts, changes, title or name), indent=2) + "\n")
    write_csv(sts, changes, paths[1])
    with atomic_path(paths[2]) as tmp:
        scatter(sts, changes, corr, tmp, title, xlabel)
    return paths


def summary(corr: Correlation) -> str:
    return (f"[{corr.metric}, {corr.protocol}] Pearson {corr.pearson:+.3f} "
            f"[{corr.pearson_ci[0]:+.3f}, {corr.pearson_ci[1]:+.3f}]  "
            f"Spearman {corr.spearman:+.3f} [{corr.spearman_ci[0]:+.3f}, {corr.spearman_ci[1]:+.3f}]  "
            f"({corr.domains} domains, {corr.replicates} bootstrap replicates; resampled: "
            f"{', '.join(corr.resampled)})")


# --- the `sts correlate` stage -------------------------------------------------------------

@dataclass
class CorrelateConfig:
    """One `sts correlate` run: STS scores (`sts`) against per-domain changes, from two
    `sts evaluate` outputs (`base`, `tuned`) or from a per-question prediction table."""

    sts: Path
    out: Path = Path("out")
    base: Path | None = None
    tuned: Path | None = None
    table: Path | None = None
    questions: str | None = None
    base_model: str | None = None
    tuned_model: str | None = None
    replicates: int = defaults.REPLICATES
    seed: int = defaults.SEED
    name: str = "correlation"
    protocol: Protocol = defaults.PROTOCOL
    metric: Metric = defaults.METRIC

    def __post_init__(self) -> None:
        self.protocol = parse(Protocol, self.protocol, "--protocol")
        self.metric = parse(Metric, self.metric, "--metric")
        check_positive({"--replicates": self.replicates})
        if self.table is not None:
            if self.base is not None or self.tuned is not None:
                raise UserError("give either --table (with --questions, --base-model, --tuned-model) or --base/--tuned")
            if not self.questions or not self.base_model or not self.tuned_model:
                raise UserError("--table needs --questions, --base-model and --tuned-model")
        elif self.base is None or self.tuned is None:
            raise UserError("give --base and --tuned (`sts evaluate` outputs), or --table")
        elif self.questions or self.base_model or self.tuned_model:
            raise UserError("--questions, --base-model and --tuned-model read a --table; with --base/--tuned "
                            "drop them")


@dataclass
class CorrelateResult:
    correlation: Correlation
    scores: dict[str, float]
    changes: dict[str, DomainChange]
    paths: list[Path]


def run(cfg: CorrelateConfig) -> CorrelateResult:
    """Read the scores and the changes, correlate, write cfg.out/NAME.json|csv|png."""
    from sts.engine.evaluation import Evaluation

    scores, resample = load_sts(cfg.sts)
    if cfg.table is not None:
        assert cfg.questions and cfg.base_model and cfg.tuned_model
        changes = changes_from_table(cfg.table, cfg.questions, cfg.base_model, cfg.tuned_model)
        title = f"{cfg.base_model} -> {cfg.tuned_model}"
    else:
        assert cfg.base is not None and cfg.tuned is not None
        changes = changes_from_evaluations(Evaluation.load(cfg.base), Evaluation.load(cfg.tuned), cfg.metric)
        title = f"{cfg.base.name} -> {cfg.tuned.name}"
    corr = correlate(scores, changes, cfg.replicates, cfg.seed, resample, cfg.protocol, cfg.metric)
    paths = write(corr, scores, changes, cfg.out, cfg.name, title)
    return CorrelateResult(corr, scores, changes, paths)
