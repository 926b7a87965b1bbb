"""The package's shape: imports run one way (no cycle), and shipped code names no path
outside the package (`../shared` is for tests, benchmarks and experiments)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sts"


def _module(path: Path) -> str:
    """A module's name below `sts`: "cli", "engine.gradients"."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the sts modules it imports anywhere in its body (function-level imports too)."""
    paths = [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent == PACKAGE]
    names = {_module(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sts":
                below = node.module.split(".")[1:]
                deps |= {".".join([*below, a.name]) for a in node.names if ".".join([*below, a.name]) in names}
                if ".".join(below) in names:
                    deps.add(".".join(below))
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("sts.")}
        graph[_module(path)] = deps - {_module(path)}
    return graph


def _packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between subpackages (a top-level module stands for itself)."""
    out: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        out.setdefault(mod.split(".")[0], set()).update(d.split(".")[0] for d in deps)
    return {p: d - {p} for p, d in out.items()}


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
    assert graph["cli"] and "cli" not in set().union(*(d for m, d in graph.items() if m not in ("cli", "__main__")))
    assert graph["__main__"] == {"cli"}  # `python -m sts` is the command line and nothing else
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"
    assert graph["data.embedded"] <= {"errors"}  # a leaf: checked paths only


# The pipeline as the folders show it, lowest first: a package imports only those before it
PIPELINE = ("errors", "files", "choices", "defaults", "options", "cache", "data", "engine", "scores", "analysis",
            "prediction", "validation", "cli", "__main__")


def test_the_folders_show_the_pipeline_and_import_only_what_comes_before():
    packages = _packages(_imports())
    assert set(packages) <= set(PIPELINE) | {"__init__"}, set(packages) - set(PIPELINE)
    for pkg, deps in packages.items():
        if pkg == "__init__":
            continue
        later = {d for d in deps if PIPELINE.index(d) > PIPELINE.index(pkg)}
        assert not later, f"{pkg} imports {later}, which come after it in the pipeline"
    for pkg in PIPELINE:
        path = PACKAGE / pkg / "__init__.py"
        if path.is_file():  # a subpackage says what it holds
            assert len(ast.get_docstring(ast.parse(path.read_text())) or "") > 100, pkg


def test_shipped_code_names_no_path_outside_the_package():
    shipped = list(PACKAGE.rglob("*.py")) + list(PACKAGE.glob("assets/*.json"))  # code and shipped data files
    offenders = [f"{p.name}:{i}" for p in shipped
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "../shared" in line or "shared/data" in line]
    assert offenders == []


def test_leaves_stay_leaves_and_the_cli_holds_no_stage_logic():
    graph = _imports()
    for leaf in ("errors", "files", "choices", "options"):
        assert graph[leaf] <= {"errors"}, f"{leaf} imports {graph[leaf]}"
    assert graph["defaults"] <= {"choices"}  # the CLI reads it before any stage (and torch) loads
    assert graph["cache"] <= {"errors", "files"}
    # every verb is a stage's config and run: the CLI defines no helper besides parsing ones
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    helpers = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("_")}
    assert helpers <= {"_quiet_libraries", "_command", "_score_help", "_fields", "_option", "_build", "_verb"}, helpers


def test_a_predictions_scores_are_read_without_importing_torch(tmp_path):
    """A notebook (or `sts correlate`) reads sts.json's scores with numpy alone; torch loads only
    for the bootstrap samples beside it."""
    import json
    import subprocess
    import sys

    (tmp_path / "sts.json").write_text(json.dumps({"scores": {"law": 1.5, "math": 0.5}}))
    code = ("import sys; from sts.analysis.correlate import load_sts; "
            f"scores, resample = load_sts({str(tmp_path / 'sts.json')!r}); "
            "assert scores == {'law': 1.5, 'math': 0.5} and resample is None, scores; "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 3, "reading sts.json imported torch"
    assert run.returncode == 0, run.stderr


def test_the_command_line_and_the_score_registry_load_without_torch():
    """`sts scores` (and every verb's --score help, built from the registry) imports no torch: the
    registry is read before any stage runs."""
    import subprocess
    import sys

    code = ("import sys; from sts import cli; code = cli.main(['scores']); "
            "sys.exit(3 if 'torch' in sys.modules else code)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 3, "sts scores imported torch"
    assert run.returncode == 0 and "grad-sign" in run.stdout, run.stderr
