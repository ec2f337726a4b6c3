"""User-facing errors.

`UserError` marks a problem with the user's input (a file, a flag, a config value). The CLI
prints its message on one line and exits with status 2; every other exception is an internal
error and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix: bad file, field, flag or value. The message names it."""


class ConfigError(UserError):
    """One or more invalid config entries; `problems` lists every one found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        msg = "invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


class NonFiniteError(RuntimeError):
    """Training stopped on a NaN/Inf loss or gradient (train.nonfinite = stop, or too many skips).

    Not a `UserError`: the input was valid but the optimisation diverged. The trainer writes a
    resumable checkpoint first; the CLI prints the message on one line and exits with status 3.
    """


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGINT or SIGTERM after checkpointing its last completed step.

    `signum` is the signal; the CLI prints the message (which says how to resume) on one line and
    exits with 128 + signum (130 for SIGINT, 143 for SIGTERM), the shells' convention.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
