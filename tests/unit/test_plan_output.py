"""`rackserve plan` at rack scale: one line per node by default, every row on --full."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployer.cli.app import main
from deployer.cli.render import FULL_TABLE_ROWS

pytestmark = pytest.mark.unit


def rack_files(tmp_path: Path, nodes: int, models: int) -> tuple[Path, Path]:
    gpu = {"name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559, "memory_free_mib": 81000}
    cluster = {
        "nodes": [
            {"name": f"gpu-{n:03d}", "gpus": [{"index": i, **gpu} for i in range(8)]}
            for n in range(nodes)
        ]
    }
    entries = [{"model_id": f"m{i:03d}", "gpu_memory_gib": 10 + i % 50} for i in range(models)]
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": entries}))
    return tmp_path / "cluster.yaml", tmp_path / "models.yaml"


def plan(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    code: object = 0
    try:
        main(["plan", *map(str, args)])
    except SystemExit as exited:  # typer exits 0 through SystemExit
        code = exited.code or 0
    assert code == 0
    return capsys.readouterr().out


def test_large_plans_print_one_line_per_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, models = rack_files(tmp_path, nodes=6, models=FULL_TABLE_ROWS + 12)
    out = plan(capsys, "-c", cluster, "-m", models)
    assert f"Plan by node ({FULL_TABLE_ROWS + 12} placements" in out
    lines = [line for line in out.splitlines() if line.startswith("gpu-")]
    assert len(lines) <= 6
    assert all(line.split()[1].endswith("/8") for line in lines)
    assert sum(int(line.split()[2]) for line in lines) >= FULL_TABLE_ROWS + 12
    assert "m000" not in out, "no per-model rows by default"


def test_full_prints_every_model_and_small_plans_stay_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, models = rack_files(tmp_path, nodes=6, models=FULL_TABLE_ROWS + 12)
    out = plan(capsys, "-c", cluster, "-m", models, "--full")
    assert "Plan (launch order)" in out
    assert all(f"m{i:03d}" in out for i in range(FULL_TABLE_ROWS + 12))
    cluster, models = rack_files(tmp_path, nodes=1, models=3)
    out = plan(capsys, "-c", cluster, "-m", models)
    assert "Plan (launch order)" in out
    assert "Plan by node" not in out
