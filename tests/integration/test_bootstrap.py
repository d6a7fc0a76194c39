"""`rackserve bootstrap` runs the real playbooks through ansible-runner (here on localhost).

The preflight play is the first thing site.yml does; fed a broken inventory it must stop the run
before any change, and bootstrap must name the host and the task. Converging real hosts is
tested on the rack-in-a-box (tests/rack).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from deployer.bootstrap.runner import parse_extravars, run_playbook
from deployer.errors import ConfigError

pytestmark = pytest.mark.integration

pytest.importorskip("ansible_runner", reason="ansible-runner is not installed ('.[bootstrap]')")

TWO_HEADS = """
all:
  hosts:
    node-a: {ansible_connection: local, ansible_python_interpreter: "%(python)s"}
    node-b: {ansible_connection: local, ansible_python_interpreter: "%(python)s"}
  children:
    ray_head: {hosts: {node-a: {}, node-b: {}}}
    ray_workers: {hosts: {}}
    gpu_nodes: {hosts: {}}
"""


@pytest.fixture
def two_heads(tmp_path: Path) -> Path:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(TWO_HEADS % {"python": sys.executable})
    return inventory


def test_preflight_failure_names_host_and_task_and_stops_the_run(two_heads: Path) -> None:
    console = Console(record=True, width=200)
    result = run_playbook(two_heads, "site", console=console)
    assert not result.ok
    (failure,) = result.failures
    assert failure.task == "Inventory | Check the Ray groups"
    assert "exactly one host in ray_head (found 2: node-a, node-b)" in failure.message
    output = console.export_text()
    assert "PLAY Preflight" in output
    assert "NVIDIA driver" not in output, "nothing after preflight may run"
    assert result.stats[failure.host]["failures"] == 1


def test_cli_exits_1_on_a_failed_run_and_2_on_bad_input(two_heads: Path, tmp_path: Path) -> None:
    failed = subprocess.run(
        [sys.executable, "-m", "deployer", "bootstrap", "-i", str(two_heads)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 1
    assert "task 'Inventory | Check the Ray groups'" in failed.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "deployer", "bootstrap", "-i", str(tmp_path / "nope.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2
    assert "inventory" in missing.stderr
    assert "is not a file" in missing.stderr


def test_extra_vars_are_typed_and_files_are_read(tmp_path: Path) -> None:
    extra = tmp_path / "vars.yml"
    extra.write_text("deploy_models_enabled: false\nray_head_port: 6380\n")
    assert parse_extravars(["a=1", "b=true", "c=x y", f"@{extra}"]).values == {
        "a": 1,
        "b": True,
        "c": "x y",
        "deploy_models_enabled": False,
        "ray_head_port": 6380,
    }
    with pytest.raises(ConfigError, match="expected KEY=VALUE or @FILE"):
        parse_extravars(["novalue"])


# ---------------------------------------------------------------- inventories it cannot read


def rackserve_bootstrap(
    *args: str, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    """`rackserve bootstrap ARGS` in a session of its own: no terminal, so `getpass` reads stdin."""
    return subprocess.run(
        [sys.executable, "-m", "deployer", "bootstrap", *args],
        input=stdin, capture_output=True, text=True, check=False, start_new_session=True,
        env={**os.environ, **env},
    )  # fmt: skip


def vault(password_file: Path, *args: str) -> str:
    """Ansible's own `ansible-vault ARGS` (encrypt_string prints the value on stdout)."""
    binary = Path(sys.executable).with_name("ansible-vault")
    return subprocess.run(
        [str(binary), *args, "--vault-password-file", str(password_file)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


@pytest.fixture
def vaulted(tmp_path: Path) -> tuple[Path, Path]:
    """Two heads (the preflight refuses them) whose first host's Python is a vault value; and
    the vault's password file. Ansible needs that value before the first task: a run that gets
    to the preflight's verdict has decrypted it."""
    password = tmp_path / "vault-pass"
    password.write_text("correct horse\n")
    encrypted = vault(password, "encrypt_string", sys.executable)
    assert encrypted.startswith("!vault |"), encrypted
    block = "\n".join("        " + line.strip() for line in encrypted.splitlines()[1:])
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        TWO_HEADS.replace(
            'node-a: {ansible_connection: local, ansible_python_interpreter: "%(python)s"}',
            f"node-a:\n      ansible_connection: local\n      ansible_python_interpreter: "
            f"!vault |\n{block}",
        )
        % {"python": sys.executable}
    )
    return inventory, password


GROUPS_REFUSED = "task 'Inventory | Check the Ray groups'"


def test_vault_values_are_decrypted_with_each_way_ansible_takes_the_password(
    vaulted: tuple[Path, Path], tmp_path: Path
) -> None:
    inventory, password = vaulted
    for given in (
        rackserve_bootstrap("-i", str(inventory), "--vault-password-file", str(password)),
        rackserve_bootstrap("-i", str(inventory), ANSIBLE_VAULT_PASSWORD_FILE=str(password)),
        rackserve_bootstrap("-i", str(inventory), "--ask-vault-pass", stdin="correct horse\n"),
    ):
        assert given.returncode == 1, given.stdout + given.stderr
        assert GROUPS_REFUSED in given.stdout, given.stdout
    # A vault-encrypted -e file is decrypted by Ansible: its interpreter, which does not
    # exist, makes fact gathering fail before the preflight.
    extra = tmp_path / "secret.yml"
    extra.write_text("ansible_python_interpreter: /nonexistent/python3\n")
    vault(password, "encrypt", str(extra))
    assert extra.read_text().startswith("$ANSIBLE_VAULT;")
    applied = rackserve_bootstrap(
        "-i", str(inventory), "-e", f"@{extra}", "--vault-password-file", str(password)
    )
    assert applied.returncode == 1, applied.stdout + applied.stderr
    assert "task 'Gathering Facts'" in applied.stdout, applied.stdout
    assert GROUPS_REFUSED not in applied.stdout


def test_without_the_vault_password_the_run_stops_naming_what_is_encrypted(
    vaulted: tuple[Path, Path], tmp_path: Path
) -> None:
    inventory, password = vaulted
    hint = "give their vault password with --vault-password-file FILE or --ask-vault-pass"
    # The value is needed by its host only: the host fails, the run says how to decrypt it.
    missing = rackserve_bootstrap("-i", str(inventory))
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "node-a: task 'Gathering Facts'" in missing.stdout, missing.stdout
    assert "no vault secrets found" in missing.stdout
    assert hint in missing.stdout
    wrong = tmp_path / "wrong"
    wrong.write_text("battery staple\n")
    refused = rackserve_bootstrap("-i", str(inventory), "--vault-password-file", str(wrong))
    assert refused.returncode == 1
    assert "Decryption failed" in refused.stdout, refused.stdout
    assert hint in refused.stdout
    # A whole encrypted file (inventory or -e) is read before any play: exit 2, one message.
    plain = tmp_path / "plain.yml"
    plain.write_text(TWO_HEADS % {"python": sys.executable})
    extra = tmp_path / "secret.yml"
    extra.write_text("a: 1\n")
    vault(password, "encrypt", str(extra))
    unread = rackserve_bootstrap("-i", str(plain), "-e", f"@{extra}")
    assert unread.returncode == 2, unread.stdout + unread.stderr
    assert f"invalid -e: {extra} could not be decrypted" in unread.stderr, unread.stderr
    vault(password, "encrypt", str(inventory))
    whole = rackserve_bootstrap("-i", str(inventory))
    assert whole.returncode == 2, whole.stdout + whole.stderr
    assert f"inventory {inventory} could not be parsed: Attempting to decrypt" in whole.stderr
    assert hint in whole.stderr
    assert whole.stderr.rstrip().endswith("nothing was run")
    assert "PLAY" not in whole.stdout
    both = rackserve_bootstrap(
        "-i", str(inventory), "--ask-vault-pass", "--vault-password-file", str(password)
    )
    assert both.returncode == 2
    assert "pass one" in both.stderr, both.stderr
    absent = rackserve_bootstrap(
        "-i", str(inventory), "--vault-password-file", str(tmp_path / "nope")
    )
    assert absent.returncode == 2
    assert "is not a file" in absent.stderr, absent.stderr


def test_an_inventory_ansible_cannot_parse_stops_the_run(tmp_path: Path) -> None:
    """Where Ansible's default warns and runs every play on no hosts (exit 0): exit 2."""
    broken = tmp_path / "hosts.yml"
    broken.write_text("all:\n  hosts: [\n")
    shown = rackserve_bootstrap("-i", str(broken))
    assert shown.returncode == 2, shown.stdout + shown.stderr
    assert shown.stderr.startswith(f"error: invalid -i: inventory {broken} could not be parsed: ")
    assert f"({broken}:" in shown.stderr, shown.stderr
    assert "YAML" in shown.stderr
    assert "PLAY" not in shown.stdout
