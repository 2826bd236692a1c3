"""The system links, the deployed record, and the pure classification of a host's state."""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .config import Paths
from .errors import StateError
from .fsutil import atomic_symlink, read_json
from .store import StorePath, path_of, resolve_link

# What a boot loader loads: when these differ the running system cannot simply switch.
BOOT_FILES = ("kernel", "initrd", "kernel-modules")


class Activation(StrEnum):
    """How a system was (or is to be) activated by switch-to-configuration."""

    SWITCH = "switch"
    BOOT = "boot"


class State(StrEnum):
    UP_TO_DATE = "up-to-date"
    UPDATE_AVAILABLE = "update-available"
    UNTRACKED = "untracked"
    DIRTY = "dirty"
    PENDING_REBOOT = "pending-reboot"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Deployed:
    """What this agent last deployed or accepted. Kept in the state dir so it survives a
    reboot (the original tool kept it in /run and turned dirty after every reboot).

    A deploy writes it twice: before the system changes (complete=False) and after; so a
    run killed at any step leaves a record the next run recognises."""

    path: StorePath
    mode: Activation
    previous: StorePath | None  # current when the record was made
    at: float
    reboot_issued_at: float | None = None
    complete: bool = True
    # The profile generation the agent left (None: not known, a record of an older
    # version): a profile on another generation was moved by someone else.
    generation: int | None = None

    @property
    def tracked(self) -> bool:
        """Made by accepting what ran (someone else deployed it), not by a deploy."""
        return self.previous == self.path

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "path": self.path.path,
            "mode": self.mode.value,
            "previous": path_of(self.previous),
            "at": self.at,
            "reboot_issued_at": self.reboot_issued_at,
            "complete": self.complete,
            "generation": self.generation,
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> Deployed:
        try:
            if data["version"] != 1:
                raise StateError(f"{source} has unknown version {data['version']!r}")
            reboot_issued_at = data.get("reboot_issued_at")
            generation = data.get("generation")
            return cls(
                path=StorePath.parse(data["path"]),
                mode=Activation(data["mode"]),
                previous=StorePath.parse(data["previous"]) if data["previous"] else None,
                at=float(data["at"]),
                reboot_issued_at=None if reboot_issued_at is None else float(reboot_issued_at),
                complete=bool(data.get("complete", True)),
                generation=None if generation is None else int(generation),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"{source} is corrupt: {e}") from None


DEPLOYED = "deployed.json"


def load_deployed(paths: Paths) -> Deployed | None:
    source = paths.state(DEPLOYED)
    try:
        data = read_json(source)
        return None if data is None else Deployed.from_json(data, source)
    except StateError as e:
        # Nothing can be decided without it; the operator knows what ran and can restart.
        raise StateError(f"{e}; remove it to let the agent start tracking afresh") from None


def mirror_deployed(paths: Paths, deployed: Deployed | None) -> None:
    """Keep /run/deployed-system (the original tool's record, read by existing scripts) in
    step with the record; /run starts empty after every boot."""
    mirrored = resolve_link(paths.deployed_link, paths.root)
    if deployed is None and mirrored is not None:
        os.unlink(paths.deployed_link)
    elif deployed is not None and mirrored != deployed.path:
        atomic_symlink(deployed.path.path, paths.deployed_link)


@dataclass(frozen=True)
class Links:
    current: StorePath | None
    booted: StorePath | None
    profile: StorePath | None
    upstream: StorePath | None  # the GC root: what was last realised
    profile_generation: int | None = None  # the generation the profile points at


def profile_generation(paths: Paths) -> int | None:
    """The number of the generation the system profile points at (system-N-link)."""
    try:
        link = os.path.basename(os.readlink(paths.profile))
    except OSError:
        return None
    name = re.escape(os.path.basename(paths.profile))
    match = re.fullmatch(name + r"-(\d+)-link", link)
    return int(match.group(1)) if match else None


def read_links(paths: Paths) -> Links:
    def at(link: str) -> StorePath | None:
        return resolve_link(link, paths.root)

    return Links(
        at(paths.current),
        at(paths.booted),
        at(paths.profile),
        at(paths.upstream),
        profile_generation(paths),
    )


class HandChange(StrEnum):
    """Why a host is dirty: what someone else did."""

    SWITCH = "hand-switch"  # the profile moved to what now runs (nixos-rebuild switch)
    BOOT = "hand-boot"  # the profile moved, the running system did not (nixos-rebuild boot)
    ROLLBACK = "hand-rollback"  # the profile went back to an older generation
    RUNNING = "hand-activation"  # another system runs, the profile unchanged (test, or no record)


def profile_moved(links: Links, deployed: Deployed | None) -> HandChange | None:
    """Whether someone else moved the system profile away from the generation the agent
    left it on: a hand deploy, whatever runs. The agent's own `nix-env --set` not yet
    recorded (a run killed right after it) names the record's system: not a change."""
    if deployed is None or deployed.generation is None or links.profile_generation is None:
        return None
    if links.profile_generation == deployed.generation or links.profile == deployed.path:
        return None
    if links.profile_generation < deployed.generation:
        return HandChange.ROLLBACK
    return HandChange.SWITCH if links.current == links.profile else HandChange.BOOT


def dirty_reason(links: Links, deployed: Deployed | None, state: State) -> HandChange | None:
    """Why state is dirty (None when it is not)."""
    if state is not State.DIRTY:
        return None
    moved = profile_moved(links, deployed)
    if moved is not None:
        return moved
    return HandChange.SWITCH if links.current == links.profile else HandChange.RUNNING


def pinned(paths: Paths, path: StorePath) -> bool:
    """Whether path is realised and held by the upstream GC root."""
    return resolve_link(paths.upstream, paths.root) == path and os.path.exists(path.path)


def classify(links: Links, deployed: Deployed | None, failed: Collection[StorePath] = ()) -> State:
    """The gate's table (DESIGN.md), plus pending-reboot, interrupted or failed deploys and
    unknown. failed: the systems that failed under the agent (deploys.json)."""
    current, upstream = links.current, links.upstream
    if upstream is None or current is None:
        return State.UNKNOWN
    # A profile someone else moved is a hand deploy, unless it is a hand deploy of
    # upstream itself, running: that is tracked (untracked below), as it always was.
    if profile_moved(links, deployed) is not None and not current == upstream == links.profile:
        return State.DIRTY
    if deployed is not None and current == deployed.path:
        return State.UP_TO_DATE if current == upstream else State.UPDATE_AVAILABLE
    if deployed is not None and current == deployed.previous:
        if not deployed.complete:
            # A deploy cut short before its switch took effect: the agent goes on with it
            # (or, should upstream be back on current, makes current the next boot again).
            return State.UPDATE_AVAILABLE
        waits = deployed.mode is Activation.BOOT or deployed.reboot_issued_at is not None
        if waits and links.profile == deployed.path:
            # A boot-mode deploy waits for its reboot, or the agent's reboot after a switch
            # came back on the old generation: the agent left it so, it is not dirty.
            # Should upstream have moved on meanwhile, the newer system goes first.
            return State.PENDING_REBOOT if upstream == deployed.path else State.UPDATE_AVAILABLE
    if deployed is not None and not deployed.complete and current == links.booted:
        # A deploy cut short, then a reboot: nothing was activated since the boot, what the
        # boot loader loaded runs (a hand `test` before the reboot is gone with it).
        return State.UPDATE_AVAILABLE
    if current == upstream and (links.profile in (current, None) or current in failed):
        # Not a hand `test` of upstream (the profile elsewhere: the next boot leaves it);
        # one left running by its own failed activation is, and the gate holds off.
        return State.UNTRACKED
    if current in failed:
        # Left running by an activation that failed under the agent: its doing, not a hand
        # deploy; a newer upstream replaces it.
        return State.UPDATE_AVAILABLE
    return State.DIRTY


def boot_differs(a: StorePath | None, b: StorePath | None) -> bool:
    """Whether two systems need different boots: their kernel, initrd or kernel modules are
    different store paths (NixOS links them; nixos-rebuild compares them the same way).
    Unknown systems are not reported as differing."""
    if a is None or b is None or a == b:
        return False
    return any(
        os.path.realpath(os.path.join(a.path, f)) != os.path.realpath(os.path.join(b.path, f))
        for f in BOOT_FILES
    )


def reboot_required(links: Links, state: State, reason: HandChange | None = None) -> bool:
    """A hand `boot` waits for its reboot as the agent's own boot-mode deploy does."""
    waits = state is State.PENDING_REBOOT or (
        reason in (HandChange.BOOT, HandChange.ROLLBACK) and links.profile != links.current
    )
    return waits or boot_differs(links.booted, links.current)
