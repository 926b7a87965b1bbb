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
