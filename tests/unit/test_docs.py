"""The operator's docs stay true: their runnable examples run, and the reference is complete.

- Every ```console block of README.md and docs/*.md marked runnable (an HTML comment
  `<!-- runnable -->` on the line before it) is run. Lines starting with `$ ` are commands,
  run by bash from the repository root with `rackserve` being this interpreter's
  `python -m deployer`, no MODELS_CONFIG, MODEL_ID or RAY_ADDRESS, and the hub offline. The
  lines after a command are its expected output (stdout and stderr together): each must match
  an output line (trailing spaces ignored), in order and with nothing between them. A line
  `...` stands for any number of lines; a line ending in ` ...` matches a line that starts with
  what comes before it. A command exits 0 unless it ends in `# exit N`. Only commands that
  need no root, network, Ray cluster or vLLM engine may be marked runnable.
- The command-line reference is docs/commands.md: one `## \\`rackserve COMMAND\\`` section per
  command, naming each of its options (and arguments) in backticks. A command or option of the
  program missing there fails, and so does an option row there that the program lacks.
- The models configuration table of docs/3-models-configuration.md lists every field: in
  tests/unit/test_examples.py.
- Relative links in the docs lead to files of the repository; the README stays the short door.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REFERENCE = ROOT / "docs" / "commands.md"
MARKER = "<!-- runnable -->"
EXIT = re.compile(r"#\s*exit\s+(\d+)\s*$")
GAP = "..."


@dataclass(frozen=True)
class Example:
    """One command of a runnable block, and what it must print and return."""

    where: str
    command: str
    expected: tuple[str, ...]
    exit_code: int


def runnable_examples(path: Path) -> Iterator[Example]:
    """The commands of every runnable console block in `path`, with their expected output."""
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = number + 1
        assert lines[fence].strip() == "```console", (
            f"{path.name}:{fence + 1}: {MARKER} must stand right before a ```console block"
        )
        block: list[tuple[int, str]] = []
        for index in range(fence + 1, len(lines)):
            if lines[index].strip() == "```":
                break
            block.append((index + 1, lines[index]))
        else:
            raise AssertionError(f"{path.name}:{fence + 1}: the block is never closed")
        commands = [k for k, (_, text) in enumerate(block) if text.startswith("$ ")]
        assert commands, f"{path.name}:{fence + 2}: a runnable block needs a '$ ' command"
        assert commands[0] == 0, f"{path.name}:{fence + 2}: must start with '$ '"
        for k, start in enumerate(commands):
            end = commands[k + 1] if k + 1 < len(commands) else len(block)
            at, text = block[start]
            command = text[2:]
            found = EXIT.search(command)
            yield Example(
                f"{path.relative_to(ROOT)}:{at}",
                command,
                tuple(line for _, line in block[start + 1 : end]),
                int(found.group(1)) if found else 0,
            )


def matches(expected: tuple[str, ...], actual: list[str]) -> bool:
    """Whether `actual` is `expected`, with `...` lines as gaps and `text ...` as prefixes."""

    def line_matches(want: str, got: str) -> bool:
        if want.endswith(" " + GAP):
            return got.startswith(want[: -len(GAP)].rstrip())
        return want.rstrip() == got.rstrip()

    def from_here(e: int, a: int) -> bool:
        if e == len(expected):
            return a == len(actual)
        if expected[e].strip() == GAP:
            return any(from_here(e + 1, k) for k in range(a, len(actual) + 1))
        return a < len(actual) and line_matches(expected[e], actual[a]) and from_here(e + 1, a + 1)

    return from_here(0, 0)


EXAMPLES = [example for path in DOCS for example in runnable_examples(path)]


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of the examples: `rackserve` is this interpreter's deployer."""
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "rackserve"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m deployer "$@"\n')
    shim.chmod(0o755)
    hidden = {"MODELS_CONFIG", "MODEL_ID", "RAY_ADDRESS", "RACKSERVE_STATE_DIR"}
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",  # stdout and stderr interleaved as a terminal shows them
    )
    return env


def test_the_docs_have_runnable_examples() -> None:
    assert len(EXAMPLES) >= 8, [e.where for e in EXAMPLES]
    assert all("rackserve" in e.command for e in EXAMPLES), "runnable blocks run rackserve"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.where)
def test_runnable_example_prints_and_exits_as_shown(
    example: Example, shell_env: dict[str, str]
) -> None:
    result = subprocess.run(
        ["bash", "-c", example.command],
        cwd=ROOT,
        env=shell_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout.rstrip("\n").splitlines()
    shown = "\n".join(output)
    assert result.returncode == example.exit_code, (
        f"{example.where}: `{example.command}` exited {result.returncode}, the doc says "
        f"{example.exit_code}:\n{shown}"
    )
    assert matches(example.expected, output), (
        f"{example.where}: `{example.command}` printed:\n{shown}\n\nthe doc shows:\n"
        + "\n".join(example.expected)
    )


@pytest.mark.parametrize(
    ("expected", "actual", "result"),
    [
        (("a", "b"), ["a", "b"], True),
        (("a",), ["a", "b"], False),
        (("a", "...", "d"), ["a", "b", "c", "d"], True),
        (("a", "...", "d"), ["a", "b", "c"], False),
        (("...", "c"), ["a", "b", "c"], True),
        (("error: bad ...",), ["error: bad input, and more"], True),
        (("a  ",), ["a"], True),
        (("b",), ["a"], False),
    ],
)
def test_expected_output_matching(
    expected: tuple[str, ...], actual: list[str], result: bool
) -> None:
    assert matches(expected, actual) is result


def cli_commands() -> dict[str, Any]:
    """Every command of the `rackserve` program by its path (`plan`, `keys add`), from typer."""
    import typer.main  # noqa: PLC0415

    from deployer.cli.app import app  # noqa: PLC0415

    found: dict[str, Any] = {}

    def walk(command: Any, path: tuple[str, ...]) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, (*path, name))
        else:
            found[" ".join(path)] = command

    root = typer.main.get_command(app)
    walk(root, ())
    found[""] = root
    return found


def reference_sections() -> dict[str, str]:
    """docs/commands.md's text per `## \\`rackserve COMMAND\\`` section; '' is the top."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in REFERENCE.read_text().splitlines():
        heading = re.fullmatch(r"## `rackserve ([a-z -]+)`", line.strip())
        if heading:
            current = heading.group(1)
            sections[current] = []
        elif line.startswith("## "):
            current = ""
        sections[current].append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def test_the_command_reference_names_every_command_option_and_argument() -> None:
    sections = reference_sections()
    missing = []
    for path, command in cli_commands().items():
        if path and path not in sections:
            missing.append(f"section `rackserve {path}`")
            continue
        text = sections[path] if path else REFERENCE.read_text()
        for param in command.params:
            names = (
                [*param.opts, *param.secondary_opts]
                if param.param_type_name == "option"
                else [param.name.upper()]
            )
            missing += [
                f"`{name}` of `rackserve {path}`" for name in names if f"`{name}`" not in text
            ]
    assert not missing, f"docs/commands.md lacks {missing}"


def test_the_command_reference_names_no_option_the_program_lacks() -> None:
    commands = cli_commands()
    stale = []
    for path, text in reference_sections().items():
        if not path:
            continue
        assert path in commands, f"docs/commands.md documents `rackserve {path}`, which is gone"
        known = {o for p in commands[path].params for o in (*p.opts, *p.secondary_opts)}
        for row in re.findall(r"^\| `(-[^`]+)`", text, flags=re.MULTILINE):
            stale += [f"`{row}` of `rackserve {path}`"] if row not in known else []
    assert not stale, f"docs/commands.md names options the program lacks: {stale}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_lead_to_files_of_the_repository(page: Path) -> None:
    text = page.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        resolved = (page.parent / target.split("#")[0]).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing in the repository: {broken}"
    assert "../shared" not in text


def test_the_readme_is_the_short_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines; the guides are in docs/"
    for guide in sorted((ROOT / "docs").glob("[0-9]-*.md")):
        assert f"docs/{guide.name}" in "\n".join(lines), f"README.md does not link {guide.name}"
