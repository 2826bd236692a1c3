"""Two real systems whose closures differ in every way the closure difference knows (a
package upgraded, downgraded, added, removed, rebuilt, several versions of one, odd
names, a new kernel), and the difference the collector must find between them."""

from __future__ import annotations

from typing import Any

from collector.closure import Change, Kind

from .host import Host
from .nix import Package, System, SystemSpec

OLD = (
    Package("up", "1.0"),
    Package("down", "2.0"),
    Package("gone", "1.0"),
    Package("rebuilt", "3.0", build="a"),
    Package("multi", "1.0"),
    Package("multi", "2.0"),
    Package("rc", "1.2.3-rc1"),
    Package("dated", "2024-05-01"),
    Package("tool", "unstable-2024-05-01"),
    Package("etc-files", None, build="a"),
    Package("odd+name_x?y=z", "1.0"),
    Package("same", "1.0"),
)
NEW = (
    Package("up", "1.1"),
    Package("down", "1.9"),
    Package("fresh", "0.1"),
    Package("rebuilt", "3.0", build="b"),
    Package("multi", "2.0"),
    Package("multi", "3.0"),
    Package("rc", "1.2.4"),
    Package("dated", "2024-06-01"),
    Package("tool", "unstable-2024-05-02"),
    Package("etc-files", None, build="b"),
    Package("odd+name_x?y=z", "1.0"),
    Package("we?rd=", "0.1"),
    Package("same", "1.0"),
)
# From the system built of OLD (kernel 6.6.41) to the one built of NEW (kernel 6.6.44).
EXPECTED = [
    Change("dated", ("2024-05-01",), ("2024-06-01",), Kind.UPGRADED),
    Change("down", ("2.0",), ("1.9",), Kind.DOWNGRADED),
    Change("etc-files", ("",), ("",), Kind.CHANGED),
    Change("fresh", (), ("0.1",), Kind.ADDED),
    Change("gone", ("1.0",), (), Kind.REMOVED),
    Change("initrd", ("6.6.41",), ("6.6.44",), Kind.UPGRADED),
    Change("kernel-modules", ("6.6.41",), ("6.6.44",), Kind.UPGRADED),
    Change("linux", ("6.6.41",), ("6.6.44",), Kind.UPGRADED),
    Change("multi", ("1.0", "2.0"), ("2.0", "3.0"), Kind.UPGRADED),
    Change("nixos-system-new", (), ("24.05.2",), Kind.ADDED),
    Change("nixos-system-old", ("24.05.1",), (), Kind.REMOVED),
    Change("rc", ("1.2.3-rc1",), ("1.2.4",), Kind.UPGRADED),
    Change("rebuilt", ("3.0",), ("3.0",), Kind.CHANGED),
    Change("tool-unstable", ("2024-05-01",), ("2024-05-02",), Kind.UPGRADED),
    Change("up", ("1.0",), ("1.1",), Kind.UPGRADED),
    Change("we?rd=", (), ("0.1",), Kind.ADDED),
]


def versioned_systems(host: Host) -> tuple[System, System]:
    """old (of OLD, kernel 6.6.41) and new (of NEW, kernel 6.6.44), built."""
    systems = host.build(
        SystemSpec("old", kernel="6.6.41", tag="24.05.1", packages=OLD),
        SystemSpec("new", kernel="6.6.44", tag="24.05.2", packages=NEW),
    )
    return systems["old"], systems["new"]


def versioned_update(host: Host) -> tuple[System, System]:
    """A tracked host running old (kernel 6.6.41), collected after CI published new."""
    old, new = versioned_systems(host)
    host.install(old)
    host.write_deployed(old)
    host.publish(new)
    collected = host.collect()
    assert collected.returncode == 0, collected
    return old, new


def expected_counts() -> dict[str, int]:
    """EXPECTED's changes counted by kind."""
    kinds = [c.kind.value for c in EXPECTED]
    return {k: kinds.count(k) for k in ("added", "removed", "upgraded", "downgraded", "changed")}


def expected_json_changes() -> list[dict[str, Any]]:
    """EXPECTED as diff.json, `status --json` and `diff --json` show it."""
    return [c.to_json() for c in EXPECTED]
