"""`collect` against real Nix, a real binary cache on loopback, a sandbox root: realising
upstream and classifying the host, conditional fetches, the metrics it writes, --track,
and its settings from flags and the config file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from harness import Host, Reply, SystemSpec, error_lines, etag_for, metric, require_tool

pytestmark = pytest.mark.nix


# ---- realising and classifying ------------------------------------------------------


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
    assert not host.store_path_is_valid(new.path)
    result = host.collect()
    assert result.returncode == 0, result
    assert host.store_path_is_valid(new.path)
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


# ---- conditional fetches ------------------------------------------------------------


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


# ---- the metrics it writes ----------------------------------------------------------


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


def test_metrics_without_health_checks_yet_have_no_health_series(host: Host) -> None:
    host.update_published()
    metrics = host.metrics()
    assert metric(metrics, "nixos_autodeploy_rollbacks_total") == 0
    assert "nixos_autodeploy_last_health_check_success" not in metrics
    assert "nixos_autodeploy_last_rollback_success" not in metrics


# ---- settings: flags and the config file --------------------------------------------


def test_flags_win_over_the_config_file_and_unknown_keys_are_refused(
    host: Host, tmp_path: Path
) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    config = tmp_path / "autodeploy.json"
    config.write_text(
        json.dumps({"url": host.server.url("/nowhere"), "timeout": 30, "headers": ["X-A: file"]})
    )
    result = host.run_agent("collect", "--config", str(config), "--url", host.url)
    assert result.returncode == 0, result
    (request,) = host.server.requests("/upstream")
    assert request.headers["x-a"] == "file"
    assert host.server.requests("/nowhere") == []

    config.write_text(json.dumps({"url": host.url, "swtich_mode": "boot"}))
    before = (host.state_dir / "snapshot.json").read_bytes()
    refused = host.run_agent("deploy", "--config", str(config))
    assert refused.returncode == 1
    (error,) = error_lines(refused)
    assert "unknown key 'swtich_mode'" in error
    assert (host.state_dir / "snapshot.json").read_bytes() == before

    config.write_text("url = [")
    broken = host.run_agent("collect", "--config", str(config))
    assert broken.returncode == 1
    assert len(error_lines(broken)) == 1
