"""Errors that the command line turns into one clear message and a documented exit code."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of the `rackserve` command (documented in the README)."""

    OK = 0
    FAILURE = 1  # the environment failed (a service unreachable, a process died)
    BAD_INPUT = 2  # the models or cluster input is wrong; nothing was planned or launched
    UNPLACED = 3  # the input is valid but some model does not fit; nothing was launched


class RackserveError(Exception):
    """Base of rackserve's expected errors: the message is for the operator, not a traceback."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(RackserveError):
    """Bad input: a models or cluster configuration that cannot be used as given."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, problems: str | list[str], *, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        """One message: the source, then one line per problem."""
        head = f"invalid {self.source}" if self.source else "invalid input"
        if len(self.problems) == 1:
            return f"{head}: {self.problems[0]}"
        return head + ":\n" + "\n".join(f"  - {p}" for p in self.problems)
