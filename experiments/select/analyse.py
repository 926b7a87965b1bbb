"""Issue 54, item 4: the selection round's results, as docs/results/select/PREREGISTRATION.md fixes
them, from the round's folder (`run.py train`: the base and each selection's tuned evaluation),
`selections.json`, `costs.json` and `pool.json`; no model is loaded.

    .venv/bin/python -m experiments.select.analyse report     # SELECT.md, select.json in docs/results/select

- Each selection's gain per domain: base minus tuned `cot_nll` (nats/token), with its 95% interval
  from 1,000 bootstrap replicates over the evaluated records (`sts.analysis.correlation`'s).
- The aggregate (item 2): of `sts select` mean and max, the larger target gain averaged over the two
  targets becomes the default; the other is offered only if it wins on one target by more than the
  two random seeds differ there.
- The target: on every target the default's gain beats the better random seed's by more than the
  two random seeds' gains differ, and is at least RDS+'s and lexical's minus that difference.
- Reported whatever the outcome: every other domain's change, the Jaccard overlaps, each method's
  seconds, and what each selection took by source.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from experiments.common import read_json, run_verb, write_json
from experiments.select import pool as sp
from experiments.select import run as sr

REPLICATES = 1000
METHODS = ("mean", "max", "rds", "bm25")
LABELS = {"mean": "`sts select` (mean)", "max": "`sts select` (max)", "rds": "RDS+", "bm25": "lexical (BM25)",
          "random-1": "random, seed 1", "random-2": "random, seed 2"}


def interval(change: Any, rng: Any) -> tuple[float, float]:
    """The 95% bootstrap interval of a domain's change over its evaluated records."""
    import numpy as np

    n = change.questions
    draws = [change.resampled(rng.integers(0, n, n)) for _ in range(REPLICATES)]
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def selection_names(folder: Path) -> dict[str, str]:
    """selection (as selections.json names it) -> its `train-K-sel-NAME` folder."""
    out = {}
    for p in sorted(folder.glob("train-*")):
        if p.is_dir() and "-sel-" in p.name:
            out[p.name.split("-sel-", 1)[1]] = p.name
    return out


def sources(record: dict[str, Any]) -> list[str]:
    """Each pool position's source, in the pool's order (pool.py's build)."""
    ids = record["ids"]
    out = [f"mmlu-pro {c}" for c in ids["categories"] for _ in ids["mmlu_pro"][c]]
    for name, (a, b) in ids["slices"].items():
        out += [name] * (b - a)
    return out


def gains(folder: Path) -> dict[str, dict[str, Any]]:
    """selection -> domain -> {gain, low, high} (nats/token), for each selection measured so far."""
    import numpy as np

    from experiments.common import measured

    names = selection_names(folder)
    ch = measured(folder, list(names.values()))
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, Any]] = {}
    for sel, dirname in names.items():
        if dirname in ch:
            out[sel] = {d: {"gain": c.delta, **dict(zip(("low", "high"), interval(c, rng)))}
                        for d, c in sorted(ch[dirname].items())}
    return out


def decide(g: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The pre-registered aggregate and target, from the measured target gains."""
    targets = sp.TARGETS
    need = [f"{m}-{t}" for m in METHODS for t in targets] + ["random-1", "random-2"]
    missing = [s for s in need if s not in g]
    if missing:
        return {"answer": f"not decided: {len(missing)} of the {len(need)} selections are not measured yet"}
    tg = {s: g[s][t]["gain"] for t in targets for s in [f"{m}-{t}" for m in METHODS]}
    noise = {t: abs(g["random-1"][t]["gain"] - g["random-2"][t]["gain"]) for t in targets}
    best_random = {t: max(g["random-1"][t]["gain"], g["random-2"][t]["gain"]) for t in targets}
    avg = {m: sum(tg[f"{m}-{t}"] for t in targets) / len(targets) for m in ("mean", "max")}
    default = max(avg, key=lambda m: (avg[m], m == "mean"))  # a tie keeps what ships
    other = "max" if default == "mean" else "mean"
    offered = any(tg[f"{other}-{t}"] - tg[f"{default}-{t}"] > noise[t] for t in targets)
    per_target = {}
    for t in targets:
        d = tg[f"{default}-{t}"]
        per_target[t] = {
            "default": d, "best_random": best_random[t], "random_difference": noise[t],
            "beats_random": d > best_random[t] + noise[t],
            "matches_rds": d >= tg[f"rds-{t}"] - noise[t], "matches_bm25": d >= tg[f"bm25-{t}"] - noise[t],
            "margin_random": d - best_random[t] - noise[t], "margin_rds": d - tg[f"rds-{t}"] + noise[t],
            "margin_bm25": d - tg[f"bm25-{t}"] + noise[t]}
    met = all(v["beats_random"] and v["matches_rds"] and v["matches_bm25"] for v in per_target.values())
    answer = (f"the aggregate is {default} ({other} {'also offered' if offered else 'not offered'}); "
              f"the target is {'met' if met else 'not met'}")
    return {"aggregate_means": avg, "default": default, "other_offered": offered, "targets": per_target,
            "met": met, "answer": answer}


def label(selection: str) -> str:
    """A table's name for a selection (`mean-physics` -> `sts select` (mean))."""
    return LABELS[selection if selection.startswith("random") else selection.rsplit("-", 1)[0]]


def jaccard(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


def report(folder: Path = sr.HERE) -> dict[str, Any]:
    from collections import Counter

    chosen = read_json(folder / "selections.json", {})
    if not chosen:
        raise SystemExit("no selections yet: run `python -m experiments.select.run choose` first")
    costs = read_json(folder / "costs.json", {})
    src = sources(read_json(folder / "pool.json"))
    g = gains(folder)
    verdict = decide(g)
    lines = ["# Does `sts select` pick what fine-tuning rewards? (issue 54)", "",
             "Generated by `.venv/bin/python -m experiments.select.analyse report` from this folder (`python -m "
             "experiments.select.run choose`, then `train`); the rule and the target are "
             "[PREREGISTRATION.md](PREREGISTRATION.md)'s, committed before any selection. Gains: base minus "
             "tuned `cot_nll` (nats/token), [95% bootstrap interval over the evaluated records].", "",
             f"Selections measured: {len(g)} of {len(chosen)}.", ""]
    for t in sp.TARGETS:
        names = [f"{m}-{t}" for m in METHODS] + ["random-1", "random-2"]
        lines += [f"## Target: {t}", "", "| selection | gain on the target | mean change elsewhere | worst elsewhere |"
                  " seconds to choose |", "|---|---|---|---|---|"]
        for s in names:
            if s not in g:
                lines.append(f"| {label(s)} | not measured yet |"
                             " | | |")
                continue
            own = g[s][t]
            off = {d: v["gain"] for d, v in g[s].items() if d not in sp.TARGETS}
            worst = min(off, key=lambda d: off[d])
            sec = costs.get(s, {}).get("seconds")
            lines.append(f"| {label(s)} | {own['gain']:+.3f} "
                         f"[{own['low']:+.3f}, {own['high']:+.3f}] | {sum(off.values()) / len(off):+.3f} | "
                         f"{worst} {off[worst]:+.3f} | {sec if sec is not None else '-'} |")
        lines += ["", "Overlap (Jaccard) of the selections for this target:", "",
                  "| | " + " | ".join(LABELS[m] for m in METHODS) + " |", "|---|" + "---|" * len(METHODS)]
        for a in METHODS:
            lines.append(f"| {LABELS[a]} | " + " | ".join(
                f"{jaccard(chosen[f'{a}-{t}'], chosen[f'{b}-{t}']):.2f}" for b in METHODS) + " |")
        lines += ["", "By source (examples of 110):", "", "| selection | " + " | ".join(sorted(set(src))) + " |",
                  "|---|" + "---|" * len(set(src))]
        for s in names:
            c = Counter(src[i] for i in chosen[s])
            lines.append(f"| {s} | " + " | ".join(str(c.get(k, 0)) for k in sorted(set(src))) + " |")
        lines.append("")
    lines += ["## The rule's answer", "", verdict["answer"] + "."]
    if "targets" in verdict:
        lines += ["", "| target | default's gain | better random | random seeds differ by | margin over random |"
                  " margin over RDS+ | margin over lexical |", "|---|---|---|---|---|---|---|"]
        for t, v in verdict["targets"].items():
            lines.append(f"| {t} | {v['default']:+.3f} | {v['best_random']:+.3f} | {v['random_difference']:.3f} | "
                         f"{v['margin_random']:+.3f} | {v['margin_rds']:+.3f} | {v['margin_bm25']:+.3f} |")
    lines += ["", "Off-target records: each of the 12 other categories on its first 30 evaluated records of the "
              "content round; the other target on its own 100 (the pre-registration's wording said every other "
              "category on 30: the pool was built with the targets' 100 each, 560 records, before any selection)."]
    write_json({"gains": g, "verdict": verdict, "costs": costs}, folder / "select.json")
    (folder / "SELECT.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return verdict


def main(argv: list[str]) -> None:
    run_verb({"report": lambda: report()}, argv, "experiments.select.analyse")


if __name__ == "__main__":
    main(sys.argv[1:])
