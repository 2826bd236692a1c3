"""The difference between two systems: Nix's name and version rules (checked against Nix
itself), the kinds of change, real closures built by the harness, and the collector
keeping it (diff.json, the pending-changes metrics) only when a system moves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from harness import (
    Host,
    Package,
    metric,
    no_traceback,
    register_closure,
    require_tool,
    run_checked,
    store_paths,
)
from harness.closures import (
    EXPECTED,
    OLD,
    expected_counts,
    expected_json_changes,
    versioned_systems,
    versioned_update,
)
from harness.resident import RARELY, resident

from collector.closure import (
    Change,
    Kind,
    changes_between,
    compare_versions,
    compute,
    package_of,
    split_name,
)
from collector.store import StorePath

VERSION_PAIRS = [
    ("1.0", "1.0"),
    ("1.0", "1.1"),
    ("1.10", "1.9"),
    ("1.0", "1.0.1"),
    ("1.0", "1.0a"),
    ("2.3a", "2.3.1"),
    ("1.0pre", "1.0"),
    ("1.0pre1", "1.0pre2"),
    ("1.0-pre", "1.0"),
    ("pre", "pre"),
    ("1.2.3-rc1", "1.2.3"),
    ("1.2.3-rc1", "1.2.3-rc2"),
    ("1.2.3-rc1", "1.2.4"),
    ("2024-05-01", "2024-06-01"),
    ("2024-05-01", "unstable-2024-05-01"),
    ("unstable-2024-05-01", "unstable-2024-05-02"),
    ("0-unstable-2024-05-01", "0.1"),
    ("", "1.0"),
    ("", ""),
    ("a", ""),
    ("alpha", "beta"),
    ("1.0.0", "1.0"),
    ("1..0", "1.0"),
    ("01", "1"),
    ("2147483647", "2147483648"),
    ("99999999999999999999", "1"),
    ("6.6.41", "6.6.44"),
    ("1.26.1", "1.27.0"),
    ("1_2", "1.2"),
    ("r1", "r2"),
    ("1.0+git", "1.0"),
]

NAMES = [
    "nginx-1.27.0",
    "hello",
    "a-b-c",
    "foo-unstable-2024-05-01",
    "foo-1.2.3-rc1",
    "foo-_bar",
    "foo-.1",
    "foo-",
    "-1.0",
    "foo--1",
    "odd+name_x?y=z-1.0",
    "python3.11-requests-2.31.0",
    "util-linux-2.39-bin",
    "nixos-system-web1-24.05.20240501.abcdef",
    "X-1",
]


def nix_eval(expression: str) -> object:
    """Evaluate with Nix itself: the expected answers."""
    require_tool("nix-instantiate")
    return json.loads(
        run_checked(["nix-instantiate", "--eval", "--strict", "--json", "-E", expression])
    )


def nix_string(text: str) -> str:
    return json.dumps(text).replace("${", "\\${")


@pytest.mark.nix
def test_compare_versions_as_nix_compares_them() -> None:
    pairs = VERSION_PAIRS + [(b, a) for a, b in VERSION_PAIRS]
    expression = " ".join(
        f"(builtins.compareVersions {nix_string(a)} {nix_string(b)})" for a, b in pairs
    )
    expected = nix_eval(f"[ {expression} ]")
    assert isinstance(expected, list) and len(expected) == len(pairs)
    got = [compare_versions(a, b) for a, b in pairs]
    wrong = [(a, b, g, e) for (a, b), g, e in zip(pairs, got, expected, strict=True) if g != e]
    assert wrong == [], "(a, b, ours, Nix's)"
    assert set(expected) == {-1, 0, 1}, "the table covers all three answers"


@pytest.mark.nix
def test_name_and_version_split_as_nix_splits_them() -> None:
    expression = " ".join(f"(builtins.parseDrvName {nix_string(n)})" for n in NAMES)
    expected = nix_eval(f"[ {expression} ]")
    assert isinstance(expected, list)
    got = [{"name": n, "version": v} for n, v in map(split_name, NAMES)]
    assert got == expected


@pytest.mark.parametrize(
    ("store_name", "package"),
    [
        ("0123456789abcdfghijklmnpqrsvwxyz-nginx-1.27.0", ("nginx", "1.27.0")),
        ("0123456789abcdfghijklmnpqrsvwxyz-util-linux-2.39-bin", ("util-linux", "2.39")),
        ("0123456789abcdfghijklmnpqrsvwxyz-linux-6.6.41-modules", ("linux", "6.6.41")),
        ("0123456789abcdfghijklmnpqrsvwxyz-hello-lib", ("hello-lib", "")),
        ("0123456789abcdfghijklmnpqrsvwxyz-etc", ("etc", "")),
        (
            "0123456789abcdfghijklmnpqrsvwxyz-tool-unstable-2024-05-01",
            ("tool-unstable", "2024-05-01"),
        ),
    ],
)
def test_package_of_a_store_path(store_name: str, package: tuple[str, str]) -> None:
    assert package_of(store_name) == package


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ([], [], []),
        (["a-1.0"], ["a-1.0"], []),
        (["a-1.0"], ["a-1.1"], [Change("a", ("1.0",), ("1.1",), Kind.UPGRADED)]),
        (["a-1.1"], ["a-1.0"], [Change("a", ("1.1",), ("1.0",), Kind.DOWNGRADED)]),
        ([], ["a-1.0"], [Change("a", (), ("1.0",), Kind.ADDED)]),
        (["a-1.0"], [], [Change("a", ("1.0",), (), Kind.REMOVED)]),
        (["a-1.0#x"], ["a-1.0#y"], [Change("a", ("1.0",), ("1.0",), Kind.CHANGED)]),
        (["etc#x"], ["etc#y"], [Change("etc", ("",), ("",), Kind.CHANGED)]),
        (
            ["a-1.0", "a-2.0"],
            ["a-2.0", "a-3.0"],
            [Change("a", ("1.0", "2.0"), ("2.0", "3.0"), Kind.UPGRADED)],
        ),
        (["a-1.0", "a-2.0"], ["a-2.0"], [Change("a", ("1.0", "2.0"), ("2.0",), Kind.UPGRADED)]),
        (["a-2.0"], ["a-1.0", "a-2.0"], [Change("a", ("2.0",), ("1.0", "2.0"), Kind.DOWNGRADED)]),
        # An output of the same version is the same package, not a change of version.
        (["a-1.0"], ["a-1.0", "a-1.0-man"], [Change("a", ("1.0",), ("1.0",), Kind.CHANGED)]),
        (
            ["b-1.0", "a-1.0"],
            ["a-1.0", "c-0.1"],
            [Change("b", ("1.0",), (), Kind.REMOVED), Change("c", (), ("0.1",), Kind.ADDED)],
        ),
    ],
)
def test_changes_between(before: list[str], after: list[str], expected: list[Change]) -> None:
    assert list(changes_between(store_paths(*before), store_paths(*after))) == expected


def big_closures() -> tuple[list[str], list[str]]:
    """50,000 paths each: pkg0 removed, pkg1 to pkg99 upgraded, pkg50000 added."""
    before = store_paths(*(f"pkg{i}-1.{i % 10}" for i in range(50_000)))
    after = store_paths(*(f"pkg{i}-{'2' if i < 100 else '1'}.{i % 10}" for i in range(1, 50_001)))
    return before, after


def test_changes_between_closures_of_50000_paths() -> None:
    """Right answers at the size of a large desktop closure (time and memory: benchmark)."""
    before, after = big_closures()
    changes = changes_between(before, after)
    kinds = [c.kind for c in changes]
    assert kinds.count(Kind.UPGRADED) == 99  # pkg1..pkg99 (pkg0 is gone)
    assert kinds.count(Kind.REMOVED) == 1 and kinds.count(Kind.ADDED) == 1
    assert len(changes) == 101


# ---- real systems -------------------------------------------------------------------------


def build_versioned(host: Host) -> tuple[StorePath, StorePath]:
    old, new = (StorePath(host.realise(system)) for system in versioned_systems(host))
    return old, new


def nix_closure_size(host: Host, system: StorePath) -> int:
    """The sum of `nix-store --query --size` over the closure: the other way to count it."""
    closure = run_checked(["nix-store", "-qR", system.path], env=host.nix_env()).split()
    sizes = run_checked(["nix-store", "-q", "--size", *closure], env=host.nix_env()).split()
    return sum(int(s) for s in sizes)


def test_difference_of_real_systems(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = build_versioned(host)
    sizes = nix_closure_size(host, old), nix_closure_size(host, new)
    monkeypatch.setenv("PATH", host.agent_env()["PATH"])  # counts the agent's Nix processes
    diff = compute(old, new)
    assert list(diff.changes) == EXPECTED
    assert (diff.size_before, diff.size_after) == sizes
    assert diff.boot_files == ("kernel", "initrd", "kernel-modules")
    assert (diff.kernel_before, diff.kernel_after) == ("6.6.41", "6.6.44")
    assert host.recorded("nix-store") == [["--query", "--requisites", p.path] for p in (old, new)]
    same = compute(new, new)
    assert same.changes == () and same.size_before == same.size_after == diff.size_after
    assert same.boot_files == ()


def test_diff_of_50000_path_closures(host: Host, tmp_path: Path) -> None:
    """Through the command and real Nix: a right answer, no traceback."""
    store = tmp_path / "big-store"
    before, after = big_closures()
    top_before, top_after = store_paths("nixos-system-big-1", "nixos-system-big-2")
    register_closure(store, top_before, before)
    register_closure(store, top_after, after)
    result = host.run_agent("diff", "--json", top_before, top_after, env={"NIX_REMOTE": str(store)})
    assert result.returncode == 0, result
    shown = json.loads(result.stdout)
    assert shown["counts"] == {
        "added": 1,  # pkg50000
        "removed": 1,  # pkg0
        "upgraded": 100,  # pkg1 to pkg99, and the system itself
        "downgraded": 0,
        "changed": 0,
    }
    assert (shown["size_before"], shown["size_after"]) == (50_001 * 1000,) * 2
    assert os.path.exists(store / "nix/var/nix/db/db.sqlite")


# ---- the collector keeps it: diff.json and the metrics ------------------------------

NIX_TOOLS = ("nix-store", "nix-env", "nix")


def test_collect_keeps_the_difference_and_exports_it(host: Host) -> None:
    old, new = versioned_update(host)
    kept = host.read_json("diff.json")
    assert kept["version"] == 1
    upstream = kept["upstream"]
    assert (upstream["from"], upstream["to"], upstream["error"]) == (old.path, new.path, None)
    assert upstream["changes"] == expected_json_changes()
    assert upstream["counts"] == expected_counts()
    assert upstream["boot_files"] == ["kernel", "initrd", "kernel-modules"]
    assert kept["hand"] is None
    text = host.metrics()
    for kind, count in expected_counts().items():
        assert metric(text, "nixos_autodeploy_pending_changes", kind=kind) == count
    assert (
        metric(text, "nixos_autodeploy_closure_size_bytes", system="current")
        == upstream["size_before"]
    )
    assert (
        metric(text, "nixos_autodeploy_closure_size_bytes", system="upstream")
        == upstream["size_after"]
    )
    assert upstream["size_before"] > 0 and upstream["size_after"] > 0


def test_no_change_collect_runs_no_nix_and_keeps_diff_json(host: Host) -> None:
    versioned_update(host)
    kept = (host.state_dir / "diff.json").read_bytes()
    spawned = host.spawn_count(*NIX_TOOLS)
    again = host.collect()
    assert again.returncode == 0, again
    assert host.spawn_count(*NIX_TOOLS) == spawned
    assert (host.state_dir / "diff.json").read_bytes() == kept
    assert metric(host.metrics(), "nixos_autodeploy_pending_changes", kind="upgraded") == 8


def test_the_difference_follows_a_new_upstream(host: Host) -> None:
    old, _ = versioned_update(host)
    newer = host.build_one("newer", kernel="6.6.41", tag="24.05.3", packages=OLD[1:])
    host.publish(newer)
    assert host.collect().returncode == 0
    upstream = host.read_json("diff.json")["upstream"]
    assert (upstream["from"], upstream["to"]) == (old.path, newer.path)
    # Only the top level and the package it dropped differ; the same kernel: no reboot.
    assert [(c["name"], c["kind"]) for c in upstream["changes"]] == [
        ("nixos-system-newer", "added"),
        ("nixos-system-old", "removed"),
        ("up", "removed"),
    ]
    assert upstream["boot_files"] == []


def test_pending_changes_are_zero_when_current_is_upstream(host: Host) -> None:
    system = host.build_one("a", packages=(Package("nginx", "1.27.0"),))
    host.install(system)
    host.write_deployed(system)
    host.publish(system)
    assert host.collect().returncode == 0
    text = host.metrics()
    for kind in ("added", "removed", "upgraded", "downgraded", "changed"):
        assert metric(text, "nixos_autodeploy_pending_changes", kind=kind) == 0
    current = metric(text, "nixos_autodeploy_closure_size_bytes", system="current")
    assert current == metric(text, "nixos_autodeploy_closure_size_bytes", system="upstream") > 0
    status = host.status()
    assert status.returncode == 0, status
    assert "upstream changes" not in status.stdout


def test_resident_polls_compute_the_difference_only_when_a_system_moves(host: Host) -> None:
    old, _ = versioned_update(host)  # a one-shot collect wrote diff.json
    kept = (host.state_dir / "diff.json").read_bytes()
    spawned = host.spawn_count(*NIX_TOOLS)
    with resident(host, RARELY) as agent:
        agent.next_message()
        agent.poll()
        assert host.spawn_count(*NIX_TOOLS) == spawned, "no-change polls run no Nix"
        assert (host.state_dir / "diff.json").read_bytes() == kept
        # Rewritten behind its back (by a one-shot or the actuator): read again, not kept.
        (host.state_dir / "diff.json").write_text("{not json")
        agent.poll()
        assert json.loads((host.state_dir / "diff.json").read_bytes()) == json.loads(kept)
        newer = host.build_one("newer", kernel="6.6.41", tag="24.05.3", packages=OLD)
        host.publish(newer)
        agent.poll()
        returncode, stderr = agent.stop()
    assert returncode == 0, stderr
    assert "diff.json is corrupt" in stderr
    upstream = host.read_json("diff.json")["upstream"]
    assert (upstream["from"], upstream["to"]) == (old.path, newer.path)
    assert metric(host.metrics(), "nixos_autodeploy_pending_changes", kind="upgraded") == 0


def test_a_corrupt_diff_json_is_computed_afresh(host: Host) -> None:
    versioned_update(host)
    (host.state_dir / "diff.json").write_text("{not json")
    again = host.collect()
    assert again.returncode == 0, again
    assert "diff.json is corrupt" in again.stderr
    assert host.read_json("diff.json")["upstream"]["counts"] == expected_counts()
    no_traceback(again)
