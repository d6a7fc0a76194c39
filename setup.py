"""Ships the Ansible content (playbooks, roles, ansible.cfg, the sample inventory) in the wheel.

Everything else is in pyproject.toml. Setuptools' data files do not recurse, so this lists every
file under the content folders; a wheel puts them in `<prefix>/share/rackserve/`, where
`rackserve bootstrap` finds them when it does not run from a checkout.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from setuptools import setup

CONTENT = ("site.yml", "ansible.cfg", "playbooks", "roles", "inventory/sample")


def data_files() -> list[tuple[str, list[str]]]:
    """(target folder, files) pairs for every content file, symlinks left out."""
    groups: dict[str, list[str]] = defaultdict(list)
    for entry in map(Path, CONTENT):
        files = [entry] if entry.is_file() else sorted(entry.rglob("*"))
        for path in files:
            if (
                path.is_file()
                and not path.is_symlink()
                and not any(part.is_symlink() for part in path.parents)
            ):
                groups[str(Path("share/rackserve") / path.parent)].append(str(path))
    return sorted(groups.items())


setup(data_files=data_files())
