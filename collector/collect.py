"""One collection: fetch upstream, realise it, read the links, classify, report."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable

from . import closure, http, metrics, nix, release, space, upstream
from .config import Settings
from .errors import AutodeployError, ConfigError, LockHeld, StateError
from .lock import locked
from .reboot import load_reboot_state
from .records import Deploys, load_deploys
from .rollout import load_rollout
from .snapshot import Snapshot, Upstream, load_snapshot, load_upstream, save_snapshot, save_upstream
from .state import (
    classify,
    dirty_reason,
    load_deployed,
    mirror_deployed,
    pinned,
    read_links,
    reboot_required,
)
from .store import StorePath, name_of

log = logging.getLogger(__name__)


def _refresh_upstream(
    settings: Settings,
    keys: tuple[release.Key, ...],
    known: Upstream | None,
    now: float,
    session: http.Session | None,
) -> Upstream:
    """Fetch (conditionally), judge the answer, and make sure its system is realised and
    pinned; only then is the fetch record updated, so a failure or a refused release
    leaves everything as it was."""
    assert settings.url is not None
    paths = settings.paths
    url_sha256 = upstream.digest(settings.url)  # validators belong to this exact URL
    trust = release.trust_digest(settings, keys)
    validators = None
    if (
        known is not None
        and known.path is not None
        and known.url_sha256 == url_sha256
        and known.trust_sha256 == trust  # other keys or host name: judge the answer anew
        and known.validated_sha256 is not None
        and (known.etag or known.last_modified)
    ):
        validators = upstream.Validators(known.etag, known.last_modified, known.validated_sha256)
    fetched = upstream.fetch(settings, validators, session)
    accepted = known.release if known else None
    floor_reset_at = known.floor_reset_at if known else None
    if fetched.body is None:  # 304: the answer judged before still holds
        assert known is not None and known.path is not None
        path = known.path
    elif not keys and not release.looks_like_envelope(fetched.body):
        path, accepted = upstream.parse_body(fetched.body, fetched.shown_url), None
    else:
        path, accepted, floor_reset_at = _accept(settings, fetched.body, keys, known, now)
    bundle = upstream.bundle_dir(settings.url)
    if not pinned(paths, path):
        # Only here, when upstream is not pinned yet: a no-change poll runs no Nix for it.
        space.check_store(paths, path, settings.min_free_store)
        log.info("realising upstream %s", path)
        nix.realise(path, paths.upstream, None if bundle is None else f"file://{bundle}/cache")
    changed = known is None or known.path != path
    if changed:
        log.info("upstream is now %s", path)
    record = Upstream(
        url=http.shown(settings.url),
        path=path,
        etag=fetched.etag,
        last_modified=fetched.last_modified,
        fetched_at=now,
        changed_at=known.changed_at if known is not None and not changed else now,
        url_sha256=url_sha256,
        validated_sha256=fetched.url,
        release=accepted,
        trust_sha256=trust,
        floor_reset_at=floor_reset_at,
    )
    # On the no-change path only fetched_at moved; the snapshot carries that.
    if known is None or dataclasses.replace(known, fetched_at=now, error=None) != record:
        save_upstream(paths, record)
    return record


def _accept(
    settings: Settings,
    body: bytes,
    keys: tuple[release.Key, ...],
    known: Upstream | None,
    now: float,
) -> tuple[StorePath, release.Release, float | None]:
    """The release in body, judged against the floor, and the floor raised to it (stored
    before anything acts on it); release.Rejected names the rule it breaks."""
    paths = settings.paths
    floor = release.load_floor(paths)
    host = release.host_name(settings)
    accepted, path = release.judge(body, keys, settings.signatures_required, host, floor, now)
    # A missing floor on a host that ran the agent before: the state dir was wiped.
    ran_before = known is not None or os.path.lexists(paths.upstream)
    stored = release.raise_floor(paths, accepted, floor, now, ran_before)
    if floor is None and stored.reset_at is not None:
        log.warning(
            "warning: the release serial floor was reset (no %s in %s although this host "
            "ran before); accepting serial %d",
            release.FLOOR_FILE,
            paths.state_dir,
            accepted.serial,
        )
    if accepted.expired(now + 86400):
        log.warning("warning: release serial %d expires within a day", accepted.serial)
    return path, accepted, stored.reset_at


def _known_upstream(settings: Settings) -> Upstream | None:
    try:
        return load_upstream(settings.paths)
    except StateError as e:
        # Only a cache of the last fetch: start over rather than stop collecting.
        log.warning("warning: %s; fetching afresh", e)
        return None


def _last_fetched_at(settings: Settings, known: Upstream) -> float | None:
    """When upstream was last fetched well: upstream.json is rewritten only when upstream
    changes, the snapshot after every fetch."""
    try:
        previous = load_snapshot(settings.paths)
    except StateError:
        previous = None
    times = [known.fetched_at, previous.upstream.fetched_at if previous else None]
    return max((t for t in times if t is not None), default=None)


def assess(
    settings: Settings,
    upstream_record: Upstream,
    duration: float,
    deploys: Deploys,
    collected_at: float | None = None,
) -> Snapshot:
    """The live facts, classified; writes nothing. collected_at: when the collect these
    facts refresh ran (default now): the actuator's refresh is not a collect, and the
    stale-collector alert must still see a dead collector timer."""
    paths = settings.paths
    links = read_links(paths)
    if links.upstream is None:
        # /run is empty after a reboot: until the next fetch pins it again, the last
        # known upstream still says where the host stands.
        links = dataclasses.replace(links, upstream=upstream_record.path)
    deployed = load_deployed(paths)
    state = classify(links, deployed, deploys.failed)
    return Snapshot(
        collected_at=time.time() if collected_at is None else collected_at,
        duration_seconds=duration,
        upstream=upstream_record,
        links=links,
        deployed=deployed,
        state=state,
        reboot_required=reboot_required(links, state, dirty_reason(links, deployed, state)),
        last_deploy=deploys.last,
        last_health=deploys.health,
        last_rollback=deploys.last_rollback,
        reboot=load_reboot_state(paths),
        rollout=load_rollout(paths),
    )


def report(settings: Settings, snapshot: Snapshot, deploys: Deploys) -> None:
    """Write what operators see: the snapshot, the metrics, the /run mirror, a log line."""
    paths = settings.paths
    mirror_deployed(paths, snapshot.deployed)
    save_snapshot(paths, snapshot)
    # Nix runs only when current, upstream or deployed moved since diff.json was written.
    changes = closure.refresh(
        paths,
        snapshot.state,
        snapshot.links.current,
        snapshot.links.upstream,
        snapshot.deployed.path if snapshot.deployed else None,
    )
    if settings.prometheus_path:
        room = space.measure(paths)
        metrics.write(settings.prometheus_path, snapshot, deploys, changes, room)
    log.info("state %s", summary(snapshot))


def summary(snapshot: Snapshot) -> str:
    """Where the host stands, in one line (the log, systemd's STATUS=)."""
    return "{}{}; current {}, upstream {}".format(
        snapshot.state.value,
        ", reboot required" if snapshot.reboot_required else "",
        name_of(snapshot.links.current, "unknown"),
        name_of(snapshot.links.upstream, "unknown"),
    )


def observe(
    settings: Settings,
    upstream_record: Upstream,
    duration: float,
    collected_at: float | None = None,
) -> Snapshot:
    """Assess and report. The actuator calls this after acting, so what operators see never
    lags behind what was done; it passes on the time and duration of the collect it acted
    on."""
    deploys = load_deploys(settings.paths)
    snapshot = assess(settings, upstream_record, duration, deploys, collected_at)
    report(settings, snapshot, deploys)
    return snapshot


# What the dispatcher may add to a collect, under its lock: `collect --track` accepts a
# hand deploy of upstream as deployed (actuator/records.py: the collector writes no
# actuator state itself).
Then = Callable[[Settings, Snapshot], Snapshot]


def collect(
    settings: Settings, session: http.Session | None = None, then: Then | None = None
) -> Snapshot:
    """Fetch and realise upstream, then observe. A fetch or realise failure is kept in the
    snapshot (upstream.error) and the metrics; the last known upstream stays. The resident
    collector passes its kept-alive HTTP session."""
    if not settings.url:
        raise ConfigError("no upstream URL: give --url or set url in the config file")
    keys = release.trusted_keys(settings)  # a bad key is a bad configuration: nothing written
    started = time.monotonic()
    known = _known_upstream(settings)
    try:
        record = _refresh_upstream(settings, keys, known, time.time(), session)
    except (AutodeployError, OSError) as e:
        last = known or Upstream(url=http.shown(settings.url))
        record = dataclasses.replace(
            last,
            fetched_at=_last_fetched_at(settings, last),
            error=str(e),
            rejected=e.reason.value if isinstance(e, release.Rejected) else None,
        )
    snapshot = observe(settings, record, time.monotonic() - started)
    return snapshot if then is None else then(settings, snapshot)


def collect_locked(
    settings: Settings, session: http.Session | None = None, then: Then | None = None
) -> Snapshot | None:
    """collect() under the shared lock, held only for this one collect; None (and a log
    line) when another run holds it: that run reports the same host."""
    try:
        with locked(settings.paths.state_dir):
            return collect(settings, session, then)
    except LockHeld as e:
        log.info("%s; not collecting this time", e)
        return None
