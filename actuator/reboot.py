"""The one room for reboots: whether one may happen now (inside a maintenance window, with
a FleetLock reboot slot), when the slot goes back, how it is done (a reboot, a kexec, a
systemd-boot one-time entry, the rollback reboot after a failed trial), and what is recorded
before it. Whether one is required is the gate's (gate.may_reboot). Every reboot and kexec
of the agent goes through `reboot()`.

What it decides about waiting is kept in reboot.json (collector/reboot.py) for status and
metrics, and said in the history."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from collector.collect import observe, report
from collector.config import Paths, Settings
from collector.errors import ActuatorError, AutodeployError
from collector.history import Event, Kind
from collector.http import shown
from collector.process import run
from collector.reboot import RebootState, SlotHeld, Waiting, WaitReason, load_reboot_state
from collector.records import DeployResult, load_deploys
from collector.snapshot import Snapshot
from collector.state import load_deployed, read_links
from collector.store import StorePath

from . import commands, fleetlock, profile, window
from .gate import Action, may_reboot
from .records import note, record_result, save_deployed, save_reboot_state

log = logging.getLogger(__name__)

# systemd-boot's LoaderInfo EFI variable: set by systemd-boot when it booted this machine.
LOADER_INFO = "/sys/firmware/efi/efivars/LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"


TRIAL_EVENTS = frozenset({Kind.TRIAL_KEXEC, Kind.TRIAL_ONESHOT, Kind.TRIAL_REBOOT})


class How(StrEnum):
    REBOOT = "reboot"  # systemctl reboot: the boot loader's default
    KEXEC = "kexec"  # kexec --load the system, then systemctl kexec
    ONESHOT = "oneshot"  # systemd-boot boots the system's entry once, then its default
    BACK = "back"  # after a failed trial: systemctl reboot into the default, which is old


@dataclass(frozen=True)
class Reboot:
    how: How
    system: StorePath  # what it boots (BACK: the failed system it leaves)
    event: Kind  # what the history calls it

    @property
    def saying(self) -> str:
        if self.how is How.BACK:
            return f"rebooting back from {self.system.name}"
        if self.event in TRIAL_EVENTS:
            return f"trial boot ({self.how.value}) into {self.system.name}"
        return f"rebooting ({self.how.value}) into {self.system.name}"

    @property
    def counts(self) -> bool:
        """Recorded on the system's deployed record (reboot_issued_at): the one reboot of
        its deploy, never repeated. The rollback reboot boots what was there before."""
        return self.how is not How.BACK


# ---- may it happen now ------------------------------------------------------------------


def check(settings: Settings) -> None:
    """Refuse bad reboot settings before anything changes."""
    window.parse_all(settings.reboot_windows)
    if settings.fleet_lock_url:
        fleetlock.host_id(settings.paths)


def boot_confirmed(snapshot: Snapshot) -> bool:
    """The new boot is confirmed, so its reboot slot can go back: the host came back on the
    deployed system. A trial boot's health checks have passed by then (or it was rolled
    back): the transaction's recovery finishes a trial before settle() runs."""
    deployed = snapshot.deployed
    return deployed is not None and snapshot.links.current == deployed.path


def _release_due(snapshot: Snapshot, action: Action) -> bool:
    """No reboot is pending, and the host is not in a new boot that awaits confirmation.
    (A reboot that did not take is not retried: its slot goes back too.)"""
    if action is Action.REBOOT:
        return False
    deployed = snapshot.deployed
    in_new_boot = (
        deployed is not None
        and deployed.reboot_issued_at is not None
        and snapshot.links.current == deployed.path
    )
    return not in_new_boot or boot_confirmed(snapshot)


def _operator_reason(settings: Settings, snapshot: Snapshot) -> str:
    deployed = snapshot.deployed
    if settings.reboot_mode is None:
        return "no --reboot-mode: the operator reboots"
    if deployed is not None and deployed.reboot_issued_at is not None:
        return "rebooted once already and still waits: the operator reboots"
    return "the running system was deployed by hand: its owner reboots"


def _waiting_since(state: RebootState, reason: WaitReason) -> float:
    """A reboot the agent waits to do keeps its start through windows and slots; one left
    to the operator counts apart."""
    previous = state.waiting
    operator = WaitReason.OPERATOR
    if previous is not None and (previous.reason is operator) == (reason is operator):
        return previous.since
    return time.time()


def settle(settings: Settings, snapshot: Snapshot, action: Action) -> None:
    """At the start of every run: give a reboot slot back when no reboot is pending (the
    protocol's unlock is idempotent: this also frees a slot taken just before a crash), and
    say when a required reboot is the operator's to do."""
    state = snapshot.reboot
    if (settings.fleet_lock_url or state.slot) and _release_due(snapshot, action):
        state = _release(settings, state)
    waiting = state.waiting
    if not snapshot.reboot_required or action is Action.DEPLOY:
        waiting = None
    elif action is not Action.REBOOT and not may_reboot(snapshot, settings.reboot_mode):
        reason = _operator_reason(settings, snapshot)
        operator = WaitReason.OPERATOR
        waiting = Waiting(operator, reason, _waiting_since(state, operator))
    # Otherwise a reboot the agent will do keeps what it waited for (a REBOOT decision
    # checks again, a failed fetch leaves it as it was).
    if dataclasses.replace(state, waiting=waiting) != snapshot.reboot:
        save_reboot_state(settings.paths, dataclasses.replace(state, waiting=waiting))


def release(settings: Settings) -> None:
    """Give back a slot taken for a reboot that did not happen (a trial or reboot whose
    preparation failed), in the same run: otherwise it stays held until the next."""
    state = load_reboot_state(settings.paths)
    if state.slot is not None:
        save_reboot_state(settings.paths, _release(settings, state))


def _where(settings: Settings, slot: SlotHeld | None) -> tuple[str | None, str]:
    """Where a slot goes back: to the group and server it was taken from, even when the
    settings changed since (the server's own URL with its credentials when it is still the
    configured one; the recorded one, shown without them, otherwise)."""
    url, group = settings.fleet_lock_url, settings.fleet_lock_group
    if slot is None:
        return url, group
    if url is None or shown(url) != slot.url:
        url = slot.url
    return url, slot.group


def _release(settings: Settings, state: RebootState) -> RebootState:
    ident = fleetlock.host_id(settings.paths)
    url, group = _where(settings, state.slot)
    assert url is not None
    try:
        fleetlock.unlock(settings, ident, url, group)
    except fleetlock.FleetLockError as e:
        if state.slot is not None:
            log.warning("warning: could not release the reboot slot: %s; next run retries", e)
        else:
            log.info("fleet lock: releasing any slot failed: %s", e)
        return state
    if state.slot is not None:
        log.info("released the reboot slot in group %s", state.slot.group)
        note(settings.paths, Event(Kind.FLEET_UNLOCK, group=state.slot.group, id=ident))
    return dataclasses.replace(state, slot=None)


def clear_to_reboot(
    settings: Settings, snapshot: Snapshot, at: datetime | None = None
) -> Snapshot | None:
    """Just before a reboot or kexec: inside a window (when any are set), then a slot from
    the FleetLock server (when one is set). The snapshot to reboot with, or None: then the
    host stays pending, says why in one line, status and metrics, and the next run retries."""
    at = at or window.now()
    state = snapshot.reboot
    message = _window_wait(settings, at)
    if message is not None:
        if settings.fleet_lock_url:  # a slot is taken only inside a window: this one is stale
            state = _release(settings, state)
        _wait(settings, dataclasses.replace(snapshot, reboot=state), WaitReason.WINDOW, message)
        return None
    if settings.fleet_lock_url:
        ident = fleetlock.host_id(settings.paths)
        if state.slot is not None and _where(settings, state.slot) != _where(settings, None):
            # Taken under other settings (another group or server): given back there first.
            state = _release(settings, state)
            if state.slot is not None:
                message = (
                    f"reboot slot still held in group {state.slot.group} at {state.slot.url} "
                    "(the fleet lock settings changed): releasing it failed"
                )
                _wait(
                    settings,
                    dataclasses.replace(snapshot, reboot=state),
                    WaitReason.FLEET_LOCK,
                    message,
                )
                return None
        try:
            fleetlock.lock(settings, ident)
        except fleetlock.FleetLockError as e:
            message = f"reboot slot refused by fleet lock: {e}"
            _wait(settings, snapshot, WaitReason.FLEET_LOCK, message)
            return None
        group = settings.fleet_lock_group
        if state.slot is None:
            note(settings.paths, Event(Kind.FLEET_LOCK, group=group, id=ident))
        log.info("took a reboot slot in fleet lock group %s", group)
        slot = SlotHeld(shown(settings.fleet_lock_url), group, ident, time.time())
        state = dataclasses.replace(state, slot=state.slot or slot)
    state = dataclasses.replace(state, waiting=None)
    save_reboot_state(settings.paths, state)
    return dataclasses.replace(snapshot, reboot=state)


def _window_wait(settings: Settings, at: datetime) -> str | None:
    """Why a reboot at `at` must wait for a maintenance window, or None when it need not."""
    windows = window.parse_all(settings.reboot_windows)
    if not windows or window.open_window(windows, at) is not None:
        return None
    specs = " or ".join(w.spec for w in windows)
    opens = window.next_opening(windows, at)
    later = f" (next opens {opens:%a %H:%M})" if opens else ""
    return f"reboot waits for window {specs}{later}"


def would_wait(settings: Settings, snapshot: Snapshot, at: datetime | None = None) -> list[str]:
    """For --dry-run: what a reboot now would meet before it goes down, said without taking
    anything (the FleetLock protocol has no question that does not take a slot)."""
    at = at or window.now()
    said = []
    waits = _window_wait(settings, at)
    if waits is not None:
        said.append(f"would wait: {waits}")
    elif settings.reboot_windows:
        opened = window.open_window(window.parse_all(settings.reboot_windows), at)
        assert opened is not None
        said.append(f"would not wait: window {opened.spec} is open")
    if settings.fleet_lock_url:
        url, group = shown(settings.fleet_lock_url), settings.fleet_lock_group
        said.append(
            f"would ask {url} for a reboot slot in group {group} first, and wait while it "
            "refuses (a dry run takes none)"
        )
        last = snapshot.reboot.waiting
        if last is not None and last.reason is WaitReason.FLEET_LOCK:
            said.append(f"last time: {last.message}")
    return said


def _wait(settings: Settings, snapshot: Snapshot, reason: WaitReason, message: str) -> None:
    log.info("%s", message)
    state = snapshot.reboot
    waiting = Waiting(reason, message, _waiting_since(state, reason))
    state = dataclasses.replace(state, waiting=waiting)
    save_reboot_state(settings.paths, state)
    note(settings.paths, Event(Kind.REBOOT_WAIT, reason=reason.value, message=message))
    report(settings, dataclasses.replace(snapshot, reboot=state), load_deploys(settings.paths))


# ---- systemd-boot's one-time entry ------------------------------------------------------


def one_time_entries(paths: Paths) -> bool:
    """Whether a reboot can boot a system once: systemd-boot booted this machine (it keeps
    the one-time entry in an EFI variable), and the profile is at its newest generation (the
    new one then comes right after it, and a configurationLimit of 2 keeps both entries)."""
    try:
        with open(paths.under_root(LOADER_INFO), "rb") as f:
            info = f.read()[4:].decode("utf-16-le", "replace")  # after the attribute bits
    except OSError:
        return False
    return "systemd-boot" in info and profile.at_newest(paths)


def _entry_id(entries: list[object], system: StorePath) -> str | None:
    """The id of a boot loader entry that boots system (NixOS writes `init=<system>/init`
    into its entries' options; any entry of system boots the same kernel, initrd and init)."""
    init = f"init={system.path}/init"
    for item in entries:
        if isinstance(item, dict) and init in str(item.get("options", "")).split():
            return str(item["id"])
    return None


def listed_entries(listing: str) -> list[object]:
    """The entries `bootctl list --json=short` printed: a JSON array, or one JSON object
    per line (systemd 252, Debian 12's)."""
    try:
        entries = json.loads(listing)
    except ValueError:
        try:
            return [json.loads(line) for line in listing.splitlines() if line.strip()]
        except ValueError:
            raise ActuatorError("bootctl list --json=short printed no JSON") from None
    return entries if isinstance(entries, list) else [entries]


def check_oneshot(paths: Paths) -> None:
    """A one-time trial finds the new system's entry by its `init=`: refused where the
    entries carry none (unified kernel images, as Lanzaboote installs), before anything
    changes. The default's entry (the profile's system) shows whether they do."""
    old = profile_system(paths)
    entries = listed_entries(run(commands.bootctl_list()).stdout)
    if _entry_id(entries, old) is None:
        raise ActuatorError(
            f"systemd-boot's entries do not name their system (no init={old}/init; unified "
            "kernel images, e.g. Lanzaboote): a one-time trial boot cannot pick the new one; "
            "use --reboot-mode kexec"
        )


def _oneshot_entry(paths: Paths, system: StorePath) -> str:
    """system's entry, which must not be the only one: the default (the profile's system)
    must still have its own to come back to."""
    old = profile_system(paths)
    entries = listed_entries(run(commands.bootctl_list()).stdout)
    new = _entry_id(entries, system)
    if new is None:
        raise ActuatorError(f"systemd-boot has no entry for {system.name} (bootctl list)")
    if _entry_id(entries, old) is None:
        # boot.loader.systemd-boot.configurationLimit = 1 keeps only the newest generation:
        # the default would point at nothing and the firmware would boot the untried one.
        raise ActuatorError(
            f"systemd-boot dropped the entry of {old.name} when {system.name} was added: "
            "a one-time boot needs boot.loader.systemd-boot.configurationLimit >= 2"
        )
    return new


def profile_system(paths: Paths) -> StorePath:
    """What the boot loader's default boots: the profile's system."""
    old = read_links(paths).profile
    if old is None:
        raise ActuatorError(f"{paths.profile} is missing: no default to come back to")
    return old


def clear_oneshot() -> None:
    """Forget a one-time entry still set (a trial undone or rolled back). Only a warning
    when it fails: systemd-boot ignores a one-time entry whose entry is gone."""
    cleared = run(commands.bootctl_set_oneshot(""), check=False)
    if cleared.returncode != 0:
        log.warning("could not clear systemd-boot's one-time entry: %s", cleared.stderr.strip())


# ---- how, and the one entry point -------------------------------------------------------


def argvs(plan: Reboot) -> list[list[str]]:
    """The commands that boot plan.system, as `--dry-run` shows them; all but the last
    prepare, the last goes down. (A one-time entry's id is known only once bootctl lists
    the entries: here it is a placeholder.)"""
    match plan.how:
        case How.KEXEC:
            return [commands.kexec_load(plan.system), commands.kexec()]
        case How.ONESHOT:
            entry = f"<the entry of {plan.system.name}>"
            return [commands.bootctl_set_oneshot(entry), commands.reboot()]
        case How.REBOOT | How.BACK:
            return [commands.reboot()]


def reboot(settings: Settings, plan: Reboot, snapshot: Snapshot | None = None) -> None:
    """Prepare (kexec --load, the one-time entry), record (the history; for a deploy's
    reboot the deployed record's reboot_issued_at, so a machine that comes back still
    waiting is not rebooted again; with snapshot, what operators see), then go down. When
    nothing went down (a command failed), the record is put back and ActuatorError raised."""
    paths = settings.paths
    *prepare, go = argvs(plan)
    if plan.how is How.ONESHOT:
        prepare = [commands.bootctl_set_oneshot(_oneshot_entry(paths, plan.system))]
    for argv in prepare:  # when one fails, nothing rebooted and nothing is recorded
        run(argv, stream_stderr=True)
    record = load_deployed(paths)
    counted = plan.counts and record is not None and record.path == plan.system
    if counted and record is not None:
        rebooting = dataclasses.replace(record, reboot_issued_at=time.time())
        save_deployed(paths, rebooting)
        if snapshot is not None:
            report(settings, dataclasses.replace(snapshot, deployed=rebooting), load_deploys(paths))
    note(paths, Event(plan.event, path=plan.system.path))
    log.info("%s", plan.saying)
    try:
        run(go, stream_stderr=True)
    except AutodeployError:
        if counted and record is not None:  # nothing went down: the one reboot is still to come
            save_deployed(paths, record)
            if snapshot is not None:
                report(settings, snapshot, load_deploys(paths))
        raise


def plan_after_deploy(settings: Settings, snapshot: Snapshot) -> Reboot:
    """The one reboot a finished deploy still needs, into the deployed system."""
    assert snapshot.deployed is not None and settings.reboot_mode is not None
    how = How(settings.reboot_mode.value)
    event = Kind.KEXEC if how is How.KEXEC else Kind.REBOOT
    return Reboot(how, snapshot.deployed.path, event)


def after_deploy(settings: Settings, snapshot: Snapshot) -> None:
    """The reboot a finished deploy needs. When it fails (`kexec --load` refused under
    Secure Boot lockdown), nothing went down: its slot goes back, and the failure is counted
    and blocks this reboot until upstream changes (it would fail the same way each run)."""
    plan = plan_after_deploy(settings, snapshot)
    try:
        reboot(settings, plan, snapshot)
    except AutodeployError as e:
        release(settings)
        message = f"{plan.saying} failed: {e}"
        assert snapshot.deployed is not None
        result = DeployResult(time.time(), plan.system, snapshot.deployed.mode, False, message)
        record_result(settings.paths, result, blocks_retry=True)
        observe(settings, snapshot.upstream, snapshot.duration_seconds, snapshot.collected_at)
        raise ActuatorError(message) from None
