"""Reboot orchestration end to end: maintenance windows and FleetLock reboot slots, on
sandbox hosts with real Nix, a real FleetLock server on 127.0.0.1 (the harness', written
from the protocol) and only `systemctl`/`kexec` recorded. The clock is the host's local
time: a test picks the time of day by the agent's TZ, never by waiting."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import (
    FAULTS,
    NEW_KERNEL,
    AgentResult,
    Fault,
    FleetLockServer,
    Host,
    NixBuilder,
    SigningKey,
    System,
    SystemSpec,
    TestServer,
    error_lines,
    metric,
)
from harness.deploys import STOP_AT, deploy, events_named, history, start_deploy, tracking

from actuator import fleetlock
from collector.config import Paths

pytestmark = pytest.mark.nix

REASONS = ("window", "fleet-lock", "operator")


# ---- helpers -------------------------------------------------------------------------


@pytest.fixture
def second_host(tmp_path: Path, nix_build_store: Path, signing_key: SigningKey) -> Iterator[Host]:
    """Another sandbox host with its own root, cache and server (same build store)."""
    work = tmp_path / "second"
    (work / "cache").mkdir(parents=True)
    server = TestServer(cache_dir=work / "cache")
    server.start()
    builder = NixBuilder(
        build_store=nix_build_store,
        cache_dir=work / "cache",
        key=signing_key,
        root=work / "root",
        salt=uuid.uuid4().hex[:12],
        cache_home=work / "xdg-cache",
    )
    yield Host(tmp=work, builder=builder, server=server)
    server.stop()


def local_tz(hhmm: str) -> tuple[str, str]:
    """A POSIX TZ under which the local time is now about `hhmm` (a few seconds past), and
    the weekday it then is there."""
    utc = datetime.now(UTC)
    hours, minutes = map(int, hhmm.split(":"))
    wanted = utc.replace(hour=hours, minute=minutes, second=0, microsecond=0)
    delta = (wanted - utc.replace(second=0, microsecond=0)) / timedelta(minutes=1)
    delta = (delta + 12 * 60) % (24 * 60) - 12 * 60  # within a day either way
    sign = "-" if delta >= 0 else "+"  # POSIX TZ offsets count west of Greenwich
    zone = f"LOC{sign}{int(abs(delta)) // 60:02d}:{int(abs(delta)) % 60:02d}"
    local = utc + timedelta(minutes=delta)
    return zone, local.strftime("%a")


def pending_reboot_host(host: Host, machine_id: str) -> tuple[System, System]:
    """A tracked host whose upstream brings a new kernel, so its deploy waits for a reboot."""
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    (host.root / "etc").mkdir(exist_ok=True)
    (host.root / "etc/machine-id").write_text(machine_id + "\n")
    return old, new


def rebooting_deploy(
    host: Host, *args: str, tz: str = "UTC", stop_at: str | None = None
) -> AgentResult:
    """A boot-mode deploy that reboots into what it deployed, on a clock in time zone tz
    (the agent's default fetch timeout); stop_at: the journal phase it is killed at."""
    args = ("--switch-mode", "boot", "--reboot-mode", "reboot", *args)
    env = {"TZ": tz} | ({STOP_AT: stop_at} if stop_at else {})
    return deploy(host, *args, timeout=None, env=env)


def locked_deploy(
    host: Host, server: FleetLockServer, *args: str, tz: str = "UTC", stop_at: str | None = None
) -> AgentResult:
    return rebooting_deploy(host, "--fleet-lock-url", server.url, *args, tz=tz, stop_at=stop_at)


def ident(host: Host) -> str:
    return fleetlock.host_id(Paths(str(host.root), str(host.state_dir)))


def reasons(host: Host) -> dict[str, float]:
    text = host.metrics()
    return {r: metric(text, "nixos_autodeploy_reboot_pending_reason", reason=r) for r in REASONS}


def only(reason: str | None) -> dict[str, float]:
    return {r: float(r == reason) for r in REASONS}


def status_line(host: Host, start: str) -> str:
    table = host.run_agent("status", env={"COLUMNS": "250"})
    assert table.returncode == 0, table
    lines = [line for line in table.stdout.splitlines() if line.startswith(start)]
    assert len(lines) == 1, table.stdout
    return lines[0]


def waiting(host: Host) -> Any:
    return host.snapshot()["reboot"]["waiting"]


def reboots(host: Host) -> int:
    return host.recorded("systemctl").count(["reboot"])


# ---- windows ---------------------------------------------------------------------------


def test_reboot_waits_for_its_window_then_happens_inside_it(
    host: Host, lock_server: FleetLockServer
) -> None:
    old, new = pending_reboot_host(host, "1" * 32)
    before = {p.name for p in host.state_dir.iterdir()}
    bad = rebooting_deploy(host, "--reboot-window", "Fri..Mon 02:00-04:00")
    assert bad.returncode == 1, bad
    assert error_lines(bad) == [
        "error: reboot window 'Fri..Mon 02:00-04:00': the range 'Fri..Mon' runs backwards "
        "(write it as two)"
    ]
    assert {p.name for p in host.state_dir.iterdir()} == before and host.activations() == []

    # Without --reboot-mode the deploy leaves the reboot to the operator, and says so.
    no_mode = deploy(host, "--switch-mode", "boot", timeout=None)
    assert no_mode.returncode == 0, no_mode
    assert host.activations() == [("boot", new.path)]
    assert host.snapshot()["state"] == "pending-reboot"
    assert reasons(host) == only("operator")
    shown = json.loads(host.status("--json").stdout)["reboot_wait"]
    assert (shown["reason"], shown["since"]) == ("operator", None)
    assert "nixos_autodeploy_reboot_waiting_since" not in host.metrics()

    noon, _ = local_tz("12:00")
    # A slot this host took before a crash: outside the window, it is not kept.
    lock_server.holders["default"] = [ident(host)]
    outside = locked_deploy(host, lock_server, "--reboot-window", "02:00-04:00", tz=noon)
    assert outside.returncode == 0, outside
    assert lock_server.held() == []
    assert reboots(host) == 0
    line = "reboot waits for window 02:00-04:00 (next opens "
    assert [x for x in outside.stderr_lines if x.startswith(line)], outside.stderr
    assert outside.stderr_lines[-1 - 0].startswith("state pending-reboot")
    assert waiting(host)["reason"] == "window"
    assert waiting(host)["message"].endswith(" 02:00)")
    assert reasons(host) == only("window")
    since = metric(host.metrics(), "nixos_autodeploy_reboot_waiting_since_timestamp_seconds")
    assert since == waiting(host)["since"]
    assert status_line(host, "reboot waits: ").startswith(f"reboot waits: {line}")
    assert [e["reason"] for e in events_named(host, "reboot-wait")] == ["window"]

    # Crossing midnight, on the day it is there: inside.
    night, day = local_tz("23:30")
    inside = locked_deploy(host, lock_server, "--reboot-window", "Mon..Fri 09:00-10:00",
                           "--reboot-window", f"{day} 23:00-01:00", tz=night)  # fmt: skip
    assert inside.returncode == 0, inside
    assert reboots(host) == 1 and lock_server.held() == [ident(host)]
    assert host.read_json("deployed.json")["reboot_issued_at"] is not None
    assert waiting(host) is None
    assert reasons(host)["window"] == 0
    assert [e["event"] for e in history(host)][-1] == "reboot"

    host.reboot()
    back = locked_deploy(host, lock_server, "--reboot-window", "02:00-04:00", tz=noon)
    assert back.returncode == 0, back
    assert (host.snapshot()["state"], host.current()) == ("up-to-date", new.path)
    assert reasons(host) == only(None) and reboots(host) == 1 and lock_server.held() == []
    assert old.path != new.path


# ---- FleetLock -------------------------------------------------------------------------


def test_a_dry_run_says_what_its_reboot_would_wait_for_and_takes_no_slot(
    host: Host, lock_server: FleetLockServer
) -> None:
    old, new = pending_reboot_host(host, "3" * 32)
    assert host.collect().returncode == 0  # a dry run fetches nothing itself
    before = {p.name: p.read_bytes() for p in host.state_dir.iterdir() if p.is_file()}
    noon, _ = local_tz("12:00")
    args = ("--dry-run", "--reboot-window", "02:00-04:00")
    outside = locked_deploy(host, lock_server, *args, tz=noon)
    assert outside.returncode == 0, outside
    lines = outside.stdout.splitlines()
    assert lines[0].startswith("decision: deploy"), outside
    assert lines[1].startswith("would wait: reboot waits for window 02:00-04:00 (next opens "), (
        lines
    )
    assert lines[2] == (
        f"would ask {lock_server.url} for a reboot slot in group default first, and wait "
        "while it refuses (a dry run takes none)"
    ), lines
    assert lines[-1] == "would run: systemctl reboot", lines

    inside = locked_deploy(
        host, lock_server, "--dry-run", "--reboot-window", "11:00-13:00", tz=noon
    )
    assert inside.returncode == 0, inside
    assert "would not wait: window 11:00-13:00 is open" in inside.stdout.splitlines(), inside

    # Nothing asked of the server, nothing rebooted, nothing written.
    assert lock_server.calls() == [] and reboots(host) == 0 and host.activations() == []
    after = {p.name: p.read_bytes() for p in host.state_dir.iterdir() if p.is_file()}
    assert after == before and host.current() == old.path != new.path

    # A real run the server refused: the next dry run says so, and still asks nothing.
    lock_server.holders["default"] = ["another host"]
    refused = locked_deploy(host, lock_server)
    assert refused.returncode == 0 and reboots(host) == 0, refused
    asked = len(lock_server.calls())
    again = locked_deploy(host, lock_server, "--dry-run")
    assert again.returncode == 0, again
    last = [line for line in again.stdout.splitlines() if line.startswith("last time: ")]
    assert last == [f"last time: {waiting(host)['message']}"], again
    assert "reboot slot refused by fleet lock" in last[0]
    assert len(lock_server.calls()) == asked and reboots(host) == 0


def test_two_hosts_one_slot(host: Host, second_host: Host, lock_server: FleetLockServer) -> None:
    a, b = host, second_host
    _, new_a = pending_reboot_host(a, "a" * 32)
    old_b, new_b = pending_reboot_host(b, "b" * 32)

    first = locked_deploy(a, lock_server)
    assert first.returncode == 0, first
    assert reboots(a) == 1
    assert lock_server.held() == [ident(a)]
    assert metric(a.metrics(), "nixos_autodeploy_fleet_lock_held") == 1
    # The slot before anything changes, then the trial boot (a success once confirmed).
    assert [e["event"] for e in history(a)] == ["decision", "fleet-lock", "trial-reboot"]

    second = locked_deploy(b, lock_server)
    assert second.returncode == 0, second
    # Refused: B's deploy waits with its reboot, nothing changed.
    assert reboots(b) == 0 and b.snapshot()["state"] == "update-available"
    assert b.profile() == old_b.path
    refused = [x for x in second.stderr_lines if x.startswith("reboot slot refused by fleet lock")]
    assert refused == [
        f"reboot slot refused by fleet lock: {lock_server.url}/v1/pre-reboot answered HTTP 409: "
        "all 1 reboot slots of group default are taken (failed_lock_semaphore_full)"
    ]
    assert waiting(b)["reason"] == "fleet-lock" and reasons(b) == only("fleet-lock")
    assert metric(b.metrics(), "nixos_autodeploy_fleet_lock_held") == 0
    assert status_line(b, "reboot waits: ").startswith(f"reboot waits: {refused[0]} (for ")

    # A comes back on its new system: that boot is confirmed, its slot goes back.
    a.reboot()
    back = locked_deploy(a, lock_server)
    assert back.returncode == 0, back
    assert (a.snapshot()["state"], a.current()) == ("up-to-date", new_a.path)
    assert lock_server.held() == []
    assert metric(a.metrics(), "nixos_autodeploy_fleet_lock_held") == 0
    assert events_named(a, "fleet-unlock") == [
        {**events_named(a, "fleet-unlock")[0], "group": "default", "id": ident(a)}
    ]

    # B's next run takes the free slot and reboots.
    again = locked_deploy(b, lock_server)
    assert again.returncode == 0, again
    assert reboots(b) == 1 and lock_server.held() == [ident(b)]
    assert "fleet lock: holding a reboot slot in group default" in status_line(b, "fleet lock:")
    b.reboot()
    assert locked_deploy(b, lock_server).returncode == 0
    assert lock_server.held() == [] and b.current() == new_b.path
    assert ident(a) != ident(b)


FAILURES: dict[str, tuple[Fault | None, str]] = {
    "server down": (None, "connection failed"),
    **{case: FAULTS[case] for case in ("500 with an error object", "500 with a malformed body")},
    "slow past the timeout": (FAULTS["slow past the timeout"][0], "no answer within 3s"),
}


def test_no_slot_means_no_reboot_and_says_why(host: Host, lock_server: FleetLockServer) -> None:
    pending_reboot_host(host, "c" * 32)
    down = FleetLockServer()
    down.start()
    down_url = down.url
    down.stop()
    since = None
    for case, (fault, expected) in FAILURES.items():
        lock_server.fault = fault
        url = down_url if fault is None else lock_server.url
        result = rebooting_deploy(host, "--fleet-lock-url", url, "--timeout", "3")
        lock_server.resume()  # a slow answer's handler may go
        assert result.returncode == 0, (case, result)
        assert reboots(host) == 0, case
        said = [x for x in result.stderr_lines if x.startswith("reboot slot refused")]
        assert len(said) == 1 and expected in said[0], (case, result.stderr)
        assert host.snapshot()["state"] == "update-available"  # waits before it changes anything
        assert waiting(host)["reason"] == "fleet-lock" and expected in waiting(host)["message"]
        assert reasons(host) == only("fleet-lock"), case
        assert metric(host.metrics(), "nixos_autodeploy_fleet_lock_held") == 0
        since = since or waiting(host)["since"]
        assert waiting(host)["since"] == since, "the wait began at the first refusal"
    lock_server.fault = None
    assert rebooting_deploy(host, "--fleet-lock-url", lock_server.url).returncode == 0
    assert reboots(host) == 1 and lock_server.held() == [ident(host)]
    assert waiting(host) is None and reasons(host)["fleet-lock"] == 0


@pytest.mark.parametrize("then", ["reboots", "releases"])
def test_a_crash_between_taking_the_slot_and_rebooting_converges(
    host: Host, lock_server: FleetLockServer, then: str
) -> None:
    old, _ = pending_reboot_host(host, "d" * 32)
    lock_server.pause_after_grant = True
    args = ("--switch-mode", "boot", "--reboot-mode", "reboot", "--fleet-lock-url", lock_server.url)
    run = start_deploy(host, *args, timeout=None)
    try:
        assert lock_server.granted.wait(300), "the agent never asked for a slot"
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the crash: the slot is taken, no reboot
        run.communicate()
        lock_server.pause_after_grant = False
        lock_server.resume()
    assert lock_server.held() == [ident(host)]
    assert reboots(host) == 0
    if then == "releases":
        host.publish(old)  # CI went back meanwhile: no reboot is to come any more
        assert host.collect().returncode == 0
    result = locked_deploy(host, lock_server)
    assert result.returncode == 0, result
    if then == "reboots":
        assert reboots(host) == 1 and lock_server.held() == [ident(host)]
        host.reboot()
        assert locked_deploy(host, lock_server).returncode == 0
    else:
        assert reboots(host) == 0
    assert lock_server.held() == []
    assert host.snapshot()["state"] == "up-to-date"


# ---- issue 20 --------------------------------------------------------------------------


def test_a_trial_boot_that_fails_gives_its_slot_back_at_once(
    host: Host, second_host: Host, lock_server: FleetLockServer
) -> None:
    # Issue 20, defect 3: the trial was undone with the slot still held, and every later
    # run took it again and failed again: no other host of the group could reboot.
    _, new = pending_reboot_host(host, "f" * 32)
    pending_reboot_host(second_host, "9" * 32)
    (host.root / "kexec-fails.--load").write_text("kexec_load failed: Operation not permitted\n")
    args = ("--switch-mode", "boot", "--reboot-mode", "kexec", "--fleet-lock-url", lock_server.url)
    failed = deploy(host, *args, timeout=None)
    assert failed.returncode == 1, failed
    assert "Operation not permitted" in error_lines(failed)[0]
    assert lock_server.held() == [] and host.snapshot()["reboot"]["slot"] is None
    assert new.path in host.read_json("deploys.json")["failed"]
    again = deploy(host, *args, timeout=None)
    assert again.returncode == 0 and "not retried" in again.stderr, again
    assert len(lock_server.calls("/v1/pre-reboot")) == 1, "not taken again"
    # The other host of the one-slot group reboots.
    assert locked_deploy(second_host, lock_server).returncode == 0
    assert reboots(second_host) == 1


def test_a_plain_kexec_refused_gives_its_slot_back_and_is_counted(
    host: Host, lock_server: FleetLockServer
) -> None:
    # Issue 20, defect 3, the plain reboot path: a switch that changes the kernel, then a
    # kexec that the kernel refuses.
    pending_reboot_host(host, "8" * 32)
    (host.root / "kexec-fails.--load").write_text("kexec_load failed: Operation not permitted\n")
    args = (
        "--switch-mode",
        "switch",
        "--reboot-mode",
        "kexec",
        "--fleet-lock-url",
        lock_server.url,
    )
    failed = deploy(host, *args, timeout=None)
    assert failed.returncode == 1, failed
    assert "Operation not permitted" in error_lines(failed)[0]
    assert lock_server.held() == []
    assert metric(host.metrics(), "nixos_autodeploy_deployments_total", result="failure") == 1
    again = deploy(host, *args, timeout=None)
    assert again.returncode == 0, again
    assert "the agent's reboot into it failed; not retried" in again.stderr
    assert len(lock_server.calls("/v1/pre-reboot")) == 1 and lock_server.held() == []


def test_a_reboot_trial_whose_activation_fails_gives_its_slot_back(
    host: Host, second_host: Host, lock_server: FleetLockServer
) -> None:
    # Issue 20, defect 3, before the boot: a trial takes its slot before anything changes;
    # then its `switch-to-configuration boot` fails. Rolled back, no reboot: the slot goes.
    old, new = pending_reboot_host(host, "2" * 32)
    pending_reboot_host(second_host, "b" * 32)
    host.fail_activation_late(new, "installing the boot loader failed")
    failed = locked_deploy(host, lock_server)
    assert failed.returncode == 1, failed
    assert "installing the boot loader failed" in error_lines(failed)[0]
    assert len(lock_server.calls("/v1/pre-reboot")) == 1 and reboots(host) == 0
    assert lock_server.held() == [] and host.snapshot()["reboot"]["slot"] is None
    assert (host.profile(), host.boot_default()) == (old.path,) * 2
    assert new.path in host.read_json("deploys.json")["failed"]
    # The other host of the one-slot group reboots.
    assert locked_deploy(second_host, lock_server).returncode == 0
    assert reboots(second_host) == 1


def test_a_resumed_reboot_trial_whose_reboot_fails_gives_its_slot_back(
    host: Host, lock_server: FleetLockServer
) -> None:
    # Issue 20, defect 3, from recovery: a reboot trial cut short before its reboot (its slot
    # taken, the new system installed) is booted by the next run; its reboot command fails.
    old, new = pending_reboot_host(host, "4" * 32)
    killed = locked_deploy(host, lock_server, stop_at="activated")
    assert killed.returncode == -signal.SIGKILL, killed
    assert lock_server.held() == [ident(host)]
    assert (host.profile(), host.boot_default()) == (new.path,) * 2
    refused = host.root / "systemctl-fails.reboot"
    refused.write_text("Failed to reboot: Access denied\n")
    failed = locked_deploy(host, lock_server)
    assert failed.returncode == 1, failed
    (error,) = error_lines(failed)
    assert "Access denied" in error, error
    assert len(lock_server.calls("/v1/pre-reboot")) == 2, "the resumed trial asked again"
    assert lock_server.held() == [] and host.snapshot()["reboot"]["slot"] is None
    # Undone and counted: the old system is the next boot's again, new is not retried.
    assert (host.profile(), host.boot_default()) == (old.path,) * 2
    assert host.read_json("deploys.json")["totals"] == {"success": 0, "failure": 1}
    refused.unlink()
    again = locked_deploy(host, lock_server)
    assert again.returncode == 0 and "not retried" in again.stderr, again
    assert len(lock_server.calls("/v1/pre-reboot")) == 2 and reboots(host) == 1, "the refused one"


@pytest.mark.parametrize("change", ["group", "url"])
def test_a_slot_goes_back_where_it_was_taken(
    host: Host, lock_server: FleetLockServer, change: str
) -> None:
    # Issue 20, defect 8: the release went to the new settings; the old group kept the slot.
    _, new = pending_reboot_host(host, "7" * 32)
    assert locked_deploy(host, lock_server, "--fleet-lock-group", "workers").returncode == 0
    assert lock_server.held("workers") == [ident(host)]
    host.reboot()
    assert host.current() == new.path
    other = FleetLockServer()
    other.start()
    try:
        url = other.url if change == "url" else lock_server.url
        group = "web" if change == "group" else "workers"
        back = rebooting_deploy(host, "--fleet-lock-url", url, "--fleet-lock-group", group)
    finally:
        other.stop()
    assert back.returncode == 0, back
    assert lock_server.held("workers") == []
    assert host.snapshot()["reboot"]["slot"] is None
    assert metric(host.metrics(), "nixos_autodeploy_fleet_lock_held") == 0


def test_a_slot_goes_back_after_the_fleet_lock_url_is_removed(
    host: Host, lock_server: FleetLockServer
) -> None:
    pending_reboot_host(host, "6" * 32)
    assert locked_deploy(host, lock_server).returncode == 0
    host.reboot()
    back = rebooting_deploy(host)
    assert back.returncode == 0, back
    assert lock_server.held() == [] and host.snapshot()["reboot"]["slot"] is None


def test_a_rollback_reboot_does_not_wait_for_the_window(host: Host) -> None:
    # Decided in issue 20: a failed trial's reboot back ignores maintenance windows (the
    # host runs a system that failed its checks; waiting would keep it there).
    old, new = pending_reboot_host(host, "5" * 32)
    noon, _ = local_tz("12:00")
    window = ("--reboot-window", "11:00-13:00", "--health-timeout", "1")
    check = ("--health-check", f'test "$(readlink {host.current_link})" != {new.path}')
    assert rebooting_deploy(host, *window, *check, tz=noon).returncode == 0
    assert reboots(host) == 1
    host.reboot()
    evening, _ = local_tz("20:00")
    failed = rebooting_deploy(host, *window, *check, tz=evening)
    assert failed.returncode == 1, failed
    assert "failed its health checks after its trial boot" in error_lines(failed)[0]
    assert reboots(host) == 2, "rebooted back outside the window"
    assert host.boot_default() == old.path
