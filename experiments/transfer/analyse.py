"""The pre-registered analysis of the transfer experiment (PREREGISTRATION.md), read from the
stage outputs of `run.sh` — so it also runs on a partial matrix while later sets are training.

    .venv/bin/python -m experiments.transfer.analyse            # writes ANALYSIS.md, analysis.json,
                                                                 # per-set.png beside this file

The rules (primary metric per kind, default score, halves) are PREREGISTRATION.md's (with the two
candidate scores of ADDENDUM.md), written as code here; nothing in this file looks at a score's agreement before the rule that uses it.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from experiments.common import RESULTS
from sts.analysis import correlation as co
from sts.choices import Metric
from sts.engine.evaluation import Evaluation

HERE = RESULTS / "transfer"  # its reports (this script is experiments/transfer)

# (directory, kind, half) in run order — PREREGISTRATION.md's table
SETS = [("train-1-champ", "plain", "choosing"),
        ("train-2-alpaca-en-demo", "plain", "choosing"),
        ("train-3-mmlu-pro-cot-train-physics", "cot", "choosing"),
        ("train-4-mmlu-pro-cot-train-psychology", "cot", "choosing"),
        ("train-5-math500-test", "plain", "reporting"),
        ("train-6-mmlu-pro-cot-train-business", "cot", "reporting"),
        ("train-7-mmlu-pro-cot-train-biology", "cot", "reporting")]
CANDIDATES = ("acc", "acc_norm", "p_correct", "nll", "cot_nll")
PRODUCT_SCORES = ("act", "icl", "sq", "rel-act", "rel-icl")  # the last two: ADDENDUM.md
# the baselines the experiment measured, by name: the scores registered later (the gradient and the
# lookahead ones) are not in its matrices
BASELINES = ("raw-act", "raw-sq", "cosine", "lexical")
REPLICATES = 1000


def finished() -> dict[str, dict]:
    """The sets whose four stages have all written their outputs."""
    out = {}
    for name, kind, half in SETS:
        d = HERE / name
        needed = [d / "scores-icl.json", d / "scores-sft.json", d / "eval-tuned" / "accuracy.json",
                  d / "eval-tuned-reference" / "accuracy.json"]
        if all(p.is_file() for p in needed):
            out[name] = {"kind": kind, "half": half, "dir": d,
                         "scores": {m: json.loads((d / f"scores-{m}.json").read_text())["scores"]
                                    for m in ("icl", "sft")}}
    return out


def changes_of(sets: dict[str, dict]) -> dict[str, dict[str, dict[str, co.DomainChange]]]:
    base = Evaluation.load(HERE / "eval-base")
    base_ref = Evaluation.load(HERE / "eval-base-reference")
    out = {}
    for name, info in sets.items():
        tuned = Evaluation.load(info["dir"] / "eval-tuned")
        tuned_ref = Evaluation.load(info["dir"] / "eval-tuned-reference")
        out[name] = {m: co.changes_from_evaluations(base, tuned, m) for m in CANDIDATES if m != "cot_nll"}
        out[name]["cot_nll"] = co.changes_from_evaluations(base_ref, tuned_ref, "cot_nll")
    return out


def primary_metrics(sets: dict[str, dict], changes: dict) -> tuple[dict[str, str], list[dict]]:
    """Rule 3 of PREREGISTRATION.md, on the choosing half only."""
    table = [{"train": t, "kind": sets[t]["kind"], "half": sets[t]["half"], "metric": m, **co.signal(changes[t][m])}
             for t in sets for m in CANDIDATES]
    primary = {}
    for kind in ("plain", "cot"):
        rows = [r for r in table if r["kind"] == kind and r["half"] == "choosing"]
        if not rows:
            continue
        stats = {m: (statistics.median(r["signal"] for r in rows if r["metric"] == m),
                     max(r["largest_share"] for r in rows if r["metric"] == m)) for m in CANDIDATES}
        robust = [m for m, (_, share) in stats.items() if share <= 0.5]
        if robust:
            primary[kind] = max(robust, key=lambda m: stats[m][0])
        else:
            strong = [m for m, (sig, _) in stats.items() if sig >= 2] or list(stats)
            primary[kind] = min(strong, key=lambda m: stats[m][1])
    return primary, table


def per_set(sets: dict, changes: dict, primary: dict[str, str], shift: str = "icl") -> list[dict]:
    rows = []
    for t, info in sets.items():
        metric = primary.get(info["kind"])
        if metric is None:
            continue
        for score, values in info["scores"][shift].items():
            for protocol in ("signed", "paper"):
                if protocol == "paper" and len(set(values) & set(changes[t][metric])) < 8:
                    continue
                c = co.correlate(values, changes[t][metric], REPLICATES, 0, None, protocol, metric)
                rows.append({"train": t, "half": info["half"], "kind": info["kind"], "shift": shift,
                             "score": score, "baseline": score in BASELINES, **asdict(c)})
    return rows


def median_pearson(rows: list[dict], score: str, half: str | None, protocol: str = "signed") -> float:
    vals = [r["pearson"] for r in rows if r["score"] == score and r["protocol"] == protocol
            and (half is None or r["half"] == half) and r["pearson"] == r["pearson"]]
    return statistics.median(vals) if vals else float("nan")


def specificity(sets: dict, changes: dict, names: list[str], metric: str, shift: str = "icl") -> dict[str, dict]:
    out = {}
    if len(names) < 2:
        return out
    for score in sets[names[0]]["scores"][shift]:
        m = co.correlate_matrix({t: sets[t]["scores"][shift][score] for t in names},
                                {t: changes[t][metric] for t in names}, "specificity", REPLICATES, 0, metric)
        out[score] = asdict(m)
    return out


def compact_table(icl: list[dict], default: str) -> list[str]:
    """Every score and baseline (rows) by training set (columns): Pearson and Spearman with their
    95% intervals, signed protocol, each set's primary metric — the README's table."""
    trains = list(dict.fromkeys(r["train"] for r in icl))
    scores = list(dict.fromkeys(r["score"] for r in icl))
    lines = ["## Per-set table (for the README): Pearson / Spearman [95% CI]", "",
             "| score | " + " | ".join(t.split("-", 2)[2] for t in trains) + " |", "|---" * (len(trains) + 1) + "|"]
    for s in scores:
        cells = []
        for t in trains:
            r = next((r for r in icl if r["train"] == t and r["score"] == s and r["protocol"] == "signed"), None)
            cells.append("n/a" if r is None else f"{fmt(r['pearson'], r['pearson_ci'])} / "
                                                  f"{fmt(r['spearman'], r['spearman_ci'])}")
        name = f"**{s}** (default)" if s == default else s + (" (baseline)" if s in BASELINES else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def targets(sets: dict, changes: dict, primary: dict[str, str], icl: list[dict], default: str,
            all_sets: dict[str, dict[str, dict]]) -> list[str]:
    """The issue's targets for the default score (PREREGISTRATION.md, "Targets"), on the
    reporting half and on all sets: its specificity interval excludes zero and its specificity
    beats every baseline's; its median per-set Pearson is >= 0.7 and >= 0.2 above the best
    baseline's. Each line gives the margin, met or not. `all_sets`: the all-set specificity per
    metric, already computed."""
    lines = ["## Targets (the default score, PREREGISTRATION.md)", "",
             "| sets | check | default | best baseline | margin | met |", "|---|---|---|---|---|---|"]
    for half in ("reporting", None):
        names = [t for t in sets if half in (None, sets[t]["half"])]
        label = f"{half} half ({len(names)})" if half else f"all ({len(names)})"
        if not names:
            lines.append(f"| {label} | - | not finished | | | |")
            continue
        med = {s: median_pearson(icl, s, half) for s in (default, *BASELINES)}
        best = max(BASELINES, key=lambda s: med[s] if med[s] == med[s] else -9)
        r = med[default]
        lines.append(f"| {label} | median Pearson >= 0.70 | {fmt(r)} | | {r - 0.7:+.2f} | {'yes' if r >= 0.7 else 'no'} |")
        gap = r - med[best]
        lines.append(f"| {label} | median Pearson >= best baseline + 0.20 | {fmt(r)} | {best} {fmt(med[best])} | "
                     f"{gap - 0.2:+.2f} | {'yes' if gap >= 0.2 else 'no'} |")
        metrics = {primary[sets[t]["kind"]] for t in names}
        if len(metrics) != 1 or len(names) < 2:
            lines.append(f"| {label} | specificity | needs >= 2 sets sharing a primary metric | | | |")
            continue
        metric = metrics.pop()
        spec = all_sets[metric] if half is None else specificity(sets, changes, names, metric)
        d, ci = spec[default]["pearson"], spec[default]["pearson_ci"]
        best = max(BASELINES, key=lambda s: spec[s]["pearson"])
        lines.append(f"| {label} | specificity interval excludes 0 | {fmt(d, ci)} | | {ci[0]:+.2f} (lower end) | "
                     f"{'yes' if ci[0] > 0 else 'no'} |")
        b = spec[best]["pearson"]
        lines.append(f"| {label} | specificity beats every baseline | {fmt(d)} | {best} {fmt(b, spec[best]['pearson_ci'])} | "
                     f"{d - b:+.2f} | {'yes' if d > b else 'no'} |")
    return lines


def fisher_interval(r: float, n: int) -> tuple[float, float]:
    """Fisher-z 95% interval of a Pearson over n independent points: what the bootstrap over
    questions (domains fixed) leaves out, the uncertainty from which domains were sampled."""
    import math

    z, half = math.atanh(max(min(r, 0.999999), -0.999999)), 1.96 / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def fmt(r: float, ci: tuple[float, float] | list[float] | None = None) -> str:
    if r != r:
        return "n/a"
    return f"{r:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci is not None else "")


def figure(rows: list[dict], default: str | None, path: Path) -> None:
    """Per training set: every score's Pearson with its 95% interval (signed protocol)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trains = list(dict.fromkeys(r["train"] for r in rows))
    scores = list(dict.fromkeys(r["score"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(trains) * 1.6 + 1.5))
    height = 0.8 / len(scores)
    for j, s in enumerate(scores):
        for i, t in enumerate(trains):
            r = next((r for r in rows if r["train"] == t and r["score"] == s and r["protocol"] == "signed"), None)
            if r is None or r["pearson"] != r["pearson"]:
                continue
            y = i + (j - len(scores) / 2) * height
            lo, hi = r["pearson_ci"]
            colour = "#c0392b" if s == default else ("0.6" if r["baseline"] else "#3b6ea8")
            ax.errorbar(r["pearson"], y, xerr=[[max(r["pearson"] - lo, 0)], [max(hi - r["pearson"], 0)]],
                        fmt="osD^vPXh*"[j % 9], ms=3.5, color=colour, capsize=1.5, lw=0.8,
                        label=(s + (" (baseline)" if r["baseline"] else "")) if i == 0 else None)
    labels = [f"{t.split('-', 2)[2]} ({next(r['half'] for r in rows if r['train'] == t)}, "
              f"{next(r['metric'] for r in rows if r['train'] == t)})" for t in trains]
    ax.set_yticks(range(len(trains)), labels, fontsize=7)
    ax.axvline(0, color="grey", lw=0.6, ls=":")
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Pearson across domains, icl shift, 95% CI (questions resampled)", fontsize=8)
    ax.invert_yaxis()
    ax.legend(fontsize=6, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("Does STS predict per-domain transfer? Default score in red, other STS variants in blue, "
                 "baselines in grey", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def chosen_heatmaps(sets: dict, changes: dict, primary: dict[str, str], default: str) -> list[Path]:
    """The matrix as the README shows it: the default score and each kind's primary metric
    (validate's own heatmaps.png draws run.sh's --score/--metric, fixed before the choice).
    One folder per primary metric, so that each heatmap's columns are one metric's domains."""
    from sts.validation.write import heatmaps

    dirs = []
    for metric in dict.fromkeys(primary.values()):
        names = [t for t in sets if primary.get(sets[t]["kind"]) == metric]
        out = HERE / f"chosen-{metric}"
        out.mkdir(exist_ok=True)
        heatmaps(out, {t: {"scores": {"icl": sets[t]["scores"]["icl"]}} for t in names}, changes, default, metric)
        dirs.append(out)
    return dirs


def main() -> None:
    sets = finished()
    if not sets:
        raise SystemExit("no training set has finished all its stages yet")
    changes = changes_of(sets)
    primary, signal_rows = primary_metrics(sets, changes)
    rows = per_set(sets, changes, primary) + per_set(sets, changes, primary, "sft")
    icl = [r for r in rows if r["shift"] == "icl"]
    criterion = {s: median_pearson(icl, s, "choosing") for s in PRODUCT_SCORES}
    ranked = sorted(PRODUCT_SCORES, key=lambda s: -criterion[s] if criterion[s] == criterion[s] else 9)
    choosing_cot = [t for t in sets if sets[t]["half"] == "choosing" and sets[t]["kind"] == "cot"]
    spec_choosing = specificity(sets, changes, choosing_cot, primary.get("cot", "cot_nll"))
    default = ranked[0]
    if len(ranked) > 1 and criterion[ranked[0]] - criterion[ranked[1]] <= 0.05 and spec_choosing:
        default = max(ranked[:2], key=lambda s: spec_choosing[s]["pearson"])
    spec = {"all": {m: specificity(sets, changes, list(sets), m) for m in CANDIDATES}}
    for kind in ("plain", "cot"):
        if kind not in primary:
            continue
        for half in (None, "choosing", "reporting"):
            names = [t for t in sets if sets[t]["kind"] == kind and half in (None, sets[t]["half"])]
            spec[kind if half is None else f"{kind}, {half} half"] = specificity(sets, changes, names, primary[kind])
    result = {"finished": list(sets), "primary_metric": primary, "signal": signal_rows,
              "criterion_choosing": criterion, "default_score": default,
              "median_pearson": {h: {s: median_pearson(icl, s, h) for s in dict.fromkeys(r["score"] for r in icl)}
                                 for h in ("choosing", "reporting", None)},
              "specificity_choosing_cot": spec_choosing, "specificity": spec, "per_set": rows}
    (HERE / "analysis.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    figure(icl, default, HERE / "per-set.png")
    heatmap_dirs = chosen_heatmaps(sets, changes, primary, default)

    lines = ["# Transfer experiment: the pre-registered analysis", "",
             f"Sets finished: {len(sets)} of {len(SETS)} ({', '.join(sets)}). "
             "Generated by `analyse.py`; every number below is from the stage outputs in this folder.", "",
             "## Ground truth: signal per set and metric (spread across domains / RMS standard error)", "",
             "| set | half | kind | metric | mean change | spread | sem | signal | largest share |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in signal_rows:
        lines.append(f"| {r['train']} | {r['half']} | {r['kind']} | {r['metric']} | {r['mean_change']:+.4f} | "
                     f"{r['spread']:.4f} | {r['sem']:.4f} | {r['signal']:.2f} | {r['largest_share']:.2f} |")
    lines += ["", "Primary metric per kind (rule 3, choosing half): "
              + ", ".join(f"{k}: **{m}** ({Metric(m).units})" for k, m in primary.items()), "",
              "Heatmaps of the default score and the primary metric's change (raw and double-centred): "
              + ", ".join(f"`{d.name}/heatmaps.png`" for d in heatmap_dirs), "",
              "## Per training set (icl shift, each set's primary metric)", "",
              "| set | half | score | Pearson [95% CI] | Spearman [95% CI] | Pearson, one domain left out | paper protocol Pearson |",
              "|---|---|---|---|---|---|---|"]
    for r in icl:
        if r["protocol"] != "signed":
            continue
        paper = next((p for p in icl if p["protocol"] == "paper" and p["train"] == r["train"]
                      and p["score"] == r["score"]), None)
        name = f"**{r['score']}**" if r["score"] == default else r["score"] + (" (baseline)" if r["baseline"] else "")
        lines.append(f"| {r['train']} | {r['half']} | {name} | {fmt(r['pearson'], r['pearson_ci'])} | "
                     f"{fmt(r['spearman'], r['spearman_ci'])} | {fmt(r['pearson_loo'][0])} to {fmt(r['pearson_loo'][1])} | "
                     f"{fmt(paper['pearson'], paper['pearson_ci']) if paper else 'n/a'} |")
    lines += ["", "The intervals resample the questions within each domain (and keep the domains fixed): "
              "they measure the ground truth's noise, not which domains happen to be in the table. "
              "For that, Fisher's z on n domains gives much wider ones: "
              + "; ".join(f"r = +0.70 on {n} domains: {fmt(0.7, fisher_interval(0.7, n))}, "
                          f"r = +0.30: {fmt(0.3, fisher_interval(0.3, n))}" for n in (10, 14)) + ".",
              "", "## Choice of the default (choosing half)", "",
              "Median per-set Pearson: " + ", ".join(f"{s} {fmt(v)}" for s, v in criterion.items())
              + f" -> default **{default}**.", "",
              "| score | median Pearson, choosing | median Pearson, reporting | median Pearson, all |", "|---|---|---|---|"]
    for s, v in result["median_pearson"]["choosing"].items():
        lines.append(f"| {s}{' (baseline)' if s in BASELINES else ''} | {fmt(v)} | "
                     f"{fmt(result['median_pearson']['reporting'].get(s, float('nan')))} | "
                     f"{fmt(result['median_pearson'][None].get(s, float('nan')))} |")
    lines += [""] + targets(sets, changes, primary, icl, default, spec["all"])
    lines += [""] + compact_table(icl, default)
    lines += ["", "## Specificity (double-centred cells, icl shift)", ""]
    for group, by in spec.items():
        metrics = by if group == "all" else {primary[group.split(",")[0]]: by}
        for m, table in metrics.items():
            if not table:
                continue
            lines.append(f"- {group} sets, {m}: " + "; ".join(
                f"{s} {fmt(c['pearson'], c['pearson_ci'])}" for s, c in table.items()))
    (HERE / "ANALYSIS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
