"""Switch modes and reboots end to end: `switch`, `boot` and `smart`, `--reboot-mode reboot`
and `kexec`, at most one reboot per deploy, and a reboot that did not take.

Real Nix, a signed binary cache on loopback, a sandbox root; `systemctl` and `kexec` are
the harness' recorders, and the test plays the machine's part (Host.reboot). When a
reboot may happen (maintenance windows, FleetLock) is in test_reboot_orchestration.py,
trial boots in test_trial.py.
"""

from __future__ import annotations

import pytest
from harness import NEW_KERNEL, Host, SystemSpec, error_lines, metric, point_link
from harness.deploys import (
    assert_links,
    assert_record,
    decisions,
    deploy,
    deployed_mirror,
    history,
    log_reboot_call_order,
    reboot_calls,
    record,
    tracking,
)

pytestmark = pytest.mark.nix


# ---- switch modes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "activation"), [(NEW_KERNEL, "boot"), ("6.1.0", "switch")], ids=["kernel", "same"]
)
def test_smart_mode_boots_a_new_kernel_and_switches_otherwise(
    host: Host, kernel: str, activation: str
) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=kernel, extra="changed"))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    result = deploy(host, "--switch-mode", "smart")
    assert result.returncode == 0, result
    assert host.activations() == [(activation, new.path)]
    assert host.profile() == new.path and host.boot_default() == new.path
    assert_record(host, new, activation, previous=old)
    snapshot = host.snapshot()
    if activation == "boot":
        assert host.current() == old.path
        assert (snapshot["state"], snapshot["reboot_required"]) == ("pending-reboot", True)
        assert snapshot["dirty"] is False
        assert metric(host.metrics(), "nixos_autodeploy_reboot_required") == 1
    else:
        assert host.current() == new.path
        assert (snapshot["state"], snapshot["reboot_required"]) == ("up-to-date", False)
    assert host.recorded("systemctl") == []


def test_reboot_while_upstream_moved_on_deploys_the_new_upstream(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b)
    assert deploy(host, "--switch-mode", "boot").returncode == 0
    assert host.activations() == [("boot", b.path)]
    assert_links(host, current=a, profile=b)
    assert_record(host, b, "boot", previous=a)
    assert host.snapshot()["state"] == "pending-reboot"
    host.reboot()  # /run starts empty; the record lives in the state dir
    host.publish(c)
    result = deploy(host)
    assert result.returncode == 0, result
    assert host.activations() == [("boot", b.path), ("switch", c.path)]
    assert_links(host, current=c, profile=c, booted=b)
    assert_record(host, c, "switch", previous=b)
    assert decisions(host)[-1] == ("deploy", "update-available")
    assert host.snapshot()["dirty"] is False


def test_pending_reboot_then_reboot_into_it_is_up_to_date(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    assert deploy(host, "--switch-mode", "smart").returncode == 0
    assert host.snapshot()["state"] == "pending-reboot"
    host.reboot()
    result = deploy(host, "--switch-mode", "smart", "--reboot-mode", "reboot")
    assert result.returncode == 0, result
    assert_links(host, current=new, profile=new, booted=new)
    deployed = record(host)
    assert (deployed["path"], deployed["mode"], deployed["previous"]) == (
        new.path,
        "boot",
        old.path,
    )
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["reboot_required"]) == ("up-to-date", False)
    assert decisions(host)[-1] == ("nothing", "up-to-date")
    assert host.activations() == [("boot", new.path)]
    assert host.recorded("systemctl") == [] and host.recorded("kexec") == []
    assert metric(host.metrics(), "nixos_autodeploy_reboot_required") == 0
    assert deployed_mirror(host) == new.path, "the reboot wiped /run; its record mirror is back"


# ---- one reboot per deploy ----------------------------------------------------------


def test_reboot_mode_reboots_once_into_a_boot_deploy(host: Host) -> None:
    """A reboot into a boot-mode deploy, once (the kexec trial boot: test_trial.py)."""
    reboot_mode = "reboot"
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    order = log_reboot_call_order(host)
    args = ("--switch-mode", "boot", "--reboot-mode", reboot_mode)
    result = deploy(host, *args)
    assert result.returncode == 0, result
    assert host.activations() == [("boot", new.path)]
    assert host.recorded("systemctl") == [["reboot"]]
    assert host.recorded("kexec") == []
    assert reboot_calls(order) == ["systemctl"]
    assert_record(host, new, "boot", previous=old, rebooted=True)
    # Counted once the run after the boot has checked it (test_trial.py).
    assert [e["event"] for e in history(host)] == ["decision", f"trial-{reboot_mode}"]
    # The reboot did not take: the boot menu picked the old generation.
    point_link(host.boot_default_link, old.path)
    host.reboot()
    again = deploy(host, *args)
    assert again.returncode == 0, again
    assert "not rebooting again" in again.stderr
    assert reboot_calls(order) == ["systemctl"]
    assert host.activations() == [("boot", new.path)]
    assert_links(host, current=old, profile=new, booted=old)
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["reboot_required"]) == ("pending-reboot", True)
    assert decisions(host)[-1] == ("nothing", "pending-reboot")


@pytest.mark.parametrize("reboot_mode", ["reboot", "kexec"])
def test_reboot_mode_does_not_reboot_when_nothing_requires_it(host: Host, reboot_mode: str) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", extra="same kernel"))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    for _ in range(2):  # a switch-mode deploy, then a run on the up-to-date host
        result = deploy(host, "--switch-mode", "switch", "--reboot-mode", reboot_mode)
        assert result.returncode == 0, result
        assert host.recorded("systemctl") == [] and host.recorded("kexec") == []
    assert host.activations() == [("switch", new.path)]
    assert decisions(host) == [("deploy", "update-available"), ("nothing", "up-to-date")]
    assert_record(host, new, "switch", previous=old)
    assert host.snapshot()["reboot_required"] is False


def test_switch_into_a_new_kernel_reboots_once(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    result = deploy(host, "--switch-mode", "switch", "--reboot-mode", "reboot")
    assert result.returncode == 0, result
    assert host.activations() == [("switch", new.path)]
    assert_links(host, current=new, profile=new, booted=old)
    assert host.recorded("systemctl") == [["reboot"]]
    assert_record(host, new, "switch", previous=old, rebooted=True)
    # The machine did not reboot: still booted on the old kernel, reported, not rebooted.
    again = deploy(host, "--switch-mode", "switch", "--reboot-mode", "reboot")
    assert again.returncode == 0, again
    assert host.recorded("systemctl") == [["reboot"]]
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["reboot_required"]) == ("up-to-date", True)


def test_pending_reboot_reboots_once_when_a_reboot_mode_is_configured_later(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    assert deploy(host, "--switch-mode", "boot").returncode == 0
    assert host.recorded("systemctl") == []
    dry = deploy(host, "--switch-mode", "boot", "--reboot-mode", "reboot", "--dry-run")
    assert dry.returncode == 0, dry
    assert dry.stdout.splitlines()[0].startswith("decision: reboot: pending reboot into")
    assert dry.stdout.splitlines()[1:] == ["would run: systemctl reboot"]
    assert host.recorded("systemctl") == []
    for _ in range(2):
        result = deploy(host, "--switch-mode", "boot", "--reboot-mode", "reboot")
        assert result.returncode == 0, result
    assert host.recorded("systemctl") == [["reboot"]]
    assert decisions(host) == [
        ("deploy", "update-available"),
        ("reboot", "pending-reboot"),
        ("nothing", "pending-reboot"),
    ]
    assert host.activations() == [("boot", new.path)]
    assert_record(host, new, "boot", previous=old, rebooted=True)


def test_a_switch_whose_reboot_came_back_on_the_old_generation_is_not_dirty(host: Host) -> None:
    """As after a boot-mode deploy, the agent says it rebooted once and came back."""
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    args = ("--switch-mode", "switch", "--reboot-mode", "reboot")
    assert deploy(host, *args).returncode == 0
    assert host.recorded("systemctl") == [["reboot"]]
    point_link(host.boot_default_link, old.path)  # the boot menu picked the old generation
    host.reboot()
    again = deploy(host, *args)
    assert again.returncode == 0, again
    assert "came back on" in again.stderr and "not rebooting again" in again.stderr
    assert host.recorded("systemctl") == [["reboot"]]
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["dirty"]) == ("pending-reboot", False)
    assert metric(host.metrics(), "nixos_autodeploy_dirty") == 0


def test_a_tracked_hand_deploy_of_a_new_kernel_is_not_rebooted(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    host.install(old)
    host.deploy_by_hand(new)  # nixos-rebuild switch; its owner reboots when it suits them
    host.publish(new)
    for _ in range(2):
        result = deploy(host, "--reboot-mode", "reboot")
        assert result.returncode == 0, result
    assert decisions(host) == [("track", "untracked"), ("nothing", "up-to-date")]
    assert host.recorded("systemctl") == []
    assert host.snapshot()["reboot_required"] is True


def test_failed_kexec_load_is_a_counted_failure_not_the_one_reboot(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    kexec = host.bin_dir / "kexec"
    recorder = kexec.read_text()
    kexec.write_text("#!/bin/sh\necho 'kexec_load failed: Operation not permitted' >&2\nexit 1\n")
    failed = deploy(host, "--switch-mode", "boot", "--reboot-mode", "kexec")
    assert failed.returncode == 1, failed
    (error,) = error_lines(failed)
    assert "Operation not permitted" in error
    assert host.recorded("systemctl") == []
    assert record(host)["reboot_issued_at"] is None
    kexec.write_text(recorder)
    # It would fail the same way on every run (issue 20): counted, not retried until
    # upstream changes.
    assert host.read_json("deploys.json")["totals"] == {"success": 0, "failure": 1}
    retried = deploy(host, "--switch-mode", "boot", "--reboot-mode", "kexec")
    assert retried.returncode == 0 and "not retried" in retried.stderr, retried
    assert host.recorded("systemctl") == []
    newer = host.build_one("newer", kernel=NEW_KERNEL)
    host.publish(newer)
    assert host.collect().returncode == 0
    assert deploy(host, "--switch-mode", "boot", "--reboot-mode", "kexec").returncode == 0
    assert host.recorded("systemctl") == [["kexec"]]


def test_a_failed_reboot_command_is_a_counted_failure_not_the_one_reboot(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b", kernel=NEW_KERNEL))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    systemctl = host.bin_dir / "systemctl"
    recorder = systemctl.read_text()
    systemctl.write_text("#!/bin/sh\necho 'Failed to reboot: Access denied' >&2\nexit 1\n")
    failed = deploy(host, "--switch-mode", "boot", "--reboot-mode", "reboot")
    assert failed.returncode == 1, failed
    assert "Access denied" in error_lines(failed)[0]
    assert record(host)["reboot_issued_at"] is None
    systemctl.write_text(recorder)
    assert host.read_json("deploys.json")["totals"] == {"success": 0, "failure": 1}
    again = deploy(host, "--switch-mode", "boot", "--reboot-mode", "reboot")
    assert again.returncode == 0 and "not retried" in again.stderr, again
    assert host.recorded("systemctl") == []
