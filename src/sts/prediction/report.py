"""Report a prediction: ranking table, JSON, CSV, bar chart, and the features behind it.
Every file is written atomically."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sts import files
from sts.analysis.calibration import HELPS, HURTS, UNCLEAR, Model
from sts.files import atomic_path
from sts.prediction.result import Prediction
from sts.scores.score import spec_of


def table(pred: Prediction) -> str:
    """The ranking as an aligned text table (paste-able into a paper's appendix); with a library,
    each domain's shared and own parts (standard units) beside its score."""
    width = max(len("domain"), *(len(n) for n in pred.scores))
    dec = pred.decomposition
    metric = shown_metric([pred], _primary(pred))
    parts = f"  {'shared':>7}  {'own':>7}  {'sum':>7}" if dec else ""
    change = f"  {'change [90% interval]':>28}  {'':<15}" if metric else ""
    counted = spec_of(pred.score).kind.counts  # what each domain's side averages
    lines = [f"{'rank':>4}  {'domain':<{width}}  {pred.score:>12}{parts}{change}  {counted:>7}  {'questions':>9}"]
    ranking = pred.ranking()
    for rank, name, value, tokens in ranking:
        cells = ""
        if dec:
            cells = ("  " + "  ".join(f"{getattr(dec, k)[name]:>+7.2f}" for k in ("shared", "own", "combined"))
                     if name in dec.shared else f"  {'-':>7}  {'-':>7}  {'-':>7}")
        if metric:
            ch = pred.changes[metric].get(name)
            cells += (f"  {ch.value:>+9.4f} [{ch.low:>+8.4f}, {ch.high:>+8.4f}]  {ch.call:<15}" if ch
                      else f"  {'-':>28}  {'':<15}")
        lines.append(f"{rank:>4}  {name:<{width}}  {value:>12.6g}{cells}  {tokens:>7}  {pred.questions[name]:>9}")
    spec = spec_of(pred.score)
    answers = spec.validated_answers and pred.side.endswith("answer texts")
    validated = spec.validated_answers if answers else spec.validated
    if validated and pred.side:
        validated += f" [this prediction's domain side: {pred.side}]"
    lines.append(f"{pred.score} ranks, as validated: {validated}" if validated else
                 f"{pred.score} has not been validated on measured fine-tuning runs ("
                 + ("experiments/beyond/candidates.py measures it beside sts validate" if spec.reads("lookahead")
                    else "sts validate does it") + ")")
    if dec:
        lines.append(f"shared: what any of the library's {len(dec.library_sets)} training sets did to the domain "
                     f"({dec.metric}, z across domains); own: this set's score beyond the library's typical "
                     f"score (z; its specificity is what was validated, on {dec.metric}, as above); sum: both")
    elif pred.decomposition_note:
        lines.append(pred.decomposition_note)
    if metric:
        cal = pred.calibrations[metric]
        form = Model(cal.model).form
        lines.append(f"change: predicted {metric} change ({cal.units}; positive: better), calibrated on "
                     f"{len(cal.sets)} measured runs ({form})")
        check = pred.calibration_checks.get(metric)
        if check is not None:
            lines.append(f"  its leave-one-set-out record on them: error {check.rmse:.3g} (domain mean alone "
                         f"{check.rmse_domain_mean:.3g}), sign right {check.sign_accuracy:.0%}, "
                         f"{check.coverage:.0%} inside the {check.level:.0%} intervals")
    elif pred.calibration_note:
        lines.append(pred.calibration_note)
    return "\n".join(lines)


def shown_metric(preds: list[Prediction], primary: str | None, needed: list[str] | None = None) -> str | None:
    """The calibrated metric a table shows (one prediction's, or a comparison's): the library's
    own (`primary`) where every prediction has it on the domains `needed`, else the first other
    metric that every one has there, else none (the table shows raw scores)."""
    have = [set(p.changes) for p in preds]
    options = ([primary] if primary else []) + sorted(set.intersection(*have) if have else set())
    for m in options:
        if all(m in p.changes and set(needed or []) <= set(p.changes[m]) for p in preds):
            return m
    return None


def _primary(pred: Prediction) -> str | None:
    return pred.decomposition.metric if pred.decomposition else None


def features_text(pred: Prediction, n: int = 10) -> str:
    if not pred.features:
        return f"score {pred.score}: {pred.formula} (no shifted features)"
    lines = [f"top {min(n, len(pred.features))} of {len(pred.features)} shifted features "
             f"({pred.hook}); shift, then top-activating tokens in the training data:"]
    if not spec_of(pred.score).uses_shift:  # read only to explain a score over no features
        first = pred.config.explain_examples
        read = f", read on at most its first {first} examples" if first else ""
        lines[0] = (f"what the training set shifts, as the SAE reads it (an explanation: {pred.score} does not use "
                    f"these features{read}); " + lines[0])
    for f in pred.features[:n]:
        lines.append(f"  #{f.index:<6} shift {f.shift:.4g}")
        for c in f.contexts[:3]:
            lines.append(f"      {c['activation']:>8.3g}  {c['context']}")
    return "\n".join(lines)


def demonstrations_text(pred: Prediction) -> str:
    """Which demonstrations the icl score used, in one line."""
    demos = pred.demonstrations or {}
    per = demos.get("per_domain", {})
    n = max((len(v) for v in per.values()), default=0)
    source = demos.get("source", "")
    where = ("each domain's first questions (not scored)" if source == "first questions" else source)
    return f"{n} per domain from {where}"


def attribution_text(pred: Prediction, domains: int = 3, n: int = 3) -> str:
    """For the top domains, the training examples whose terms push the score most and least:
    the term, its share of the score and the example's opening. Empty without an attribution."""
    a = pred.attribution
    if a is None:
        return ""
    lines = [f"which examples move each domain: {pred.score} is the sum over its {len(a.examples)} examples of "
             f"(t_i/T) <g_i, g_D> ({a.form}); each example's term, its share of the score, its opening; "
             f"every term: {files.ATTRIBUTION}"]
    for _rank, d, value, _tokens in pred.ranking()[:domains]:
        most, least = a.extremes(d, n)
        col = a.column(d)
        lines.append(f"  {d} ({pred.score} {value:.4g}):")
        for label, rows in (("most", most), ("least", least)):
            for i in rows:
                share = f"{col[i] / value:>+6.0%}" if value else f"{'':>6}"
                e = a.examples[i]
                lines.append(f"    {label:<5} {col[i]:>+10.3g}  {share}  #{e['position']:<4} {e['excerpt']}")
    return "\n".join(lines)


def attribution_csv(pred: Prediction) -> str:
    """Every example's term of every domain's score: one row an example (its position, id,
    response tokens and opening), one column a domain; each column sums to the domain's score."""
    a = pred.attribution
    assert a is not None
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["position", "id", "tokens", "excerpt", *a.domains])
    for e, row in zip(a.examples, a.terms):
        writer.writerow([e["position"], e["id"], e["tokens"], e["excerpt"], *(f"{v:.17g}" for v in row)])
    return buf.getvalue()


def to_json(pred: Prediction) -> dict:
    return {
        "score": pred.score, "formula": pred.formula,
        "method": pred.config.method, "k": pred.config.k, "hook": pred.hook,
        "ranking": [{"rank": r, "domain": d, "sts": v, "tokens": t, "questions": pred.questions[d]}
                    for r, d, v, t in pred.ranking()],
        "scores": pred.scores,
        "shifted_features": [f.index for f in pred.features],
        "features": [asdict(f) for f in pred.features],
        "train_tokens": pred.train_tokens,
        "demonstrations": pred.demonstrations,
        "truncation": pred.truncation,
        "decomposition": asdict(pred.decomposition) if pred.decomposition else None,
        "changes": {m: {d: asdict(c) | {"call": c.call} for d, c in by_d.items()} for m, by_d in pred.changes.items()},
        "calibration": {m: {"model": c.model, "units": c.units, "level": c.level, "sets": c.sets,
                            "slope": c.fit.slope, "loso": asdict(pred.calibration_checks[m])
                            if m in pred.calibration_checks else None} for m, c in pred.calibrations.items()},
        "config": asdict(pred.config),
        "attribution": asdict(pred.attribution) if pred.attribution else None,
    }


def write(pred: Prediction, out_dir: Path) -> list[Path]:
    """out/sts.json, out/sts.csv, out/sts.png, out/sts_samples.safetensors (what `sts correlate`
    needs to resample the shifted features; icl/sft shifts only) and out/attribution.csv (grad)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / files.STS_JSON, out_dir / files.STS_CSV, out_dir / files.STS_PNG]
    samples = out_dir / files.SAMPLES
    if pred.samples is not None:
        pred.samples.save(samples)
        paths.append(samples)
    else:
        samples.unlink(missing_ok=True)  # never leave a stale one from an earlier run
    with atomic_path(paths[0]) as tmp:
        tmp.write_text(json.dumps(to_json(pred), indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    dec = pred.decomposition
    metric = shown_metric([pred], _primary(pred))
    writer.writerow(["rank", "domain", "sts", "tokens", "questions"] + (["shared", "own", "combined"] if dec else [])
                    + ([f"{metric}_change", "low", "high", "call"] if metric else []))
    for r, d, v, t in pred.ranking():
        parts = [f"{getattr(dec, k)[d]:.6g}" if d in dec.shared else "" for k in ("shared", "own", "combined")] \
            if dec else []
        if metric:
            ch = pred.changes[metric].get(d)
            parts += [f"{ch.value:.6g}", f"{ch.low:.6g}", f"{ch.high:.6g}", ch.call] if ch else ["", "", "", ""]
        writer.writerow([r, d, f"{v:.8g}", t, pred.questions[d], *parts])
    with atomic_path(paths[1]) as tmp:
        tmp.write_text(buf.getvalue())
    with atomic_path(paths[2]) as tmp:
        draw(figure(pred), tmp)
    attribution = out_dir / files.ATTRIBUTION
    if pred.attribution is not None:
        with atomic_path(attribution) as tmp:
            tmp.write_text(attribution_csv(pred))
        paths.append(attribution)
    else:
        attribution.unlink(missing_ok=True)
    generated = out_dir / files.GENERATED
    if pred.generated is not None:  # --responses generated: the texts the shift was read on
        with atomic_path(generated) as tmp:
            tmp.write_text("".join(json.dumps(g) + "\n" for g in pred.generated))
        paths.append(generated)
    else:
        generated.unlink(missing_ok=True)
    return paths


CALL_COLOURS = {HELPS: "#2a7d4f", HURTS: "#b03a2e", UNCLEAR: "#8a8f94"}


@dataclass
class Figure:
    """What out/sts.png draws, as data: the picture is drawn from this alone, so a test reads the
    figure's content here rather than in its pixels. Rows run top to bottom."""

    title: str
    xlabel: str
    domains: list[str]
    values: list[float]  # the calibrated change, or the raw score where there is no calibration
    low: list[float] | None = None  # the interval's ends and the call, calibrated only
    high: list[float] | None = None
    calls: list[str] | None = None
    own: list[float | None] | None = None  # the set's own part (z) per row, with a library
    note: str = ""  # a footnote: what is not drawn, or what a raw score can and cannot say

    @property
    def calibrated(self) -> bool:
        return self.low is not None


def figure(pred: Prediction) -> Figure:
    """Where the domains have a calibration: each domain's predicted change with its interval and
    its call, ordered by the change, `own` beside it; where not, the raw score labelled with its
    formula in words. The title names only what the score used (the shift and k only for a score
    over shifted features)."""
    cfg, spec, dec = pred.config, spec_of(pred.score), pred.decomposition
    used = f"{cfg.method} shift, k={cfg.k}" if spec.uses_shift else ""
    name = Path(str(cfg.train)).name
    metric = shown_metric([pred], _primary(pred))
    if metric is None:
        rows = [(d, v) for _, d, v, _ in pred.ranking()]
        return Figure(title=f"{name}: raw {pred.score} score per domain" + (f" ({used})" if used else ""),
                      xlabel=spec.label or spec.formula, domains=[d for d, _ in rows], values=[v for _, v in rows],
                      note="raw score, no calibration: it ranks the domains within this set, "
                           "not in the metric's units. " + (pred.calibration_note or ""))
    cal, changes = pred.calibrations[metric], pred.changes[metric]
    shown = sorted(changes, key=lambda d: (-changes[d].value, d))
    missing = sorted(set(pred.scores) - set(changes))
    own = [dec.own.get(d) for d in shown] if dec else None
    return Figure(
        title=f"{name}: predicted {metric} change per domain ({', '.join(filter(None, [pred.score, used]))}; "
              f"calibrated on {len(cal.sets)} runs)",
        xlabel=f"predicted {metric} change ({cal.units}; positive: better), {cal.level:.0%} interval",
        domains=shown, values=[changes[d].value for d in shown], low=[changes[d].low for d in shown],
        high=[changes[d].high for d in shown], calls=[changes[d].call for d in shown], own=own,
        note=f"not calibrated (no measured run): {', '.join(missing)}" if missing else "")


def draw(fig_data: Figure, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = fig_data
    n = len(f.domains)
    y = list(range(n))[::-1]  # the first row on top
    fig, ax = plt.subplots(figsize=(8, 0.38 * n + 1.6))
    if f.calibrated:
        assert f.low is not None and f.high is not None and f.calls is not None
        for call, colour in CALL_COLOURS.items():
            rows = [i for i in range(n) if f.calls[i] == call]
            if not rows:
                continue
            ax.errorbar([f.values[i] for i in rows], [y[i] for i in rows],
                        xerr=[[f.values[i] - f.low[i] for i in rows], [f.high[i] - f.values[i] for i in rows]],
                        fmt="o", color=colour, ecolor=colour, capsize=3, label=call)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.legend(loc="lower right", fontsize=8, frameon=False)
        if f.own is not None:
            ax.text(1.01, 1.0, "own (z)", transform=ax.transAxes, fontsize=8, va="bottom")
            for i, o in enumerate(f.own):
                if o is not None:
                    ax.text(1.01, y[i], f"{o:+.2f}", transform=ax.get_yaxis_transform(), fontsize=8, va="center",
                            fontweight="bold" if o >= 1 else "normal")
    else:
        ax.barh(y, f.values, color="#3b6ea8")
    ax.set_yticks(y, f.domains)
    ax.set_xlabel(f.xlabel, fontsize=9)
    ax.set_title(f.title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    if f.note:
        fig.text(0.01, 0.005, f.note, fontsize=7, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04 if f.note else 0, 1, 1))
    fig.savefig(path, format="png", dpi=150)
    plt.close(fig)
