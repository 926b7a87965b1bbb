"""Config fields that are also command-line options.

Each setting's help, flag and bound are written once, on its config dataclass's field
(`option(...)`), and `sts.cli` builds every verb's options from those fields: the library and
the command line cannot drift apart. A field without help is a setting of the library only.
Metadata only: this module imports neither typer nor torch, so the configs stay light to import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, Field, field
from typing import Any

HELP = "help"


def option(default: Any = MISSING, *, help: str, flag: str | None = None, min: float | None = None,
           metavar: str | None = None, factory: Callable[[], Any] | None = None, cli_type: Any = None) -> Any:
    """A dataclass field with its option's help; `flag` names the option where its name is not
    the field's ("--cache/--no-cache"), `min` bounds it, `cli_type` gives the command line's type
    where it differs from the field's (a list option for a field that also takes one string)."""
    meta: dict[str, Any] = {HELP: help}
    for key, value in (("flag", flag), ("min", min), ("metavar", metavar), ("cli_type", cli_type)):
        if value is not None:
            meta[key] = value
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def is_option(f: Field[Any]) -> bool:
    return HELP in f.metadata
