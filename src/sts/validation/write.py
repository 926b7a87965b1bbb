"""A validation's files: results.json, the matrices, correlation tables, the comparison of every
score and baseline, and the heatmaps.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sts.analysis import correlation as co
from sts.choices import Metric
from sts.files import atomic_path, write_csv
from sts.validation.outcome import Changes, ValidationResult


def write_results(out: Path, results: ValidationResult) -> None:
    """results.json (every field), results.csv (the cells), swap.csv and own-domain.csv."""
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(asdict(results), indent=1) + "\n")
    header = list(dict.fromkeys(h for c in results.cells for h in c))
    write_csv(out / "results.csv", header, ([c.get(h, "") for h in header] for c in results.cells), line_end="\n")
    if results.swap:
        write_csv(out / "swap.csv", ["shift", "score", "baseline", "metric", "sets", "domains", "own", "own_lo",
                                     "own_hi", "other", "other_lo", "other_hi", "difference", "difference_lo",
                                     "difference_hi"],
                  ([r["shift"], r["score"], r["baseline"], r["metric"], r["sets"], r["domains"],
                    *(f"{v:.4f}" for v in (r["own"], *r["own_ci"], r["other"], *r["other_ci"], r["difference"],
                                           *r["difference_ci"]))] for r in results.swap))
    if results.own_domain:
        keys = ["train", "domain", "score", "baseline", "metric", "score_rank", "change_rank", "domains"]
        write_csv(out / "own-domain.csv", keys, ([r[k] for k in keys] for r in results.own_domain))


def write_matrices(out: Path, per_train: dict[str, dict[str, Any]], changes: Changes, metrics: list[str]) -> None:
    """matrices/score-SHIFT-SCORE.csv and matrices/change-METRIC.csv: training sets x the domains
    every set has (a score's own: the gradient scores may read the reference domains only)."""
    def shared(rows: list[dict[str, Any]]) -> list[str]:
        return sorted(set.intersection(*(set(r) for r in rows)))

    first = next(iter(per_train.values()))["scores"]
    tables: dict[str, tuple[list[str], dict[str, dict[str, float]]]] = {}
    for method in first:  # the shifts run
        for s in first[method]:
            values = {t: info["scores"][method][s] for t, info in per_train.items()}
            tables[f"score-{method}-{s}"] = (shared(list(values.values())), values)
    for metric in metrics:
        values = {t: {d: ch.delta for d, ch in changes[t][metric].items()} for t in per_train}
        tables[f"change-{metric}"] = (shared(list(values.values())), values)
    for name, (cols, values) in tables.items():
        write_csv(out / "matrices" / f"{name}.csv", ["train", *cols],
                  ([t, *(f"{values[t][d]:.6g}" for d in cols)] for t in per_train))


CORRELATION_COLUMNS = ["train", "shift", "score", "baseline", "metric", "protocol", "n", "pearson", "pearson_lo",
                       "pearson_hi", "spearman", "spearman_lo", "spearman_hi", "pearson_loo_min", "pearson_loo_max",
                       "domains_used"]


def _figures(r: dict[str, Any], loo: bool = True) -> list[str]:
    values = (r["pearson"], *r["pearson_ci"], r["spearman"], *r["spearman_ci"], *(r["pearson_loo"] if loo else ()))
    return [f"{v:.4f}" for v in values]


def write_correlations(out: Path, rows: list[dict[str, Any]], matrix_rows: list[dict[str, Any]]) -> None:
    """correlations.csv: one row per set (or pooled / specificity), shift, score, metric, protocol."""
    lines = [[r["train"], r["shift"], r["score"], r["baseline"], r["metric"], r["protocol"], r["domains"],
              *_figures(r), ";".join(r["domains_used"])] for r in rows]
    lines += [[r["train"], r["shift"], r["score"], r["baseline"], r["metric"], "signed", r["cells"], *_figures(r),
               "all cells" if r["kind"] == "pooled" else "all cells, double-centred"] for r in matrix_rows]
    write_csv(out / "correlations.csv", CORRELATION_COLUMNS, lines)


def signal_table(signals: list[dict[str, Any]]) -> str:
    """Per training set and metric: how far the changes spread across domains, over their noise."""
    lines = [f"{'train':<40} {'metric':<9} {'mean change':>11} {'spread':>9} {'sem':>9} {'signal':>7} {'top share':>9}"]
    for r in signals:
        lines.append(f"{r['train']:<40} {r['metric']:<9} {r['mean_change']:>11.4g} {r['spread']:>9.4g} "
                     f"{r['sem']:>9.4g} {r['signal']:>7.2f} {r['largest_share']:>9.2f}")
    return "\n".join(lines)


def comparison_table(comparison: list[dict[str, Any]]) -> str:
    """Every score and baseline under every protocol: Pearson with its 95% interval."""
    protocols = list(dict.fromkeys(c["protocol"] for c in comparison))
    head = f"{'shift':<5} {'score':<8} " + " ".join(f"{p + ' Pearson [95% CI]':<27}" for p in protocols)
    lines = [head]
    for (shift, score) in dict.fromkeys((c["shift"], c["score"]) for c in comparison):
        cells = []
        for p in protocols:
            c = next(c for c in comparison if (c["shift"], c["score"], c["protocol"]) == (shift, score, p))
            cells.append(f"{c['pearson']:+.2f} [{c['pearson_ci'][0]:+.2f}, {c['pearson_ci'][1]:+.2f}]".ljust(27))
        lines.append(f"{shift:<5} {score:<8} " + " ".join(cells))
    return "\n".join(lines)


def matrix_table(matrix_rows: list[dict[str, Any]], metric: str) -> str:
    """Pooled and specificity correlations per score, for one metric."""
    lines = [f"{'shift':<5} {'score':<8} {'pooled Pearson [95% CI]':<27} {'specificity Pearson [95% CI]':<27}"]
    for (shift, score) in dict.fromkeys((r["shift"], r["score"]) for r in matrix_rows if r["metric"] == metric):
        cells = []
        for kind in ("pooled", "specificity"):
            r = next((r for r in matrix_rows if (r["shift"], r["score"], r["metric"], r["kind"])
                      == (shift, score, metric, kind)), None)
            cells.append("-".ljust(27) if r is None else
                         f"{r['pearson']:+.2f} [{r['pearson_ci'][0]:+.2f}, {r['pearson_ci'][1]:+.2f}]".ljust(27))
        lines.append(f"{shift:<5} {score:<8} " + " ".join(cells))
    return "\n".join(lines)


def swap_table(swap: list[dict[str, Any]], metric: str) -> str:
    """The swap test per score (icl shift), for one metric: own, other and their difference."""
    lines = [f"{'score':<8} {'own [95% CI]':<22} {'other [95% CI]':<22} {'own - other [95% CI]':<22}"]
    for r in swap:
        if r["metric"] == metric and r["shift"] == "icl":
            lines.append(f"{r['score']:<8} " + " ".join(
                f"{r[k]:+.2f} [{r[k + '_ci'][0]:+.2f}, {r[k + '_ci'][1]:+.2f}]".ljust(22)
                for k in ("own", "other", "difference")))
    return "\n".join(lines)


def own_domain_table(rows: list[dict[str, Any]]) -> str:
    """Per set drawn from one domain: that domain's rank by each score, and by the change."""
    sets = list(dict.fromkeys((r["train"], r["domain"]) for r in rows))
    scores = list(dict.fromkeys(r["score"] for r in rows))
    lines = [f"{'train':<40} {'domain':<16} {'change':>6} " + " ".join(f"{s:>8}" for s in scores)]
    for t, d in sets:
        mine = {r["score"]: r for r in rows if r["train"] == t}
        first = next(iter(mine.values()))
        lines.append(f"{t:<40} {d:<16} {first['change_rank']:>3}/{first['domains']:<2} "
                     + " ".join(f"{mine[s]['score_rank']:>8}" if s in mine else f"{'-':>8}" for s in scores))
    return "\n".join(lines)


def write_comparison(comparison: list[dict[str, Any]], out: Path) -> None:
    """comparison.csv (one row per shift x score x protocol) and comparison.png (Pearson with
    its 95% interval, one panel per protocol, baselines in grey), for the first training set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_csv(out / "comparison.csv", ["shift", "score", "baseline", "metric", "protocol", "domains",
                                       *CORRELATION_COLUMNS[7:13], "domains_used"],
              ([c["shift"], c["score"], c["baseline"], c["metric"], c["protocol"], c["domains"],
                *_figures(c, loo=False), ";".join(c["domains_used"])] for c in comparison))
    protocols = list(dict.fromkeys(c["protocol"] for c in comparison))
    labels = list(dict.fromkeys(f"{c['score']} ({c['shift']})" for c in comparison))
    fig, axes = plt.subplots(1, len(protocols), figsize=(3.4 * len(protocols), 0.32 * len(labels) + 1.4),
                             sharey=True, squeeze=False)
    for ax, p in zip(axes[0], protocols):
        for i, label in enumerate(labels):
            c = next(c for c in comparison if f"{c['score']} ({c['shift']})" == label and c["protocol"] == p)
            lo, hi = c["pearson_ci"]
            if c["pearson"] == c["pearson"]:  # not nan
                ax.errorbar(c["pearson"], i, xerr=[[max(c["pearson"] - lo, 0)], [max(hi - c["pearson"], 0)]],
                            fmt="o", color="0.55" if c["baseline"] else "#3b6ea8", ms=4, capsize=2)
        ax.axvline(0, color="grey", lw=0.6, ls=":")
        ax.set_xlim(-1.05, 1.05)
        ax.set_title(p + (" (outcome-chosen domains)" if p == "paper" else ""), fontsize=8)
        ax.set_xlabel("Pearson ρ, 95% CI", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    with atomic_path(out / "comparison.png") as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)


def heatmaps(out: Path, per_train: dict[str, dict[str, Any]],
             changes: dict[str, dict[str, dict[str, co.DomainChange]]], score: str, metric: str) -> None:
    """heatmaps.png: the primary score and the metric's change, raw and double-centred;
    specificity.png: the double-centred cells against each other (2+ training sets)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    trains = list(per_train)
    domains = sorted(set.intersection(*(set(changes[t][metric]) for t in trains)))
    x = np.array([[per_train[t]["scores"]["icl"][score][d] for d in domains] for t in trains])
    y = np.array([[changes[t][metric][d].delta for d in domains] for t in trains])
    panels = [(x, f"{score} (icl shift)"), (y, f"{metric} change ({Metric(metric).units})")]
    if len(trains) > 1:
        panels += [(co.double_centre(x), f"{score}, double-centred"),
                   (co.double_centre(y), f"{metric} change, double-centred")]
    size = (0.55 * len(domains) + 3, (0.35 * len(trains) + 1.3) * len(panels))
    fig, axes = plt.subplots(len(panels), 1, figsize=size, squeeze=False)
    for ax, (m, title) in zip(axes[:, 0], panels):
        lim = np.abs(m).max() or 1.0
        im = ax.imshow(m, cmap="RdBu_r" if "centred" in title or "change" in title else "viridis",
                       vmin=-lim if "centred" in title or "change" in title else None,
                       vmax=lim if "centred" in title or "change" in title else None, aspect="auto")
        ax.set_yticks(range(len(trains)), trains, fontsize=6)
        ax.set_xticks(range(len(domains)), domains, fontsize=6, rotation=60, ha="right")
        ax.set_title(title, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    with atomic_path(out / "heatmaps.png") as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)
    if len(trains) < 2:
        return
    xc, yc = co.double_centre(x).ravel(), co.double_centre(y).ravel()
    fig, ax = plt.subplots(figsize=(5, 4))
    for i, t in enumerate(trains):
        ax.scatter(xc[i * len(domains):(i + 1) * len(domains)], yc[i * len(domains):(i + 1) * len(domains)],
                   s=18, label=t)
    r = np.corrcoef(xc, yc)[0, 1] if np.ptp(xc) > 0 and np.ptp(yc) > 0 else float("nan")
    ax.set_title(f"specificity: double-centred cells, Pearson {r:+.2f}", fontsize=9)
    ax.set_xlabel(f"{score}, training-set and domain means removed", fontsize=8)
    ax.set_ylabel(f"{metric} change, means removed", fontsize=8)
    ax.axhline(0, color="grey", lw=0.6, ls=":")
    ax.axvline(0, color="grey", lw=0.6, ls=":")
    ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(out / "specificity.png") as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)
