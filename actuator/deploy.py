"""`nixos-autodeploy deploy`: the only code that changes the system configuration."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shlex
import time
from typing import Any

from collector import nix
from collector.collect import assess, collect, observe, report
from collector.config import Paths, RebootMode, Settings
from collector.errors import AutodeployError, StateError
from collector.fsutil import atomic_write
from collector.lock import locked
from collector.process import run
from collector.snapshot import Deploys, Snapshot, load_deploys, load_snapshot, save_deploys
from collector.state import (
    Activation,
    Deployed,
    forget_deployed,
    load_deployed,
    pinned,
    read_links,
    save_deployed,
    track,
)
from collector.store import StorePath, path_of
from collector.upstream import digest

from . import health, journal, reboot_policy, trial
from .gate import Action, Decision, decide, leaves_reboot_required, may_reboot
from .journal import Before, Journal, Phase

log = logging.getLogger(__name__)

LOCK_WAIT = 600.0  # a collect (fetch + realise) is bounded by its own deadline
SWITCH_UNIT = "nixos-autodeploy-switch-to-configuration"
ACTIVATION_WAIT = 3600.0  # a slow activation; far longer means something hangs
HISTORY_MAX = 1 << 20
PANIC_SECONDS = 30  # the kernel's own reset after a panic (kexec)


class ActuatorError(AutodeployError):
    pass


def _current_snapshot(settings: Settings, deploys: Deploys) -> Snapshot:
    """The live facts, judged against the snapshot's upstream when that was fetched within
    --max-snapshot-age, from the URL asked for, and the links the actuator acts on
    (current, upstream) are still as the snapshot saw them; otherwise collect first. A dry
    run never collects: it says so."""
    paths = settings.paths
    snapshot = load_snapshot(paths)  # a corrupt one stops here, before anything changes
    if snapshot is not None:
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
    elif settings.dry_run:
        raise StateError("no snapshot yet: a dry run fetches nothing; run collect first")
    return collect(settings)


def _wait_for_running_activation(paths: Paths) -> None:
    """An activation that restarts our own unit keeps running in its unit while a new run
    of ours starts: wait for it to end, then decide afresh, rather than start a second."""
    if not paths.systemd_running:
        return
    unit = f"{SWITCH_UNIT}.service"
    give_up = time.monotonic() + ACTIVATION_WAIT
    waited = False
    while run(["systemctl", "is-active", "--quiet", unit], check=False).returncode == 0:
        if not waited:
            log.info("%s from an earlier run is still activating; waiting for it", unit)
            waited = True
        if time.monotonic() > give_up:
            raise ActuatorError(f"{unit} still runs after {ACTIVATION_WAIT:.0f}s; not deploying")
        time.sleep(1)


def switch_argv(paths: Paths, system: StorePath, activation: Activation) -> list[str]:
    argv = [os.path.join(system.path, "bin/switch-to-configuration"), activation.value]
    if not paths.systemd_running:
        return argv
    # In a unit of its own, a restart of our unit (by this very activation) cannot kill it.
    return [
        "systemd-run",
        f"--unit={SWITCH_UNIT}",
        "--wait",
        "--pipe",
        "--collect",
        "--quiet",
        "--service-type=exec",
        "--no-ask-password",
        "--",
        *argv,
    ]


def reboot_argvs(settings: Settings, system: StorePath) -> list[list[str]]:
    """The commands that boot system; all but the last prepare, the last reboots."""
    if settings.reboot_mode is None:
        return []
    if settings.reboot_mode is RebootMode.REBOOT:
        return [["systemctl", "reboot"]]
    with open(os.path.join(system.path, "kernel-params"), encoding="utf-8") as f:
        params = f.read().strip()
    return [
        [
            "kexec",
            "--load",
            os.path.join(system.path, "kernel"),
            f"--initrd={os.path.join(system.path, 'initrd')}",
            # panic=: a kernel that never reaches userspace resets into the boot loader's
            # default, which a trial boot has left on the old system; boot.panic_on_fail:
            # so does a NixOS stage 1 that fails (no root, no init) instead of waiting at its
            # prompt for a key.
            f"--append={params} init={os.path.join(system.path, 'init')} "
            f"panic={PANIC_SECONDS} boot.panic_on_fail",
        ],
        ["systemctl", "kexec"],
    ]


def append_history(paths: Paths, entry: dict[str, Any]) -> None:
    """One JSON line per decision and action; past 1 MiB the older half is dropped."""
    path = paths.state("history.jsonl")
    line = json.dumps({"at": time.time(), **entry}, sort_keys=True) + "\n"
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


def _record_result(
    paths: Paths,
    system: StorePath,
    activation: Activation,
    error: str | None,
    *,
    blocks_retry: bool = False,
    deploy_id: str | None = None,
) -> None:
    """blocks_retry: system itself failed (its activation, or it is no NixOS system), so it
    is not tried again until upstream changes; a passing failure (Nix, the disk) is.
    deploy_id: the journal's; a result already recorded for it is not counted again."""
    deploys = load_deploys(paths)
    if deploy_id is not None and deploys.last and deploys.last.get("id") == deploy_id:
        return
    last = {
        "at": time.time(),
        "path": system.path,
        "mode": activation.value,
        "result": "failure" if error else "success",
        "message": error or "",
    }
    if deploy_id is not None:
        last["id"] = deploy_id
    save_deploys(paths, deploys.with_result(last, system if blocks_retry else None))
    append_history(paths, {"event": "deploy", **last})


def roll_back(paths: Paths, entry: Journal) -> Journal:
    """Bring back what ran before entry's deploy: the record, the profile, then the
    previous system's activation (through switch_argv, like every activation): `switch`
    when the deployed system runs, and `boot` so the boot loader's default follows the
    profile (NixOS installs the boot loader before it starts units, so a failed activation
    may have made the new system the default). Safe to repeat: a run killed half way
    through is finished by the next one. Also what a failed health check calls."""
    entry = journal.advance(paths, entry, Phase.ROLLING_BACK)
    before = entry.before
    # The record first: it decides the next run, whatever else fails here.
    if before.deployed is None:
        forget_deployed(paths)
    else:
        save_deployed(paths, before.deployed)
    target = entry.fallback
    links = read_links(paths)
    # Only a profile this deploy set goes back (one someone set since is theirs).
    if target is not None and links.profile == entry.path:
        nix.set_profile(paths.profile, target)
    if entry.trial == trial.ONESHOT:
        trial.forget(paths, entry)
    booted_target = False
    running = before.current
    if (
        entry.activation_started
        and entry.trial is None  # a failed trial boot is left by a reboot, not a switch
        and links.current == entry.path
        and running not in (None, entry.path)
    ):
        assert running is not None
        run(switch_argv(paths, running, Activation.SWITCH), stream_stderr=True)
        booted_target = running == target
    if entry.activation_started and target is not None and not booted_target:
        run(switch_argv(paths, target, Activation.BOOT), stream_stderr=True)
    entry = journal.advance(paths, entry, Phase.ROLLED_BACK)
    append_history(paths, {"event": "rolled-back", "path": entry.path.path, "to": path_of(target)})
    _record_rollback(paths, entry, None)
    return entry


def _record_rollback(paths: Paths, entry: Journal, error: str | None) -> None:
    """Counted once per deploy, and only when the system itself failed (its activation,
    its health checks): a deploy merely cut short is undone, not rolled back from."""
    if not entry.blocks_retry:
        return
    deploys = load_deploys(paths)
    earlier = deploys.last_rollback
    again = earlier is not None and earlier.get("id") == entry.id
    reason = entry.message + (f"; rolling back failed: {error}" if error else "")
    last = {
        "id": entry.id,
        "at": time.time(),
        "from": entry.path.path,
        "to": path_of(entry.fallback),
        "ok": error is None,
        "reason": reason,
    }
    count = deploys.rollbacks + (0 if again else 1)
    save_deploys(paths, dataclasses.replace(deploys, rollbacks=count, last_rollback=last))


def fail(paths: Paths, entry: Journal, message: str, *, blocks_retry: bool) -> ActuatorError:
    """entry's deploy failed (its activation, or later a health check): journaled and
    recorded before the rollback, so should the rollback be cut short the next run knows
    both and finishes it. Returns the error to raise (it says if rolling back failed)."""
    entry = journal.advance(paths, entry, Phase.FAILED, message=message, blocks_retry=blocks_retry)
    _record_failure(paths, entry)
    return ActuatorError(message + _try_roll_back(paths, entry))


def _record_failure(paths: Paths, entry: Journal) -> None:
    _record_result(
        paths,
        entry.path,
        entry.activation,
        entry.message,
        blocks_retry=entry.blocks_retry,
        deploy_id=entry.id,
    )


def _try_roll_back(paths: Paths, entry: Journal) -> str:
    """Roll back; "" when done, else what to add to the error message."""
    try:
        roll_back(paths, entry)
    except AutodeployError as e:
        append_history(paths, {"event": "rollback-failed", "message": str(e)})
        _record_rollback(paths, entry, str(e))
        return f"; rolling back failed too (the next run tries again): {e}"
    return ""


def complete(paths: Paths, entry: Journal) -> None:
    """The activation succeeded: the record says so, the result is counted, done. A reboot
    already issued for it stays recorded: it is the one reboot of this deploy."""
    record = load_deployed(paths)
    rebooted = record.reboot_issued_at if record and record.path == entry.path else None
    done = Deployed(entry.path, entry.activation, entry.before.current, time.time(), rebooted)
    save_deployed(paths, done)
    _record_result(paths, entry.path, entry.activation, None, deploy_id=entry.id)
    journal.advance(paths, entry, Phase.DONE)


def _confirm(settings: Settings, entry: Journal) -> None:
    """An activation that took effect stays only when the switched system passes its
    health checks (a boot-mode deploy is checked after its boot); failing, it is rolled
    back and not retried until upstream changes."""
    paths = settings.paths
    if entry.activation is Activation.SWITCH and health.checks_for(settings):
        entry = journal.advance(paths, entry, Phase.CHECKING)
        result = health.run_checks(settings)
        record_health(paths, entry.path, result)
        if not result.ok:
            message = f"{entry.path.name} failed its health checks: {result.summary}"
            raise fail(paths, entry, message, blocks_retry=True)
    complete(paths, entry)


def record_health(paths: Paths, system: StorePath, result: health.HealthResult) -> None:
    deploys = load_deploys(paths)
    save_deploys(
        paths, dataclasses.replace(deploys, health={**result.to_json(), "path": system.path})
    )
    append_history(
        paths,
        {"event": "health", "path": system.path, "ok": result.ok, "summary": result.summary},
    )


def _before(paths: Paths, snapshot: Snapshot) -> Before:
    links = read_links(paths)
    old = snapshot.deployed
    if old is not None and not old.complete:
        # A record under way without an open journal (left by a version before the
        # journal): what it was replacing is what a failure goes back to.
        old = (
            Deployed(old.previous, Activation.SWITCH, old.previous, old.at)
            if old.previous
            else None
        )
    return Before(current=links.current, profile=links.profile, deployed=old)


def _deploy(
    settings: Settings,
    snapshot: Snapshot,
    activation: Activation,
    superseded: Journal | None = None,
) -> None:
    """superseded: a deploy cut short before its activation took effect; this one takes
    its place, so what ran before that one is what a failure goes back to."""
    paths = settings.paths
    system = snapshot.links.upstream
    assert system is not None
    try:
        if not pinned(paths, system):
            nix.realise(system, paths.upstream)
    except AutodeployError as e:  # nothing changed: a passing failure, retried next run
        message = f"deploying {system.name} ({activation.value}) failed: {e}"
        _record_result(paths, system, activation, message)
        raise ActuatorError(message) from None
    if not os.access(os.path.join(system.path, "bin/switch-to-configuration"), os.X_OK):
        message = (
            f"deploying {system.name} ({activation.value}) failed: "
            f"{system} is not a NixOS system (no executable bin/switch-to-configuration)"
        )
        _record_result(paths, system, activation, message, blocks_retry=True)
        raise ActuatorError(message)
    tried = trial.kind(settings, activation)
    note = functools.partial(append_history, paths)
    if tried is not None and reboot_policy.clear_to_reboot(settings, snapshot, note) is None:
        # A trial boot waits for its window and reboot slot before anything changes: the
        # boot loader's default never moves to an untried system outside a window.
        if superseded is not None:
            _undo(paths, superseded)
        return
    before = superseded.before if superseded else _before(paths, snapshot)
    # A superseded activation may have touched the boot loader: a rollback must reset it.
    touched = superseded is not None and superseded.activation_started
    entry = journal.begin(
        paths, system, activation, before, trial=tried, activation_started=touched
    )
    # The in-flight record, for the collector: a deploy is under way (never dirty).
    save_deployed(paths, Deployed(system, activation, before.current, time.time(), complete=False))
    if tried in trial.ONE_TIME:
        trial.boot(settings, entry)  # profile and boot default change after its checks
        return
    entry = journal.advance(paths, entry, Phase.PROFILE_SET)
    try:
        nix.set_profile(paths.profile, system)
    except AutodeployError as e:
        message = f"deploying {system.name} ({activation.value}) failed: {e}"
        raise fail(paths, entry, message, blocks_retry=False) from None
    entry = journal.advance(paths, entry, Phase.ACTIVATING, activation_started=True)
    try:
        run(switch_argv(paths, system, activation), stream_stderr=True)
    except AutodeployError as e:
        message = f"deploying {system.name} ({activation.value}) failed: {e}"
        raise fail(paths, entry, message, blocks_retry=True) from None
    entry = journal.advance(paths, entry, Phase.ACTIVATED)
    if tried is not None:
        trial.boot(settings, entry)  # confirmed by the run after the boot
        return
    _confirm(settings, entry)
    log.info("deployed %s (%s)", system.name, activation.value)


def _finish_unjournaled(paths: Paths) -> None:
    """A record under way without an open journal (left by a version before the journal)
    whose switch took effect: record it as done, as that version would have."""
    deployed = load_deployed(paths)
    if deployed is None or deployed.complete or read_links(paths).current != deployed.path:
        return
    save_deployed(paths, dataclasses.replace(deployed, complete=True))
    _record_result(paths, deployed.path, deployed.mode, None)
    append_history(paths, {"event": "completed-interrupted-deploy", "path": deployed.path.path})


CUT_SHORT = frozenset({Phase.PLANNED, Phase.PROFILE_SET, Phase.ACTIVATING})


def recover(settings: Settings) -> Journal | None:
    """Finish what an open journal left, before anything is decided anew: roll forward an
    activation that took effect, count and roll back a failure, finish a rollback that was
    cut short (one that fails again stops the run here). A deploy cut short before its
    activation took effect is returned: the run's decision supersedes it (see deploy)."""
    paths = settings.paths
    entry = journal.load(paths)
    if entry is None or not entry.open:
        _finish_unjournaled(paths)
        return None
    if entry.trial is not None and entry.phase in trial.PHASES:
        trial.finish(settings, entry)  # not interrupted: this is the run after its boot
        return None
    log.info("the deploy of %s was interrupted (%s)", entry.path.name, entry.phase.value)
    append_history(
        paths,
        {"event": "interrupted-deploy", "path": entry.path.path, "phase": entry.phase.value},
    )
    phase = entry.phase
    if (
        phase is Phase.ACTIVATING
        and entry.activation is Activation.SWITCH
        and read_links(paths).current == entry.path
    ):
        phase = Phase.ACTIVATED  # the switch took effect
    if phase is Phase.ACTIVATED and entry.trial is not None:
        # Cut short before its reboot: it goes on, when the window and slot still allow.
        snapshot = load_snapshot(paths)
        note = functools.partial(append_history, paths)
        if snapshot is None or reboot_policy.clear_to_reboot(settings, snapshot, note):
            trial.boot(settings, entry)
        else:
            _undo(paths, entry)  # as if not started: the next run in a window tries again
        return None
    if phase in (Phase.ACTIVATED, Phase.CHECKING):
        # Took effect; a switched system is checked (again) before it stays.
        _confirm(settings, entry)
        append_history(paths, {"event": "completed-interrupted-deploy", "path": entry.path.path})
        log.info("the deploy of %s took effect; recorded it", entry.path.name)
        return None
    if phase in CUT_SHORT:
        return entry
    if phase is Phase.FAILED:
        _record_failure(paths, entry)
    _undo(paths, entry)
    if entry.trial is not None and entry.blocks_retry:
        trial.reboot_back(settings, journal.load(paths) or entry)
    return None


def _undo(paths: Paths, entry: Journal) -> None:
    problem = _try_roll_back(paths, entry)
    if problem:
        raise ActuatorError(f"finishing the interrupted deploy of {entry.path.name}{problem}")


def _reboot(settings: Settings, snapshot: Snapshot) -> None:
    deploys = load_deploys(settings.paths)
    deployed = snapshot.deployed
    assert deployed is not None
    *prepare, reboot = reboot_argvs(settings, deployed.path)
    for argv in prepare:  # kexec --load: when it fails, nothing rebooted and nothing is recorded
        run(argv, stream_stderr=True)
    # Recorded before the reboot: a machine that comes back still waiting is not rebooted again.
    rebooting = dataclasses.replace(deployed, reboot_issued_at=time.time())
    save_deployed(settings.paths, rebooting)
    append_history(settings.paths, {"event": settings.reboot_mode, "path": deployed.path.path})
    report(settings, dataclasses.replace(snapshot, deployed=rebooting), deploys)
    log.info("rebooting (%s) into %s", settings.reboot_mode, deployed.path.name)
    try:
        run(reboot, stream_stderr=True)
    except AutodeployError:
        # Nothing rebooted: the one reboot is still to come.
        save_deployed(settings.paths, deployed)
        report(settings, snapshot, deploys)
        raise


def _say_interrupted(paths: Paths) -> None:
    entry = journal.load(paths)
    if entry is not None and entry.open:
        print(f"first: would finish the interrupted deploy of {entry.path.name} ({entry.phase})")


def _dry_run(settings: Settings, snapshot: Snapshot, decision: Decision) -> None:
    paths, upstream = settings.paths, snapshot.links.upstream
    commands: list[list[str]] = []
    if decision.action is Action.DEPLOY and upstream is not None and decision.activation:
        commands = [
            ["nix-env", "--profile", paths.profile, "--set", upstream.path],
            switch_argv(paths, upstream, decision.activation),
        ]
        tried = trial.kind(settings, decision.activation)
        old = read_links(paths).profile
        if tried == trial.ONESHOT and old is not None:
            commands = [
                *trial.oneshot_argvs(paths, upstream, old),
                ["bootctl", "set-oneshot", f"<the entry of {upstream.name}>"],
            ]
        elif tried in trial.ONE_TIME:
            commands = []  # the profile and the boot loader follow once it passes its checks
        if leaves_reboot_required(decision.activation, snapshot.links.booted, upstream):
            commands += reboot_argvs(settings, upstream)
    elif decision.action is Action.REBOOT and snapshot.deployed is not None:
        commands = reboot_argvs(settings, snapshot.deployed.path)
    print(f"decision: {decision.action.value}: {decision.reason}")
    for argv in commands:
        print("would run: " + shlex.join(argv))


def _show_what_was_done(settings: Settings) -> None:
    """After a recovery that failed (its checks, its rollback): the snapshot and metrics
    follow what it did, against the last known upstream."""
    snapshot = load_snapshot(settings.paths)
    if snapshot is not None:
        observe(settings, snapshot.upstream, snapshot.duration_seconds)


def deploy(settings: Settings) -> int:
    paths = settings.paths
    reboot_policy.check(settings)
    with locked(paths.state_dir, wait=LOCK_WAIT):
        cut_short = None
        if not settings.dry_run:
            _wait_for_running_activation(paths)
            try:
                cut_short = recover(settings)
            except AutodeployError:
                _show_what_was_done(settings)
                raise
        else:
            _say_interrupted(paths)
        deploys = load_deploys(paths)
        snapshot = _current_snapshot(settings, deploys)
        decision = decide(
            snapshot, deploys, settings.switch_mode, settings.force, settings.reboot_mode
        )
        if settings.dry_run:
            _dry_run(settings, snapshot, decision)
            return 0
        log.info("%s: %s", decision.action.value, decision.reason)
        append_history(
            paths,
            {
                "event": "decision",
                "action": decision.action.value,
                "reason": decision.reason,
                "state": snapshot.state.value,
            },
        )
        note = functools.partial(append_history, paths)
        reboot_policy.settle(settings, snapshot, decision, note)
        try:
            if cut_short is not None and decision.action is not Action.DEPLOY:
                # Not deployed anew (by this decision): what ran before comes back.
                _undo(paths, cut_short)
            if decision.action is Action.TRACK:
                current = snapshot.links.current
                assert current is not None
                track(paths, current)
            elif decision.action is Action.DEPLOY:
                assert decision.activation is not None
                _deploy(settings, snapshot, decision.activation, cut_short)
        finally:
            # Whatever happened, what operators see must not lag behind what was done.
            snapshot = observe(
                settings, snapshot.upstream, snapshot.duration_seconds, snapshot.collected_at
            )
        if decision.action is Action.REBOOT or (
            decision.action is Action.DEPLOY and may_reboot(snapshot, settings.reboot_mode)
        ):
            cleared = reboot_policy.clear_to_reboot(settings, snapshot, note)
            if cleared is not None:
                _reboot(settings, cleared)
    return 0
