"""Build the domain statistics that ship with the package (`src/sts/assets/cache/`): the
embedded default's 14 MMLU domains x 100 questions read by the embedded model and SAE, the
same for every user, so that a first `sts predict` reads them instead of computing them.

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

from sts.cache import SHIPPED, Cache, key_digest
from sts.data import training_and_domains
from sts.embedded import default_sae_dir
from sts.models import default_model_dir
from sts.prediction import PredictConfig, Session, domain_key, extract_all
from sts.score import spec_of


def main() -> None:
    cfg = PredictConfig(model=str(default_model_dir()), sae=str(default_sae_dir()))
    train, domains = training_and_domains(cfg.train, cfg.domains, cfg.max_train, cfg.max_examples)
    readout = spec_of(cfg.score).readout or "sae"
    with tempfile.TemporaryDirectory() as tmp:
        session = Session(cfg, print)
        session.cache = Cache(Path(tmp), shipped=None)  # computed here, never read from what ships
        few = dataclasses.replace(train, examples=train.examples[: cfg.demos + 1])  # the shift is not shipped
        extract_all(cfg, few, domains, (cfg.score,), None, print, session)
        SHIPPED.mkdir(parents=True, exist_ok=True)
        for old in SHIPPED.iterdir():
            old.unlink()
        for name, exs in domains.items():
            digest = key_digest(domain_key(session, cfg, exs) | {"readout": readout})
            for suffix in (".safetensors", ".sha256"):
                shutil.copy(Path(tmp) / "extract" / f"{digest}{suffix}", SHIPPED / f"{digest}{suffix}")
            print(f"shipped {name}: {digest[:12]}")


if __name__ == "__main__":
    main()
