"""Issue 54, item 4: the selection round's pool and evaluation records, built by the rules of
docs/results/select/PREREGISTRATION.md into `out/select/` (ignored: the data is not copied into the
repository); the ids of every file are committed in `docs/results/select/pool.json`, and a rebuild
checks itself against them.

    .venv/bin/python -m experiments.select.pool build
"""

from __future__ import annotations

import sys
from typing import Any

from experiments.common import RESULTS, ROOT, D, read_json, run_verb, write_recorded
from experiments.content_round import data as cr

HERE = RESULTS / "select"
DATA = ROOT / "out" / "select"
RECORD = HERE / "pool.json"
PER_CATEGORY, CATEGORIES = 100, 6
SLICES = {"math500": (f"{D}/math500_test.jsonl", 200, 400), "alpaca": (f"{D}/alpaca_en_demo.json", 200, 400),
          "champ": ("embedded:champ", 100, 200)}
TARGETS = ("physics", "psychology")  # untemplated, templated: PREREGISTRATION.md
EVALUATED = 100
OFFTARGET = 30  # records of every other category (the off-target harm)


def unused() -> dict[str, list[str]]:
    """Each category's unused record ids in file order: the content round's rule, less every record
    the content round's files hold (this round's own evaluations, once written, are its choice,
    not a use: a rebuild after them chooses the same records)."""
    from sts.data.datasets import load_dataset
    from sts.data.examples import normalised, question_stem

    ids, stems = cr.used(exclude=HERE)
    taken = {u for v in read_json(cr.RECORD)["ids"].values() for u in v}
    every = load_dataset(cr.TRAIN_FILE).examples
    stems |= {normalised(question_stem(e)) for e in every if e.uid in taken}
    return {d: [e.uid for e in q if e.uid not in ids | taken and normalised(question_stem(e)) not in stems]
            for d, q in load_dataset(cr.TRAIN_FILE).by_domain().items()}


def choose() -> dict[str, Any]:
    free = unused()
    categories = sorted(free, key=lambda d: (-len(free[d]), d))[:CATEGORIES]
    missing = [t for t in TARGETS if t not in categories]
    if missing:
        raise SystemExit(f"the pool rule leaves out the target(s) {missing}: apply the pre-registration's fallback")
    pool = {c: free[c][:PER_CATEGORY] for c in categories}
    evaluation = {t: free[t][PER_CATEGORY:PER_CATEGORY + EVALUATED] for t in TARGETS}
    short = [t for t, v in evaluation.items() if len(v) < EVALUATED]
    if short:
        raise SystemExit(f"too few unused records left to evaluate {short}")
    return {"categories": categories, "mmlu_pro": pool, "evaluation": evaluation, "offtarget": offtarget(),
            "slices": {k: [a, b] for k, (_, a, b) in SLICES.items()}}


def offtarget() -> dict[str, list[str]]:
    """Every other category's first OFFTARGET records the content round evaluates (no selection
    method reads them: they are neither in the pool nor probe records)."""
    from sts.validation.plan import plan_data

    refs = plan_data(cr.config()).inputs.reference
    return {d: [e.uid for e in q[:OFFTARGET]] for d, q in refs.items() if d not in TARGETS}


def chat(e: Any, source: str, row: str) -> dict[str, Any]:
    """One pool record in the chat schema (one file holds every source): the prompt and response as
    `sts finetune` renders the source's own record, its domain label, its source and row."""
    return {"messages": [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.response}],
            "domain": e.domain or source, "source": source, "row": row}


def build() -> None:
    from sts.data.datasets import load_dataset

    chosen = choose()
    every = {str(r["question_id"]): r for r in cr.rows(cr.TRAIN_FILE)}
    mmlu = {e.uid: e for e in load_dataset(cr.TRAIN_FILE).examples}
    pool = [chat(mmlu[u], "mmlu-pro-cot", u) for c in chosen["categories"] for u in chosen["mmlu_pro"][c]]
    for name, (spec, a, b) in SLICES.items():
        pool += [chat(e, name, f"{a + i}") for i, e in enumerate(load_dataset(f"{spec}#rows={a}:{b}").examples)]
    refs = {str(r["question_id"]): r for r in cr.rows(cr.TRAIN_FILE) + cr.rows(cr.REFS_FILE)}
    files = {"pool": pool, "evaluation": [every[u] for t in TARGETS for u in chosen["evaluation"][t]]
             + [refs[u] for d in sorted(chosen["offtarget"]) for u in chosen["offtarget"][d]]}
    write_recorded(files, DATA, RECORD, chosen)
    print(f"categories {', '.join(chosen['categories'])}")


def main(argv: list[str]) -> None:
    run_verb({"build": build}, argv, "experiments.select.pool")


if __name__ == "__main__":
    main(sys.argv[1:])
