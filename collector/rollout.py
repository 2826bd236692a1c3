"""Phased rollouts: where this host stands in a release's wave, and whether the fleet's
health holds it back (rollout.json). The actuator decides and writes it (actuator/halt.py,
actuator/deploy.py); the collector exports it.

The wave: a release may carry `"rollout": {"start": unix, "duration": seconds}`; a host of
wariness w in [0, 1) takes it at start + w * duration. The default wariness is a hash of the
host's app-specific ID, so a host keeps its place across releases and the fleet spreads
evenly (Fedora CoreOS's Cincinnati ramps the same way)."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import Paths
from .errors import StateError
from .fsutil import read_json

log = logging.getLogger(__name__)

VERSION = 1
FILE = "rollout.json"
SALT = b"nixos-autodeploy-rollout:"


@dataclass(frozen=True)
class Ramp:
    """A release's wave: hosts take it from `start` over `duration` seconds."""

    start: float
    duration: float

    def turn_at(self, wariness: float) -> float:
        return self.start + wariness * self.duration


def wariness(host_id: str) -> float:
    """The first 8 bytes, big-endian, of SHA-256("nixos-autodeploy-rollout:" + host ID in
    hex), over 2^64: in [0, 1), stable for the host, uniform over a fleet."""
    digest = hashlib.sha256(SALT + host_id.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def ramp_of(fields: Mapping[str, Any]) -> Ramp | None:
    """The `rollout` of a release's extra top-level fields; None when it has none (deploy at
    once). ValueError, in words, when it is there but not two non-negative numbers."""
    value = fields.get("rollout")
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != {"start", "duration"}:
        raise ValueError('"rollout" must be {"start": unix seconds, "duration": seconds}')
    numbers = []
    for name in ("start", "duration"):
        number = value[name]
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ValueError(f'"rollout" "{name}" must be a number, got {number!r}')
        if not math.isfinite(number) or number < 0:
            raise ValueError(f'"rollout" "{name}" must be finite and not negative')
        numbers.append(float(number))
    return Ramp(*numbers)


@dataclass(frozen=True)
class Rollout:
    """The actuator's last verdict on a new release: its turn in the wave (when the release
    has one) and the halt query's word (when one is set)."""

    halted: bool
    reason: str  # why it waits or is halted, or what let the deploy go
    checked_at: float
    wariness: float | None = None  # None: no wave was asked about
    turn_at: float | None = None  # when this host's turn comes (or came)

    @property
    def waiting(self) -> bool:
        """Not this host's turn yet when it was asked."""
        return self.turn_at is not None and self.checked_at < self.turn_at

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "halted": self.halted,
            "reason": self.reason,
            "checked_at": self.checked_at,
            "wariness": self.wariness,
            "turn_at": self.turn_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> Rollout:
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError("not a version 1 object")
        if not isinstance(data["halted"], bool):
            raise ValueError("halted is not a boolean")
        wariness, turn_at = data.get("wariness"), data.get("turn_at")
        return cls(
            data["halted"],
            str(data["reason"]),
            float(data["checked_at"]),
            None if wariness is None else float(wariness),
            None if turn_at is None else float(turn_at),
        )


def load_rollout(paths: Paths) -> Rollout | None:
    """None when never asked; corrupt, it is forgotten with a warning: the next deploy asks
    the wave and the halt query again before it deploys anything."""
    source = paths.state(FILE)
    try:
        data = read_json(source)
        return None if data is None else Rollout.from_json(data)
    except (StateError, KeyError, TypeError, ValueError) as e:
        log.warning("warning: rollout state %s is corrupt (%s); forgetting it", source, e)
        return None
