"""The transfer experiment's statistics, committed: score any candidate on the whole matrix
from a clean clone, with no model pass.

`sts validate` keeps what each score reads (the training set's paired statistics per readout,
each domain's single-run statistics per readout, each domain's run with and without its
demonstrations) in the extraction cache of the machine that ran it. This script recomputes
them with the experiment's settings (run.sh: icl shift, 100 training examples, 2
demonstrations, 100 questions per domain, the MMLU-Pro CoT demonstrations) through that same
cache and writes them under `stats/` in the statistics file format of `sts extract`
(`sts.engine.stats`; per-example shifts included, for the bootstrap). `load(set)` reads them back as
the `Extraction` that `sts.prediction.predict.score_extraction` scores, so any registered score is one
call away. The sft shift needs the tuned models, which are not committed: it is not here.
The domains' ICL pairs are stored without their per-example terms (nothing scores them).
Checked: every committed score of the experiment (scores-icl.json, k = 100) is reproduced from
these files, to a relative difference of 3e-6 at most (icl, rel-icl; exactly for the others).

    .venv/bin/python -m experiments.transfer.extractions          # resumable, set by set
    .venv/bin/python -c "from experiments.transfer import extractions as x; print(x.score('train-1-champ', 'rel-act'))"
"""

from __future__ import annotations

import functools
import sys
import time

from experiments.common import RESULTS
from experiments.transfer.analyse import SETS
from experiments.transfer.sensitivity import SPECS, experiment_config
from sts.data.datasets import domain_demonstrations, load_dataset
from sts.engine.stats import FeatureStats, PairedStats, RunStats, load_stats
from sts.prediction.config import PredictConfig
from sts.prediction.extraction import extract_all
from sts.prediction.predict import score_extraction
from sts.prediction.session import Session
from sts.scores.baselines import domain_text, training_text
from sts.scores.score import Extraction, statistics_scores
from sts.validation.config import read_inputs

HERE = RESULTS / "transfer"  # its reports (this script is experiments/transfer)

SCORES = statistics_scores()  # the transfer experiment read every statistics score (no gradient pass)

OUT = HERE / "stats"
READOUTS = ("sae", "raw")


@functools.lru_cache(maxsize=1)
def _setup():  # type: ignore[no-untyped-def]
    cfg = experiment_config()
    inputs = read_inputs(cfg)
    demos, domains = domain_demonstrations(inputs.domains, cfg.domain_demos_n, cfg.domain_demos)
    return cfg, demos, {d: q[: cfg.predict_examples] for d, q in domains.items()}


def predict_config(name: str) -> PredictConfig:
    """The experiment's predict stage settings for one set (every score from one extraction)."""
    cfg = experiment_config()
    return PredictConfig(model=cfg.model, sae=cfg.sae, train=SPECS[name], domains=cfg.domains, method="icl",
                         k=cfg.k, demos=cfg.demos, seed=cfg.seed, max_train=cfg.max_train,
                         max_examples=cfg.predict_examples, max_length=cfg.max_length, score="act",
                         domain_demos=cfg.domain_demos, domain_demos_n=cfg.domain_demos_n, top_contexts=0)


def export() -> None:
    cfg, demos, domains = _setup()
    OUT.mkdir(exist_ok=True)
    for name, _, _ in SETS:
        if all((OUT / f"{name}.shift-{r}.safetensors").is_file() for r in READOUTS):
            print(f"{name}: exported already", file=sys.stderr)
            continue
        started = time.perf_counter()
        train = load_dataset(SPECS[name], max_examples=cfg.max_train)
        pcfg = predict_config(name)
        session = Session(pcfg, lambda m, n=name: print(f"{n}: {m}", file=sys.stderr))
        ex = extract_all(pcfg, train, domains, SCORES, demos, session.progress, session)
        for domain in domains:
            for r in READOUTS:
                path = OUT / f"domain.{r}.{domain.replace(' ', '_')}.safetensors"
                if not path.is_file():
                    RunStats(ex.domains[r][domain], {"readout": r, "domain": domain}).save(path)
            path = OUT / f"domain-icl.{domain.replace(' ', '_')}.safetensors"
            if not path.is_file():
                ex.domain_icl[domain].save(path)
        for r in READOUTS:  # last: their presence marks the set as done
            ex.shift[r].meta |= {"hook": ex.hook, "readout": r, "train": SPECS[name]}
            ex.shift[r].save(OUT / f"{name}.shift-{r}.safetensors")
        print(f"{name}: exported in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def load(name: str) -> Extraction:
    """One set's Extraction, from the committed files and the data (texts for lexical)."""
    cfg, demos, domains = _setup()
    shift = {r: load_stats(OUT / f"{name}.shift-{r}.safetensors") for r in READOUTS}
    assert all(isinstance(s, PairedStats) for s in shift.values())
    singles: dict[str, dict[str, FeatureStats]] = {r: {} for r in READOUTS}
    icl: dict[str, PairedStats] = {}
    for domain in domains:
        for r in READOUTS:
            singles[r][domain] = load_stats(OUT / f"domain.{r}.{domain.replace(' ', '_')}.safetensors").a
        pair = load_stats(OUT / f"domain-icl.{domain.replace(' ', '_')}.safetensors")
        assert isinstance(pair, PairedStats)
        icl[domain] = pair
    train = load_dataset(SPECS[name], max_examples=cfg.max_train)
    texts = (training_text(train.examples), {d: domain_text(q) for d, q in domains.items()})
    return Extraction(shift["sae"].meta["hook"], shift, singles, icl, texts,  # type: ignore[arg-type]
                      {d: len(q) for d, q in domains.items()}, demos)


def score(name: str, score_name: str, k: int | None = None) -> dict[str, float]:
    """Any registered score of one set, per domain (k: the experiment's 100 unless given)."""
    import dataclasses

    cfg = predict_config(name)
    if k is not None:
        cfg = dataclasses.replace(cfg, k=k)
    return score_extraction(cfg, load(name), score_name)[0]


if __name__ == "__main__":
    export()
