"""The one room for reboots (actuator/reboot.py), in process: how each kind of reboot is done
(exact commands), what is recorded before it, what a failure leaves, and when one may happen
(windows, FleetLock against the harness's server). The commands are played by
tests/harness/machine.py; the reboot tests with real Nix are test_deploy.py,
test_reboot_orchestration.py and test_trial.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pytest
from harness import FleetLockServer
from harness.machine import Machine, machine

from actuator import reboot
from actuator.gate import Action
from actuator.reboot import How, Reboot
from actuator.records import save_deployed
from collector import history
from collector.collect import assess
from collector.config import Paths, Settings
from collector.errors import ActuatorError, ProcessError
from collector.history import Kind
from collector.process import Result
from collector.reboot import WaitReason, load_reboot_state
from collector.records import Deploys
from collector.snapshot import Snapshot, Upstream
from collector.state import Activation, Deployed, load_deployed
from collector.store import StorePath

__all__ = ["machine"]  # the fixture, for pytest

MONDAY_NOON = datetime(2026, 11, 30, 12, 0).astimezone()


def settings_for(
    machine: Machine,
    windows: tuple[str, ...] = (),
    lock_url: str | None = None,
    group: str = "default",
) -> Settings:
    paths = Paths(root=str(machine.root), state_dir=str(machine.root / "var/lib/nixos-autodeploy"))
    (machine.root / "etc").mkdir(exist_ok=True)
    (machine.root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    return Settings(
        paths=paths, reboot_windows=windows, fleet_lock_url=lock_url, fleet_lock_group=group
    )


def deployed(machine: Machine, settings: Settings, system: str) -> Deployed:
    record = Deployed(StorePath(system), Activation.BOOT, None, 1.0)
    save_deployed(settings.paths, record)
    return record


def events(settings: Settings) -> list[history.Event]:
    return history.read(settings.paths.state(history.FILE))[0]


def snapshot(settings: Settings) -> Snapshot:
    return assess(settings, Upstream(), 0.0, Deploys())


@pytest.mark.parametrize(
    ("how", "commands"),
    [
        (How.REBOOT, ["systemctl reboot"]),
        (
            How.KEXEC,
            [
                "kexec --load b/kernel --initrd=b/initrd "
                "--append=loglevel=4 system=b init=b/init panic=30 boot.panic_on_fail",
                "systemctl kexec",
            ],
        ),
        (How.BACK, ["systemctl reboot"]),
    ],
)
def test_each_way_of_rebooting_runs_its_commands(
    machine: Machine, how: How, commands: list[str]
) -> None:
    settings = settings_for(machine)
    b = machine.system("b")
    reboot.reboot(settings, Reboot(how, StorePath(b), Kind.REBOOT))
    assert machine.commands() == commands


def test_a_deploys_reboot_is_recorded_before_it_is_issued(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(machine)
    b = machine.system("b")
    deployed(machine, settings, b)
    seen: list[float | None] = []

    def issue(argv: Sequence[str], *, check: bool = True, stream_stderr: bool = False) -> Result:
        record = load_deployed(settings.paths)
        seen.append(record.reboot_issued_at if record else None)
        return machine.run(argv, check=check, stream_stderr=stream_stderr)

    monkeypatch.setattr(reboot, "run", issue)
    reboot.reboot(settings, Reboot(How.REBOOT, StorePath(b), Kind.REBOOT))
    assert seen == [load_deployed(settings.paths).reboot_issued_at]  # type: ignore[union-attr]
    assert seen[0] is not None, "reboot_issued_at is on record when systemctl reboot runs"
    assert [(e.kind, e.path) for e in events(settings)] == [(Kind.REBOOT, b)]


def test_a_reboot_command_that_fails_puts_the_record_back(machine: Machine) -> None:
    settings = settings_for(machine)
    b = machine.system("b")
    record = deployed(machine, settings, b)
    machine.failing["systemctl reboot"] = "interactive authentication required"
    with pytest.raises(ProcessError, match="interactive authentication"):
        reboot.reboot(settings, Reboot(How.REBOOT, StorePath(b), Kind.REBOOT))
    assert load_deployed(settings.paths) == record, "the one reboot is still to come"


def test_a_kexec_that_cannot_be_loaded_records_nothing_and_does_not_go_down(
    machine: Machine,
) -> None:
    settings = settings_for(machine)
    b = machine.system("b")
    record = deployed(machine, settings, b)
    machine.failing["kexec --load"] = "Operation not permitted"
    with pytest.raises(ProcessError, match="not permitted"):
        reboot.reboot(settings, Reboot(How.KEXEC, StorePath(b), Kind.KEXEC))
    assert machine.commands()[-1].startswith("kexec --load")
    assert load_deployed(settings.paths) == record
    assert events(settings) == []


def test_the_rollback_reboot_leaves_the_deployed_record_alone(machine: Machine) -> None:
    settings = settings_for(machine)
    a, b = machine.system("a"), machine.system("b")
    record = deployed(machine, settings, a)
    reboot.reboot(settings, Reboot(How.BACK, StorePath(b), Kind.ROLLBACK_REBOOT))
    assert load_deployed(settings.paths) == record
    assert [(e.kind, e.path) for e in events(settings)] == [(Kind.ROLLBACK_REBOOT, b)]


def test_a_one_time_entry_is_the_systems_own(machine: Machine) -> None:
    settings = settings_for(machine)
    a, b = machine.system("a"), machine.system("b")
    machine.install(a)
    machine.run(["nix-env", "--profile", "p", "--set", b])
    machine.run(["nix-env", "--profile", "p", "--switch-generation", "1"])
    machine.ran.clear()
    reboot.reboot(settings, Reboot(How.ONESHOT, StorePath(b), Kind.TRIAL_ONESHOT))
    assert machine.commands() == [
        "bootctl list --json=short --no-pager",
        "bootctl set-oneshot nixos-generation-2.conf",
        "systemctl reboot",
    ]


def test_a_one_time_entry_without_the_old_systems_entry_is_refused(machine: Machine) -> None:
    settings = settings_for(machine)
    a, b = machine.system("a"), machine.system("b")
    machine.install(a)
    machine.run(["nix-env", "--profile", "p", "--set", b])
    machine.run(["nix-env", "--profile", "p", "--switch-generation", "1"])
    machine.limit = 1  # boot.loader.systemd-boot.configurationLimit = 1: only b's is left
    with pytest.raises(ActuatorError, match="configurationLimit >= 2"):
        reboot.reboot(settings, Reboot(How.ONESHOT, StorePath(b), Kind.TRIAL_ONESHOT))
    assert machine.commands()[-1] == "bootctl list --json=short --no-pager"


@pytest.mark.parametrize(
    ("listing", "entries"),
    [
        ('[{"id": "a.conf"}, {"id": "b.conf"}]', [{"id": "a.conf"}, {"id": "b.conf"}]),
        ('{"id": "a.conf"}\n{"id": "b.conf"}\n', [{"id": "a.conf"}, {"id": "b.conf"}]),
        ("", []),
    ],
)
def test_bootctl_lists_in_both_json_forms(listing: str, entries: list[object]) -> None:
    assert reboot.listed_entries(listing) == entries


def test_outside_every_window_the_reboot_waits_and_says_until_when(machine: Machine) -> None:
    settings = settings_for(machine, windows=("Sat,Sun 02:00-04:00",))
    assert reboot.clear_to_reboot(settings, snapshot(settings), at=MONDAY_NOON) is None
    waiting = load_reboot_state(settings.paths).waiting
    assert waiting is not None and waiting.reason is WaitReason.WINDOW
    assert waiting.message == "reboot waits for window Sat,Sun 02:00-04:00 (next opens Sat 02:00)"
    assert [e.kind for e in events(settings)] == [Kind.REBOOT_WAIT]


def test_inside_a_window_the_reboot_may_go(machine: Machine) -> None:
    settings = settings_for(machine, windows=("Mon 11:00-13:00",))
    cleared = reboot.clear_to_reboot(settings, snapshot(settings), at=MONDAY_NOON)
    assert cleared is not None and cleared.reboot.waiting is None


def test_a_fleet_lock_slot_is_taken_then_given_back(
    machine: Machine, lock_server: FleetLockServer
) -> None:
    settings = settings_for(machine, lock_url=lock_server.url, group="web")
    cleared = reboot.clear_to_reboot(settings, snapshot(settings), at=MONDAY_NOON)
    assert cleared is not None and cleared.reboot.slot is not None
    assert cleared.reboot.slot.group == "web" and len(lock_server.held("web")) == 1
    reboot.settle(settings, snapshot(settings), Action.NOTHING)
    assert lock_server.held("web") == []
    assert load_reboot_state(settings.paths).slot is None
    assert [e.kind for e in events(settings)] == [Kind.FLEET_LOCK, Kind.FLEET_UNLOCK]


def test_a_refused_slot_is_a_wait_for_the_fleet_lock(
    machine: Machine, lock_server: FleetLockServer
) -> None:
    settings = settings_for(machine, lock_url=lock_server.url)
    lock_server.holders["default"] = ["another-host"]
    assert reboot.clear_to_reboot(settings, snapshot(settings), at=MONDAY_NOON) is None
    waiting = load_reboot_state(settings.paths).waiting
    assert waiting is not None and waiting.reason is WaitReason.FLEET_LOCK
    assert waiting.message.startswith("reboot slot refused by fleet lock")


def test_the_history_file_is_one_json_object_a_line(machine: Machine) -> None:
    settings = settings_for(machine)
    b = machine.system("b")
    reboot.reboot(settings, Reboot(How.REBOOT, StorePath(b), Kind.REBOOT))
    lines = Path(settings.paths.state(history.FILE)).read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["reboot"]
