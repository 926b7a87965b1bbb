"""Issue 54, item 4: the selection round of docs/results/select/PREREGISTRATION.md, resumable stage
by stage (after `python -m experiments.select.pool build`):

    .venv/bin/python -m experiments.select.run choose    # every selection -> selections.json, out/select/sel-*.jsonl
    nohup nice .venv/bin/python -m experiments.select.run train > select.log 2>&1 &   # ten fine-tunes, evaluations

`choose` makes the ten selections (`sts select` itself for the mean; the max, RDS+, BM25 and random as
the pre-registration defines them) and records each one's pool positions; `train` fine-tunes each
selection and evaluates it (and the base model once) on `evaluation.jsonl`, through `sts validate`'s
own plan and stages (fine-tuning and reference evaluation only: nothing is predicted here).
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

from experiments.common import RESULTS, read_json, run_verb, write_json
from experiments.select import pool as sp

HERE = RESULTS / "select"
SELECTIONS = HERE / "selections.json"
COSTS = HERE / "costs.json"  # each method's seconds as `choose` ran it (the pre-registration's cold cost)
COUNT = 110  # 10% of the pool
RANDOM_SEEDS = (1, 2)
BIG, DIM = 1 << 16, 8192


def probe_records(target: str) -> list[Any]:
    """The target's shipped probe records, as texts (the content round's probes.jsonl)."""
    from sts.data.datasets import load_dataset

    return load_dataset(str(sp.cr.DATA / "probes.jsonl")).by_domain()[target]


def top(scores: list[float], n: int = COUNT) -> list[int]:
    """The n best positions, ties by position (as `sts select` ranks)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n]


def choose() -> None:
    import hashlib
    import time

    import torch

    from experiments.baselines import BM25, pooled, text_of
    from sts.cache import cache_root
    from sts.cli import main as sts
    from sts.data.datasets import load_dataset
    from sts.engine.gradients import adapted, domain_side, sketch
    from sts.engine.models import default_model_dir, load_model
    from sts.engine.pool import RowStore, fold
    from sts.engine.settings import FinetuneSpec

    done = read_json(SELECTIONS, {})
    secs = read_json(COSTS, {})  # each method's seconds on these 2 cores, as it ran here

    def clock(name: str, started: float, note: str = "") -> None:
        secs[name] = {"seconds": round(time.perf_counter() - started, 1), "note": note}
        write_json(secs, COSTS)

    pool = load_dataset(str(sp.DATA / "pool.jsonl")).examples
    n = len(pool)
    for seed in RANDOM_SEEDS:
        done.setdefault(f"random-{seed}", sorted(random.Random(seed).sample(range(n), COUNT)))
    lm = None
    emb = None
    for t in sp.TARGETS:
        out = sp.DATA / f"sel-mean-{t}.jsonl"
        if f"mean-{t}" not in done:
            started = time.perf_counter()
            assert sts(["select", "--train", str(sp.DATA / "pool.jsonl"), "--target", t, "--count", str(COUNT),
                        "--dim", str(DIM), "--out", str(out)]) == 0
            rows = list(csv_rows(str(out) + ".scores.csv"))
            done[f"mean-{t}"] = sorted(int(r["position"]) for r in rows if r["chosen"])
            write_json(done, SELECTIONS)
            clock(f"mean-{t}", started, "cold: the pool's gradient rows and the target's side" if t == sp.TARGETS[0]
                  else "the pool's rows stored by the first target's run: the target's side and the ranking")
        lm = lm or load_model(str(default_model_dir()))
        probes = probe_records(t)
        if f"max-{t}" not in done:  # each probe record's own side against the same stored rows
            started = time.perf_counter()
            model = adapted(lm, FinetuneSpec(seed=0))
            sides = torch.stack([fold(sketch(domain_side(lm, model, {t: [e]}).domains[t], BIG), DIM) for e in probes])
            digest = hashlib.sha256(json.dumps([[e.history, e.prompt, e.response] for e in pool]).encode()).hexdigest()
            stores = [p for p in (cache_root() / "select").iterdir() if (p / "meta.json").is_file()
                      and (m := json.loads((p / "meta.json").read_text()))["n"] == n and m["dim"] == DIM
                      and m["key"]["pool"] == digest]
            if len(stores) != 1:
                raise SystemExit(f"expected one row store of this pool at --dim {DIM}, found {len(stores)}")
            rs = RowStore(stores[0], n, DIM)
            terms = rs.products(sides) * rs.tokens()[:, None]
            done[f"max-{t}"] = sorted(top(terms.max(1).tolist()))
            write_json(done, SELECTIONS)
            clock(f"max-{t}", started, "past the stored rows: 10 probe records' sides and the products")
        if f"rds-{t}" not in done:
            started = time.perf_counter()
            cold = emb is None
            emb = pooled(lm, pool) if emb is None else emb  # the pool's, once for every target
            target = pooled(lm, probes, side="domain")
            done[f"rds-{t}"] = sorted(top((emb @ target.T).max(1).values.tolist()))
            write_json(done, SELECTIONS)
            clock(f"rds-{t}", started, "cold: the pool's forward passes" if cold else "the pool's pooled states reused")
        if f"bm25-{t}" not in done:
            started = time.perf_counter()
            index = BM25([text_of(e) for e in pool])
            query = "\n".join(text_of(e) for e in probes)
            done[f"bm25-{t}"] = sorted(top([index.score(query, j) for j in range(n)]))
            write_json(done, SELECTIONS)
            clock(f"bm25-{t}", started, "text only")
    raw = [json.loads(line) for line in (sp.DATA / "pool.jsonl").read_text().split("\n") if line.strip()]
    for name, positions in done.items():
        (sp.DATA / f"sel-{name}.jsonl").write_text("".join(json.dumps(raw[i]) + "\n" for i in positions))
    print(json.dumps({k: len(v) for k, v in done.items()}))


def config() -> Any:
    """The round's `ValidateConfig`: the ten selections as training sets (all 110 records each), the
    evaluation records as --reference (the targets' 100, every other category's 30), run.sh's recipe."""
    from sts.engine.settings import FinetuneSpec
    from sts.validation.config import ValidateConfig

    names = read_json(SELECTIONS)
    if not names:
        raise SystemExit("no selections yet: run `python -m experiments.select.run choose` first")
    return ValidateConfig(out=HERE, seed=0, train=[str(sp.DATA / f"sel-{n}.jsonl") for n in names],
                          reference=str(sp.DATA / "evaluation.jsonl"), reference_examples=100, max_train=COUNT,
                          finetune=FinetuneSpec(max_steps=60, batch_size=4), score="lexical", metric="cot_nll",
                          question_evaluation=False, sft_shift=False, gradients=False)


def train() -> None:
    """The base evaluation, then each selection's fine-tune and evaluation (resumable)."""
    from experiments.common import finetune_and_evaluate
    from sts.validation.plan import plan

    finetune_and_evaluate(plan(config()), "[select]")


def csv_rows(path: str) -> Any:
    import csv

    with open(path, newline="") as fh:
        yield from csv.DictReader(fh)


def main(argv: list[str]) -> None:
    run_verb({"choose": choose, "train": train}, argv, "experiments.select.run")


if __name__ == "__main__":
    main(sys.argv[1:])
