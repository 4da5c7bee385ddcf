"""Domain errors of the compiler.

Every bad input becomes a :class:`CompileError` whose message is one line that says how to fix it.
The CLI turns it into exit code 2 (a usage error): the operator, not the compiler, has to act.
"""

from __future__ import annotations


class CompileError(Exception):
    """A request the compiler cannot honour as given; ``str(err)`` is one line naming the fix."""

    def __init__(self, message: str) -> None:
        # Keep it one line: operators read it in a terminal and rollouts store it in a column.
        super().__init__(" ".join(message.split()))


class MissingExtraError(CompileError):
    """A pass needs an optional package that is not installed; the message names the extra."""

    def __init__(self, what: str, packages: tuple[str, ...], extra: str) -> None:
        self.packages = packages
        self.extra = extra
        super().__init__(
            f"{what} needs {', '.join(packages)}, which is not installed; "
            f"install it with: pip install 'edgefleet[{extra}]'"
        )
