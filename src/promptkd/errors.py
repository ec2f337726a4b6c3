"""User-facing errors.

`UserError` marks a problem with the user's input (a file, a flag, a config value). The CLI
prints its message on one line and exits with status 2; every other exception is an internal
error and keeps its traceback.
"""

from __future__ import annotations

import importlib


class UserError(ValueError):
    """A problem the user can fix: bad file, field, flag or value. The message names it.

    The message names the fix as a Python caller makes it (`resume=True`); `cli` is the same
    message for the command line where the fix is a flag (`--resume`), and defaults to it.
    """

    def __init__(self, message: str = "", *, cli: str | None = None):
        super().__init__(message)
        self.cli = message if cli is None else cli


def require_extra(module: str, extra: str, feature: str):
    """Import an optional dependency, or raise a one-line UserError with the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"{feature} needs the '{module}' package, which is not installed: pip install {module} "
            f"(promptkd's '{extra}' extra)"
        ) from None


class ConfigError(UserError):
    """One or more invalid config entries; `problems` lists every one found, `source` names the
    file they are in (when one is known)."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        msg = f"invalid configuration{where}:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


class NonFiniteError(RuntimeError):
    """Training stopped on a NaN/Inf loss or gradient (train.nonfinite = stop, or too many skips).

    Not a `UserError`: the input was valid but the optimisation diverged. The trainer writes a
    resumable checkpoint first; the CLI prints the message (`cli`, as for UserError) on one line
    and exits with status 3.
    """

    def __init__(self, message: str = "", *, cli: str | None = None):
        super().__init__(message)
        self.cli = message if cli is None else cli


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGINT or SIGTERM after checkpointing its last completed step.

    `signum` is the signal; the CLI prints the message (which says how to resume) on one line and
    exits with 128 + signum (130 for SIGINT, 143 for SIGTERM), the shells' convention.
    """

    def __init__(self, message: str, signum: int, *, cli: str | None = None):
        super().__init__(message)
        self.signum = signum
        self.cli = message if cli is None else cli
