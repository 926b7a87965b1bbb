"""Build the domain statistics that ship with the package (`src/sts/assets/cache/`): the
embedded default's 14 MMLU domains x 100 questions read by the embedded model and SAE (for the
SAE scores), and their gradient sides sketched (for the default `grad` and `grad-adam`:
`sts.gradients`, 256 KB a domain), the same for every user, so that a first `sts predict`
reads them instead of computing them. The exact gradient sides are read from your own cache
(`~/.cache/sts` or `$STS_CACHE`) where a run computed them, else computed (about 12 minutes on
2 cores); only their sketches ship.

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
from sts.prediction import PredictConfig, Session, domain_key, extract_all, gradient_domain_key


def main() -> None:
    cfg = PredictConfig(model=str(default_model_dir()), sae=str(default_sae_dir()), explain=False)
    train, domains = training_and_domains(cfg.train, cfg.domains, cfg.max_train, cfg.max_examples)
    few = dataclasses.replace(train, examples=train.examples[: cfg.demos + 1])  # the training side is not shipped
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
        SHIPPED.mkdir(parents=True, exist_ok=True)
        for old in SHIPPED.iterdir():
            old.unlink()
        for name, folder, digest in files:
            for suffix in (".safetensors", ".sha256"):
                shutil.copy(folder / f"{digest}{suffix}", SHIPPED / f"{digest}{suffix}")
            print(f"shipped {name}: {digest[:12]}")


if __name__ == "__main__":
    main()
