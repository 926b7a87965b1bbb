"""Derived files kept between runs: where they live, what they are keyed by, how they verify.

One integrity scheme for every entry: the payload is named by the sha256 of its key (a JSON
dict of everything that determines it: model and SAE files, examples, settings, code version)
and a sidecar `DIGEST.sha256` holds the sha256 of the payload's bytes, written after the
payload. An entry whose sidecar is missing or does not match is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sts.errors import UserError, warn
from sts.files import atomic_path

T = TypeVar("T")


def cache_root() -> Path:
    """Where sts keeps derived files (materialised model, extraction cache): $STS_CACHE, else
    ~/.cache/sts."""
    return Path(os.environ.get("STS_CACHE") or Path.home() / ".cache" / "sts")


def hash_path(path: Path, h: Any) -> None:
    """Small files by content; large ones (model weights) by name, size and mtime."""
    found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in found:
        st = p.stat()
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        if st.st_size <= 64 << 20:
            h.update(hashlib.sha256(p.read_bytes()).digest())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())


DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"  # the embedded model's checkpoint under the cache root


def fingerprint(spec: str) -> str:
    """Identity of a model or SAE spec: file contents/metadata for local paths, else the id
    (`sts.prediction.session.identity` names the embedded ones by what they are)."""
    if not spec:
        return ""
    h = hashlib.sha256(spec.encode())
    if Path(spec).exists():
        hash_path(Path(spec), h)
    return h.hexdigest()


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Entries that ship with the package (the embedded default's domain statistics, the same for
# every user): read like the cache's own, never written; `scripts/ship_domain_stats.py` makes them.
SHIPPED = Path(__file__).parent / "assets" / "cache"


class Cache:
    """Entries under ROOT/extract, then the shipped ones. `enabled=False` computes everything
    and stores nothing."""

    def __init__(self, root: Path, enabled: bool = True, shipped: Path | None = SHIPPED, writes: bool = True,
                 agree: Callable[[tuple[str, ...]], tuple[str, ...]] = lambda names: names,
                 sync: Callable[[], None] = lambda: None):
        """Under several processes (`sts.engine.distributed`) one writes (`writes`), every one
        computes what the writer found missing (`agree`: its list, sent to all), and `sync` waits
        until the writer's entries are there to read; the defaults are one process's."""
        self.root, self.enabled, self.shipped = root / "extract", enabled, shipped
        self.writes, self.agree, self.sync = writes, agree, sync
        self.hits: list[str] = []  # where entries were read from this session ("cache" / "shipped")

    def _paths(self, key: dict[str, Any], suffix: str, root: Path | None = None) -> tuple[Path, Path]:
        digest = key_digest(key)
        where = root or self.root
        return where / f"{digest}{suffix}", where / f"{digest}.sha256"

    def has(self, key: dict[str, Any], suffix: str = ".safetensors") -> bool:
        """Whether an entry is there to read (its integrity is checked when it is read)."""
        roots = [self.root] + ([self.shipped] if self.shipped else [])
        return self.enabled and any(all(p.exists() for p in self._paths(key, suffix, r)) for r in roots)

    def _read(self, key: dict[str, Any], suffix: str, load: Callable[[Path], T]) -> T | None:
        path, check = self._paths(key, suffix)
        if self.enabled and self.shipped and not path.exists():
            shipped, shipped_check = self._paths(key, suffix, self.shipped)
            if shipped.exists() and shipped_check.exists() and _sha256(shipped) == shipped_check.read_text().strip():
                self.hits.append("shipped")
                return load(shipped)
        if not (self.enabled and path.exists() and check.exists()):
            return None
        try:
            if _sha256(path) == check.read_text().strip():
                value = load(path)
                self.hits.append("cache")
                return value
        except (UserError, OSError, ValueError, KeyError, TypeError):
            pass
        warn(f"cache entry {path.name} is corrupted; recomputing it")
        return None

    def _write(self, key: dict[str, Any], suffix: str, value: T, save: Callable[[T, Path], None]) -> None:
        if not self.enabled:
            return
        path, check = self._paths(key, suffix)
        check.unlink(missing_ok=True)  # a payload is trusted only once its sidecar is written
        save(value, path)
        with atomic_path(check) as tmp:
            tmp.write_text(_sha256(path) + "\n")

    def get_or_compute_many(self, keys: dict[str, dict[str, Any]], compute: Callable[[tuple[str, ...]], dict[str, T]],
                            load: Callable[[Path], T], save: Callable[[T, Path], None],
                            suffix: str = ".safetensors") -> dict[str, T]:
        """Several entries that one pass computes together (e.g. one per readout): what is
        cached is read, the rest computed in a single call and stored."""
        found: dict[str, T | None] = {name: self._read(key, suffix, load) for name, key in keys.items()}
        missing = self.agree(tuple(name for name, value in found.items() if value is None))
        if missing:  # every process computes them together; one writes
            for name, value in compute(missing).items():
                if self.writes:
                    self._write(keys[name], suffix, value, save)
                found[name] = value
        self.sync()
        for name in [n for n, v in found.items() if v is None and n not in missing]:  # the writer had it, this
            found[name] = self._read(keys[name], suffix, load)  # process had not read it (one process: none)
        return {name: value for name, value in found.items() if value is not None}

    def get_or_compute_json(self, key: dict[str, Any], compute: Callable[[], dict[int, Any]]) -> dict[int, Any]:
        """A small JSON result keyed by integers (generated texts, top contexts)."""
        def load(path: Path) -> dict[int, Any]:
            return {int(k): v for k, v in json.loads(path.read_text()).items()}

        def save(value: dict[int, Any], path: Path) -> None:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps({str(k): v for k, v in value.items()}, sort_keys=True))

        return self.get_or_compute_many({"": key}, lambda _missing: {"": compute()}, load, save, ".json")[""]
