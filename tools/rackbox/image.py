"""The hosts' base root filesystem: a Debian recipe, built once with debootstrap and cached.

The cache key is a hash of the recipe (suite, mirror, architecture, packages, files, units), so
the image is rebuilt only when the recipe changes. Bump `REVISION` when the build steps change.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tools.rackbox.errors import RackError, RackUnavailable
from tools.rackbox.system import AptSource, run, unmount_all

REVISION = 1
SUITE = "bookworm"

# A Ray node from pip wheels needs nothing more than python3 from apt, except libnuma1
# (vLLM's CPU kernels link it). python3-apt and python3-packaging serve Ansible's apt and
# pip modules; openssh-sftp-server its file transfers (debootstrap skips Recommends).
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "openssh-sftp-server",
    "python3",
    "python3-apt",
    "python3-venv",
    "python3-pip",
    "python3-packaging",
    "iproute2",
    "procps",
    "sudo",
    "ca-certificates",
    "libnuma1",
)

SSH_HOSTKEYS_UNIT = """\
[Unit]
Description=Generate this host's SSH host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""

FILES = (
    ("etc/systemd/system/rackbox-ssh-hostkeys.service", SSH_HOSTKEYS_UNIT),
    ("etc/ssh/sshd_config.d/rackbox.conf", "PasswordAuthentication no\nUseDNS no\n"),
    ("etc/resolv.conf", "# rackbox: no DNS; host names come from /etc/hosts\n"),
    ("etc/hostname", "localhost\n"),
)
ENABLE = ("systemd-networkd.service", "rackbox-ssh-hostkeys.service")
# apt's timers would take the dpkg lock under Ansible, and the hosts cannot reach a mirror.
MASK = ("apt-daily.timer", "apt-daily-upgrade.timer")


@dataclass(frozen=True)
class Recipe:
    """Everything the base image is built from; its hash names the cached image."""

    mirror: str
    architecture: str
    suite: str = SUITE
    keyring: str | None = None
    packages: tuple[str, ...] = PACKAGES
    # .debs downloaded into the image's apt cache, so `apt install` of them works offline
    prefetch: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = FILES
    enable: tuple[str, ...] = ENABLE
    mask: tuple[str, ...] = MASK
    revision: int = field(default=REVISION)

    @property
    def key(self) -> str:
        """The cache key: the first 16 hex digits of the recipe's SHA-256."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def default_recipe(
    source: AptSource, packages: Sequence[str] = (), prefetch: Sequence[str] = ()
) -> Recipe:
    """The recipe for this machine (its mirror and architecture), plus packages to install
    and .debs to prefetch beyond the defaults."""
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    keyring = source.signed_by if source.signed_by and Path(source.signed_by).is_file() else None
    return Recipe(
        mirror=source.uri,
        architecture=arch,
        keyring=keyring,
        packages=(*PACKAGES, *sorted(set(packages) - set(PACKAGES))),
        prefetch=tuple(sorted(set(prefetch))),
    )


def base_dir(cache_dir: Path, recipe: Recipe) -> Path:
    """The cached image's directory: `rootfs/` and `recipe.json` in it."""
    return cache_dir / "base" / f"{recipe.suite}-{recipe.key}"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_base(cache_dir: Path, recipe: Recipe) -> tuple[Path, float]:
    """The image's root filesystem, built first if missing; and the seconds building took."""
    final = base_dir(cache_dir, recipe)
    with locked(cache_dir / "base.lock"):
        if (final / "recipe.json").is_file():
            os.utime(final / "recipe.json")  # last used: prune_bases keeps recent images
            return final / "rootfs", 0.0
        started = time.monotonic()
        partial = final.with_name(final.name + ".partial")
        unmount_all(partial)  # debootstrap mounts /proc and /sys in the target while it runs
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _debootstrap(recipe, partial / "rootfs")
        _customize(recipe, partial / "rootfs")
        seconds = time.monotonic() - started
        meta = {"recipe": asdict(recipe), "key": recipe.key, "build_seconds": round(seconds, 1)}
        (partial / "recipe.json").write_text(json.dumps(meta, indent=2) + "\n")
        partial.rename(final)
        return final / "rootfs", seconds


def prune_bases(cache_dir: Path, keep: set[Path], unused_s: float = 86400) -> list[Path]:
    """Delete cached images unused for `unused_s`, except `keep` and the overlays' lower layers."""
    mounts = Path("/proc/self/mountinfo").read_text()
    keep = {p.resolve() for p in keep}
    removed = []
    for path in sorted((cache_dir / "base").glob("*")):
        meta = path / "recipe.json"
        recent = meta.is_file() and time.time() - meta.stat().st_mtime < unused_s
        if path.resolve() in keep or recent or f"={path / 'rootfs'}" in mounts:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _debootstrap(recipe: Recipe, root: Path) -> None:
    args = [
        "debootstrap",
        "--variant=minbase",
        f"--arch={recipe.architecture}",
        f"--include={','.join(recipe.packages)}",
    ]
    if recipe.keyring:
        args.append(f"--keyring={recipe.keyring}")
    try:
        run([*args, recipe.suite, root, recipe.mirror], timeout=1800)
    except RackError as exc:
        raise RackUnavailable(f"cannot build the base image from {recipe.mirror}: {exc}") from exc


def _customize(recipe: Recipe, root: Path) -> None:
    """Units, files, apt cache; then strip what each host must make its own."""
    run(["chroot", root, "apt-get", "clean"])
    if recipe.prefetch:
        run(["chroot", root, "apt-get", "install", "--download-only", "-y", *recipe.prefetch])
    for relative, content in recipe.files:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # resolv.conf may be a link out of the image
        path.write_text(content)
    run(["chroot", root, "systemctl", "enable", *recipe.enable])
    run(["chroot", root, "systemctl", "mask", *recipe.mask])
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    # An empty machine-id: each host's systemd makes its own at first boot. dbus keeps a copy
    # that systemd would reuse, so every host would get the same id: make it a link instead.
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    dbus_id.unlink(missing_ok=True)
    dbus_id.parent.mkdir(parents=True, exist_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
