"""Issue 53: the content round's truths, read from `sts validate`'s folder (docs/results/content-round),
as PREREGISTRATION.md defines them. The candidates' judgement against the rule and the targets builds on
these (to come with the round's runs).

A residual is paired question by question: a set's change minus the control's, both against the one
base evaluation, is the control's tuned loss minus the set's (nats/token), so it resamples over the
evaluated questions like any change (`DomainChange`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.common import measured
from experiments.content_round import data as cr

TRUTHS = ("cot_nll", "cot_nll_content", "residual cot_nll", "residual cot_nll_content")
JUDGED = "residual cot_nll_content"


def residual(change: Any, control: Any) -> Any:
    """The set's change beyond the control's, per question: (base - set) - (base - control)."""
    from sts.analysis.correlation import DomainChange

    if change.questions != control.questions:
        raise ValueError("a set and the control must be read on the same questions")
    return DomainChange(base=control.tuned, tuned=change.tuned, gain=change.gain)


def truths(folder: Path = cr.HERE, control: str = "train-1-control") -> dict[str, dict[str, dict[str, Any]]]:
    """truth -> set -> domain -> DomainChange, for every judged set whose tuned evaluation is there
    (the residuals once the control's is too)."""
    names = [p.name for p in sorted(folder.glob("train-*")) if p.is_dir()]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for metric in ("cot_nll", "cot_nll_content"):
        ch = measured(folder, names, metric)
        out[metric] = {n: c for n, c in ch.items() if n != control}
        if control in ch:
            out[f"residual {metric}"] = {n: {d: residual(c[d], ch[control][d]) for d in c}
                                         for n, c in ch.items() if n != control}
    return out


def judged(scores: dict[str, dict[str, dict[str, float]]], t: dict[str, dict[str, dict[str, Any]]]
           ) -> dict[str, dict[str, Any]]:
    """candidate -> its figures (PREREGISTRATION.md): per-set Pearson and the own-domain ranks on the
    judged truth, specificity on `cot_nll_content` (a residual's double-centred matrix is the same),
    and the median per-set Pearson on `cot_nll` (the format guard). `scores`: candidate -> set -> domain."""
    from experiments.common import judge

    out = {}
    for cand, per in scores.items():
        on = judge(per, t[JUDGED], metric="cot_nll_content")
        spec = judge(per, t["cot_nll_content"], metric="cot_nll_content")
        fmt = judge(per, t["cot_nll"], metric="cot_nll")
        out[cand] = {"median_pearson": on["median_pearson"], "per_set": on["per_set"], "own_domain": on["own_domain"],
                     "specificity": spec["specificity"], "specificity_ci": spec["specificity_ci"],
                     "format_median_pearson": fmt["median_pearson"]}
    return out


def rule(figures: dict[str, dict[str, Any]], cost: dict[str, float]) -> dict[str, Any]:
    """The pre-registered rule: (a) qualify at <= 2x grad's cold cost with the specificity interval
    above 0; (b) the highest median per-set Pearson wins, within 0.05 the cheaper; (c) the default
    only if it beats grad's median by >= 0.15 and keeps grad's cot_nll median within 0.1."""
    if "grad" not in cost:
        return {"answer": "not decided: the candidates' cold costs are not measured yet"}
    ok = [c for c, f in figures.items() if c in cost and cost[c] <= 2 * cost["grad"] and f["specificity_ci"][0] > 0]
    if not ok:
        return {"qualified": [], "answer": "grad stays the default: no candidate qualifies"}
    best = max(figures[c]["median_pearson"] for c in ok)
    near = [c for c in ok if figures[c]["median_pearson"] >= best - 0.05]
    winner = min(near, key=lambda c: (cost[c], -figures[c]["median_pearson"], c))
    g, w = figures["grad"], figures[winner]
    default = (winner != "grad" and w["median_pearson"] >= g["median_pearson"] + 0.15
               and w["format_median_pearson"] >= g["format_median_pearson"] - 0.1)
    return {"qualified": ok, "winner": winner, "default": default,
            "answer": f"{winner} becomes the default" if default else
            (f"{winner} ships as --score {winner}; grad stays the default" if winner != "grad" else
             "grad stays the default: it wins")}
