"""The collector's findings: upstream fetch record, deploy results and the snapshot file."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from .config import Paths
from .errors import StateError
from .fsutil import atomic_write_json, read_json
from .reboot import RebootState
from .state import Deployed, Links, State
from .store import StorePath, path_of

VERSION = 1

log = logging.getLogger(__name__)


def _path(value: Any) -> StorePath | None:
    return None if value is None else StorePath.parse(value)


def _last_deploy(value: Any) -> dict[str, Any] | None:
    """The actuator's last result, checked: status and metrics read its fields."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("result") not in ("success", "failure"):
        raise ValueError("last deploy has no result")
    StorePath.parse(value["path"])
    float(value["at"])
    if not isinstance(value.get("mode"), str) or not isinstance(value.get("message"), str):
        raise ValueError("last deploy has no mode or message")
    return value


def _last_health(value: Any) -> dict[str, Any] | None:
    """The last health checks' result, as actuator/health.py records it."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("ok"), bool):
        raise ValueError("last health check has no result")
    float(value["at"])
    if not isinstance(value.get("summary"), str) or not isinstance(value.get("checks"), list):
        raise ValueError("last health check has no summary or checks")
    return value


def _last_rollback(value: Any) -> dict[str, Any] | None:
    """The last rollback: from, to (store paths), at, ok, reason."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("ok"), bool):
        raise ValueError("last rollback has no result")
    StorePath.parse(value["from"])
    float(value["at"])
    if not isinstance(value.get("reason"), str):
        raise ValueError("last rollback has no reason")
    return value


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
        )


FAILED_MAX = 32  # remembered failed systems; the oldest go first


@dataclass(frozen=True)
class Deploys:
    """The actuator's results (deploys.json), exported by the collector."""

    last: dict[str, Any] | None = None  # id, at, path, mode, result, message
    totals: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})
    # Systems that failed under the agent (activation, not a NixOS system), by when. Kept
    # per path, so a failure of something else (Nix, the disk) never erases one.
    failed: dict[StorePath, float] = field(default_factory=dict)
    health: dict[str, Any] | None = None  # the last health checks (at, ok, summary, checks)
    rollbacks: int = 0
    last_rollback: dict[str, Any] | None = None  # at, from, to, ok, reason

    def blocks(self, path: StorePath, upstream_changed_at: float | None) -> bool:
        """Whether path failed since upstream last changed: not retried until it changes
        again (b -> a -> b is a change: someone re-published b, so it is tried again)."""
        at = self.failed.get(path)
        return at is not None and (upstream_changed_at is None or at >= upstream_changed_at)

    def with_result(self, last: dict[str, Any], failed: StorePath | None) -> Deploys:
        """These results plus one more deploy: a success forgets that its system failed
        before; a failure of the system itself (failed) is remembered."""
        totals = dict(self.totals)
        totals[last["result"]] = totals.get(last["result"], 0) + 1
        succeeded = last["result"] == "success"
        remembered = {
            p: at for p, at in self.failed.items() if not (succeeded and p.path == last["path"])
        }
        if failed is not None:
            remembered[failed] = last["at"]
        newest = sorted(remembered.items(), key=lambda item: item[1])[-FAILED_MAX:]
        return dataclasses.replace(self, last=last, totals=totals, failed=dict(newest))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "last": self.last,
            "totals": self.totals,
            "failed": {p.path: at for p, at in self.failed.items()},
            "health": self.health,
            "rollbacks": self.rollbacks,
            "last_rollback": self.last_rollback,
        }


@dataclass(frozen=True)
class Snapshot:
    collected_at: float
    duration_seconds: float
    upstream: Upstream
    links: Links
    deployed: Deployed | None
    state: State
    reboot_required: bool
    last_deploy: dict[str, Any] | None = None
    last_health: dict[str, Any] | None = None
    last_rollback: dict[str, Any] | None = None
    # Why a required reboot waits; the FleetLock slot.
    reboot: RebootState = field(default_factory=RebootState)

    @property
    def dirty(self) -> bool:
        return self.state is State.DIRTY

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "collected_at": self.collected_at,
            "duration_seconds": self.duration_seconds,
            "upstream": self.upstream.to_json(),
            "current": path_of(self.links.current),
            "booted": path_of(self.links.booted),
            "profile": path_of(self.links.profile),
            "upstream_link": path_of(self.links.upstream),
            "deployed": self.deployed.to_json() if self.deployed else None,
            "state": self.state.value,
            "dirty": self.dirty,
            "reboot_required": self.reboot_required,
            "last_deploy": self.last_deploy,
            "last_health": self.last_health,
            "last_rollback": self.last_rollback,
            "reboot": self.reboot.to_json(),
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


def load_deploys(paths: Paths) -> Deploys:
    """The actuator's results. Corrupt, they are started afresh with a warning: they feed
    the metrics, which must keep coming, and decide nothing but a retry."""
    source = paths.state("deploys.json")
    try:
        data = _load(source, "deploy results")
        if data is None:
            return Deploys()
        totals = {k: int(v) for k, v in data["totals"].items()}
        last = _last_deploy(data["last"])
        failed = {StorePath.parse(p): float(at) for p, at in data.get("failed", {}).items()}
        legacy = _path(data.get("failed_path"))  # before per-path memory: one slot
        if legacy is not None and legacy not in failed:
            failed[legacy] = float(last["at"]) if last and last["path"] == legacy.path else 0.0
        return Deploys(
            last=last,
            totals=totals,
            failed=failed,
            health=_last_health(data.get("health")),
            rollbacks=int(data.get("rollbacks", 0)),
            last_rollback=_last_rollback(data.get("last_rollback")),
        )
    except (StateError, KeyError, TypeError, ValueError, AttributeError) as e:
        log.warning("warning: deploy results %s are corrupt (%s); starting them afresh", source, e)
        return Deploys()


def save_deploys(paths: Paths, deploys: Deploys) -> None:
    atomic_write_json(paths.state("deploys.json"), deploys.to_json())


def save_snapshot(paths: Paths, snapshot: Snapshot) -> None:
    atomic_write_json(paths.state("snapshot.json"), snapshot.to_json())


def load_snapshot(paths: Paths) -> Snapshot | None:
    source = paths.state("snapshot.json")
    data = _load(source, "snapshot")
    if data is None:
        return None
    try:
        deployed = data["deployed"]
        return Snapshot(
            collected_at=float(data["collected_at"]),
            duration_seconds=float(data["duration_seconds"]),
            upstream=Upstream.from_json(data["upstream"]),
            links=Links(
                current=_path(data["current"]),
                booted=_path(data["booted"]),
                profile=_path(data["profile"]),
                upstream=_path(data["upstream_link"]),
            ),
            deployed=None if deployed is None else Deployed.from_json(deployed, source),
            state=State(data["state"]),
            reboot_required=bool(data["reboot_required"]),
            last_deploy=_last_deploy(data.get("last_deploy")),
            last_health=_last_health(data.get("last_health")),
            last_rollback=_last_rollback(data.get("last_rollback")),
            reboot=RebootState.from_json(data["reboot"]) if data.get("reboot") else RebootState(),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StateError(f"snapshot {source} is corrupt: {e}") from None
