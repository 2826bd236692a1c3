"""`collect` and `status` against real Nix, a real binary cache on loopback, a sandbox root."""

from __future__ import annotations

import json
import subprocess

import pytest
from harness import AgentResult, Host, Reply, System, SystemSpec, etag_for, metric, require_tool

pytestmark = pytest.mark.nix


def store_path_is_valid(host: Host, path: str) -> bool:
    checked = subprocess.run(
        ["nix-store", "--check-validity", path], env=host.nix_env(), capture_output=True
    )
    return checked.returncode == 0


# ---- realising and classifying ----------------------------------------------


def test_collect_realises_upstream_and_reports_untracked(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    result = host.collect()
    assert result.returncode == 0, result
    assert host.upstream() == system.path
    snapshot = host.snapshot()
    assert snapshot["state"] == "untracked"
    assert snapshot["upstream"]["path"] == system.path
    assert snapshot["upstream"]["url"] == host.url
    assert snapshot["upstream"]["error"] is None
    assert snapshot["upstream"]["etag"] == etag_for((system.path + "\n").encode())
    assert (snapshot["current"], snapshot["booted"], snapshot["profile"]) == (system.path,) * 3
    assert snapshot["dirty"] is False and snapshot["reboot_required"] is False
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_upstream_fetch_success") == 1
    assert metric(text, "nixos_autodeploy_state", state="untracked") == 1
    assert metric(text, "nixos_autodeploy_state", state="dirty") == 0
    assert (
        metric(
            text,
            "nixos_autodeploy_info",
            current_generation=system.basename,
            booted_generation=system.basename,
            deployed_generation="",
            upstream_generation=system.basename,
        )
        == 1
    )


def test_update_available_realises_the_new_system_and_changes_nothing_else(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", extra="changed"))
    old, new = systems["old"], systems["new"]
    host.install(old)
    host.write_deployed(old)
    host.publish(new)
    assert not store_path_is_valid(host, new.path)
    result = host.collect()
    assert result.returncode == 0, result
    assert store_path_is_valid(host, new.path)
    assert host.upstream() == new.path
    assert (host.current(), host.booted(), host.profile()) == (old.path,) * 3
    assert host.activations() == []
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["dirty"]) == ("update-available", False)
    assert snapshot["deployed"]["path"] == old.path
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_update_available") == 1
    assert metric(text, "nixos_autodeploy_dirty") == 0


def test_hand_deployed_system_is_dirty(host: Host) -> None:
    systems = host.build(SystemSpec("ours"), SystemSpec("theirs"), SystemSpec("ci"))
    host.install(systems["ours"])
    host.write_deployed(systems["ours"])
    host.deploy_by_hand(systems["theirs"], "switch")
    host.publish(systems["ci"])
    result = host.collect()
    assert result.returncode == 0, result
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["dirty"]) == ("dirty", True)
    assert metric(host.metrics(), "nixos_autodeploy_dirty") == 1


def test_up_to_date(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.write_deployed(system)
    host.publish(system)
    assert host.collect().returncode == 0
    assert host.snapshot()["state"] == "up-to-date"
    assert metric(host.metrics(), "nixos_autodeploy_state", state="up-to-date") == 1


def test_unknown_when_upstream_never_answered_well(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    # No route: /upstream is a 404 from the cache directory.
    result = host.collect()
    assert result.returncode == 1
    snapshot = host.snapshot()
    assert snapshot["state"] == "unknown"
    assert "404" in snapshot["upstream"]["error"]
    assert metric(host.metrics(), "nixos_autodeploy_upstream_fetch_success") == 0


def test_pending_reboot_and_reboot_required(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel="6.9.1"))
    old, new = systems["old"], systems["new"]
    host.install(old)
    host.deploy_by_hand(new, "boot")  # what a boot-mode deploy leaves behind
    host.write_deployed(new, mode="boot", previous=old)
    host.publish(new)
    assert host.collect().returncode == 0
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["dirty"]) == ("pending-reboot", False)
    assert snapshot["reboot_required"] is True
    assert metric(host.metrics(), "nixos_autodeploy_reboot_required") == 1
    host.reboot()
    assert host.collect().returncode == 0
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["reboot_required"]) == ("up-to-date", False)
    assert host.upstream() == new.path, "collect pins upstream again after /run was wiped"


@pytest.mark.parametrize(("kernel", "required"), [("6.1.0", False), ("6.9.2", True)])
def test_reboot_required_follows_the_kernel(host: Host, kernel: str, required: bool) -> None:
    systems = host.build(SystemSpec("old", kernel="6.1.0"), SystemSpec("new", kernel=kernel))
    host.install(systems["old"])
    host.deploy_by_hand(systems["new"], "switch")
    host.write_deployed(systems["new"], previous=systems["old"])
    host.publish(systems["new"])
    assert host.collect().returncode == 0
    assert host.snapshot()["reboot_required"] is required
    assert metric(host.metrics(), "nixos_autodeploy_reboot_required") == float(required)


# ---- conditional fetch, metrics, lock -------------------------------------------


def test_second_collect_gets_304_and_runs_no_nix(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    assert host.collect().returncode == 0
    nix_runs = host.spawn_count("nix-store", "nix-env", "nix")
    assert nix_runs >= 1, "the first collect realises through nix-store"
    host.server.reset_requests()
    second = host.collect()
    assert second.returncode == 0, second
    (request,) = host.server.requests("/upstream")
    assert request.headers["if-none-match"] == etag_for((system.path + "\n").encode())
    assert host.server.count() == 1, "no narinfo lookups either"
    assert host.spawn_count("nix-store", "nix-env", "nix") == nix_runs
    assert host.snapshot()["state"] == "untracked"
    assert metric(host.metrics(), "nixos_autodeploy_upstream_fetch_success") == 1


def test_conditional_get_sends_both_validators(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    body = (system.path + "\n").encode()
    last_modified = "Wed, 01 May 2024 10:00:00 GMT"
    host.server.route(
        "/upstream",
        Reply(body=body, etag=etag_for(body), headers=[("Last-Modified", last_modified)]),
    )
    assert host.collect().returncode == 0
    second = host.collect()
    assert second.returncode == 0, second
    first_request, second_request = host.server.requests("/upstream")
    assert "if-none-match" not in first_request.headers
    assert "if-modified-since" not in first_request.headers
    assert second_request.headers["if-none-match"] == etag_for(body)
    assert second_request.headers["if-modified-since"] == last_modified
    assert host.upstream() == system.path
    assert metric(host.metrics(), "nixos_autodeploy_upstream_fetch_success") == 1


def test_upstream_change_is_realised_on_the_next_collect(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    host.install(systems["a"])
    host.write_deployed(systems["a"])
    host.publish(systems["a"])
    assert host.collect().returncode == 0
    first_change = host.snapshot()["upstream"]["changed_at"]
    host.publish(systems["b"])
    assert host.collect().returncode == 0
    assert host.upstream() == systems["b"].path
    snapshot = host.snapshot()
    assert snapshot["state"] == "update-available"
    assert snapshot["upstream"]["changed_at"] >= first_change
    assert metric(
        host.metrics(), "nixos_autodeploy_last_upstream_change_timestamp_seconds"
    ) == pytest.approx(snapshot["upstream"]["changed_at"])


def test_metrics_pass_promtool(host: Host) -> None:
    promtool = require_tool("promtool")
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    host.install(systems["a"])
    host.write_deployed(systems["a"])
    host.publish(systems["b"])
    assert host.collect().returncode == 0
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=host.metrics(), capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == "", "promtool has lint complaints"
    # A failed collect writes a file that passes too.
    host.server.publish_body(b"<html>oops</html>")
    assert host.collect().returncode == 1
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=host.metrics(), capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_lock_held_collect_says_so_and_changes_nothing(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    before = host.links()
    with host.lock_held():
        result = host.collect()
    assert result.returncode == 0, result
    assert "lock" in result.stderr.lower()
    assert host.server.count() == 0
    assert host.links() == before
    assert not (host.state_dir / "snapshot.json").exists()
    assert not host.metrics_path.exists()


# ---- status -----------------------------------------------------------------


def collected_update(host: Host) -> tuple[System, System]:
    """A tracked host running old, collected after CI published new."""
    systems = host.build(SystemSpec("old"), SystemSpec("new"))
    old, new = systems["old"], systems["new"]
    host.install(old)
    host.write_deployed(old)
    host.publish(new)
    assert host.collect().returncode == 0
    return old, new


def test_status_json_and_table(host: Host) -> None:
    old, new = collected_update(host)
    result = host.status("--json")
    assert result.returncode == 0, result
    shown = json.loads(result.stdout)
    expected = {
        "state": "update-available",
        "dirty": False,
        "reboot_required": False,
        "current": old.path,
        "booted": old.path,
        "profile": old.path,
        "deployed": old.path,
        "upstream": new.path,
        "upstream_error": None,
        "last_deploy": None,
    }
    assert {k: shown[k] for k in expected} == expected
    assert shown["collected_at"] == host.snapshot()["collected_at"]
    table = host.run_agent("status", env={"COLUMNS": "250"})
    assert table.returncode == 0, table
    assert "update-available" in table.stdout
    assert old.path in table.stdout and new.path in table.stdout


def table_row(table: AgentResult, label: str) -> str:
    """The line of the status table whose first cell is `label`."""
    rows = [
        line
        for line in table.stdout.splitlines()
        if line.startswith("│") and line.strip("│ ").startswith(label)
    ]
    assert len(rows) == 1, table
    return rows[0]


def status_table(host: Host) -> AgentResult:
    # Captured stdout is not a terminal: no colour codes. Wide enough for full paths.
    table = host.run_agent("status", env={"COLUMNS": "250"})
    assert table.returncode == 0, table
    assert "\x1b[" not in table.stdout, "colour codes on a stdout that is not a terminal"
    return table


def test_status_table_marks_what_differs_from_current(host: Host) -> None:
    old, new = collected_update(host)
    table = status_table(host)
    for label in ("current", "booted", "profile", "deployed"):
        row = table_row(table, label)
        assert old.path in row and "≠ current" not in row, table
    row = table_row(table, "upstream")
    assert new.path in row and "≠ current" in row, table
    assert "dirty: no" in table.stdout and "reboot required: no" in table.stdout, table
    assert "upstream error" not in table.stdout, table


def test_status_table_shows_dirty_and_reboot_required(host: Host) -> None:
    systems = host.build(SystemSpec("ours"), SystemSpec("theirs", kernel="6.9.1"), SystemSpec("ci"))
    ours, theirs, ci = systems["ours"], systems["theirs"], systems["ci"]
    host.install(ours)
    host.write_deployed(ours)
    host.deploy_by_hand(theirs, "switch")  # a new kernel, switched to by hand
    host.publish(ci)
    assert host.collect().returncode == 0
    assert (host.snapshot()["state"], host.snapshot()["reboot_required"]) == ("dirty", True)
    table = status_table(host)
    marked = {
        "current": (theirs, False),
        "booted": (ours, True),
        "profile": (theirs, False),
        "deployed": (ours, True),
        "upstream": (ci, True),
    }
    for label, (system, differs) in marked.items():
        row = table_row(table, label)
        assert system.path in row, table
        assert ("≠ current" in row) is differs, table
    assert "dirty: yes" in table.stdout, table
    assert "reboot required: yes" in table.stdout, table


def test_status_table_shows_the_upstream_error(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.write_deployed(system)
    host.publish(system)
    assert host.collect().returncode == 0
    host.server.publish_body(b"<html>maintenance</html>\n")
    failed = host.collect()
    assert failed.returncode == 1, failed
    table = status_table(host)
    (line,) = [line for line in table.stdout.splitlines() if "upstream error" in line]
    assert "HTML" in line and host.url in line, table
    assert host.snapshot()["upstream"]["error"] in " ".join(table.stdout.split()), table


def test_status_shows_the_upstream_error(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.server.publish_body(b"")
    assert host.collect().returncode == 1
    shown = json.loads(host.status("--json").stdout)
    assert "empty body" in shown["upstream_error"]
    assert shown["state"] == "unknown"


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"version": 99}', b'{"version": 1, "state": "bogus"}'],
)
def test_corrupt_snapshot_makes_status_fail_with_one_line(host: Host, content: bytes) -> None:
    (host.state_dir / "snapshot.json").write_bytes(content)
    for args in ((), ("--json",)):
        result = host.status(*args)
        assert result.returncode == 1, result
        assert len(result.stderr_lines) == 1, result
        assert result.stderr_lines[0].startswith("error:")
        assert "snapshot" in result.stderr_lines[0] or "snapshot.json" in result.stderr_lines[0]
        assert result.stdout == ""


def test_status_without_snapshot_says_run_collect(host: Host) -> None:
    result = host.status()
    assert result.returncode == 1
    assert len(result.stderr_lines) == 1 and "collect" in result.stderr_lines[0]


def test_collect_track_on_a_host_without_the_actuator(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    host.install(a)
    host.publish(a)
    first = host.collect("--track")
    assert first.returncode == 0, first
    record = host.read_json("deployed.json")
    assert (record["path"], record["previous"]) == (a.path, a.path)
    assert host.snapshot()["state"] == "up-to-date"

    host.publish(b)  # CI moved on; here an operator deploys by hand
    assert host.collect("--track").returncode == 0
    assert (host.snapshot()["state"], host.snapshot()["dirty"]) == ("update-available", False)
    host.deploy_by_hand(b)
    assert host.collect("--track").returncode == 0
    assert host.snapshot()["state"] == "up-to-date"
    assert host.read_json("deployed.json")["path"] == b.path

    host.deploy_by_hand(c)  # not what CI published: still dirty, tracking or not
    assert host.collect("--track").returncode == 0
    assert host.snapshot()["state"] == "dirty"
    assert host.read_json("deployed.json")["path"] == b.path


def test_a_failed_fetch_keeps_the_time_of_the_last_good_one(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    assert host.collect().returncode == 0
    assert host.collect().returncode == 0  # 304: upstream.json is not rewritten
    last_good = host.snapshot()["upstream"]["fetched_at"]
    assert last_good > host.read_json("upstream.json")["fetched_at"]
    host.server.route("/upstream", Reply(status=404))
    assert host.collect().returncode == 1
    upstream = host.snapshot()["upstream"]
    assert upstream["fetched_at"] == last_good and "404" in upstream["error"]


@pytest.mark.parametrize("rolled_back", [True, False])
def test_status_and_metrics_show_the_last_health_checks_and_rollback(
    host: Host, rolled_back: bool
) -> None:
    """What the actuator records after failed health checks (docs/CONTRACT.md, deploys.json)
    reaches the metrics, `status` and `status --json`."""
    old, new = collected_update(host)
    reason = "check 'http://127.0.0.1/health' failed: HTTP 503 Service Unavailable"
    health = {
        "at": 1_800_000_000.0,
        "ok": False,
        "attempts": 60,
        "summary": reason,
        "checks": [{"name": "http://127.0.0.1/health", "ok": False, "output": ["HTTP 503"]}],
    }
    rollback = {
        "at": 1_800_000_010.0,
        "from": new.path,
        "to": old.path,
        "ok": rolled_back,
        "reason": reason,
    }
    deploys = {
        "version": 1,
        "last": None,
        "totals": {"success": 0, "failure": 1},
        "failed_path": new.path,
        "health": health,
        "rollbacks": 2,
        "last_rollback": rollback,
    }
    (host.state_dir / "deploys.json").write_text(json.dumps(deploys))
    assert host.collect().returncode == 0
    metrics = host.metrics()
    assert metric(metrics, "nixos_autodeploy_last_health_check_success") == 0
    assert metric(metrics, "nixos_autodeploy_last_health_check_timestamp_seconds") == health["at"]
    assert metric(metrics, "nixos_autodeploy_rollbacks_total") == 2
    assert metric(metrics, "nixos_autodeploy_last_rollback_success") == rolled_back
    shown = json.loads(host.status("--json").stdout)
    assert (shown["last_health"], shown["last_rollback"]) == (health, rollback)
    lines = status_table(host).stdout.splitlines()
    assert any(x.startswith("last health check: failed") and x.endswith(reason) for x in lines)
    (line,) = (x for x in lines if f"rolled back from {new.path} at 2027-01-15 08:00:10 UTC" in x)
    assert line.startswith("rolled back" if rolled_back else "rolling back failed ("), line
    assert line.endswith(f"ago): {reason}" if rolled_back else f"ago)): {reason}"), line


def test_metrics_without_health_checks_yet_have_no_health_series(host: Host) -> None:
    collected_update(host)
    metrics = host.metrics()
    assert metric(metrics, "nixos_autodeploy_rollbacks_total") == 0
    assert "nixos_autodeploy_last_health_check_success" not in metrics
    assert "nixos_autodeploy_last_rollback_success" not in metrics
