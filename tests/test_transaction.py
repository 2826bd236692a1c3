"""The deploy's state machine (actuator/transaction.py), in process: every transition's exact
commands and journal phases, the commands played by tests/harness/machine.py. The same paths
run against real Nix and a sandbox host in the deploy, rollback and trial tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.machine import Machine, machine

from actuator import health, transaction
from actuator.records import save_deployed, track
from actuator.transaction import Before, Journal, Phase
from actuator.trial import TrialKind
from collector.collect import assess
from collector.config import HealthSettings, Paths, RebootMode, Settings
from collector.errors import ActuatorError, ProcessError
from collector.records import CheckResult, HealthResult, load_deploys
from collector.snapshot import Snapshot, Upstream
from collector.state import Activation, Deployed, load_deployed
from collector.store import StorePath

__all__ = ["machine"]  # the fixture, for pytest

LOADER_INFO = "sys/firmware/efi/efivars/LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
PASSED = HealthResult.of((CheckResult("check", True, ("fine",)),), 1, 1.0)
FAILED = HealthResult.of((CheckResult("check", False, ("broken",)),), 2, 1.0)


@dataclasses.dataclass
class Run:
    """One host: machine a installed and deployed, b published; the phases journaled."""

    machine: Machine
    settings: Settings
    a: StorePath
    b: StorePath
    phases: list[str]
    health: list[HealthResult]  # what the next health checks give, in order

    def snapshot(self) -> Snapshot:
        upstream = Upstream(path=self.b, fetched_at=1.0, changed_at=1.0)
        return assess(self.settings, upstream, 0.0, load_deploys(self.settings.paths))

    def with_reboot(self, mode: RebootMode) -> None:
        self.settings = dataclasses.replace(self.settings, reboot_mode=mode)

    def journal(self) -> Journal:
        entry = transaction.load(self.settings.paths)
        assert entry is not None
        return entry

    def commands(self) -> list[str]:
        return self.machine.commands()


@pytest.fixture
def host(machine: Machine, monkeypatch: pytest.MonkeyPatch) -> Iterator[Run]:
    a, b = machine.system("a"), machine.system("b", kernel="6.2")
    machine.install(a)
    machine.point("run/upstream-system", b)
    paths = Paths(root=str(machine.root), state_dir=str(machine.root / "var/lib/nixos-autodeploy"))
    settings = Settings(paths=paths, health=HealthSettings(commands=("true",)))
    host = Run(machine, settings, StorePath(a), StorePath(b), [], [])
    write = transaction._write

    def journaled(paths: Paths, entry: Journal) -> Journal:
        host.phases.append(entry.phase.value)
        return write(paths, entry)

    def checks(settings: Settings) -> HealthResult:
        return host.health.pop(0) if host.health else PASSED

    monkeypatch.setattr(transaction, "_write", journaled)
    monkeypatch.setattr(health, "run_checks", checks)
    track(paths, StorePath(a))
    yield host


def nix_env(*args: str) -> str:
    return "nix-env --profile <root>/nix/var/nix/profiles/system " + " ".join(args)


def test_a_switch_that_passes_its_checks(host: Run) -> None:
    transaction.start(host.settings, host.snapshot(), Activation.SWITCH)
    assert host.commands() == [nix_env("--set", "b"), "b/bin/switch-to-configuration switch"]
    assert host.phases == ["planned", "profile-set", "activating", "activated", "checking", "done"]
    record = load_deployed(host.settings.paths)
    assert record is not None and (record.path, record.previous) == (host.b, host.a)
    last = load_deploys(host.settings.paths).last
    assert last is not None and last.ok and last.id == host.journal().id


def test_a_switch_that_fails_its_checks_is_switched_back(host: Run) -> None:
    host.health.append(FAILED)
    with pytest.raises(ActuatorError, match="failed its health checks: check 'check' failed"):
        transaction.start(host.settings, host.snapshot(), Activation.SWITCH)
    assert host.commands() == [
        nix_env("--set", "b"),
        "b/bin/switch-to-configuration switch",
        nix_env("--set", "a"),
        "a/bin/switch-to-configuration switch",
    ]
    assert host.phases == [
        *("planned", "profile-set", "activating", "activated", "checking"),
        *("failed", "rolling-back", "rolled-back"),
    ]
    deploys = load_deploys(host.settings.paths)
    assert list(deploys.failed) == [host.b] and deploys.rollbacks == 1
    assert host.machine.link("run/current-system") == str(host.a)


def test_an_activation_that_fails_goes_back_to_the_old_boot_default(host: Run) -> None:
    host.machine.failing[f"{host.b}/bin/switch-to-configuration"] = "no"
    with pytest.raises(ActuatorError, match=r"deploying .*-nixos-system-b \(switch\) failed"):
        transaction.start(host.settings, host.snapshot(), Activation.SWITCH)
    assert host.commands() == [
        nix_env("--set", "b"),
        "b/bin/switch-to-configuration switch",
        nix_env("--set", "a"),
        "a/bin/switch-to-configuration boot",
    ]
    assert host.phases == [
        *("planned", "profile-set", "activating", "failed", "rolling-back", "rolled-back")
    ]


def test_a_profile_that_cannot_be_set_changes_nothing_and_blocks_nothing(host: Run) -> None:
    host.machine.failing["nix-env"] = "disk full"
    with pytest.raises(ActuatorError, match="disk full"):
        transaction.start(host.settings, host.snapshot(), Activation.SWITCH)
    assert host.commands() == [nix_env("--set", "b")]
    assert host.phases == ["planned", "profile-set", "failed", "rolling-back", "rolled-back"]
    assert load_deploys(host.settings.paths).failed == {}


def test_a_boot_deploy_without_reboot_waits_for_the_operator(host: Run) -> None:
    transaction.start(host.settings, host.snapshot(), Activation.BOOT)
    assert host.commands() == [nix_env("--set", "b"), "b/bin/switch-to-configuration boot"]
    assert host.phases == ["planned", "profile-set", "activating", "activated", "done"]


def test_a_kexec_trial_loads_and_kexecs_with_nothing_else_changed(host: Run) -> None:
    host.with_reboot(RebootMode.KEXEC)
    transaction.start(host.settings, host.snapshot(), Activation.BOOT)
    assert host.commands() == [
        "kexec --load b/kernel --initrd=b/initrd "
        "--append=loglevel=4 system=b init=b/init panic=30 boot.panic_on_fail",
        "systemctl kexec",
    ]
    assert host.phases == ["planned", "booting"]
    assert host.journal().trial is TrialKind.KEXEC
    record = load_deployed(host.settings.paths)
    assert record is not None and record.reboot_issued_at is not None
    assert host.machine.profile() == str(host.a)


def test_a_reboot_trial_makes_the_new_system_the_default_first(host: Run) -> None:
    host.with_reboot(RebootMode.REBOOT)
    transaction.start(host.settings, host.snapshot(), Activation.BOOT)
    assert host.commands() == [
        nix_env("--set", "b"),
        "b/bin/switch-to-configuration boot",
        "systemctl reboot",
    ]
    assert host.phases == ["planned", "profile-set", "activating", "activated", "booting"]


def systemd_boot(host: Run) -> None:
    info = host.machine.root / LOADER_INFO
    info.parent.mkdir(parents=True)
    info.write_bytes(b"\x06\0\0\0" + "systemd-boot 252\0".encode("utf-16-le"))


def test_a_oneshot_trial_boots_the_new_entry_once(host: Run) -> None:
    systemd_boot(host)
    host.with_reboot(RebootMode.REBOOT)
    transaction.start(host.settings, host.snapshot(), Activation.BOOT)
    assert host.commands() == [
        "bootctl list --json=short --no-pager",  # the entries name their systems
        nix_env("--set", "b"),
        nix_env("--switch-generation", "1"),
        "a/bin/switch-to-configuration boot",
        "bootctl list --json=short --no-pager",
        "bootctl set-oneshot nixos-generation-2.conf",
        "systemctl reboot",
    ]
    assert host.phases == ["planned", "booting"]
    assert host.machine.oneshot == "nixos-generation-2.conf"
    assert host.machine.profile() == str(host.a)


def test_a_oneshot_whose_bootctl_fails_is_refused_before_anything(host: Run) -> None:
    systemd_boot(host)
    host.with_reboot(RebootMode.REBOOT)
    host.machine.failing["bootctl list"] = "no entries"
    with pytest.raises(ProcessError, match="no entries"):
        transaction.start(host.settings, host.snapshot(), Activation.BOOT)
    assert host.commands() == ["bootctl list --json=short --no-pager"]
    assert host.phases == []
    assert host.machine.generations() == {1: str(host.a)}


def after_the_kexec(host: Run) -> None:
    host.with_reboot(RebootMode.KEXEC)
    transaction.start(host.settings, host.snapshot(), Activation.BOOT)
    host.machine.boot(str(host.b))
    host.machine.ran.clear()
    host.phases.clear()


def test_a_kexec_trial_that_passes_becomes_the_profile_and_default(host: Run) -> None:
    after_the_kexec(host)
    assert transaction.recover(host.settings) is None
    assert host.commands() == [nix_env("--set", "b"), "b/bin/switch-to-configuration boot"]
    # The second `checking`: before the boot loader install, which a rollback would redo.
    assert host.phases == ["checking", "checking", "done"]


def test_a_kexec_trial_that_fails_reboots_back_once(host: Run) -> None:
    after_the_kexec(host)
    host.health.append(FAILED)
    with pytest.raises(ActuatorError, match="failed its health checks after its trial boot"):
        transaction.recover(host.settings)
    assert host.commands() == ["systemctl reboot"]
    assert host.phases == ["checking", "failed", "rolling-back", "rebooting-back", "rolled-back"]
    assert load_deploys(host.settings.paths).rollbacks == 1


def test_a_kexec_trial_that_never_came_up_is_failed_without_a_reboot(host: Run) -> None:
    after_the_kexec(host)
    host.machine.boot(str(host.a))  # the panic's reset: the old default
    with pytest.raises(ActuatorError, match="did not come up on its trial boot"):
        transaction.recover(host.settings)
    assert host.commands() == []
    assert host.phases == ["failed", "rolling-back", "rolled-back"]


def test_a_kexec_refused_is_counted_undone_and_unloaded(host: Run) -> None:
    host.with_reboot(RebootMode.KEXEC)
    host.machine.failing["kexec --load"] = "lockdown"
    with pytest.raises(ActuatorError, match=r"^trial boot \(kexec\) into .* failed: .*lockdown"):
        transaction.start(host.settings, host.snapshot(), Activation.BOOT)
    assert host.phases == ["planned", "booting", "rolling-back", "rolled-back"]
    assert host.commands()[-1] == "kexec --unload"
    deploys = load_deploys(host.settings.paths)
    assert deploys.totals == {"success": 0, "failure": 1} and host.b in deploys.failed


def open_journal(host: Run, phase: Phase, *, activation_started: bool) -> Journal:
    """A run of a b's switch killed at phase (a failing one: blocks_retry)."""
    before = Before(host.a, host.a, load_deployed(host.settings.paths))
    entry = Journal(
        "j1", host.b, Activation.SWITCH, before, phase, 1.0, activation_started, blocks_retry=True
    )
    transaction._write(host.settings.paths, entry)
    host.phases.clear()
    save_deployed(
        host.settings.paths, Deployed(host.b, Activation.SWITCH, host.a, 1.0, complete=False)
    )
    return entry


# phase left by a killed run, whether b's switch took effect -> the next run's commands and
# phases, and whether the journal is handed back to be superseded
RECOVERY = [
    (Phase.PLANNED, False, [], [], True),
    (Phase.PROFILE_SET, False, [], [], True),
    (Phase.ACTIVATING, False, [], [], True),
    (Phase.ACTIVATING, True, [], ["activated", "checking", "done"], False),
    (Phase.ACTIVATED, True, [], ["checking", "done"], False),
    (Phase.CHECKING, True, [], ["checking", "done"], False),
    (
        Phase.FAILED,
        True,
        [nix_env("--set", "a"), "a/bin/switch-to-configuration switch"],
        ["rolling-back", "rolled-back"],
        False,
    ),
    (
        Phase.ROLLING_BACK,
        True,
        [nix_env("--set", "a"), "a/bin/switch-to-configuration switch"],
        ["rolled-back"],
        False,
    ),
]


def test_recovery_table_covers_every_open_phase() -> None:
    assert set(transaction.RECOVERY) == set(Phase) - transaction.FINISHED


@pytest.mark.parametrize(
    ("phase", "took_effect", "commands", "phases", "superseded"),
    RECOVERY,
    ids=[f"{p.value}{'-switched' if t else ''}" for p, t, *_ in RECOVERY],
)
def test_a_killed_run_is_finished_by_the_next(
    host: Run,
    phase: Phase,
    took_effect: bool,
    commands: list[str],
    phases: list[str],
    superseded: bool,
) -> None:
    open_journal(host, phase, activation_started=took_effect)
    if took_effect:
        host.machine.run(["nix-env", "--profile", "p", "--set", str(host.b)])
        host.machine.run([f"{host.b}/bin/switch-to-configuration", "switch"])
        host.machine.ran.clear()
    left = transaction.recover(host.settings)
    assert (left is not None) == superseded
    assert host.commands() == commands
    assert host.phases == phases


def test_a_rollback_that_fails_stays_rolling_back_and_says_so(host: Run) -> None:
    open_journal(host, Phase.FAILED, activation_started=True)
    host.machine.run(["nix-env", "--profile", "p", "--set", str(host.b)])
    host.machine.failing["nix-env"] = "read-only file system"
    with pytest.raises(ActuatorError, match=r"rolling back failed too.*read-only"):
        transaction.recover(host.settings)
    assert host.journal().phase is Phase.ROLLING_BACK
    rollback = load_deploys(host.settings.paths).last_rollback
    assert rollback is not None and not rollback.ok


def test_the_contract_lists_every_phase_as_the_code_has_it() -> None:
    text = (Path(__file__).parents[1] / "docs/CONTRACT.md").read_text()
    contract = "\n".join(line.strip() for line in text.splitlines())  # inside a list item
    assert transaction.contract_table() in contract
