"""Whether the fleet's health holds this host's rollout back (rollout.json): written by the
actuator when it asks the halt query (actuator/halt.py), exported by the collector."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .config import Paths
from .errors import StateError
from .fsutil import read_json

log = logging.getLogger(__name__)

VERSION = 1
FILE = "rollout.json"


@dataclass(frozen=True)
class Rollout:
    halted: bool
    reason: str  # why halted, or what the query said when it let the deploy go
    checked_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "halted": self.halted,
            "reason": self.reason,
            "checked_at": self.checked_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> Rollout:
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError("not a version 1 object")
        if not isinstance(data["halted"], bool):
            raise ValueError("halted is not a boolean")
        return cls(data["halted"], str(data["reason"]), float(data["checked_at"]))


def load_rollout(paths: Paths) -> Rollout | None:
    """None when never asked; corrupt, it is forgotten with a warning: the next deploy asks
    the halt query again before it deploys anything."""
    source = paths.state(FILE)
    try:
        data = read_json(source)
        return None if data is None else Rollout.from_json(data)
    except (StateError, KeyError, TypeError, ValueError) as e:
        log.warning("warning: rollout state %s is corrupt (%s); forgetting it", source, e)
        return None
