"""The gate: a pure decision from the snapshot, the recorded results and the settings."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from collector.config import RebootMode, SwitchMode
from collector.snapshot import Deploys, Snapshot
from collector.state import State, boot_differs
from collector.store import StorePath


class Action(StrEnum):
    NOTHING = "nothing"
    TRACK = "track"  # record current as deployed
    DEPLOY = "deploy"
    REBOOT = "reboot"  # only the reboot a finished deploy still waits for


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    activation: str | None = None  # "switch" or "boot", for DEPLOY


def _name(path: StorePath | None) -> str:
    return path.name if path else "unknown"


def activation_for(mode: SwitchMode, current: StorePath | None, upstream: StorePath) -> str:
    """smart boots when the kernel, initrd or modules change, and switches otherwise."""
    if mode is SwitchMode.SMART:
        return "boot" if boot_differs(current, upstream) else "switch"
    return mode.value


def may_reboot(snapshot: Snapshot, reboot_mode: RebootMode | None) -> bool:
    """At most one reboot per deploy: a machine that comes back still waiting is reported,
    never rebooted again (a reboot loop is worse than a late update)."""
    deployed = snapshot.deployed
    return (
        reboot_mode is not None
        and snapshot.reboot_required
        and deployed is not None
        and deployed.reboot_issued_at is None
    )


def decide(
    snapshot: Snapshot, deploys: Deploys, mode: SwitchMode, force: bool, reboot: RebootMode | None
) -> Decision:
    links, upstream = snapshot.links, snapshot.links.upstream
    if snapshot.upstream.error:
        return Decision(
            Action.NOTHING, f"the last upstream fetch failed: {snapshot.upstream.error}"
        )
    if upstream is None or links.current is None:
        return Decision(Action.NOTHING, "upstream or the current system is not known yet")
    state = snapshot.state
    if state is State.DIRTY and not force:
        deployed = snapshot.deployed.path if snapshot.deployed else None
        return Decision(
            Action.NOTHING,
            f"dirty: current {_name(links.current)} is neither the deployed "
            f"{_name(deployed)} nor upstream {_name(upstream)}; someone deployed by hand, "
            "leaving it alone (--force overrides)",
        )
    if state is State.UNTRACKED:
        return Decision(Action.TRACK, f"current is upstream {upstream.name}: tracking it")
    if state is State.PENDING_REBOOT:
        waiting = f"pending reboot into {_name(links.profile)}"
        if may_reboot(snapshot, reboot):
            return Decision(Action.REBOOT, waiting)
        if reboot is None:
            return Decision(Action.NOTHING, f"{waiting}; no --reboot-mode, the operator reboots")
        return Decision(
            Action.NOTHING,
            f"{waiting}: rebooted once already and came back on {_name(links.current)}; "
            "not rebooting again",
        )
    if state is State.UP_TO_DATE:
        if may_reboot(snapshot, reboot):
            return Decision(Action.REBOOT, "up to date, but the booted kernel differs")
        return Decision(Action.NOTHING, f"up to date with {upstream.name}")
    if deploys.failed_path == upstream and not force:
        return Decision(
            Action.NOTHING,
            f"{upstream.name} failed to activate before; not retried until upstream changes "
            "(--force overrides)",
        )
    activation = activation_for(mode, links.current, upstream)
    why = "dirty, deploying anyway because of --force" if state is State.DIRTY else state.value
    return Decision(Action.DEPLOY, f"{why}: deploying {upstream.name} ({activation})", activation)
