"""The transfer experiment as a library of measured runs (`sts.analysis.library`): every statistics
score of the seven sets (icl shift) and their measured changes in every metric.

Two files: `docs/results/transfer/library.json` at the experiment's k = 100 (the scores it
committed), and the embedded default's `src/sts/assets/library-smollm2-135m-l22.json` at the
shipped k (`sts.defaults.DEFAULT_K`), scored from the committed statistics (`extractions.py`),
so that `sts predict` with no arguments splits its ranking into shared and own parts. The
library's metric is the experiment's primary, cot_nll (10 reference domains). The shipped file
also holds the gradient scores (grad, the default since the held-out round, and grad-adam) as
`sts predict` computes them on the embedded MMLU domains (`../heldout/shipped.py run`, its
`shipped-scores.json`): the domain side the default reads there, so that its split and
calibration compare like with like.

    .venv/bin/python -m experiments.transfer.library
"""

from __future__ import annotations

import dataclasses
import json
import sys

from experiments.common import RESULTS
from experiments.transfer import extractions
from experiments.transfer.analyse import SETS
from experiments.transfer.candidates import changes
from experiments.transfer.sensitivity import SPECS
from sts.analysis.library import Library, LibrarySet, sae_identity, side_label
from sts.data.embedded import LIBRARY, SAE_DIR
from sts.defaults import DEFAULT_K
from sts.prediction.predict import score_extraction
from sts.scores.score import statistics_scores

HERE = RESULTS / "transfer"  # its reports (this script is experiments/transfer)

STATISTICS_SCORES = statistics_scores()

METRIC = "cot_nll"
GRADIENTS = HERE.parent / "heldout" / "shipped-scores.json"


def sides() -> dict[str, str]:
    """What each score read: the statistics scores the embedded MMLU questions, the gradient scores
    their answer texts (`shipped.py`'s form)."""
    from sts.data.datasets import load_dataset
    from sts.scores.score import gradient_scores

    GRADIENT_SCORES = gradient_scores()

    mmlu = load_dataset("embedded:mmlu").examples
    return {s: side_label(s in GRADIENT_SCORES, "embedded:mmlu", mmlu) for s in STATISTICS_SCORES + GRADIENT_SCORES}


def main() -> None:
    measured = changes()
    deltas = {n: {m: {d: c.delta for d, c in by.items()} for m, by in measured[n].items()} for n, _, _ in SETS}
    identity = sae_identity(str(SAE_DIR))
    committed = {n: json.loads((HERE / n / "scores-icl.json").read_text())["scores"] for n, _, _ in SETS}
    Library(identity, "embedded SmolLM2-135M-Instruct", 100, METRIC,
            {n: LibrarySet(SPECS[n], committed[n], deltas[n]) for n, _, _ in SETS},
            sides={s: v for s, v in sides().items() if s in STATISTICS_SCORES}).save(HERE / "library.json")
    shipped = {}
    grads = json.loads(GRADIENTS.read_text())["sets"] if GRADIENTS.is_file() else {}
    for name, _, _ in SETS:
        ex = extractions.load(name)
        cfg = dataclasses.replace(extractions.predict_config(name), k=DEFAULT_K)
        # the shipped file names each set by its file alone: a user's clone has no ../shared
        shipped[name] = LibrarySet(SPECS[name].replace("../shared/data/", ""),
                                   {s: score_extraction(cfg, ex, s)[0] for s in STATISTICS_SCORES}
                                   | grads.get(name, {}).get("scores", {}), deltas[name])
    Library(identity, "embedded SmolLM2-135M-Instruct", DEFAULT_K, METRIC, shipped, sides=sides()).save(LIBRARY)
    print(f"wrote {HERE / 'library.json'} (k = 100) and {LIBRARY} (k = {DEFAULT_K})", file=sys.stderr)


if __name__ == "__main__":
    main()
