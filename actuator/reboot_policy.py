"""When a reboot may happen: inside a maintenance window, with a FleetLock reboot slot;
and when that slot goes back. What it decides is kept in reboot.json (collector/reboot.py)
for status and metrics, and said in the history."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from collector.collect import report
from collector.config import Settings
from collector.http import shown
from collector.reboot import RebootState, SlotHeld, Waiting, WaitReason, save_reboot_state
from collector.snapshot import Snapshot, load_deploys

from . import fleetlock, window
from .gate import Action, Decision, may_reboot

log = logging.getLogger(__name__)

Note = Callable[[dict[str, Any]], None]  # appends one history entry


def check(settings: Settings) -> None:
    """Refuse bad reboot settings before anything changes."""
    window.parse_all(settings.reboot_windows)
    if settings.fleet_lock_url:
        fleetlock.host_id(settings.paths)


def boot_confirmed(snapshot: Snapshot) -> bool:
    """The new boot is confirmed, so its reboot slot can go back: the host came back on the
    deployed system. A trial boot's health checks have passed by then (or it was rolled
    back): deploy's recover() finishes a trial before settle() runs."""
    deployed = snapshot.deployed
    return deployed is not None and snapshot.links.current == deployed.path


def _release_due(snapshot: Snapshot, decision: Decision) -> bool:
    """No reboot is pending, and the host is not in a new boot that awaits confirmation.
    (A reboot that did not take is not retried: its slot goes back too.)"""
    if decision.action is Action.REBOOT:
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


def settle(settings: Settings, snapshot: Snapshot, decision: Decision, note: Note) -> None:
    """At the start of every run: give a reboot slot back when no reboot is pending (the
    protocol's unlock is idempotent: this also frees a slot taken just before a crash), and
    say when a required reboot is the operator's to do."""
    state = snapshot.reboot
    if settings.fleet_lock_url and _release_due(snapshot, decision):
        state = _release(settings, state, note)
    elif settings.fleet_lock_url is None and state.slot is not None:
        log.warning(
            "warning: no fleet lock URL any more; the slot taken at %s stays with the server",
            state.slot.url,
        )
        state = dataclasses.replace(state, slot=None)
    waiting = state.waiting
    if not snapshot.reboot_required or decision.action is Action.DEPLOY:
        waiting = None
    elif decision.action is not Action.REBOOT and not may_reboot(snapshot, settings.reboot_mode):
        reason = _operator_reason(settings, snapshot)
        operator = WaitReason.OPERATOR
        waiting = Waiting(operator, reason, _waiting_since(state, operator))
    # Otherwise a reboot the agent will do keeps what it waited for (a REBOOT decision
    # checks again, a failed fetch leaves it as it was).
    if dataclasses.replace(state, waiting=waiting) != snapshot.reboot:
        save_reboot_state(settings.paths, dataclasses.replace(state, waiting=waiting))


def _release(settings: Settings, state: RebootState, note: Note) -> RebootState:
    ident = fleetlock.host_id(settings.paths)
    try:
        fleetlock.unlock(settings, ident)
    except fleetlock.FleetLockError as e:
        if state.slot is not None:
            log.warning("warning: could not release the reboot slot: %s; next run retries", e)
        else:
            log.info("fleet lock: releasing any slot failed: %s", e)
        return state
    if state.slot is not None:
        log.info("released the reboot slot in group %s", state.slot.group)
        note({"event": "fleet-unlock", "group": state.slot.group, "id": ident})
    return dataclasses.replace(state, slot=None)


def clear_to_reboot(
    settings: Settings, snapshot: Snapshot, note: Note, at: datetime | None = None
) -> Snapshot | None:
    """Just before a reboot or kexec: inside a window (when any are set), then a slot from
    the FleetLock server (when one is set). The snapshot to reboot with, or None: then the
    host stays pending, says why in one line, status and metrics, and the next run retries."""
    at = at or window.now()
    state = snapshot.reboot
    windows = window.parse_all(settings.reboot_windows)
    if windows and window.open_window(windows, at) is None:
        specs = " or ".join(w.spec for w in windows)
        opens = window.next_opening(windows, at)
        later = f" (next opens {opens:%a %H:%M})" if opens else ""
        message = f"reboot waits for window {specs}{later}"
        if settings.fleet_lock_url:  # a slot is taken only inside a window: this one is stale
            state = _release(settings, state, note)
        _wait(
            settings, dataclasses.replace(snapshot, reboot=state), WaitReason.WINDOW, message, note
        )
        return None
    if settings.fleet_lock_url:
        ident = fleetlock.host_id(settings.paths)
        try:
            fleetlock.lock(settings, ident)
        except fleetlock.FleetLockError as e:
            message = f"reboot slot refused by fleet lock: {e}"
            _wait(settings, snapshot, WaitReason.FLEET_LOCK, message, note)
            return None
        group = settings.fleet_lock_group
        if state.slot is None:
            note({"event": "fleet-lock", "group": group, "id": ident})
        log.info("took a reboot slot in fleet lock group %s", group)
        slot = SlotHeld(shown(settings.fleet_lock_url), group, ident, time.time())
        state = dataclasses.replace(state, slot=state.slot or slot)
    state = dataclasses.replace(state, waiting=None)
    save_reboot_state(settings.paths, state)
    return dataclasses.replace(snapshot, reboot=state)


def _wait(
    settings: Settings, snapshot: Snapshot, reason: WaitReason, message: str, note: Note
) -> None:
    log.info("%s", message)
    state = snapshot.reboot
    waiting = Waiting(reason, message, _waiting_since(state, reason))
    state = dataclasses.replace(state, waiting=waiting)
    save_reboot_state(settings.paths, state)
    note({"event": "reboot-wait", "reason": reason.value, "message": message})
    report(settings, dataclasses.replace(snapshot, reboot=state), load_deploys(settings.paths))
