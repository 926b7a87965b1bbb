"""The gradient scores (grad, grad-adam; `sts.engine.gradients`) on the transfer experiment's seven
sets, post hoc: their inner products are committed (`stats/gradients.json`), the gradients
themselves (39 MB a set) are not.

The domain side is computed once (the adapter starts where the seed puts it, whatever the
set), for the primary ground truth `cot_nll`: the held-out reference records' chains of
thought, the first `--domain-records` (20) of each domain's 100, as an estimate of the mean
gradient over all of them. Why 20, not 100: a backward pass over 2,048 padded tokens takes ~20 s
on the 2 cores, so the 10 x 100 records (~400 tokens each) would take ~70 minutes, the 20 ~14;
the training side (100 examples a set, one backward pass each) ~5 minutes a set.
The LoRA spec is the experiment's (r = 16, alpha 32, seed 0, the fitted
length per set). Resumable set by set; each stage's seconds are recorded beside the numbers.
`--metric cot_nll_content` adds the domain side of that ground truth (the loss after the
references' templated openings, `sts.engine.gradients.domain_items(content=True)`; issue 24's item 7),
recomputing each set's training side, which is not kept.

    .venv/bin/python -m experiments.transfer.gradients [--metric cot_nll_content]
"""

from __future__ import annotations

import json
import sys
import time

from experiments.common import RESULTS
from experiments.transfer.analyse import SETS
from experiments.transfer.sensitivity import SPECS, experiment_config
from sts.data.datasets import load_dataset
from sts.engine.finetuning import FinetuneSpec
from sts.engine.gradients import GradientStats, adapted, domain_gradients, training_gradients
from sts.engine.models import load_model
from sts.validation.config import read_inputs

HERE = RESULTS / "transfer"  # its reports (this script is experiments/transfer)

OUT = HERE / "stats" / "gradients.json"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain-records", type=int, default=20, help="reference records per domain (of 100)")
    parser.add_argument("--metric", action="append", choices=("cot_nll", "cot_nll_content"),
                        help="the ground truths whose domain sides to read (default: cot_nll; repeatable)")
    args = parser.parse_args()
    metrics = tuple(args.metric or ("cot_nll",))
    cfg = experiment_config()
    spec = FinetuneSpec(max_steps=60, batch_size=4, seed=0)  # run.sh's --max-steps 60 --ft-batch-size 4
    inputs = read_inputs(cfg)
    done = json.loads(OUT.read_text()) if OUT.is_file() else {"spec": {"lora_r": spec.lora_r, "lora_alpha": spec.alpha,
                                                                        "seed": spec.seed}, "seconds": {}, "sets": {}}
    wanted = [f"{s}:{m}" for s in ("grad", "grad-adam") for m in metrics]
    todo = [name for name, _, _ in SETS if not set(wanted) <= set(done["sets"].get(name, {}).get("scores", {}))]
    if not todo:
        return
    lm = load_model(cfg.model)
    model = adapted(lm, spec)
    grads = {}
    side = {d: q[: args.domain_records] for d, q in inputs.reference.items()}
    for m in metrics:
        started = time.perf_counter()
        grads[m] = domain_gradients(lm, model, side, content=m == "cot_nll_content")[0]
        done["seconds"]["domains" if m == "cot_nll" else f"domains:{m}"] = round(time.perf_counter() - started, 1)
        done.setdefault("records", {})[m] = {d: len(q) for d, q in side.items()}
        OUT.write_text(json.dumps(done, indent=1) + "\n")
    for name in todo:
        started = time.perf_counter()
        train = load_dataset(SPECS[name], max_examples=cfg.max_train).examples
        mean, sq, examples, tokens = training_gradients(lm, model, train, spec)
        entry = done["sets"].setdefault(name, {})
        if entry:  # the training side is recomputed: it must be the one the kept scores were read on
            assert (entry["examples"], entry["tokens"]) == (examples, tokens), name
        entry |= {"examples": examples, "tokens": tokens}
        for m, g in grads.items():  # the product's own rule (GradientStats.scores), not a second copy
            stats = GradientStats(mean, sq, examples, tokens, g, dict.fromkeys(g, 0))
            entry.setdefault("scores", {}).update({f"{s}:{m}": stats.scores(adam=s == "grad-adam")
                                                   for s in ("grad", "grad-adam")})
        done["seconds"][name if metrics == ("cot_nll",) else f"{name}:{','.join(metrics)}"] = round(
            time.perf_counter() - started, 1)
        OUT.write_text(json.dumps(done, indent=1) + "\n")
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    OUT.write_text(json.dumps(done, indent=1) + "\n")


if __name__ == "__main__":
    main()
