"""Errors that the command line turns into one clear message and a documented exit code.

Also the two helpers every message that quotes user data goes through: `shown` (a bounded
repr) and `printable` (control characters escaped), so that no value the user gave can flood,
garble or restyle the terminal.
"""

from __future__ import annotations

import enum
import re
import reprlib

MAX_PROBLEMS = 20
"""Problems listed in one message; the rest are counted."""

MAX_PROBLEM_CHARS = 1000
"""Characters of one problem line; longer ones are cut."""


class ExitCode(enum.IntEnum):
    """Exit codes of the `rackserve` command (documented in docs/commands.md)."""

    OK = 0
    FAILURE = 1  # the environment failed (a service unreachable, a process died)
    BAD_INPUT = 2  # the models or cluster input is wrong; nothing was planned or launched
    UNPLACED = 3  # the input is valid but some model does not fit; nothing was launched
    NOT_SERVING = 4  # `status`: something deployed is not serving


_UNPRINTABLE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, keep_newlines: bool = False) -> str:
    r"""`text` with control, bidi and surrogate characters escaped (`\x1b`, `\u202e`).

    Plain text for a terminal: nothing in it can move the cursor, change colours or reorder
    the line. Newlines are kept only when asked (a message's own line breaks).
    """
    if keep_newlines:
        return "\n".join(_UNPRINTABLE.sub(_escape, line) for line in text.split("\n"))
    return _UNPRINTABLE.sub(_escape, text)


class _BoundedRepr(reprlib.Repr):
    """reprlib with small limits, and integers too long for repr() shown by their size."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = 6
        self.maxstring = 80
        self.maxlong = 40
        self.maxother = 80

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 4000:  # repr() refuses integers of more than 4300 digits
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_REPR = _BoundedRepr()


def shown(value: object) -> str:
    """A short, printable repr of a value from the input, for messages (at most ~100 chars)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a value's repr must never break an error message
        text = f"<{type(value).__name__}>"
    return printable(text[:120])


class RackserveError(Exception):
    """Base of rackserve's expected errors: the message is for the operator, not a traceback."""

    exit_code: ExitCode = ExitCode.FAILURE


class MissingExtraError(RackserveError):
    """The command needs an optional dependency (an extra) that is not installed."""

    exit_code = ExitCode.BAD_INPUT


class ConfigError(RackserveError):
    """Bad input: a models or cluster configuration that cannot be used as given."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, problems: str | list[str], *, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        """One message: the source, then one line per problem (at most MAX_PROBLEMS)."""
        head = f"invalid {printable(self.source)}" if self.source else "invalid input"
        lines = [_line(p) for p in self.problems[:MAX_PROBLEMS]]
        if len(self.problems) > MAX_PROBLEMS:
            lines.append(f"... and {len(self.problems) - MAX_PROBLEMS} more problems")
        if len(lines) == 1:
            return f"{head}: {lines[0]}"
        return head + ":\n" + "\n".join(f"  - {line}" for line in lines)


def _line(problem: str) -> str:
    line = printable(problem)
    if len(line) > MAX_PROBLEM_CHARS:
        return line[:MAX_PROBLEM_CHARS] + " ..."
    return line
