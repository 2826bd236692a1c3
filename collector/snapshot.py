"""The collector's findings: the upstream fetch record (upstream.json) and the snapshot."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .config import Paths
from .errors import StateError
from .fsutil import atomic_write_json, read_json
from .reboot import RebootState
from .records import DeployResult, HealthResult, Rollback
from .release import Release
from .rollout import Rollout
from .state import Deployed, HandChange, Links, State, dirty_reason
from .store import StorePath, path_of

VERSION = 1

log = logging.getLogger(__name__)


def _path(value: Any) -> StorePath | None:
    return None if value is None else StorePath.parse(value)


@dataclass(frozen=True)
class Upstream:
    """What the last successful fetch said (upstream.json), plus the last error."""

    url: str | None = None
    path: StorePath | None = None
    etag: str | None = None
    last_modified: str | None = None
    fetched_at: float | None = None
    changed_at: float | None = None
    error: str | None = None
    # sha256 of the exact URL asked for (query and all: url is shown without them) and of
    # the one that answered the validators, after redirects.
    url_sha256: str | None = None
    validated_sha256: str | None = None
    # The signed (or, without trusted keys, unverified) release that named `path`; None
    # for a bare store path. rejected: why the last answer was refused (release.Reason);
    # the release and path stay those last accepted.
    release: Release | None = None
    rejected: str | None = None
    # What the answer was judged by (release.trust_digest): other keys re-judge it.
    trust_sha256: str | None = None
    # When the serial floor started over on a host that had run before (a wiped state dir).
    floor_reset_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "path": path_of(self.path),
            "etag": self.etag,
            "last_modified": self.last_modified,
            "fetched_at": self.fetched_at,
            "changed_at": self.changed_at,
            "error": self.error,
            "url_sha256": self.url_sha256,
            "validated_sha256": self.validated_sha256,
            "release": self.release.to_json() if self.release else None,
            "rejected": self.rejected,
            "trust_sha256": self.trust_sha256,
            "floor_reset_at": self.floor_reset_at,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Upstream:
        return cls(
            url=d["url"],
            path=_path(d["path"]),
            etag=d["etag"],
            last_modified=d.get("last_modified"),
            fetched_at=d["fetched_at"],
            changed_at=d["changed_at"],
            error=d.get("error"),
            url_sha256=d.get("url_sha256"),
            validated_sha256=d.get("validated_sha256"),
            release=Release.from_json(d["release"]) if d.get("release") else None,
            rejected=d.get("rejected"),
            trust_sha256=d.get("trust_sha256"),
            floor_reset_at=d.get("floor_reset_at"),
        )


@dataclass(frozen=True)
class Snapshot:
    collected_at: float
    duration_seconds: float
    upstream: Upstream
    links: Links
    deployed: Deployed | None
    state: State
    reboot_required: bool
    last_deploy: DeployResult | None = None
    last_health: HealthResult | None = None
    last_rollback: Rollback | None = None
    # Why a required reboot waits; the FleetLock slot.
    reboot: RebootState = field(default_factory=RebootState)
    rollout: Rollout | None = None  # the halt query's last verdict

    @property
    def dirty(self) -> bool:
        return self.state is State.DIRTY

    @property
    def dirty_reason(self) -> HandChange | None:
        return dirty_reason(self.links, self.deployed, self.state)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "collected_at": self.collected_at,
            "duration_seconds": self.duration_seconds,
            "upstream": self.upstream.to_json(),
            "current": path_of(self.links.current),
            "booted": path_of(self.links.booted),
            "profile": path_of(self.links.profile),
            "profile_generation": self.links.profile_generation,
            "upstream_link": path_of(self.links.upstream),
            "deployed": self.deployed.to_json() if self.deployed else None,
            "state": self.state.value,
            "dirty": self.dirty,
            "dirty_reason": None if self.dirty_reason is None else self.dirty_reason.value,
            "reboot_required": self.reboot_required,
            "last_deploy": self.last_deploy.to_json() if self.last_deploy else None,
            "last_health": self.last_health.to_json() if self.last_health else None,
            "last_rollback": self.last_rollback.to_json() if self.last_rollback else None,
            "reboot": self.reboot.to_json(),
            "rollout": self.rollout.to_json() if self.rollout else None,
        }


def _load(path: str, what: str) -> dict[str, Any] | None:
    data = read_json(path)
    if data is None:
        return None
    if not isinstance(data, dict):
        raise StateError(f"{what} {path} is corrupt: not a JSON object")
    if data.get("version") != VERSION:
        raise StateError(f"{what} {path} has unknown version {data.get('version')!r}")
    return data


def load_upstream(paths: Paths) -> Upstream | None:
    source = paths.state("upstream.json")
    data = _load(source, "upstream record")
    try:
        return None if data is None else Upstream.from_json(data)
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"upstream record {source} is corrupt: {e}") from None


def save_upstream(paths: Paths, upstream: Upstream) -> None:
    atomic_write_json(paths.state("upstream.json"), {"version": VERSION, **upstream.to_json()})


def save_snapshot(paths: Paths, snapshot: Snapshot) -> None:
    atomic_write_json(paths.state("snapshot.json"), snapshot.to_json())


def load_snapshot(paths: Paths) -> Snapshot | None:
    source = paths.state("snapshot.json")
    data = _load(source, "snapshot")
    if data is None:
        return None
    try:
        deployed = data["deployed"]
        last, health = data.get("last_deploy"), data.get("last_health")
        rollback = data.get("last_rollback")
        return Snapshot(
            collected_at=float(data["collected_at"]),
            duration_seconds=float(data["duration_seconds"]),
            upstream=Upstream.from_json(data["upstream"]),
            links=Links(
                current=_path(data["current"]),
                booted=_path(data["booted"]),
                profile=_path(data["profile"]),
                upstream=_path(data["upstream_link"]),
                profile_generation=data.get("profile_generation"),
            ),
            deployed=None if deployed is None else Deployed.from_json(deployed, source),
            state=State(data["state"]),
            reboot_required=bool(data["reboot_required"]),
            last_deploy=DeployResult.from_json(last) if last else None,
            last_health=HealthResult.from_json(health) if health else None,
            last_rollback=Rollback.from_json(rollback) if rollback else None,
            reboot=RebootState.from_json(data["reboot"]) if data.get("reboot") else RebootState(),
            rollout=Rollout.from_json(data["rollout"]) if data.get("rollout") else None,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StateError(f"snapshot {source} is corrupt: {e}") from None
