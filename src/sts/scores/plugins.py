"""Score plugins: the modules of the `sts.scores` entry-point group, imported by `sts` before it
builds its CLI, so that the scores they `register` are choices of every verb."""

from __future__ import annotations

from sts.errors import UserError
from sts.scores.score import REGISTRY


def load_plugins() -> list[str]:
    """Import the modules of the `sts.scores` entry-point group (a package's
    `[project.entry-points."sts.scores"]`), whose imports `register` their scores; the names of
    the scores they added. A plugin that fails to import is bad input, said in one line."""
    from importlib.metadata import entry_points

    before = set(REGISTRY)
    for point in entry_points(group="sts.scores"):
        try:
            point.load()
        except Exception as exc:  # any error of a third-party module: said in one line, not a traceback
            raise UserError(f"the score plugin {point.name} ({point.value}) failed to load: "
                            f"{type(exc).__name__}: {exc}; fix or uninstall it") from None
    return [n for n in REGISTRY if n not in before]
