"""Checks of the command line's own inputs, done before any work.

Options, output targets and optional dependencies; and the one way errors are printed (plain
text, never Rich markup).
"""

from __future__ import annotations

import importlib
import math
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from deployer.errors import ConfigError, MissingExtraError, RackserveError, printable

MAX_RESERVE_GIB = 65_536.0
"""Largest --reserve-gib (64 TiB, as the largest footprint a models file may give)."""

SERVE_HINT = (
    "install the serve extra and one engine: pip install 'rackserve[serve,gpu]' on a GPU node, "
    "or 'rackserve[serve,cpu]' on a CPU node (from a checkout: pip install -e '.[serve,gpu]'; "
    "the README's Install table has the CPU recipe)"
)


def reserve_gib(value: float) -> float:
    """--reserve-gib: a finite number of GiB from 0 to MAX_RESERVE_GIB (click lets nan through)."""
    if not (math.isfinite(value) and 0 <= value <= MAX_RESERVE_GIB):
        raise typer.BadParameter(f"must be a number of GiB from 0 to {MAX_RESERVE_GIB:g}")
    return value


def check_output_target(target: str | None, option: str = "--json") -> None:
    """Fail now, before any work, if `target` cannot be written ('-' is stdout).

    A new file is proven creatable by creating (and removing) a temporary file beside it; an
    existing one by opening it for appending, which changes nothing.
    """
    if target is None or target == "-":
        return
    if not target:
        raise ConfigError("needs a file name, or '-' for stdout", source=option)
    path = Path(target)
    try:
        if path.is_dir():
            raise ConfigError(f"{printable(target)} is a directory", source=option)
        parent = path.parent
        if not parent.is_dir():
            raise ConfigError(
                f"the directory {printable(str(parent))} does not exist", source=option
            )
        if path.exists():
            with path.open("a", encoding="utf-8"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=parent, prefix=".rackserve-check-"):
                pass
    except OSError as exc:
        raise ConfigError(
            f"cannot write {printable(target)}: {exc.strerror or type(exc).__name__}",
            source=option,
        ) from None


def write_output(target: str, text: str) -> None:
    """Write `text` to the target checked by `check_output_target`."""
    try:
        Path(target).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RackserveError(
            f"cannot write {printable(target)}: {exc.strerror or type(exc).__name__}"
        ) from None


def require(module: str, command: str, hint: str = SERVE_HINT) -> None:
    """Fail with the extra to install when `module` (e.g. ray.serve) cannot be imported."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or module
        raise MissingExtraError(
            f"rackserve {command} needs {missing}, which is not installed: {hint}"
        ) from None


def print_error(console: Console, error: RackserveError) -> None:
    """'error: MESSAGE' as plain text: the message's control characters escaped, no markup."""
    message = printable(str(error), keep_newlines=True)
    console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
