"""Side effects on the outer machine: commands, root, host packages, the apt mirror."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.rackbox.errors import RackError, RackUnavailable

HOST_PACKAGES = ("systemd-container", "debootstrap", "openssh-client", "iproute2")
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
APT_LOCK_TIMEOUT_S = 600  # another apt on this machine: wait for it rather than fail
_DEB_LINE = re.compile(
    r"^deb\s+(?:\[(?P<options>[^\]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>\S+)(?P<components>.*)$"
)


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    timeout: float | None = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; a failure raises RackError with the output's tail."""
    argv = [os.fspath(a) for a in args]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired as exc:
        raise RackError(f"`{' '.join(argv)}` ran past {timeout} s") from exc
    if check and done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RackError(f"`{' '.join(argv)}` exited {done.returncode}:\n{tail}")
    return done


def require_root() -> None:
    """Raise RackUnavailable unless this process is root."""
    if os.geteuid() != 0:
        raise RackUnavailable("the rack-in-a-box needs root (nspawn, bridges, overlay mounts)")


def missing_packages(packages: Iterable[str]) -> list[str]:
    """The packages of `packages` that dpkg does not list as installed."""
    missing = []
    for package in packages:
        done = run(["dpkg-query", "-W", "-f=${Status}", package], check=False)
        if done.returncode != 0 or not done.stdout.endswith(" installed"):
            missing.append(package)
    return missing


def ensure_host_packages(packages: Sequence[str] = HOST_PACKAGES) -> list[str]:
    """Install the outer machine's packages the harness needs; return those it installed."""
    missing = missing_packages(packages)
    if not missing:
        return []
    install = ["apt-get", f"-oDPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}", "install", "-y", *missing]
    if run(install, check=False, env=APT_ENV).returncode != 0:
        run(["apt-get", f"-oDPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}", "update"], env=APT_ENV)
        try:
            run(install, env=APT_ENV)
        except RackError as exc:
            raise RackUnavailable(f"cannot install {', '.join(missing)}: {exc}") from exc
    return missing


@dataclass(frozen=True)
class AptSource:
    """One `deb` source: a mirror URI, its suites and components, and its keyring if given."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None


def parse_one_line_sources(text: str) -> list[AptSource]:
    """The `deb` lines of a sources.list file (`deb [opts] URI SUITE COMPONENT...`)."""
    sources = []
    for line in text.splitlines():
        match = _DEB_LINE.match(line.split("#", 1)[0].strip())
        if match is None:
            continue
        options = dict(
            word.partition("=")[::2] for word in (match["options"] or "").split() if "=" in word
        )
        sources.append(
            AptSource(
                match["uri"],
                (match["suite"],),
                tuple(match["components"].split()),
                options.get("signed-by") or None,
            )
        )
    return sources


def parse_deb822_sources(text: str) -> list[AptSource]:
    """The `Types: deb` stanzas of a deb822 .sources file."""
    sources = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        for uri in fields.get("uris", "").split():
            sources.append(
                AptSource(
                    uri,
                    tuple(fields.get("suites", "").split()),
                    tuple(fields.get("components", "").split()),
                    fields.get("signed-by") or None,
                )
            )
    return sources


def configured_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """Every `deb` source of this machine's apt: sources.list, sources.list.d/*.{list,sources}."""
    sources = []
    lists = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for path in lists:
        if path.is_file():
            sources += parse_one_line_sources(path.read_text(errors="replace"))
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        sources += parse_deb822_sources(path.read_text(errors="replace"))
    return sources


def debian_mirror(suite: str, sources: Iterable[AptSource]) -> AptSource:
    """The configured source serving `suite` with `main` (not -security or -updates).

    `$RACKSERVE_DEBIAN_MIRROR` overrides it, for machines whose apt points elsewhere.
    """
    override = os.environ.get("RACKSERVE_DEBIAN_MIRROR")
    if override:
        return AptSource(override, (suite,), ("main",))
    for source in sources:
        if suite in source.suites and "main" in source.components:
            return source
    raise RackUnavailable(
        f"no apt source on this machine serves Debian {suite} main; "
        "set RACKSERVE_DEBIAN_MIRROR to a Debian mirror URL"
    )


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path` in this mount namespace, deepest first."""
    root = path.resolve()
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # Field 5 is the mount point, with spaces and such escaped as octal (\040).
        point = Path(line.split()[4].encode().decode("unicode_escape"))
        if point == root or root in point.parents:
            points.append(point)
    return sorted(set(points), key=lambda p: len(p.parts), reverse=True)


def unmount_all(path: Path) -> None:
    """Unmount everything at or below `path`; lazily when a mount stays busy."""
    for point in mounts_under(path):
        if run(["umount", point], check=False).returncode != 0:
            run(["umount", "--lazy", point])
