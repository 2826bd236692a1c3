"""The classification table and the store path rules: pure functions, no Nix needed."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from harness import system_path

from collector.config import Paths
from collector.records import FAILED_MAX, DeployResult, Deploys, load_deploys
from collector.state import (
    Activation,
    Deployed,
    HandChange,
    Links,
    State,
    boot_differs,
    classify,
    dirty_reason,
    reboot_required,
)
from collector.store import StorePath

A, B, C = system_path("a"), system_path("b"), system_path("c")


def switched(path: StorePath) -> Deployed:
    return Deployed(path=path, mode=Activation.SWITCH, previous=path, at=0.0)


def booted_into(path: StorePath, previous: StorePath) -> Deployed:
    return Deployed(path=path, mode=Activation.BOOT, previous=previous, at=0.0)


def rebooted(path: StorePath, previous: StorePath) -> Deployed:
    """A switch-mode deploy after which the agent issued its one reboot."""
    return Deployed(path, Activation.SWITCH, previous, at=0.0, reboot_issued_at=1.0)


def under_way(path: StorePath, previous: StorePath, mode: Activation) -> Deployed:
    """The record a deploy writes before it changes anything."""
    return Deployed(path=path, mode=mode, previous=previous, at=0.0, complete=False)


SWITCH, BOOT = Activation.SWITCH, Activation.BOOT


CASES = [
    # current, profile, deployed, upstream -> state
    pytest.param(A, A, None, None, State.UNKNOWN, id="no-upstream-yet"),
    pytest.param(None, None, switched(A), A, State.UNKNOWN, id="no-current-link"),
    pytest.param(A, A, None, A, State.UNTRACKED, id="fresh-host-matching-upstream"),
    pytest.param(A, A, None, B, State.DIRTY, id="fresh-host-differing"),
    pytest.param(A, A, switched(B), A, State.UNTRACKED, id="record-differs-upstream-matches"),
    pytest.param(A, A, switched(B), C, State.DIRTY, id="record-differs-upstream-differs"),
    pytest.param(A, A, switched(A), A, State.UP_TO_DATE, id="tracking-same-upstream"),
    pytest.param(A, A, switched(A), B, State.UPDATE_AVAILABLE, id="tracking-new-upstream"),
    pytest.param(B, B, switched(A), C, State.DIRTY, id="manual-deploy-while-tracking"),
    pytest.param(A, B, booted_into(B, A), B, State.PENDING_REBOOT, id="boot-deploy-waits"),
    pytest.param(A, B, booted_into(B, A), C, State.UPDATE_AVAILABLE, id="waits-upstream-moved"),
    pytest.param(A, B, booted_into(B, A), A, State.UPDATE_AVAILABLE, id="waits-upstream-back"),
    pytest.param(A, C, booted_into(B, A), B, State.DIRTY, id="profile-changed-by-hand"),
    pytest.param(B, B, booted_into(B, A), B, State.UP_TO_DATE, id="rebooted-into-deploy"),
    pytest.param(B, B, booted_into(B, A), C, State.UPDATE_AVAILABLE, id="rebooted-upstream-moved"),
    # A deploy killed at some step: never dirty, whatever upstream did meanwhile.
    pytest.param(A, A, under_way(B, A, SWITCH), B, State.UPDATE_AVAILABLE, id="killed-before-set"),
    pytest.param(A, B, under_way(B, A, SWITCH), B, State.UPDATE_AVAILABLE, id="killed-after-set"),
    pytest.param(B, B, under_way(B, A, SWITCH), B, State.UP_TO_DATE, id="killed-after-switch"),
    pytest.param(B, B, under_way(B, A, SWITCH), C, State.UPDATE_AVAILABLE, id="killed-then-moved"),
    pytest.param(A, B, under_way(B, A, BOOT), B, State.UPDATE_AVAILABLE, id="killed-during-boot"),
    pytest.param(
        A, A, under_way(B, A, SWITCH), A, State.UPDATE_AVAILABLE, id="killed-upstream-back"
    ),
    # A switch-mode deploy the agent rebooted for came back on the old generation (the boot
    # menu picked it): waits, as after a boot-mode deploy; not dirty.
    pytest.param(A, B, rebooted(B, A), B, State.PENDING_REBOOT, id="switch-rebooted-came-back"),
    pytest.param(A, B, rebooted(B, A), C, State.UPDATE_AVAILABLE, id="came-back-upstream-moved"),
    pytest.param(A, A, rebooted(B, A), B, State.DIRTY, id="came-back-rolled-back-by-hand"),
    # A completed deploy rolled back by hand is the operator's: dirty.
    pytest.param(A, A, Deployed(B, SWITCH, A, 0.0), B, State.DIRTY, id="rolled-back-by-hand"),
]


@pytest.mark.parametrize(("current", "profile", "deployed", "upstream", "expected"), CASES)
def test_classify(
    current: StorePath | None,
    profile: StorePath | None,
    deployed: Deployed | None,
    upstream: StorePath | None,
    expected: State,
) -> None:
    links = Links(current=current, booted=current, profile=profile, upstream=upstream)
    assert classify(links, deployed) is expected


def _system(tmp: Path, name: str, kernel: str, initrd: str = "i1", modules: str = "m1") -> str:
    """A system whose boot files link to shared store paths, as NixOS's do."""
    root = tmp / name
    root.mkdir()
    for file, version in (("kernel", kernel), ("initrd", initrd), ("kernel-modules", modules)):
        target = tmp / f"{file}-{version}"
        target.mkdir(exist_ok=True)
        os.symlink(target, root / file)
    return str(root)


def test_boot_differs_compares_kernel_initrd_and_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIX_STORE_DIR", str(tmp_path))
    a = StorePath(_system(tmp_path, "a" * 32 + "-a", "6.1"))
    same = StorePath(_system(tmp_path, "b" * 32 + "-b", "6.1"))
    kernel = StorePath(_system(tmp_path, "c" * 32 + "-c", "6.6"))
    initrd = StorePath(_system(tmp_path, "d" * 32 + "-d", "6.1", initrd="i2"))
    modules = StorePath(_system(tmp_path, "f" * 32 + "-f", "6.1", modules="m2"))
    assert not boot_differs(a, same)
    assert boot_differs(a, kernel)
    assert boot_differs(a, initrd)
    assert boot_differs(a, modules)
    assert not boot_differs(a, None)
    links = Links(current=kernel, booted=a, profile=kernel, upstream=kernel)
    assert reboot_required(links, State.UP_TO_DATE)
    assert not reboot_required(Links(a, same, a, a), State.UP_TO_DATE)
    assert reboot_required(Links(a, a, same, same), State.PENDING_REBOOT)


VALID = "/nix/store/" + "0" * 32 + "-nixos-system-host-24.05"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("/etc/passwd", "outside the Nix store"),
        ("/nix/store/../etc/passwd", "not a top-level store path"),
        ("/nix/store/" + "0" * 32 + "-..", "not a valid store path name"),
        ("/nix/store/" + "e" * 32 + "-x", "not a valid store path name"),
        ("/nix/store/short-x", "not a valid store path name"),
        ("nix/store/" + "0" * 32 + "-x", "not an absolute store path"),
        (VALID + "/bin", "not a top-level store path"),
        ("/nix/store/" + "0" * 32 + "-system.drv", "is a derivation"),
        ("/nix/store/" + "0" * 32 + "-" + "x" * 212, "not a valid store path name"),
    ],
)
def test_store_path_rejects(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        StorePath.parse(text)


def test_store_path_accepts_and_names() -> None:
    path = StorePath.parse(VALID)
    assert path.name == "0" * 32 + "-nixos-system-host-24.05"


def test_resolve_link_follows_profile_chains_under_root(tmp_path: Path) -> None:
    from collector.store import resolve_link

    root = tmp_path / "root"
    profiles = root / "nix/var/nix/profiles"
    profiles.mkdir(parents=True)
    os.symlink(VALID + "/sw", profiles / "system-2-link")
    os.symlink("system-2-link", profiles / "system")
    (root / "run").mkdir()
    # An absolute link outside the store is read under the root, as on the real host.
    os.symlink("/nix/var/nix/profiles/system", root / "run/current-system")
    assert resolve_link(str(profiles / "system"), str(root)) == StorePath(VALID)
    assert resolve_link(str(root / "run/current-system"), str(root)) == StorePath(VALID)
    assert resolve_link(str(root / "run/missing"), str(root)) is None
    os.symlink("/etc/hostname", root / "run/elsewhere")
    assert resolve_link(str(root / "run/elsewhere"), str(root)) is None


def test_a_system_left_running_by_a_failed_activation_is_not_dirty() -> None:
    # b's activation failed half way (current moved), the record went back to a.
    links = Links(current=B, booted=A, profile=A, upstream=B)
    assert classify(links, switched(A), failed={B}) is State.UNTRACKED  # the gate holds off
    moved_on = Links(current=B, booted=A, profile=A, upstream=C)
    assert classify(moved_on, switched(A), failed={C, B}) is State.UPDATE_AVAILABLE
    assert classify(moved_on, switched(A), failed=()) is State.DIRTY


def result(path: StorePath, outcome: str, at: float) -> DeployResult:
    return DeployResult(at, path, Activation.SWITCH, outcome == "success")


# results in order (path, outcome, the system itself failed) -> the remembered failures
MEMORY = [
    pytest.param([(B, "failure", True)], {B: 1.0}, id="activation-failed"),
    pytest.param([(B, "failure", False)], {}, id="nix-failed"),
    pytest.param([(B, "failure", True), (C, "failure", False)], {B: 1.0}, id="then-c-nix"),
    pytest.param([(B, "failure", True), (B, "failure", False)], {B: 1.0}, id="then-b-nix"),
    pytest.param([(B, "failure", True), (C, "success", False)], {B: 1.0}, id="then-c-ok"),
    pytest.param([(B, "failure", True), (B, "success", False)], {}, id="then-b-ok"),
    pytest.param([(B, "failure", True), (C, "failure", True)], {B: 1.0, C: 2.0}, id="both-failed"),
]


@pytest.mark.parametrize(("results", "failed"), MEMORY)
def test_failed_systems_are_remembered_per_path(
    results: list[tuple[StorePath, str, bool]], failed: dict[StorePath, float]
) -> None:
    deploys = Deploys()
    for at, (path, outcome, itself) in enumerate(results, start=1):
        deploys = deploys.with_result(result(path, outcome, float(at)), path if itself else None)
    assert deploys.failed == failed
    assert sum(deploys.totals.values()) == len(results)


def test_failed_memory_is_bounded_and_blocks_until_upstream_changes() -> None:
    deploys = Deploys()
    paths = [StorePath(f"/nix/store/{'d' * 31}{i % 10}-s{i}") for i in range(FAILED_MAX + 3)]
    for at, path in enumerate(paths):
        deploys = deploys.with_result(result(path, "failure", float(at)), path)
    assert list(deploys.failed) == paths[3:], "the oldest go first"
    last = paths[-1]
    assert deploys.blocks(last, upstream_changed_at=float(len(paths) - 1))
    assert not deploys.blocks(last, upstream_changed_at=float(len(paths))), "b -> a -> b"
    assert deploys.blocks(last, upstream_changed_at=None)
    assert not deploys.blocks(A, upstream_changed_at=None)


def test_deploy_results_from_before_the_per_path_memory_are_read(tmp_path: Path) -> None:
    legacy = {
        "version": 1,
        "last": result(B, "failure", 5.0).to_json(),
        "totals": {"success": 0, "failure": 1},
        "failed_path": B.path,
    }
    (tmp_path / "deploys.json").write_text(json.dumps(legacy))
    deploys = load_deploys(Paths(root=str(tmp_path), state_dir=str(tmp_path)))
    assert deploys.failed == {B: 5.0}
    written = deploys.to_json()
    assert written["failed"] == {B.path: 5.0} and "failed_path" not in written


def test_a_hand_test_of_upstream_is_dirty_not_untracked() -> None:
    # `nixos-rebuild test` of what CI published: the profile (the next boot) still names a.
    ours = dataclasses.replace(switched(A), generation=3)
    tested = Links(current=B, booted=A, profile=A, upstream=B, profile_generation=3)
    assert classify(tested, ours) is State.DIRTY
    assert dirty_reason(tested, ours, State.DIRTY) is HandChange.RUNNING
    switched_by_hand = Links(current=B, booted=A, profile=B, upstream=B, profile_generation=4)
    assert classify(switched_by_hand, ours) is State.UNTRACKED
