"""The halt: before deploying a new release, ask the fleet's Prometheus the operator's
query; any sample that is not zero holds this host back. An answer that cannot be had
holds it back too (fail closed): a fleet whose health cannot be seen is not rolled on."""

from __future__ import annotations

import time

from collector import prometheus
from collector.config import Settings
from collector.errors import AutodeployError
from collector.rollout import Rollout

SHOWN = 3  # firing samples named in the reason; the rest are counted


def check(settings: Settings, now: float | None = None) -> Rollout | None:
    """The halt query's verdict, or None when no query is set."""
    if not settings.halt_query:
        return None
    at = time.time() if now is None else now
    try:
        samples = prometheus.query(settings, settings.halt_query)
    except AutodeployError as e:
        return Rollout(True, f"the halt query could not be asked, failing closed: {e}", at)
    fired = prometheus.firing(samples)
    if not fired:
        return Rollout(False, f"the halt query returned {len(samples)} samples, none firing", at)
    named = ", ".join(_sample_text(s) for s in fired[:SHOWN])
    more = f" and {len(fired) - SHOWN} more" if len(fired) > SHOWN else ""
    return Rollout(True, f"the halt query fired: {named}{more}", at)


def _sample_text(sample: prometheus.Sample) -> str:
    labels = ",".join(f'{k}="{v}"' for k, v in sample.labels if k != "__name__")
    return f"{{{labels}}} {sample.value:g}"
