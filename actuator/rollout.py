"""The rollout's word on deploying a new release now: the wave (is it this host's turn?) and
the halt (does the fleet's health, asked of Prometheus, hold it back?). An answer that cannot
be had holds the host back (fail closed): a fleet whose health cannot be seen is not rolled on.
Only a new deploy asks: finishing an interrupted one, a rollback or a reboot never do, and
an operator's `deploy --force` overrides both (deploy.py)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from collector import prometheus
from collector.config import Settings
from collector.errors import AutodeployError
from collector.rollout import Ramp, Rollout, ramp_of, wariness
from collector.snapshot import Snapshot

from . import fleetlock

SHOWN = 3  # firing samples named in the reason; the rest are counted


def release_fields(snapshot: Snapshot) -> Mapping[str, Any]:
    """The accepted release's extra top-level fields, where its `rollout` lives; none for a
    bare store path (no wave: every host's turn is now)."""
    accepted = snapshot.upstream.release
    return {} if accepted is None else accepted.extra


def asks(settings: Settings, release: Mapping[str, Any]) -> bool:
    """Whether a deploy of this release would ask the wave or the halt query."""
    return release.get("rollout") is not None or bool(settings.halt_query)


def verdict(
    settings: Settings, release: Mapping[str, Any], now: float | None = None
) -> Rollout | None:
    """What the wave of the release (its extra fields) and the halt query say about
    deploying it now; None when neither applies (no wave, no halt query)."""
    at = time.time() if now is None else now
    try:
        ramp = ramp_of(release)
    except ValueError as e:
        return Rollout(True, f"the release's rollout is malformed, not deploying: {e}", at)
    place = turn = None
    if ramp is not None:
        place, turn = _turn(settings, ramp)
        if at < turn:
            reason = f"waiting for this host's turn at {utc(turn)} (wariness {place:.2f})"
            return Rollout(False, reason, at, place, turn)
    if not settings.halt_query:
        if turn is None:
            return None
        return Rollout(False, f"this host's turn came at {utc(turn)}", at, place, turn)
    halted, reason = _halt(settings, settings.halt_query)
    return Rollout(halted, reason, at, place, turn)


def _turn(settings: Settings, ramp: Ramp) -> tuple[float, float]:
    place = settings.rollout_wariness
    if place is None:
        place = wariness(fleetlock.host_id(settings.paths))
    return place, ramp.turn_at(place)


def _halt(settings: Settings, query: str) -> tuple[bool, str]:
    try:
        samples = prometheus.query(settings, query)
    except AutodeployError as e:
        return True, f"the halt query could not be asked, failing closed: {e}"
    fired = prometheus.firing(samples)
    if not fired:
        return False, f"the halt query returned {len(samples)} samples, none firing"
    named = ", ".join(_sample_text(s) for s in fired[:SHOWN])
    more = f" and {len(fired) - SHOWN} more" if len(fired) > SHOWN else ""
    return True, f"the halt query fired: {named}{more}"


def _sample_text(sample: prometheus.Sample) -> str:
    labels = ",".join(f'{k}="{v}"' for k, v in sample.labels if k != "__name__")
    return f"{{{labels}}} {sample.value:g}"


def utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
