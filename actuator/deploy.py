"""`nixos-autodeploy deploy`: recover, decide, act, report. What each step does is elsewhere:
the journal and its transitions in transaction.py, the decision in gate.py, reboots in
reboot.py, the records in records.py."""

from __future__ import annotations

import logging
import shlex
import time

from collector import space
from collector.collect import assess, collect, observe
from collector.config import Paths, Settings
from collector.errors import ActuatorError, AutodeployError, SpaceError, StateError
from collector.history import Event, Kind
from collector.lock import locked
from collector.process import run
from collector.records import Deploys, load_deploys
from collector.snapshot import Snapshot, load_snapshot
from collector.state import read_links
from collector.upstream import digest

from . import commands, profile, reboot, records, rollout, transaction, trial
from .gate import Action, Decision, decide, leaves_reboot_required, may_reboot

log = logging.getLogger(__name__)

LOCK_WAIT = 600.0  # a collect (fetch + realise) is bounded by its own deadline
ACTIVATION_WAIT = 3600.0  # a slow activation; far longer means something hangs


def deploy(settings: Settings) -> int:
    paths = settings.paths
    reboot.check(settings)
    with locked(paths.state_dir, wait=LOCK_WAIT):
        cut_short = None
        if settings.dry_run:
            _say_interrupted(paths)
        else:
            _wait_for_running_activation(paths)
            try:
                cut_short = transaction.recover(settings)
            except AutodeployError:
                _show_what_was_done(settings)
                raise
        deploys = load_deploys(paths)
        snapshot = _current_snapshot(settings, deploys)
        decision = decide(
            snapshot,
            deploys,
            settings.switch_mode,
            settings.force,
            settings.reboot_mode,
            time.time(),
        )
        if not settings.force:
            decision = transaction.untried(paths, decision, snapshot)
        if decision.action is Action.DEPLOY and cut_short is None and settings.force:
            decision = _forced(settings, snapshot, decision)
        elif decision.action is Action.DEPLOY and cut_short is None:
            decision = _held_back(settings, snapshot, decision)  # an interrupted one goes on
        elif not settings.dry_run:
            records.save_rollout(settings.paths, None)  # no new deploy is in question
        if settings.dry_run:
            _dry_run(settings, snapshot, decision)
            return 0
        log.info("%s: %s", decision.action.value, decision.reason)
        records.note(
            paths,
            Event(
                Kind.DECISION,
                action=decision.action.value,
                reason=decision.reason,
                state=snapshot.state.value,
            ),
        )
        if decision.action is Action.NOTHING and space.refused(snapshot.upstream.error):
            # The collect this deploy ran refused the realise: a refused deploy, not a no-op.
            raise SpaceError(str(snapshot.upstream.error))
        reboot.settle(settings, snapshot, decision.action)
        try:
            if cut_short is not None and decision.action is not Action.DEPLOY:
                transaction.undo(settings, cut_short)  # not deployed anew: what ran comes back
            if decision.action is Action.TRACK:
                assert snapshot.links.current is not None
                records.track_profile(paths, snapshot.links.current)
            elif decision.action is Action.DEPLOY:
                assert decision.activation is not None
                try:
                    transaction.start(settings, snapshot, decision.activation, cut_short)
                except AutodeployError:
                    reboot.release(settings)  # a trial's slot, taken for a boot that failed
                    raise
        finally:
            # Whatever happened, what operators see must not lag behind what was done.
            snapshot = observe(
                settings, snapshot.upstream, snapshot.duration_seconds, snapshot.collected_at
            )
        if decision.action is Action.REBOOT or (
            decision.action is Action.DEPLOY and may_reboot(snapshot, settings.reboot_mode)
        ):
            cleared = reboot.clear_to_reboot(settings, snapshot)
            if cleared is not None:
                reboot.after_deploy(settings, cleared)
    return 0


def _held_back(settings: Settings, snapshot: Snapshot, decision: Decision) -> Decision:
    """The deploy of a new release, or nothing while it is not this host's turn in the
    release's wave or the fleet's health halts it."""
    verdict = rollout.verdict(settings, rollout.release_fields(snapshot))
    if not settings.dry_run:
        records.save_rollout(settings.paths, verdict)
    if verdict is not None and verdict.halted:
        return Decision(Action.NOTHING, f"rollout halted: {verdict.reason}")
    if verdict is not None and verdict.waiting:
        return Decision(Action.NOTHING, f"rollout: {verdict.reason}")
    return decision


def _forced(settings: Settings, snapshot: Snapshot, decision: Decision) -> Decision:
    """An operator's deploy --force overrides the rollout too: neither the wave nor the
    halt query is asked, and the decision says so."""
    if not settings.dry_run:
        records.save_rollout(settings.paths, None)
    if not rollout.asks(settings, rollout.release_fields(snapshot)):
        return decision
    return Decision(
        decision.action,
        f"{decision.reason}; --force: the rollout's wave and halt are not asked",
        decision.activation,
    )


def _current_snapshot(settings: Settings, deploys: Deploys) -> Snapshot:
    """The live facts, judged against the snapshot's upstream when that was fetched within
    --max-snapshot-age, from the URL asked for, and the links the actuator acts on
    (current, upstream) are still as the snapshot saw them; otherwise collect first. A dry
    run never collects: it says so."""
    snapshot = load_snapshot(settings.paths)  # a corrupt one stops here, before any change
    if snapshot is None:
        if settings.dry_run:
            raise StateError("no snapshot yet: a dry run fetches nothing; run collect first")
        return collect(settings)
    fetched_at = snapshot.upstream.fetched_at
    age = None if fetched_at is None else time.time() - fetched_at
    live = assess(
        settings, snapshot.upstream, snapshot.duration_seconds, deploys, snapshot.collected_at
    )
    fresh = age is not None and 0 <= age <= settings.max_snapshot_age
    same = (live.links.current, live.links.upstream) == (
        snapshot.links.current,
        snapshot.links.upstream,
    )
    asked = settings.url is None or snapshot.upstream.url_sha256 == digest(settings.url)
    if fresh and same and asked and not snapshot.upstream.error:
        return live
    if settings.dry_run:
        log.warning("the snapshot is out of date; a real run would collect first")
        return live
    log.info("the snapshot is out of date; collecting first")
    return collect(settings)


def _wait_for_running_activation(paths: Paths) -> None:
    """An activation that restarts our own unit keeps running in its unit while a new run
    of ours starts: wait for it to end, then decide afresh, rather than start a second."""
    if not paths.systemd_running:
        return
    unit = f"{commands.SWITCH_UNIT}.service"
    give_up = time.monotonic() + ACTIVATION_WAIT
    waited = False
    while run(commands.unit_active(unit), check=False).returncode == 0:
        if not waited:
            log.info("%s from an earlier run is still activating; waiting for it", unit)
            waited = True
        if time.monotonic() > give_up:
            raise ActuatorError(f"{unit} still runs after {ACTIVATION_WAIT:.0f}s; not deploying")
        time.sleep(1)


def _show_what_was_done(settings: Settings) -> None:
    """After a recovery that failed (its checks, its rollback): the snapshot and metrics
    follow what it did, against the last known upstream."""
    snapshot = load_snapshot(settings.paths)
    if snapshot is not None:
        observe(settings, snapshot.upstream, snapshot.duration_seconds)


def _say_interrupted(paths: Paths) -> None:
    entry = transaction.load(paths)
    if entry is not None and entry.open:
        print(f"first: would finish the interrupted deploy of {entry.path.name} ({entry.phase})")


def _dry_run(settings: Settings, snapshot: Snapshot, decision: Decision) -> None:
    """The decision and the commands a real run would start with, from the same functions
    that build them."""
    paths, upstream = settings.paths, snapshot.links.upstream
    commands_run: list[list[str]] = []
    waits: list[str] = []  # what its reboot would wait for
    if decision.action is Action.DEPLOY and upstream is not None and decision.activation:
        tried = trial.kind(settings, decision.activation)
        old = read_links(paths).profile
        if tried is trial.TrialKind.ONESHOT and old is not None:
            commands_run = trial.oneshot_argvs(paths, upstream, old)
        elif tried is None or not tried.one_time:
            commands_run = [
                profile.set_argv(paths, upstream),
                commands.switch(paths, upstream, decision.activation),
            ]
        # (kexec: the profile and the boot loader follow once it passes its checks)
        mode = settings.reboot_mode
        if mode and leaves_reboot_required(decision.activation, snapshot.links.booted, upstream):
            how = tried.how if tried is not None else reboot.How(mode.value)
            commands_run += reboot.argvs(reboot.Reboot(how, upstream, Kind.REBOOT))
            waits = reboot.would_wait(settings, snapshot)
        elif tried is not None:  # a trial boot waits for the same window and slot
            waits = reboot.would_wait(settings, snapshot)
    elif decision.action is Action.REBOOT and snapshot.deployed is not None:
        commands_run = reboot.argvs(reboot.plan_after_deploy(settings, snapshot))
        waits = reboot.would_wait(settings, snapshot)
    print(f"decision: {decision.action.value}: {decision.reason}")
    for line in waits:
        print(line)
    for argv in commands_run:
        print("would run: " + shlex.join(argv))
