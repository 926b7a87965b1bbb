"""`grad` and `grad-adam` of the held-out round's three sets with each domain side: the whole
reference's loss (cot_nll's, as the round scored them) and the loss after the templated opening
(cot_nll_content's, `sts validate --metric cot_nll_content`'s side). Both on the first
`RECORDS` reference records of each domain, so the two differ only by the opening: why not all
100, a domain's 100 records take 5-15 minutes of backward passes on the 2 cores, 20 of them
1-3 (the transfer experiment's gradients.py took 20 for the same reason). The training sides are
the round's (cached); the round's settings are run.sh's.

    .venv/bin/python -m experiments.content.grad_content     # resumable (domain by domain)

Writes heldout/grad-content.json: side -> set -> score -> domain -> value, and the seconds.
`content.py analyse` judges both sides under both metrics.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from experiments import common
from experiments.common import RESULTS
from experiments.content import content

HERE = RESULTS / "content"  # its reports (this script is experiments/content)

RECORDS = 20
OUT = HERE / "heldout" / "grad-content.json"
SIDES = {"whole": "cot_nll", "content": "cot_nll_content"}  # side -> the metric whose loss it takes


def main() -> None:
    from sts.data.embedded import default_sae_dir
    from sts.engine.finetuning import FinetuneSpec
    from sts.engine.models import default_model_dir
    from sts.prediction.extraction import extract_all
    from sts.prediction.predict import prediction
    from sts.prediction.session import Session
    from sts.validation.plan import plan_data, train_dir_name

    base = dataclasses.replace(content.config("heldout"), model=str(default_model_dir()), sae=str(default_sae_dir()),
                               domain_demos=f"{content.D}/mmlu_pro_cot_demos.jsonl", k=400, demos=2, seed=0,
                               finetune=FinetuneSpec(max_steps=60, batch_size=4, seed=0), gradients=True)
    done = common.read_json(OUT, {"records_per_domain": RECORDS, "seconds": {}, "sides": {}})
    for side, metric in SIDES.items():
        pl = plan_data(dataclasses.replace(base, metric=metric))
        assert pl.gradient_content is (side == "content")
        domains = {d: q[:RECORDS] for d, q in pl.inputs.reference.items()}
        for i, train in enumerate(pl.inputs.trains):
            name = train_dir_name(i, train)
            if name in done["sides"].get(side, {}):
                continue
            started = time.perf_counter()
            cfg = dataclasses.replace(pl.predict_config(train, "icl", HERE / "unused"), explain=False, score="grad")
            session = Session(cfg, lambda m: print(m, file=sys.stderr, flush=True))
            ex = extract_all(cfg, train, pl.predict_domains, ("grad", "grad-adam"), pl.demos,
                             lambda m: print(m, file=sys.stderr, flush=True), session, domains)
            done["sides"].setdefault(side, {})[name] = {s: prediction(cfg, ex, s, train, session).scores
                                                        for s in ("grad", "grad-adam")}
            done["seconds"][f"{side}/{name}"] = round(time.perf_counter() - started, 1)
            common.write_json(done, OUT)
            print(f"{side} {name}: {done['seconds'][f'{side}/{name}']:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
