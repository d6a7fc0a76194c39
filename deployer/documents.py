"""Reading the input documents (models and cluster files): text, then YAML or JSON."""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from pathlib import Path

import yaml

from deployer.errors import ConfigError


def read_input_file(path: Path, option: str) -> str:
    """The text of a file given by `option` (e.g. --models); unreadable is bad input."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}", source=option) from None


def decode_document(text: str, source: str) -> object:
    """JSON when it looks like JSON (for its precise messages), else YAML."""
    if not text.strip():
        raise ConfigError("it is empty", source=source)
    json_error: str | None = None
    if text.lstrip()[0] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            # Flow-style YAML looks like JSON too: report JSON's error only if YAML fails as well.
            json_error = (
                f"not valid JSON or YAML ({exc.msg} at line {exc.lineno} column {exc.colno})"
            )
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(json_error or f"not valid YAML or JSON{where}", source=source) from None


def duplicates(values: Sequence[Hashable]) -> list[str]:
    """The values that appear more than once, as sorted strings (for messages)."""
    return sorted({str(v) for v in values if values.count(v) > 1})
