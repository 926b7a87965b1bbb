"""Resumable stages: run a named step once, and reuse it while what it made still verifies.

A stage's manifest (`DIR/stages/NAME.json`) records the sha256 of its settings (`key`), of its
input files and of its output files. A rerun skips the stage when all three still match, so a
long experiment stopped midway (a session's end) resumes where it was, and a stage whose
settings, inputs or outputs changed is done again. Nothing here knows what a stage does:
`sts validate` is one user.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sts.data.embedded import file_sha256
from sts.engine.distributed import agree, barrier, world
from sts.files import atomic_path


def files_under(paths: Sequence[Path]) -> list[Path]:
    """The files of `paths`: a file as it is, a directory's files recursively, sorted."""
    out: list[Path] = []
    for p in paths:
        out += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return out


def settings_key(settings: Any) -> str:
    """sha256 of a JSON value (keys sorted; enums and paths as their strings)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def manifest_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".json"


Later = tuple[str, Sequence[Path], Any]  # a later stage: its name, outputs and settings


class Stages:
    """Runs named stages once: a stage is skipped when its manifest lists outputs that all
    exist with the recorded sha256, inputs whose sha256 did not change, and the same key."""

    def __init__(self, out: Path, timings: dict[str, float], progress: Callable[[str], None],
                 label: str = "[validate]"):
        """Under several processes (`sts.engine.distributed`) each runs every stage (they share its
        work) on the main process's word whether it is done; the main one writes the manifest and
        the others wait for it."""
        self.dir, self.timings, self.progress, self.label = out / "stages", timings, progress, label
        self.reused: list[str] = []
        self.world = world()

    def done(self, name: str, outputs: Sequence[Path], inputs: Sequence[Path], key: str = "",
             read: dict[str, str] | None = None) -> bool:
        """`read`: the inputs' hashes as an earlier stage's manifest recorded them, where those
        inputs are gone (`consumed`), instead of hashing `inputs`."""
        try:
            m = json.loads((self.dir / manifest_name(name)).read_text())
            made = files_under(outputs)
            return (bool(made) and m["key"] == key
                    and m["outputs"] == {str(p): file_sha256(p) for p in made}
                    and m["inputs"] == (read if read is not None else
                                        {str(p): file_sha256(p) for p in files_under(inputs)}))
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def consumed(self, name: str, inputs: Sequence[Path], settings: Any,
                 later: Sequence[Later], read: Callable[[str], bool]) -> dict[str, str] | None:
        """Where a stage's outputs are gone (an ignored folder on a new machine: a fine-tune's
        adapter) but its manifest still holds for `settings` and `inputs`, and every `later` stage
        (name, outputs, settings) verifies against the recorded hashes of the outputs it reads (the
        paths `read` accepts): those hashes, and the stage is reused without running. Otherwise
        None: it runs as usual. Rerunning it would cost its whole time only to rebuild files that
        no stage still needs (and on another processor need not give the same bytes)."""
        recorded = self.recorded(name, inputs, settings, read) if self.world.main else None
        ok = (recorded is not None and bool(later)
              and all(self.done(n, o, (), settings_key(s), recorded) for n, o, s in later))
        if not agree(("consumed",) if ok else (), self.world):
            return None
        self.reused.append(name)
        self.progress(f"{self.label} {name}: reused (its outputs are gone; every stage that reads them "
                      "verified against their recorded hashes)")
        return recorded if recorded is not None else {}  # the other processes: only the main one verifies

    def recorded(self, name: str, inputs: Sequence[Path], settings: Any,
                 read: Callable[[str], bool]) -> dict[str, str] | None:
        """The hashes the stage's manifest recorded of its outputs that `read` accepts, where the
        manifest holds for `settings` and `inputs` and none of those outputs is here any more."""
        try:
            m = json.loads((self.dir / manifest_name(name)).read_text())
            if (m["key"] == settings_key(settings) and not any(Path(p).exists() for p in m["outputs"])
                    and m["inputs"] == {str(p): file_sha256(p) for p in files_under(inputs)}):
                return {p: h for p, h in m["outputs"].items() if read(p)}
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def run(self, name: str, outputs: Sequence[Path], fn: Callable[[], object], inputs: Sequence[Path] = (),
            settings: Any = None, read: dict[str, str] | None = None) -> None:
        """Run `fn` unless a verified manifest says it ran with the same `settings` (a JSON
        value: every option that changes the outputs, and the ids of the examples), inputs (or
        the recorded hashes `read`, see `consumed`) and outputs."""
        key = settings_key(settings)
        if agree(("done",) if self.world.main and self.done(name, outputs, inputs, key, read) else (), self.world):
            self.reused.append(name)
            self.progress(f"{self.label} {name}: reused (outputs verified)")
            return
        self.progress(f"{self.label} {name}")
        started = time.perf_counter()
        fn()
        self.timings[name] = round(time.perf_counter() - started, 1)
        if not self.world.main:
            barrier(self.world)  # the main process's manifest
            return
        manifest = {"key": key, "outputs": {str(p): file_sha256(p) for p in files_under(outputs)},
                    "inputs": {str(p): file_sha256(p) for p in files_under(inputs)},
                    "seconds": self.timings[name]}
        with atomic_path(self.dir / manifest_name(name)) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        barrier(self.world)
        self.progress(f"{self.label} {name} done in {self.timings[name]:.0f} s")
