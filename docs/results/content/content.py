"""Is the ground truth the template? (issue 24, item 7). `cot_nll` scores every token of
MMLU-Pro's reference chains of thought, whose openings are templated ("Let's think step by
step." everywhere, "We refer to Wikipedia articles on TOPIC for help." in business,
psychology, history, other, philosophy...). `cot_nll_content` scores the tokens after that
opening (kept as context). This script measures both, with the same records and models, for
the transfer experiment's seven sets and the held-out round's sets.

    python docs/results/content/content.py run       # resumable; hours on 2 CPU cores
    python docs/results/content/content.py analyse   # CONTENT.md, content.json

Run from the repository root with ../shared beside it. Stages, each kept once written:
- the base model on each record set (the transfer's reference records; the held-out round's);
- each set's tuned model: the held-out round's where its checkout still has it, else trained
  again with the experiment's settings (seed 0; its losses are compared with the committed
  finetune.json's, so a retrained model is shown to be the same run);
- each tuned model on its record set.
The records are rebuilt from each experiment's own settings (`sts.validation.read_inputs`) and
checked id by id against that experiment's committed base evaluation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent
D = "../shared/data"
PRO = f"{D}/mmlu_pro_cot_train.jsonl"
# experiment -> (its training sets in run order, the checkout whose tuned models may still be there)
EXPERIMENTS = {
    "transfer": (["embedded:champ", f"{D}/alpaca_en_demo.json", f"{PRO}#category=physics", f"{PRO}#category=psychology",
                  f"{D}/math500_test.jsonl", f"{PRO}#category=business", f"{PRO}#category=biology"], None),
    "heldout": ([f"{PRO}#category=computer science", f"{PRO}#category=history", f"{D}/math500_test.jsonl#rows=400:500"],
                Path("/work/heldout-run/docs/results/heldout")),
}
METRICS = ("cot_nll", "cot_nll_content")


def config(experiment: str):  # type: ignore[no-untyped-def]
    from sts.validation import ValidateConfig

    train, _ = EXPERIMENTS[experiment]
    return ValidateConfig(out=RESULTS / experiment, train=train, exclude=[f"{D}/mmlu_pro_test.jsonl"],
                          reference=PRO, reference_examples=100, max_train=100)


def records(experiment: str) -> dict:
    """The experiment's reference records, checked against its committed base evaluation."""
    import csv

    from sts.validation import read_inputs

    groups = read_inputs(config(experiment)).reference
    mine = {(d, str(e.uid)) for d, q in groups.items() for e in q}
    with open(RESULTS / experiment / "eval-base-reference" / "predictions.csv") as f:
        theirs = {(r["domain"], r["question_id"]) for r in csv.DictReader(f)}
    if mine != theirs:
        sys.exit(f"{experiment}: the rebuilt reference records differ from the committed ones ({len(mine ^ theirs)})")
    return groups


def evaluate(model: str, groups: dict, out: Path) -> None:
    from sts.evaluation import evaluate as run_evaluation
    from sts.models import load_model

    if (out / "predictions.csv").is_file():
        return
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
    from sts.data import load_dataset
    from sts.validation import train_dir_name

    for experiment, (train, _) in EXPERIMENTS.items():
        groups = records(experiment)
        evaluate(str(_base_model()), groups, HERE / experiment / "eval-base-reference")
        for i, spec in enumerate(train):
            name = train_dir_name(i, load_dataset(spec, max_examples=100))
            if not (RESULTS / experiment / name / "eval-tuned-reference").is_dir():
                print(f"{experiment}/{name}: not measured yet; skipped", file=sys.stderr)
                continue
            evaluate(tuned_model(experiment, name, spec), groups, HERE / experiment / name / "eval-tuned-reference")


def _base_model() -> Path:
    from sts.models import default_model_dir

    return default_model_dir()


if __name__ == "__main__":
    if sys.argv[1:] == ["run"]:
        run()
    else:
        sys.exit(__doc__)
