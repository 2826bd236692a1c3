"""The gate: a pure decision from the snapshot, the recorded results and the settings."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from collector.config import RebootMode, SwitchMode
from collector.records import Deploys
from collector.release import utc
from collector.snapshot import Snapshot
from collector.state import Activation, State, boot_differs, profile_moved
from collector.store import StorePath, name_of


class Action(StrEnum):
    NOTHING = "nothing"
    TRACK = "track"  # record current as deployed
    DEPLOY = "deploy"
    REBOOT = "reboot"  # only the reboot a finished deploy still waits for


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    activation: Activation | None = None  # for DEPLOY


def activation_for(mode: SwitchMode, current: StorePath | None, upstream: StorePath) -> Activation:
    """smart boots when the kernel, initrd or modules change, and switches otherwise."""
    if mode is SwitchMode.SMART:
        return Activation.BOOT if boot_differs(current, upstream) else Activation.SWITCH
    return Activation(mode.value)


def leaves_reboot_required(
    activation: Activation, booted: StorePath | None, system: StorePath
) -> bool:
    """Whether deploying system this way leaves a reboot required: a boot waits, or the
    running kernel is no longer the booted one."""
    return activation is Activation.BOOT or boot_differs(booted, system)


def may_reboot(snapshot: Snapshot, reboot_mode: RebootMode | None) -> bool:
    """Only for a reboot the agent's own deploy needs (a hand deploy it merely tracks is
    its owner's to reboot), and at most once per deploy: a machine that comes back still
    waiting is reported, never rebooted again (a reboot loop is worse than a late update)."""
    deployed = snapshot.deployed
    return (
        reboot_mode is not None
        and snapshot.reboot_required
        and deployed is not None
        and not deployed.tracked
        and deployed.reboot_issued_at is None
    )


# A reboot whose preparation failed (reboot.after_deploy) is not tried again.
_REBOOT_FAILED = (
    "the agent's reboot into it failed; not retried until upstream changes, the operator "
    "reboots (--force overrides)"
)


def decide(
    snapshot: Snapshot,
    deploys: Deploys,
    mode: SwitchMode,
    force: bool,
    reboot: RebootMode | None,
    now: float | None = None,
) -> Decision:
    """now: the time an accepted release's expiry is judged at (default: when the snapshot
    was collected)."""
    links, upstream = snapshot.links, snapshot.links.upstream
    # A refused release leaves the last accepted one in force: that one may be deployed.
    if snapshot.upstream.error and snapshot.upstream.rejected is None:
        return Decision(
            Action.NOTHING, f"the last upstream fetch failed: {snapshot.upstream.error}"
        )
    if upstream is None or links.current is None:
        return Decision(Action.NOTHING, "upstream or the current system is not known yet")
    state = snapshot.state
    failed = deploys.blocks(upstream, snapshot.upstream.changed_at) and not force
    if state is State.DIRTY and not force:
        deployed = name_of(snapshot.deployed.path if snapshot.deployed else None, "unknown")
        current, profile = name_of(links.current, "unknown"), name_of(links.profile, "unknown")
        if profile_moved(links, snapshot.deployed) is None:
            what = (
                f"current {current} is neither the deployed {deployed} nor upstream {upstream.name}"
            )
        else:  # what runs may still be the deployed system (a hand `boot`)
            what = (
                f"the profile moved to {profile} (current {current}, deployed {deployed}, "
                f"upstream {upstream.name})"
            )
        return Decision(
            Action.NOTHING,
            f"dirty: {what}; someone deployed by hand ({snapshot.dirty_reason}), leaving it "
            "alone (--force overrides)",
        )
    if state is State.UNTRACKED:
        if failed:
            # Its activation failed half way (NixOS switches the links before it starts
            # units) and going back did not finish: running, but not to be adopted.
            return Decision(
                Action.NOTHING,
                f"current {upstream.name} failed to activate; not tracking it until upstream "
                "changes (--force overrides)",
            )
        if upstream not in deploys.failed:
            return Decision(Action.TRACK, f"current is upstream {upstream.name}: tracking it")
        # A failed system still running, forced or re-published: deployed properly (profile,
        # activation), never merely recorded, or the next boot loads something else.
    if state is State.PENDING_REBOOT:
        waiting = f"pending reboot into {name_of(links.profile, 'unknown')}"
        if failed and may_reboot(snapshot, reboot):
            return Decision(Action.NOTHING, f"{waiting}: {_REBOOT_FAILED}")
        if may_reboot(snapshot, reboot):
            return Decision(Action.REBOOT, waiting)
        if reboot is None:
            return Decision(Action.NOTHING, f"{waiting}; no --reboot-mode, the operator reboots")
        return Decision(
            Action.NOTHING,
            f"{waiting}: rebooted once already and came back on {links.current.name}; "
            "not rebooting again",
        )
    if state is State.UP_TO_DATE:
        if failed and may_reboot(snapshot, reboot):
            return Decision(
                Action.NOTHING, f"up to date, but the booted kernel differs: {_REBOOT_FAILED}"
            )
        if may_reboot(snapshot, reboot):
            return Decision(Action.REBOOT, "up to date, but the booted kernel differs")
        return Decision(Action.NOTHING, f"up to date with {upstream.name}")
    if failed:
        return Decision(
            Action.NOTHING,
            f"{upstream.name} failed before (its activation, health checks or trial boot); "
            "not retried until upstream changes (--force overrides)",
        )
    accepted = snapshot.upstream.release
    if accepted is not None and accepted.expired(snapshot.collected_at if now is None else now):
        # A frozen answer must not deploy late what its publisher meant for then.
        return Decision(
            Action.NOTHING,
            f"release serial {accepted.serial} expired at {utc(accepted.expires)}: not "
            f"deploying {upstream.name} until a newer release is published",
        )
    activation = activation_for(mode, links.current, upstream)
    why = "dirty, deploying anyway because of --force" if state is State.DIRTY else state.value
    return Decision(
        Action.DEPLOY, f"{why}: deploying {upstream.name} ({activation.value})", activation
    )
