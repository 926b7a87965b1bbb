"""Is the ground truth the template? (issue 24, item 7). `cot_nll` scores every token of
MMLU-Pro's reference chains of thought, whose openings are templated ("Let's think step by
step." everywhere, "We refer to Wikipedia articles on TOPIC for help." in business,
psychology, history, other, philosophy...). `cot_nll_content` scores the tokens after that
opening (kept as context). This script measures both, with the same records and models, for
the transfer experiment's seven sets and the held-out round's sets.

    python -m experiments.content.content run       # resumable; hours on 2 CPU cores
    python -m experiments.content.content analyse   # CONTENT.md, content.json

Run from the repository root with ../shared beside it. Stages, each kept once written:
- the base model on each record set (the transfer's reference records; the held-out round's);
- each set's tuned model: the held-out round's where its checkout still has it, else trained
  again with the experiment's settings (seed 0; its losses are compared with the committed
  finetune.json's, so a retrained model is shown to be the same run);
- each tuned model on its record set.
The records are rebuilt from each experiment's own settings (`sts.validation.config.read_inputs`) and
checked id by id against that experiment's committed base evaluation.

Which metric should the held-out round use? The rule, written 2026-12-01 before any analysis of
the new evaluations had run (the held-out sets 1 and 2 were evaluated and committed, their numbers
not yet read), over every set measured under both metrics (the held-out round's and the transfer
sets finished by then):
- per set, `gap` = the mean change on the templated categories minus the mean on the others;
- T, "the families are the template": the median over sets of |gap| under cot_nll_content is at
  most half its median under cot_nll;
- S, "the content metric keeps a signal": the median over sets of cot_nll_content's signal (the
  domain changes' spread over their RMS standard error) is at least 2;
- T and S: the held-out round should use cot_nll_content (what the families measured was the
  template; the content is what a user asks about). Not T: cot_nll stays (the families are in the
  content too, and the committed results stay comparable). T but not S: cot_nll stays, and the
  report says its families are the template while 100 records per domain are too few for the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from experiments.common import RESULTS

HERE = RESULTS / "content"  # its reports (this script is experiments/content)

D = "../shared/data"
PRO = f"{D}/mmlu_pro_cot_train.jsonl"
# experiment -> (its training sets in run order, the checkout whose tuned models may still be there)
# (the held-out round first: its tuned models need no retraining where its checkout still has them)
EXPERIMENTS = {
    "heldout": ([f"{PRO}#category=computer science", f"{PRO}#category=history", f"{D}/math500_test.jsonl#rows=400:500"],
                Path("/work/heldout-run/docs/results/heldout")),
    "transfer": (["embedded:champ", f"{D}/alpaca_en_demo.json", f"{PRO}#category=physics", f"{PRO}#category=psychology",
                  f"{D}/math500_test.jsonl", f"{PRO}#category=business", f"{PRO}#category=biology"], None),
}
METRICS = ("cot_nll", "cot_nll_content")
# the transfer sets' run order (an execution order only; every set is analysed): the sets trained
# on templated references first (psychology, business), then the other MMLU-Pro CoT sets, then the rest
ORDER = (3, 5, 2, 6, 0, 4, 1)


def config(experiment: str):  # type: ignore[no-untyped-def]
    from sts.validation.config import ValidateConfig

    train, _ = EXPERIMENTS[experiment]
    # no gradient scores: the reference records are rebuilt as those rounds drew them, before any
    # probe records were set aside for the gradient scores' domain side (later releases do that)
    return ValidateConfig(out=RESULTS / experiment, train=train, exclude=[f"{D}/mmlu_pro_test.jsonl"],
                          reference=PRO, reference_examples=100, max_train=100, score="act", gradients=False)


def records(experiment: str) -> dict:
    """The experiment's reference records, checked against its committed base evaluation."""
    import csv

    from sts.validation.config import read_inputs

    groups = read_inputs(config(experiment)).reference
    mine = {(d, str(e.uid)) for d, q in groups.items() for e in q}
    with open(RESULTS / experiment / "eval-base-reference" / "predictions.csv") as f:
        theirs = {(r["domain"], r["question_id"]) for r in csv.DictReader(f)}
    if mine != theirs:
        sys.exit(f"{experiment}: the rebuilt reference records differ from the committed ones ({len(mine ^ theirs)})")
    return groups


def evaluate(find_model: Callable[[], str], groups: dict, out: Path) -> None:
    """Evaluate the model `find_model` gives, unless `out` holds its evaluation already: the model
    is looked for (a tuned one trained again) only then, since a fresh checkout keeps none."""
    from sts.engine.evaluation import evaluate as run_evaluation
    from sts.engine.models import load_model

    if (out / "predictions.csv").is_file():
        return
    model = find_model()
    print(f"evaluate {model} -> {out}", file=sys.stderr, flush=True)
    run_evaluation(load_model(model, "float32", "cpu"), groups, mode="reference").save(out)


def tuned_model(experiment: str, name: str, spec: str) -> str:
    """The set's tuned model: kept by the run's checkout, else trained again (same settings)."""
    _, checkout = EXPERIMENTS[experiment]
    if checkout is not None and (checkout / name / "tuned" / "config.json").is_file():
        return str(checkout / name / "tuned")
    where = HERE / experiment / name / "tuned"
    if not (where / "finetune.json").is_file():
        print(f"fine-tune {name} again -> {where}", file=sys.stderr, flush=True)
        subprocess.run([str(Path(sys.executable).parent / "sts"), "finetune", "--out", str(where), "--train", spec,
                        "--max-train", "100", "--max-steps", "60", "--batch-size", "4", "--seed", "0"], check=True)
    # the same run? its loss at every step against the committed run's
    again = json.loads((where / "finetune.json").read_text())["losses"]
    first = json.loads((RESULTS / experiment / name / "tuned" / "finetune.json").read_text())["losses"]
    check = {"steps": [len(first), len(again)],
             "max_abs_loss_difference": max(abs(a - b) for a, b in zip(first, again)) if len(first) == len(again)
             else None}
    (HERE / experiment / name / "retrained.json").write_text(json.dumps(check, indent=1) + "\n")
    return str(where)


def run() -> None:
    from sts.data.datasets import load_dataset
    from sts.validation.plan import train_dir_name

    for experiment, (train, _) in EXPERIMENTS.items():
        groups = records(experiment)
        evaluate(lambda: str(_base_model()), groups, HERE / experiment / "eval-base-reference")
        for i in sorted(range(len(train)), key=lambda i: ORDER.index(i) if experiment == "transfer" else i):
            spec = train[i]
            name = train_dir_name(i, load_dataset(spec, max_examples=100))
            if not (RESULTS / experiment / name / "eval-tuned-reference").is_dir():
                print(f"{experiment}/{name}: not measured yet; skipped", file=sys.stderr)
                continue
            evaluate(lambda: tuned_model(experiment, name, spec), groups,  # noqa: B023 (called at once)
                     HERE / experiment / name / "eval-tuned-reference")


def _base_model() -> Path:
    from sts.engine.models import default_model_dir

    return default_model_dir()


# Categories whose references carry the Wikipedia sentence (checked on the records by `analyse`)
def templated(groups: dict) -> set[str]:
    from sts.engine.evaluation import OPENING

    return {d for d, q in groups.items() if any("Wikipedia" in (m.group(0) if (m := OPENING.match(e.cot)) else "")
                                                for e in q)}


def measured(experiment: str) -> dict[str, dict[str, dict]]:
    """set -> metric -> domain -> DomainChange, from this folder's evaluations (both metrics)."""
    from sts.analysis import correlation as co
    from sts.engine.evaluation import Evaluation

    if not (HERE / experiment / "eval-base-reference" / "predictions.csv").is_file():
        return {}
    base = Evaluation.load(HERE / experiment / "eval-base-reference")
    out = {}
    for tdir in sorted((HERE / experiment).glob("train-*/eval-tuned-reference")):
        tuned = Evaluation.load(tdir)
        out[tdir.parent.name] = {m: co.changes_from_evaluations(base, tuned, m) for m in METRICS}
    return out


def analyse() -> None:
    """Written before any of its numbers existed (2026-11-30). Per set: the change profile under
    both metrics and how alike they are; the signal (spread of the domain changes over their RMS
    standard error); the mean change on the templated and the other categories; whether the
    re-measured cot_nll equals the committed one (the same models). For the transfer sets, every
    candidate of CANDIDATES.md judged under both metrics (post hoc, choosing nothing)."""
    import numpy as np

    report: dict = {}
    lines = ["# Is the ground truth the template? cot_nll and cot_nll_content side by side", "",
             "Generated by `content.py analyse`. Changes in nats/token gained (positive = better); "
             "*templated*: categories whose references open with the Wikipedia sentence.", ""]
    for experiment in EXPERIMENTS:
        sets = measured(experiment)
        if not sets:
            continue
        tmpl = templated(records(experiment))
        committed = {n: json.loads((RESULTS / experiment / n / "eval-tuned-reference" / "accuracy.json").read_text())
                     for n in sets}
        rows = {}
        for n, by_metric in sets.items():
            row: dict = {}
            for m, ch in by_metric.items():
                deltas = np.array([c.delta for c in ch.values()])
                sems = np.array([c.sem for c in ch.values()])
                row[m] = {"signal": float(deltas.std(ddof=1) / np.sqrt(np.mean(sems ** 2))),
                          "templated": float(np.mean([c.delta for d, c in ch.items() if d in tmpl])),
                          "other": float(np.mean([c.delta for d, c in ch.items() if d not in tmpl])),
                          "changes": {d: c.delta for d, c in ch.items()}}
            a, b = (np.array([sets[n][m][d].delta for d in sets[n]["cot_nll"]]) for m in METRICS)
            row["pearson_between_metrics"] = float(np.corrcoef(a, b)[0, 1])
            old = {d: v["cot_nll"]["mean"] for d, v in committed[n]["metrics"].items()}
            new = json.loads((HERE / experiment / n / "eval-tuned-reference" / "accuracy.json").read_text())["metrics"]
            row["same_as_committed"] = max(abs(old[d] - new[d]["cot_nll"]["mean"]) for d in old)
            rows[n] = row
        base = [json.loads((d / "eval-base-reference" / "accuracy.json").read_text())["metrics"]
                for d in (RESULTS / experiment, HERE / experiment)]
        same_base = max(abs(v["cot_nll"]["mean"] - base[1][d]["cot_nll"]["mean"]) for d, v in base[0].items())
        report[experiment] = {"templated": sorted(tmpl), "sets": rows, "base_same_as_committed": same_base}
        counted = f"{len(rows)} set" + ("s" if len(rows) != 1 else "")
        lines += [f"## {experiment} ({counted}; templated: {', '.join(sorted(tmpl))})", "",
                  f"The base model's cot_nll, measured again: at most {same_base:.1e} from the committed one.", "",
                  "| set | signal cot_nll / content | templated mean cot_nll / content | other mean cot_nll / content "
                  "| Pearson of the two profiles | max abs difference from the committed cot_nll |",
                  "|---|---|---|---|---|---|"]
        for n, r in rows.items():
            c, t = r["cot_nll"], r["cot_nll_content"]
            lines.append(f"| {n} | {c['signal']:.2f} / {t['signal']:.2f} "
                         f"| {c['templated']:+.3f} / {t['templated']:+.3f} | {c['other']:+.3f} / {t['other']:+.3f} "
                         f"| {r['pearson_between_metrics']:+.2f} | {r['same_as_committed']:.1e} |")
        lines.append("")
        if experiment == "transfer" and len(rows) == 7:
            lines += _candidates(sets, report)
        if experiment == "heldout" and len(rows) >= 2:
            lines += _heldout_candidates(sets, report)
    lines += _decision(report)
    if report:
        figure(report, HERE / "content.png")
        lines += ["![each set's changes under both metrics](content.png)", ""]
    (HERE / "content.json").write_text(json.dumps(report, indent=1) + "\n")
    (HERE / "CONTENT.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def figure(report: dict, path: Path) -> None:
    """Per set, each domain's change under both metrics (templated categories marked *)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(e, n, r, set(report[e]["templated"])) for e in EXPERIMENTS if e in report
              for n, r in report[e]["sets"].items()]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, (e, n, r, tmpl) in zip(axes.flat, panels):
        domains = list(r["cot_nll"]["changes"])
        x = np.arange(len(domains))
        for off, m, colour in ((-0.2, "cot_nll", "tab:blue"), (0.2, "cot_nll_content", "tab:orange")):
            ax.bar(x + off, [r[m]["changes"][d] for d in domains], 0.4, color=colour, label=m)
        ax.set_xticks(x, [d + ("*" if d in tmpl else "") for d in domains], rotation=60, ha="right", fontsize=7)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"{e}: {n.split('-', 2)[-1]}", fontsize=8)
        ax.set_ylabel("change (nats/token gained)", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("cot_nll and cot_nll_content per domain (* templated: the Wikipedia sentence)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _decision(report: dict) -> list[str]:
    """The module docstring's rule (T and S), over every set measured under both metrics."""
    import numpy as np

    rows = [r for e in EXPERIMENTS if e in report for r in report[e]["sets"].values()]
    if not rows:
        return []
    gap = {m: float(np.median([abs(r[m]["templated"] - r[m]["other"]) for r in rows])) for m in METRICS}
    signal = float(np.median([r["cot_nll_content"]["signal"] for r in rows]))
    t, s = gap["cot_nll_content"] <= 0.5 * gap["cot_nll"], signal >= 2.0
    metric = "cot_nll_content" if t and s else "cot_nll"
    sets = {e: len(report[e]["sets"]) for e in EXPERIMENTS if e in report}
    report["decision"] = {"sets": sets, "median_abs_gap": gap, "median_content_signal": signal, "T": t, "S": s,
                          "metric": metric}
    why = ("the families were the template, and the content keeps a signal" if t and s else
           "the families are in the content too" if not t else
           "the families were the template, but the content's signal is too weak at 100 records per domain")
    total = sum(len(train) for train, _ in EXPERIMENTS.values())
    complete = sum(sets.values()) == total
    report["decision"]["complete"] = complete
    status = [] if complete else [f"**Provisional**: {sum(sets.values())} of the {total} sets are measured; the "
                                  "rule decides on all of them.", ""]
    return ["## Which metric the held-out round should use (the rule in content.py's docstring)", "", *status,
            f"Over {sum(sets.values())} sets ({', '.join(f'{n} {e}' for e, n in sets.items())}): median |templated - "
            f"other| {gap['cot_nll']:.3f} under cot_nll, {gap['cot_nll_content']:.3f} under cot_nll_content "
            f"(T, at most half: {'yes' if t else 'no'}); median content signal {signal:.2f} "
            f"(S, at least 2: {'yes' if s else 'no'}).", "",
            f"**{metric}**: {why}.", "", *_gaps(report)]


def _gaps(report: dict) -> list[str]:
    """Each set's gap under both metrics, split by whether the set trained on templated
    references: written after the rule's outcome, to describe it (it chooses nothing). The rule's
    median runs over all sets, most of which never saw the Wikipedia sentence."""
    rows = {n: r for e in EXPERIMENTS if e in report for n, r in report[e]["sets"].items()}
    tmpl = set().union(*(report[e]["templated"] for e in EXPERIMENTS if e in report))
    on = {n for n in rows if any(n.endswith("-" + c.replace(" ", "-")) for c in tmpl)}
    gap = {n: {m: r[m]["templated"] - r[m]["other"] for m in METRICS} for n, r in rows.items()}
    lines = ["### Each set's gap (templated mean - other mean), after the outcome: describing, choosing nothing",
             "", "| set | trained on templated references | gap cot_nll | gap cot_nll_content | content / cot_nll |",
             "|---|---|---|---|---|"]
    for n, g in gap.items():
        ratio = f"{g['cot_nll_content'] / g['cot_nll']:.2f}" if n in on else "- (gap near 0)"
        lines.append(f"| {n} | {'yes' if n in on else 'no'} | {g['cot_nll']:+.3f} | {g['cot_nll_content']:+.3f} | "
                     f"{ratio} |")
    if on and len(on) < len(rows):
        kept = [gap[n]["cot_nll_content"] / gap[n]["cot_nll"] for n in on]
        rest = [abs(gap[n][m]) for n in rows if n not in on for m in METRICS]
        most = ("most of their family contrast is the template" if max(kept) < 0.5 else
                "at least half of their family contrast is content")
        sign = ("what is left points the same way" if min(kept) > 0 else "on some the contrast reverses")
        lines += ["", f"On the {len(on)} sets trained on templated references the content keeps "
                  f"{min(kept):.0%}-{max(kept):.0%} of the gap: {most}, and {sign}. On the other "
                  f"{len(rows) - len(on)} the gap is at most {max(rest):.3f} under either metric, and these set "
                  "the rule's median."]
    return lines + [""]


def _heldout_candidates(sets: dict, report: dict) -> list[str]:
    """The held-out round's scores (its scores-icl.json, k = 400) under both metrics, without
    `+lib`: its library's outcomes are the transfer sets' cot_nll changes, no content ones."""
    from experiments.heldout import heldout_analysis as ha
    done, _ = ha.finished(RESULTS / "heldout", ha.library())
    names = [n for n in done if n in sets]
    domains = {n: done[n]["own"] for n in names}
    shared = set.intersection(*(set(done[n]["scores"]) for n in names))
    scores = {score: {n: done[n]["scores"][score] for n in names} for score in ha.order(list(shared))}
    # grad_content.py: the gradient scores from each domain side, on 20 records a domain
    grads = HERE / "heldout" / "grad-content.json"
    sides = json.loads(grads.read_text())["sides"] if grads.is_file() else {}
    for side, by_set in sides.items():
        if all(n in by_set for n in names):
            for score in by_set[names[0]]:
                scores[f"{score} ({side} side, 20 records)"] = {n: by_set[n][score] for n in names}
    table = {label: {m: ha.cand.judge(s, sets, m, None, domains) for m in METRICS} for label, s in scores.items()}
    report["heldout"]["candidates"] = table
    return _candidate_lines(table, f"The held-out round's scores under both metrics ({len(names)} sets, k = 400; "
                                   "no +lib: its library holds cot_nll outcomes only; the gradient scores as "
                                   "the round computed them, with the whole reference's loss on 100 records a "
                                   "domain, then from each side on the first 20, `grad_content.py`)")


def _candidate_lines(table: dict, title: str) -> list[str]:
    lines = [f"### {title}", "",
             "| candidate | median per-set Pearson cot_nll / content | specificity cot_nll / content "
             "| swap (own - other) cot_nll / content | own-domain rank (score/truth) cot_nll / content |",
             "|---|---|---|---|---|"]
    for label, by in table.items():
        a, b = by["cot_nll"], by["cot_nll_content"]
        ranks = [", ".join(f"{r['score_rank']}/{r['change_rank']}"
                           for r in x["own_domain"].values()) for x in (a, b)]
        lines.append(f"| {label} | {a['median_pearson']:+.2f} / {b['median_pearson']:+.2f} | "
                     f"{a['specificity']:+.2f} / {b['specificity']:+.2f} | "
                     f"{a['swap']['difference']:+.2f} / {b['swap']['difference']:+.2f} | {ranks[0]} / {ranks[1]} |")
    return lines + [""]


def _candidates(sets: dict, report: dict) -> list[str]:
    """Every candidate of CANDIDATES.md under both metrics (the transfer's seven sets)."""
    from experiments.transfer import candidates as cands

    table: dict = {}
    for label, scores in cands.candidates().items():
        for m in METRICS:
            table.setdefault(label, {})[m] = cands.judge(scores, sets, m)
            combined, own = cands.decomposed(scores, sets, m)
            table.setdefault(label + " +lib", {})[m] = cands.judge(combined, sets, m, own)
    report["transfer"]["candidates"] = table
    return _candidate_lines(table, "Every candidate under both metrics (post hoc: choosing nothing)")


if __name__ == "__main__":
    if sys.argv[1:] == ["run"]:
        run()
    elif sys.argv[1:] == ["analyse"]:
        analyse()
    else:
        sys.exit(__doc__)
