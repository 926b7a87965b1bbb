"""Issue 53, item 1(b): the seed ceiling. A second fine-tune of four measured sets (the second
held-out round's three, which teach content, and the transfer round's first MMLU-Pro
chain-of-thought set, which follows the templated family), with the same data, the same budget
and the same evaluation records as the round that measured them, and `--seed 1` instead of 0.
How far a set's per-domain gains reproduce across the two seeds is the most any predictor of them
can be asked to reach.

The runs reuse `sts validate`'s own plan and stages (`sts.validation.plan`), so the fine-tuning
settings and the evaluated records are the round's by construction: `check` rebuilds each round's
plan at seed 0 and verifies that its fine-tuning and reference stage keys equal the round's
committed manifests before anything runs. Only the fine-tuning and the tuned reference evaluation
run (no prediction stage: nothing is predicted here). Resumable stage by stage, as `sts validate`:

    nohup nice .venv/bin/python -m experiments.seeds.seeds run > seeds.log 2>&1 &
    .venv/bin/python -m experiments.seeds.seeds analyse     # docs/results/seeds/SEEDS.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from experiments.common import RESULTS, D, run_verb

OUT = RESULTS / "seeds"
SEED = 1  # the rounds ran at --seed 0

# Each round as its run.sh gives it (the fields that key the fine-tuning and reference stages),
# and the sets of it that run a second time, by their folder names.
ROUNDS: dict[str, dict[str, Any]] = {
    "beyond": {
        "train": [f"{D}/mmlu_pro_cot_train.jsonl#category=engineering", f"{D}/math500_test.jsonl#rows=100:200",
                  f"{D}/alpaca_en_demo.json#rows=100:200"],
        "k": 400, "score": "grad", "metric": "cot_nll", "question_evaluation": False, "sft_shift": False,
        "gradients": True,
        "sets": ["train-1-mmlu-pro-cot-train-engineering", "train-2-math500-test-100-200",
                 "train-3-alpaca-en-demo-100-200"],
    },
    "transfer": {
        "train": ["embedded:champ", f"{D}/alpaca_en_demo.json", f"{D}/mmlu_pro_cot_train.jsonl#category=physics",
                  f"{D}/mmlu_pro_cot_train.jsonl#category=psychology", f"{D}/math500_test.jsonl",
                  f"{D}/mmlu_pro_cot_train.jsonl#category=business",
                  f"{D}/mmlu_pro_cot_train.jsonl#category=biology"],
        "k": 100, "score": "act", "metric": "nll",
        "sets": ["train-3-mmlu-pro-cot-train-physics"],
    },
}
COMMON: dict[str, Any] = {
    "exclude": [f"{D}/mmlu_pro_test.jsonl"], "domain_demos": f"{D}/mmlu_pro_cot_demos.jsonl",
    "reference": f"{D}/mmlu_pro_cot_train.jsonl", "reference_examples": 100, "max_train": 100,
    "predict_examples": 100, "demos": 2,
}


def config(round_: str, seed: int, out: Path) -> Any:
    """The round's `ValidateConfig` (its run.sh's fields) at `seed`, writing to `out`."""
    from sts.engine.settings import FinetuneSpec
    from sts.validation.config import ValidateConfig

    r = {k: v for k, v in ROUNDS[round_].items() if k != "sets"}
    return ValidateConfig(out=out, seed=seed, finetune=FinetuneSpec(max_steps=60, batch_size=4), **COMMON, **r)


def the_plan(round_: str, seed: int) -> Any:
    from sts.validation.plan import plan

    return plan(config(round_, seed, OUT / round_))


def steps_of(pl: Any, name: str) -> tuple[int, Any, list[Any]]:
    """The set's index, dataset, and its fine-tuning and tuned reference steps."""
    from sts.validation.plan import train_dir_name

    for i, t in enumerate(pl.inputs.trains):
        if train_dir_name(i, t) == name:
            return i, t, [s for s in pl.set_steps(i, t) if s.kind in ("finetune", "reference")]
    raise SystemExit(f"no set {name} in the plan")


def check() -> None:
    """At seed 0 each set's fine-tuning and tuned-reference keys, and the base reference key, are
    the round's committed ones: the same data, budget and evaluated records."""
    from sts.validation.stages import manifest_name, settings_key

    for round_, r in ROUNDS.items():
        pl = the_plan(round_, 0)
        stages = RESULTS / round_ / "stages"
        base = [s for s in pl.base_steps() if s.kind == "reference"][0]
        pairs = [(base.name, base.settings)]
        for name in r["sets"]:
            pairs += [(s.name, s.settings) for s in steps_of(pl, name)[2]]
        for stage, settings in pairs:
            got = settings_key(settings)
            want = json.loads((stages / manifest_name(stage)).read_text())["key"]
            print(f"{round_}: {stage}: {'same key' if got == want else 'DIFFERENT key'}", flush=True)
            if got != want:
                raise SystemExit(f"{round_} {stage}: the plan at seed 0 is not the round's; nothing run")


def run() -> None:
    """Each set's fine-tuning at SEED, then its tuned reference evaluation; finished stages reused
    (the base evaluation is the round's own: not run here)."""
    from experiments.common import finetune_and_evaluate

    check()
    for round_, r in ROUNDS.items():
        finetune_and_evaluate(the_plan(round_, SEED), f"[seeds {round_}]", r["sets"], base=False)


def control() -> None:
    """The content round's control fine-tuned again at SEED (PREREGISTRATION.md's seed ceiling of the
    judged residual), after the round's own control: its plan at seed 0 must give the round's
    committed fine-tuning key first."""
    from experiments.common import finetune_and_evaluate
    from experiments.content_round import data as cr
    from sts.validation.plan import plan
    from sts.validation.stages import manifest_name, settings_key

    name = "train-1-control"
    pl0 = plan(cr.config())
    step = next(s for s in steps_of(pl0, name)[2] if s.kind == "finetune")
    manifest = cr.HERE / "stages" / manifest_name(step.name)
    if not manifest.is_file() or json.loads(manifest.read_text())["key"] != settings_key(step.settings):
        raise SystemExit("the content round's control has not run (or ran otherwise): run its run.sh first")
    finetune_and_evaluate(plan(cr.config(seed=SEED, out=OUT / "content-round")), "[seeds content-round]", [name],
                          base=False)


METRICS = ("cot_nll", "cot_nll_content")


def changes(round_: str, name: str, metric: str) -> tuple[Any, Any] | None:
    """The set's per-domain changes at seed 0 (the round's) and at SEED (here), against the
    round's one base evaluation; None until the second seed's evaluation is there."""
    from sts.analysis import correlation as co
    from sts.engine.evaluation import Evaluation

    tuned = OUT / round_ / name / "eval-tuned-reference"
    if not tuned.is_dir():
        return None
    base = Evaluation.load(RESULTS / round_ / "eval-base-reference")
    first = co.changes_from_evaluations(base, Evaluation.load(RESULTS / round_ / name / "eval-tuned-reference"), metric)
    second = co.changes_from_evaluations(base, Evaluation.load(tuned), metric)
    return first, second


def analyse() -> None:
    """SEEDS.md and seeds.json: per set and metric, the Pearson correlation across domains of the
    two seeds' changes (the seed ceiling, as issue 53 defines it); per round with two or more sets
    done, the same over the double-centred sets x domains matrix."""
    import numpy as np

    from experiments.common import write_json
    from sts.analysis.correlation import _pearson, double_centre
    from sts.errors import UserError

    result: dict[str, Any] = {"seed": SEED, "per_set": {}, "matrix": {}, "changes": {}, "missing": {}}
    for round_, r in ROUNDS.items():
        for metric in METRICS:
            rows: list[tuple[list[float], list[float]]] = []
            for name in r["sets"]:
                try:
                    got = changes(round_, name, metric)
                except UserError:  # the round's own evaluation predates the metric (transfer: no cot_nll_content)
                    result["missing"].setdefault(f"{round_}/{name}", []).append(metric)
                    continue
                if got is None:
                    continue
                domains = sorted(got[0])
                a, b = [got[0][d].delta for d in domains], [got[1][d].delta for d in domains]
                result["per_set"].setdefault(f"{round_}/{name}", {})[metric] = _pearson(np.array(a), np.array(b))
                result["changes"].setdefault(f"{round_}/{name}", {})[metric] = {
                    "domains": domains, "seed0": a, f"seed{SEED}": b}
                rows.append((a, b))
            if len(rows) >= 2:
                a2, b2 = double_centre(np.array([x for x, _ in rows])), double_centre(np.array([y for _, y in rows]))
                result["matrix"].setdefault(round_, {})[metric] = {
                    "sets": len(rows), "r": _pearson(a2.ravel(), b2.ravel())}
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(result, OUT / "seeds.json")
    lines = ["# The seed ceiling: a second fine-tuning seed (issue 53, item 1(b))", "",
             f"Generated by `.venv/bin/python -m experiments.seeds.seeds analyse`. Each set fine-tuned again with "
             f"`--seed {SEED}` (the rounds ran at 0): the same 100 records, recipe, budget and evaluated reference "
             "records (`seeds.py check` verifies the stage keys against each round's). Figure: the Pearson "
             "correlation across the domains of the two seeds' per-domain changes: how far a set's profile "
             "reproduces when only the run's own randomness (LoRA initialisation, data order, dropout) changes. "
             "A predictor of one run's profile can reach at most the square root of it (the index of "
             "reliability); issue 53 asks for a fraction of the correlation itself.", "",
             "| set | " + " | ".join(f"`{m}`" for m in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for key, per in result["per_set"].items():
        lines.append(f"| {key} | " + " | ".join(f"{per[m]:+.3f}" if m in per else "-" for m in METRICS) + " |")
    if result["matrix"]:
        lines += ["", "The double-centred sets x domains matrix (specificity's truth), seed 0 against seed "
                  f"{SEED}:", "", "| round | sets | " + " | ".join(f"`{m}`" for m in METRICS) + " |",
                  "|---|---|" + "---|" * len(METRICS)]
        for round_, per in result["matrix"].items():
            n = next(iter(per.values()))["sets"]
            lines.append(f"| {round_} | {n} | " + " | ".join(f"{per[m]['r']:+.3f}" if m in per else "-"
                                                          for m in METRICS) + " |")
    for key, missed in result["missing"].items():
        lines += ["", f"{key}: no {', '.join(f'`{m}`' for m in missed)}: the round's own seed-0 evaluation was "
                  "recorded before that metric existed, so only its second seed has it (`-` above)."]
    done = len(result["per_set"])
    planned = sum(len(r["sets"]) for r in ROUNDS.values())
    if done < planned:
        lines += ["", f"{done} of the {planned} planned sets are done; `seeds.py run` resumes the rest."]
    (OUT / "SEEDS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str]) -> None:
    run_verb({"check": check, "run": run, "control": control, "analyse": analyse}, argv, "experiments.seeds.seeds")


if __name__ == "__main__":
    main(sys.argv[1:])
