"""Fixtures shared by all test tiers."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.local_ray import RayCluster, start_ray_cluster, temp_root


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache with the hub switched off: no network traffic at all."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """A two-node Ray cluster on this machine (head 127.0.0.2, worker 127.0.0.3), one per session.

    Its temp dirs go under $RAY_TEMP_DIR when set; it is stopped by PID at the end.
    """
    pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[serve]')")
    if shutil.which("ray") is None and not Path(sys.executable).with_name("ray").exists():
        pytest.skip("the `ray` command is not installed (pip install -e '.[serve]')")
    with temp_root() as base, start_ray_cluster(base) as cluster:
        yield cluster
