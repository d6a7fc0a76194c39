"""The rack-in-a-box itself: hosts, network, SSH, Ansible reach, and a clean teardown."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.rack.conftest import skip_or_fail
from tools.rackbox import WHEELHOUSE_MOUNT, Rack, RackSpec, RackUnavailable, rack_status
from tools.rackbox.cgroup import host_cgroups
from tools.rackbox.errors import RackError
from tools.rackbox.image import Recipe, prune_bases
from tools.rackbox.inventory import inventory_data
from tools.rackbox.nspawn import host_files
from tools.rackbox.spec import cgroup_name
from tools.rackbox.system import debian_mirror, parse_deb822_sources, parse_one_line_sources

# ---------------------------------------------------------------- pure parts (no root needed)


@pytest.mark.unit
def test_spec_names_and_addresses() -> None:
    spec = RackSpec(3, "rb", "10.231.0.0/24", Path("/c"))
    assert [(h.name, h.ip, h.role) for h in spec.host_specs] == [
        ("rb-head", "10.231.0.21", "head"),
        ("rb-worker-1", "10.231.0.22", "worker"),
        ("rb-worker-2", "10.231.0.23", "worker"),
    ]
    assert spec.bridge == "rbbr0"
    assert spec.bridge_interface == "10.231.0.1/24"
    assert spec.rack_dir == Path("/c/racks/rb")
    assert spec.wheelhouse_dir == Path("/c/racks/rb/wheelhouse")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("prefix", "hosts", "network"),
    [("Rb", 3, "10.0.0.0/24"), ("r-b", 3, "10.0.0.0/24"), ("rb", 0, "10.0.0.0/24"),
     ("rb", 3, "10.0.0.0/25")],
)  # fmt: skip
def test_spec_rejects_bad_settings(prefix: str, hosts: int, network: str) -> None:
    with pytest.raises(ValueError, match=r"prefix|hosts|network"):
        RackSpec(hosts, prefix, network, Path("/c"))


@pytest.mark.unit
def test_mirror_from_deb822_and_one_line_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RACKSERVE_DEBIAN_MIRROR", raising=False)
    deb822 = (
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n"
    )
    one_line = (
        "# deb http://old.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://list.example/debian bookworm main contrib\n"
    )
    security, *_ = parse_deb822_sources(deb822)[1:]
    assert security.suites == ("bookworm-security",)
    found = debian_mirror("bookworm", [security, *parse_deb822_sources(deb822)])
    assert found.uri == "http://mirror.example/debian"
    assert found.signed_by == "/usr/share/keyrings/debian-archive-keyring.gpg"
    (listed,) = parse_one_line_sources(one_line)
    assert (listed.uri, listed.suites, listed.components, listed.signed_by) == (
        "http://list.example/debian", ("bookworm",), ("main", "contrib"), "/k.gpg"
    )  # fmt: skip
    with pytest.raises(RackUnavailable, match="RACKSERVE_DEBIAN_MIRROR"):
        debian_mirror("trixie", [listed])
    monkeypatch.setenv("RACKSERVE_DEBIAN_MIRROR", "http://override.example/debian")
    assert debian_mirror("trixie", []).uri == "http://override.example/debian"


@pytest.mark.unit
def test_recipe_key_follows_the_recipe() -> None:
    recipe = Recipe(mirror="http://m/debian", architecture="amd64")
    assert recipe.key == Recipe(mirror="http://m/debian", architecture="amd64").key
    assert recipe.key != Recipe(mirror="http://other/debian", architecture="amd64").key
    more = Recipe(mirror="http://m/debian", architecture="amd64", packages=("curl",))
    assert recipe.key != more.key


@pytest.mark.unit
def test_inventory_groups_and_host_vars() -> None:
    hosts = RackSpec(3, "rb", "10.231.0.0/24", Path("/c")).host_specs
    data = inventory_data(hosts, Path("/c/ssh/id_ed25519"), {"extra": 1})["all"]
    assert data["vars"]["extra"] == 1
    assert list(data["children"]["ray_head"]["hosts"]) == ["rb-head"]
    assert list(data["children"]["ray_workers"]["hosts"]) == ["rb-worker-1", "rb-worker-2"]
    assert list(data["children"]["gpu_nodes"]["hosts"]) == ["rb-head", "rb-worker-1", "rb-worker-2"]
    assert data["hosts"]["rb-worker-1"] == {
        "ansible_host": "10.231.0.22",
        "ansible_user": "root",
        "ansible_ssh_private_key_file": "/c/ssh/id_ed25519",
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        "rackserve_node_ip": "10.231.0.22",
    }


# ---------------------------------------------------------------- the booted rack


def _on_all(rack: Rack, command: str) -> dict[str, str]:
    return {host.name: rack.ssh(host, command).stdout.strip() for host in rack.hosts}


def test_hosts_have_their_own_name_address_and_machine_id(rack: Rack) -> None:
    names = _on_all(rack, "hostname")
    assert names == {host.name: host.name for host in rack.hosts}
    addresses = _on_all(rack, "ip -json -4 addr show dev host0")
    for host in rack.hosts:
        (link,) = json.loads(addresses[host.name])
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]] == [(host.ip, 24)]
    machine_ids = _on_all(rack, "cat /etc/machine-id").values()
    assert len(set(machine_ids)) == len(rack.hosts)
    assert all(len(mid) == 32 for mid in machine_ids)
    host_keys = _on_all(rack, "cat /etc/ssh/ssh_host_ed25519_key.pub").values()
    assert len(set(host_keys)) == len(rack.hosts)


def test_systemd_is_pid_1_and_the_system_runs(rack: Rack) -> None:
    assert set(_on_all(rack, "cat /proc/1/comm").values()) == {"systemd"}
    states = _on_all(rack, "systemctl is-system-running --wait || true")
    assert set(states.values()) <= {"running", "degraded"}, states


def test_each_host_has_its_own_cgroup_so_units_stop_cleanly(rack: Rack) -> None:
    for host in rack.hosts:
        assert all(path.is_dir() for path in host_cgroups(host.name))
        script = (
            "systemd-run --quiet --unit=rackbox-probe sleep 600 && "
            "systemctl stop rackbox-probe && ! systemctl is-failed --quiet rackbox-probe"
        )
        rack.ssh(host, script, timeout=30)


def test_a_power_cut_kills_everything_at_once_and_the_disk_boots_again(rack: Rack) -> None:
    """`power_cut` leaves no process of the host and no SSH; `power_on` boots the same disk:
    a file synced before the cut is there, read by a new systemd (PID 1 started later)."""
    worker = rack.hosts[-1]
    started = "cut -d' ' -f22 /proc/1/stat"  # clock ticks since the machine booted
    before = rack.ssh(worker, f"echo kept > /root/cut-probe && sync && {started}").stdout
    rack.power_cut(worker)
    assert all(not path.exists() for path in host_cgroups(worker.name))
    assert rack.ssh(worker, "true", check=False, timeout=15).returncode == 255
    with pytest.raises(RackError, match="not running"):
        rack.power_cut(worker)
    rack.power_on(worker)
    after = rack.ssh(worker, f"cat /root/cut-probe && rm /root/cut-probe && {started}").stdout
    assert after.split()[0] == "kept"
    assert int(after.split()[1]) > int(before)
    assert rack.ssh(worker, "systemctl is-system-running --wait || true").stdout.strip() in (
        "running",
        "degraded",
    )
    with pytest.raises(RackError, match="already running"):
        rack.power_on(worker)


def test_ssh_logs_in_as_root_with_the_key_only(rack: Rack) -> None:
    assert set(_on_all(rack, "id -un").values()) == {"root"}
    head = rack.hosts[0]
    password_try = subprocess.run(
        ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "BatchMode=yes", "-o", "PubkeyAuthentication=no", "-o", "ConnectTimeout=5",
         f"root@{head.ip}", "true"],
        capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert password_try.returncode == 255


def test_hosts_reach_each_other_by_name_over_the_bridge(rack: Rack) -> None:
    names = " ".join(host.name for host in rack.hosts)
    probe = (
        "import socket, sys\n"
        "for name in sys.argv[1:]:\n"
        "    socket.create_connection((name, 22), timeout=3).close()\n"
        "    print(name, socket.gethostbyname(name))\n"
    )
    for host in rack.hosts:
        out = rack.ssh(host, f"python3 -c '{probe}' {names}").stdout.split()
        assert out == [w for h in rack.hosts for w in (h.name, h.ip)]


def test_no_route_out_of_the_hosts(rack: Rack) -> None:
    """Checked in the routing table: no packet is sent anywhere."""
    for host in rack.hosts:
        for family in ("-4", "-6"):
            routes = json.loads(rack.ssh(host, f"ip -json {family} route show").stdout)
            assert [r for r in routes if r["dst"] == "default"] == []
        lookup = rack.ssh(host, "ip route get 198.51.100.7", check=False)
        assert lookup.returncode != 0
        assert "unreachable" in lookup.stderr


def test_wheelhouse_is_mounted_read_only(rack: Rack) -> None:
    outside = sorted(p.name for p in rack.spec.wheelhouse_dir.iterdir())
    for host in rack.hosts:
        mount = json.loads(rack.ssh(host, f"findmnt --json {WHEELHOUSE_MOUNT}").stdout)
        (fs,) = mount["filesystems"]
        assert "ro" in fs["options"].split(",")
        listing = rack.ssh(host, f"ls -A {WHEELHOUSE_MOUNT}").stdout.split()
        assert sorted(listing) == outside
        write = rack.ssh(host, f"touch {WHEELHOUSE_MOUNT}/x", check=False)
        assert "Read-only file system" in write.stderr


def test_what_ansible_and_ray_need_is_installed(rack: Rack) -> None:
    for host in rack.hosts:
        rack.ssh(host, "python3 -c 'import apt, packaging, venv' && python3 -m pip --version")
        rack.ssh(host, "ldconfig -p | grep -q libnuma.so.1 && test -x /usr/lib/openssh/sftp-server")


def _ansible(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"`{name}` is not installed (pip install ansible-core)")
    return found


def test_inventory_groups_and_ansible_ping(rack: Rack) -> None:
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_DEPRECATION_WARNINGS": "0"}
    listed = subprocess.run(
        [_ansible("ansible-inventory"), "-i", str(rack.inventory), "--list"],
        capture_output=True, text=True, check=True, env=env, timeout=120,
    )  # fmt: skip
    groups = json.loads(listed.stdout)
    names = [host.name for host in rack.hosts]
    assert groups["ray_head"]["hosts"] == names[:1]
    assert groups["ray_workers"]["hosts"] == names[1:]
    assert groups["gpu_nodes"]["hosts"] == names
    assert (
        yaml.safe_load(rack.inventory.read_text())["all"]["hosts"][names[1]]["rackserve_node_ip"]
        == rack.hosts[1].ip
    )
    ping = subprocess.run(
        [_ansible("ansible"), "-i", str(rack.inventory), "all", "-m", "ansible.builtin.ping"],
        capture_output=True, text=True, check=False, env=env, timeout=300,
    )  # fmt: skip
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert ping.stdout.count("SUCCESS") == len(names)


# ---------------------------------------------------------------- teardown


def _nspawn_processes(prefix: str) -> list[int]:
    """Live (not zombie) systemd-nspawn processes of the rack's hosts."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and any(a.startswith(f"--machine={prefix}-".encode()) for a in cmdline):
            found.append(int(proc.name))
    return found


def _assert_nothing_left(rack: Rack) -> None:
    prefix = rack.spec.prefix
    assert _nspawn_processes(prefix) == []
    status = rack_status(rack.spec.cache_dir, prefix)
    assert not status.leftovers, status
    assert not Path("/sys/class/net", rack.spec.bridge).exists()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(rack.spec.rack_dir) not in mounts
    for host in rack.hosts:
        for tree in ("unified", "systemd", ""):
            assert not Path("/sys/fs/cgroup", tree, cgroup_name(host.name)).exists()
        assert not Path("/run/systemd/nspawn/propagate", host.name).exists()
    assert not rack.inventory.exists()


@pytest.fixture
def small_rack() -> Iterator[Rack]:
    """A 1-host rack apart from the session's, for teardown tests; downed whatever happens."""
    rack = Rack(1, prefix="rbd", network="10.231.2.0/24", replace=True)
    yield rack
    with contextlib.suppress(RackUnavailable):  # not root: nothing was booted
        rack.down()


@pytest.mark.integration
def test_teardown_leaves_nothing_and_runs_twice(small_rack: Rack) -> None:
    try:
        with small_rack as rack:
            assert rack.ssh(rack.hosts[0], "hostname").stdout.strip() == "rbd-head"
    except RackUnavailable as exc:
        skip_or_fail(str(exc))
    _assert_nothing_left(small_rack)
    small_rack.down()
    _assert_nothing_left(small_rack)


@pytest.mark.integration
@pytest.mark.parametrize("lose_state_file", [False, True])
def test_down_from_another_process_after_up_keep(small_rack: Rack, lose_state_file: bool) -> None:
    """`up --keep` in one process, `down` in this one: from the state file, or without it."""
    spec = small_rack.spec
    argv = ["up", "--keep", "--hosts", "1", "--name-prefix", spec.prefix,
            "--network", spec.network, "--cache-dir", str(spec.cache_dir)]  # fmt: skip
    up = subprocess.run(
        [sys.executable, "-m", "tools.rackbox", *argv],
        capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    if up.returncode == 4:  # this machine cannot run a rack
        skip_or_fail(up.stderr)
    assert up.returncode == 0, up.stdout + up.stderr
    assert rack_status(spec.cache_dir, spec.prefix).up
    assert _nspawn_processes(spec.prefix)
    if lose_state_file:
        (spec.rack_dir / "state.json").unlink()
    small_rack.down()
    _assert_nothing_left(small_rack)


@pytest.mark.unit
def test_host_files_make_a_copy_of_the_image_this_host() -> None:
    hosts = RackSpec(2, "rb", "10.231.0.0/24", Path("/c")).host_specs
    files = host_files(hosts[1], hosts, "ssh-ed25519 AAAA rackbox\n")
    assert files["etc/hostname"] == "rb-worker-1\n"
    assert "10.231.0.21\trb-head\n10.231.0.22\trb-worker-1\n" in files["etc/hosts"]
    network = files["etc/systemd/network/80-container-host0.network"]
    assert "Address=10.231.0.22/24" in network
    assert "Gateway" not in network  # no route out
    assert files["root/.ssh/authorized_keys"] == "ssh-ed25519 AAAA rackbox\n"


@pytest.mark.unit
def test_prune_keeps_images_in_use_or_used_lately(tmp_path: Path) -> None:
    for name in ("bookworm-old", "bookworm-used", "bookworm-new"):
        (tmp_path / "base" / name / "rootfs").mkdir(parents=True)
        (tmp_path / "base" / name / "recipe.json").write_text("{}")
    os.utime(tmp_path / "base" / "bookworm-old" / "recipe.json", (0, 0))
    os.utime(tmp_path / "base" / "bookworm-used" / "recipe.json", (0, 0))
    keep = {tmp_path / "base" / "bookworm-used"}  # a rack runs on it
    assert prune_bases(tmp_path, keep) == [tmp_path / "base" / "bookworm-old"]
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == [
        "bookworm-new",
        "bookworm-used",
    ]
