"""Report whether a virtual environment holds what rackserve's python_env role asks for.

Run by the role with the venv's own interpreter (read-only; no network):

    venv/bin/python venv_state.py '{"requirements": [...], "absent": [...]}'

Prints one JSON object: `ok` (true when every requirement is installed at a version its
specifier accepts and no package of `absent` is installed), and the lists `missing`, `wrong`
(name, installed, wanted) and `unwanted`. A requirement that is a path or URL to a wheel is
checked by the name and version in the wheel's file name.
"""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata

from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
from pip._vendor.packaging.version import InvalidVersion, Version

WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions[canonical(name)] = dist.version
    return versions


def parse(line: str) -> Requirement | None:
    wheel = WHEEL_NAME.match(line.rsplit("/", 1)[-1])
    if wheel and line.endswith(".whl"):
        return Requirement(f"{wheel['name']}=={wheel['version']}")
    try:
        return Requirement(line)
    except InvalidRequirement:
        return None


def main() -> int:
    wanted = json.loads(sys.argv[1])
    have = installed_versions()
    missing: list[str] = []
    wrong: list[dict[str, str]] = []
    unknown: list[str] = []
    for line in wanted.get("requirements", []):
        requirement = parse(line)
        if requirement is None:
            unknown.append(line)
            continue
        version = have.get(canonical(requirement.name))
        if version is None:
            missing.append(requirement.name)
            continue
        try:
            # Compare the public version: torch 2.13.0+cpu satisfies torch==2.13.0.
            public = Version(version).public
        except InvalidVersion:
            public = version
        if requirement.specifier and not requirement.specifier.contains(public, prereleases=True):
            wanted_spec = str(requirement.specifier)
            wrong.append({"name": requirement.name, "installed": version, "wanted": wanted_spec})
    unwanted = sorted({canonical(n) for n in wanted.get("absent", [])} & set(have))
    state = {
        "ok": not (missing or wrong or unwanted or unknown),
        "missing": missing,
        "wrong": wrong,
        "unwanted": unwanted,
        "unknown": unknown,
        "python": ".".join(map(str, sys.version_info[:3])),
    }
    print(json.dumps(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
