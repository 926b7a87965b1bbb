"""Issue 53, item 3: the content round's data, built by the rules of PREREGISTRATION.md from
`../shared/data` into `out/content-round/data/` (ignored: the data is not copied into the
repository). Which records each file holds is committed as question ids in
`docs/results/content-round/data.json`; a rebuild checks itself against it.

    .venv/bin/python -m experiments.content_round.data build   # then `check`

Files:
- `physics.jsonl`, `biology.jsonl`, `math.jsonl`: the round's new sets, each the first 100 records
  of its MMLU-Pro category (mmlu_pro_cot_train.jsonl, file order) that are *unused*: in no committed
  training set, read by no committed evaluation, not a shipped probe record, not in
  mmlu_pro_cot_refs.jsonl (whose records this round evaluates or probes), and sharing no question
  stem with any of those;
- `control.jsonl`: the generic chain-of-thought control, the next 10 unused records of each of the
  train file's 10 categories (100), none in a new set;
- `references.jsonl`: the evaluation's reference records: every record of the train file, then
  mmlu_pro_cot_refs.jsonl's less its shipped probe records and the records that share a
  probe's question stem (two of health, three of law: so chemistry and economics are measured on
  their 40 records that no score reads, health on 38, law on 37);
- `probes.jsonl`: the 140 shipped probe records (`embedded:mmlu-pro-cot`), the domain side every
  candidate reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from experiments.common import RESULTS, ROOT, D, run_verb, write_recorded

HERE = RESULTS / "content-round"
DATA = ROOT / "out" / "content-round" / "data"
RECORD = HERE / "data.json"
TRAIN_FILE, REFS_FILE = f"{D}/mmlu_pro_cot_train.jsonl", f"{D}/mmlu_pro_cot_refs.jsonl"
NEW = ("physics", "biology", "math")  # the rule's answer: PREREGISTRATION.md, "the new sets"
SET_SIZE, CONTROL_SHARE = 100, 10
FOUR = {"chemistry": 40, "economics": 40, "health": 38, "law": 37}  # evaluated records of the refs file's categories
# every committed round's training sets, as their run.sh give them (each read to --max-train 100)
COMMITTED = [f"{TRAIN_FILE}#category={c}" for c in
             ("physics", "psychology", "business", "biology", "computer science", "history", "engineering")]


def rows(path: str) -> list[dict[str, Any]]:
    # split on newlines only (not splitlines): a record's text may hold U+2028
    return [json.loads(line) for line in Path(path).read_text().split("\n") if line.strip()]


def shipped_probes() -> set[str]:
    """The question ids of the shipped probe records (the sealed domains list them)."""
    from sts.data.embedded import REFERENCES

    sealed = json.loads(REFERENCES.read_text())
    return {r["uid"] for r in sealed["records"]}


def probe_twins() -> set[str]:
    """The ids of mmlu_pro_cot_refs.jsonl's records that are not probe records but share a probe's
    question stem (health has two, law three): `sts validate` refuses them as evaluated records."""
    from sts.data.datasets import load_dataset
    from sts.data.examples import normalised, question_stem

    probes = shipped_probes()
    refs = load_dataset(REFS_FILE).examples
    stems = {normalised(question_stem(e)) for e in refs if e.uid in probes}
    return {e.uid for e in refs if e.uid not in probes and normalised(question_stem(e)) in stems}


def used(exclude: Path | None = None) -> tuple[set[str], set[str]]:
    """The ids and normalised question stems of every record a committed run trained on or
    evaluated (but in `exclude`, a later round's own folder), and of the shipped probes."""
    from experiments.probes.probes import evaluated_ids
    from sts.data.datasets import load_dataset
    from sts.data.examples import normalised, question_stem

    ids = evaluated_ids(exclude) | shipped_probes()
    for spec in COMMITTED:
        ids |= {e.uid for e in load_dataset(spec, max_examples=SET_SIZE).examples}
    refs = load_dataset(REFS_FILE).examples  # every one a probe or an evaluated record of this round
    ids |= {e.uid for e in refs}
    stems = {normalised(question_stem(e)) for e in load_dataset(TRAIN_FILE).examples + refs if e.uid in ids}
    return ids, stems


def choose() -> dict[str, list[str]]:
    """Each file's question ids, by the rules above."""
    from sts.data.datasets import load_dataset
    from sts.data.examples import normalised, question_stem

    ids, stems = used(exclude=HERE)  # its own evaluations, once written, are its choice, not a use
    by_domain = load_dataset(TRAIN_FILE).by_domain()
    free = {d: [e.uid for e in q if e.uid not in ids and normalised(question_stem(e)) not in stems]
            for d, q in by_domain.items()}
    out = {c: free[c][:SET_SIZE] for c in NEW}
    taken = {u for c in NEW for u in out[c]}
    out["control"] = [u for d in sorted(free) for u in [x for x in free[d] if x not in taken][:CONTROL_SHARE]]
    probes = shipped_probes()
    out["probes"] = sorted(probes, key=int)
    short = {k: len(v) for k, v in out.items() if len(v) < {"control": CONTROL_SHARE * len(free),
                                                             "probes": 140}.get(k, SET_SIZE)}
    if short:
        raise SystemExit(f"too few unused records: {short}")
    return out


def build() -> None:
    chosen = choose()
    every = {str(r["question_id"]): r for r in rows(TRAIN_FILE) + rows(REFS_FILE)}
    probes = set(chosen["probes"])
    files = {name: [every[u] for u in ids] for name, ids in chosen.items()}
    files["references"] = rows(TRAIN_FILE) + [r for r in rows(REFS_FILE) if str(r["question_id"]) not in probes
                                              and str(r["question_id"]) not in probe_twins()]
    write_recorded(files, DATA, RECORD, chosen)


def config(seed: int = 0, out: Path = HERE) -> Any:
    """run.sh's `ValidateConfig` (the same fields; `check` reads its plan)."""
    from sts.engine.settings import FinetuneSpec
    from sts.validation.config import ValidateConfig

    trains = [str(DATA / "control.jsonl"), f"{TRAIN_FILE}#category=engineering", f"{D}/math500_test.jsonl#rows=100:200",
              f"{D}/alpaca_en_demo.json#rows=100:200"] + [str(DATA / f"{c}.jsonl") for c in NEW]
    return ValidateConfig(out=out, seed=seed, train=trains, exclude=[f"{D}/mmlu_pro_test.jsonl"],
                          domain_demos=f"{D}/mmlu_pro_cot_demos.jsonl", reference=str(DATA / "references.jsonl"),
                          reference_examples=100, probes=str(DATA / "probes.jsonl"), max_train=SET_SIZE,
                          predict_examples=100, k=400, demos=2, finetune=FinetuneSpec(max_steps=60, batch_size=4),
                          score="grad", metric="cot_nll_content", question_evaluation=False, sft_shift=False,
                          gradients=True)


def check() -> None:
    """The plan's records obey the pre-registration: on the train file's 10 categories the
    evaluated references are the second held-out round's (its committed base evaluation), on the
    other 4 the records of each that are not shipped probes nor share a probe's stem (`FOUR`); no
    evaluated record is a probe record or a training record; the probes are the shipped ones;
    every set has 100 records."""
    import csv

    from sts.validation.plan import plan_data

    pl = plan_data(config())
    refs = {d: {e.uid for e in q} for d, q in pl.inputs.reference.items()}
    with open(RESULTS / "beyond" / "eval-base-reference" / "predictions.csv", newline="") as fh:
        beyond: dict[str, set[str]] = {}
        for r in csv.DictReader(fh):
            beyond.setdefault(r["domain"], set()).add(r["question_id"])
    problems = [f"{d}: not the second round's records" for d in beyond if refs.get(d) != beyond[d]]
    problems += [f"{d}: {len(refs.get(d, ()))} records, not {n}" for d, n in FOUR.items() if len(refs.get(d, ())) != n]
    probes = {e.uid for q in pl.inputs.probes.probes.values() for e in q} if pl.inputs.probes else set()
    evaluated = set().union(*refs.values())
    trained = {e.uid for t in pl.inputs.trains if "mmlu" in t.spec or str(DATA) in t.spec for e in t.examples}
    problems += [f"{len(probes & evaluated)} probe records evaluated"] if probes & evaluated else []
    problems += [f"{len(trained & evaluated)} training records evaluated"] if trained & evaluated else []
    problems += [] if probes == shipped_probes() else ["the probes are not the shipped ones"]
    problems += [f"{t.spec}: {len(t.examples)} records" for t in pl.inputs.trains if len(t.examples) != SET_SIZE]
    if problems:
        raise SystemExit("the round's plan breaks its pre-registration: " + "; ".join(problems))
    print(f"plan checked: {len(pl.inputs.trains)} sets, {sum(map(len, refs.values()))} evaluated records in "
          f"{len(refs)} domains, {len(probes)} probe records, disjoint")


def main(argv: list[str]) -> None:
    run_verb({"build": build, "check": check}, argv, "experiments.content_round.data")


if __name__ == "__main__":
    main(sys.argv[1:])
