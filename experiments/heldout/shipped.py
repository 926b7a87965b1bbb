"""The default as `sts predict` ships it, judged post hoc on the ten measured sets.

The held-out round chose `grad` with each domain's gradient taken on the records its ground
truth measures (the reference chains of thought of `cot_nll`). `sts predict --train SET` with
no other argument reads its domains from the embedded MMLU questions, which have no chain of
thought: the domain side there is the correct option's text after the question (nll's
rendering). This script computes `grad` and `grad-adam` that way, exactly as a user's
`sts predict --train SPEC --score grad` does (the embedded model and MMLU domains, 100
training examples, 100 questions a domain, LoRA r 16 / alpha 32 / seed 0), for the seven
transfer sets and the three held-out sets, and judges them against the same `cot_nll` truth
(the 10 domains that have reference records).

Every outcome here was seen before this ran, so nothing is chosen from it: it reports how far
what the demo prints is from what the round validated. Its scores also give the shipped
library (`../transfer/library.py`) the default's values for the seven sets, so that `sts
predict` splits and calibrates the default on the same domain side it computes.

    .venv/bin/python -m experiments.heldout.shipped run       # resumable, set by set
    .venv/bin/python -m experiments.heldout.shipped analyse   # writes SHIPPED.md, shipped.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from experiments import common
from experiments.common import RESULTS, D
from sts.engine.settings import FinetuneSpec

HERE = RESULTS / "heldout"  # its reports (this script is experiments/heldout)
TRANSFER = RESULTS / "transfer"

GRADIENT_SCORES = ("grad", "grad-adam")  # the gradient scores this report measured (grad-sign came later)

SCORES_FILE = HERE / "shipped-scores.json"
HELDOUT = {"train-1-mmlu-pro-cot-train-computer-science": f"{D}/mmlu_pro_cot_train.jsonl#category=computer science",
           "train-2-mmlu-pro-cot-train-history": f"{D}/mmlu_pro_cot_train.jsonl#category=history",
           "train-3-math500-test-400-500": f"{D}/math500_test.jsonl#rows=400:500"}  # run.sh's


def specs() -> dict[str, str]:
    """set name -> spec: the seven transfer sets, then the three held-out ones."""
    from experiments.transfer.sensitivity import SPECS

    return dict(SPECS) | HELDOUT


def _scores(spec: str, sketch: int) -> dict[str, dict[str, float]]:
    """grad and grad-adam of one set as `sts predict --train SPEC --gradient-sketch SKETCH` gives them."""
    from sts.prediction.config import PredictConfig
    from sts.prediction.extraction import extract_all
    from sts.prediction.predict import prepare, score_extraction

    # the finetune spec of the round's run.sh (--max-steps 60 --ft-batch-size 4 --seed 0), which is
    # also `sts predict`'s default: one cache key for the training side
    cfg = PredictConfig(train=spec, score="grad", explain=False, library="", calibrate=[], top_contexts=0,
                        finetune=FinetuneSpec(max_steps=60, batch_size=4, seed=0), gradient_sketch=sketch)
    p = prepare(cfg, progress=lambda m: print(m, file=sys.stderr))
    ex = extract_all(p.cfg, p.sets[spec], p.domains, GRADIENT_SCORES, None, lambda m: print(m, file=sys.stderr),
                     p.session)
    return {s: score_extraction(p.cfg, ex, s)[0] for s in GRADIENT_SCORES}


def run() -> None:
    """Each set's grad and grad-adam on the embedded MMLU domains, exact (`exact`) and with the
    default count sketch (`scores`: what `sts predict` prints), written after each set."""
    from sts.defaults import GRADIENT_SKETCH

    done = common.read_json(SCORES_FILE, {"sets": {}, "seconds": {}})
    done["sketch"] = GRADIENT_SKETCH
    for name, spec in specs().items():
        entry = done["sets"].setdefault(name, {"spec": spec})
        if "exact" not in entry:
            started = time.perf_counter()
            entry["exact"] = _scores(spec, 0)
            done["seconds"][name] = round(time.perf_counter() - started, 1)
        if entry.get("sketch") != GRADIENT_SKETCH:
            entry["scores"], entry["sketch"] = _scores(spec, GRADIENT_SKETCH), GRADIENT_SKETCH
        common.write_json(done, SCORES_FILE)
        print(f"{name}: {done['seconds'][name]} s", file=sys.stderr)


def analyse() -> None:
    """Judge the shipped domain side beside the round's (report only)."""
    from experiments.heldout import heldout_analysis as round_analysis

    shipped = json.loads(SCORES_FILE.read_text())["sets"]
    lib = round_analysis.library()
    held, _ = round_analysis.finished(HERE, lib)
    transfer, _ = round_analysis.finished(TRANSFER, lib)
    measured = {n: {"cot_nll": s["changes"]} for n, s in (transfer | held).items()}
    own_domains = {n: s["own"] for n, s in (transfer | held).items()}
    groups = {"held-out (3 sets)": list(held), "transfer (7 sets)": list(transfer),
              "all 10 sets": list(transfer) + list(held)}
    rows: dict[str, dict[str, dict]] = {}
    for group, names in groups.items():
        names = [n for n in names if n in shipped]
        for score in GRADIENT_SCORES:
            domains = sorted(set(measured[names[0]]["cot_nll"]))
            side = {f"{score}, domain side: reference CoT, exact (validated)":
                    {n: (transfer | held)[n]["scores"][score] for n in names},
                    f"{score}, domain side: MMLU answer text, exact":
                    {n: {d: v for d, v in shipped[n]["exact"][score].items() if d in domains} for n in names},
                    f"{score}, domain side: MMLU answer text, sketched (sts predict)":
                    {n: {d: v for d, v in shipped[n]["scores"][score].items() if d in domains} for n in names}}
            for label, scores in side.items():
                rows.setdefault(group, {})[label] = round_analysis.judged(scores, {n: measured[n] for n in names}, own_domains)
    (HERE / "shipped.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    f = round_analysis._f
    lines = ["# The default as `sts predict` computes it, post hoc on the ten measured sets", "",
             "Generated by `.venv/bin/python -m experiments.heldout.shipped analyse` (scores: `shipped.py run`, "
             "in `shipped-scores.json`). Report only: every outcome was seen before this ran. Truth: `cot_nll` on "
             "the 10 reference domains; 1,000 bootstrap replicates over the questions, seed 0.", "",
             "The round validated `grad` with each domain's side on the reference chains of thought its truth "
             "measures. `sts predict` on its embedded MMLU domains has no chain of thought there: its domain side is "
             "the correct option's text. The second row of each pair is what a user's `sts predict --train SET` "
             "prints.", ""]
    for group, table in rows.items():
        lines += [f"## {group}", "", "| score | median per-set Pearson | per set | specificity [95% CI] | "
                  "swap own - other | own-domain rank (score / truth) |", "|---|---|---|---|---|---|"]
        for label, j in table.items():
            ranks = ", ".join(f"{own_domains[n]} {r['score_rank']}/{r['change_rank']}" for n, r in j["own_domain"].items())
            lines.append(f"| {label} | {f(j['median_pearson'])} | "
                         + ", ".join(f(v) for v in j["per_set"].values())
                         + f" | {round_analysis._ci(j['specificity'], j['specificity_ci'])} | "
                         f"{f(j['swap']['difference'])} | {ranks} |")
        lines.append("")
    seconds = json.loads(SCORES_FILE.read_text()).get("seconds", {})
    lines += ["Wall time of `run` per set (2 cores; the 14 domains' side computed once, in the first set's): "
              + ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items()), ""]
    (HERE / "SHIPPED.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("run", "analyse"))
    args = parser.parse_args()
    run() if args.what == "run" else analyse()


if __name__ == "__main__":
    main()
