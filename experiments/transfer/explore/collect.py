"""Exploration after sets 1-2 (ADDENDUM.md): the statistics behind the experiment's scores,
read back from the extraction cache (no model pass when the experiment ran on this machine),
saved for `variants.py`. Run from the repository root:

    .venv/bin/python -m experiments.transfer.explore.collect
    .venv/bin/python -m experiments.transfer.explore.variants > docs/results/transfer/explore/variants.txt
"""
import pickle
import sys

import torch

from experiments.transfer.analyse import HERE, SETS, finished
from experiments.transfer.sensitivity import SPECS, experiment_config
from sts.data.datasets import domain_demonstrations, load_dataset
from sts.prediction.config import PredictConfig
from sts.prediction.extraction import extract_all
from sts.prediction.session import Session
from sts.scores.features import relative_shift
from sts.validation.config import read_inputs

torch.set_num_threads(1)
sets = finished()
names = [t for t, _, _ in SETS if (HERE / t / 'scores-icl.json').is_file()]
cfg = experiment_config()
inputs = read_inputs(cfg)
demos, domains = domain_demonstrations(inputs.domains, cfg.domain_demos_n, cfg.domain_demos)
out = {}
for t in names:
    train = load_dataset(SPECS[t], max_examples=100)
    pcfg = PredictConfig(model=cfg.model, sae=cfg.sae, train=train.spec, domains=cfg.domains, method="icl",
                         k=100, demos=2, seed=0, max_train=len(train.examples), max_examples=100,
                         score="act", domain_demos=cfg.domain_demos, domain_demos_n=cfg.domain_demos_n)
    s = Session(pcfg, lambda m: print(t, m, file=sys.stderr))
    e = extract_all(pcfg, train, {d: q[:100] for d, q in domains.items()}, ("act", "icl", "sq"), demos,
                    lambda m: print(t, m, file=sys.stderr), s)
    if s._engine is not None:
        print("WARNING: model was loaded (cache miss)", file=sys.stderr)
    sh = e.shift['sae']
    out[t] = {"shift_a": (sh.a.count, sh.a.sum, sh.a.sum_sq), "shift_b": (sh.b.count, sh.b.sum, sh.b.sum_sq),
              "ssd": sh.sum_sq_diff, "rel": relative_shift(sh),
              "dom": {d: (st.count, st.sum, st.sum_sq, st.fires) for d, st in e.domains['sae'].items()},
              "icl": {d: (p.a.count, p.sum_sq_diff) for d, p in e.domain_icl.items()}}
pickle.dump(out, open('/tmp/sts-explore-stats.pkl', 'wb'))
print("ok", list(out))
