"""`deploy` end to end: the gate's decisions carried out on a host, with real Nix, a signed
binary cache on loopback and a sandbox root.

The original tool's NixOS VM test scenarios as operations on a sandbox host, then what
the actuator adds to them: --force, a system that is not NixOS, the snapshot a deploy
acts on, dry runs. Only `systemctl` and `kexec` are replaced (by the harness'
recorders); everything else is the real thing. Switch modes and reboots are in
test_reboot_modes.py, failed deploys in test_rollback.py, runs cut short in
test_recovery.py, corrupt state files in test_state_files.py, the lock in test_lock.py.
"""

from __future__ import annotations

import json
import os
import shlex

import pytest
from harness import NEW_KERNEL, Host, SystemSpec, error_lines, metric
from harness.deploys import (
    assert_links,
    assert_record,
    decisions,
    deploy,
    deployed_mirror,
    history,
    journal,
    record,
    state_files,
    tracking,
)

pytestmark = pytest.mark.nix


# ---- the original tool's scenarios --------------------------------------------------


def test_fresh_host_matching_upstream_starts_tracking(host: Host) -> None:
    a = host.build_one("a")
    host.install(a)
    host.publish(a)
    result = deploy(host)
    assert result.returncode == 0, result
    assert_record(host, a, "switch", previous=a)
    assert_links(host, current=a, profile=a, booted=a)
    assert host.activations() == []
    assert host.recorded("nix-env") == []
    assert decisions(host) == [("track", "untracked")]
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["dirty"]) == ("up-to-date", False)
    assert snapshot["deployed"]["path"] == a.path


def test_fresh_host_differing_from_upstream_is_dirty_and_changes_nothing(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    host.install(a)
    host.publish(b)
    before = host.links()
    result = deploy(host)
    assert result.returncode == 0, result
    assert host.links() == {**before, "upstream": b.path}, "only the collection pinned upstream"
    assert record(host) is None and deployed_mirror(host) is None
    assert host.activations() == [] and host.recorded("nix-env") == []
    assert decisions(host) == [("nothing", "dirty")]
    assert host.snapshot()["dirty"] is True
    assert metric(host.metrics(), "nixos_autodeploy_dirty") == 1


def test_differing_record_and_matching_upstream_resumes_tracking(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    host.install(a)
    host.write_deployed(b)
    host.publish(a)
    result = deploy(host)
    assert result.returncode == 0, result
    assert_record(host, a, "switch", previous=a)
    assert_links(host, current=a, profile=a)
    assert host.activations() == []
    assert decisions(host) == [("track", "untracked")]
    assert host.snapshot()["state"] == "up-to-date"


def test_differing_record_and_differing_upstream_is_dirty(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    host.install(a)
    host.write_deployed(b)
    host.publish(c)
    before_record = (host.state_dir / "deployed.json").read_bytes()
    before = host.links()
    result = deploy(host)
    assert result.returncode == 0, result
    assert host.links() == {**before, "upstream": c.path}
    assert (host.state_dir / "deployed.json").read_bytes() == before_record
    assert host.activations() == [] and host.recorded("nix-env") == []
    assert decisions(host) == [("nothing", "dirty")]
    (reason,) = [line for line in result.stderr.splitlines() if "dirty:" in line]
    for name in (a.basename, b.basename, c.basename, "--force overrides"):
        assert name in reason, reason


def test_tracking_and_same_upstream_is_up_to_date_and_runs_nothing(host: Host) -> None:
    a = host.build_one("a")
    tracking(host, a, a)
    before = host.links()
    before_record = (host.state_dir / "deployed.json").read_bytes()
    result = deploy(host, "--reboot-mode", "reboot")
    assert result.returncode == 0, result
    assert host.links() == {**before, "upstream": a.path}
    assert (host.state_dir / "deployed.json").read_bytes() == before_record
    assert host.activations() == []
    assert host.recorded("nix-env") == [] and host.recorded("systemd-run") == []
    assert host.recorded("systemctl") == [] and host.recorded("kexec") == []
    assert decisions(host) == [("nothing", "up-to-date")]
    assert not (host.state_dir / "deploys.json").exists()


def test_tracking_and_new_upstream_deploys(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    result = deploy(host)
    assert result.returncode == 0, result
    assert host.activations() == [("switch", b.path)]
    assert host.recorded("nix-env") == [["--profile", str(host.profile_link), "--set", b.path]]
    assert_links(host, current=b, profile=b, booted=a)
    assert host.boot_default() == b.path
    assert_record(host, b, "switch", previous=a)
    assert host.recorded("systemctl") == [] and host.recorded("kexec") == []
    # One history line per decision and per action.
    events = history(host)
    assert [e["event"] for e in events] == ["decision", "health", "deploy"]
    assert (events[0]["action"], events[0]["state"]) == ("deploy", "update-available")
    assert b.basename in events[0]["reason"]
    assert (events[1]["path"], events[1]["ok"]) == (b.path, True)
    assert {k: events[2][k] for k in ("path", "mode", "result", "message")} == {
        "path": b.path,
        "mode": "switch",
        "result": "success",
        "message": "",
    }
    deploys = host.read_json("deploys.json")
    assert deploys["totals"] == {"success": 1, "failure": 0}
    assert deploys["failed"] == {}
    assert deploys["last"]["result"] == "success"
    assert journal(host)["phase"] == "done"
    # The snapshot and metrics were refreshed after the deploy.
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["current"]) == ("up-to-date", b.path)
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_state", state="up-to-date") == 1
    assert metric(text, "nixos_autodeploy_last_deploy_success") == 1
    assert metric(text, "nixos_autodeploy_deployments_total", result="success") == 1
    assert metric(text, "nixos_autodeploy_deployments_total", result="failure") == 0
    assert metric(text, "nixos_autodeploy_last_deploy_timestamp_seconds") == pytest.approx(
        deploys["last"]["at"]
    )
    # `status` shows the last deploy.
    shown = json.loads(host.status("--json").stdout)
    assert (shown["state"], shown["deployed"]) == ("up-to-date", b.path)
    assert shown["last_deploy"]["path"] == b.path
    assert shown["last_deploy"]["result"] == "success"
    table = host.run_agent("status", env={"COLUMNS": "250"})
    assert table.returncode == 0, table
    assert "last deploy: success (switch)" in table.stdout


@pytest.mark.parametrize("with_profile", [False, True], ids=["switch-only", "nix-env-then-switch"])
def test_manual_deploy_while_tracking_is_dirty_and_left_alone(
    host: Host, with_profile: bool
) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("manual"))
    a, manual = systems["a"], systems["manual"]
    tracking(host, a, a)
    assert deploy(host).returncode == 0
    assert decisions(host) == [("nothing", "up-to-date")]
    if with_profile:
        host.deploy_by_hand(manual, "switch")  # what nixos-rebuild switch and colmena do
    else:
        host.switch_by_hand(manual)
    activations = host.activations()
    before = host.links()
    before_record = (host.state_dir / "deployed.json").read_bytes()
    result = deploy(host)
    assert result.returncode == 0, result
    assert host.links() == before
    assert before["current"] == manual.path
    assert before["profile"] == (manual.path if with_profile else a.path)
    assert (host.state_dir / "deployed.json").read_bytes() == before_record
    assert host.activations() == activations
    assert host.recorded("nix-env") == []
    assert decisions(host)[-1] == ("nothing", "dirty")
    (reason,) = [line for line in result.stderr.splitlines() if "dirty:" in line]
    assert manual.basename in reason and a.basename in reason, reason
    assert "--force overrides" in reason
    assert host.snapshot()["dirty"] is True
    assert metric(host.metrics(), "nixos_autodeploy_dirty") == 1


# ---- beyond them --------------------------------------------------------------------


def test_force_deploys_a_dirty_host(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    host.install(a)
    host.publish(b)
    result = deploy(host, "--force")
    assert result.returncode == 0, result
    assert host.activations() == [("switch", b.path)]
    assert_links(host, current=b, profile=b)
    assert_record(host, b, "switch", previous=a)
    assert decisions(host) == [("deploy", "dirty")]
    assert host.snapshot()["state"] == "up-to-date"


def test_upstream_that_is_not_a_nixos_system_is_refused(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b", nixos=False))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    before_record = (host.state_dir / "deployed.json").read_bytes()
    result = deploy(host)
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert b.path in error and "not a NixOS system" in error
    # Realised and pinned (the collector's preview), but nothing else moved.
    assert host.upstream() == b.path
    assert host.activations() == []
    assert host.recorded("nix-env") == []
    assert (host.state_dir / "deployed.json").read_bytes() == before_record
    assert_links(host, current=a, profile=a, booted=a)
    assert host.snapshot()["state"] == "update-available"


# ---- the snapshot a deploy acts on --------------------------------------------------


def test_fresh_snapshot_is_used_and_a_stale_one_is_collected_again(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, a)
    assert host.collect().returncode == 0
    host.publish(b)  # CI moved on since the collector's last run
    host.server.reset_requests()

    fresh = deploy(host, "--max-snapshot-age", "600")
    assert fresh.returncode == 0, fresh
    assert host.server.count() == 0, "a fresh snapshot needs no fetch"
    assert decisions(host) == [("nothing", "up-to-date")]
    assert host.activations() == []

    path = host.state_dir / "snapshot.json"
    snapshot = json.loads(path.read_text())
    # Upstream fetched an hour longer ago than --max-snapshot-age allows.
    snapshot["upstream"]["fetched_at"] -= 3600
    path.write_text(json.dumps(snapshot))
    stale = deploy(host, "--max-snapshot-age", "600")
    assert stale.returncode == 0, stale
    # One fetch to collect first, one by the health check after the switch (upstream still
    # reachable from the new system).
    assert host.server.count("/upstream") == 2, "a stale snapshot is collected again first"
    assert host.read_json("deploys.json")["health"]["checks"][0]["name"] == "upstream"
    assert decisions(host)[-1] == ("deploy", "update-available")
    assert host.activations() == [("switch", b.path)]
    assert_record(host, b, "switch", previous=a)


def test_deploy_with_another_url_fetches_it_first(host: Host) -> None:
    """The snapshot's upstream came from another URL: collect the asked one first."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, a)
    assert host.collect().returncode == 0
    host.publish(b, "/other")
    other = host.server.url("/other")
    result = host.run_agent("deploy", "--url", other, "--prometheus-path", str(host.metrics_path))
    assert result.returncode == 0, result
    # Collected first, then fetched by the health check after the switch.
    assert host.server.count("/other") == 2
    assert_links(host, current=b, profile=b)
    assert host.snapshot()["upstream"]["url"] == other


def test_a_deploy_that_fetched_nothing_keeps_the_collect_time(host: Host) -> None:
    """The timestamp (and the file's mtime) say when the collector last collected."""
    a = host.build_one("a")
    tracking(host, a, a)
    assert host.collect().returncode == 0
    collected_at = metric(host.metrics(), "nixos_autodeploy_last_collect_timestamp_seconds")
    assert host.metrics_path.stat().st_mtime == pytest.approx(collected_at)
    os.utime(host.metrics_path, (collected_at - 100, collected_at - 100))
    host.server.reset_requests()
    assert deploy(host).returncode == 0
    assert host.server.count() == 0
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_last_collect_timestamp_seconds") == collected_at
    assert host.snapshot()["collected_at"] == collected_at
    assert host.metrics_path.stat().st_mtime == pytest.approx(collected_at)


# ---- dry runs -----------------------------------------------------------------------


# The switch-reboot case: a switch into a new kernel leaves a reboot required, so the real
# run reboots after it (test_reboot_modes.py:
# test_switch_into_a_new_kernel_reboots_once); a dry run says so too.
DRY_RUNS = {
    "switch": (["--switch-mode", "switch"], "switch", []),
    "boot-kexec": (["--switch-mode", "boot", "--reboot-mode", "kexec"], "boot", ["kexec"]),
    "switch-reboot": (["--switch-mode", "switch", "--reboot-mode", "reboot"], "switch", ["reboot"]),
}


@pytest.mark.parametrize("case", list(DRY_RUNS))
def test_dry_run_prints_the_decision_and_commands_and_changes_nothing(
    host: Host, case: str
) -> None:
    args, activation, reboot = DRY_RUNS[case]
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    assert host.collect().returncode == 0
    before, before_files = host.links(), state_files(host)
    before_metrics = host.metrics()
    host.server.reset_requests()
    nix_runs = host.spawn_count("nix-store", "nix-env", "nix")
    result = deploy(host, "--dry-run", *args)
    assert result.returncode == 0, result
    expected = [
        ["nix-env", "--profile", str(host.profile_link), "--set", new.path],
        [f"{new}/bin/switch-to-configuration", activation],
    ]
    if reboot == ["reboot"]:
        expected.append(["systemctl", "reboot"])
    if reboot == ["kexec"]:
        # A kexec trial boot: the profile and the boot loader follow after its checks.
        expected = [
            [
                "kexec",
                "--load",
                f"{new}/kernel",
                f"--initrd={new}/initrd",
                f"--append=loglevel=4 autodeploy=new init={new}/init panic=30 boot.panic_on_fail",
            ],
            ["systemctl", "kexec"],
        ]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("decision: deploy: "), result
    assert new.basename in lines[0] and f"({activation})" in lines[0]
    assert lines[1:] == ["would run: " + shlex.join(argv) for argv in expected]
    assert host.links() == before
    assert state_files(host) == before_files
    assert host.metrics() == before_metrics
    assert host.activations() == []
    assert host.spawn_count("nix-store", "nix-env", "nix") == nix_runs
    assert host.recorded("systemctl") == [] and host.recorded("kexec") == []
    assert host.server.count() == 0


def test_dry_run_under_systemd_runs_the_activation_in_its_own_unit(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    assert host.collect().returncode == 0
    (host.root / "run/systemd/system").mkdir(parents=True)  # systemd is PID 1 on this host
    result = deploy(host, "--dry-run")
    assert result.returncode == 0, result
    switch = shlex.split(result.stdout.splitlines()[-1].removeprefix("would run: "))
    assert switch[0] == "systemd-run"
    assert {"--wait", "--pipe", "--collect"} <= set(switch)
    assert any(arg.startswith("--unit=") for arg in switch)
    assert switch[-3:] == ["--", f"{b}/bin/switch-to-configuration", "switch"]
    assert host.recorded("systemd-run") == [] and host.activations() == []


def test_dry_run_fetches_nothing_without_a_fresh_snapshot(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    before = host.links()

    none = deploy(host, "--dry-run")
    assert none.returncode == 1, none
    (error,) = error_lines(none)
    assert "no snapshot yet" in error and "run collect first" in error
    assert host.server.count() == 0 and host.links() == before

    host.publish(a)
    assert host.collect().returncode == 0
    host.publish(b)  # CI moved on; the snapshot does not know yet
    path = host.state_dir / "snapshot.json"
    snapshot = json.loads(path.read_text())
    snapshot["upstream"]["fetched_at"] -= 7200
    path.write_text(json.dumps(snapshot))
    before, before_files = host.links(), state_files(host)
    host.server.reset_requests()

    stale = deploy(host, "--dry-run")
    assert stale.returncode == 0, stale
    assert "a real run would collect first" in stale.stderr
    assert stale.stdout.startswith("decision: nothing: up to date")
    assert host.server.count() == 0
    assert host.links() == before and state_files(host) == before_files
