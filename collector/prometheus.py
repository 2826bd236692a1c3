"""A small client of the Prometheus HTTP API: instant queries, through the one HTTP door.

Thanos, Mimir and VictoriaMetrics answer the same API, so the halt query and the fleet view
work against any of them. The answer is parsed strictly: anything but a vector or scalar
of samples, as the API documents them, is an UpstreamError, said in one line."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from . import http
from .config import Settings
from .errors import ConfigError, UpstreamError

MAX_ANSWER = 16 * 1024 * 1024  # a halt query's answer; the fleet view asks for more
WHAT = "Prometheus"


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector: its labels, and its value at the query's time."""

    labels: tuple[tuple[str, str], ...]  # sorted by name
    value: float
    timestamp: float

    def label(self, name: str) -> str | None:
        return dict(self.labels).get(name)


def _credentials(settings: Settings) -> http.Credentials:
    return http.Credentials(
        bearer_token_file=settings.prometheus_bearer_token_file,
        netrc_file=settings.prometheus_netrc_file,
    )


def query(
    settings: Settings, promql: str, at: float | None = None, limit: int = MAX_ANSWER
) -> tuple[Sample, ...]:
    """Run the instant query `promql` (at `at`, unix seconds; None: the server's now).
    A scalar answer is one sample without labels. UpstreamError when the server cannot
    be asked, refuses the query, or answers anything else than the API says."""
    if not settings.prometheus_url:
        raise ConfigError("no Prometheus to ask: give --prometheus-url")
    params = {"query": promql}
    if at is not None:
        params["time"] = f"{at:.3f}"
    url = settings.prometheus_url.rstrip("/") + "/api/v1/query?" + urlencode(params)
    # Prometheus's own CA when given; upstream's --ca-file (or the system's) otherwise.
    asked = dataclasses.replace(settings, ca_file=settings.prometheus_ca_file or settings.ca_file)
    answer = http.get(asked, url, _credentials(settings), limit=limit, what=WHAT)
    return parse(answer.body, http.shown(url))


def parse(body: bytes, where: str) -> tuple[Sample, ...]:
    """The samples of a /api/v1/query answer (a vector or a scalar), checked field by field."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise UpstreamError(f"{WHAT} {where}: the answer is not JSON: {e}") from None
    if not isinstance(document, dict):
        raise UpstreamError(f"{WHAT} {where}: the answer is not a JSON object")
    if document.get("status") != "success":
        error = str(document.get("error", "no reason given"))[:200]
        raise UpstreamError(f"{WHAT} {where}: the query failed: {error}")
    data = document.get("data")
    if not isinstance(data, dict):
        raise UpstreamError(f"{WHAT} {where}: the answer has no data object")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return (Sample((), *_value(result, where)),)
    if kind != "vector" or not isinstance(result, list):
        raise UpstreamError(f"{WHAT} {where}: expected a vector or a scalar, got {kind!r}")
    return tuple(_sample(element, where) for element in result)


def _sample(element: Any, where: str) -> Sample:
    if not isinstance(element, dict):
        raise UpstreamError(f"{WHAT} {where}: a sample is not an object")
    labels = element.get("metric")
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise UpstreamError(f"{WHAT} {where}: a sample's labels are not strings")
    value, timestamp = _value(element.get("value"), where)
    return Sample(tuple(sorted(labels.items())), value, timestamp)


def _value(pair: Any, where: str) -> tuple[float, float]:
    """The API's [timestamp, "value"] pair as (value, timestamp); the value's text may be
    NaN or ±Inf, as Prometheus writes them."""
    if (
        not isinstance(pair, list)
        or len(pair) != 2
        or isinstance(pair[0], bool)
        or not isinstance(pair[0], int | float)
        or not isinstance(pair[1], str)
    ):
        raise UpstreamError(f'{WHAT} {where}: a value is not a [time, "number"] pair')
    try:
        value = float(pair[1])
    except ValueError:
        raise UpstreamError(f"{WHAT} {where}: {pair[1][:40]!r} is not a number") from None
    return value, float(pair[0])


def firing(samples: tuple[Sample, ...]) -> tuple[Sample, ...]:
    """The samples that say stop: any value but zero (NaN too: it cannot say all is well)."""
    return tuple(s for s in samples if s.value != 0)  # NaN != 0 holds
