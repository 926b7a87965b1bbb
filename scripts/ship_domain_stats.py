"""Build the statistics that ship with the package (`src/sts/assets/cache/`), the same for
every user, so that a first `sts predict` (and `make demo`) reads them instead of computing them:
- the embedded default's 14 MMLU domains x 100 questions read by the embedded model and SAE
  (for the SAE scores), and their gradient sides sketched (for the default `grad` and
  `grad-adam`: `sts.gradients`, 256 KB a domain);
- the embedded default's training side (CHAMP's first 100 problems): its gradients sketched
  (both directions, 1 MB), the SAE shift that explains them and its top contexts. A user's own
  training set is computed as before (`docs/results/speed.md` gives both times).
The exact gradients are read from your own cache (`~/.cache/sts` or `$STS_CACHE`) where a run
computed them, else computed (about 12 minutes on 2 cores for the domains, 5 for CHAMP); only
their sketches ship.

They are ordinary cache entries (named by the sha256 of their key, with a sha256 sidecar):
the key holds the embedded model's and SAE's identities, the questions, the rendering and the
code version, so any change to those makes `sts predict` compute its own instead. Rerun this
after such a change (a test fails while the shipped entries no longer match the defaults):

    .venv/bin/python scripts/ship_domain_stats.py
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

from sts.cache import SHIPPED, Cache, cache_root, key_digest
from sts.data import training_and_domains
from sts.embedded import default_sae_dir
from sts.models import default_model_dir
from sts.prediction import (
    PredictConfig,
    Session,
    contexts_key,
    domain_key,
    extract_all,
    gradient_domain_key,
    gradient_train_key,
    prediction,
    shift_key,
)


def main() -> None:
    cfg = PredictConfig(model=str(default_model_dir()), sae=str(default_sae_dir()), explain=False)
    train, domains = training_and_domains(cfg.train, cfg.domains, cfg.max_train, cfg.max_examples)
    few = dataclasses.replace(train, examples=train.examples[: cfg.demos + 1])  # what the domains' pass needs
    files: list[tuple[str, Path, str]] = []  # (domain, folder, digest)
    with tempfile.TemporaryDirectory() as tmp:
        session = Session(cfg, print)
        session.cache = Cache(Path(tmp), shipped=None)  # computed here, never read from what ships
        extract_all(cfg, few, domains, ("act",), None, print, session)  # the SAE readout every SAE score reads
        files += [(name, Path(tmp) / "extract", key_digest(domain_key(session, cfg, exs) | {"readout": "sae"}))
                  for name, exs in domains.items()]
        grads = Session(cfg, print)
        grads.cache = Cache(cache_root(), shipped=None)  # exact sides a run computed are reused, sketches written
        extract_all(cfg, few, domains, ("grad",), None, print, grads)
        files += [(f"{name} (gradients, sketch {cfg.gradient_sketch})", cache_root() / "extract",
                   key_digest(gradient_domain_key(grads, cfg, name, exs, cfg.gradient_sketch)))
                  for name, exs in domains.items()]
        # the demo's training side: the default score's sketched gradients, the explanation's SAE
        # shift and its contexts, as `sts predict` with no arguments reads them
        demo = PredictConfig(model=cfg.model, sae=cfg.sae)
        extraction = extract_all(demo, train, domains, (demo.score,), None, print, grads)
        shown = prediction(demo, extraction, demo.score, train, grads)
        files += [(f"{train.spec} (gradients, sketch {demo.gradient_sketch})", cache_root() / "extract",
                   key_digest(gradient_train_key(grads, demo, train, demo.gradient_sketch))),
                  (f"{train.spec} (the explanation's SAE shift)", cache_root() / "extract",
                   key_digest(shift_key(grads, demo, train) | {"readout": "sae"}))]
        if demo.top_contexts:
            files.append((f"{train.spec} (top contexts)", cache_root() / "extract",
                          key_digest(contexts_key(grads, demo, train, [f.index for f in shown.features]))))
        SHIPPED.mkdir(parents=True, exist_ok=True)
        for old in SHIPPED.iterdir():
            old.unlink()
        for name, folder, digest in files:
            payload = next(p for p in (folder / f"{digest}.safetensors", folder / f"{digest}.json") if p.exists())
            for path in (payload, folder / f"{digest}.sha256"):
                shutil.copy(path, SHIPPED / path.name)
            print(f"shipped {name}: {digest[:12]}")


if __name__ == "__main__":
    main()
