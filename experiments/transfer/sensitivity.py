"""Sensitivity of the default score on the choosing half (PREREGISTRATION.md, "Sensitivity"):
k in {25, 100, 400}, training examples for the shift in {50, 100, 200}, domain questions scored
in {25, 50, 100}. Each variant changes one of them from the experiment's setting (k 100, 100
examples, 100 questions) and correlates the re-computed STS with the finished sets' ground truth
(their primary metric, from `analyse.py`), so it runs after `analyse.py` has chosen the default.

    .venv/bin/python -m experiments.transfer.analyse
    nohup .venv/bin/python -m experiments.transfer.sensitivity > sensitivity.log 2>&1 &   # from the root

Resumable: each (set, variant) is written to sensitivity/NAME.json when done and reused. The
domain questions and demonstrations are those of the experiment (`read_inputs` of the same
ValidateConfig); the extraction cache makes the k variants and the experiment's own setting free.
Writes SENSITIVITY.md, sensitivity.json and sensitivity.png beside this file. `--half reporting`
computes the same on the reporting half (SENSITIVITY-reporting.md, ...), which chooses nothing:
it gives the held-out numbers of the default at the k the choosing half picked.

`--base-k 400` varies the examples and the questions around k = 400 instead of the experiment's
k = 100: the pre-registered runs are around k = 100 (the setting of the experiment), and this
gives the same curves at the k that `sts predict` ships (`DEFAULT_K`, chosen by the k rule). It
reuses the statistics those runs cached, so it costs no model pass; its outputs carry `-k400`.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from functools import partial
from pathlib import Path

from experiments.transfer.analyse import HERE, REPLICATES, SETS, changes_of, finished
from sts.analysis import correlation as co
from sts.data.datasets import domain_demonstrations, load_dataset
from sts.data.embedded import default_sae_dir
from sts.engine.models import default_model_dir
from sts.files import atomic_path
from sts.prediction.config import PredictConfig
from sts.prediction.extraction import extract_all
from sts.prediction.predict import prediction
from sts.prediction.session import Session
from sts.validation.config import ValidateConfig, read_inputs

D = "../shared/data"  # as run.sh names it: run from the repository root
SPECS = {"train-1-champ": "embedded:champ", "train-2-alpaca-en-demo": f"{D}/alpaca_en_demo.json",
         "train-3-mmlu-pro-cot-train-physics": f"{D}/mmlu_pro_cot_train.jsonl#category=physics",
         "train-4-mmlu-pro-cot-train-psychology": f"{D}/mmlu_pro_cot_train.jsonl#category=psychology",
         "train-5-math500-test": f"{D}/math500_test.jsonl",
         "train-6-mmlu-pro-cot-train-business": f"{D}/mmlu_pro_cot_train.jsonl#category=business",
         "train-7-mmlu-pro-cot-train-biology": f"{D}/mmlu_pro_cot_train.jsonl#category=biology"}
SETTING = {"k": 100, "examples": 100, "questions": 100}  # the experiment's (run.sh)
VARIANTS = {"k": (25, 100, 400), "examples": (50, 100, 200), "questions": (25, 50, 100)}
SENTENCE = {"k": "shifted features k", "examples": "training examples behind the shift",
            "questions": "domain questions scored per domain"}


def experiment_config() -> ValidateConfig:
    """run.sh's settings, as `sts validate` reads them (domains, exclusions, demonstrations)."""
    return ValidateConfig(out=HERE, train=[SPECS[name] for name, _, _ in SETS], model=str(default_model_dir()),
                          sae=str(default_sae_dir()), exclude=[f"{D}/mmlu_pro_test.jsonl"],
                          domain_demos=f"{D}/mmlu_pro_cot_demos.jsonl", reference=f"{D}/mmlu_pro_cot_train.jsonl",
                          max_train=100, predict_examples=100, eval_examples=100, k=100, demos=2, seed=0,
                          score="act", gradients=False)  # run.sh's --score; no gradient scores (no probe split)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vary", action="append", choices=list(VARIANTS),
                        help="only these settings (repeatable; default all three). k alone needs no "
                             "model pass: the extraction cache holds the experiment's statistics")
    parser.add_argument("--half", choices=("choosing", "reporting"), default="choosing",
                        help="reporting: the held-out half's numbers (nothing is chosen from them)")
    parser.add_argument("--base-k", type=int, default=SETTING["k"], choices=VARIANTS["k"],
                        help="the k the other settings are varied around (default: the experiment's 100)")
    args = parser.parse_args()
    only, half = args.vary or list(VARIANTS), args.half
    base = SETTING | {"k": args.base_k}
    suffix = ("" if half == "choosing" else f"-{half}") + ("" if base == SETTING else f"-k{args.base_k}")
    analysis = json.loads((HERE / "analysis.json").read_text())
    score, primary = analysis["default_score"], analysis["primary_metric"]
    sets = {t: info for t, info in finished().items() if info["half"] == half}
    if not sets:
        raise SystemExit(f"no {half}-half set has finished; run the experiment first")
    changes = changes_of(sets)
    cfg = experiment_config()
    inputs = read_inputs(cfg)
    demos, domains = domain_demonstrations(inputs.domains, cfg.domain_demos_n, cfg.domain_demos)
    store = HERE / "sensitivity"
    store.mkdir(exist_ok=True)
    rows = []
    scored: dict[tuple[str, int], dict[str, dict[str, float]]] = {}  # (varied, value) -> set -> scores
    varied = {what: values for what, values in VARIANTS.items() if what in only}
    for t, info in sets.items():
        metric = primary[info["kind"]]
        for what, values in varied.items():
            for value in values:
                setting = base | {what: value}
                # one file per setting, named by how it differs from the experiment's, so that every
                # variant (and every --base-k) that reaches a setting reuses its run
                name = f"{t}--" + ("--".join(f"{w}-{v}" for w, v in setting.items() if v != SETTING[w])
                                    or "setting")
                path = store / f"{name}.json"
                if not path.is_file():
                    train = load_dataset(SPECS[t], max_examples=setting["examples"])
                    pcfg = PredictConfig(model=cfg.model, sae=cfg.sae, train=train.spec, domains=cfg.domains,
                                         method="icl", k=setting["k"], demos=cfg.demos, seed=cfg.seed,
                                         max_train=len(train.examples), max_examples=setting["questions"],
                                         score=score, domain_demos=cfg.domain_demos, domain_demos_n=cfg.domain_demos_n,
                                         top_contexts=0)  # contexts need a model pass and change no score
                    asked = {d: q[: setting["questions"]] for d, q in domains.items()}
                    progress = partial(print, f"sensitivity: {name}:", file=sys.stderr)
                    session = Session(pcfg, progress)
                    extraction = extract_all(pcfg, train, asked, (score,), demos, progress, session)
                    pred = prediction(pcfg, extraction, score, train, session)
                    with atomic_path(path) as tmp:
                        tmp.write_text(json.dumps({"setting": setting, "score": score, "scores": pred.scores,
                                                   "examples": len(train.examples)}, indent=1) + "\n")
                got = json.loads(path.read_text())
                if setting == SETTING:  # must reproduce the experiment's own scores, or the variants compare nothing
                    ran = info["scores"]["icl"][score]
                    gap = max(abs(got["scores"][d] - ran[d]) / max(abs(ran[d]), 1e-12) for d in ran)
                    if gap > 1e-4:
                        raise SystemExit(f"{name}: the experiment's setting gives scores {gap:.1e} (relative) away "
                                         "from scores-icl.json; the sensitivity runs would not compare like with like")
                scored.setdefault((what, value), {})[t] = got["scores"]
                c = co.correlate(got["scores"], changes[t][metric], REPLICATES, 0, None, "signed", metric)
                rows.append({"train": t, "vary": what, "value": value, "metric": metric,
                             "examples": got["examples"], **dataclasses.asdict(c)})
    summary = {what: {v: statistics.median(r["pearson"] for r in rows if r["vary"] == what and r["value"] == v)
                      for v in values} for what, values in varied.items()}
    specific = specificity(scored, sets, changes, primary)
    (HERE / f"sensitivity{suffix}.json").write_text(json.dumps({"score": score, "primary_metric": primary, "rows": rows,
                                                       "median_pearson": summary, "specificity": specific},
                                                      indent=1) + "\n")
    figure(rows, score, varied, f"{half} half, k = {base['k']} unless varied", HERE / f"sensitivity{suffix}.png")
    lines = [f"# Sensitivity of the default score ({half} half)", "",
             f"Score **{score}**, icl shift, signed protocol, each set's primary metric ({primary}); one setting "
             f"varied at a time from {base}. Generated by `sensitivity.py`"
             + (f" --base-k {args.base_k}" if base != SETTING else "") + ".", "",
             "| varied | value | set | Pearson [95% CI] | Spearman |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['vary']} | {r['value']} | {r['train']} | {r['pearson']:+.2f} "
                     f"[{r['pearson_ci'][0]:+.2f}, {r['pearson_ci'][1]:+.2f}] | {r['spearman']:+.2f} |")
    lines += [""] + [f"- {SENTENCE[w]}: median Pearson " + ", ".join(f"{v}: {p:+.2f}" for v, p in by.items())
                     for w, by in summary.items()]
    if specific:
        lines += ["", f"Specificity (double-centred cells of the half's {len(sets)} sets, {specific['metric']}; "
                      "95% intervals over questions):"]
        lines += [f"- {SENTENCE[w]}: " + ", ".join(f"{v}: {c['pearson']:+.2f} [{c['pearson_ci'][0]:+.2f}, "
                                                   f"{c['pearson_ci'][1]:+.2f}]" for v, c in by.items())
                  for w, by in specific["by"].items()]
    # PREREGISTRATION.md: k = 100 unless another k beats it by more than 0.05
    if "k" in summary and half == "choosing" and base == SETTING:
        by_k = summary["k"]
        best = max(by_k, key=lambda v: by_k[v])
        chosen = best if by_k[best] - by_k[100] > 0.05 else 100
        lines += ["", f"The pre-registered k rule (k = 100 unless another k beats its median Pearson by more "
                      f"than 0.05): **k = {chosen}**."]
    (HERE / f"SENSITIVITY{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def specificity(scored: dict[tuple[str, int], dict[str, dict[str, float]]], sets: dict, changes: dict,
                primary: dict[str, str]) -> dict:
    """The specificity correlation of each variant over the half's sets, when they share one
    primary metric (cot_nll for both kinds, as the choosing half made it) and are at least 2;
    else {} (a specificity across metrics would compare unlike changes)."""
    metrics = {primary[info["kind"]] for info in sets.values()}
    if len(sets) < 2 or len(metrics) != 1:
        return {}
    metric = metrics.pop()
    by: dict[str, dict[int, dict]] = {}
    for (what, value), per_set in scored.items():
        m = co.correlate_matrix(per_set, {t: changes[t][metric] for t in per_set}, "specificity", REPLICATES, 0, metric)
        by.setdefault(what, {})[value] = dataclasses.asdict(m)
    return {"metric": metric, "by": by}


def figure(rows: list[dict], score: str, varied: dict[str, tuple[int, ...]], where: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(varied), figsize=(max(4.6, 3.7 * len(varied)), 3.8), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (what, values) in zip(axes, varied.items()):
        for t in dict.fromkeys(r["train"] for r in rows):
            mine = sorted((r for r in rows if r["vary"] == what and r["train"] == t), key=lambda r: r["value"])
            x = [r["value"] for r in mine]
            ax.errorbar(x, [r["pearson"] for r in mine], fmt="o-", capsize=3, alpha=0.8,
                        yerr=[[r["pearson"] - r["pearson_ci"][0] for r in mine],
                              [r["pearson_ci"][1] - r["pearson"] for r in mine]],
                        label=t.split("-", 2)[-1])
        ax.plot(values, [statistics.median(r["pearson"] for r in rows if r["vary"] == what and r["value"] == v)
                         for v in values], "k--", lw=1.5, label="median over sets")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(values, [str(v) for v in values])
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel(SENTENCE[what])
    axes[0].set_ylabel(f"Pearson, STS ({score}) vs change\n(95% bootstrap CI)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"How much data a prediction needs\n({where}; one setting varied at a time)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)


if __name__ == "__main__":
    main()
