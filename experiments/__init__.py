"""The experiments behind `docs/results`: one subpackage per report folder (`experiments.transfer`
writes `docs/results/transfer`, ...), each script a command over the shared logic in
`experiments.common` (the sets' own domains, the measured changes, the judge, JSON files).

Run a script as a module from the repository root, with `../shared` beside it, e.g.

    .venv/bin/python -m experiments.probes.probes analyse

so that the scripts import each other by package name (no path fiddling, no name that shadows a
module of `sts`). They are not shipped with `sts` (pyproject packages `src` only); the test suite
imports them from the repository root (`tests/test_reports.py` regenerates a sample of reports).
"""
