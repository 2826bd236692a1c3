"""Health checks after a switch and the automatic rollback, end to end: real Nix, a signed
binary cache and the upstream URL on loopback, a sandbox root, the operator's checks as
real commands and a real HTTP server. (systemd's own verdict needs systemd: the guest.)"""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest
from harness import AgentResult, Host, Reply, System, SystemSpec, error_lines, metric

from actuator.transaction import STOP_AT

pytestmark = pytest.mark.nix


def deploy(host: Host, *args: str, env: dict[str, str] | None = None) -> AgentResult:
    return host.run_agent(
        "deploy",
        "--url",
        host.url,
        "--timeout",
        "5",
        "--prometheus-path",
        str(host.metrics_path),
        "--health-timeout",
        "1",  # one round: a failing check fails at once
        *args,
        env=env,
    )


def not_running(host: Host, system: System) -> str:
    """A check command that fails while system runs on the host."""
    return f'[ "$(readlink {host.current_link})" != {system.path} ]'


def tracking(host: Host, installed: System, upstream: System) -> None:
    host.install(installed)
    host.write_deployed(installed, previous=installed)
    host.publish(upstream)
    assert host.collect().returncode == 0


def history(host: Host) -> list[dict[str, Any]]:
    path = host.state_dir / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


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
    tracking(host, a, b)
    check = not_running(host, b)
    result = deploy(host, "--health-check", check)
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
    again = deploy(host)
    assert again.returncode == 0, again
    assert "not retried" in again.stderr
    assert host.activations() == [("switch", b.path), ("switch", a.path)]

    # A newer upstream passes the same check and stays.
    host.publish(c)
    assert host.collect().returncode == 0
    third = deploy(host, "--health-check", check)
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
    tracking(host, a, b)
    # As if b's configuration broke the network: from now on the upstream URL gives no answer.
    host.server.route("/upstream", Reply(close=True))
    result = deploy(host, "--timeout", "2")
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert error.startswith(f"error: {b.basename} failed its health checks: check 'upstream'")
    assert "connection failed" in error
    assert host.activations() == [("switch", b.path), ("switch", a.path)]
    assert_back_on(host, a, b)


def test_a_hanging_check_is_killed_and_rolled_back(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    result = deploy(host, "--health-check", "echo checking; sleep 600", "--health-timeout", "2")
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
    tracking(host, a, b)
    tries = host.tmp / "tries"
    check = f"echo x >> {tries}; [ $(wc -l < {tries}) -ge 2 ]"
    # One retry, RETRY_INTERVAL (5s) later, well within the deadline.
    result = deploy(host, "--health-check", check, "--health-timeout", "60")
    assert result.returncode == 0, result
    assert host.activations() == [("switch", b.path)]
    deploys = host.read_json("deploys.json")
    assert (deploys["health"]["ok"], deploys["health"]["attempts"]) == (True, 2)
    assert deploys["rollbacks"] == 0 and deploys["last_rollback"] is None
    assert host.snapshot()["state"] == "up-to-date"
    assert metric(host.metrics(), "nixos_autodeploy_last_health_check_success") == 1


def test_no_health_checks_keeps_a_system_that_would_fail_them(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    result = deploy(host, "--health-check", not_running(host, b), "--no-health-checks")
    assert result.returncode == 0, result
    assert host.activations() == [("switch", b.path)]
    assert host.read_json("deploys.json")["health"] is None


def test_killed_during_the_checks_the_next_run_checks_again_and_rolls_back(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    check = not_running(host, b)
    killed = deploy(host, "--health-check", check, env={STOP_AT: "checking"})
    assert killed.returncode == -signal.SIGKILL, killed
    assert host.read_json("journal.json")["phase"] == "checking"
    # Meanwhile the collector sees a deploy under way, not a hand deploy.
    assert host.collect().returncode == 0
    assert host.snapshot()["dirty"] is False

    result = deploy(host, "--health-check", check)
    assert result.returncode == 1, result
    assert f"check '{check}' failed" in error_lines(result)[0]
    assert host.activations() == [("switch", b.path), ("switch", a.path)]
    assert host.read_json("journal.json")["phase"] == "rolled-back"
    assert_back_on(host, a, b)


def test_a_rollback_that_fails_says_so_and_the_next_run_finishes_it(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    check = not_running(host, b)
    host.fail_activation(a, "a cannot start again")
    result = deploy(host, "--health-check", check)
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
    finished = deploy(host, "--health-check", check)
    assert finished.returncode == 0, finished
    assert host.activations()[-1] == ("switch", a.path)
    assert_back_on(host, a, b)
