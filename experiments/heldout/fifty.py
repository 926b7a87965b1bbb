"""Issue 26's validity check (`docs/results/speed.md`, "The rule for a smaller training side",
written before any held-out ground truth): the held-out round's scores recomputed from each set's
first 50 training examples, judged against the same ground truth (the 100-example fine-tunes).

    .venv/bin/python -m experiments.heldout.fifty run [--examples 50] [--gradients]
    .venv/bin/python -m experiments.heldout.fifty analyse

`run` reads the round's settings from `run.sh` beside this file (its options parsed by the CLI's
own parser: one source for them), keeps the round's domain questions and reference records (the
plan of the 100-example run, so that only the training side changes), and writes each set's
`scores-icl.json` under `fifty/<set>/` (resumable: a finished set is skipped). The gradient
scores are added only with `--gradients`: the 50 examples' training side is computed, the
domain side is the round's own, found in the cache (`sketch.round_sides`); the rule decides
nothing for them. `analyse` needs the round's ANALYSIS (`analysis.json`: the chosen default)
and writes FIFTY.md and fifty.json: every candidate with 100 and with 50 examples side by side,
and the rule applied to the chosen default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.common import RESULTS
from experiments.heldout import heldout_analysis as an  # the round's own analysis: the same judge, library and table

HERE = RESULTS / "heldout"  # its reports (this script is experiments/heldout)

if TYPE_CHECKING:
    from sts.validation.config import ValidateConfig

OUT = HERE / "fifty"

WITHIN = 0.05  # speed.md: no more than 0.05 below the 100-example value (specificity, median Pearson)


def round_config(gradients: bool) -> ValidateConfig:
    """The round's ValidateConfig, its options read from run.sh through the CLI's parser
    (`gradients`: whether its predictions compute the gradient scores too)."""
    import typer.main

    from sts import cli
    from sts.engine.finetuning import FinetuneSpec
    from sts.validation.config import ValidateConfig

    text = (HERE / "run.sh").read_text()
    data = re.search(r"^D=(\S+)$", text, re.M).group(1)
    command = re.search(r"^exec (.*?)(?<!\\)$", text.replace("\\\n", " "), re.M | re.S).group(1)
    argv = shlex.split(command.replace("$D", data))
    argv = argv[argv.index("validate") + 1:]
    group = typer.main.get_command(cli.app)
    params = group.commands["validate"].make_context("validate", argv).params
    # what the prediction reads (the fine-tuning spec: the gradient scores' adapter and lengths)
    spec = FinetuneSpec(lora=not params["full"], lr=params["lr"], batch_size=params["ft_batch_size"],
                        max_steps=params["max_steps"], seed=params["seed"], max_length=params["ft_max_length"])
    return ValidateConfig(finetune=spec, out=Path(params["out"]), train=params["train"], domains=params["domains"],
                          exclude=params["exclude"] or [], max_train=params["max_train"], k=params["k"],
                          demos=params["demos"], seed=params["seed"], predict_examples=params["predict_examples"],
                          domain_demos=params["domain_demos"], domain_demos_n=params["domain_demos_n"],
                          reference=params["reference"], reference_examples=params["reference_examples"],
                          metric=params["metric"], score=params["score"], gradients=gradients,
                          sft_shift=False, question_evaluation=False, first_token=params["first_token"],
                          batch_tokens=params["batch_tokens"])


def run(examples: int, gradients: bool) -> None:
    from sts.choices import Method
    from sts.validation.plan import plan, train_dir_name
    from sts.validation.validate import run_prediction

    pl = plan(round_config(False))  # the 100-example run's data: the same domain questions and reference records
    progress = lambda m: print(f"sts: {m}", file=sys.stderr)  # noqa: E731
    found = None
    for i, train in enumerate(pl.inputs.trains):
        name = train_dir_name(i, train)
        tdir = OUT / name
        if len(train.examples) < examples:
            raise SystemExit(f"{name}: {len(train.examples)} examples, fewer than --examples {examples}")
        first = dataclasses.replace(train, examples=train.examples[:examples])
        if not (tdir / "scores-icl.json").is_file():
            progress(f"{name}: every statistics score from the first {examples} of {len(train.examples)} examples")
            run_prediction(pl, first, Method.ICL, tdir, progress)
        payload = json.loads((tdir / "scores-icl.json").read_text())
        if gradients and "grad" not in payload["scores"]:
            found = found or _round_sides()
            progress(f"{name}: the gradient scores from the first {examples} examples")
            payload["scores"] |= _gradient_scores(pl, first, found[name][1])
            (tdir / "scores-icl.json").write_text(json.dumps(payload, indent=1) + "\n")


def _sketch_module() -> Any:
    from experiments.heldout import sketch

    return sketch


def _round_sides() -> dict:
    """The round's cached exact gradient sides, found by reproducing its committed scores
    (`sketch.round_sides`: the frozen checkout's cache keys are not today's, so the reference
    records' 1.5 hours of backward passes are reused by content, not recomputed)."""
    sets, _ = an.finished(HERE, an.library())
    return _sketch_module().round_sides(sets)


def _gradient_scores(pl: Any, train: Any, sides: dict) -> dict[str, dict[str, float]]:
    """grad and grad-adam of `train`'s training side (computed here, exact) against `sides`
    (`sketch.gradient_scores`, unsketched)."""
    from sts.engine.gradients import TrainingGradients, adapted, training_gradients

    lm = pl.load(pl.cfg.model)
    model = adapted(lm, pl.cfg.finetune)
    t = TrainingGradients(*training_gradients(lm, model, train.examples, pl.cfg.finetune))
    return _sketch_module().gradient_scores(t, sides, 0)


def analyse() -> None:
    lib = an.library()
    sets, notes = an.finished(HERE, lib)
    if len(sets) < 2:
        raise SystemExit("fewer than 2 held-out sets have finished: nothing to judge")
    chosen = json.loads((HERE / "analysis.json").read_text())["chosen"]
    half = {}
    for n, s in sets.items():
        path = OUT / n / "scores-icl.json"
        if not path.is_file():
            raise SystemExit(f"{path}: missing; run `fifty.py run` first")
        half[n] = dict(s, scores=json.loads(path.read_text())["scores"])
    full_t, half_t = an.table_of(sets, lib, notes), an.table_of(half, lib, [])
    rows = []
    for c in an.CANDIDATES:
        if c in full_t and c in half_t:
            f, h = full_t[c], half_t[c]
            rows.append({"candidate": c, "specificity_100": f["specificity"], "ci_100": f["specificity_ci"],
                         "specificity_50": h["specificity"], "ci_50": h["specificity_ci"],
                         "median_pearson_100": f["median_pearson"], "median_pearson_50": h["median_pearson"],
                         "swap_100": f["swap"]["difference"], "swap_50": h["swap"]["difference"]})
    by = {r["candidate"]: r for r in rows}
    if chosen not in by:
        raise SystemExit(f"the chosen default {chosen} has no 50-example scores (gradient scores need --gradients)")
    r = by[chosen]
    spec_ok = r["specificity_50"] >= r["specificity_100"] - WITHIN and (r["ci_100"][0] <= 0 or r["ci_50"][0] > 0)
    pearson_ok = r["median_pearson_50"] >= r["median_pearson_100"] - WITHIN
    decides = chosen.split()[0] not in an.GRADIENT_SCORES
    switch = spec_ok and pearson_ok and decides
    (HERE / "fifty.json").write_text(json.dumps({"chosen": chosen, "rows": rows, "specificity_ok": spec_ok,
                                                 "pearson_ok": pearson_ok, "decides": decides,
                                                 "max_train_default": 50 if switch else 100}, indent=1) + "\n")
    lines = ["# The 50-example training side, judged on the held-out round", "",
             "Generated by `.venv/bin/python -m experiments.heldout.fifty analyse` from `fifty/` (scores from "
             "each held-out set's first 50 training examples, `fifty.py run`) and the round's ground truth (the "
             "100-example fine-tunes); the rule is `docs/results/speed.md`'s, written before the round's ground "
             "truth existed.", "",
             "| candidate | specificity, 100 [95% CI] | specificity, 50 [95% CI] | median per-set Pearson 100 / 50 "
             "| swap 100 / 50 |", "|---|---|---|---|---|"]
    for x in rows:
        name = f"**{x['candidate']}**" if x["candidate"] == chosen else x["candidate"]
        lines.append(f"| {name} | {an._ci(x['specificity_100'], x['ci_100'])} | "
                     f"{an._ci(x['specificity_50'], x['ci_50'])} | {an._f(x['median_pearson_100'])} / "
                     f"{an._f(x['median_pearson_50'])} | {an._f(x['swap_100'])} / {an._f(x['swap_50'])} |")
    lines += ["", f"The chosen default `{chosen}`: specificity {an._f(r['specificity_100'])} -> "
              f"{an._f(r['specificity_50'])}, interval's lower end {r['ci_100'][0]:+.2f} -> {r['ci_50'][0]:+.2f} "
              f"(condition (i) {'holds' if spec_ok else 'fails'}); median per-set Pearson "
              f"{an._f(r['median_pearson_100'])} -> {an._f(r['median_pearson_50'])} "
              f"(condition (ii), within {WITHIN}: {'holds' if pearson_ok else 'fails'}).", "",
              "Result: " + ("`--max-train` defaults to **50**." if switch else
                            "the rule decides nothing for a gradient score; `--max-train` stays 100." if not decides
                            else "`--max-train` stays **100**: the smaller training side costs validity.")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    (HERE / "FIFTY.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="recompute every score from the first N training examples of each set")
    r.add_argument("--examples", type=int, default=50)
    r.add_argument("--gradients", action="store_true", help="also the gradient scores (training side only new)")
    sub.add_parser("analyse", help="judge the 50-example scores beside the 100-example ones; FIFTY.md")
    args = parser.parse_args()
    if args.what == "run":
        run(args.examples, args.gradients)
    else:
        analyse()


if __name__ == "__main__":
    main()
