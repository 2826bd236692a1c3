"""The actuator's gate as a table: snapshot facts and settings in, one decision out."""

from __future__ import annotations

import dataclasses

import pytest
from harness import system_path

from actuator.gate import Action, decide
from collector.config import RebootMode, SwitchMode
from collector.records import DeployResult, Deploys
from collector.release import Release
from collector.snapshot import Snapshot, Upstream
from collector.state import Activation, Deployed, Links, State, classify
from collector.store import StorePath

A, B, C = system_path("a"), system_path("b"), system_path("c")


def snapshot(
    current: StorePath,
    deployed: Deployed | None,
    upstream: StorePath | None,
    *,
    profile: StorePath | None = None,
    reboot_required: bool = False,
    error: str | None = None,
    changed_at: float = 1.0,
) -> Snapshot:
    links = Links(current=current, booted=current, profile=profile or current, upstream=upstream)
    return Snapshot(
        collected_at=0.0,
        duration_seconds=0.0,
        upstream=Upstream(
            url="http://127.0.0.1/upstream", path=upstream, changed_at=changed_at, error=error
        ),
        links=links,
        deployed=deployed,
        state=classify(links, deployed),
        reboot_required=reboot_required,
    )


def rec(path: StorePath, mode: str = "switch", previous: StorePath | None = None) -> Deployed:
    """previous defaults to path: a record made by tracking what ran."""
    return Deployed(path=path, mode=Activation(mode), previous=previous or path, at=0.0)


def rebooted_once(d: Deployed) -> Deployed:
    return Deployed(d.path, d.mode, d.previous, d.at, reboot_issued_at=1.0)


# B failed at 2.0, after upstream last changed (1.0, the snapshots' default).
B_FAILED = Deploys(failed={B: 2.0})

SWITCH, SMART = SwitchMode.SWITCH, SwitchMode.SMART
REBOOT = RebootMode.REBOOT
PENDING = rec(B, "boot", A)

CASES = [
    # snapshot, deploys, force, reboot mode -> action, activation, words in the reason
    (snapshot(A, None, A), Deploys(), False, None, Action.TRACK, None, "tracking"),
    (snapshot(A, None, B), Deploys(), False, None, Action.NOTHING, None, "--force overrides"),
    (snapshot(A, None, B), Deploys(), True, None, Action.DEPLOY, "switch", "because of --force"),
    (snapshot(A, rec(B), A), Deploys(), False, None, Action.TRACK, None, "tracking"),
    (snapshot(A, rec(A), A), Deploys(), False, None, Action.NOTHING, None, "up to date"),
    (snapshot(A, rec(A), A), Deploys(), False, REBOOT, Action.NOTHING, None, "up to date"),
    (snapshot(A, rec(A), B), Deploys(), False, None, Action.DEPLOY, "switch", "deploying"),
    (snapshot(A, rec(A), None), Deploys(), False, None, Action.NOTHING, None, "not known"),
    (snapshot(A, rec(A), B, error="boom"), Deploys(), False, None, Action.NOTHING, None, "boom"),
    (
        snapshot(A, rec(A), B),
        B_FAILED,
        False,
        None,
        Action.NOTHING,
        None,
        "not retried until upstream changes",
    ),
    (snapshot(A, rec(A), C), B_FAILED, False, None, Action.DEPLOY, "switch", ""),
    (snapshot(A, rec(A), B), B_FAILED, True, None, Action.DEPLOY, "switch", ""),
    (
        snapshot(A, PENDING, B, profile=B, reboot_required=True),
        Deploys(),
        False,
        REBOOT,
        Action.REBOOT,
        None,
        "pending reboot",
    ),
    (
        snapshot(A, PENDING, B, profile=B, reboot_required=True),
        Deploys(),
        False,
        None,
        Action.NOTHING,
        None,
        "no --reboot-mode",
    ),
    (
        snapshot(A, rebooted_once(PENDING), B, profile=B, reboot_required=True),
        Deploys(),
        False,
        REBOOT,
        Action.NOTHING,
        None,
        "not rebooting again",
    ),
    (
        snapshot(B, rec(B, "switch", A), B, reboot_required=True),
        Deploys(),
        False,
        REBOOT,
        Action.REBOOT,
        None,
        "kernel differs",
    ),
    # A hand deploy the agent only tracks is its owner's to reboot.
    (
        snapshot(B, rec(B), B, reboot_required=True),
        Deploys(),
        False,
        REBOOT,
        Action.NOTHING,
        None,
        "",
    ),
    # An activation that failed half way left current on it: not adopted.
    (
        snapshot(B, rec(A), B),
        B_FAILED,
        False,
        None,
        Action.NOTHING,
        None,
        "not tracking it",
    ),
    # --force on it deploys it (profile, activation): recording it would leave the profile,
    # and so the next boot, on something else.
    (snapshot(B, rec(A), B), B_FAILED, True, None, Action.DEPLOY, "switch", "deploying"),
    # b -> a -> b: upstream changed since b failed (an operator re-published it): retried.
    (
        snapshot(A, rec(A), B, changed_at=3.0),
        B_FAILED,
        False,
        None,
        Action.DEPLOY,
        "switch",
        "deploying",
    ),
    (snapshot(B, rec(A), B, changed_at=3.0), B_FAILED, False, None, Action.DEPLOY, "switch", ""),
    # A failure of something else (C failed in Nix: not remembered) leaves B's alone.
    (
        snapshot(A, rec(A), B),
        B_FAILED.with_result(DeployResult(5.0, C, Activation.SWITCH, False), None),
        False,
        None,
        Action.NOTHING,
        None,
        "not retried",
    ),
    # Upstream moved on while a boot waited: the newer system goes first.
    (
        snapshot(A, PENDING, C, profile=B),
        Deploys(),
        False,
        REBOOT,
        Action.DEPLOY,
        "switch",
        "update-available",
    ),
]


@pytest.mark.parametrize(
    ("snap", "deploys", "force", "reboot", "action", "activation", "words"), CASES
)
def test_decide(
    snap: Snapshot,
    deploys: Deploys,
    force: bool,
    reboot: RebootMode | None,
    action: Action,
    activation: str | None,
    words: str,
) -> None:
    decision = decide(snap, deploys, SWITCH, force, reboot)
    assert decision.action is action
    assert decision.activation == activation
    assert words in decision.reason


def test_dirty_reason_names_the_paths() -> None:
    decision = decide(snapshot(C, rec(A), B), Deploys(), SWITCH, False, None)
    assert snapshot(C, rec(A), B).state is State.DIRTY
    for path in (A, B, C):
        assert path.name in decision.reason


def test_smart_mode_boots_when_boot_files_cannot_be_compared() -> None:
    # Store paths missing on disk: booting is the side that cannot break the running system.
    decision = decide(snapshot(A, rec(A), B), Deploys(), SMART, False, None)
    assert decision.activation == "boot"


def accepted_release(expires: int) -> Release:
    return Release(serial=7, issued=0, expires=expires, systems={"*": B}, sha256="0" * 64)


@pytest.mark.parametrize(
    ("now", "action", "words"),
    [
        (99.0, Action.DEPLOY, "deploying"),
        (100.0, Action.NOTHING, "release serial 7 expired at 1970-01-01 00:01:40Z"),
    ],
)
def test_an_expired_release_is_not_deployed(now: float, action: Action, words: str) -> None:
    s = snapshot(A, rec(A), B)
    s = dataclasses.replace(
        s, upstream=dataclasses.replace(s.upstream, release=accepted_release(100))
    )
    decision = decide(s, Deploys(), SWITCH, False, None, now)
    assert decision.action is action and words in decision.reason


def test_a_refused_release_leaves_the_accepted_one_deployable() -> None:
    refused = "release rejected (replay): serial 6 is lower than 7"
    s = snapshot(A, rec(A), B, error=refused)
    upstream = dataclasses.replace(s.upstream, release=accepted_release(100), rejected="replay")
    assert (
        decide(
            dataclasses.replace(s, upstream=upstream), Deploys(), SWITCH, False, None, 50.0
        ).action
        is Action.DEPLOY
    )
    # Any other failure of the fetch still holds everything back.
    assert decide(s, Deploys(), SWITCH, False, None, 50.0).action is Action.NOTHING
