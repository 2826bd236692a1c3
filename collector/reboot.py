"""Why a required reboot waits, and whether this host holds a FleetLock reboot slot
(reboot.json): written by the actuator (actuator/records.py), exported by the collector."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .config import Paths
from .errors import StateError
from .fsutil import read_json

log = logging.getLogger(__name__)

VERSION = 1
FILE = "reboot.json"


class WaitReason(StrEnum):
    WINDOW = "window"  # outside every maintenance window
    FLEET_LOCK = "fleet-lock"  # no reboot slot from the FleetLock server
    OPERATOR = "operator"  # the agent will not reboot: no --reboot-mode, or it did once


@dataclass(frozen=True)
class Waiting:
    reason: WaitReason
    message: str
    since: float  # when this reboot started waiting (kept while it keeps waiting)


@dataclass(frozen=True)
class SlotHeld:
    """A reboot slot this host took from a FleetLock server and has not released yet."""

    url: str  # as shown: no credentials, no query
    group: str
    id: str
    at: float


@dataclass(frozen=True)
class RebootState:
    waiting: Waiting | None = None
    slot: SlotHeld | None = None

    def to_json(self) -> dict[str, Any]:
        w, s = self.waiting, self.slot
        return {
            "version": VERSION,
            "waiting": None
            if w is None
            else {"reason": w.reason.value, "message": w.message, "since": w.since},
            "slot": None if s is None else {"url": s.url, "group": s.group, "id": s.id, "at": s.at},
        }

    @classmethod
    def from_json(cls, data: Any) -> RebootState:
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError("not a version 1 object")
        w, s = data["waiting"], data["slot"]
        waiting = (
            None
            if w is None
            else Waiting(WaitReason(w["reason"]), str(w["message"]), float(w["since"]))
        )
        slot = (
            None
            if s is None
            else SlotHeld(str(s["url"]), str(s["group"]), str(s["id"]), float(s["at"]))
        )
        return cls(waiting, slot)


def load_reboot_state(paths: Paths) -> RebootState:
    """Corrupt, it is started afresh with a warning: it only reports (the FleetLock server
    holds the slot itself, and the actuator releases it whenever no reboot is pending)."""
    source = paths.state(FILE)
    try:
        data = read_json(source)
        return RebootState() if data is None else RebootState.from_json(data)
    except (StateError, KeyError, TypeError, ValueError) as e:
        log.warning("warning: reboot state %s is corrupt (%s); starting it afresh", source, e)
        return RebootState()


def pending_reason(reboot_required: bool, state: RebootState) -> WaitReason | None:
    """Why a required reboot has not happened: what the actuator last said, else the
    operator's to do (no actuator run has said otherwise since it became required)."""
    waiting = state.waiting
    if waiting is not None and waiting.reason is not WaitReason.OPERATOR:
        return waiting.reason  # also a deploy that waits before its trial boot
    if not reboot_required:
        return None
    return waiting.reason if waiting else WaitReason.OPERATOR
