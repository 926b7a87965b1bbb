"""What the count sketch of the gradient scores (`sts.engine.gradients.sketch`, now `sts predict`'s
default) costs the held-out round's numbers: each held-out set's `grad` and `grad-adam`
recomputed from the round's own cached gradients (the same training examples, the same
reference records as the domain side), exactly and sketched, and the round's judge applied to
both. The exact recomputation reproduces the committed scores (checked: that is how the
round's cached gradients are found); only the sketch differs. Nothing is chosen from this: it
reports what the faster setting costs (issue 26, item 3), beside the numbers that chose.

    .venv/bin/python -m experiments.heldout.sketch     # writes SKETCH.md and sketch.json
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from safetensors import safe_open

from experiments.common import RESULTS
from experiments.heldout import fifty

HERE = RESULTS / "heldout"  # its reports (this script is experiments/heldout)

an = fifty.an


def round_sides(sets: dict[str, dict]) -> dict[str, tuple[Any, dict[str, Any]]]:
    """set -> (its cached exact training side, domain -> its cached exact reference side).

    The round ran on a frozen checkout whose cache keys differ from today's (its examples'
    hashes), so its entries are found by what they hold: every cached exact training side and
    domain side is tried, and a set's are the ones whose `grad` reproduces its committed scores
    on every domain (relative 1e-5): a recomputation, checked, not a guess."""
    from sts.cache import cache_root
    from sts.engine.gradients import DomainGradients, TrainingGradients

    trains: list[TrainingGradients] = []
    sides: dict[str, list[Any]] = {}
    for path in sorted((cache_root() / "extract").glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
        except Exception:  # noqa: BLE001 (not a safetensors entry of ours)
            continue
        if meta.get("format") == "sts-gradients-train/1":
            t = TrainingGradients.load(path)
            if not t.sketch:  # a sketched training side (the embedded default's) cannot be recomputed
                trains.append(t)
        elif meta.get("format") == "sts-gradients-domains/1" and meta.get("sketch", "0") == "0":
            d = DomainGradients.load(path)
            for name, g in d.domains.items():
                sides.setdefault(name, []).append(g.double())
    out = {}
    for n, info in sets.items():
        committed = info["scores"]["grad"]
        for t in trains:
            g = t.mean.double()
            pick = {d: next((side for side in sides.get(d, []) if math.isclose(float(g @ side), v, rel_tol=1e-5)),
                            None) for d, v in committed.items()}
            if all(v is not None for v in pick.values()):
                out[n] = (t, pick)
                break
        else:
            raise SystemExit(f"{n}: no cached training and domain sides reproduce its committed grad scores")
    return out


def gradient_scores(t: Any, pick: dict[str, Any], dim: int) -> dict[str, dict[str, float]]:
    """grad and grad-adam of one training side against the picked domain sides, sketched to `dim`
    (0: exact), through the product's own `GradientStats.scores`."""
    from sts.engine.gradients import GradientStats, sketch

    domains = {d: sketch(side, dim) if dim else side for d, side in pick.items()}
    stats = GradientStats(t.mean, t.sq, t.examples, t.tokens, domains, dict.fromkeys(domains, 0), dim)
    return {"grad": stats.scores(adam=False), "grad-adam": stats.scores(adam=True)}


def scores(dims: tuple[int, ...], sets: dict[str, dict]) -> dict[int, dict[str, dict[str, dict[str, float]]]]:
    """dim -> set -> score -> domain -> value, from the exact gradients the round cached."""
    found = round_sides(sets)
    return {dim: {n: gradient_scores(t, pick, dim) for n, (t, pick) in found.items()} for dim in dims}


def main() -> None:
    from sts.defaults import GRADIENT_SKETCH

    GRADIENT_SCORES = ("grad", "grad-adam")  # the gradient scores this report measured (grad-sign came later)

    lib = an.library()
    sets, notes = an.finished(HERE, lib)
    got = scores((0, GRADIENT_SKETCH), sets)
    for n, s in sets.items():
        for score in GRADIENT_SCORES:  # the exact recomputation is the committed one
            committed, again = s["scores"][score], got[0][n][score]
            assert all(math.isclose(committed[d], again[d], rel_tol=1e-5, abs_tol=1e-12) for d in committed), \
                (n, score)
    tables = {}
    for dim in (0, GRADIENT_SKETCH):
        with_dim = {n: dict(s, scores=s["scores"] | got[dim][n]) for n, s in sets.items()}
        tables[dim] = an.table_of(with_dim, lib, list(notes))
    rel = {n: {score: max(abs(got[GRADIENT_SKETCH][n][score][d] - v) / (abs(v) or 1)
                          for d, v in got[0][n][score].items()) for score in GRADIENT_SCORES} for n in sets}
    pearson = {}
    for n in sets:
        for score in GRADIENT_SCORES:
            a, b = got[0][n][score], got[GRADIENT_SKETCH][n][score]
            pearson[f"{n} {score}"] = float(np.corrcoef([a[d] for d in sorted(a)], [b[d] for d in sorted(a)])[0, 1])
    (HERE / "sketch.json").write_text(json.dumps({"sketch": GRADIENT_SKETCH, "scores": got, "max_relative_error": rel,
                                                  "pearson_exact_vs_sketch": pearson,
                                                  "tables": {str(k): v for k, v in tables.items()}},
                                                 indent=1, default=str) + "\n")
    f, ci = an._f, an._ci
    lines = ["# The count sketch of the gradient scores, judged on the held-out round", "",
             "Generated by `.venv/bin/python -m experiments.heldout.sketch` from the round's cached gradients (its "
             "training examples, its reference records as the domain side); the exact recomputation reproduces the "
             "committed scores (checked). Report only: the round chose on the exact scores.", "",
             f"| candidate | specificity, exact [95% CI] | sketched (2^{GRADIENT_SKETCH.bit_length() - 1}) | "
             "swap, exact / sketched | median per-set Pearson, exact / sketched |", "|---|---|---|---|---|"]
    for c in an.CANDIDATES:
        if c.split()[0] not in GRADIENT_SCORES:
            continue
        e, s = tables[0][c], tables[GRADIENT_SKETCH][c]
        lines.append(f"| {c} | {ci(e['specificity'], e['specificity_ci'])} | "
                     f"{ci(s['specificity'], s['specificity_ci'])} | {f(e['swap']['difference'])} / "
                     f"{f(s['swap']['difference'])} | {f(e['median_pearson'])} / {f(s['median_pearson'])} |")
    lines += ["", "Per set and score, the largest relative error of a domain's sketched score, and the Pearson "
              "of the sketched scores with the exact ones over the 10 domains:", ""]
    lines += [f"- {n} {score}: {rel[n][score]:.4f}, Pearson {pearson[f'{n} {score}']:.5f}"
              for n in sets for score in GRADIENT_SCORES]
    (HERE / "SKETCH.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
