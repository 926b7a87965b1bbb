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

# the pre-registered candidates; `act` and `cosine` as shipped are computed beside them as references
CANDIDATES = ("grad", "grad-content", "grad-ctrl", "trackstar", "rds+", "act-untemplated", "cosine-untemplated",
              "lexical", "bm25", "lexical+grad", "bm25+grad", "grad +lib")
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
    figures = {c: f for c, f in figures.items() if c in CANDIDATES}
    uncosted = sorted(c for c in figures if c not in cost)
    if uncosted:
        return {"answer": f"not decided: no cold cost measured for {', '.join(uncosted)}"}
    ok = [c for c, f in figures.items() if cost[c] <= 2 * cost["grad"] and f["specificity_ci"][0] > 0]
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


# The round's sets 2-4 are the second round's runs (same records, recipe and evaluated records);
# their second seeds are docs/results/seeds/beyond's, evaluated on the 10 categories.
SEED_SETS = {"train-2-mmlu-pro-cot-train-engineering": "train-1-mmlu-pro-cot-train-engineering",
             "train-3-math500-test-100-200": "train-2-math500-test-100-200",
             "train-4-alpaca-en-demo-100-200": "train-3-alpaca-en-demo-100-200"}
SPLITS = 200
TARGETS = {"median_pearson": 0.6, "of_seed_ceiling": 0.8, "worst_set": 0.0, "specificity": 0.6, "own_top3": 2 / 3}


def seed_ceilings(t: dict[str, dict[str, dict[str, Any]]], control: str = "train-1-control",
                  folder: Path = cr.HERE) -> dict[str, dict[str, float]]:
    """truth -> set -> the Pearson across domains of the set's seed-0 and seed-1 changes (the
    residuals once the control's second seed is there), on the domains both read."""
    import numpy as np

    from experiments.common import RESULTS
    from sts.analysis import correlation as co
    from sts.engine.evaluation import Evaluation

    seeds = RESULTS / "seeds"
    base = folder / "eval-base-reference"
    if not base.is_dir():
        return {}
    b = Evaluation.load(base)
    ctrl1 = seeds / "content-round" / control / "eval-tuned-reference"
    out: dict[str, dict[str, float]] = {}
    for metric in ("cot_nll", "cot_nll_content"):
        c1 = co.changes_from_evaluations(b, Evaluation.load(ctrl1), metric) if ctrl1.is_dir() else None
        for name, second in SEED_SETS.items():
            tuned = seeds / "beyond" / second / "eval-tuned-reference"
            if name not in t.get(metric, {}) or not tuned.is_dir():
                continue
            s1 = co.changes_from_evaluations(b, Evaluation.load(tuned), metric)
            s0 = t[metric][name]
            ds = sorted(set(s1) & set(s0))
            out.setdefault(metric, {})[name] = co._pearson(np.array([s0[d].delta for d in ds]),
                                                           np.array([s1[d].delta for d in ds]))
            r0 = t.get(f"residual {metric}", {}).get(name)
            if c1 is not None and r0 is not None:
                r1 = {d: residual(s1[d], c1[d]) for d in ds}
                out.setdefault(f"residual {metric}", {})[name] = co._pearson(
                    np.array([r0[d].delta for d in ds]), np.array([r1[d].delta for d in ds]))
    return out


def split_ceilings(t: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """truth -> {"per_set": set -> median split-half (Spearman-Brown), "specificity": median,
    [5th, 95th]} as docs/results/ceiling computes them (a residual's halves: the same questions
    of the set and the control)."""
    import numpy as np

    from experiments.ceiling.ceiling import _sb, _summary, halves
    from sts.analysis.correlation import _pearson, double_centre

    out: dict[str, dict[str, Any]] = {}
    for truth, ch in t.items():
        if len(ch) < 2:
            continue
        rng = np.random.default_rng(0)
        domains = sorted(set.intersection(*(set(c) for c in ch.values())))
        per: dict[str, list[float]] = {s: [] for s in ch}
        spec: list[float] = []
        for _ in range(SPLITS):
            a, b = halves(ch, domains, rng)
            for i, s in enumerate(ch):
                per[s].append(_sb(_pearson(a[i], b[i])))
            spec.append(_sb(_pearson(double_centre(a).ravel(), double_centre(b).ravel())))
        out[truth] = {"per_set": {s: _summary(v)["median"] for s, v in per.items()},
                      "specificity": _summary(spec)}
    return out


def candidate_scores(path: Path | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """candidate -> set -> domain, from candidates.json (set -> candidate -> domain), with the
    pre-registered `lexical+grad` (z over the 14 domains within the set, equal weights) added."""
    from experiments.common import read_json
    from experiments.content_round.candidates import OUT, _z

    by_set = read_json(path or OUT, {"scores": {}})["scores"]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, cands in by_set.items():
        if "lexical" in cands and "grad" in cands:
            zl, zg = _z(cands["lexical"]), _z(cands["grad"])
            cands = cands | {"lexical+grad": {d: zl[d] + zg[d] for d in zg}}
        for cand, scores in cands.items():
            out.setdefault(cand, {})[name] = scores
    return out


def costs(path: Path = cr.HERE / "cost.json") -> dict[str, float]:
    """candidate -> cold cost as a multiple of grad's (benchmarks/content_cost.py): the gradient
    family, rds+ and bm25 measured in one process, the shipped scores as `sts predict` runs them;
    a z-sum costs grad plus its other part."""
    from experiments.common import read_json

    c = read_json(path, None)
    if c is None:
        return {}
    inside, user = c["in_process_ratio"], c["as_user_ratio"]
    out = {k: v for k, v in inside.items()}
    out |= {"act": user["act"], "act-untemplated": user["act"], "cosine": user["cosine"],
            "cosine-untemplated": user["cosine"], "lexical": user["lexical"], "grad +lib": user["grad"]}
    out["lexical+grad"] = 1.0 + user["lexical"]
    out["bm25+grad"] = 1.0 + inside["bm25"]
    return out


def targets(f: dict[str, Any], seed_ceiling: float | None) -> dict[str, tuple[float, float, bool]]:
    """target -> (value, margin, met) for one candidate's figures on the judged truth."""
    import statistics

    med = f["median_pearson"]
    own = [r for r in f["own_domain"].values() if r["change_rank"] <= 3]
    got: dict[str, tuple[float, float, bool]] = {
        "median per-set Pearson >= 0.6": (med, med - TARGETS["median_pearson"], med >= TARGETS["median_pearson"]),
        "no set below 0": (min(f["per_set"].values()), min(f["per_set"].values()),
                           min(f["per_set"].values()) >= TARGETS["worst_set"]),
        "specificity >= 0.6, interval above 0": (
            f["specificity"], min(f["specificity"] - TARGETS["specificity"], f["specificity_ci"][0]),
            f["specificity"] >= TARGETS["specificity"] and f["specificity_ci"][0] > 0),
    }
    if seed_ceiling is not None:
        frac = med / seed_ceiling
        got["median >= 0.8 of the seed ceiling"] = (frac, frac - TARGETS["of_seed_ceiling"],
                                                    frac >= TARGETS["of_seed_ceiling"])
    if own:
        share = statistics.mean(r["score_rank"] <= 3 for r in own)
        got[f"own domain in the top 3 ({len(own)} sets where the truth puts it there)"] = (
            share, share - TARGETS["own_top3"], share >= TARGETS["own_top3"])
    return got


def report(folder: Path = cr.HERE, candidates: Path | None = None) -> None:
    """ROUND.md and round.json (in `folder`): the judged truth's seed ceiling first, every truth's
    ceilings, every candidate on every truth, the targets with their margins and the rule's answer."""
    import statistics

    from experiments.common import write_json

    t = truths(folder)
    seed = seed_ceilings(t, folder=folder)
    split = split_ceilings(t)
    scores = candidate_scores(candidates)
    cost = costs(folder / "cost.json")
    figures = {truth: {c: f for c, f in _judged_on(scores, t, truth).items()} for truth in t if len(t[truth]) >= 2}
    judged_figs = judged(scores, t) if JUDGED in t and len(t[JUDGED]) >= 2 else {}
    seed_med = statistics.median(seed[JUDGED].values()) if seed.get(JUDGED) else None
    answer = rule(judged_figs, cost) if judged_figs else {"answer": "not decided: the judged truth is not measured yet"}
    write_json({"seed_ceilings": seed, "split_ceilings": split, "figures": figures, "judged": judged_figs,
                "costs": cost, "rule": answer}, folder / "round.json")
    lines = ["# The content round (issue 53): results", "",
             "Generated by `.venv/bin/python -m experiments.content_round.analyse report` from the round's folder "
             "(`run.sh`), `candidates.json`, `cost.json` and docs/results/seeds; the rule and targets are "
             "PREREGISTRATION.md's, written before any stage ran.", "",
             f"Sets measured: {', '.join(sorted(t.get('cot_nll', {}))) or 'none yet'}.", ""]
    lines += ["## The judged truth's seed ceiling (first, as the issue asks)", ""]
    if seed.get(JUDGED):
        low = seed_med is not None and seed_med < 0.5
        flag = " **below 0.5: the truth does not reproduce on this model**" if low else ""
        lines.append(f"`{JUDGED}`, sets 2-4 at seeds 0 and 1, 10 categories: " +
                     ", ".join(f"{s} {r:+.3f}" for s, r in seed[JUDGED].items()) + f"; median {seed_med:+.3f}{flag}.")
    else:
        lines.append("Not measured yet (needs the round's control and `seeds.py control`).")
    lines += ["", "## Ceilings of every truth", "", "| truth | seed ceiling (sets 2-4) | split-half per set (median) | "
              "split-half specificity [5th, 95th] |", "|---|---|---|---|"]
    for truth in TRUTHS:
        s = seed.get(truth, {})
        sp = split.get(truth)
        lines.append(f"| `{truth}` | " + (", ".join(f"{r:+.2f}" for r in s.values()) or "-") + " | " +
                     (f"{statistics.median(sp['per_set'].values()):+.2f}" if sp else "-") + " | " +
                     (f"{sp['specificity']['median']:+.2f} [{sp['specificity']['p05']:+.2f}, "
                      f"{sp['specificity']['p95']:+.2f}]" if sp else "-") + " |")
    if judged_figs:
        sets = sorted(next(iter(judged_figs.values()))["per_set"])
        lines += ["", f"## Every candidate on the judged truth (`{JUDGED}`)", "",
                  "| candidate | " + " | ".join(sets) + " | median | of the split ceiling | specificity [95% CI] | "
                  "`cot_nll` median (format guard) | cold cost / grad |",
                  "|---|" + "---|" * (len(sets) + 5)]
        ceil = split.get(JUDGED, {}).get("per_set", {})
        for cand, f in sorted(judged_figs.items(), key=lambda kv: -kv[1]["median_pearson"]):
            frac = statistics.median(f["per_set"][s] / ceil[s] for s in sets if ceil.get(s)) if ceil else float("nan")
            lines.append(f"| `{cand}` | " + " | ".join(f"{f['per_set'][s]:+.2f}" for s in sets) +
                         f" | {f['median_pearson']:+.2f} | {frac:.2f} | {f['specificity']:+.2f} "
                         f"[{f['specificity_ci'][0]:+.2f}, {f['specificity_ci'][1]:+.2f}] | "
                         f"{f['format_median_pearson']:+.2f} | "
                         + (f"{cost[cand]:.2f}" if cand in cost else "-") + " |")
        lines += ["", "## Median per-set Pearson under each truth", "",
                  "| candidate | " + " | ".join(f"`{x}`" for x in figures) + " |", "|---|" + "---|" * len(figures)]
        for cand in sorted(judged_figs, key=lambda c: -judged_figs[c]["median_pearson"]):
            lines.append(f"| `{cand}` | " + " | ".join(
                f"{figures[x][cand]['median_pearson']:+.2f}" if cand in figures[x] else "-" for x in figures) + " |")
        lines += ["", "## The targets (on the judged truth), with their margins", ""]
        for cand in dict.fromkeys(["grad", answer.get("winner", "grad")]):
            lines += [f"`{cand}`:", "", "| target | value | margin | met |", "|---|---|---|---|"]
            for name, (v, m, ok) in targets(judged_figs[cand], seed_med).items():
                lines.append(f"| {name} | {v:+.2f} | {m:+.2f} | {'yes' if ok else 'no'} |")
            lines.append("")
    lines += earlier_lines()
    lines += ["## The rule's answer", "", answer["answer"] + "."]
    (folder / "ROUND.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def earlier_lines() -> list[str]:
    """The thirteen earlier sets, reported only (`candidates.py earlier`): each candidate's median
    per-set Pearson and specificity on their `cot_nll` over the 10 categories they measured."""
    from experiments.beyond.candidates import NEW
    from experiments.common import RESULTS, judge, measured
    from experiments.content_round.candidates import EARLIER
    from experiments.probes.probes import HELDOUT, TRANSFER

    scores = candidate_scores(EARLIER)
    if not scores:
        return []
    ch: dict[str, Any] = {}
    for round_, names in (("transfer", TRANSFER), ("heldout", HELDOUT), ("beyond", NEW)):
        ch |= measured(RESULTS / round_, list(names))
    lines = ["## The thirteen earlier sets (a report: they judge nothing)", "",
             f"`cot_nll`, 10 categories, {len(ch)} sets (transfer, held-out, second round); the same control and "
             "probe records.", "", "| candidate | median per-set Pearson | specificity [95% CI] |", "|---|---|---|"]
    figs = {c: judge(per, ch) for c, per in scores.items()}
    for c, f in sorted(figs.items(), key=lambda kv: -kv[1]["median_pearson"]):
        lines.append(f"| `{c}` | {f['median_pearson']:+.2f} | {f['specificity']:+.2f} "
                     f"[{f['specificity_ci'][0]:+.2f}, {f['specificity_ci'][1]:+.2f}] |")
    return lines + [""]


def _judged_on(scores: dict[str, dict[str, dict[str, float]]], t: dict[str, dict[str, dict[str, Any]]],
               truth: str) -> dict[str, dict[str, Any]]:
    """candidate -> judge's figures against one truth (specificity of a residual: its own matrix)."""
    from experiments.common import judge

    metric = truth.split()[-1]
    return {c: judge(per, t[truth], metric=metric) for c, per in scores.items()
            if any(s in t[truth] for s in per)}


def main(argv: list[str]) -> None:
    from experiments.common import run_verb

    run_verb({"report": report}, argv, "experiments.content_round.analyse")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
