"""Every candidate on the transfer experiment's matrix, post hoc (issue: "a prediction that knows
its training set"). These numbers choose nothing: every set's outcome has been seen. They
decide which candidates enter the held-out round.

Candidates: every statistics score with the icl shift at k = 100 (the experiment's) and k = 400
(the shipped default), from the committed statistics (`extractions.py`, no model pass); the
sft shift's scores at k = 100 (committed scores-sft.json; they need the tuned model); the
gradient scores (`gradients.py`, when its numbers are there); and each of them with the
shared / own decomposition of `sts.analysis.library` (`+lib`), the library being the other six sets
(leave-one-set-out: a set's own outcome never enters its prediction).

Judged on the primary metric (cot_nll over the 10 reference domains) and on nll (14 MMLU
domains): per-set Pearson (median over the 7 sets), specificity (Pearson on the double-centred
sets x domains matrices, 95% interval from the questions), the swap test (own minus other),
pooled Pearson, and, for each set drawn from one domain, that domain's rank.

    .venv/bin/python -m experiments.transfer.candidates   # writes CANDIDATES.md, candidates.json|png
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict

import numpy as np

from experiments import common
from experiments.common import OWN, RESULTS
from experiments.transfer.analyse import SETS
from sts.analysis import correlation as co
from sts.analysis.library import Library, LibrarySet, decompose
from sts.engine.evaluation import Evaluation
from sts.scores.score import baselines, statistics_scores

HERE = RESULTS / "transfer"  # its reports (this script is experiments/transfer)

BASELINES, STATISTICS_SCORES = baselines(), statistics_scores()

METRICS = ("cot_nll", "nll")
REPLICATES = 1000

def changes() -> dict[str, dict[str, dict[str, co.DomainChange]]]:
    """set -> metric -> domain -> the measured change (committed evaluations)."""
    base = {"nll": Evaluation.load(HERE / "eval-base"), "cot_nll": Evaluation.load(HERE / "eval-base-reference")}
    out = {}
    for name, _, _ in SETS:
        tuned = {"nll": Evaluation.load(HERE / name / "eval-tuned"),
                 "cot_nll": Evaluation.load(HERE / name / "eval-tuned-reference")}
        out[name] = {m: co.changes_from_evaluations(base[m], tuned[m], m) for m in METRICS}
    return out


def candidates() -> dict[str, dict[str, dict[str, float]]]:
    """candidate name -> set -> domain -> score."""
    from experiments.transfer import extractions

    out: dict[str, dict[str, dict[str, float]]] = {}
    have = all((extractions.OUT / f"{n}.shift-sae.safetensors").is_file() for n, _, _ in SETS)
    for name, _, _ in SETS:
        sft = json.loads((HERE / name / "scores-sft.json").read_text())["scores"]
        for score, values in sft.items():
            out.setdefault(f"{score} (sft, k100)", {})[name] = values
        if have:
            ex = extractions.load(name)
            for k in (100, 400):
                cfg = extractions.predict_config(name)
                import dataclasses

                from sts.prediction.predict import score_extraction

                cfg = dataclasses.replace(cfg, k=k)
                for score in STATISTICS_SCORES:
                    if k == 400 and score in ("cosine", "lexical"):
                        continue
                    label = f"{score} (icl, k{k})" if score not in ("cosine", "lexical") else f"{score} (icl)"
                    out.setdefault(label, {})[name] = score_extraction(cfg, ex, score)[0]
        else:  # the committed scores of the experiment (k = 100) until the statistics are exported
            icl = json.loads((HERE / name / "scores-icl.json").read_text())["scores"]
            for score, values in icl.items():
                label = f"{score} (icl, k100)" if score not in ("cosine", "lexical") else f"{score} (icl)"
                out.setdefault(label, {})[name] = values
    grads = HERE / "stats" / "gradients.json"
    if grads.is_file():
        g = json.loads(grads.read_text())["sets"]
        if all(n in g for n, _, _ in SETS):
            for key in g[SETS[0][0]]["scores"]:
                score, metric = key.split(":")
                out[f"{score} (domain side: {metric})"] = {n: g[n]["scores"][key] for n, _, _ in SETS}
    return out


def decomposed(scores: dict[str, dict[str, float]], measured: dict[str, dict[str, dict[str, co.DomainChange]]],
               metric: str) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Each set's `combined` (shared + own) and `own` part, the library being the other six sets."""
    lib = Library("", "", 0, metric, {n: LibrarySet(n, {"x": scores[n]}, {metric: {d: c.delta for d, c in
                                                                                 measured[n][metric].items()}})
                                      for n in scores})
    parts = {n: decompose(lib, "x", scores[n], leave_out=n) for n in scores}
    return {n: p.combined for n, p in parts.items()}, {n: p.own for n, p in parts.items()}


def judge(scores: dict[str, dict[str, float]], measured: dict[str, dict[str, dict[str, co.DomainChange]]],
          metric: str, own: dict[str, dict[str, float]] | None = None,
          domains: dict[str, str | None] | None = None) -> dict:
    """Per-set Pearson, pooled and own-domain ranks of `scores`; specificity and the swap test of
    `own` when given (the decomposition's own part: its shared part is left-one-out measured
    changes, whose double-centred cells run against each set's own outcome by construction).
    `domains`: each set's own domain (default: this experiment's `OWN`)."""
    domains = OWN if domains is None else domains
    sets = list(scores)
    ch = {n: measured[n][metric] for n in sets}
    per_set = {n: co.correlate(scores[n], ch[n], REPLICATES, 0, None, "signed", metric).pearson for n in sets}
    spec = co.correlate_matrix(own or scores, ch, "specificity", REPLICATES, 0, metric)
    pooled = co.correlate_matrix(scores, ch, "pooled", REPLICATES, 0, metric)
    swap = co.swap_test(own or scores, ch, REPLICATES, 0, metric)
    ranks = {n: co.own_domain_rank(scores[n], ch[n], own_d) for n in sets
             if (own_d := domains.get(n)) and own_d in scores[n] and own_d in ch[n]}
    return {"median_pearson": statistics.median(per_set.values()), "per_set": per_set,
            "specificity": spec.pearson, "specificity_ci": spec.pearson_ci, "pooled": pooled.pearson,
            "swap": asdict(swap), "own_domain": ranks}


def main() -> None:
    measured = changes()
    table: dict[str, dict[str, dict]] = {}
    for label, scores in candidates().items():
        for metric in METRICS:
            table.setdefault(label, {})[metric] = judge(scores, measured, metric)
            combined, own = decomposed(scores, measured, metric)
            table.setdefault(label + " +lib", {})[metric] = judge(combined, measured, metric, own)
    truth = {m: {n: {d: c.delta for d, c in measured[n][m].items()} for n, _, _ in SETS} for m in METRICS}
    (HERE / "candidates.json").write_text(json.dumps({"table": table, "truth": truth}, indent=1) + "\n")
    write_markdown(table, measured)
    figure(table)


def _f(x: float) -> str:
    return "nan" if x != x else f"{x:+.2f}"


def write_markdown(table: dict[str, dict[str, dict]], measured: dict) -> None:
    lines = ["# Every candidate on the transfer experiment's matrix (post hoc: chooses nothing)", "",
             "Generated by `.venv/bin/python -m experiments.transfer.candidates` from committed files only (the",
             "statistics of `extractions.py`, the gradients' inner products of `gradients.py`, the evaluations).",
             "Every set's outcome has been seen: these numbers only decide which candidates enter the held-out",
             "round. `+lib`: the shared / own decomposition (`sts.analysis.library`), the library being the other six sets",
             "(leave-one-set-out): per-set Pearson, pooled and own-domain ranks of the sum, specificity and the swap",
             "test of the own part (the shared part's double-centred cells run against each set's own outcome by",
             "construction). Baselines need no SAE. Own-domain rank: score rank / truth rank.", ""]
    for metric in METRICS:
        lines += [f"## {metric}", "",
                  "| candidate | median per-set Pearson | specificity [95% CI] | swap: own / other / own - other "
                  "[95% CI] | pooled | own-domain rank (score / truth) |", "|---|---|---|---|---|---|"]
        order = sorted(table, key=lambda c: -np.nan_to_num(table[c][metric]["specificity"], nan=-9))
        for c in order:
            r = table[c][metric]
            s = r["swap"]
            ranks = ", ".join(f"{v['score_rank']}/{v['change_rank']}" for v in r["own_domain"].values())
            base = c.split(" ")[0]
            name = c + (" (baseline)" if base in BASELINES else "")
            lines.append(f"| {name} | {_f(r['median_pearson'])} | {_f(r['specificity'])} "
                         f"[{_f(r['specificity_ci'][0])}, {_f(r['specificity_ci'][1])}] | {_f(s['own'])} / "
                         f"{_f(s['other'])} / {_f(s['difference'])} [{_f(s['difference_ci'][0])}, "
                         f"{_f(s['difference_ci'][1])}] | {_f(r['pooled'])} | {ranks} |")
        sets = [n for n, _, _ in SETS if OWN[n] and OWN[n] in measured[n][metric]]
        lines += ["", f"Own-domain ranks are listed for {', '.join(f'{n} ({OWN[n]})' for n in sets)}, in that "
                  "order; of the domains measured.", ""]
    (HERE / "CANDIDATES.md").write_text("\n".join(lines) + "\n")


def figure(table: dict[str, dict[str, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = METRICS[0]
    labels = sorted(table, key=lambda c: np.nan_to_num(table[c][metric]["specificity"], nan=-9))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.26 * len(labels) + 1.5), sharey=True)
    for i, c in enumerate(labels):
        r = table[c][metric]
        colour = "0.55" if c.split(" ")[0] in BASELINES else "#3b6ea8"
        lo, hi = r["specificity_ci"]
        axes[0].errorbar(r["specificity"], i, xerr=[[max(r["specificity"] - lo, 0)], [max(hi - r["specificity"], 0)]],
                         fmt="o", color=colour, ms=3, capsize=2)
        s = r["swap"]
        lo, hi = s["difference_ci"]
        axes[1].errorbar(s["difference"], i, xerr=[[max(s["difference"] - lo, 0)], [max(hi - s["difference"], 0)]],
                         fmt="o", color=colour, ms=3, capsize=2)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=6)
    common.specificity_swap_axes(axes, metric)
    fig.suptitle("Candidates on the 7-set transfer matrix (post hoc; grey: no SAE)", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / "candidates.png", dpi=150)
    plt.close(fig)


if __name__ == "__main__":
    main()
