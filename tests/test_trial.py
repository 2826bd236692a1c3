"""Trial boots end to end in a sandbox root: real Nix and the upstream URL on loopback; only
`systemctl` and `kexec` are recorders (they would take this machine down), and the test
plays the machine's part: Host.kexec_into (the new kernel runs, the boot loader's default
is untouched) and Host.reboot (the boot loader's default boots; also what the kernel's
`panic=` reset ends in)."""

from __future__ import annotations

import json
import signal
import subprocess
from datetime import UTC, datetime

import pytest
from harness import (
    NEW_KERNEL,
    AgentResult,
    FleetLockServer,
    Host,
    System,
    SystemSpec,
    error_lines,
    metric,
    read_link,
)
from harness.deploys import STOP_AT, deploy, event_names, journal, not_running, tracking

from actuator.reboot import listed_entries
from collector.errors import ActuatorError

pytestmark = pytest.mark.nix


def trial_deploy(host: Host, *args: str, env: dict[str, str] | None = None) -> AgentResult:
    """A boot-mode deploy whose health checks get one round (a failing check fails at
    once): with a reboot mode, a trial boot."""
    return deploy(host, "--switch-mode", "boot", "--health-timeout", "1", *args, timeout=5, env=env)


def kexec(host: Host, *args: str, env: dict[str, str] | None = None) -> AgentResult:
    return trial_deploy(host, "--reboot-mode", "kexec", *args, env=env)


def reboot(host: Host, *args: str, env: dict[str, str] | None = None) -> AgentResult:
    return trial_deploy(host, "--reboot-mode", "reboot", *args, env=env)


def systems(host: Host) -> tuple[System, System]:
    """A tracked host running old; CI published new, with a new kernel; collected."""
    built = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = built["old"], built["new"]
    tracking(host, old, new, collect=True)
    return old, new


def boots(host: Host) -> list[list[str]]:
    """The reboots and kexecs the agent asked systemctl for."""
    return [argv for argv in host.recorded("systemctl") if argv[:1] in (["reboot"], ["kexec"])]


def assert_on(host: Host, system: System, state: str) -> None:
    """system runs and is the profile, the boot default and the deployed record."""
    assert (host.current(), host.profile(), host.boot_default()) == (system.path,) * 3
    record = host.read_json("deployed.json")
    assert (record["path"], record["complete"]) == (system.path, True)
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["dirty"]) == (state, False)
    assert metric(host.metrics(), "nixos_autodeploy_dirty") == 0


def test_kexec_trial_leaves_the_boot_loader_until_the_new_system_passes(host: Host) -> None:
    old, new = systems(host)
    result = kexec(host)
    assert result.returncode == 0, result
    # Loaded with panic=, kexec'd; the profile and the boot default stay on old.
    params = f"loglevel=4 autodeploy=new init={new}/init panic=30 boot.panic_on_fail"
    assert host.recorded("kexec") == [
        ["--load", f"{new}/kernel", f"--initrd={new}/initrd", f"--append={params}"]
    ]
    assert boots(host) == [["kexec"]]
    assert host.activations() == []
    assert (host.profile(), host.boot_default()) == (old.path, old.path)
    assert journal(host)["phase"] == "booting"
    assert host.collect().returncode == 0
    assert host.snapshot()["dirty"] is False

    host.kexec_into(new)
    confirmed = kexec(host)
    assert confirmed.returncode == 0, confirmed
    # Checked, then made the profile and the boot default.
    assert host.activations() == [("boot", new.path)]
    assert_on(host, new, "up-to-date")
    assert journal(host)["phase"] == "done"
    deploys = host.read_json("deploys.json")
    assert deploys["totals"] == {"success": 1, "failure": 0}
    assert deploys["health"]["ok"] is True and deploys["rollbacks"] == 0
    assert event_names(host)[-4:] == ["health", "deploy", "trial-confirmed", "decision"]
    assert boots(host) == [["kexec"]]
    assert host.snapshot()["reboot_required"] is False


def test_kexec_trial_that_never_reaches_userspace_stays_on_the_old_system(host: Host) -> None:
    old, new = systems(host)
    assert kexec(host).returncode == 0
    host.reboot()  # the kernel panicked; panic= reset the machine into the old default
    result = kexec(host)
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert error == (
        f"error: {new.basename} did not come up on its trial boot: "
        f"the host came back on {old.basename}"
    )
    assert host.activations() == []
    assert boots(host) == [["kexec"]], "no second reboot"
    assert_on(host, old, "update-available")
    deploys = host.read_json("deploys.json")
    assert new.path in deploys["failed"] and deploys["rollbacks"] == 1
    assert metric(host.metrics(), "nixos_autodeploy_rollbacks_total") == 1
    again = kexec(host)
    assert again.returncode == 0, again
    assert "not retried" in again.stderr
    assert boots(host) == [["kexec"]]


def test_kexec_trial_failing_its_checks_reboots_back_once(host: Host) -> None:
    old, new = systems(host)
    check = ("--health-check", not_running(host, new))
    assert kexec(host, *check).returncode == 0
    host.kexec_into(new)
    result = kexec(host, *check)
    assert result.returncode == 1, result
    assert "failed its health checks after its trial boot" in error_lines(result)[0]
    assert boots(host) == [["kexec"], ["reboot"]]
    assert host.activations() == []
    assert (host.profile(), host.boot_default()) == (old.path, old.path)
    assert journal(host)["phase"] == "rolled-back"
    assert event_names(host)[-2:] == ["rolled-back", "rollback-reboot"]

    host.reboot()
    after = kexec(host, *check)
    assert after.returncode == 0, after
    assert boots(host) == [["kexec"], ["reboot"]], "the rollback reboot was the only one"
    assert_on(host, old, "update-available")
    rollback = host.read_json("deploys.json")["last_rollback"]
    assert (rollback["from"], rollback["to"], rollback["ok"]) == (new.path, old.path, True)


def test_reboot_trial_failing_its_checks_goes_back_and_reboots_once(host: Host) -> None:
    old, new = systems(host)
    check = ("--health-check", not_running(host, new))
    assert reboot(host, *check).returncode == 0
    # No one-time boot entry here: new is the default, the run after the boot decides.
    assert host.activations() == [("boot", new.path)]
    assert boots(host) == [["reboot"]]
    host.reboot()
    assert host.current() == new.path
    result = reboot(host, *check)
    assert result.returncode == 1, result
    assert "failed its health checks after its trial boot" in error_lines(result)[0]
    assert host.activations() == [("boot", new.path), ("boot", old.path)]
    assert (host.profile(), host.boot_default()) == (old.path, old.path)
    assert boots(host) == [["reboot"], ["reboot"]]
    host.reboot()
    after = reboot(host, *check)
    assert after.returncode == 0, after
    assert boots(host) == [["reboot"], ["reboot"]]
    assert_on(host, old, "update-available")


def test_reboot_trial_passing_its_checks_is_confirmed(host: Host) -> None:
    _, new = systems(host)
    assert reboot(host).returncode == 0
    assert journal(host)["phase"] == "booting"
    host.reboot()
    confirmed = reboot(host)
    assert confirmed.returncode == 0, confirmed
    assert host.activations() == [("boot", new.path)]
    assert_on(host, new, "up-to-date")
    assert host.read_json("deploys.json")["totals"] == {"success": 1, "failure": 0}
    assert boots(host) == [["reboot"]]


@pytest.mark.parametrize("mode", ["kexec", "reboot"])
def test_killed_during_the_checks_after_the_boot_checks_again(host: Host, mode: str) -> None:
    old, new = systems(host)
    run = kexec if mode == "kexec" else reboot
    check = ("--health-check", not_running(host, new))
    assert run(host, *check).returncode == 0
    if mode == "kexec":
        host.kexec_into(new)
    else:
        host.reboot()
    killed = run(host, *check, env={STOP_AT: "checking"})
    assert killed.returncode == -signal.SIGKILL, killed
    assert journal(host)["phase"] == "checking"
    result = run(host, *check)
    assert result.returncode == 1, result
    assert "failed its health checks after its trial boot" in error_lines(result)[0]
    assert boots(host)[-1] == ["reboot"] and len(boots(host)) == 2
    assert (host.profile(), host.boot_default()) == (old.path, old.path)


@pytest.mark.parametrize("phase", ["booting", "rebooting-back"])
def test_killed_before_a_reboot_the_next_run_issues_it_once(host: Host, phase: str) -> None:
    old, new = systems(host)
    check = ("--health-check", not_running(host, new))
    if phase == "booting":
        killed = kexec(host, *check, env={STOP_AT: phase})
        assert killed.returncode == -signal.SIGKILL, killed
        assert boots(host) == []
        # The kexec never happened (this boot's mark): undone, then tried again.
        again = kexec(host, *check)
        assert again.returncode == 0, again
        assert boots(host) == [["kexec"]]
        assert journal(host)["phase"] == "booting"
        return
    assert kexec(host, *check).returncode == 0
    host.kexec_into(new)
    killed = kexec(host, *check, env={STOP_AT: phase})
    assert killed.returncode == -signal.SIGKILL, killed
    assert boots(host) == [["kexec"]]
    finished = kexec(host, *check)
    assert finished.returncode == 0, finished
    assert boots(host) == [["kexec"], ["reboot"]]
    host.reboot()
    assert kexec(host, *check).returncode == 0
    assert boots(host) == [["kexec"], ["reboot"]]
    assert_on(host, old, "update-available")


# ---- systemd-boot: a reboot trial boots the new system once --------------------------------


def systemd_boot_systems(host: Host) -> tuple[System, System]:
    old, new = systems(host)
    host.use_systemd_boot()
    return old, new


def oneshot_commands(host: Host) -> list[list[str]]:
    """What the agent ran to boot a system once: the profile generations, bootctl."""
    profile = str(host.profile_link)
    return [
        argv
        for argv in host.recorded("nix-env") + host.recorded("bootctl")
        if argv[:2] == ["--profile", profile] or argv[:1] in (["list"], ["set-oneshot"])
    ]


def generations(host: Host) -> list[str]:
    return sorted(p.name for p in host.profile_link.parent.glob("system-*-link"))


def test_oneshot_trial_boots_the_new_system_once_and_confirms_it(host: Host) -> None:
    old, new = systemd_boot_systems(host)
    result = reboot(host)
    assert result.returncode == 0, result
    profile = str(host.profile_link)
    # The entries name their systems (checked first); a generation (with a boot entry) for
    # new; the profile and the default stay on old.
    assert oneshot_commands(host) == [
        ["--profile", profile, "--set", new.path],
        ["--profile", profile, "--switch-generation", "1"],
        ["list", "--json=short", "--no-pager"],
        ["list", "--json=short", "--no-pager"],
        ["set-oneshot", "nixos-generation-2.conf"],
    ]
    assert host.activations() == [("boot", old.path)]
    assert (host.profile(), host.boot_default()) == (old.path, old.path)
    assert host.oneshot_path.read_text() == "nixos-generation-2.conf\n"
    assert (journal(host)["trial"], journal(host)["phase"]) == ("oneshot", "booting")
    assert boots(host) == [["reboot"]]
    assert "trial-oneshot" in event_names(host)

    host.reboot()
    assert host.current() == new.path and not host.oneshot_path.exists()
    confirmed = reboot(host)
    assert confirmed.returncode == 0, confirmed
    assert host.activations() == [("boot", old.path), ("boot", new.path)]
    assert_on(host, new, "up-to-date")
    assert read_link(host.profile_link) == "system-2-link", "the trial's generation, no new one"
    assert journal(host)["phase"] == "done"
    assert boots(host) == [["reboot"]]


def test_oneshot_trial_failing_its_checks_reboots_into_the_untouched_default(
    host: Host,
) -> None:
    old, new = systemd_boot_systems(host)
    check = ("--health-check", not_running(host, new))
    assert reboot(host, *check).returncode == 0
    host.reboot()
    result = reboot(host, *check)
    assert result.returncode == 1, result
    assert "failed its health checks after its trial boot" in error_lines(result)[0]
    # The default never moved: the rollback reboot boots old. The trial's generation is
    # gone (and with it its boot entry): failed trials never crowd out the old one.
    assert (host.profile(), host.boot_default()) == (old.path, old.path)
    assert generations(host) == ["system-1-link"]
    assert boots(host) == [["reboot"], ["reboot"]]
    host.reboot()
    after = reboot(host, *check)
    assert after.returncode == 0, after
    assert "not retried" in after.stderr
    assert boots(host) == [["reboot"], ["reboot"]]
    assert_on(host, old, "update-available")
    deploys = host.read_json("deploys.json")
    assert new.path in deploys["failed"] and deploys["rollbacks"] == 1


def test_oneshot_trial_that_never_reaches_userspace_stays_on_the_old_system(host: Host) -> None:
    old, new = systemd_boot_systems(host)
    assert reboot(host).returncode == 0
    host.reboot()  # the one-time entry is used up: new's kernel panics, or hangs...
    host.reboot()  # ...and the reset (panic=, a watchdog, a person) boots the default
    assert host.current() == old.path
    result = reboot(host)
    assert result.returncode == 1, result
    assert error_lines(result) == [
        f"error: {new.basename} did not come up on its trial boot: "
        f"the host came back on {old.basename}"
    ]
    assert boots(host) == [["reboot"]], "no second reboot"
    assert_on(host, old, "update-available")
    assert generations(host) == ["system-1-link"]
    assert metric(host.metrics(), "nixos_autodeploy_rollbacks_total") == 1
    again = reboot(host)
    assert again.returncode == 0, again
    assert "not retried" in again.stderr
    assert boots(host) == [["reboot"]]


def test_oneshot_trial_killed_before_its_reboot_is_undone_then_tried_again(host: Host) -> None:
    old, new = systemd_boot_systems(host)
    killed = reboot(host, env={STOP_AT: "booting"})
    assert killed.returncode == -signal.SIGKILL, killed
    assert boots(host) == []
    again = reboot(host)
    assert again.returncode == 0, again
    assert "the oneshot into" in again.stderr
    assert boots(host) == [["reboot"]]
    assert host.oneshot_path.read_text() == "nixos-generation-2.conf\n"
    assert (host.profile(), host.boot_default()) == (old.path, old.path)
    host.reboot()
    assert reboot(host).returncode == 0
    assert_on(host, new, "up-to-date")


def test_oneshot_that_bootctl_refuses_is_counted_and_not_retried(host: Host) -> None:
    old, new = systemd_boot_systems(host)
    (host.root / "bootctl-fails.set-oneshot").write_text(
        "Failed to update EFI variable: Read-only file system\n"
    )
    result = reboot(host)
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert error.startswith(f"error: trial boot (oneshot) into {new.basename} failed: "), error
    assert "bootctl" in error and "Read-only file system" in error, error
    assert boots(host) == []
    assert (host.profile(), host.boot_default()) == (old.path, old.path)
    assert journal(host)["phase"] == "rolled-back"
    assert host.snapshot()["dirty"] is False
    # Counted (the failure metric, DeployFailed), and not retried until upstream changes:
    # it would fail the same way on every run.
    deploys = host.read_json("deploys.json")
    assert deploys["totals"] == {"success": 0, "failure": 1} and new.path in deploys["failed"]
    assert metric(host.metrics(), "nixos_autodeploy_deployments_total", result="failure") == 1
    (host.root / "bootctl-fails.set-oneshot").unlink()
    again = reboot(host)
    assert again.returncode == 0, again
    assert "not retried" in again.stderr
    assert boots(host) == []


def test_dry_run_shows_the_oneshot_steps(host: Host) -> None:
    old, new = systemd_boot_systems(host)
    result = reboot(host, "--dry-run")
    assert result.returncode == 0, result
    profile = host.profile_link
    assert [line for line in result.stdout.splitlines() if line.startswith("would run")] == [
        f"would run: nix-env --profile {profile} --set {new}",
        f"would run: nix-env --profile {profile} --switch-generation 1",
        f"would run: {old}/bin/switch-to-configuration boot",
        f"would run: bootctl set-oneshot '<the entry of {new.basename}>'",
        "would run: systemctl reboot",
    ]
    assert host.recorded("bootctl") == [] and boots(host) == []


@pytest.mark.parametrize("mode", ["kexec", "oneshot"])
def test_power_lost_before_the_trial_boot_is_undone_not_failed(host: Host, mode: str) -> None:
    old, new = systems(host)
    run = kexec
    if mode == "oneshot":
        host.use_systemd_boot()
        run = reboot
    killed = run(host, env={STOP_AT: "booting"})
    assert killed.returncode == -signal.SIGKILL, killed
    host.reboot()  # the power comes back: the old default boots, /run is empty
    assert host.current() == old.path
    again = run(host)
    assert again.returncode == 0, again
    assert "never happened" in again.stderr
    # Not a failure of new: undone, then tried again by the same run.
    recorded = host.state_dir / "deploys.json"
    deploys = json.loads(recorded.read_text()) if recorded.exists() else {}
    assert new.path not in deploys.get("failed", {}) and deploys.get("rollbacks", 0) == 0
    assert metric(host.metrics(), "nixos_autodeploy_rollbacks_total") == 0
    assert (journal(host)["trial"], journal(host)["phase"]) == (mode, "booting")
    assert len(boots(host)) == 1


@pytest.mark.parametrize(
    ("printed", "listed"),
    [
        ('[{"id": "a.conf"}, {"id": "b.conf"}]', [{"id": "a.conf"}, {"id": "b.conf"}]),
        # systemd 252 (Debian 12): one object per line.
        ('{"id": "a.conf"}\n{"id": "b.conf"}\n', [{"id": "a.conf"}, {"id": "b.conf"}]),
        ('{"id": "a.conf"}', [{"id": "a.conf"}]),
        ("", []),
    ],
)
def test_bootctl_list_in_either_json_form(printed: str, listed: list[object]) -> None:
    assert listed_entries(printed) == listed


def test_bootctl_list_that_is_not_json_is_an_error() -> None:
    with pytest.raises(ActuatorError, match="printed no JSON"):
        listed_entries("Boot Loader Entries:\n  title: NixOS\n")


def test_oneshot_that_would_drop_the_old_entry_is_refused_and_undone(host: Host) -> None:
    # boot.loader.systemd-boot.configurationLimit = 1: adding new's generation drops old's
    # entry, and the default would point at nothing.
    old, new = systemd_boot_systems(host)
    (host.root / "boot/limit").write_text("1\n")
    result = reboot(host)
    assert result.returncode == 1, result
    assert error_lines(result) == [
        f"error: trial boot (oneshot) into {new.basename} failed: "
        f"systemd-boot dropped the entry of {old.basename} when {new.basename} was "
        "added: a one-time boot needs boot.loader.systemd-boot.configurationLimit >= 2"
    ]
    assert boots(host) == [] and not host.oneshot_path.exists()
    # Its generation deleted before the old system installed the boot loader again.
    assert generations(host) == ["system-1-link"]
    assert host.activations() == [("boot", old.path), ("boot", old.path)]
    assert (host.profile(), host.boot_default()) == (old.path, old.path)
    assert journal(host)["phase"] == "rolled-back"
    assert host.snapshot()["dirty"] is False
    # Counted, and not tried again (the limit refuses it each time) until upstream changes.
    assert host.read_json("deploys.json")["totals"] == {"success": 0, "failure": 1}
    again = reboot(host)
    assert again.returncode == 0 and "not retried" in again.stderr, again


def test_a_profile_rolled_back_by_hand_gets_a_plain_reboot_trial(host: Host) -> None:
    # Not at its newest generation: the new one would not come right after it.
    old, new = systemd_boot_systems(host)
    host.set_profile(new)
    env = host.nix_env()
    subprocess.run(
        ["nix-env", "--profile", str(host.profile_link), "--switch-generation", "1"],
        env=env,
        check=True,
        capture_output=True,
    )
    assert host.profile() == old.path
    assert reboot(host).returncode == 0
    assert journal(host)["trial"] == "reboot"
    assert host.recorded("bootctl") == []
    assert host.boot_default() == new.path


# ---- issue 20: trials that cannot boot, that cannot be installed, that were cut short -----


def test_reboot_trial_killed_before_its_reboot_is_undone_not_taken_for_success(
    host: Host,
) -> None:
    # Issue 20, defect 7: the next run in the same boot took this boot's mark for success,
    # recorded new as deployed and rebooted into it unchecked.
    old, new = systems(host)
    check = ("--health-check", not_running(host, new))
    killed = reboot(host, *check, env={STOP_AT: "booting"})
    assert killed.returncode == -signal.SIGKILL, killed
    assert boots(host) == []
    again = reboot(host, *check)
    assert again.returncode == 0, again
    assert "the reboot into" in again.stderr and "did not happen; undoing it" in again.stderr
    # Undone (its default back on old), decided anew: the trial again, as a trial.
    assert host.activations() == [("boot", new.path), ("boot", old.path), ("boot", new.path)]
    assert journal(host)["phase"] == "booting"
    assert not (host.state_dir / "deploys.json").exists(), "nothing counted"
    assert boots(host) == [["reboot"]]
    host.reboot()
    checked = reboot(host, *check)
    assert checked.returncode == 1, checked
    assert "failed its health checks after its trial boot" in error_lines(checked)[0]
    assert (host.profile(), host.boot_default()) == (old.path, old.path)


def test_kexec_refused_by_the_kernel_is_counted_and_not_retried(host: Host) -> None:
    # Issue 20, defect 3: Secure Boot lockdown refuses kexec --load; nothing was recorded,
    # and every run tried again.
    old, new = systems(host)
    (host.root / "kexec-fails.--load").write_text(
        "kexec_file_load failed: Operation not permitted\n"
    )
    result = kexec(host)
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert error.startswith(f"error: trial boot (kexec) into {new.basename} failed: "), error
    assert "Operation not permitted" in error
    assert boots(host) == [] and journal(host)["phase"] == "rolled-back"
    assert (host.current(), host.profile(), host.boot_default()) == (old.path,) * 3
    deploys = host.read_json("deploys.json")
    assert deploys["totals"] == {"success": 0, "failure": 1} and new.path in deploys["failed"]
    assert metric(host.metrics(), "nixos_autodeploy_deployments_total", result="failure") == 1
    again = kexec(host)
    assert again.returncode == 0 and "not retried" in again.stderr, again
    assert [argv[0] for argv in host.recorded("kexec")] == ["--load", "--unload"]


def test_undone_kexec_trial_unloads_its_kernel_and_is_never_adopted(host: Host) -> None:
    # Issue 20, defect 10: `systemctl kexec` failed after `kexec --load`; the kernel stayed
    # loaded, the next reboot by anyone booted new, and the agent adopted it unchecked.
    old, new = systems(host)
    (host.root / "systemctl-fails.kexec").write_text("Failed to kexec: Access denied\n")
    result = kexec(host)
    assert result.returncode == 1, result
    assert "Access denied" in error_lines(result)[0]
    loaded = ["--load", f"{new}/kernel"]
    assert [argv[:2] for argv in host.recorded("kexec")] == [loaded, ["--unload"]]
    assert (host.current(), host.profile(), host.boot_default()) == (old.path,) * 3
    # Had the unload failed too: a later reboot kexecs new. It is not adopted.
    (host.root / "systemctl-fails.kexec").unlink()
    host.kexec_into(new)
    after = kexec(host)
    assert after.returncode == 0, after.stderr
    assert host.read_json("deployed.json")["path"] == old.path
    assert host.profile() == old.path
    assert boots(host) == [["kexec"]], "only the one refused"


def test_undone_kexec_trial_whose_system_runs_anyway_is_not_adopted(host: Host) -> None:
    # Issue 20, defect 10, the second half: a trial undone without counting a failure (cut
    # short before its kexec), its kernel booted all the same.
    old, new = systems(host)
    assert kexec(host, env={STOP_AT: "booting"}).returncode == -signal.SIGKILL
    # The next run, outside its window: undone, not tried again.
    closed = ("--reboot-window", closed_window())
    undone = kexec(host, *closed, env={"TZ": "UTC"})
    assert undone.returncode == 0, undone
    assert journal(host)["phase"] == "rolled-back"
    assert [argv[0] for argv in host.recorded("kexec")] == ["--unload"]
    host.kexec_into(new)
    after = kexec(host, *closed, env={"TZ": "UTC"})
    assert after.returncode == 0, after
    assert "never checked; not adopting it" in after.stderr
    assert host.read_json("deployed.json")["path"] == old.path


def test_confirmed_trial_whose_boot_loader_install_fails_goes_back(host: Host) -> None:
    # Issue 20, defect 5: new passed its checks after its kexec, its `switch-to-configuration
    # boot` failed (a full ESP): the journal stayed `checking` for ever, nothing recorded.
    built = host.build(SystemSpec("newer", kernel=NEW_KERNEL))
    old, new = systems(host)
    assert kexec(host).returncode == 0
    host.kexec_into(new)
    host.fail_activation(new, "cp: error writing '/boot/EFI/nixos/kernel': No space left")
    result = kexec(host)
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert error.startswith(f"error: {new.basename} passed its checks, but installing it failed")
    assert "No space left" in error
    # Consistent: profile and default on old (its boot loader installed again); new, which
    # runs but is not what the next boot loads, is left by the one rollback reboot.
    assert host.activations() == [("boot", new.path), ("boot", old.path)]
    assert (host.profile(), host.boot_default()) == (old.path, old.path)
    assert boots(host) == [["kexec"], ["reboot"]]
    assert journal(host)["phase"] == "rolled-back"
    deploys = host.read_json("deploys.json")
    assert deploys["totals"] == {"success": 0, "failure": 1} and new.path in deploys["failed"]
    host.reboot()
    assert kexec(host).returncode == 0
    assert_on(host, old, "update-available")
    # A newer upstream proceeds.
    host.publish(built["newer"])
    assert host.collect().returncode == 0
    assert kexec(host).returncode == 0
    assert boots(host) == [["kexec"], ["reboot"], ["kexec"]]
    assert journal(host)["path"] == built["newer"].path


def test_kexec_trial_of_a_system_with_initrd_secrets_is_refused(
    host: Host, lock_server: FleetLockServer
) -> None:
    built = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL, initrd_secrets=True))
    tracking(host, built["old"], built["new"], collect=True)
    write_machine_id(host)
    before = host.links()
    result = kexec(host, "--fleet-lock-url", lock_server.url)
    assert result.returncode == 1, result
    assert error_lines(result) == [
        f"error: {built['new'].basename} sets boot.initrd.secrets, which a kexec'd initrd "
        "lacks (append-initrd-secrets): use --reboot-mode reboot"
    ]
    assert host.links() == before and host.recorded("kexec") == [] and boots(host) == []
    assert lock_server.calls("/v1/pre-reboot") == []


def test_oneshot_trial_on_unified_kernel_images_is_refused(
    host: Host, lock_server: FleetLockServer
) -> None:
    old, _ = systemd_boot_systems(host)
    (host.root / "boot/uki").touch()  # Lanzaboote: entries carry no init=
    write_machine_id(host)
    before = host.links()
    result = reboot(host, "--fleet-lock-url", lock_server.url)
    assert result.returncode == 1, result
    assert error_lines(result) == [
        f"error: systemd-boot's entries do not name their system (no init={old}/init; "
        "unified kernel images, e.g. Lanzaboote): a one-time trial boot cannot pick the new "
        "one; use --reboot-mode kexec"
    ]
    assert host.links() == before and boots(host) == []
    assert lock_server.calls("/v1/pre-reboot") == []
    assert not (host.state_dir / "journal.json").exists()


def test_a_finished_journal_of_a_newer_version_is_read(host: Host) -> None:
    _, new = systems(host)
    assert kexec(host).returncode == 0
    host.kexec_into(new)
    assert kexec(host).returncode == 0
    path = host.state_dir / "journal.json"
    written = json.loads(path.read_text())
    assert written["finished"] is True
    # A downgrade: a trial kind, then a finished phase, this version does not know.
    for changes in ({"trial": "pxe"}, {"phase": "abandoned", "trial": "pxe"}):
        path.write_text(json.dumps({**written, **changes}))
        result = kexec(host)
        assert result.returncode == 0, (changes, result)
        assert host.snapshot()["state"] == "up-to-date"
    # An open phase it does not know is still refused: what it left half done is unknown.
    path.write_text(json.dumps({**written, "phase": "abandoned", "finished": False}))
    refused = kexec(host)
    assert refused.returncode == 1, refused
    assert "is corrupt" in error_lines(refused)[0]


def write_machine_id(host: Host) -> None:
    (host.root / "etc").mkdir(exist_ok=True)
    (host.root / "etc/machine-id").write_text("e" * 32 + "\n")


def closed_window() -> str:
    """A maintenance window (UTC) that is closed for the next hours."""
    hour = datetime.now(UTC).hour
    return f"{(hour + 6) % 24:02d}:00-{(hour + 7) % 24:02d}:00"
