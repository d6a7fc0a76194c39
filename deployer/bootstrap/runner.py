"""`rackserve bootstrap`: run the rack's playbooks through ansible-runner, with live progress.

The playbooks and roles (playbooks/, roles/, ansible.cfg) ship in the wheel; this module finds
them (`content_root`), runs `playbooks/<name>.yml` against an inventory, follows
ansible-runner's events to show the hosts, the current task and ok/changed/failed counts as
they happen, prints what `debug` tasks say (the deploy plan), and ends with a per-host summary.
Failures name the host and the task.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deployer.config.documents import DocumentError, decode_utf8, parse_yaml, read_bytes
from deployer.errors import ConfigError, MissingExtraError, RackserveError

PLAYBOOKS = ("site", "reset", "scale", "remove-node", "upgrade")
BOOTSTRAP_HINT = (
    "install the bootstrap extra: pip install 'rackserve[bootstrap]' "
    "(from a checkout: pip install -e '.[bootstrap]')"
)
_STATS = ("ok", "changed", "failures", "unreachable", "skipped")


class BootstrapError(RackserveError):
    """The playbook could not be run at all (ansible missing, runner failure)."""


@dataclasses.dataclass(frozen=True)
class Failure:
    """A task that failed on a host (or a host that could not be reached)."""

    host: str
    task: str
    message: str


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """What a playbook run did, per host."""

    playbook: str
    stats: Mapping[str, Mapping[str, int]]
    failures: Sequence[Failure]
    elapsed_s: float
    status: str

    @property
    def ok(self) -> bool:
        """No host failed or was unreachable, and the run completed."""
        return self.status == "successful" and not self.failures

    def changed(self) -> dict[str, int]:
        """Changed tasks per host."""
        return {host: counts.get("changed", 0) for host, counts in self.stats.items()}


def content_root() -> Path:
    """Where site.yml, playbooks/, roles/ and ansible.cfg are.

    In a checkout, next to the package (so edits to the roles take effect at once); in an
    installed wheel, `<prefix>/share/rackserve`, where the wheel puts them (setup.py).
    """
    checkout = Path(__file__).resolve().parents[2]
    installed = Path(sysconfig.get_path("data")) / "share" / "rackserve"
    for root in (checkout, installed):
        if (root / "playbooks" / "site.yml").is_file():
            return root
    raise BootstrapError(
        f"the playbooks are neither next to the package ({checkout}) nor in {installed}: "
        "reinstall rackserve from its wheel, or run from a checkout (pip install -e .)"
    )


VAULT_HEADER = "$ANSIBLE_VAULT;"
VAULT_FAILURE = "vault secrets"
"""In Ansible's message when a vault value cannot be decrypted (no password, or a wrong one)."""
VAULT_HINT = (
    "the inventory or an -e file holds vault-encrypted values: give their vault password with "
    "--vault-password-file FILE or --ask-vault-pass, or set ANSIBLE_VAULT_PASSWORD_FILE"
)


@dataclasses.dataclass(frozen=True)
class ExtraVars:
    """`-e` values: those read here, and vault-encrypted files that Ansible decrypts itself."""

    values: dict[str, Any]
    vault_files: tuple[Path, ...] = ()


def parse_extravars(pairs: Sequence[str]) -> ExtraVars:
    """`-e KEY=VALUE` pairs (values read as YAML, so 'true' and '3' are typed) or `-e @FILE`.

    A vault-encrypted file is only checked to be readable here; Ansible decrypts it.
    """
    values: dict[str, Any] = {}
    vault_files: list[Path] = []
    for pair in pairs:
        if pair.startswith("@"):
            path = Path(pair[1:])
            try:
                text = decode_utf8(read_bytes(path))
                if text.lstrip().startswith(VAULT_HEADER):
                    vault_files.append(path.resolve())
                    continue
                loaded = parse_yaml(text)
            except DocumentError as exc:
                raise ConfigError(f"extra vars file {path}: {exc}", source="-e") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path} must hold a mapping of variables", source="-e")
            values.update(loaded)
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected KEY=VALUE or @FILE, got {pair!r}", source="-e")
        try:
            values[key.strip()] = parse_yaml(value) if value.strip() else ""
        except DocumentError as exc:
            raise ConfigError(f"{key.strip()}: {exc}", source="-e") from None
    return ExtraVars(values, tuple(vault_files))


def unparsed_inventory(inventory: Path, output: str) -> ConfigError | None:
    """The error for an inventory Ansible could not parse (made fatal by `run_playbook`).

    Ansible tries each inventory plugin in turn and prints each one's reason and origin: a
    vault reason wins (its origin is the encrypted file, perhaps an -e file), then the first
    other one except the `auto` plugin's complaint that a plain YAML inventory is not a plugin
    config. None when the output is not about the inventory.
    """
    if "No inventory was parsed" not in output:
        return None
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    reasons = [
        (lines[at + 1], lines[at + 2].removeprefix("Origin:").strip())
        for at, line in enumerate(lines[:-2])
        if line == "<<< caused by >>>" and lines[at + 2].startswith("Origin:")
    ]
    useful = [r for r in reasons if "no root 'plugin' key found" not in r[0]] or reasons
    vault = [r for r in useful if "vault" in r[0].lower()]
    reason, origin = (vault or useful or [("see ansible-playbook's output", "")])[0]
    reason = reason.rstrip(".")
    own = str(inventory.resolve())
    if vault and own not in origin:
        return ConfigError(
            f"{origin} could not be decrypted: {reason}; {VAULT_HINT}; nothing was run",
            source="-e",
        )
    where = f" ({origin})" if origin.startswith(own) else ""
    hint = f"; {VAULT_HINT}" if vault else ""
    return ConfigError(
        f"inventory {inventory} could not be parsed: {reason}{where}{hint}; nothing was run",
        source="-i",
    )


class _Progress:
    """Follows ansible-runner events: counts per host, the current task, failures, debug output."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(_STATS, 0))
        self.failures: list[Failure] = []
        self.task = ""
        self.task_uuid: object = None
        self.play = ""

    def __call__(self, event: Mapping[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data", {})
        if kind == "playbook_on_play_start":
            self.play = str(data.get("play", ""))
            self.console.print(f"[bold]PLAY[/] {escape(self.play)}", highlight=False)
        elif kind == "playbook_on_task_start":
            # A task that ends hosts (meta: end_host) starts once per host: show it once.
            if data.get("task_uuid") and data.get("task_uuid") == self.task_uuid:
                return True
            self.task, self.task_uuid = str(data.get("task", "")), data.get("task_uuid")
            self.console.print(
                f"  [dim]{escape(self._line())}[/] {escape(self.task)}", highlight=False
            )
        elif kind.startswith("runner_on_") and "host" in data:
            self._host_event(kind, data)
        return True

    def _line(self) -> str:
        total = dict.fromkeys(_STATS, 0)
        for counts in self.counts.values():
            for key in _STATS:
                total[key] += counts[key]
        return (
            f"[{len(self.counts)} hosts ok={total['ok']} changed={total['changed']} "
            f"failed={total['failures'] + total['unreachable']}]"
        )

    def _host_event(self, kind: str, data: Mapping[str, Any]) -> None:
        host = str(data["host"])
        result = data.get("res") or {}
        counts = self.counts[host]
        if kind == "runner_on_ok":
            counts["ok"] += 1
            if result.get("changed"):
                counts["changed"] += 1
            if data.get("task_action") in {"debug", "ansible.builtin.debug"} and "msg" in result:
                self._show_debug(host, result["msg"])
        elif kind == "runner_on_skipped":
            counts["skipped"] += 1
        elif kind == "runner_on_failed" and not data.get("ignore_errors"):
            counts["failures"] += 1
            self._fail(host, result)
        elif kind == "runner_on_unreachable":
            counts["unreachable"] += 1
            self._fail(host, result)

    def _show_debug(self, host: str, message: object) -> None:
        lines = message if isinstance(message, list) else str(message).splitlines()
        for line in lines:
            self.console.print(f"    {host} | {escape(str(line))}", highlight=False, soft_wrap=True)

    def _fail(self, host: str, result: Mapping[str, Any]) -> None:
        message = str(result.get("msg") or result.get("stderr") or result.get("stdout") or "")
        failure = Failure(host, self.task, message.strip().splitlines()[0] if message else "")
        self.failures.append(failure)
        self.console.print(
            f"    [bold red]FAILED[/] {host} | {escape(self.task)}: {escape(failure.message)}",
            highlight=False,
            soft_wrap=True,
        )


def summary_table(result: BootstrapResult) -> Table:
    """Per host: ok, changed, failed, unreachable, skipped."""
    table = Table(title=f"{result.playbook}.yml in {result.elapsed_s:.0f} s", title_justify="left")
    table.add_column("host")
    for key in _STATS:
        table.add_column(key, justify="right")
    for host in sorted(result.stats):
        counts = result.stats[host]
        table.add_row(host, *(str(counts.get(key, 0)) for key in _STATS))
    return table


def _stats_from_runner(stats: Mapping[str, Mapping[str, int]] | None) -> dict[str, dict[str, int]]:
    """ansible-runner's recap (keys ok, changed, failures, dark, skipped) per host."""
    per_host: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(_STATS, 0))
    names = {"dark": "unreachable"}
    for key, hosts in (stats or {}).items():
        name = names.get(key, key)
        if name in _STATS:
            for host, count in hosts.items():
                per_host[host][name] = int(count)
    return dict(per_host)


def run_playbook(
    inventory: Path,
    playbook: str = "site",
    extravars: Mapping[str, Any] | None = None,
    limit: str | None = None,
    check: bool = False,
    console: Console | None = None,
    *,
    tags: str | None = None,
    skip_tags: str | None = None,
    syntax_check: bool = False,
    vault_files: Sequence[Path] = (),
    vault_password_file: Path | None = None,
    vault_password: str | None = None,
) -> BootstrapResult:
    """Run playbooks/<playbook>.yml against the inventory, showing progress on `console`.

    `tags` / `skip_tags` (comma-separated) are ansible-playbook's: the roles' steps.
    `syntax_check` only parses the playbook and its roles (ansible-playbook --syntax-check).
    `vault_files` are vault-encrypted extra vars files; `vault_password_file` or
    `vault_password` (answered to `--ask-vault-pass`) decrypt them and the inventory's vault
    values. Ansible's own ANSIBLE_VAULT_PASSWORD_FILE works too: the environment is passed on.
    """
    if playbook not in PLAYBOOKS:
        raise ConfigError(f"unknown playbook {playbook!r} (choose from {', '.join(PLAYBOOKS)})")
    if not inventory.is_file():
        raise ConfigError(f"inventory {inventory} is not a file", source="-i")
    if vault_password_file is not None and not vault_password_file.is_file():
        raise ConfigError(
            f"vault password file {vault_password_file} is not a file",
            source="--vault-password-file",
        )
    try:
        import ansible_runner  # noqa: PLC0415 - the bootstrap extra
    except ImportError:
        raise MissingExtraError(f"ansible-runner is not installed: {BOOTSTRAP_HINT}") from None
    root = content_root()
    beside = Path(sys.executable).with_name("ansible-playbook")  # a venv not on PATH
    binary = str(beside) if beside.exists() else shutil.which("ansible-playbook")
    if binary is None:
        raise MissingExtraError(f"ansible-playbook is not installed: {BOOTSTRAP_HINT}")
    console = console or Console()
    progress = _Progress(console)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rackserve-runner-") as private:
        runner = ansible_runner.run(
            private_data_dir=private,
            project_dir=str(root),
            playbook=str(root / "playbooks" / f"{playbook}.yml"),
            inventory=str(inventory.resolve()),
            extravars=dict(extravars or {}),
            limit=limit,
            tags=tags,
            skip_tags=skip_tags,
            cmdline=_cmdline(
                check, syntax_check, vault_files, vault_password_file, vault_password is not None
            ),
            passwords={VAULT_PROMPT: vault_password} if vault_password is not None else None,
            envvars={
                "ANSIBLE_CONFIG": str(root / "ansible.cfg"),
                # An inventory that cannot be parsed stops the run (Ansible's default is to
                # warn and run every play on no hosts, exit 0); not in ansible.cfg, which
                # `ansible-playbook --syntax-check` (ansible-lint's) reads with no inventory.
                "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true",
                "ANSIBLE_NOCOLOR": "1",
                "PATH": os.pathsep.join([str(Path(binary).parent), os.environ.get("PATH", "")]),
            },
            event_handler=progress,
            quiet=True,
            suppress_env_files=True,
        )
        status = str(runner.status)
        stats = _stats_from_runner(runner.stats)
        if status != "successful" and not progress.failures and not stats:
            output = runner.stdout.read() if runner.stdout else ""
            unparsed = unparsed_inventory(inventory, output)
            if unparsed is not None:
                raise unparsed
            hint = f"\n({VAULT_HINT})" if VAULT_FAILURE in output else ""
            raise BootstrapError(
                f"ansible-playbook did not run ({status}):\n{output[-2000:]}{hint}"
            )
    result = BootstrapResult(
        playbook=playbook,
        stats=stats or {h: dict(c) for h, c in progress.counts.items()},
        failures=tuple(progress.failures),
        elapsed_s=time.monotonic() - started,
        status=status,
    )
    if syntax_check:
        console.print(f"syntax OK: playbooks/{playbook}.yml and its roles", highlight=False)
        return result
    console.print(summary_table(result))
    for failure in result.failures:
        console.print(
            f"[bold red]failed:[/] {failure.host}: task '{escape(failure.task)}': "
            f"{escape(failure.message)}",
            highlight=False,
            soft_wrap=True,
        )
    if any(VAULT_FAILURE in failure.message for failure in result.failures):
        console.print(f"hint: {VAULT_HINT}", highlight=False, soft_wrap=True)
    return result


VAULT_PROMPT = r"^Vault password:\s*?$"
"""ansible-playbook's `--ask-vault-pass` prompt, answered by ansible-runner (pexpect)."""


def _cmdline(
    check: bool,
    syntax_check: bool,
    vault_files: Sequence[Path],
    vault_password_file: Path | None,
    ask_vault_pass: bool,
) -> str | None:
    """ansible-playbook options that ansible-runner has no argument for, quoted."""
    args = [flag for flag, on in (("--check", check), ("--syntax-check", syntax_check)) if on]
    for path in vault_files:
        args += ["--extra-vars", f"@{path}"]
    if vault_password_file is not None:
        args += ["--vault-password-file", str(vault_password_file.resolve())]
    if ask_vault_pass:
        args.append("--ask-vault-pass")
    return shlex.join(args) or None
