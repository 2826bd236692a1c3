"""What changes between two systems: their closures by package name and version (Nix's own
rules), the closure sizes and the boot files that differ; and diff.json, where the collector
keeps the difference between current and upstream (and, on a dirty host, between deployed
and current), recomputed only when one of the pair changed."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .config import Paths
from .errors import AutodeployError, StateError
from .fsutil import atomic_write_json, read_json
from .state import BOOT_FILES, State
from .store import StorePath

VERSION = 1
HASH_LENGTH = 32
# Output names NixOS closures carry as a suffix (`util-linux-2.39-bin`); stripped only when
# a version stands before them, so `hello-lib` stays a name of its own.
OUTPUTS = frozenset(
    ("bin", "dev", "doc", "devdoc", "info", "lib", "man", "debug", "static", "out", "modules")
)
_VERSION_START = re.compile(r"-[^A-Za-z]")
_COMPONENT = re.compile(r"[0-9]+|[^0-9.-]+")
_INT_MAX = 2**31 - 1  # Nix parses a component as a C int; a longer one compares as text

log = logging.getLogger(__name__)


class Kind(StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    UPGRADED = "upgraded"
    DOWNGRADED = "downgraded"
    CHANGED = "changed"  # same versions, another build


# ---- Nix's rules --------------------------------------------------------------------------


def split_name(name: str) -> tuple[str, str]:
    """builtins.parseDrvName: the version starts at the first `-` not followed by a letter."""
    found = _VERSION_START.search(name)
    return (name[: found.start()], name[found.start() + 1 :]) if found else (name, "")


def package_of(store_name: str) -> tuple[str, str]:
    """(name, version) of a store path's basename: the hash dropped, and an output suffix
    (`-bin`, `-man`, ...) after a version dropped too, so a package's outputs group as one."""
    hashed = store_name[HASH_LENGTH : HASH_LENGTH + 1] == "-"
    name = store_name[HASH_LENGTH + 1 :] if hashed else store_name
    base, _, suffix = name.rpartition("-")
    if base and suffix in OUTPUTS:
        package, version = split_name(base)
        if version:
            return package, version
    return split_name(name)


def _number(component: str) -> int | None:
    if not component.isdigit() or not component.isascii():
        return None
    value = int(component)
    return value if value <= _INT_MAX else None


def _component_less(a: str, b: str) -> bool:
    """Nix's componentsLT, in its order of rules."""
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return na < nb
    if a == "" and nb is not None:
        return True
    if a == "pre" and b != "pre":
        return True
    if b == "pre":
        return False
    if nb is not None:  # 2.3a < 2.3.1
        return True
    if na is not None:
        return False
    return a < b


def compare_versions(a: str, b: str) -> int:
    """builtins.compareVersions: -1, 0 or 1. Components are runs of digits or of other
    characters, split at `.` and `-`; a missing component is empty."""
    ca, cb = _COMPONENT.findall(a), _COMPONENT.findall(b)
    for i in range(max(len(ca), len(cb))):
        x = ca[i] if i < len(ca) else ""
        y = cb[i] if i < len(cb) else ""
        if _component_less(x, y):
            return -1
        if _component_less(y, x):
            return 1
    return 0


_version_key = functools.cmp_to_key(compare_versions)


def sorted_versions(versions: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(versions), key=_version_key))


# ---- the difference -----------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    name: str
    before: tuple[str, ...]  # versions, oldest first; "" for a path without a version
    after: tuple[str, ...]
    kind: Kind

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "before": list(self.before),
            "after": list(self.after),
            "kind": self.kind.value,
        }

    @classmethod
    def from_json(cls, d: Any) -> Change:
        return cls(d["name"], _strings(d["before"]), _strings(d["after"]), Kind(d["kind"]))


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of versions")
    return tuple(value)


def _kind(before: tuple[str, ...], after: tuple[str, ...]) -> Kind:
    if not before:
        return Kind.ADDED
    if not after:
        return Kind.REMOVED
    # The newest versions decide; if they are the same, the oldest (a version went away).
    order = compare_versions(after[-1], before[-1]) or compare_versions(after[0], before[0])
    if order > 0:
        return Kind.UPGRADED
    if order < 0:
        return Kind.DOWNGRADED
    return Kind.CHANGED


def _grouped(paths: Iterable[str]) -> dict[str, dict[str, set[str]]]:
    """name -> version -> store path basenames."""
    groups: dict[str, dict[str, set[str]]] = {}
    for path in paths:
        base = os.path.basename(path.rstrip("/"))
        name, version = package_of(base)
        groups.setdefault(name, {}).setdefault(version, set()).add(base)
    return groups


def changes_between(before: Iterable[str], after: Iterable[str]) -> tuple[Change, ...]:
    """Per package name whose store paths differ between two closures, its versions before
    and after and the kind of change; sorted by name."""
    old, new = _grouped(before), _grouped(after)
    changes = []
    for name in sorted(old.keys() | new.keys()):
        was, now = old.get(name, {}), new.get(name, {})
        if was == now:
            continue
        b, a = sorted_versions(was), sorted_versions(now)
        changes.append(Change(name, b, a, _kind(b, a)))
    return tuple(changes)


@dataclass(frozen=True)
class Diff:
    """From one system to another. With an error, only the pair is known."""

    source: StorePath
    target: StorePath
    changes: tuple[Change, ...] = ()
    size_before: int = 0
    size_after: int = 0
    boot_files: tuple[str, ...] = ()  # of BOOT_FILES, those that differ: a reboot is needed
    kernel_before: str | None = None  # the kernel's package version
    kernel_after: str | None = None
    error: str | None = None

    @property
    def pair(self) -> tuple[StorePath, StorePath]:
        return self.source, self.target

    def counts(self) -> dict[Kind, int]:
        counts = dict.fromkeys(Kind, 0)
        for change in self.changes:
            counts[change.kind] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.source.path,
            "to": self.target.path,
            "changes": [c.to_json() for c in self.changes],
            "counts": {k.value: n for k, n in self.counts().items()},
            "size_before": self.size_before,
            "size_after": self.size_after,
            "boot_files": list(self.boot_files),
            "kernel_before": self.kernel_before,
            "kernel_after": self.kernel_after,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, d: Any) -> Diff:
        return cls(
            source=StorePath.parse(d["from"]),
            target=StorePath.parse(d["to"]),
            changes=tuple(Change.from_json(c) for c in d["changes"]),
            size_before=int(d["size_before"]),
            size_after=int(d["size_after"]),
            boot_files=_strings(d["boot_files"]),
            kernel_before=_optional_str(d["kernel_before"]),
            kernel_after=_optional_str(d["kernel_after"]),
            error=_optional_str(d["error"]),
        )


def _optional_str(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"expected a string, not {value!r}")
    return value


# ---- Nix ----------------------------------------------------------------------------------


def _boot_file(system: StorePath, name: str) -> str | None:
    path = os.path.join(system.path, name)
    return os.path.realpath(path) if os.path.lexists(path) else None


def _kernel_version(system: StorePath) -> str | None:
    kernel = _boot_file(system, "kernel")
    store = os.path.dirname(system.path)
    if kernel is None or not kernel.startswith(store + "/"):
        return None
    return package_of(kernel[len(store) + 1 :].split("/", 1)[0])[1] or None


def compute(source: StorePath, target: StorePath) -> Diff:
    """The difference from source to target; NixError when Nix cannot tell (a path that is
    not valid in the local store). Four Nix processes; one when source is target."""
    from . import nix  # subprocess: not for `status`, which only reads diff.json

    size_before = nix.closure_size(source)
    if source == target:
        return Diff(source, target, size_before=size_before, size_after=size_before)
    changes = changes_between(nix.requisites(source), nix.requisites(target))
    return Diff(
        source,
        target,
        changes=changes,
        size_before=size_before,
        size_after=nix.closure_size(target),
        boot_files=tuple(f for f in BOOT_FILES if _boot_file(source, f) != _boot_file(target, f)),
        kernel_before=_kernel_version(source),
        kernel_after=_kernel_version(target),
    )


# ---- diff.json ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Changes:
    """What diff.json holds: current -> upstream, and deployed -> current on a dirty host."""

    upstream: Diff | None = None
    hand: Diff | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "upstream": self.upstream.to_json() if self.upstream else None,
            "hand": self.hand.to_json() if self.hand else None,
        }


def load_changes(paths: Paths) -> Changes:
    """diff.json; corrupt or of another version it is computed afresh, with a warning: it is
    only a record of what Nix can tell again."""
    source = paths.state("diff.json")
    try:
        data = read_json(source)
        if data is None:
            return Changes()
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise StateError(f"{source} has unknown version")
        return Changes(
            upstream=Diff.from_json(data["upstream"]) if data["upstream"] else None,
            hand=Diff.from_json(data["hand"]) if data["hand"] else None,
        )
    except (StateError, KeyError, TypeError, ValueError, AttributeError) as e:
        log.warning("warning: %s is corrupt (%s); computing it afresh", source, e)
        return Changes()


# The resident collector's polls: diff.json as last read or written, by the identity of the
# file, so a no-change poll costs a stat, not a parse of a list of thousands of changes.
_kept: dict[str, tuple[tuple[int, int, int], Changes]] = {}


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _load_kept(paths: Paths) -> Changes:
    source = paths.state("diff.json")
    identity = _identity(source)
    kept = _kept.get(source)
    if identity is not None and kept is not None and kept[0] == identity:
        return kept[1]
    changes = load_changes(paths)
    if identity is not None:
        _kept[source] = (identity, changes)
    return changes


def _realised(path: StorePath | None) -> bool:
    return path is not None and os.path.exists(path.path)


def _refreshed(
    known: Diff | None, source: StorePath | None, target: StorePath | None
) -> Diff | None:
    """known when it is of this pair; else computed, when both systems are in the store.
    A failure is kept for the pair too, so the next collect does not run Nix again."""
    if source is None or target is None:
        return None
    if known is not None and known.pair == (source, target):
        return known
    if not (_realised(source) and _realised(target)):
        return None  # upstream not realised yet: the next collect computes it
    log.info("computing the changes from %s to %s", source.name, target.name)
    try:
        return compute(source, target)
    except AutodeployError as e:
        log.warning("warning: %s", e)
        return Diff(source, target, error=str(e))


def refresh(
    paths: Paths,
    state: State,
    current: StorePath | None,
    upstream: StorePath | None,
    deployed: StorePath | None,
) -> Changes:
    """The changes for these systems: read from diff.json when its pairs are these, computed
    (and diff.json rewritten) only when current, upstream or deployed moved."""
    known = _load_kept(paths)
    changes = Changes(
        upstream=_refreshed(known.upstream, current, upstream),
        hand=_refreshed(known.hand, deployed, current) if state is State.DIRTY else None,
    )
    if changes != known:
        source = paths.state("diff.json")
        try:
            atomic_write_json(source, changes.to_json())
        except StateError as e:
            # The snapshot and the metrics matter more; the next collect computes it again.
            log.warning("warning: %s", e)
            return changes
        identity = _identity(source)
        if identity is not None:
            _kept[source] = (identity, changes)
    return changes
