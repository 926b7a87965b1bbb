"""The package's shape: imports run one way (no cycle), and shipped code names no path
outside the package (`../shared` is for tests, benchmarks and experiments)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sts"


def _imports() -> dict[str, set[str]]:
    """Module -> the sts modules it imports anywhere in its body (function-level imports too)."""
    names = {p.stem for p in PACKAGE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "sts":
                deps |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sts."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sts.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [node, dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_run_one_way():
    graph = _imports()
    assert graph["cli"] and "cli" not in set().union(*(d for m, d in graph.items() if m != "cli"))
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"
    assert graph["embedded"] <= {"errors"}  # a leaf: checked paths only


def test_shipped_code_names_no_path_outside_the_package():
    shipped = list(PACKAGE.glob("*.py")) + list(PACKAGE.glob("assets/*.json"))  # code and shipped data files
    offenders = [f"{p.name}:{i}" for p in shipped
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "../shared" in line or "shared/data" in line]
    assert offenders == []


def test_leaves_stay_leaves_and_the_cli_holds_no_stage_logic():
    graph = _imports()
    for leaf in ("errors", "files", "choices"):
        assert graph[leaf] <= {"errors"}, f"{leaf} imports {graph[leaf]}"
    assert graph["defaults"] <= {"choices"}  # the CLI reads it before any stage (and torch) loads
    assert graph["cache"] <= {"errors", "files"}
    # every verb is a stage's config and run: the CLI defines no helper besides parsing ones
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    helpers = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("_")}
    assert helpers <= {"_quiet_libraries", "_parse_domains", "_command", "_score_help"}, helpers  # _score_help: help


def test_a_predictions_scores_are_read_without_importing_torch(tmp_path):
    """A notebook (or `sts correlate`) reads sts.json's scores with numpy alone; torch loads only
    for the bootstrap samples beside it."""
    import json
    import subprocess
    import sys

    (tmp_path / "sts.json").write_text(json.dumps({"scores": {"law": 1.5, "math": 0.5}}))
    code = ("import sys; from sts.correlation import load_sts; "
            f"scores, resample = load_sts({str(tmp_path / 'sts.json')!r}); "
            "assert scores == {'law': 1.5, 'math': 0.5} and resample is None, scores; "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 3, "reading sts.json imported torch"
    assert run.returncode == 0, run.stderr
