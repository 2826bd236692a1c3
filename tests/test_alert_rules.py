"""The alert rules pass `promtool check rules` and their unit tests (`promtool test rules`)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import require_tool
from harness.grafana import GRAFANA, RULES

pytestmark = pytest.mark.prometheus

RULE_TESTS = GRAFANA / "alerts.test.yml"
ALERTS = {
    "NixosAutodeployDirty",
    "NixosAutodeployRebootRequired",
    "NixosAutodeployUpstreamFetchFailing",
    "NixosAutodeployCollectorStale",
    "NixosAutodeployDeployFailed",
    "NixosAutodeployUpdateNotApplied",
    "NixosAutodeployRolledBack",
    "NixosAutodeployRebootWaiting",
    "NixosAutodeployRolloutHalted",
    "NixosAutodeployReleaseRejected",
    "NixosAutodeployReleaseExpiring",
    "NixosAutodeployLowDiskSpace",
    "NixosAutodeployDeployRefusedForSpace",
}
SEVERITIES = {"info", "warning", "critical"}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def promtool(*args: str, cwd: Path = GRAFANA) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,  # a safety net, not an assertion
    )


def test_promtool_check_rules() -> None:
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout


def test_promtool_unit_tests_pass() -> None:
    tested = promtool("test", "rules", RULE_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests notice a wrong rule: a loosened threshold makes them fail."""
    rules = RULES.read_text()
    broken = rules.replace("for: 1h", "for: 2h")
    assert broken != rules
    (tmp_path / RULES.name).write_text(broken)
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    tested = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert tested.returncode != 0
    assert "NixosAutodeployDirty" in tested.stdout + tested.stderr


def test_every_expected_alert_is_there_with_severity_summary_and_description() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == ALERTS
    assert len(rules) == len(ALERTS)
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert "{{ $labels.instance }}" in rule["annotations"]["summary"], rule["alert"]


def test_alerts_wait_1h_dirty_1d_reboot_required_15min_stale_2d_reboot_waiting() -> None:
    by_name = {rule["alert"]: rule for rule in alert_rules()}
    assert by_name["NixosAutodeployDirty"]["for"] == "1h"
    assert by_name["NixosAutodeployRebootRequired"]["for"] == "1d"
    stale = by_name["NixosAutodeployCollectorStale"]["expr"]
    # Three 5-minute collector intervals, from either source.
    assert stale.count("> 900") == 2
    assert "nixos_autodeploy_last_collect_timestamp_seconds" in stale
    assert "node_textfile_mtime_seconds" in stale
    waiting = by_name["NixosAutodeployRebootWaiting"]["expr"]
    assert waiting == (
        "time() - nixos_autodeploy_reboot_waiting_since_timestamp_seconds > 2 * 86400"
    )


def test_every_alert_has_a_unit_test_that_fires_and_one_that_stays_quiet() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    assert fires == ALERTS
    assert quiet == ALERTS
