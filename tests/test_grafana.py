"""The dashboards are valid JSON that imports by hand and by file provisioning.

Whether their queries return data is tested against a real Prometheus in
test_metrics_e2e.py; this file checks the conventions that make them portable.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from harness.grafana import GRAFANA, all_panels, load_dashboard

DASHBOARDS = {"fleet.json": "nixos-autodeploy-fleet", "host.json": "nixos-autodeploy-host"}
SHARED_TAGS = {"nixos-autodeploy"}
# Grafana 10.4 / 11 write 39; older numbers get migrated on load and re-saved with a diff.
MIN_SCHEMA_VERSION = 39
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def test_the_dashboard_files_are_the_expected_ones() -> None:
    assert sorted(p.name for p in GRAFANA.glob("*.json")) == sorted(DASHBOARDS)


@pytest.mark.parametrize(("name", "uid"), DASHBOARDS.items())
def test_dashboard_identity(name: str, uid: str) -> None:
    dashboard = load_dashboard(name)
    # A stable uid keeps links and provisioned copies pointing at the same dashboard.
    assert dashboard["uid"] == uid
    assert len(uid) <= 40
    # An id would clash with the importing instance's own ids.
    assert dashboard.get("id") is None
    assert dashboard["title"].startswith("nixos-autodeploy / ")
    assert set(dashboard["tags"]) >= SHARED_TAGS
    assert dashboard["schemaVersion"] >= MIN_SCHEMA_VERSION


def test_dashboards_share_their_tags_and_link_each_other() -> None:
    fleet, host = load_dashboard("fleet.json"), load_dashboard("host.json")
    assert fleet["tags"] == host["tags"]
    for dashboard in (fleet, host):
        tag_links = [link for link in dashboard["links"] if link["type"] == "dashboards"]
        assert tag_links, dashboard["uid"]
        assert all(set(link["tags"]) >= SHARED_TAGS for link in tag_links)


@pytest.mark.parametrize("name", DASHBOARDS)
def test_no_export_placeholders(name: str) -> None:
    """`__inputs` / `${DS_...}` only work through the import UI; provisioning breaks on them."""
    text = (GRAFANA / name).read_text()
    dashboard = json.loads(text)
    assert "__inputs" not in dashboard
    assert "__requires" not in dashboard
    assert "${DS_" not in text
    assert "DS_PROMETHEUS" not in text


@pytest.mark.parametrize(
    ("name", "expected"), [("fleet.json", {"job"}), ("host.json", {"job", "instance"})]
)
def test_template_variables(name: str, expected: set[str]) -> None:
    found = variables(load_dashboard(name))
    assert set(found) == {"datasource"} | expected
    datasource = found["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    for var in expected:
        query = found[var]
        assert query["type"] == "query"
        assert query["datasource"] == DATASOURCE_REF
        assert query["definition"].startswith("label_values(")
        assert query["definition"].endswith(f", {var})")
        assert query["query"]["query"] == query["definition"]
    if "instance" in found:
        assert not found["instance"]["multi"], "a host dashboard shows one host"
        assert not found["instance"]["includeAll"]
        assert "$job" in found["instance"]["definition"]


@pytest.mark.parametrize("name", DASHBOARDS)
def test_every_panel_queries_the_datasource_variable(name: str) -> None:
    dashboard = load_dashboard(name)
    panels = [p for p in all_panels(dashboard) if p["type"] != "row"]
    assert panels
    for panel in panels:
        where = f"{name} panel {panel['title']!r}"
        assert panel["datasource"] == DATASOURCE_REF, where
        assert panel["targets"], where
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE_REF, where
            assert target["expr"].strip(), where


@pytest.mark.parametrize("name", DASHBOARDS)
def test_panel_ids_are_unique_and_placed(name: str) -> None:
    panels = list(all_panels(load_dashboard(name)))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & occupied, f"{panel['title']!r} overlaps another panel"
        occupied |= cells


@pytest.mark.parametrize(
    ("name", "selector"),
    [("fleet.json", 'job=~"$job"'), ("host.json", 'job=~"$job", instance="$instance"')],
)
def test_every_selector_is_filtered_by_the_variables(name: str, selector: str) -> None:
    """A selector without `$job` would mix in other jobs' (or, on the host view, hosts') series."""
    for panel in all_panels(load_dashboard(name)):
        for target in panel.get("targets", []):
            selectors = re.findall(
                r"\b(?:nixos_autodeploy|node_textfile)_\w+(\{[^}]*\})?", target["expr"]
            )
            assert selectors, target["expr"]
            for found in selectors:
                assert selector in found, f"{panel['title']!r}: {target['expr']}"


def test_fleet_stats_count_hosts_by_state_dirty_reboot_fetch_failure_and_staleness() -> None:
    exprs = {
        p["title"]: p["targets"][0]["expr"]
        for p in all_panels(load_dashboard("fleet.json"))
        if p["type"] == "stat"
    }
    joined = "\n".join(exprs.values())
    for state in ("up-to-date", "update-available", "pending-reboot"):
        assert f'state="{state}"' in joined, state
    for metric in (
        "nixos_autodeploy_dirty",
        "nixos_autodeploy_reboot_required",
        "nixos_autodeploy_upstream_fetch_success",
        "nixos_autodeploy_last_collect_timestamp_seconds",
    ):
        assert metric in joined, metric


def test_the_fleet_table_shows_each_hosts_release() -> None:
    (table,) = [p for p in all_panels(load_dashboard("fleet.json")) if p["type"] == "table"]
    exprs = "\n".join(t["expr"] for t in table["targets"])
    for metric in (
        "nixos_autodeploy_release_serial",
        "nixos_autodeploy_release_expiry_timestamp_seconds",
        "nixos_autodeploy_release_verified",
        "nixos_autodeploy_release_rejected",
        "nixos_autodeploy_last_rollback_serial",
    ):
        assert metric in exprs, metric
    (organize,) = [t["options"] for t in table["transformations"] if t["id"] == "organize"]
    shown = set(organize["renameByName"].values())
    columns = {"Release serial", "Release expires", "Release", "Release rejected"}
    assert columns | {"Rolled back from serial"} <= shown
    overrides = {
        o["matcher"]["options"]: o["properties"] for o in table["fieldConfig"]["overrides"]
    }
    (mapping,) = [p["value"][0]["options"] for p in overrides["Release"] if p["id"] == "mappings"]
    assert (mapping["1"]["text"], mapping["0"]["text"]) == ("verified", "unverified")


def test_the_host_dashboard_shows_its_release() -> None:
    panels = {p["title"]: p for p in all_panels(load_dashboard("host.json"))}
    expected = {
        "Release serial": "nixos_autodeploy_release_serial",
        "Release expires": "nixos_autodeploy_release_expiry_timestamp_seconds",
        "Release": "nixos_autodeploy_release_verified",
        "Release rejected": "nixos_autodeploy_release_rejected",
        "Rolled back from serial": "nixos_autodeploy_last_rollback_serial",
    }
    for title, metric in expected.items():
        assert metric in panels[title]["targets"][0]["expr"], title
    assert panels["Release expires"]["fieldConfig"]["defaults"]["unit"] == "dateTimeFromNow"
    assert panels["Release rejected"]["targets"][0]["legendFormat"] == "{{reason}}"
