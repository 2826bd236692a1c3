"""The system links, the deployed record, and the pure classification of a host's state."""

from __future__ import annotations

import filecmp
import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .config import Paths
from .errors import StateError
from .fsutil import atomic_symlink, atomic_write_json, read_json
from .store import StorePath, resolve_link

# What a boot loader loads: when these differ the running system cannot simply switch.
BOOT_FILES = ("kernel", "initrd", "kernel-modules")


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
    reboot (the original tool kept it in /run and turned dirty after every reboot)."""

    path: StorePath
    mode: str  # "switch" or "boot"
    previous: StorePath | None  # current when the record was made
    at: float
    reboot_issued_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "path": self.path.path,
            "mode": self.mode,
            "previous": self.previous.path if self.previous else None,
            "at": self.at,
            "reboot_issued_at": self.reboot_issued_at,
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> Deployed:
        try:
            if data["version"] != 1:
                raise StateError(f"{source} has unknown version {data['version']!r}")
            if data["mode"] not in ("switch", "boot"):
                raise ValueError(f"mode {data['mode']!r}")
            return cls(
                path=StorePath.parse(data["path"]),
                mode=data["mode"],
                previous=StorePath.parse(data["previous"]) if data["previous"] else None,
                at=float(data["at"]),
                reboot_issued_at=(
                    float(data["reboot_issued_at"]) if data.get("reboot_issued_at") else None
                ),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"{source} is corrupt: {e}") from None


def load_deployed(paths: Paths) -> Deployed | None:
    source = paths.state("deployed.json")
    try:
        data = read_json(source)
        return None if data is None else Deployed.from_json(data, source)
    except StateError as e:
        # Nothing can be decided without it; the operator knows what ran and can restart.
        raise StateError(f"{e}; remove it to let the agent start tracking afresh") from None


def save_deployed(paths: Paths, deployed: Deployed) -> None:
    atomic_write_json(paths.state("deployed.json"), deployed.to_json())
    mirror_deployed(paths, deployed)


def mirror_deployed(paths: Paths, deployed: Deployed | None) -> None:
    """Keep /run/deployed-system (the original tool's record, read by existing scripts) in
    step with the record; /run starts empty after every boot."""
    if deployed is not None and resolve_link(paths.deployed_link, paths.root) != deployed.path:
        atomic_symlink(deployed.path.path, paths.deployed_link)


@dataclass(frozen=True)
class Links:
    current: StorePath | None
    booted: StorePath | None
    profile: StorePath | None
    upstream: StorePath | None  # the GC root: what was last realised


def read_links(paths: Paths) -> Links:
    def at(link: str) -> StorePath | None:
        return resolve_link(link, paths.root)

    return Links(at(paths.current), at(paths.booted), at(paths.profile), at(paths.upstream))


def classify(links: Links, deployed: Deployed | None) -> State:
    """The gate's table (DESIGN.md), plus pending-reboot and unknown."""
    current, upstream = links.current, links.upstream
    if upstream is None or current is None:
        return State.UNKNOWN
    if deployed is not None and current == deployed.path:
        return State.UP_TO_DATE if current == upstream else State.UPDATE_AVAILABLE
    if (
        deployed is not None
        and deployed.mode == "boot"
        and current == deployed.previous
        and links.profile == deployed.path
    ):
        # A boot-mode deploy waits for its reboot: the agent left it so, it is not dirty.
        return State.PENDING_REBOOT
    if current == upstream:
        return State.UNTRACKED
    return State.DIRTY


def _same(a: str, b: str) -> bool:
    real_a, real_b = os.path.realpath(a), os.path.realpath(b)
    if real_a == real_b:
        return True
    if os.path.isfile(real_a) and os.path.isfile(real_b):
        return filecmp.cmp(real_a, real_b, shallow=False)
    if os.path.isdir(real_a) and os.path.isdir(real_b):
        names = sorted(os.listdir(real_a))
        return names == sorted(os.listdir(real_b)) and all(
            _same(os.path.join(real_a, n), os.path.join(real_b, n)) for n in names
        )
    return False


def boot_differs(a: StorePath | None, b: StorePath | None) -> bool:
    """Whether two systems need different boots: kernel, initrd or kernel modules differ.
    Unknown systems are not reported as differing."""
    if a is None or b is None or a == b:
        return False
    return not all(_same(os.path.join(a.path, f), os.path.join(b.path, f)) for f in BOOT_FILES)


def reboot_required(links: Links, state: State) -> bool:
    return state is State.PENDING_REBOOT or boot_differs(links.booted, links.current)
