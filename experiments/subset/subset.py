"""Issue 41, item 3: can the gradient scores' training side read fewer of a set's examples, so that a
user's own 100 examples are predicted in 120 s on 2 cores, with the ranking unchanged?

    .venv/bin/python -m experiments.subset.subset run       # resumable, set by set
    .venv/bin/python -m experiments.subset.subset analyse   # SUBSET.md, analysis.json

Why the training side: a user's own 100 examples cost 273 s cold, 223 s of it the training side's
backward passes, which run within 1.02x of a bare forward + backward of the same tokens
(docs/results/speed.md): only fewer tokens can reach 120 s. The domain side is not cut here: 72% of a
reference record's tokens are its question (context median 225 tokens, chain of thought 70 on the
shipped probe records), which no cut can drop without changing the measured loss, and its count (10
records a category) was chosen by its own rule in docs/results/probes.

The rule, written and committed before any subset was computed:

- Candidates: the first K examples of each set's 100 (the examples `--max-train` keeps, in file
  order, as `--max-train` and the explanation read them), K in (25, 50); the reference is all 100
  (today's side, cached by docs/results/probes and docs/results/beyond).
- Form: `grad` as shipped: through the count sketch (defaults.GRADIENT_SKETCH), the domain side on
  the shipped probe records (10 a category, the exact sides of $STS_CACHE/probes), the ten measured
  categories; the ground truth each set's committed cot_nll change.
- Chooses: the seven sets of the transfer round (the sets that chose before). Reports only: the
  held-out round's three and the second held-out round's three (docs/results/beyond).
- K qualifies when, on the choosing sets, (i) its specificity is no more than 0.05 below the
  100-example value and its 95% interval stays above zero; (ii) its median per-set Pearson is no
  more than 0.05 below the 100-example value; (iii) the ranking is unchanged: the median over the
  sets of the Spearman correlation between the K-example and the 100-example scores over the ten
  categories is at least 0.9.
- The smallest qualifying K becomes the default number of training examples the gradient scores'
  training side reads (the first K of those `--max-train` keeps); if neither qualifies, it stays 100
  and the README reports the 120 s target missed with its measured distance.
- Both groups' figures are reported whichever way it goes, beside the cold time of a user's own
  100 examples at the chosen count (`benchmarks/predict_speed.py`).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from experiments import common
from experiments.beyond import candidates as bc
from experiments.common import RESULTS, judge
from experiments.probes import probes as pr

HERE = RESULTS / "subset"  # its reports (this script is experiments/subset)
OUT = HERE / "subset.json"
SUBSETS = (25, 50)
FULL = 100
CHOOSE = list(pr.TRANSFER)
REPORT = [*pr.HELDOUT, *bc.NEW]
SETS = {**pr.TRANSFER, **pr.HELDOUT, **bc.NEW}
SPEARMAN = 0.9
TIE = 0.05
CHOOSING, REPORTING = "transfer (chooses)", "held-out rounds (report)"  # disjoint: each set's own row
GROUPS = {CHOOSING: CHOOSE, REPORTING: REPORT,
          "the ten of docs/results/probes (report: the README's figures)": [*pr.TRANSFER, *pr.HELDOUT],
          "its three held-out sets (report)": list(pr.HELDOUT)}


def work() -> Path:
    from sts.cache import cache_root

    path = cache_root() / "subset"
    path.mkdir(parents=True, exist_ok=True)
    return path


def side_path(name: str, k: int) -> Path:
    """Where the set's training side of its first k examples is (k = 100: the earlier rounds' cache)."""
    if k == FULL:
        return next((p for p in (pr.work() / f"train-{name}.safetensors", bc.work() / f"train-{name}.safetensors")
                     if p.is_file()), pr.work() / f"train-{name}.safetensors")
    return work() / f"train-{name}-{k}.safetensors"


def run() -> None:
    """Each set's training side on its first K examples (smaller K first, choosing sets first)."""
    from sts.data.datasets import load_dataset
    from sts.engine.gradients import adapted, training_side
    from sts.engine.models import default_model_dir, load_model

    done = common.read_json(OUT, {"seconds": {}})
    lm = load_model(str(default_model_dir()))
    for k in SUBSETS:
        for name in [*CHOOSE, *REPORT]:
            path = side_path(name, k)
            if path.is_file():
                continue
            print(f"{name}: first {k} examples", file=sys.stderr)
            examples = load_dataset(SETS[name], max_examples=FULL).examples[:k]
            started = time.perf_counter()
            side = training_side(lm, adapted(lm, bc.spec()), examples, bc.spec())
            side.save(path)
            done["seconds"].setdefault(name, {})[str(k)] = round(time.perf_counter() - started, 1)
            common.write_json(done, OUT)


def scores(adam: bool = False) -> dict[int, dict[str, dict[str, float]]]:
    """K -> set -> category -> sketched grad (grad-adam) score, for every side in the cache."""
    from sts.defaults import GRADIENT_SKETCH
    from sts.engine.gradients import GradientStats, TrainingGradients

    dom = bc.domain_sides().sketched(GRADIENT_SKETCH)
    out: dict[int, dict[str, dict[str, float]]] = {}
    for k in (*SUBSETS, FULL):
        for name in SETS:
            path = side_path(name, k)
            if path.is_file():
                t = TrainingGradients.load(path).sketched(GRADIENT_SKETCH)
                s = GradientStats.join(t, dom).scores(adam=adam)
                out.setdefault(k, {})[name] = {d: s[d] for d in bc.MEASURED}
    return out


def agreement(a: dict[str, float], b: dict[str, float]) -> float:
    from scipy.stats import spearmanr

    keys = sorted(a)
    return float(spearmanr([a[d] for d in keys], [b[d] for d in keys]).statistic)


def table(by_k: dict[int, dict[str, dict[str, float]]], changes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """"K" -> group -> judgement against the truth, plus each set's Spearman with the 100-example scores."""
    out: dict[str, dict[str, Any]] = {}
    for k, sets in by_k.items():
        for group, names in GROUPS.items():
            have = [n for n in names if n in sets and n in changes and n in by_k[FULL]]
            if len(have) < 3:
                continue
            row = judge({n: sets[n] for n in have}, changes)
            row["sets"] = have
            row["spearman_vs_100"] = {n: agreement(sets[n], by_k[FULL][n]) for n in have}
            row["median_spearman_vs_100"] = statistics.median(row["spearman_vs_100"].values())
            out.setdefault(str(k), {})[group] = row
    return out


def rule(tab: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The docstring's rule on the choosing group: the smallest qualifying K, else 100."""
    group = CHOOSING
    ref = tab[str(FULL)][group]
    checks: dict[str, Any] = {}
    for k in SUBSETS:
        row = tab.get(str(k), {}).get(group)
        if row is None or row["sets"] != ref["sets"]:
            checks[str(k)] = None
            continue
        checks[str(k)] = {"specificity": row["specificity"] >= ref["specificity"] - TIE and row["specificity_ci"][0] > 0,
                          "median_pearson": row["median_pearson"] >= ref["median_pearson"] - TIE,
                          "ranking": row["median_spearman_vs_100"] >= SPEARMAN}
    chosen = next((k for k in SUBSETS if checks[str(k)] and all(checks[str(k)].values())), FULL)
    return {"checks": checks, "chosen": chosen, "complete": all(v is not None for v in checks.values())}


def _f(x: float) -> str:
    return f"{x:+.2f}"


def _rows(tab: dict[str, dict[str, Any]], spearman: bool) -> list[str]:
    """One table row per examples count and group (with the median Spearman vs 100 where asked)."""
    lines = []
    for k in (*SUBSETS, FULL):
        for group, row in tab.get(str(k), {}).items():
            ci = row["specificity_ci"]
            lines.append(f"| {k} | {group} | {len(row['sets'])} | {_f(row['median_pearson'])} | "
                         f"{_f(row['specificity'])} [{_f(ci[0])}, {_f(ci[1])}] | {_f(row['swap']['difference'])} |"
                         + (f" {_f(row['median_spearman_vs_100'])} |" if spearman else ""))
    return lines


def write_markdown(tab: dict[str, dict[str, Any]], chosen: dict[str, Any], seconds: dict[str, Any],
                   adam: dict[str, dict[str, Any]]) -> None:
    lines = ["# The gradient scores' training side on a subset of the set (issue 41)", "",
             "Generated by `.venv/bin/python -m experiments.subset.subset analyse` (rule in its docstring, "
             "committed before any subset was computed).", "",
             f"**The rule's answer: {'the first ' + str(chosen['chosen']) + ' examples' if chosen['chosen'] != FULL else 'all 100 examples (no subset qualifies)'}**"
             + ("" if chosen["complete"] else " (incomplete: not every subset was computed)") + ".", "",
             "`grad`, sketched, on the shipped probe records (10 a category), ten measured categories; "
             "truth: each set's measured cot_nll change.", "",
             "| examples | group | sets | median per-set Pearson | specificity [95% CI] | swap own - other | median Spearman vs 100 |",
             "|---|---|---|---|---|---|---|", *_rows(tab, spearman=True)]
    lines += ["", "Per set: Pearson with the truth (Spearman with the 100-example scores).", "",
              "| set | " + " | ".join(f"{k} examples" for k in (*SUBSETS, FULL)) + " |",
              "|---|" + "---|" * (len(SUBSETS) + 1)]
    for name in [*CHOOSE, *REPORT]:
        cells = []
        for k in (*SUBSETS, FULL):
            row = next((r for g, r in tab.get(str(k), {}).items() if g in (CHOOSING, REPORTING)
                        and name in r["sets"]), None)
            cells.append("" if row is None else f"{_f(row['per_set'][name])} ({_f(row['spearman_vs_100'][name])})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "`grad-adam` (an option; its training side reads the same first examples), reported only:", "",
              "| examples | group | sets | median per-set Pearson | specificity [95% CI] | swap own - other |",
              "|---|---|---|---|---|---|", *_rows(adam, spearman=False)]
    lines += ["", "Checks of the rule on the choosing sets (True: the condition holds):", "",
              "```", json.dumps(chosen["checks"], indent=1), "```", "",
              "Seconds of each training side on 2 cores (the run of 2026-12-04 02:40-03:45 UTC shared them with "
              "tests and the shipping script for part of its time: upper bounds; benchmarks/predict_speed.py "
              "times the shipped default alone):", "", "```",
              json.dumps(seconds, indent=1), "```", ""]
    (HERE / "SUBSET.md").write_text("\n".join(lines))


def analyse() -> None:
    changes = bc.measured()
    tab = table(scores(), changes)
    adam = table(scores(adam=True), changes)
    chosen = rule(tab)
    done = common.read_json(OUT, {"seconds": {}})
    common.write_json({"table": tab, "grad-adam": adam, "rule": chosen}, HERE / "analysis.json")
    write_markdown(tab, chosen, done["seconds"], adam)
    print(json.dumps(chosen, indent=1))


if __name__ == "__main__":
    {"run": run, "analyse": analyse}[sys.argv[1]]()
