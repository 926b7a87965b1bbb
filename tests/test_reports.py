"""A sample of the committed reports under docs/results regenerates unchanged from the committed
files alone (no model, no cache): the analyses (the `experiments` package, run as modules from the
repository root) run on the package as it is now, so a change to its statistics or scores that would
alter a published number fails here."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def _run(module: str, args: list[str]) -> None:
    """`python -m MODULE ARGS` from the repository root, in this process (its imports are paid)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.setattr(sys, "argv", [module, *args])
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            assert exc.code in (0, None), exc


@pytest.mark.skipif(not (RESULTS / "probes" / "probes.json").is_file(), reason="docs/results/probes is not here")
def test_the_probe_records_analysis_regenerates_unchanged(tmp_path):
    _run("experiments.probes.probes", ["analyse", str(tmp_path)])
    for name in ("PROBES.md", "analysis.json"):
        assert (tmp_path / name).read_text() == (RESULTS / "probes" / name).read_text(), name


@pytest.mark.skipif(not (RESULTS / "heldout" / "analysis.json").is_file(), reason="docs/results/heldout is not here")
def test_the_held_out_rounds_analysis_regenerates_unchanged(tmp_path):
    """Its header names the folder it read, so the comparison starts below it."""
    _run("experiments.heldout.heldout_analysis", ["docs/results/heldout", "--out", str(tmp_path)])
    got, want = (json.loads(p.read_text()) for p in (tmp_path / "analysis.json", RESULTS / "heldout" / "analysis.json"))
    for key in ("tables", "rule", "chosen", "sets", "truth", "pooled_sets"):
        assert got[key] == want[key], key
    body = [(p / "ANALYSIS.md").read_text().splitlines()[4:] for p in (tmp_path, RESULTS / "heldout")]
    assert body[0] == body[1]


def test_the_experiments_are_one_package_that_imports_by_name():
    """No experiment script puts a folder on sys.path or loads another by its file path: they import
    each other as `experiments.<folder>.<script>` (so no name shadows a module of `sts`), and each
    folder is a package."""
    import ast

    pkg = ROOT / "experiments"
    scripts = [p for p in pkg.rglob("*.py") if p.name != "__init__.py"]
    assert len(scripts) > 20
    for path in scripts:
        text = path.read_text()
        assert "sys.path" not in text and "spec_from_file_location" not in text, path
        assert (path.parent / "__init__.py").is_file(), path.parent
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            local = {p.stem for p in scripts}
            assert not any(n.split(".")[0] in local for n in names), f"{path}: imports {names} by bare name"
