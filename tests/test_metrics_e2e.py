"""Dashboards and alert rules against the real thing.

The real collector writes its textfile for a sandbox host (real Nix, a signed
binary cache on loopback); Debian's node_exporter serves it; Debian's Prometheus
scrapes it every second and evaluates the alert rules. Then every panel query of
every dashboard (template variables substituted as Grafana would) must parse and
return data, and every alert expression must parse and select existing series.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import Host, SystemSpec
from harness.grafana import RULES, all_panels, load_dashboard
from harness.prometheus import Prometheus, node_exporter, prometheus

from collector import release

pytestmark = [pytest.mark.prometheus, pytest.mark.nix]

DASHBOARDS = ("fleet.json", "host.json")
JOB = "nixos-autodeploy-e2e"
# What Grafana would put in for a short time range over 1s scrapes.
BUILTINS = {
    "__interval": "2s",
    "__interval_ms": "2000",
    "__rate_interval": "20s",
    "__range": "1m",
    "__range_s": "60",
    "__range_ms": "60000",
}
SAMPLES_WANTED = 5  # scrapes per series before querying: enough for increase() over 20s
SELECTOR = re.compile(r"\b(?:nixos_autodeploy|node_textfile)_\w+(?:\{[^}]*\})?")
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(expr: str, values: dict[str, str]) -> tuple[str, list[str]]:
    """Replace Grafana template variables; also return the names it does not know."""
    unknown: list[str] = []

    def one(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            unknown.append(name)
            return match.group(0)
        return values[name]

    return VARIABLE.sub(one, expr), unknown


def result_of(response: Any) -> list[Any]:
    assert response["status"] == "success", response.get("error")
    result: list[Any] = response["data"]["result"]
    return result


def has_data(response: Any) -> bool:
    return response["status"] == "success" and bool(response["data"]["result"])


# ---- the world --------------------------------------------------------------


def make_dirty_host_with_a_failed_deploy(host: Host) -> None:
    """A host someone deployed by hand (dirty), on a new kernel it has not booted
    (reboot required), whose last deploy by the actuator failed and an earlier one was
    rolled back after its health checks failed, whose reboot waits for a window while it
    holds a reboot slot; CI published a third system. Every metric of docs/CONTRACT.md
    then exists."""
    systems = host.build(
        SystemSpec("ours", kernel="6.1.7"),
        SystemSpec("theirs", kernel="6.6.1"),
        SystemSpec("ci", kernel="6.1.7", extra="published"),
    )
    ours, ci = systems["ours"], systems["ci"]
    host.install(ours)
    host.write_deployed(ours)
    host.deploy_by_hand(systems["theirs"], "switch")
    # CI publishes an unsigned release (this host trusts no keys: accepted unverified).
    host.server.publish_body(release_body(2, ci.path))
    deploys = {
        "version": 1,
        "last": {
            "at": time.time() - 3600,
            "path": ci.path,
            "mode": "switch",
            "result": "failure",
            "message": "switch-to-configuration exited with 4",
        },
        "totals": {"success": 3, "failure": 1},
        "failed_path": ci.path,
        "health": {
            "at": time.time() - 7200,
            "ok": False,
            "attempts": 3,
            "summary": "check 'systemd' failed: failed units: web.service",
            "checks": [{"name": "systemd", "ok": False, "output": ["failed units: web.service"]}],
        },
        "rollbacks": 1,
        "last_rollback": {
            "at": time.time() - 7200,
            "from": ci.path,
            "to": ours.path,
            "ok": True,
            "reason": "check 'systemd' failed: failed units: web.service",
            "serial": 2,
        },
    }
    (host.state_dir / "deploys.json").write_text(json.dumps(deploys))
    # An actuator run an hour ago found no maintenance window open, and still holds the
    # reboot slot it took before an earlier reboot (docs/CONTRACT.md, reboot.json).
    reboot = {
        "version": 1,
        "waiting": {
            "reason": "window",
            "message": "reboot waits for window Sat,Sun 02:00-05:00 (next opens Sat 02:00)",
            "since": time.time() - 3600,
        },
        "slot": {"url": "http://127.0.0.1:1", "group": "default", "id": "0" * 32, "at": 0.0},
    }
    (host.state_dir / "reboot.json").write_text(json.dumps(reboot))
    collected = host.collect()
    assert collected.returncode == 0, collected
    assert host.snapshot()["state"] == "dirty"
    # Then someone replays an older one: refused, the accepted release stays.
    host.server.publish_body(release_body(1, ours.path))
    refused = host.collect()
    assert refused.returncode == 1 and "release rejected (replay)" in refused.stderr, refused
    assert host.snapshot()["state"] == "dirty"


def release_body(serial: int, system: str) -> bytes:
    now = int(time.time())
    payload = {"version": 1, "serial": serial, "issued": now, "expires": now + 7 * 86400}
    data = json.dumps({**payload, "systems": {"*": system}}).encode()
    return json.dumps(release.envelope_json(data, [])).encode()


# ---- the test ---------------------------------------------------------------


def test_dashboards_and_alerts_against_real_node_exporter_and_prometheus(
    host: Host, tmp_path: Path
) -> None:
    make_dirty_host_with_a_failed_deploy(host)
    with (
        node_exporter(host.metrics_path.parent, tmp_path / "node_exporter.log") as target,
        prometheus([target], tmp_path, JOB) as prom,
    ):
        check_against(prom, target)
    # Both servers are stopped, also when a check above failed (the with-block's exit).


def check_against(prom: Prometheus, instance: str) -> None:
    ours = f'job="{JOB}", instance="{instance}"'
    prom.wait_for(
        f"{SAMPLES_WANTED} scrapes",
        lambda: has_data(
            prom.query(f"count_over_time(nixos_autodeploy_dirty{{{ours}}}[1m]) >= {SAMPLES_WANTED}")
        ),
    )
    # node_exporter parsed the collector's file without complaint.
    assert [s["value"][1] for s in result_of(prom.query("node_textfile_scrape_error"))] == ["0"]

    values = {"datasource": "unused", "job": JOB, "instance": instance, **BUILTINS}
    failures: list[str] = []
    checked = 0
    for name in DASHBOARDS:
        dashboard = load_dashboard(name)
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                failures += check_variable(prom, name, variable, values)
        for panel in all_panels(dashboard):
            for target in panel.get("targets", []):
                checked += 1
                failures += check_panel_target(prom, f"{name} {panel['title']!r}", target, values)
    assert checked > 20, "the dashboards lost their panels"
    assert not failures, "\n".join(failures)

    check_alert_rules(prom, ours)


def check_variable(
    prom: Prometheus, dashboard: str, variable: dict[str, Any], values: dict[str, str]
) -> list[str]:
    """`label_values(SELECTOR, LABEL)` as Grafana asks it: the series API, by label."""
    definition, unknown = substitute(variable["definition"], values)
    if unknown:
        return [f"{dashboard} ${variable['name']}: unknown variables {unknown}: {definition}"]
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", definition)
    if match is None:
        return [f"{dashboard} ${variable['name']}: not label_values(...): {definition}"]
    selector, label = match.groups()
    found = prom.api(f"label/{label}/values", **{"match[]": selector})
    if found["status"] != "success" or values[variable["name"]] not in found["data"]:
        return [f"{dashboard} ${variable['name']}: {definition} -> {found}"]
    return []


def check_panel_target(
    prom: Prometheus, where: str, target: dict[str, Any], values: dict[str, str]
) -> list[str]:
    expr, unknown = substitute(target["expr"], values)
    if unknown:
        return [f"{where} {target['refId']}: unknown variables {unknown}\n  {expr}"]
    response = prom.query(expr) if target.get("instant") else prom.query_range(expr)
    if response["status"] != "success":
        return [f"{where} {target['refId']}: does not parse: {response.get('error')}\n  {expr}"]
    if not response["data"]["result"]:
        return [f"{where} {target['refId']}: no data\n  {expr}"]
    return []


def check_alert_rules(prom: Prometheus, ours: str) -> None:
    rules = [
        rule
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    failures: list[str] = []
    for rule in rules:
        response = prom.query(rule["expr"])
        if response["status"] != "success":
            failures.append(f"{rule['alert']}: does not parse: {response.get('error')}")
        # Each series an alert looks at exists, so its label matchers fit the real metrics.
        for selector in SELECTOR.findall(rule["expr"]):
            if not has_data(prom.query(selector)):
                failures.append(f"{rule['alert']}: selects nothing: {selector}")
    assert not failures, "\n".join(failures)

    # Prometheus loaded and evaluates the same file; our dirty host's alerts go off.
    def evaluated() -> bool:
        groups = prom.api("rules")["data"]["groups"]
        return all(r["health"] != "unknown" for g in groups for r in g["rules"])

    prom.wait_for("rule evaluation", evaluated)
    loaded = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in rules)
    assert [
        (r["name"], r["health"], r.get("lastError", "")) for r in loaded if r["health"] != "ok"
    ] == []
    states = {
        a["labels"]["alertname"]: a["state"]
        for a in prom.api("alerts")["data"]["alerts"]
        if a["labels"].get("job") == JOB
    }
    assert states == {
        "NixosAutodeployDeployFailed": "firing",  # no `for`: fires at once
        "NixosAutodeployDirty": "pending",  # for 1h
        "NixosAutodeployRebootRequired": "pending",  # for 1d
        "NixosAutodeployReleaseRejected": "pending",  # for 10m
    }
