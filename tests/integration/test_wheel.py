"""The wheel carries the playbooks: `rackserve bootstrap` works from an install, not a checkout.

Builds the wheel from the files git knows (tracked, or new and not ignored), installs it
(without dependencies) into a new venv that borrows this environment's packages through a path
entry (so nothing is downloaded and the checkout's editable install is not seen), and runs the
installed command from a folder outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

pytest.importorskip("ansible_runner", reason="ansible-runner is not installed ('.[bootstrap]')")

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str | Path, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the rackserve wheel installed; returns its bin folder."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know the tracked files")
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    tracked = run(
        "git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, tracked):
        path = ROOT / name
        if path.is_symlink() or not path.is_file():
            if path.is_symlink():
                (source / name).parent.mkdir(parents=True, exist_ok=True)
                (source / name).symlink_to(os.readlink(path))
            continue
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, source / name)
    built = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "-w", base / "dist", source,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (base / "dist").glob("rackserve-*.whl")
    venv = base / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    python = venv / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    # This environment's packages, as a plain path entry: its .pth files (the editable
    # install of the checkout among them) are not read.
    (Path(site.stdout.strip()) / "borrowed.pth").write_text(sysconfig.get_path("purelib") + "\n")
    got = run(python, "-m", "pip", "install", "--no-deps", "--no-index", wheel)
    assert got.returncode == 0, got.stderr[-3000:]
    return venv / "bin"


def test_bootstrap_syntax_check_runs_from_the_installed_wheel(
    installed: Path, tmp_path: Path
) -> None:
    inventory = tmp_path / "hosts.yml"
    shutil.copy(ROOT / "inventory" / "sample" / "hosts.yml", inventory)
    where = run(
        installed / "python", "-c", "import deployer, sys; print(deployer.__file__)", cwd=tmp_path
    )
    assert str(installed.parent) in where.stdout, "the wheel's package, not the checkout's"
    path = f"{installed}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    for playbook in ("site", "reset"):
        result = run(
            installed / "rackserve", "bootstrap", "-i", inventory, "-p", playbook,
            "--syntax-check", cwd=tmp_path, PATH=path,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"syntax OK: playbooks/{playbook}.yml" in result.stdout
    shipped = installed.parent / "share" / "rackserve"
    assert (shipped / "roles" / "ray_head" / "tasks" / "main.yml").is_file()
    assert (shipped / "ansible.cfg").is_file()


def test_a_broken_role_in_the_install_fails_the_syntax_check(
    installed: Path, tmp_path: Path
) -> None:
    shipped = installed.parent / "share" / "rackserve" / "playbooks" / "site.yml"
    original = shipped.read_text()
    try:
        shipped.write_text(
            original + "\n- name: broken\n  hosts: all\n  tasks: [{bogus_module_x: {}}]\n"
        )
        result = run(
            installed / "rackserve", "bootstrap", "-i", ROOT / "inventory" / "sample" / "hosts.yml",
            "--syntax-check", cwd=tmp_path,
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        )  # fmt: skip
    finally:
        shipped.write_text(original)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "bogus_module_x" in result.stdout + result.stderr
