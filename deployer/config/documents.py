"""The input boundary: every document rackserve reads is read, decoded and parsed here.

Models files, cluster files, `MODELS_CONFIG`, config.json and safetensors headers all go
through the same limits (docs/3-models-configuration.md, "Input limits", lists them):

- at most `MAX_DOCUMENT_BYTES` per document, read with a bounded read (no /dev/zero hang);
- UTF-8 only (a UTF-8 byte-order mark is allowed); anything else gets a message saying so;
- JSON, or YAML read with libyaml: no duplicate keys, at most `MAX_DEPTH` levels of nesting,
  at most `MAX_VALUES` values once YAML aliases (`*name`) are expanded (no alias bombs),
  YAML 1.2 floats (`4.0e1` is a number);
- numbers finite (no `.inf`, `NaN`, `1e400`) and integers of at most `MAX_INT_DIGITS` digits.

The low-level readers raise `DocumentError` (message without a source); `read_input_file`,
`decode_document` and `environment_text` turn it into a ConfigError naming the source.
"""

from __future__ import annotations

import json
import math
import re
import stat
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from deployer.errors import ConfigError, printable, shown

MAX_DOCUMENT_BYTES = 8 * 1024 * 1024
"""Largest models file, cluster file, `MODELS_CONFIG` value or config.json."""

MAX_DEPTH = 32
"""Deepest nesting of mappings and lists in a document."""

MAX_VALUES = 200_000
"""Most values (scalars, lists, mappings) in a document, counting each use of a YAML alias."""

MAX_INT_DIGITS = 30
"""Longest integer literal (10^30 is far beyond every bound the fields check)."""

_TOO_MANY_VALUES = (
    f"it holds more than {MAX_VALUES:,} values (YAML aliases counted each time they are used)"
)
_TOO_LONG_INTEGER = f"an integer has more than {MAX_INT_DIGITS} digits; it is out of range"
_MAX_INT_BITS = math.ceil(MAX_INT_DIGITS * math.log2(10))
_YAML_FLOAT = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?\.[0-9_]+[eE][-+]?[0-9]+$"
)


class DocumentError(ValueError):
    """A document that cannot be read or parsed; the message says why, without the source."""


def _base_loader() -> type[yaml.SafeLoader]:
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class StrictLoader(_base_loader()):  # type: ignore[misc]
    """libyaml's safe loader that refuses duplicate keys (a merge key `<<` may be overridden).

    It also reads YAML 1.2 floats without a dot or an exponent sign (`4e1`, `4.0e1`), which
    YAML 1.1 would leave as strings.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Hashable, Any]:
        """A mapping whose keys are all distinct."""
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    raise ConstructorError(
                        None, None, "a key is a list or mapping", key_node.start_mark
                    ) from None
                if duplicate:
                    raise ConstructorError(
                        None, None, f"duplicate key {shown(key)}", key_node.start_mark
                    )
        result: dict[Hashable, Any] = super().construct_mapping(node, deep=deep)
        return result


StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789."))


def decode_utf8(data: bytes) -> str:
    """The text of `data`, which must be UTF-8 (a byte-order mark is dropped)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DocumentError("it is UTF-16 or UTF-32 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(
            f"it is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None


def read_bytes(path: Path, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The bytes of a regular file or pipe, at most `limit` of them."""
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise DocumentError("it is a directory, not a file")
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise DocumentError("it is not a regular file")
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise DocumentError(f"it cannot be read: {exc.strerror or type(exc).__name__}") from None
    except DocumentError:
        raise
    except ValueError:  # a NUL character in the path
        raise DocumentError("it cannot be read: not a valid path") from None
    if len(data) > limit:
        raise DocumentError(f"it is larger than the limit of {limit:,} bytes")
    return data


def _items(container: dict[Any, Any] | list[Any]) -> Iterable[tuple[object, object]]:
    return container.items() if isinstance(container, dict) else enumerate(container)


class _Tree:
    """Nesting depth, size and (if `finite`) finite numbers of a parsed document.

    Each distinct list or mapping is visited once and its size (values below it, a YAML alias
    counted each time it is used) is the sum of its children's: a billion-laughs document is
    measured in the time it takes to parse, and refused. A recursive alias is refused too.
    """

    def __init__(self, finite: bool) -> None:
        self.finite = finite
        self.size: dict[int, int] = {}
        self.height: dict[int, int] = {}
        self.parent: dict[int, tuple[int, object]] = {}
        self.distinct = 0

    def check(self, document: object) -> None:
        if not isinstance(document, dict | list):
            self._scalar(document, None, None)
            return
        ancestors: set[int] = set()
        stack: list[tuple[dict[Any, Any] | list[Any], bool]] = [(document, False)]
        while stack:
            node, done = stack.pop()
            key = id(node)
            if done:
                self._finish(node)
                ancestors.discard(key)
                continue
            if key in self.size:
                continue
            self.distinct += len(node)
            if self.distinct > MAX_VALUES:  # before looking at each value of a huge list
                raise DocumentError(_TOO_MANY_VALUES)
            ancestors.add(key)
            stack.append((node, True))
            for name, child in _items(node):
                if not isinstance(child, dict | list):
                    self._scalar(child, key, name)
                elif id(child) in ancestors:
                    raise DocumentError("a YAML alias refers to a value that contains it")
                elif id(child) not in self.size:
                    self.parent.setdefault(id(child), (key, name))
                    stack.append((child, False))

    def _finish(self, node: dict[Any, Any] | list[Any]) -> None:
        children = [c for _, c in _items(node) if isinstance(c, dict | list)]
        size = 1 + len(node) - len(children) + sum(self.size[id(c)] for c in children)
        height = 1 + max((self.height[id(c)] for c in children), default=0)
        if size > MAX_VALUES:
            raise DocumentError(_TOO_MANY_VALUES)
        if height > MAX_DEPTH:
            raise DocumentError(f"it is nested more than {MAX_DEPTH} levels deep")
        self.size[id(node)] = size
        self.height[id(node)] = height

    def _scalar(self, value: object, parent: int | None, name: object) -> None:
        if not self.finite:
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise DocumentError(
                f"the number{self._at(parent, name)} is not finite (got {value}); "
                "give a finite number"
            )
        if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
            raise DocumentError(
                f"the integer{self._at(parent, name)} has more than {MAX_INT_DIGITS} digits; "
                "it is out of range"
            )

    def _at(self, parent: int | None, name: object) -> str:
        """' at 'models[0].gpu_memory_gib'' for where a scalar is."""
        if parent is None:
            return ""
        path = [name]
        while parent in self.parent:
            parent, step = self.parent[parent]
            path.append(step)
        text = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in reversed(path))
        return f" at {shown(text.lstrip('.'))}"


def _check_tree(document: object, *, finite: bool = True) -> None:
    """Nesting depth, size and (if `finite`) finite numbers, checked without recursion."""
    _Tree(finite).check(document)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DocumentError(f"duplicate key {shown(key)}")
        result[key] = value
    return result


def parse_json(text: str, *, strict: bool = True) -> object:
    """JSON with duplicate keys refused and nesting bounded.

    `strict` (rackserve's own files) also refuses non-finite numbers and integers of more than
    MAX_INT_DIGITS digits; without it (files written by others: config.json, safetensors
    headers) those are left to the reader of each field.
    """
    try:
        document = json.loads(text, object_pairs_hook=_json_pairs)
    except RecursionError:
        raise DocumentError(f"it is nested more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError as exc:
        raise DocumentError(
            f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except DocumentError:
        raise
    except ValueError:  # int() of more than 4300 digits
        raise DocumentError(_TOO_LONG_INTEGER) from None
    _check_tree(document, finite=strict)
    return document


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.reader.ReaderError):
        return (
            f"not valid YAML: {exc.reason} (character 0x{exc.character:02x} "
            f"at offset {exc.position})"
        )
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "not valid"
    if "nesting depth" in str(problem):  # libyaml's own limit, met before ours in flow style
        return f"it is nested more than {MAX_DEPTH} levels deep"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
    return f"not valid YAML: {printable(str(problem))[:200]}{where}"


def _check_yaml_events(text: str) -> None:
    """Refuse deep nesting and too many values from the event stream, before anything is built.

    libyaml's composer recurses once per level: it must never see 100,000 of them; and building
    a value costs far more than reading its event.
    """
    loader = StrictLoader(text)
    try:
        depth = events = 0
        while loader.check_event():
            event = loader.get_event()
            events += 1
            if events > MAX_VALUES + 4:  # stream, document, start and end events
                raise DocumentError(_TOO_MANY_VALUES)
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise DocumentError(f"it is nested more than {MAX_DEPTH} levels deep")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    finally:
        loader.dispose()


def parse_yaml(text: str) -> object:
    """One YAML document under the limits above (duplicates, depth, size, finite numbers)."""
    try:
        _check_yaml_events(text)
        loader = StrictLoader(text)
        try:
            document: object = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise DocumentError(_yaml_problem(exc)) from None
    except DocumentError:
        raise
    except ValueError:  # int() of more than 4300 digits
        raise DocumentError(_TOO_LONG_INTEGER) from None
    _check_tree(document)
    return document


def parse_document(text: str) -> object:
    """JSON when it looks like JSON (for its precise messages), else YAML."""
    if not text.strip():
        raise DocumentError("it is empty")
    if text.lstrip()[0] in "[{":
        try:
            return parse_json(text)
        except DocumentError as exc:
            if not str(exc).startswith("not valid JSON"):
                raise
            # Flow-style YAML looks like JSON too: report JSON's error only if YAML fails as well.
            try:
                return parse_yaml(text)
            except DocumentError as yaml_exc:
                if str(yaml_exc).startswith("not valid YAML"):
                    raise DocumentError(f"{exc} and not valid YAML either") from None
                raise
    return parse_yaml(text)


def read_input_file(path: Path, option: str) -> str:
    """The text of a file given by `option` (e.g. --models); unreadable is bad input."""
    try:
        return decode_utf8(read_bytes(path))
    except DocumentError as exc:
        raise ConfigError(str(exc), source=f"{option} {path}") from None


def environment_text(name: str, value: str) -> str:
    """An environment variable's value, checked like a file: size and UTF-8."""
    try:
        data = value.encode("utf-8", "surrogateescape")
        if len(data) > MAX_DOCUMENT_BYTES:
            raise DocumentError(f"it is larger than the limit of {MAX_DOCUMENT_BYTES:,} bytes")
        return decode_utf8(data)
    except DocumentError as exc:
        raise ConfigError(str(exc), source=name) from None


def decode_document(text: str, source: str) -> object:
    """Parse a models or cluster document; any problem is a ConfigError naming `source`."""
    try:
        return parse_document(text)
    except DocumentError as exc:
        raise ConfigError(str(exc), source=source) from None


def duplicates(values: Sequence[Hashable]) -> list[str]:
    """The values that appear more than once, as sorted strings (for messages)."""
    seen: set[Hashable] = set()
    repeated: set[str] = set()
    for value in values:
        if value in seen:
            repeated.add(str(value))
        seen.add(value)
    return sorted(repeated)
