"""One collection: fetch upstream, realise it, read the links, classify, report."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from . import metrics, nix, upstream
from .config import Settings
from .errors import AutodeployError, ConfigError, StateError
from .snapshot import (
    Snapshot,
    Upstream,
    load_deploys,
    load_upstream,
    save_snapshot,
    save_upstream,
)
from .state import classify, load_deployed, mirror_deployed, read_links, reboot_required

log = logging.getLogger(__name__)


def _refresh_upstream(settings: Settings, known: Upstream | None, now: float) -> Upstream:
    """Fetch (conditionally) and make sure the result is realised and pinned; only then is
    the fetch record updated, so a failure leaves everything as it was."""
    assert settings.url is not None
    paths = settings.paths
    validators = None
    if known is not None and known.path is not None and known.url is not None:
        validators = upstream.Validators(known.url, known.etag, known.last_modified)
    fetched = upstream.fetch(settings, validators)
    path = fetched.path or (known.path if known else None)
    assert path is not None  # a 304 is only accepted when validators were sent
    pinned = os.path.realpath(paths.upstream) == path.path and os.path.exists(path.path)
    if not pinned:
        log.info("realising upstream %s", path)
        nix.realise(path, paths.upstream)
    changed = known is None or known.path != path
    if changed:
        log.info("upstream is now %s", path)
    record = Upstream(
        url=upstream.shown(settings.url),
        path=path,
        etag=fetched.etag,
        last_modified=fetched.last_modified,
        fetched_at=now,
        changed_at=known.changed_at if known is not None and not changed else now,
    )
    save_upstream(paths, record)
    return record


def _known_upstream(settings: Settings) -> Upstream | None:
    try:
        return load_upstream(settings.paths)
    except StateError as e:
        # Only a cache of the last fetch: start over rather than stop collecting.
        log.warning("warning: %s; fetching afresh", e)
        return None


def observe(settings: Settings, upstream_record: Upstream, duration: float) -> Snapshot:
    """Read the local facts, classify, write snapshot and metrics. The actuator calls this
    after acting, so what operators see never lags behind what was done; it passes on the
    duration of the collect it acted on."""
    now = time.time()
    paths = settings.paths
    links = read_links(paths)
    deployed = load_deployed(paths)
    mirror_deployed(paths, deployed)
    state = classify(links, deployed)
    deploys = load_deploys(paths)
    snapshot = Snapshot(
        collected_at=now,
        duration_seconds=duration,
        upstream=upstream_record,
        links=links,
        deployed=deployed,
        state=state,
        reboot_required=reboot_required(links, state),
        last_deploy=deploys.last,
    )
    save_snapshot(paths, snapshot)
    if settings.prometheus_path:
        metrics.write(settings.prometheus_path, snapshot, deploys)
    log.info(
        "state %s%s; current %s, upstream %s",
        state.value,
        ", reboot required" if snapshot.reboot_required else "",
        links.current.name if links.current else "unknown",
        links.upstream.name if links.upstream else "unknown",
    )
    return snapshot


def collect(settings: Settings) -> Snapshot:
    """Fetch and realise upstream, then observe. A fetch or realise failure is kept in the
    snapshot (upstream.error) and the metrics; the last known upstream stays."""
    if not settings.url:
        raise ConfigError("no upstream URL: give --url or set url in the config file")
    started = time.monotonic()
    known = _known_upstream(settings)
    try:
        record = _refresh_upstream(settings, known, time.time())
    except (AutodeployError, OSError) as e:
        record = dataclasses.replace(
            known or Upstream(url=upstream.shown(settings.url)), error=str(e)
        )
    return observe(settings, record, time.monotonic() - started)
