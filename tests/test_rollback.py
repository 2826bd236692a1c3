"""Failed deploys end to end: a system whose activation or health checks fail is switched
back, remembered per path and not retried until upstream changes (--force deploys it
anyway), and says why in status, history and metrics; a failure of Nix itself is retried.

Real Nix, a signed binary cache and the upstream URL on loopback, a sandbox root, the
operator's checks as real commands and a real HTTP server. (systemd's own verdict needs
systemd: the guest. The checks on their own are in test_health.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from harness import (
    NEW_KERNEL,
    AgentResult,
    Host,
    Reply,
    System,
    SystemSpec,
    error_lines,
    metric,
    point_link,
)
from harness.deploys import (
    STOP_AT,
    assert_links,
    assert_record,
    deploy,
    deployed_mirror,
    fail_nix_env,
    history,
    journal,
    kill_agent_when,
    not_running,
    record,
    tracking,
)

pytestmark = pytest.mark.nix


def checked_deploy(host: Host, *args: str, env: dict[str, str] | None = None) -> AgentResult:
    """A deploy whose health checks get one round: a failing check fails at once."""
    return deploy(host, "--health-timeout", "1", *args, timeout=5, env=env)


# ---- a failing activation -----------------------------------------------------------


def test_failing_activation_is_reported_recorded_and_not_retried(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b)
    before_record = (host.state_dir / "deployed.json").read_bytes()
    host.fail_activation(b, "unit nginx.service failed to start")
    result = deploy(host)
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert "unit nginx.service failed to start" in error
    assert b.basename in error
    # The failed switch, then the old system's `boot` making it the boot default again.
    assert host.activations() == [("switch", b.path), ("boot", a.path)]
    assert record(host) == {**json.loads(before_record), "complete": True}
    # The mirror follows the unchanged record (the test wrote the record without it).
    assert deployed_mirror(host) == a.path
    assert_links(host, current=a, profile=a, booted=a)
    assert host.boot_default() == a.path
    deploys = host.read_json("deploys.json")
    assert deploys["totals"] == {"success": 0, "failure": 1}
    assert list(deploys["failed"]) == [b.path]
    last = deploys["last"]
    assert (last["path"], last["mode"], last["result"]) == (b.path, "switch", "failure")
    assert "unit nginx.service failed to start" in last["message"]
    assert [e["event"] for e in history(host)] == ["decision", "deploy", "rolled-back"]
    assert history(host)[1]["result"] == "failure"
    assert journal(host)["phase"] == "rolled-back"
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_last_deploy_success") == 0
    assert metric(text, "nixos_autodeploy_deployments_total", result="failure") == 1
    assert metric(text, "nixos_autodeploy_deployments_total", result="success") == 0
    assert host.snapshot()["last_deploy"]["result"] == "failure"

    # Not retried: the same upstream path would fail the same way.
    (host.root / "fail-activation").unlink()
    again = deploy(host)
    assert again.returncode == 0, again
    assert host.activations() == [("switch", b.path), ("boot", a.path)]
    assert "not retried" in again.stderr
    assert host.read_json("deploys.json") == deploys
    assert_links(host, current=a, profile=a)

    # Upstream moved on: deployed.
    host.publish(c)
    assert host.collect().returncode == 0
    third = deploy(host)
    assert third.returncode == 0, third
    assert host.activations() == [("switch", b.path), ("boot", a.path), ("switch", c.path)]
    assert_links(host, current=c, profile=c)
    assert_record(host, c, "switch", previous=a)
    deploys = host.read_json("deploys.json")
    assert deploys["totals"] == {"success": 1, "failure": 1}
    assert list(deploys["failed"]) == [b.path], "b failed; c's success does not erase it"
    assert metric(host.metrics(), "nixos_autodeploy_last_deploy_success") == 1


def test_activation_failing_after_its_switch_is_rolled_back(host: Host) -> None:
    """NixOS's switch-to-configuration points current and the boot loader at the new
    system before it starts units: a unit that fails leaves current on it (exit 4). The
    rollback switches back to what ran before; the failed system is never adopted."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b)
    host.fail_activation_late(b, "nginx.service failed to start")
    result = deploy(host)
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert "nginx.service failed to start" in error
    assert host.activations() == [("switch", b.path), ("switch", a.path)]
    assert_links(host, current=a, profile=a)
    assert host.boot_default() == a.path
    assert_record(host, a, "switch", previous=a)
    assert list(host.read_json("deploys.json")["failed"]) == [b.path]

    again = deploy(host)
    assert again.returncode == 0, again
    assert "not retried until upstream changes" in again.stderr
    assert host.activations() == [("switch", b.path), ("switch", a.path)]
    host.publish(c)
    assert host.collect().returncode == 0
    assert deploy(host).returncode == 0
    assert_links(host, current=c, profile=c)
    assert_record(host, c, "switch", previous=a)


def test_upstream_b_then_a_then_b_again_retries_b(host: Host) -> None:
    """An operator re-published b after it failed: a change, so b is tried again."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    host.fail_activation_late(b)
    assert deploy(host).returncode == 1
    (host.root / "fail-activation-late").unlink()  # fixed, say, on the cache's side
    assert "not retried" in deploy(host).stderr
    for system in (a, b):
        host.publish(system)
        assert host.collect().returncode == 0
        assert deploy(host).returncode == 0
    assert_links(host, current=b, profile=b)
    assert_record(host, b, "switch", previous=a)
    assert host.read_json("deploys.json")["failed"] == {}, "a success forgets the failure"


def test_force_deploys_a_failed_system_left_running(host: Host) -> None:
    """A failed b still runs (as an earlier version left it: record a, profile and
    boot default a). --force deploys it: profile, activation; after a reboot it runs."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    assert host.collect().returncode == 0
    host.switch_by_hand(b)
    point_link(host.boot_default_link, a.path)
    failure = {"at": time.time(), "path": b.path, "mode": "switch", "result": "failure"}
    legacy = {
        "version": 1,
        "last": {**failure, "message": "b failed"},
        "totals": {"success": 0, "failure": 1},
        "failed_path": b.path,
    }
    (host.state_dir / "deploys.json").write_text(json.dumps(legacy))
    held = deploy(host)
    assert held.returncode == 0, held
    assert "not tracking it" in held.stderr
    forced = deploy(host, "--force")
    assert forced.returncode == 0, forced
    assert host.recorded("nix-env") == [["--profile", str(host.profile_link), "--set", b.path]]
    assert host.profile() == b.path and host.boot_default() == b.path
    assert record(host)["path"] == b.path
    host.reboot()
    assert deploy(host).returncode == 0
    assert host.current() == b.path
    assert host.snapshot()["state"] == "up-to-date"


def test_a_failure_while_a_boot_waits_keeps_the_waiting_boot(host: Host) -> None:
    """While b (boot mode) waits for its reboot, c is published; c's deploy is killed,
    then c fails. The profile, the boot default and the record stay on b; after the
    reboot the host runs b and is not dirty."""
    systems = host.build(
        SystemSpec("a"), SystemSpec("b", kernel=NEW_KERNEL), SystemSpec("c", kernel=NEW_KERNEL)
    )
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b)
    assert deploy(host, "--switch-mode", "boot").returncode == 0
    host.publish(c)
    assert host.collect().returncode == 0
    kill_agent_when(host, "nix-env", c.path, after=True)
    assert deploy(host, "--switch-mode", "boot").returncode == -signal.SIGKILL
    host.fail_activation(c)
    failed = deploy(host, "--switch-mode", "boot")
    assert failed.returncode == 1, failed
    assert host.profile() == b.path and host.boot_default() == b.path
    assert_record(host, b, "boot", previous=a)
    assert host.snapshot()["dirty"] is False
    host.reboot()
    assert deploy(host, "--switch-mode", "boot").returncode == 0
    assert host.current() == b.path
    assert (host.snapshot()["state"], host.snapshot()["dirty"]) == ("update-available", False)


# ---- a failure of Nix itself --------------------------------------------------------


def test_a_passing_nix_failure_does_not_block_the_retry(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    wrapper = fail_nix_env(host)
    failed = deploy(host)
    assert failed.returncode == 1, failed
    assert "No space left on device" in error_lines(failed)[0]
    deploys = host.read_json("deploys.json")
    assert (deploys["last"]["result"], deploys["failed"]) == ("failure", {})
    assert_links(host, current=a, profile=a)
    (host.bin_dir / "nix-env").write_text(wrapper)
    assert deploy(host).returncode == 0
    assert_links(host, current=b, profile=b)


def test_a_nix_failure_does_not_erase_an_earlier_failed_system(host: Host) -> None:
    """First b fails late; c is published; c's deploy fails in Nix; the next deploy of c
    succeeds. Never dirty, and b stays remembered as failed."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b)
    host.fail_activation_late(b)
    assert deploy(host).returncode == 1
    host.publish(c)
    assert host.collect().returncode == 0
    wrapper = fail_nix_env(host)
    failed = deploy(host)
    assert failed.returncode == 1, failed
    assert "No space left on device" in error_lines(failed)[0]
    assert list(host.read_json("deploys.json")["failed"]) == [b.path]
    assert host.snapshot()["dirty"] is False
    (host.bin_dir / "nix-env").write_text(wrapper)
    result = deploy(host)
    assert result.returncode == 0, result
    assert_links(host, current=c, profile=c)
    assert_record(host, c, "switch", previous=a)
    assert host.snapshot()["state"] == "up-to-date"


# ---- failing health checks ----------------------------------------------------------


def assert_back_on(host: Host, good: System, failed: System) -> None:
    """good runs, is the profile and the boot default, and is the deployed record; the host
    reads update-available against it, never dirty; failed is not retried."""
    assert (host.current(), host.profile(), host.boot_default()) == (good.path,) * 3
    assert host.read_json("deployed.json")["path"] == good.path
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["dirty"]) == ("update-available", False)
    assert failed.path in host.read_json("deploys.json")["failed"]
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_dirty") == 0
    assert metric(text, "nixos_autodeploy_last_health_check_success") == 0
    assert metric(text, "nixos_autodeploy_rollbacks_total") == 1
    assert metric(text, "nixos_autodeploy_last_rollback_success") == 1


def test_failing_operator_check_rolls_back_and_is_not_retried(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b, collect=True)
    check = not_running(host, b)
    result = checked_deploy(host, "--health-check", check)
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert error == f"error: {b.basename} failed its health checks: check '{check}' failed: exit 1"
    # The switch, then the old system's switch back; its boot loader entry came with it.
    assert host.activations() == [("switch", b.path), ("switch", a.path)]
    assert_back_on(host, a, b)
    deploys = host.read_json("deploys.json")
    assert deploys["health"]["ok"] is False and deploys["health"]["path"] == b.path
    assert deploys["health"]["checks"][-1] == {"name": check, "ok": False, "output": ["exit 1"]}
    rollback = deploys["last_rollback"]
    assert (rollback["from"], rollback["to"], rollback["ok"]) == (b.path, a.path, True)
    assert rollback["reason"] == error.removeprefix("error: ")
    events = [e["event"] for e in history(host)]
    assert events == ["decision", "health", "deploy", "rolled-back"]
    status = host.run_agent("status", env={"COLUMNS": "400"}).stdout
    assert f"rolled back from {b.path} at " in status and f"check '{check}' failed" in status

    # Not retried while upstream stays on b, even with the check gone.
    again = checked_deploy(host)
    assert again.returncode == 0, again
    assert "not retried" in again.stderr
    assert host.activations() == [("switch", b.path), ("switch", a.path)]

    # A newer upstream passes the same check and stays.
    host.publish(c)
    assert host.collect().returncode == 0
    third = checked_deploy(host, "--health-check", check)
    assert third.returncode == 0, third
    assert host.activations()[-1] == ("switch", c.path)
    assert (host.current(), host.profile(), host.boot_default()) == (c.path,) * 3
    assert host.snapshot()["state"] == "up-to-date"
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_last_health_check_success") == 1
    assert metric(text, "nixos_autodeploy_rollbacks_total") == 1


def test_upstream_unreachable_after_the_switch_rolls_back(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b, collect=True)
    # As if b's configuration broke the network: from now on the upstream URL gives no answer.
    host.server.route("/upstream", Reply(close=True))
    result = checked_deploy(host, "--timeout", "2")
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert error.startswith(f"error: {b.basename} failed its health checks: check 'upstream'")
    assert "connection failed" in error
    assert host.activations() == [("switch", b.path), ("switch", a.path)]
    assert_back_on(host, a, b)


def test_a_hanging_check_is_killed_and_rolled_back(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b, collect=True)
    result = checked_deploy(
        host, "--health-check", "echo checking; sleep 600", "--health-timeout", "2"
    )
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert error.endswith("check 'echo checking; sleep 600' failed: killed after 2s")
    assert host.read_json("deploys.json")["health"]["checks"][-1]["output"] == [
        "checking",
        "killed after 2s",
    ]
    assert_back_on(host, a, b)


def test_a_check_passing_late_within_the_deadline_keeps_the_deploy(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b, collect=True)
    tries = host.tmp / "tries"
    check = f"echo x >> {tries}; [ $(wc -l < {tries}) -ge 2 ]"
    # One retry, RETRY_INTERVAL (5s) later, well within the deadline.
    result = checked_deploy(host, "--health-check", check, "--health-timeout", "60")
    assert result.returncode == 0, result
    assert host.activations() == [("switch", b.path)]
    deploys = host.read_json("deploys.json")
    assert (deploys["health"]["ok"], deploys["health"]["attempts"]) == (True, 2)
    assert deploys["rollbacks"] == 0 and deploys["last_rollback"] is None
    assert host.snapshot()["state"] == "up-to-date"
    assert metric(host.metrics(), "nixos_autodeploy_last_health_check_success") == 1


def unit_like_path(host: Host) -> str:
    """PATH as a NixOS unit has it: the tools, but no shell (systemd puts none on it)."""
    tools = host.tmp / "unit-path"
    tools.mkdir()
    shells = {"sh", "bash", "dash", "zsh", "ksh", "mksh", "busybox"}
    for directory in os.environ["PATH"].split(os.pathsep):
        for program in Path(directory).glob("*") if Path(directory).is_dir() else ():
            target = tools / program.name
            if program.name not in shells and not target.exists() and os.access(program, os.X_OK):
                target.symlink_to(program)
    return f"{host.bin_dir}{os.pathsep}{tools}"


def test_a_command_check_passes_under_a_unit_path_without_a_shell(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b, collect=True)
    path = unit_like_path(host)
    assert shutil.which("sh", path=path) is None
    result = checked_deploy(host, "--health-check", "true", env={"PATH": path})
    assert result.returncode == 0, result
    assert host.activations() == [("switch", b.path)]
    deploys = host.read_json("deploys.json")
    assert deploys["health"]["ok"] is True and deploys["rollbacks"] == 0


def test_no_health_checks_keeps_a_system_that_would_fail_them(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b, collect=True)
    result = checked_deploy(host, "--health-check", not_running(host, b), "--no-health-checks")
    assert result.returncode == 0, result
    assert host.activations() == [("switch", b.path)]
    assert host.read_json("deploys.json")["health"] is None


def test_killed_during_the_checks_the_next_run_checks_again_and_rolls_back(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b, collect=True)
    check = not_running(host, b)
    killed = checked_deploy(host, "--health-check", check, env={STOP_AT: "checking"})
    assert killed.returncode == -signal.SIGKILL, killed
    assert host.read_json("journal.json")["phase"] == "checking"
    # Meanwhile the collector sees a deploy under way, not a hand deploy.
    assert host.collect().returncode == 0
    assert host.snapshot()["dirty"] is False

    result = checked_deploy(host, "--health-check", check)
    assert result.returncode == 1, result
    assert f"check '{check}' failed" in error_lines(result)[0]
    assert host.activations() == [("switch", b.path), ("switch", a.path)]
    assert host.read_json("journal.json")["phase"] == "rolled-back"
    assert_back_on(host, a, b)


def test_a_rollback_that_fails_says_so_and_the_next_run_finishes_it(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b, collect=True)
    check = not_running(host, b)
    host.fail_activation(a, "a cannot start again")
    result = checked_deploy(host, "--health-check", check)
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert f"check '{check}' failed" in error and "rolling back failed too" in error
    assert "a cannot start again" in error
    rollback = host.read_json("deploys.json")["last_rollback"]
    assert rollback["ok"] is False and "a cannot start again" in rollback["reason"]
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_last_rollback_success") == 0
    assert metric(text, "nixos_autodeploy_rollbacks_total") == 1
    assert metric(text, "nixos_autodeploy_last_deploy_success") == 0

    (host.root / "fail-activation").unlink()
    finished = checked_deploy(host, "--health-check", check)
    assert finished.returncode == 0, finished
    assert host.activations()[-1] == ("switch", a.path)
    assert_back_on(host, a, b)
