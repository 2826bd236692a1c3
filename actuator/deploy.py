"""`nixos-autodeploy deploy`: the only code that changes the system configuration."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import time
from typing import Any

from collector import nix
from collector.collect import collect, observe
from collector.config import Paths, Settings
from collector.errors import AutodeployError, ProcessError
from collector.fsutil import atomic_write
from collector.lock import locked
from collector.process import run
from collector.snapshot import Deploys, Snapshot, load_deploys, load_snapshot, save_deploys
from collector.state import Deployed, boot_differs, load_deployed, read_links, save_deployed
from collector.store import StorePath

from .gate import Action, Decision, decide, may_reboot

log = logging.getLogger(__name__)

LOCK_WAIT = 600.0  # a collect (fetch + realise) is bounded by its own deadline
SWITCH_UNIT = "nixos-autodeploy-switch-to-configuration"
ACTIVATION_WAIT = 3600.0  # a slow activation; far longer means something hangs
HISTORY_MAX = 1 << 20


class ActuatorError(AutodeployError):
    pass


def _fresh_snapshot(settings: Settings) -> Snapshot:
    """The collector's snapshot, or a new collection when it is missing, too old, or no
    longer matches the live facts the actuator acts on (current, upstream, the record)."""
    paths = settings.paths
    # A corrupt snapshot or record stops here, before anything changes.
    snapshot = load_snapshot(paths)
    deployed = load_deployed(paths)
    if snapshot is not None:
        live = read_links(paths)
        age = time.time() - snapshot.collected_at
        if not 0 <= age <= settings.max_snapshot_age:
            log.info("snapshot is %.0fs old; collecting first", age)
        elif (live.current, live.upstream, deployed) != (
            snapshot.links.current,
            snapshot.links.upstream,
            snapshot.deployed,
        ):
            log.info("snapshot no longer matches the system; collecting first")
        else:
            return snapshot
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


def switch_argv(paths: Paths, system: StorePath, activation: str) -> list[str]:
    argv = [os.path.join(system.path, "bin/switch-to-configuration"), activation]
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
    if settings.reboot_mode is None:
        return []
    if settings.reboot_mode == "reboot":
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
    paths: Paths, deploys: Deploys, system: StorePath, activation: str, error: str | None
) -> None:
    result = "failure" if error else "success"
    totals = dict(deploys.totals)
    totals[result] = totals.get(result, 0) + 1
    last = {"at": time.time(), "path": system.path, "mode": activation, "result": result}
    last["message"] = error or ""
    save_deploys(
        paths,
        Deploys(last=last, totals=totals, failed_path=system if error else None),
    )
    _append_history(paths, {"event": "deploy", **last})


def _ensure_system(paths: Paths, system: StorePath) -> None:
    if os.path.realpath(paths.upstream) != system.path or not os.path.exists(system.path):
        nix.realise(system, paths.upstream)
    if not os.access(os.path.join(system.path, "bin/switch-to-configuration"), os.X_OK):
        raise ActuatorError(
            f"{system} is not a NixOS system (no executable bin/switch-to-configuration); refused"
        )


def _deploy(settings: Settings, snapshot: Snapshot, deploys: Deploys, activation: str) -> None:
    paths = settings.paths
    system = snapshot.links.upstream
    assert system is not None
    _ensure_system(paths, system)
    before = read_links(paths)
    nix.set_profile(paths.profile, system)
    try:
        run(switch_argv(paths, system, activation), stream_stderr=True)
    except ProcessError as e:
        message = f"switch-to-configuration {activation} of {system.name} failed: {e.message}"
        # Back to the generation that was the next boot's before, so a failed system is
        # not what the machine boots into; the deployed record stays as it was. A run
        # killed after `nix-env --set` left the failed system there already: then back to
        # what was deployed, or what runs.
        fallback = before.profile
        if fallback in (None, system):
            fallback = snapshot.deployed.path if snapshot.deployed else before.current
        if fallback is not None and fallback != system:
            nix.set_profile(paths.profile, fallback)
        _record_result(paths, deploys, system, activation, message)
        raise ActuatorError(message) from None
    save_deployed(paths, Deployed(system, activation, before.current, time.time()))
    _record_result(paths, deploys, system, activation, None)
    log.info("deployed %s (%s)", system.name, activation)


def _reboot(settings: Settings, snapshot: Snapshot) -> None:
    deployed = snapshot.deployed
    assert deployed is not None
    argvs = reboot_argvs(settings, deployed.path)
    # Recorded before the reboot: a machine that comes back still waiting is not rebooted again.
    save_deployed(settings.paths, dataclasses.replace(deployed, reboot_issued_at=time.time()))
    _append_history(settings.paths, {"event": settings.reboot_mode, "path": deployed.path.path})
    observe(settings, snapshot.upstream, snapshot.duration_seconds)
    log.info("rebooting (%s) into %s", settings.reboot_mode, deployed.path.name)
    for argv in argvs:
        run(argv, stream_stderr=True)


def _dry_run(settings: Settings, snapshot: Snapshot, decision: Decision) -> None:
    paths, upstream = settings.paths, snapshot.links.upstream
    commands: list[list[str]] = []
    if decision.action is Action.DEPLOY and upstream is not None and decision.activation:
        commands = [
            ["nix-env", "--profile", paths.profile, "--set", upstream.path],
            switch_argv(paths, upstream, decision.activation),
        ]
        # What the real run would find afterwards: a boot waiting, or a new kernel running.
        leaves_reboot = decision.activation == "boot" or boot_differs(
            snapshot.links.booted, upstream
        )
        if settings.reboot_mode and leaves_reboot:
            commands += reboot_argvs(settings, upstream)
    elif decision.action is Action.REBOOT and snapshot.deployed is not None:
        commands = reboot_argvs(settings, snapshot.deployed.path)
    print(f"decision: {decision.action.value}: {decision.reason}")
    for argv in commands:
        print("would run: " + shlex.join(argv))


def deploy(settings: Settings) -> int:
    paths = settings.paths
    with locked(paths.state_dir, wait=LOCK_WAIT):
        if not settings.dry_run:
            _wait_for_running_activation(paths)
        snapshot = _fresh_snapshot(settings)
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
        try:
            if decision.action is Action.TRACK:
                current = snapshot.links.current
                assert current is not None
                save_deployed(paths, Deployed(current, "switch", current, time.time()))
            elif decision.action is Action.DEPLOY:
                assert decision.activation is not None
                _deploy(settings, snapshot, deploys, decision.activation)
        finally:
            # Whatever happened, what operators see must not lag behind what was done.
            snapshot = observe(settings, snapshot.upstream, snapshot.duration_seconds)
        if decision.action is Action.REBOOT or (
            decision.action is Action.DEPLOY and may_reboot(snapshot, settings.reboot_mode)
        ):
            _reboot(settings, snapshot)
    return 0
