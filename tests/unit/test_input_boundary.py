"""The input boundary's parts: documents, plain-text messages, output targets, missing extras."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deployer.cli.options import check_output_target
from deployer.config.documents import (
    MAX_DEPTH,
    MAX_VALUES,
    DocumentError,
    decode_utf8,
    parse_document,
    parse_json,
)
from deployer.config.models_config import load_models, parse_models_config
from deployer.errors import MAX_PROBLEMS, ConfigError, printable, shown

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ("a: 1\na: 2\n", "duplicate key 'a' at line 2"),
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"nested more than {MAX_DEPTH} levels"),
        ("x: .inf", "the number at 'x' is not finite"),
        ('{"x": [NaN]}', "the number at 'x[0]' is not finite"),
        ('{"x": 1e400}', "not finite"),
        ("x: " + "9" * 40, "more than 30 digits"),
        ('{"x": ' + "9" * 40 + "}", "the integer at 'x' has more than 30 digits"),
        ('{"x": ' + "9" * 5000 + "}", "more than 30 digits"),
        ("[" + "1," * 300_000 + "1]", "more than 200,000 values"),
        ("a: &a [*a]", "refers to a value that contains it"),
        ("x: !!python/name:os.system", "could not determine a constructor"),
    ],
)
def test_documents_refuse(text: str, expected: str) -> None:
    with pytest.raises(DocumentError) as error:
        parse_document(text)
    assert expected in str(error.value)


def test_yaml_aliases_are_read_but_their_expansion_is_bounded() -> None:
    shared = parse_document("a: &g [1, 2]\nb: *g\nm: {<<: {x: 1}, y: 2}\n")
    assert shared == {"a": [1, 2], "b": [1, 2], "m": {"x": 1, "y": 2}}
    bomb = (
        "a0: &a0 ["
        + ", ".join(["x"] * 10)
        + "]\n"
        + "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 7))
    )
    with pytest.raises(DocumentError, match=f"more than {MAX_VALUES:,} values"):
        parse_document(bomb)


def test_yaml_1_2_floats_are_numbers() -> None:
    assert parse_document("a: 4.0e1\nb: 1e3\nc: 1_000\nd: '4e1'") == {
        "a": 40.0,
        "b": 1000.0,
        "c": 1000,
        "d": "4e1",
    }


def test_files_written_by_others_keep_their_non_finite_numbers() -> None:
    assert parse_json('{"eps": Infinity}', strict=False) == {"eps": float("inf")}
    with pytest.raises(DocumentError, match="duplicate key"):
        parse_json('{"a": 1, "a": 1}', strict=False)


def test_text_must_be_utf8() -> None:
    assert decode_utf8(b"\xef\xbb\xbfmodels: []") == "models: []"
    with pytest.raises(DocumentError, match="UTF-16"):
        decode_utf8("models: []".encode("utf-16"))
    with pytest.raises(DocumentError, match=r"not UTF-8 text \(byte 0xff at offset 2\)"):
        decode_utf8(b"ab\xff")


def test_printable_escapes_what_would_move_or_restyle_the_terminal() -> None:
    assert printable("a\x1b[2Jb\u202ec\udcff") == "a\\x1b[2Jb\\u202ec\\udcff"
    assert printable("one\ntwo") == "one\\x0atwo"
    assert printable("one\ntwo", keep_newlines=True) == "one\ntwo"
    assert printable("[bold]plain[/]") == "[bold]plain[/]"


def test_shown_is_short_whatever_the_value() -> None:
    assert len(shown("x" * 1_000_000)) < 130
    assert len(shown(list(range(1_000_000)))) < 130
    assert shown(10**5000) == "<an integer of 16610 bits>"


def test_a_message_lists_at_most_max_problems() -> None:
    message = str(ConfigError([f"problem {i}" for i in range(1000)], source="x"))
    assert message.count("\n  - ") == MAX_PROBLEMS + 1
    assert message.endswith(f"... and {1000 - MAX_PROBLEMS} more problems")


def test_relative_model_source_is_read_from_the_models_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf" / "llama").mkdir(parents=True)
    models = tmp_path / "conf" / "models.yaml"
    models.write_text("models: [{model_id: a, model_source: llama}, {model_id: org/b}]\n")
    monkeypatch.chdir(tmp_path)
    first, second = load_models(Path("conf/models.yaml"), {})
    assert first.source == str(tmp_path / "conf" / "llama")
    assert second.source == "org/b"  # no such directory: a hub repo id


def test_route_prefix_is_one_setting_of_the_application() -> None:
    shared = parse_models_config(
        "models: [{model_id: a, route_prefix: /v}, {model_id: b, route_prefix: /v}, {model_id: c}]"
    )
    assert {m.route_prefix for m in shared} == {"/v", None}
    with pytest.raises(ConfigError, match="route_prefix: the models ask for different values"):
        parse_models_config(
            "models: [{model_id: a, route_prefix: /a}, {model_id: b, route_prefix: /b}]"
        )


def test_route_prefix_error_shows_the_value_once() -> None:
    with pytest.raises(ConfigError) as error:
        parse_models_config("models: [{model_id: a, route_prefix: noslash}]")
    assert str(error.value).count("noslash") == 1


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("", "needs a file name"),
        ("{tmp}", "is a directory"),
        ("{tmp}/missing/out.json", "does not exist"),
        ("/proc/version", "cannot write /proc/version"),
    ],
)
def test_output_targets_are_checked_before_the_work(
    tmp_path: Path, target: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        check_output_target(target.format(tmp=tmp_path))


def test_writable_output_targets_are_left_as_they_were(tmp_path: Path) -> None:
    existing = tmp_path / "plan.json"
    existing.write_text("old")
    check_output_target(str(existing))
    check_output_target(str(tmp_path / "new.json"))
    check_output_target("-")
    assert existing.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def without(module: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """The command line in a fresh interpreter in which `module` cannot be imported."""
    script = (
        f"import sys\nsys.modules[{module!r}] = None\n"
        "from deployer.cli.app import main\nmain(sys.argv[1:])\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("command", ["status", "probe", "down", "deploy"])
def test_commands_that_need_ray_name_the_extra(command: str) -> None:
    result = without("ray", command)
    assert result.returncode == 2, result.stderr
    assert "is not installed: install the serve extra" in result.stderr
    assert "pip install 'rackserve[serve,gpu]'" in result.stderr  # printed as plain text
    assert "Traceback" not in result.stderr


def test_bootstrap_without_ansible_names_the_extra(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text("all: {}\n")
    result = without("ansible_runner", "bootstrap", "-i", str(inventory))
    assert result.returncode == 2, result.stderr
    assert "pip install 'rackserve[bootstrap]'" in result.stderr
    assert "pip install -e '.[bootstrap]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_extra_vars_files_go_through_the_same_boundary(tmp_path: Path) -> None:
    from deployer.bootstrap.runner import parse_extravars  # noqa: PLC0415 - no ansible needed

    bad = tmp_path / "vars.yml"
    bad.write_bytes(b"a: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse_extravars([f"@{bad}"])
    with pytest.raises(ConfigError, match="duplicate key"):
        parse_extravars(["x={a: 1, a: 2}"])
    assert parse_extravars(["n=3", "s=x y", "e="]).values == {"n": 3, "s": "x y", "e": ""}
    assert json.loads(json.dumps(parse_extravars(["l=[1, 2]"]).values)) == {"l": [1, 2]}
