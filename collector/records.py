"""What the actuator records and the collector exports: deploy results, health checks and
rollbacks (deploys.json), typed. Only read here: the writers are in actuator/records.py."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from .config import Paths
from .errors import StateError
from .fsutil import read_json
from .state import Activation
from .store import StorePath, path_of

VERSION = 1
FILE = "deploys.json"
FAILED_MAX = 32  # remembered failed systems; the oldest go first

log = logging.getLogger(__name__)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not an object")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} is not true or false")
    return value


@dataclass(frozen=True)
class DeployResult:
    """How one deploy ended. id: the deploy journal's (a result is counted once per id)."""

    at: float
    path: StorePath
    mode: Activation
    ok: bool
    message: str = ""
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "at": self.at,
            "path": self.path.path,
            "mode": self.mode.value,
            "result": "success" if self.ok else "failure",
            "message": self.message,
        }
        if self.id is not None:
            data["id"] = self.id
        return data

    @classmethod
    def from_json(cls, value: Any) -> DeployResult:
        data = _object(value, "last deploy")
        result = data.get("result")
        if result not in ("success", "failure"):
            raise ValueError("last deploy has no result")
        ident = data.get("id")
        return cls(
            at=float(data["at"]),
            path=StorePath.parse(data["path"]),
            mode=Activation(data["mode"]),
            ok=result == "success",
            message=_text(data["message"], "last deploy's message"),
            id=None if ident is None else _text(ident, "last deploy's id"),
        )


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    output: tuple[str, ...]  # its last lines

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "output": list(self.output)}

    @classmethod
    def from_json(cls, value: Any) -> CheckResult:
        data = _object(value, "a check")
        output = data.get("output", [])
        if not isinstance(output, list):
            raise ValueError("a check's output is not a list")
        return cls(
            _text(data["name"], "a check's name"),
            _flag(data["ok"], "a check's result"),
            tuple(_text(line, "a check's output") for line in output),
        )


@dataclass(frozen=True)
class HealthResult:
    """One run of the health checks (actuator/health.py): the last round's results, and
    its summary as it was said then."""

    checks: tuple[CheckResult, ...]
    attempts: int
    at: float  # when the last round ended (unix time)
    summary: str
    path: StorePath | None = None  # the system checked

    @classmethod
    def of(cls, checks: tuple[CheckResult, ...], attempts: int, at: float) -> HealthResult:
        """One line: "all 3 checks passed", "1 check passed", or "check 'X' failed: its last
        line; ..."."""
        failed = [c for c in checks if not c.ok]
        summary = "; ".join(
            f"check '{c.name}' failed: {c.output[-1] if c.output else 'no output'}" for c in failed
        )
        passed = f"all {len(checks)} checks passed" if len(checks) > 1 else "1 check passed"
        if not checks:
            passed = "no checks to run"
        return cls(checks, attempts, at, summary or passed)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if not c.ok)

    def to_json(self) -> dict[str, Any]:
        data = {
            "at": self.at,
            "ok": self.ok,
            "attempts": self.attempts,
            "summary": self.summary,
            "checks": [c.to_json() for c in self.checks],
        }
        return data if self.path is None else {**data, "path": self.path.path}

    @classmethod
    def from_json(cls, value: Any) -> HealthResult:
        data = _object(value, "last health check")
        checks = data["checks"]
        if not isinstance(checks, list):
            raise ValueError("last health check has no checks")
        path = data.get("path")
        return cls(
            checks=tuple(CheckResult.from_json(c) for c in checks),
            attempts=int(data.get("attempts", 1)),
            at=float(data["at"]),
            summary=_text(data["summary"], "last health check's summary"),
            path=None if path is None else StorePath.parse(path),
        )


@dataclass(frozen=True)
class Rollback:
    """The last rollback from a system that itself failed. ok: false while going back
    failed (the next run tries again)."""

    id: str | None
    at: float
    source: StorePath  # what was rolled back from
    target: StorePath | None  # what the next boot loads again
    ok: bool
    reason: str
    serial: int | None = None  # of the release that named `source` (None: a bare path)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "at": self.at,
            "from": self.source.path,
            "to": path_of(self.target),
            "ok": self.ok,
            "reason": self.reason,
        }
        if self.serial is not None:
            data["serial"] = self.serial
        return data if self.id is None else {"id": self.id, **data}

    @classmethod
    def from_json(cls, value: Any) -> Rollback:
        data = _object(value, "last rollback")
        ident, target = data.get("id"), data.get("to")
        return cls(
            id=None if ident is None else _text(ident, "last rollback's id"),
            at=float(data["at"]),
            source=StorePath.parse(data["from"]),
            target=None if target is None else StorePath.parse(target),
            ok=_flag(data["ok"], "last rollback's result"),
            reason=_text(data["reason"], "last rollback's reason"),
            serial=None if data.get("serial") is None else int(data["serial"]),
        )


@dataclass(frozen=True)
class Deploys:
    """The actuator's results (deploys.json), exported by the collector."""

    last: DeployResult | None = None
    totals: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})
    # Systems that failed under the agent (activation, not a NixOS system), by when. Kept
    # per path, so a failure of something else (Nix, the disk) never erases one.
    failed: dict[StorePath, float] = field(default_factory=dict)
    health: HealthResult | None = None  # the last health checks
    rollbacks: int = 0
    last_rollback: Rollback | None = None

    def blocks(self, path: StorePath, upstream_changed_at: float | None) -> bool:
        """Whether path failed since upstream last changed: not retried until it changes
        again (b -> a -> b is a change: someone re-published b, so it is tried again)."""
        at = self.failed.get(path)
        return at is not None and (upstream_changed_at is None or at >= upstream_changed_at)

    def with_result(self, last: DeployResult, failed: StorePath | None) -> Deploys:
        """These results plus one more deploy: a success forgets that its system failed
        before; a failure of the system itself (failed) is remembered."""
        totals = dict(self.totals)
        result = "success" if last.ok else "failure"
        totals[result] = totals.get(result, 0) + 1
        remembered = {p: at for p, at in self.failed.items() if not (last.ok and p == last.path)}
        if failed is not None:
            remembered[failed] = last.at
        newest = sorted(remembered.items(), key=lambda item: item[1])[-FAILED_MAX:]
        return dataclasses.replace(self, last=last, totals=totals, failed=dict(newest))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "last": self.last.to_json() if self.last else None,
            "totals": self.totals,
            "failed": {p.path: at for p, at in self.failed.items()},
            "health": self.health.to_json() if self.health else None,
            "rollbacks": self.rollbacks,
            "last_rollback": self.last_rollback.to_json() if self.last_rollback else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Deploys:
        last = None if data["last"] is None else DeployResult.from_json(data["last"])
        health, rollback = data.get("health"), data.get("last_rollback")
        failed = {StorePath.parse(p): float(at) for p, at in data.get("failed", {}).items()}
        legacy = data.get("failed_path")  # before per-path memory: one slot
        if legacy is not None and StorePath.parse(legacy) not in failed:
            failed[StorePath.parse(legacy)] = last.at if last and last.path.path == legacy else 0.0
        return cls(
            last=last,
            totals={str(k): int(v) for k, v in data["totals"].items()},
            failed=failed,
            health=None if health is None else HealthResult.from_json(health),
            rollbacks=int(data.get("rollbacks", 0)),
            last_rollback=None if rollback is None else Rollback.from_json(rollback),
        )


def load_deploys(paths: Paths) -> Deploys:
    """The actuator's results. Corrupt, they are started afresh with a warning: they feed
    the metrics, which must keep coming, and decide nothing but a retry."""
    source = paths.state(FILE)
    try:
        data = read_json(source)
        if data is None:
            return Deploys()
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise StateError(f"unknown version {_object(data, 'it').get('version')!r}")
        return Deploys.from_json(data)
    except (StateError, KeyError, TypeError, ValueError, AttributeError) as e:
        log.warning("warning: deploy results %s are corrupt (%s); starting them afresh", source, e)
        return Deploys()
