"""The pre-registered analysis of the held-out round (PREREGISTRATION.md beside this file), read
from the stage outputs of `run.sh`: it runs on a partial round too (the finished sets only).

    .venv/bin/python -m experiments.heldout.heldout_analysis [FOLDER] [--out DIR]

FOLDER: the `sts validate` folder of the round (default: this file's folder); DIR: where
ANALYSIS.md, analysis.json and heldout.png go (default: FOLDER). The rule's inputs and order are
PREREGISTRATION.md's, written as code here ("The candidates", "The rule, in this order",
"Reported whatever the outcome"); every number comes from the same functions as the post-hoc
table of the seven transfer sets (`../transfer/candidates.py`: `judge`, with its 1,000
replicates and seed 0), so that a dry run on the transfer folder reproduces CANDIDATES.md:

    .venv/bin/python -m experiments.heldout.heldout_analysis docs/results/transfer --out /tmp/heldout-dryrun

(there every set's spec is in the library, so its `+lib` library is the other six sets,
leave-one-set-out, as in candidates.py; this script never writes into the transfer folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from experiments import common
from experiments.common import RESULTS
from experiments.transfer import candidates as cand
from sts.analysis import correlation as co
from sts.analysis.library import Library, decompose, set_name
from sts.choices import Readout
from sts.data.embedded import LIBRARY
from sts.engine.evaluation import Evaluation
from sts.errors import UserError
from sts.scores.score import REGISTRY, gradient_scores, statistics_scores
from sts.validation.plan import stage_names
from sts.validation.stages import manifest_name

HERE = RESULTS / "heldout"  # its reports (this script is experiments/heldout)
TRANSFER = RESULTS / "transfer"
GRADIENT_SCORES, STATISTICS_SCORES = gradient_scores(), statistics_scores()

K = 400  # the round fixes k ("Settings, all fixed")
METRIC = "cot_nll"  # the primary metric
REQUIRED = 3  # "the round counts with 3"
DEFAULT = "rel-act"  # today's default: stays if none qualifies
# "The candidates": each with and without +lib; any other score the run has is reported, never chosen
PREREGISTERED = ("act", "sq", "icl", "cosine", "lexical", "rel-act", "grad", "grad-adam")
CANDIDATES = tuple(c for s in PREREGISTERED for c in (s, f"{s} +lib"))
TIE = 0.05  # rule (b): within 0.05 of the best specificity, the higher median per-set Pearson
TARGETS = {"specificity": 0.5, "swap": 0.2, "median_pearson": 0.6, "top": 3, "above_others": 0.1}
GRADIENTS = TRANSFER / "stats" / "gradients.json"  # the seven sets' grad / grad-adam (gradients.py)


def library() -> Library:
    """The `+lib` library: the seven transfer sets (PREREGISTRATION.md: "library: the seven
    transfer sets"; their measured changes, never the new sets'). Of the two files holding them,
    the shipped `src/sts/assets/library-smollm2-135m-l22.json` is the one at k = 400 (= DEFAULT_K,
    the round's k; scored by `../transfer/library.py` from the committed statistics, the same
    numbers `candidates.py` judges at k400); `../transfer/library.json` holds the experiment's
    k = 100 scores, whose typical score profile would not be the same score as the new sets'.
    The held-out folder's own library.json (validate writes one) holds the new sets' outcomes:
    never used. The gradient scores are not in the shipped file: they are added from
    `../transfer/stats/gradients.json` (domain side cot_nll), as candidates.py reads them."""
    lib = Library.load(LIBRARY)
    assert lib.k == K and lib.metric == METRIC, (lib.k, lib.metric)
    if GRADIENTS.is_file():
        sets = json.loads(GRADIENTS.read_text())["sets"]
        for name, s in lib.sets.items():
            for key, values in sets.get(name, {}).get("scores", {}).items():
                score, metric = key.split(":")
                if metric == METRIC:
                    s.scores[score] = values
    return lib


def own_domain(spec: str) -> str | None:
    """The domain a set is drawn from (validate's rule, from the spec alone): its `category=`
    selector, or math for competition-math sets (MATH-500, CHAMP); None for a mixed set."""
    base, _, selector = set_name(spec).partition("#")
    if selector.startswith("category="):
        return selector.split("=", 1)[1]
    return "math" if base.split(":")[-1].startswith(("math", "champ")) else None


def set_k(folder: Path, tdir: Path) -> int | None:
    """The k of a set's icl scores, as the run recorded it: its predict-icl/sts.json, else the run's
    results.json; None while neither is written (then the shipped library's k = 400 scores serve)."""
    report = tdir / "predict-icl" / "sts.json"
    if report.is_file():
        return int(json.loads(report.read_text())["k"])
    if (folder / "results.json").is_file():
        return int(json.loads((folder / "results.json").read_text())["budget"]["k"])
    return None


def finished(folder: Path, lib: Library) -> tuple[dict[str, dict], list[str]]:
    """name -> spec, own domain, scores (every score at k = 400), cot_nll changes, for the sets
    whose icl prediction and tuned reference evaluation have both finished (their stage
    manifests written: a manifest follows its outputs); notes on the others."""
    notes: list[str] = []
    stages = folder / "stages"
    base_dir = folder / "eval-base-reference"
    if not (stages / manifest_name("evaluate base (reference)")).is_file():
        return {}, [f"{folder}: the base model's reference evaluation has not finished: no set can be judged"]
    base = Evaluation.load(base_dir)
    by_spec = {set_name(s.spec): s for s in lib.sets.values()}
    out: dict[str, dict] = {}
    tdirs = sorted(folder.glob("train-*"), key=lambda p: int(p.name.split("-")[1]))
    for tdir in tdirs:
        names = stage_names(tdir.name)
        missing = [s for s in ("icl", "reference") if not (stages / manifest_name(names[s])).is_file()]
        if missing:
            notes.append(f"{tdir.name}: unfinished ({', '.join(names[s] for s in missing)} not done): skipped")
            continue
        payload = json.loads((tdir / "scores-icl.json").read_text())
        spec, scores, k = payload["train"], payload["scores"], set_k(folder, tdir)
        source = f"scores-icl.json (k = {k})"
        if k != K:
            if set_name(spec) not in by_spec:
                notes.append(f"{tdir.name}: its scores are at k = {k}, not {K}, and no k = {K} scores of it exist: "
                             "skipped")
                continue
            scores = {s: dict(v) for s, v in by_spec[set_name(spec)].scores.items()}
            source = f"the shipped library at k = {K} (this folder's scores are at k = {k})"
            notes.append(f"{tdir.name}: scores at k = {K} from the shipped library (the committed statistics; "
                         f"this folder's scores-icl.json is at k = {k}), gradient scores from "
                         "docs/results/transfer/stats/gradients.json")
        changes = co.changes_from_evaluations(base, Evaluation.load(tdir / "eval-tuned-reference"), METRIC)
        out[tdir.name] = {"spec": spec, "own": own_domain(spec), "scores": scores, "changes": changes,
                          "source": source}
    return out, notes


def decomposed(scores: dict[str, dict[str, float]], specs: dict[str, str], score: str, lib: Library
               ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Each set's combined (shared + own) and own part, the library being the seven transfer
    sets less any whose spec is the judged set's (a transfer set judged again: leave-one-out)."""
    parts = {n: decompose(lib, score, scores[n], leave_out=specs[n]) for n in scores}
    return {n: p.combined for n, p in parts.items()}, {n: p.own for n, p in parts.items()}


def judged(scores: dict[str, dict[str, float]], measured: dict[str, dict[str, dict[str, co.DomainChange]]],
           domains: dict[str, str | None], own: dict[str, dict[str, float]] | None = None) -> dict:
    """`candidates.judge` (`domains`: each set's own domain); with fewer than 2 sets (no matrix),
    the per-set numbers alone."""
    if len(scores) >= 2:
        return cand.judge(scores, measured, METRIC, own, domains)
    nan = float("nan")
    per_set = {n: co.correlate(scores[n], measured[n][METRIC], cand.REPLICATES, 0, None, "signed", METRIC).pearson
               for n in scores}
    ranks = {n: co.own_domain_rank(scores[n], measured[n][METRIC], own_d) for n in scores
             if (own_d := domains.get(n)) and own_d in scores[n] and own_d in measured[n][METRIC]}
    return {"median_pearson": statistics.median(per_set.values()), "per_set": per_set, "specificity": nan,
            "specificity_ci": (nan, nan), "pooled": nan,
            "swap": {"own": nan, "other": nan, "difference": nan, "own_ci": (nan, nan), "other_ci": (nan, nan),
                     "difference_ci": (nan, nan)}, "own_domain": ranks}


def order(names: list[str]) -> list[str]:
    """Score names: the pre-registered first, then the registry's order, then any other."""
    known = list(PREREGISTERED) + [s for s in STATISTICS_SCORES + GRADIENT_SCORES if s not in PREREGISTERED]
    return [s for s in known if s in names] + sorted(s for s in names if s not in known)


def table_of(sets: dict[str, dict], lib: Library, notes: list[str]) -> dict[str, dict]:
    """Every score the sets share, with and without +lib: candidates.judge's numbers."""
    measured = {n: {METRIC: s["changes"]} for n, s in sets.items()}
    specs = {n: s["spec"] for n, s in sets.items()}
    domains = {n: s["own"] for n, s in sets.items()}
    shared = set.intersection(*(set(s["scores"]) for s in sets.values()))
    table: dict[str, dict] = {}
    for score in order(list(shared)):
        scores = {n: s["scores"][score] for n, s in sets.items()}
        table[score] = judged(scores, measured, domains)
        try:
            combined, own = decomposed(scores, specs, score, lib)
        except UserError as e:
            notes.append(f"{score} +lib: not computed ({e})")
            continue
        table[f"{score} +lib"] = judged(combined, measured, domains, own if len(sets) >= 2 else None)
    return table


def rule(table: dict[str, dict]) -> dict:
    """(a) qualifies: specificity interval above zero and swap difference positive; (b) the
    highest specificity wins, within 0.05 of it the higher median per-set Pearson; (c) none:
    the default stays rel-act. Only the pre-registered candidates can win."""
    rows = {c: table[c] for c in CANDIDATES if c in table}
    qualified = [c for c, r in rows.items() if r["specificity_ci"][0] > 0 and r["swap"]["difference"] > 0]
    out = {"candidates": list(rows), "missing": [c for c in CANDIDATES if c not in table], "qualified": qualified,
           "winner": None, "tied": [], "pairwise_winner": None}
    if not qualified:
        return out
    spec = {c: rows[c]["specificity"] for c in qualified}
    best = max(qualified, key=lambda c: spec[c])
    # judgement call: "within 0.05 of the best" read as every qualifier within 0.05 of the best
    # specificity (inclusive), the highest median per-set Pearson among them winning (ties: specificity)
    tied = [c for c in qualified if spec[c] >= spec[best] - TIE]
    out["tied"] = tied
    out["winner"] = max(tied, key=lambda c: (rows[c]["median_pearson"], spec[c]))
    # the other reading (the transfer analysis's): the best against the runner-up only
    ranked = sorted(qualified, key=lambda c: -spec[c])
    pair = ranked[:2] if len(ranked) > 1 and spec[ranked[0]] - spec[ranked[1]] <= TIE else ranked[:1]
    out["pairwise_winner"] = max(pair, key=lambda c: (rows[c]["median_pearson"], spec[c]))
    return out


def targets(table: dict[str, dict], chosen: str) -> list[dict]:
    """The issue's targets for one candidate, with margins (positive: met with room)."""
    r = table[chosen]
    t = TARGETS
    lo = r["specificity_ci"][0]
    others = [table[c]["specificity"] for c in CANDIDATES if c in table and c != chosen
              and table[c]["specificity"] == table[c]["specificity"]]
    best_other = max(others, default=float("nan"))
    best_name = next((c for c in CANDIDATES if c in table and c != chosen and table[c]["specificity"] == best_other),
                     "")
    applicable = {n: v for n, v in r["own_domain"].items() if v["change_rank"] <= t["top"]}
    worst = max((v["score_rank"] for v in applicable.values()), default=None)
    rows = [
        {"target": f"specificity >= {t['specificity']} with its interval above 0", "value": _f(r["specificity"]) +
         f" [{_f(lo)}, {_f(r['specificity_ci'][1])}]", "margin": f"{r['specificity'] - t['specificity']:+.3f} "
         f"(lower end {lo:+.3f})", "met": r["specificity"] >= t["specificity"] and lo > 0},
        {"target": f"swap difference >= +{t['swap']}", "value": _f(r["swap"]["difference"]),
         "margin": f"{r['swap']['difference'] - t['swap']:+.3f}", "met": r["swap"]["difference"] >= t["swap"]},
        {"target": f"median per-set Pearson >= {t['median_pearson']}", "value": _f(r["median_pearson"]),
         "margin": f"{r['median_pearson'] - t['median_pearson']:+.3f}",
         "met": r["median_pearson"] >= t["median_pearson"]},
        {"target": f"own domain in the top {t['top']} wherever it is in the truth's top {t['top']}",
         "value": ", ".join(f"{n}: {v['score_rank']}/{v['change_rank']}" for n, v in applicable.items())
         or "no set's own domain is in the truth's top 3",
         "margin": "n/a" if worst is None else f"{t['top'] - worst:+d} (worst score rank {worst})",
         "met": None if worst is None else worst <= t["top"]},
        {"target": f"specificity >= {t['above_others']} above every candidate not chosen",
         "value": f"{_f(r['specificity'])} vs {best_name} {_f(best_other)}",
         "margin": f"{r['specificity'] - best_other - t['above_others']:+.3f}",
         "met": r["specificity"] - best_other >= t["above_others"]},
    ]
    return rows


def _f(x: float) -> str:
    return "nan" if x != x else f"{x:+.2f}"


def _ci(x: float, ci: tuple[float, float] | list[float]) -> str:
    return f"{_f(x)} [{_f(ci[0])}, {_f(ci[1])}]"


def needs_sae(label: str) -> bool:
    base = label.split(" ")[0]
    return base in REGISTRY and REGISTRY[base].readout is Readout.SAE


def role(label: str) -> str:
    return f"{'candidate' if label in CANDIDATES else 'report-only'}, {'SAE' if needs_sae(label) else 'no SAE'}"


def markdown_table(table: dict[str, dict], sets: dict[str, dict], winner: str | None) -> list[str]:
    names = list(sets)
    short = [n.split("-", 2)[-1] for n in names]
    lines = ["| candidate | role | median per-set Pearson | per set: " + ", ".join(short) + " | specificity [95% CI] | "
             "swap own [CI] | swap other [CI] | swap own - other [CI] | pooled | own-domain rank (score / truth) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(table, key=lambda c: -np.nan_to_num(table[c]["specificity"], nan=-9)):
        r, s = table[c], table[c]["swap"]
        ranks = ", ".join(f"{sets[n]['own']} {v['score_rank']}/{v['change_rank']}" for n, v in r["own_domain"].items())
        name = f"**{c}** (chosen)" if c == winner else c
        lines.append(f"| {name} | {role(c)} | {_f(r['median_pearson'])} | "
                     + ", ".join(_f(r["per_set"][n]) for n in names)
                     + f" | {_ci(r['specificity'], r['specificity_ci'])} | "
                     f"{_ci(s['own'], s['own_ci'])} | {_ci(s['other'], s['other_ci'])} | "
                     f"{_ci(s['difference'], s['difference_ci'])} | {_f(r['pooled'])} | {ranks or '-'} |")
    return lines


def targets_lines(rows: list[dict]) -> list[str]:
    met = {True: "yes", False: "no", None: "n/a"}
    return ["| target | value | margin | met |", "|---|---|---|---|"] + [
        f"| {r['target']} | {r['value']} | {r['margin']} | {met[r['met']]} |" for r in rows]


def margins_lines(table: dict[str, dict]) -> list[str]:
    """Every candidate's margin on each target (the same checks as for the chosen one)."""
    lines = ["| candidate | spec - 0.5 (lower end) | swap - 0.2 | median Pearson - 0.6 | own top 3 | "
             "spec - best other - 0.1 | all met |", "|---|---|---|---|---|---|---|"]
    for c in CANDIDATES:
        if c not in table:
            continue
        t = targets(table, c)
        lines.append(f"| {c} | " + " | ".join(r["margin"] for r in t) + f" | "
                     f"{'yes' if all(r['met'] is not False for r in t) else 'no'} |")
    return lines


def figure(tables: dict[str, dict[str, dict]], winner: str | None, path: Path) -> None:
    """Specificity and the swap difference with their 95% intervals, per candidate: the
    held-out sets (filled) and all sets pooled (hollow), as candidates.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = tables["heldout"]
    labels = sorted(held, key=lambda c: np.nan_to_num(held[c]["specificity"], nan=-9))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.3 * len(labels) + 1.8), sharey=True)
    for group, offset, hollow in (("heldout", 0.0, False), ("pooled", -0.3, True)):
        table = tables.get(group, {})
        for i, c in enumerate(labels):
            if c not in table:
                continue
            r = table[c]
            colour = "0.7" if c not in CANDIDATES else "#3b6ea8" if needs_sae(c) else "0.35"
            colour = "#c0392b" if c == winner else colour
            style = {"fmt": "s" if hollow else "o", "color": colour, "ms": 3, "capsize": 2, "lw": 0.8,
                     "mfc": "white" if hollow else colour}
            for ax, value, (lo, hi) in ((axes[0], r["specificity"], r["specificity_ci"]),
                                        (axes[1], r["swap"]["difference"], r["swap"]["difference_ci"])):
                if value != value:
                    continue
                ax.errorbar(value, i + offset, xerr=[[max(value - lo, 0)], [max(hi - value, 0)]], **style)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=7)
    common.specificity_swap_axes(axes, METRIC)
    axes[0].axvline(TARGETS["specificity"], color="#c0392b", lw=0.6, ls="--")
    axes[1].axvline(TARGETS["swap"], color="#c0392b", lw=0.6, ls="--")
    fig.suptitle(f"Held-out round, k = {K}: circles the held-out sets (the rule's), hollow squares all sets pooled; "
                 "red the chosen, blue SAE candidates, dark grey no-SAE candidates, light grey report-only; "
                 "dashed: the targets", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=HERE, help="the round's sts validate folder")
    parser.add_argument("--out", type=Path, default=None, help="where the outputs go (default: FOLDER)")
    args = parser.parse_args()
    folder = args.folder.resolve()
    out = (args.out or args.folder).resolve()
    if out == TRANSFER.resolve() or TRANSFER.resolve() in out.parents:
        raise SystemExit(f"refusing to write into {TRANSFER}: give --out elsewhere")
    lib = library()
    notes: list[str] = []
    sets, more = finished(folder, lib)
    notes += more
    print("\n".join(notes), file=sys.stderr)
    if not sets:
        raise SystemExit("no set of the round has finished its icl prediction and tuned reference evaluation yet")
    # all sets pooled: the seven transfer sets and the new ones (a transfer set judged here counts once)
    if folder == TRANSFER.resolve():
        transfer, more = sets, []
    else:
        transfer, _ = finished(TRANSFER, lib)
        notes.append(f"pooled: the {len(transfer)} transfer sets' scores at k = {K} from the shipped library "
                     "(their folder's are at k = 100), gradient scores from docs/results/transfer/stats/gradients.json")
    new_specs = {set_name(s["spec"]) for s in sets.values()}
    pooled = dict(sets)
    for n, s in transfer.items():
        if set_name(s["spec"]) not in new_specs:
            pooled[n if n not in pooled else f"transfer/{n}"] = s
    print(f"{len(sets)} held-out set(s) finished (the round counts with {REQUIRED}: "
          f"{'enough' if len(sets) >= REQUIRED else 'provisional'}); {len(pooled)} sets pooled", file=sys.stderr)
    tables = {"heldout": table_of(sets, lib, notes), "pooled": table_of(pooled, lib, [])}
    decision = rule(tables["heldout"]) if len(sets) >= 2 else {"winner": None, "qualified": [], "tied": [],
                                                                 "pairwise_winner": None, "missing": [],
                                                                 "candidates": []}
    winner = decision["winner"]
    chosen = winner or DEFAULT
    target_rows = {g: targets(t, chosen) for g, t in tables.items() if chosen in t}
    out.mkdir(parents=True, exist_ok=True)
    result = {"folder": str(folder), "k": K, "metric": METRIC, "finished": list(sets), "required": REQUIRED,
              "sets": {n: {k: v for k, v in s.items() if k not in ("scores", "changes")} for n, s in sets.items()},
              "pooled_sets": list(pooled), "library": {"file": str(LIBRARY), "k": lib.k, "sets": list(lib.sets)},
              "notes": notes, "rule": decision, "chosen": chosen, "targets": target_rows, "tables": tables,
              "truth": {n: {d: c.delta for d, c in s["changes"].items()} for n, s in pooled.items()}}
    (out / "analysis.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    figure(tables, winner, out / "heldout.png")

    provisional = "" if len(sets) >= REQUIRED else (f" **Provisional: {len(sets)} of the {REQUIRED} sets the round "
                                                    "counts with have finished.**")
    if winner:
        verdict = (f"**{winner}** wins (specificity {_f(tables['heldout'][winner]['specificity'])}, median per-set "
                   f"Pearson {_f(tables['heldout'][winner]['median_pearson'])}).")
        if decision["pairwise_winner"] != winner:
            verdict += (f" (Read as the best against the runner-up only, rule (b) would give "
                        f"{decision['pairwise_winner']}.)")
    elif len(sets) < 2:
        verdict = "the rule needs at least 2 finished sets (specificity and the swap test are over the matrix)."
    else:
        verdict = (f"none qualifies: the default stays **{DEFAULT}**, and the README says that no score tells "
                   "training sets apart.")
    lines = ["# The held-out round: the pre-registered analysis", "",
             f"Generated by `.venv/bin/python -m experiments.heldout.heldout_analysis {args.folder}` from the stage outputs "
             f"in `{folder}`; the rule and every check are PREREGISTRATION.md's. Primary metric {METRIC} (the "
             f"reference records), every score at k = {K}, 1,000 bootstrap replicates over the questions, seed 0."
             + provisional, "",
             f"Held-out sets finished: {len(sets)} (" + "; ".join(
                 f"`{n}` = `{s['spec']}`, own domain {s['own'] or 'none'}, scores from {s['source']}"
                 for n, s in sets.items()) + ").", "",
             f"`+lib`: the shared / own decomposition, the library being the seven transfer sets at k = {K} "
             f"(`{LIBRARY.relative_to(LIBRARY.parents[3])}`, gradient scores added from "
             "`docs/results/transfer/stats/gradients.json`), less any set whose spec is the judged set's. "
             "Per-set Pearson, pooled and own-domain ranks of the sum (shared + own); specificity and the swap "
             "test of the own part.", ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## The rule (held-out sets only)", "",
              "(a) qualifies: specificity interval (95%) above zero and swap difference positive; (b) the highest "
              f"specificity wins, within {TIE} of it the higher median per-set Pearson; (c) none: `{DEFAULT}` stays.",
              "", "| candidate | specificity [95% CI] | swap own - other | median per-set Pearson | qualifies |",
              "|---|---|---|---|---|"]
    for c in CANDIDATES:
        if c not in tables["heldout"]:
            lines.append(f"| {c} | not available | | | no |")
            continue
        r = tables["heldout"][c]
        mark = "yes" + (" (within 0.05 of the best)" if c in decision["tied"] else "") if c in decision["qualified"] \
            else "no"
        lines.append(f"| {'**' + c + '**' if c == winner else c} | {_ci(r['specificity'], r['specificity_ci'])} | "
                     f"{_f(r['swap']['difference'])} | {_f(r['median_pearson'])} | {mark} |")
    lines += ["", "Result: " + verdict, ""]
    if winner:
        lines += [f"The winner's k ({K}) and shift (icl) are the round's; if they differ from the shipped "
                  "DEFAULT_K / default method, those change. A winner that needs no SAE still has `sts predict` print "
                  f"the SAE features the training set shifts (icl shift, k = {K}) as the explanation.", ""]
    for group, title in (("heldout", "held-out sets"), ("pooled", f"all {len(pooled)} sets pooled (report only)")):
        if group in target_rows:
            lines += [f"## Targets of the issue for `{chosen}`, {title}", ""] + targets_lines(target_rows[group]) + [""]
    lines += ["Margins of every candidate on the same targets (held-out sets; last target against the other "
              "candidates):", ""] + margins_lines(tables["heldout"]) + [""]
    lines += ["## Every candidate and baseline, held-out sets", ""] + markdown_table(tables["heldout"], sets, winner)
    lines += ["", f"## Every candidate and baseline, all {len(pooled)} sets pooled (the seven transfer sets and "
              "the new ones)", ""] + markdown_table(tables["pooled"], pooled, winner)
    lines += ["", "Own-domain rank: the set's own domain ranked by the score / by the measured change (1 = moved "
              "most), over the reference domains. Role: candidate (pre-registered, can win) or report-only; SAE: "
              "whether the score needs the SAE.",
              "Not here: `raw-act` at k = 100 (the round fixes k; it would need the held-out sets' statistics at "
              "k = 100, which validate keeps only in its extraction cache), the sft shift (not run).",
              "In the pooled tables the gradient scores' domain side differs by origin: the new sets' from validate "
              "(every reference record, 100 a domain), the transfer sets' from gradients.py (the first 20).", ""]
    text = "\n".join(lines) + "\n"
    (out / "ANALYSIS.md").write_text(text)
    print(text)
    print(f"wrote {out / 'ANALYSIS.md'}, {out / 'analysis.json'}, {out / 'heldout.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
