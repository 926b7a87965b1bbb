"""Several training sets (and mixtures of them) side by side: which one to fine-tune on.

`sts predict --train A --train B [--mix-grid N] [--target DOMAIN]` extracts each set once
(cached), predicts every mixture from its parts' statistics (`sts.engine.mixture`), splits and
calibrates each candidate with the library (`sts.prediction.libraries.Libraries`), and writes the
candidates x domains table. Across sets, only calibrated changes share a unit; without a
calibration the table shows scores, which rank domains within a set but are not comparable
between sets, and says so.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from sts import defaults, files
from sts.analysis.calibration import Model
from sts.data.datasets import DomainDemos
from sts.data.examples import Dataset, Example
from sts.engine.gradients import GradientStats
from sts.engine.mixture import Candidate, candidates, example_weights, mix_paired
from sts.errors import UserError
from sts.files import atomic_path
from sts.prediction.config import PredictConfig
from sts.prediction.extraction import extract_all, responses, reused
from sts.prediction.libraries import Libraries
from sts.prediction.predict import prediction, prepare, single
from sts.prediction.report import shown_metric
from sts.prediction.result import Prediction
from sts.prediction.session import Session
from sts.scores.score import Extraction, spec_of

BOOTSTRAP = 200  # resamples of the training examples behind a target margin


@dataclass
class Margin:
    first: str
    second: str
    margin: float  # first's target value minus second's
    se: float | None  # bootstrap standard error of the margin (None: the score has no resampling)
    level: float

    @property
    def clear(self) -> bool | None:
        if self.se is None:
            return None
        return self.margin > NormalDist().inv_cdf(0.5 + self.level / 2) * self.se


@dataclass
class Comparison:
    config: PredictConfig
    candidates: list[str]
    predictions: dict[str, Prediction]
    metric: str | None  # the calibrated metric the table shows; None: raw scores
    units: str
    targets: list[str] = field(default_factory=list)
    target_values: dict[str, float] = field(default_factory=dict)  # candidate -> mean over targets
    margin: Margin | None = None

    @property
    def domains(self) -> list[str]:
        first = self.predictions[self.candidates[0]]
        return sorted(first.changes[self.metric]) if self.metric else sorted(first.scores)

    def value(self, candidate: str, domain: str) -> float:
        pred = self.predictions[candidate]
        return pred.changes[self.metric][domain].value if self.metric else pred.scores[domain]

    def best(self) -> dict[str, str | None]:
        """Each domain's candidate with the highest predicted value (None where the first two
        are equal: a calibration that keeps the domain means alone predicts one value for all)."""
        out: dict[str, str | None] = {}
        for d in self.domains:
            ranked = sorted(self.candidates, key=lambda c: -self.value(c, d))
            tied = len(ranked) > 1 and math.isclose(self.value(ranked[0], d), self.value(ranked[1], d),
                                                   rel_tol=1e-9, abs_tol=1e-12)
            out[d] = None if tied else ranked[0]
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per candidate and domain: `pandas.DataFrame(comparison.rows())`, or
        `pandas.read_csv("out/sts.csv")`, is the whole table."""
        best = self.best()
        out = []
        for c in self.candidates:
            pred = self.predictions[c]
            dec = pred.decomposition
            for d in sorted(pred.scores):
                row: dict[str, Any] = {"candidate": c, "domain": d, "score": pred.scores[d],
                                       "shared": dec.shared.get(d) if dec else None,
                                       "own": dec.own.get(d) if dec else None}
                ch = pred.changes.get(self.metric or "", {}).get(d)
                row |= {"metric": self.metric, "change": ch.value if ch else None, "low": ch.low if ch else None,
                        "high": ch.high if ch else None, "call": ch.call if ch else None,
                        "best": best.get(d) == c}
                out.append(row)
        return out


def _mixture_extraction(c: Candidate, extractions: dict[str, Extraction], sets: dict[str, Dataset]) -> Extraction:
    a = example_weights(c, {p.spec: len(sets[p.spec].examples) for p in c.parts})
    first = extractions[c.parts[0].spec]
    # a readout every part has (a part too small for the explanation's icl pairs has none)
    readouts = [r for r in first.shift if all(r in extractions[p.spec].shift for p in c.parts)]
    shift = {r: mix_paired([(extractions[p.spec].shift[r], a[p.spec]) for p in c.parts]) for r in readouts}
    grads = None
    if first.gradients is not None:
        grads = GradientStats.mixed([(extractions[p.spec].gradients, a[p.spec]) for p in c.parts])  # type: ignore[misc]
    return dataclasses.replace(first, shift=shift, gradients=grads, texts=None)


def _replicates(pred: Prediction, targets: list[str], metric: str | None, seed: int) -> np.ndarray | None:
    """Bootstrap values of the candidate's target mean, resampling its training examples."""
    from sts.analysis.correlate import resampler

    draw = resampler(pred.samples)
    if draw is None:
        return None
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(BOOTSTRAP):
        scores = draw(rng)
        if metric:
            changes = pred.calibrations[metric].predict(scores)
            out.append(float(np.mean([changes[t].value for t in targets])))
        else:
            out.append(float(np.mean([scores[t] for t in targets])))
    return np.array(out)


def predict(cfg: PredictConfig | None = None, train: Dataset | None = None,
            domains: dict[str, list[Example]] | None = None, progress: Callable[[str], None] = lambda _m: None,
            demos: DomainDemos | None = None, *, model: Any = None, tokenizer: Any = None, sae: Any = None
            ) -> Prediction | Comparison:
    """`sts.predict`: one training set's `Prediction`, or, where `cfg.train` is a list (several
    sets, or a mixture's weighted parts), a `Comparison` of one Prediction per candidate
    (`.rows()` is DataFrame-ready). Arguments as `sts.prediction.predict.prepare`'s. Launched as
    several processes (`torchrun --nproc-per-node N`), they share the gradient passes and every
    process returns the same prediction (`sts.engine.distributed`); the main one writes the cache."""
    from sts.engine.distributed import join_run

    _, progress = join_run((cfg or PredictConfig()).placement.resolved()[0], progress)
    p = prepare(cfg, train, domains, progress, demos, model=model, tokenizer=tokenizer, sae=sae)
    if p.several:
        check_comparison(p.cfg, p.domains)
    p.announce(progress)
    if not p.several:
        return single(p, progress)
    return compare(p.cfg, p.sets, p.domains, p.demos, p.session, progress, p.libs)


def check_comparison(cfg: PredictConfig, domains: dict[str, list[Example]]) -> tuple[list[Candidate], list[str]]:
    """The candidates and the target domains, or bad input (before anything runs)."""
    assert isinstance(cfg.train, list)
    cands = candidates(cfg.train, cfg.mix_grid)
    if not spec_of(cfg.score).kind.mixes and any(c.is_mixture for c in cands):
        what = "one set's text" if spec_of(cfg.score).reads("texts") else "one set's own optimizer steps"
        raise UserError(f"--score {cfg.score} reads {what} and has no mixture; use --score grad (mixtures mix its "
                        "statistics exactly) or drop the weights / --mix-grid")
    targets = [t.strip() for group in cfg.target or [] for t in group.split(",") if t.strip()]
    unknown = [t for t in targets if t not in domains]
    if unknown:
        raise UserError(f"--target {', '.join(unknown)}: not a domain of {cfg.domains}; its domains: "
                        f"{', '.join(sorted(domains))}")
    return cands, targets


def compare(cfg: PredictConfig, sets: dict[str, Dataset], domains: dict[str, list[Example]],
            demos: DomainDemos | None, session: Session, progress: Callable[[str], None],
            libs: Libraries) -> Comparison:
    cands, targets = check_comparison(cfg, domains)
    extractions: dict[str, Extraction] = {}
    for i, (spec, ds) in enumerate(sets.items(), 1):
        progress(f"training set {i} of {len(sets)}: {spec}")
        one = dataclasses.replace(cfg, train=spec, target=None, mix_grid=0)
        sets[spec] = responses(one, ds, session, progress)
        extractions[spec] = extract_all(one, sets[spec], domains, (cfg.score,), demos, progress, session)
    # one library for every candidate: the runs of any set compared are left out of all of them,
    # so that differences between candidates come from their scores, never from what was left out
    everything = list(sets)
    preds: dict[str, Prediction] = {}
    for c in cands:
        one = dataclasses.replace(cfg, train=c.name, target=None, mix_grid=0)
        if c.is_mixture:
            ext = _mixture_extraction(c, extractions, sets)
            first = sets[c.parts[0].spec]
            ds = dataclasses.replace(first, spec=c.name,
                                     examples=[e for p in c.parts for e in sets[p.spec].examples])
        else:
            ext, ds = extractions[c.name], sets[c.name]
        preds[c.name] = libs.apply(prediction(one, ext, cfg.score, ds, session), everything)
    reused(session, progress)
    primary = libs.calibration.metric if libs.calibration is not None else None
    metric = shown_metric(list(preds.values()), primary, targets)
    units = next(iter(preds.values())).calibrations[metric].units if metric else ""
    comp = Comparison(cfg, [c.name for c in cands], preds, metric, units, targets)
    if targets:
        comp.target_values = {c: float(np.mean([comp.value(c, t) for t in targets])) for c in comp.candidates}
        order = sorted(comp.candidates, key=lambda c: -comp.target_values[c])
        if len(order) >= 2:
            a, b = order[0], order[1]
            ra = _replicates(preds[a], targets, metric, cfg.seed)
            rb = _replicates(preds[b], targets, metric, cfg.seed + 1)
            se = float(np.sqrt(ra.var(ddof=1) + rb.var(ddof=1))) if ra is not None and rb is not None else None
            comp.margin = Margin(a, b, comp.target_values[a] - comp.target_values[b], se, defaults.INTERVAL_LEVEL)
    return comp


# --- report ------------------------------------------------------------------------------------

def labels(comp: Comparison) -> dict[str, str]:
    """Short column labels (S1, S2, ...; M1, ... for mixtures) for long specs."""
    out, s, m = {}, 0, 0
    for c in comp.candidates:
        if " + " in c:
            m += 1
            out[c] = f"M{m}"
        else:
            s += 1
            out[c] = f"S{s}"
    return out


def text(comp: Comparison) -> str:
    lab = labels(comp)
    best = comp.best()
    what = (f"predicted change in {comp.metric} ({comp.units}), calibrated on measured runs"
            if comp.metric else f"{comp.predictions[comp.candidates[0]].score} score (uncalibrated: "
            "it ranks domains within a set; across sets it is not on one scale)")
    width = max(len("domain"), *(len(d) for d in comp.domains))
    lines = [what + "; * marks each domain's best candidate", ""]
    lines.append(f"{'domain':<{width}}  " + "  ".join(f"{lab[c]:>10}" for c in comp.candidates))
    for d in comp.domains:
        cells = [f"{comp.value(c, d):>+9.4g}{'*' if best[d] == c else ' '}" for c in comp.candidates]
        lines.append(f"{d:<{width}}  " + "  ".join(cells))
    if comp.metric:
        cal = comp.predictions[comp.candidates[0]].calibrations[comp.metric]
        if cal.model == Model.M0:
            lines += ["", f"the calibration keeps the domain means only: no term of the {cal.score} score lowered its "
                      "leave-one-set-out error on the library, so it predicts the same change for every set and "
                      "cannot tell them apart (the own parts below are the score's view, not calibrated)"]
        lines.append("")
        lines.append(f"{'calls':<{width}}  " + "  ".join(
            f"{sum(ch.call == 'helps' for ch in comp.predictions[c].changes[comp.metric].values()):>3}+ "
            f"{sum(ch.call == 'hurts' for ch in comp.predictions[c].changes[comp.metric].values()):>2}-  "
            for c in comp.candidates) + "  (domains called helps / hurts at "
            f"{defaults.INTERVAL_LEVEL:.0%} intervals)")
    decs = [comp.predictions[c].decomposition for c in comp.candidates]
    if all(decs):
        lines += ["", "own part (z: the set's score beyond the library's typical profile; what sets it apart)"]
        for d in comp.domains:
            lines.append(f"{d:<{width}}  " + "  ".join(
                f"{dec.own[d]:>+10.2f}" if dec and d in dec.own else f"{'-':>10}" for dec in decs))
    lines += [""] + [f"{lab[c]} = {c}" for c in comp.candidates]
    if comp.targets:
        lines.append("")
        lines.append(f"for {', '.join(comp.targets)}:")
        for rank, c in enumerate(sorted(comp.candidates, key=lambda c: -comp.target_values[c]), 1):
            lines.append(f"  {rank}. {lab[c]:<4} {comp.target_values[c]:+.4g}{_target_intervals(comp, c)}  {c}")
        mg = comp.margin
        if mg is not None:
            if mg.se is None:
                verdict = "no bootstrap for this score and shift: the margin's uncertainty is unknown"
            else:
                verdict = (f"bootstrap SE {mg.se:.3g} over training examples: "
                           + ("the margin exceeds it" if mg.clear else "within the uncertainty: no clear winner")
                           + f" at {mg.level:.0%}")
            lines.append(f"  margin {lab[mg.first]} over {lab[mg.second]}: {mg.margin:+.4g} ({verdict})")
        decs = [comp.predictions[c].decomposition for c in comp.candidates]
        if mg is not None and mg.margin == 0 and all(dec and all(t in dec.own for t in comp.targets) for dec in decs):
            own: dict[str, float] = {}
            for c, dec in zip(comp.candidates, decs):
                assert dec is not None
                own[c] = float(np.mean([dec.own[t] for t in comp.targets]))
            order = sorted(comp.candidates, key=lambda c: -own[c])
            lines.append("  the calibrated values tie; by the score's own part instead (z, not validated for "
                         "choosing between sets): " + ", ".join(f"{lab[c]} {own[c]:+.2f}" for c in order))
    return "\n".join(lines)


def _target_intervals(comp: Comparison, candidate: str) -> str:
    """A calibrated candidate's interval and call on each target (its prediction's, as sts.csv holds)."""
    if not comp.metric:
        return ""
    changes = comp.predictions[candidate].changes[comp.metric]
    parts = [f"{t + ' ' if len(comp.targets) > 1 else ''}[{changes[t].low:+.3g}, {changes[t].high:+.3g}] "
             f"{changes[t].call}" for t in comp.targets]
    return "  " + "; ".join(parts)


def write(comp: Comparison, out_dir: Path) -> list[Path]:
    """out/sts.json (everything), out/sts.csv (one row per candidate and domain), out/sts.png
    (the heatmap)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / files.STS_JSON, out_dir / files.STS_CSV, out_dir / files.STS_PNG]
    (out_dir / files.SAMPLES).unlink(missing_ok=True)  # several candidates: no single samples file
    rows = comp.rows()
    doc = {"kind": "comparison", "score": comp.predictions[comp.candidates[0]].score, "metric": comp.metric,
           "units": comp.units, "candidates": comp.candidates, "labels": labels(comp), "best": comp.best(),
           "targets": comp.targets, "target_values": comp.target_values,
           "margin": asdict(comp.margin) | {"clear": comp.margin.clear} if comp.margin else None,
           "calibration": {c: {m: _calibration_json(cal) for m, cal in p.calibrations.items()}
                           for c, p in comp.predictions.items()},
           "rows": rows, "config": asdict(comp.config)}
    with atomic_path(paths[0]) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(buf.getvalue())
    with atomic_path(paths[2]) as tmp:
        heatmap(comp, tmp)
    return paths


def _calibration_json(cal: Any) -> dict[str, Any]:
    return {"model": cal.model, "units": cal.units, "level": cal.level, "sets": cal.sets,
            "loso_rmse": cal.loso_rmse, "slope": cal.fit.slope}


def heatmap(comp: Comparison, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lab = labels(comp)
    domains = comp.domains
    m = np.array([[comp.value(c, d) for d in domains] for c in comp.candidates])
    fig, ax = plt.subplots(figsize=(0.75 * len(domains) + 2.5, 0.5 * len(comp.candidates) + 1.8))
    lim = float(np.abs(m).max()) or 1.0
    im = ax.imshow(m, cmap="RdBu" if comp.metric else "viridis", vmin=-lim if comp.metric else None,
                   vmax=lim if comp.metric else None, aspect="auto")
    best = comp.best()
    for i, c in enumerate(comp.candidates):
        for j, d in enumerate(domains):
            ax.text(j, i, f"{m[i, j]:.2g}" + ("*" if best[d] == c else ""), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(domains)), domains, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(comp.candidates)), [lab[c] for c in comp.candidates], fontsize=8)
    fig.colorbar(im, ax=ax, label=f"{comp.metric} change ({comp.units})" if comp.metric else "score")
    score = comp.predictions[comp.candidates[0]].score
    ax.set_title(f"Predicted {'change' if comp.metric else 'score'} by training set ({score}; * best per domain)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=150)
    plt.close(fig)
