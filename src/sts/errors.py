"""Errors a user can fix.

Every stage raises `UserError` for bad input; the CLI turns it into one line on stderr and
exit status 2. (Atomic writes live in `sts.files`.)
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do."""


def warn(message: str) -> None:
    """A warning the user should read: one line on stderr, the run goes on."""
    print(f"sts: warning: {message}", file=sys.stderr)


def check_positive(values: dict[str, int | None]) -> None:
    """Counts and sizes given by name (`{"--k": 100}`): each must be at least 1 when set."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1 (got {value})")


def no_tokens(what: str, fix: str) -> UserError:
    """The one error for a computation left with nothing to count: a score or statistic over
    zero tokens is meaningless, never a silent zero. `what` names the input, `fix` the remedy."""
    return UserError(f"{what}: no tokens were counted; {fix}")


def refuse_unused(checks: list[tuple[str, bool, str]]) -> None:
    """Bad input where an option would change nothing in its combination: one line naming the
    first such option (the check is True) and why (the configs' shared rule)."""
    for option, unused, why in checks:
        if unused:
            raise UserError(f"{option} would change nothing here ({why}); drop it")


def which_process() -> str:
    """" (process 2 of 4)" under a launcher (torchrun sets RANK and WORLD_SIZE), else "": each
    process that fails says so in its one error line, and torchrun then stops the others."""
    import os

    size = int(os.environ.get("WORLD_SIZE", "1"))
    return f" (process {int(os.environ.get('RANK', '0')) + 1} of {size})" if size > 1 else ""
