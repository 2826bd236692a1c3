"""The writers of the actuator's state: the deployed record, the deploy results, the reboot
state and the history. The collector reads them (collector/state.py, records.py,
reboot.py, history.py) and never writes them; the journal has its own module
(transaction.py) and the profile its own (profile.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable

from collector import history
from collector.collect import observe
from collector.config import Paths, Settings
from collector.errors import StateError
from collector.fsutil import atomic_write, atomic_write_json, read_json
from collector.history import Event, Kind
from collector.reboot import FILE as REBOOT_FILE
from collector.reboot import RebootState
from collector.records import FILE as DEPLOYS_FILE
from collector.records import DeployResult, Deploys, HealthResult, Rollback, load_deploys
from collector.rollout import FILE as ROLLOUT_FILE
from collector.rollout import Rollout
from collector.snapshot import Snapshot
from collector.state import (
    DEPLOYED,
    Activation,
    Deployed,
    State,
    mirror_deployed,
    read_links,
)
from collector.store import StorePath

log = logging.getLogger(__name__)

HISTORY_MAX = 1 << 20


def save_deployed(paths: Paths, deployed: Deployed) -> None:
    atomic_write_json(paths.state(DEPLOYED), deployed.to_json())
    mirror_deployed(paths, deployed)


def forget_deployed(paths: Paths) -> None:
    """No record at all (a failed deploy on a host that had none before)."""
    for path in (paths.state(DEPLOYED), paths.deployed_link):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def track(paths: Paths, current: StorePath, generation: int | None) -> None:
    """Accept what runs as deployed (it is upstream; someone else deployed it). generation:
    the profile generation from which on a moved profile is a hand deploy (None: none is)."""
    now = time.time()
    save_deployed(paths, Deployed(current, Activation.SWITCH, current, now, generation=generation))


def track_profile(paths: Paths, current: StorePath) -> None:
    """The actuator's tracking: the profile's generation when it names current, so that
    someone moving it later is seen (a profile elsewhere was never the agent's)."""
    links = read_links(paths)
    track(paths, current, links.profile_generation if links.profile == current else None)


def adopt_untracked(settings: Settings, snapshot: Snapshot) -> Snapshot:
    """`collect --track`, on a host without the actuator: someone deploys by hand what CI
    published; accept it, so that a later publish reads as update-available, not dirty."""
    current = snapshot.links.current
    if snapshot.state is not State.UNTRACKED or current is None:
        return snapshot
    # No generation: here every deploy is by hand, and the next one of upstream is
    # tracked in its turn, not dirty.
    track(settings.paths, current, None)
    log.info("tracking %s", current.name)
    return observe(settings, snapshot.upstream, snapshot.duration_seconds, snapshot.collected_at)


def save_deploys(paths: Paths, deploys: Deploys) -> None:
    atomic_write_json(paths.state(DEPLOYS_FILE), deploys.to_json())


def record_result(paths: Paths, result: DeployResult, *, blocks_retry: bool = False) -> None:
    """blocks_retry: the system itself failed (its activation, or it is no NixOS system),
    so it is not tried again until upstream changes; a passing failure (Nix, the disk) is.
    A result already recorded for result.id (the journal's) is not counted again."""
    deploys = load_deploys(paths)
    if result.id is not None and deploys.last is not None and deploys.last.id == result.id:
        return
    save_deploys(paths, deploys.with_result(result, result.path if blocks_retry else None))
    note(
        paths,
        Event(
            Kind.DEPLOY,
            at=result.at,
            path=result.path.path,
            mode=result.mode.value,
            result="success" if result.ok else "failure",
            message=result.message,
            id=result.id,
        ),
    )


GENERATIONS_FILE = "generations.json"


def our_generations(paths: Paths) -> tuple[int, ...]:
    """The system profile generations the agent made, the ones it may prune (a hand
    deploy's are not here). Unreadable: none, so nothing is pruned that may not be ours."""
    try:
        data = read_json(paths.state(GENERATIONS_FILE))
        return () if data is None else tuple(sorted(int(n) for n in data["ours"]))
    except (StateError, KeyError, TypeError, ValueError) as e:
        log.warning(
            "warning: %s is unreadable (%s); no generation counts as the agent's",
            GENERATIONS_FILE,
            e,
        )
        return ()


def record_generations(paths: Paths, made: int | None = None, removed: Iterable[int] = ()) -> None:
    """Which profile generations are the agent's: one it made, those it removed. Its own
    file: deploys.json holds results, and setting the profile is none yet."""
    known = our_generations(paths)
    gone = set(removed)
    kept = [n for n in known if n not in gone and n != made]
    ours = tuple(sorted(kept if made is None else [*kept, made]))
    if ours != known:
        atomic_write_json(paths.state(GENERATIONS_FILE), {"version": 1, "ours": list(ours)})


def record_health(paths: Paths, result: HealthResult) -> None:
    deploys = load_deploys(paths)
    save_deploys(paths, dataclasses.replace(deploys, health=result))
    path = result.path.path if result.path else None
    note(paths, Event(Kind.HEALTH, path=path, ok=result.ok, summary=result.summary))


def record_rollback(paths: Paths, rollback: Rollback) -> None:
    """Counted once per deploy (rollback.id): a retried rollback updates the last one."""
    deploys = load_deploys(paths)
    earlier = deploys.last_rollback
    again = earlier is not None and earlier.id == rollback.id
    count = deploys.rollbacks + (0 if again else 1)
    save_deploys(paths, dataclasses.replace(deploys, rollbacks=count, last_rollback=rollback))


def save_reboot_state(paths: Paths, state: RebootState) -> None:
    atomic_write_json(paths.state(REBOOT_FILE), state.to_json())


def save_rollout(paths: Paths, rollout: Rollout | None) -> None:
    """The rollout's last verdict; None: no new deploy is in question, nothing to show."""
    if rollout is not None:
        atomic_write_json(paths.state(ROLLOUT_FILE), rollout.to_json())
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.state(ROLLOUT_FILE))


def note(paths: Paths, event: Event) -> None:
    """One JSON line per decision and action; past 1 MiB the older half is dropped."""
    path = paths.state(history.FILE)
    line = json.dumps(event.to_json(), sort_keys=True) + "\n"
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        size = 0
    if size + len(line) > HISTORY_MAX:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
        atomic_write(path, "".join(lines[len(lines) // 2 :]) + line)
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
