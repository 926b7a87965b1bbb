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

from experiments.common import RESULTS, D

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
    """Each set's fine-tuning at SEED, then its tuned reference evaluation; finished stages reused."""
    from sts.engine.finetuning import finetune
    from sts.validation.stages import Stages
    from sts.validation.validate import run_evaluation

    check()
    for round_, r in ROUNDS.items():
        pl = the_plan(round_, SEED)
        c = pl.cfg
        stages = Stages(c.out, {}, lambda m: print(m, flush=True), label=f"[seeds {round_}]")
        model_files = sorted(Path(c.model).glob("*.safetensors"))
        for name in r["sets"]:
            _, train, steps = steps_of(pl, name)
            tuned = c.out / name / "tuned"
            for step in steps:
                if step.kind == "finetune":
                    stages.run(step.name, [tuned], lambda t=train, d=tuned: finetune(pl.load(c.model), t.examples,
                               c.finetune, d, "experiments.seeds.seeds run", in_place=True), model_files,
                               step.settings)
                else:
                    run_evaluation(pl, stages, step, str(tuned), c.out / name / "eval-tuned-reference",
                                   list(tuned.glob("*.safetensors")))


def main(argv: list[str]) -> None:
    verbs = {"check": check, "run": run}
    if len(argv) != 1 or argv[0] not in verbs:
        raise SystemExit(f"usage: python -m experiments.seeds.seeds {{{','.join(verbs)}}}")
    verbs[argv[0]]()


if __name__ == "__main__":
    main(sys.argv[1:])
