"""rackserve's alert rules, checked and unit-tested by Prometheus's own `promtool`.

`promtool` comes with the distribution's `prometheus` package (Debian 12: 2.42), which
`.ci/run` installs. Without it the tests skip, unless RACKSERVE_PROMETHEUS_REQUIRED=1 (CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.metrics]

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "roles/monitoring/files/rackserve-rules.yml"
RULES_TEST = REPO / "tests/monitoring/rules_test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("RACKSERVE_PROMETHEUS_REQUIRED") == "1":
            pytest.fail("promtool is missing: install the distribution's prometheus package")
        pytest.skip("promtool is missing (the distribution's prometheus package)")
    return subprocess.run(
        [found, *args], capture_output=True, text=True, timeout=120, check=False, cwd=REPO
    )


def test_the_rules_are_valid() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    alerts = _alerts(RULES.read_text())
    assert f"SUCCESS: {len(alerts)} rules found" in checked.stdout


def test_every_alert_has_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for group in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for case in group["alert_rule_test"]
    }
    assert tested == set(_alerts(RULES.read_text()))


def _alerts(rules: str) -> list[str]:
    return [r["alert"] for g in yaml.safe_load(rules)["groups"] for r in g["rules"] if "alert" in r]


def test_each_alert_fires_when_its_condition_holds_and_not_before() -> None:
    tested = promtool("test", "rules", str(RULES_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr
