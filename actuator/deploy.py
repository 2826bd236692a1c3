"""`nixos-autodeploy deploy`: the only code that changes the system configuration."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass
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
    Links,
    forget_deployed,
    pinned,
    read_links,
    save_deployed,
    track,
)
from collector.store import StorePath

from . import reboot_policy
from .gate import Action, Decision, decide, leaves_reboot_required, may_reboot

log = logging.getLogger(__name__)

LOCK_WAIT = 600.0  # a collect (fetch + realise) is bounded by its own deadline
SWITCH_UNIT = "nixos-autodeploy-switch-to-configuration"
ACTIVATION_WAIT = 3600.0  # a slow activation; far longer means something hangs
HISTORY_MAX = 1 << 20


class ActuatorError(AutodeployError):
    pass


def _current_snapshot(settings: Settings, deploys: Deploys) -> Snapshot:
    """The live facts, judged against the snapshot's upstream when that was fetched within
    --max-snapshot-age and the links the actuator acts on (current, upstream) are still as
    the snapshot saw them; otherwise collect first. A dry run never collects: it says so."""
    paths = settings.paths
    snapshot = load_snapshot(paths)  # a corrupt one stops here, before anything changes
    if snapshot is not None:
        fetched_at = snapshot.upstream.fetched_at
        age = None if fetched_at is None else time.time() - fetched_at
        live = assess(settings, snapshot.upstream, snapshot.duration_seconds, deploys)
        fresh = age is not None and 0 <= age <= settings.max_snapshot_age
        same = (live.links.current, live.links.upstream) == (
            snapshot.links.current,
            snapshot.links.upstream,
        )
        if fresh and same and not snapshot.upstream.error:
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
            f"--append={params} init={os.path.join(system.path, 'init')}",
        ],
        ["systemctl", "kexec"],
    ]


def _append_history(paths: Paths, entry: dict[str, Any]) -> None:
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
    deploys: Deploys,
    system: StorePath,
    activation: Activation,
    error: str | None,
    *,
    blocks_retry: bool = False,
) -> None:
    """blocks_retry: system itself failed (its activation, or it is no NixOS system), so it
    is not tried again until upstream changes; a passing failure (Nix, the disk) is."""
    result = "failure" if error else "success"
    totals = dict(deploys.totals)
    totals[result] = totals.get(result, 0) + 1
    last = {
        "at": time.time(),
        "path": system.path,
        "mode": activation.value,
        "result": result,
        "message": error or "",
    }
    failed = system if blocks_retry else None
    save_deploys(paths, Deploys(last=last, totals=totals, failed_path=failed))
    _append_history(paths, {"event": "deploy", **last})


@dataclass
class _Progress:
    """How far a deploy got, so a failure undoes just that."""

    recorded: bool = False
    profile_set: bool = False
    activated: bool = False


def _roll_back(
    paths: Paths, system: StorePath, before: Links, old: Deployed | None, done: _Progress
) -> None:
    """After a failed deploy: the record is the old one again, and the next boot is what
    was deployed (or ran) before. NixOS's switch-to-configuration installs the boot loader
    before it starts units, so a failed activation may already have made system the
    default boot entry: the fallback's own `boot` makes it the default again."""
    # The record first: it decides the next run, whatever else fails here.
    if done.recorded:
        if old is None:
            forget_deployed(paths)
        else:
            save_deployed(paths, old)
    fallback = before.profile
    if fallback in (None, system):  # a run killed after `nix-env --set` left system there
        fallback = old.path if old else before.current
    if (done.profile_set or before.profile == system) and fallback not in (None, system):
        assert fallback is not None
        nix.set_profile(paths.profile, fallback)
        if done.activated:
            run(switch_argv(paths, fallback, Activation.BOOT), stream_stderr=True)


def _deploy(
    settings: Settings, snapshot: Snapshot, deploys: Deploys, activation: Activation
) -> None:
    paths = settings.paths
    system = snapshot.links.upstream
    assert system is not None
    before = read_links(paths)
    old = snapshot.deployed
    if old is not None and not old.complete:
        # An earlier run of a deploy was cut short: what it was replacing is what a failure
        # goes back to, never the system it was deploying.
        old = (
            Deployed(old.previous, Activation.SWITCH, old.previous, old.at)
            if old.previous
            else None
        )
    done = _Progress()
    nixos = True
    try:
        if not pinned(paths, system):
            nix.realise(system, paths.upstream)
        if not os.access(os.path.join(system.path, "bin/switch-to-configuration"), os.X_OK):
            nixos = False
            raise ActuatorError(
                f"{system} is not a NixOS system (no executable bin/switch-to-configuration)"
            )
        # Recorded before anything changes: whatever step a kill interrupts, the next run
        # knows this deploy was under way (see classify) and converges instead of seeing a
        # hand deploy.
        save_deployed(
            paths, Deployed(system, activation, before.current, time.time(), complete=False)
        )
        done.recorded = True
        nix.set_profile(paths.profile, system)
        done.profile_set = done.activated = True
        run(switch_argv(paths, system, activation), stream_stderr=True)
    except AutodeployError as e:
        message = f"deploying {system.name} ({activation.value}) failed: {e}"
        # The failure first: should the rollback be cut short, the next run still knows.
        _record_result(
            paths, deploys, system, activation, message, blocks_retry=done.activated or not nixos
        )
        try:
            _roll_back(paths, system, before, old, done)
        except AutodeployError as rollback:
            _append_history(paths, {"event": "rollback-failed", "message": str(rollback)})
            message += f"; rolling back failed too: {rollback}"
        raise ActuatorError(message) from None
    save_deployed(paths, Deployed(system, activation, before.current, time.time()))
    _record_result(paths, deploys, system, activation, None)
    log.info("deployed %s (%s)", system.name, activation.value)


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
    _append_history(settings.paths, {"event": settings.reboot_mode, "path": deployed.path.path})
    report(settings, dataclasses.replace(snapshot, deployed=rebooting), deploys)
    log.info("rebooting (%s) into %s", settings.reboot_mode, deployed.path.name)
    try:
        run(reboot, stream_stderr=True)
    except AutodeployError:
        # Nothing rebooted: the one reboot is still to come.
        save_deployed(settings.paths, deployed)
        report(settings, snapshot, deploys)
        raise


def _dry_run(settings: Settings, snapshot: Snapshot, decision: Decision) -> None:
    paths, upstream = settings.paths, snapshot.links.upstream
    commands: list[list[str]] = []
    if decision.action is Action.DEPLOY and upstream is not None and decision.activation:
        commands = [
            ["nix-env", "--profile", paths.profile, "--set", upstream.path],
            switch_argv(paths, upstream, decision.activation),
        ]
        if leaves_reboot_required(decision.activation, snapshot.links.booted, upstream):
            commands += reboot_argvs(settings, upstream)
    elif decision.action is Action.REBOOT and snapshot.deployed is not None:
        commands = reboot_argvs(settings, snapshot.deployed.path)
    print(f"decision: {decision.action.value}: {decision.reason}")
    for argv in commands:
        print("would run: " + shlex.join(argv))


def _finish_interrupted(paths: Paths, snapshot: Snapshot, deploys: Deploys) -> Snapshot:
    """A deploy killed after its switch took effect: record it as done."""
    deployed = snapshot.deployed
    if deployed is None or deployed.complete or snapshot.links.current != deployed.path:
        return snapshot
    done = dataclasses.replace(deployed, complete=True)
    save_deployed(paths, done)
    _append_history(paths, {"event": "completed-interrupted-deploy", "path": done.path.path})
    _record_result(paths, deploys, done.path, done.mode, None)
    log.info("the deploy of %s was interrupted after its switch; recorded it", done.path.name)
    return dataclasses.replace(snapshot, deployed=done)


def deploy(settings: Settings) -> int:
    paths = settings.paths
    reboot_policy.check(settings)
    with locked(paths.state_dir, wait=LOCK_WAIT):
        if not settings.dry_run:
            _wait_for_running_activation(paths)
        deploys = load_deploys(paths)
        snapshot = _current_snapshot(settings, deploys)
        if not settings.dry_run:
            snapshot = _finish_interrupted(paths, snapshot, deploys)
            deploys = load_deploys(paths)
        decision = decide(
            snapshot, deploys, settings.switch_mode, settings.force, settings.reboot_mode
        )
        if settings.dry_run:
            _dry_run(settings, snapshot, decision)
            return 0
        log.info("%s: %s", decision.action.value, decision.reason)
        _append_history(
            paths,
            {
                "event": "decision",
                "action": decision.action.value,
                "reason": decision.reason,
                "state": snapshot.state.value,
            },
        )
        note = functools.partial(_append_history, paths)
        reboot_policy.settle(settings, snapshot, decision, note)
        try:
            if decision.action is Action.TRACK:
                current = snapshot.links.current
                assert current is not None
                track(paths, current)
            elif decision.action is Action.DEPLOY:
                assert decision.activation is not None
                _deploy(settings, snapshot, deploys, decision.activation)
        finally:
            # Whatever happened, what operators see must not lag behind what was done.
            snapshot = observe(settings, snapshot.upstream, snapshot.duration_seconds)
        if decision.action is Action.REBOOT or (
            decision.action is Action.DEPLOY and may_reboot(snapshot, settings.reboot_mode)
        ):
            cleared = reboot_policy.clear_to_reboot(settings, snapshot, note)
            if cleared is not None:
                _reboot(settings, cleared)
    return 0
