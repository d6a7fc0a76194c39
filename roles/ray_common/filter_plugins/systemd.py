"""Quoting for the systemd files rackserve's roles write, shared by every role that writes one.

Ansible loads this directory for each play that runs ray_common or a role depending on it
(ray_head, ray_worker and deploy_models list it in meta/main.yml).

- `systemd_quote`: one word of a command line (ExecStart=) or one Environment= assignment.
- `systemd_env_quote`: the value of a `NAME=value` line of an EnvironmentFile= file.
"""

from __future__ import annotations

import re
from typing import Any

SAFE_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def systemd_quote(word: Any) -> str:
    """One word for a unit's command line or Environment= line, as systemd reads it back.

    Words of safe characters stay as they are; others are double-quoted with backslash and
    double quote escaped. `%` (a specifier) becomes `%%` and `$` (variable expansion) `$$` in
    both cases, so that the value reaches the program as written.
    """
    text = str(word)
    if SAFE_WORD.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def systemd_env_quote(value: Any) -> str:
    """A value for an EnvironmentFile= line (`NAME={{ value | systemd_env_quote }}`).

    Double-quoted, with the four characters systemd unescapes there (backslash, double quote,
    backquote, dollar) escaped: systemd neither expands variables nor specifiers in these files.
    """
    text = str(value)
    for char in ("\\", '"', "`", "$"):
        text = text.replace(char, "\\" + char)
    return f'"{text}"'


class FilterModule:
    """rackserve's systemd quoting filters."""

    def filters(self) -> dict[str, Any]:
        """The filters by name."""
        return {"systemd_quote": systemd_quote, "systemd_env_quote": systemd_env_quote}
