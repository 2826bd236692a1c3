"""The actuator's history (history.jsonl): one event a line, what it decided and did. The
kinds and their one shape are here, for every reader (`log`, `status`); the one writer is
actuator/records.py."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

FILE = "history.jsonl"


class Kind(StrEnum):
    DECISION = "decision"  # action, reason, state
    DEPLOY = "deploy"  # path, mode, result, message, id
    HEALTH = "health"  # path, ok, summary
    ROLLED_BACK = "rolled-back"  # path, to
    ROLLBACK_FAILED = "rollback-failed"  # message
    INTERRUPTED_DEPLOY = "interrupted-deploy"  # path, phase
    COMPLETED_INTERRUPTED_DEPLOY = "completed-interrupted-deploy"  # path
    HAND_DEPLOY = "hand-deploy"  # path (the open deploy abandoned), to (what runs)
    REBOOT = "reboot"  # path
    KEXEC = "kexec"  # path
    TRIAL_KEXEC = "trial-kexec"  # path
    TRIAL_ONESHOT = "trial-oneshot"  # path
    TRIAL_REBOOT = "trial-reboot"  # path
    TRIAL_CONFIRMED = "trial-confirmed"  # path
    ROLLBACK_REBOOT = "rollback-reboot"  # path
    REBOOT_WAIT = "reboot-wait"  # reason, message
    FLEET_LOCK = "fleet-lock"  # group, id
    FLEET_UNLOCK = "fleet-unlock"  # group, id
    GENERATIONS_REMOVED = "generations-removed"  # message (which), reason

    @property
    def reboots(self) -> bool:
        return self in REBOOTS


REBOOTS = frozenset(
    {Kind.REBOOT, Kind.KEXEC, Kind.TRIAL_KEXEC, Kind.TRIAL_ONESHOT, Kind.TRIAL_REBOOT}
    | {Kind.ROLLBACK_REBOOT}
)
Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class Event:
    """One line of the history. The fields a kind does not use stay None and are not
    written; fields this version does not know (a newer version wrote them) are kept in
    `other` and shown as they are."""

    kind: Kind | str  # str: a kind this version does not know
    at: float = field(default_factory=time.time)
    path: str | None = None  # the system it is about
    to: str | None = None
    action: str | None = None
    state: str | None = None
    reason: str | None = None
    mode: str | None = None
    result: str | None = None  # success | failure
    ok: bool | None = None
    summary: str | None = None
    message: str | None = None
    phase: str | None = None
    group: str | None = None
    id: str | None = None
    other: Mapping[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.result == "failure" or self.ok is False or self.kind is Kind.ROLLBACK_FAILED

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(self.other)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("kind", "other") and value is not None:
                data[f.name] = value
        return {**data, "event": str(self.kind)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Event | None:
        """None when data is not an event (no kind, no time, a field of the wrong type)."""
        kind, at = data.get("event"), data.get("at")
        if not isinstance(kind, str) or not isinstance(at, int | float) or isinstance(at, bool):
            return None
        known = {f.name for f in fields(cls)} - {"kind", "at", "other"}
        values: dict[str, Any] = {}
        other: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("event", "at"):
                continue
            if key not in known:
                other[key] = value
            elif key == "ok":
                if not isinstance(value, bool | None):
                    return None
                values[key] = value
            elif value is not None:
                if isinstance(value, dict | list):
                    return None
                values[key] = str(value)
        try:
            event_kind: Kind | str = Kind(kind)
        except ValueError:
            event_kind = kind
        return cls(kind=event_kind, at=float(at), other=other, **values)


def read(path: str) -> tuple[list[Event], list[int]]:
    """The events, oldest first, and the numbers of the lines that are not one (a line cut
    short by a crash, or written by something else): those are skipped."""
    events: list[Event] = []
    skipped: list[int] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = list(f)
    except FileNotFoundError:
        return [], []
    for number, line in enumerate(lines, 1):
        try:
            data = json.loads(line)
        except ValueError:
            data = None
        event = Event.from_json(data) if isinstance(data, dict) else None
        if event is not None:
            events.append(event)
        elif line.strip():
            skipped.append(number)
    return events, skipped


def _basename(value: object) -> str:
    text = str(value)
    return text.rsplit("/", 1)[-1] if text.startswith("/") else text


def describe(e: Event) -> str:
    """What happened, in words; an event this version does not know, field by field."""
    path = _basename(e.path or "")
    match e.kind:
        case Kind.DECISION if e.action is not None:
            return f"{e.action}: {e.reason or ''}"
        case Kind.DEPLOY if e.result is not None:
            text = f"{e.result} ({e.mode or '?'}) {path}"
            return text + (f": {e.message}" if e.message else "")
        case Kind.ROLLED_BACK if e.path is not None:
            return f"{path}, back to {_basename(e.to)}"
        case Kind.HEALTH if e.ok is not None:
            return f"{'passed' if e.ok else 'failed'} on {path}: {e.summary or ''}"
        case Kind.GENERATIONS_REMOVED if e.message is not None:
            return f"{e.message}: {e.reason or ''}"
        case Kind.COMPLETED_INTERRUPTED_DEPLOY | Kind.TRIAL_CONFIRMED if e.path is not None:
            return path
        case kind if isinstance(kind, Kind) and kind.reboots and e.path is not None:
            return path
    rest = {k: v for k, v in e.to_json().items() if k not in ("at", "event")}
    return " ".join(f"{k}={_basename(v)}" for k, v in sorted(rest.items()))
