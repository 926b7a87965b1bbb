"""Issue 53, item 6: the reference domains' library (`sts.data.embedded.REFERENCE_LIBRARY`) gains the
content round's measured sets, so that chemistry, economics, health and law, which no earlier round
evaluated, get a `shared` part and a calibrated change (today they print "-").

    .venv/bin/python -m experiments.content_round.ship ship     # after the round's runs (run.sh)

Each set whose tuned evaluation is in docs/results/content-round (the control included: it is a
measured run like any other) joins the library under `content-round/NAME`, with its measured
`cot_nll` change on all 14 categories and each of the library's gradient scores as `sts predict`
computes them on `embedded:mmlu-pro-cot` (no library, no calibration: the form the library holds).
Sets the library already holds are left as they are; a rerun adds only what is new. This writes a
shipped asset: rerun the suite and re-record the README's demo block after it.
"""

from __future__ import annotations

import sys

from experiments.common import measured, run_verb
from experiments.content_round import candidates as cc
from experiments.content_round import data as cr


def ship() -> None:
    from sts.analysis.library import Library, LibrarySet, set_name
    from sts.data.embedded import REFERENCE_LIBRARY
    from sts.prediction.compare import predict
    from sts.prediction.config import PredictConfig

    lib = Library.load(REFERENCE_LIBRARY)
    named = cc.sets()
    changes = measured(cr.HERE, list(named), "cot_nll")
    if not changes:
        raise SystemExit("no set of the content round is measured yet: run docs/results/content-round/run.sh")
    added = []
    for name, spec in named.items():
        key = f"content-round/{name}"
        if name not in changes or key in lib.sets:
            continue
        scores = {s: predict(PredictConfig(train=spec, score=s, library="none", calibrate=["none"])).scores
                  for s in lib.sides}
        lib.sets[key] = LibrarySet(set_name(spec), scores,
                                   {"cot_nll": {d: c.delta for d, c in changes[name].items()}})
        added.append(key)
    lib.save(REFERENCE_LIBRARY)
    print(f"{REFERENCE_LIBRARY}: {len(lib.sets)} sets ({len(added)} added: {', '.join(added) or 'none'})",
          file=sys.stderr)


def main(argv: list[str]) -> None:
    run_verb({"ship": ship}, argv, "experiments.content_round.ship")


if __name__ == "__main__":
    main(sys.argv[1:])
