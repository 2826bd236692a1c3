"""The boot filesystem and the agent's profile generations: a boot loader install must fit
before the profile moves, and the generations the agent made stay within
--keep-generations. Removing generations frees nothing in the store by itself: collecting
garbage (nix.gc) stays the operator's."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from collector.config import Paths, Settings
from collector.errors import SpaceError
from collector.history import Event, Kind
from collector.space import BOOT_REFUSED, free_bytes, shown
from collector.state import read_links
from collector.store import StorePath

from . import profile
from .records import note, our_generations

log = logging.getLogger(__name__)

BOOTSPEC = "org.nixos.bootspec.v1"


def boot_dir(paths: Paths) -> str:
    return paths.boot


def boot_files(system: str) -> set[str]:
    """The kernel and initrd a boot loader copies for system: as its bootspec (boot.json)
    names them, else its kernel and initrd links; the files they end at."""
    files = [os.path.join(system, "kernel"), os.path.join(system, "initrd")]
    try:
        with open(os.path.join(system, "boot.json")) as f:
            spec = json.load(f)[BOOTSPEC]
        files = [str(spec["kernel"]), str(spec["initrd"])]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no bootspec (older NixOS): the links
    return {os.path.realpath(f) for f in files if os.path.isfile(f)}


def _size(files: Iterable[str]) -> int:
    return sum(os.path.getsize(f) for f in files)


@dataclass(frozen=True)
class Room:
    needed: int  # what the new system's kernel and initrd add
    free: int
    freed: int = 0  # what the boot loader's next install removes of pruned generations

    def enough(self, reserve: int) -> bool:
        return self.free + self.freed - reserve >= self.needed


def _room(paths: Paths, system: StorePath, generations: dict[int, str], pruned: set[int]) -> Room:
    """Every kept generation's files are on the boot filesystem already (the boot loader
    installs one entry per generation); the new system adds what none of them has."""
    kept: set[str] = set()
    for number, path in generations.items():
        if number not in pruned:
            kept |= boot_files(path)
    gone: set[str] = set()
    for number in pruned:
        gone |= boot_files(generations[number])
    new = boot_files(system.path)
    return Room(_size(new - kept), free_bytes(boot_dir(paths)), _size(gone - kept - new))


def protected(paths: Paths, extra: Iterable[StorePath | None] = ()) -> set[str]:
    """Systems no pruning removes: the booted and the current one, the profile's, and
    those a deploy under way needs (the new one, the one it goes back to)."""
    links = read_links(paths)
    systems = (links.booted, links.current, links.profile, *extra)
    return {s.path for s in systems if s is not None}


def _candidates(settings: Settings, keep: set[str]) -> list[int]:
    """The generations pruning may remove, oldest first: the agent's (or, with
    --prune-foreign, any), never the profile's own nor one whose system is in keep."""
    paths = settings.paths
    ours = set(our_generations(paths))
    current = profile.generation(paths)
    return [
        number
        for number, path in sorted(profile.generations(paths).items())
        if number != current and path not in keep and (settings.prune_foreign or number in ours)
    ]


def _remove(settings: Settings, numbers: list[int], why: str) -> None:
    paths = settings.paths
    generations = profile.generations(paths)
    profile.delete(paths, numbers)
    removed = ", ".join(f"{n} ({os.path.basename(generations[n])})" for n in numbers)
    log.info("removed system generations %s: %s", removed, why)
    note(
        paths,
        Event(Kind.GENERATIONS_REMOVED, message=removed, reason=why),
    )


def prune(settings: Settings, extra: Iterable[StorePath | None] = ()) -> None:
    """Keep the newest --keep-generations generations; of the older ones remove those
    pruning may (_candidates)."""
    keep = settings.keep_generations
    if keep == 0:
        return
    newest = sorted(profile.generations(settings.paths))[-keep:]
    candidates = _candidates(settings, protected(settings.paths, extra))
    old = [n for n in candidates if n not in newest]
    if old:
        _remove(settings, old, f"more than {keep} generations (--keep-generations)")


def make_room(settings: Settings, system: StorePath, extra: Iterable[StorePath | None]) -> None:
    """Before the profile moves to system for a boot loader install: enough room on the
    boot filesystem for its kernel and initrd, pruning the oldest of the agent's
    generations when that makes it; else refuse (SpaceError), nothing changed."""
    paths = settings.paths
    if not os.path.isdir(boot_dir(paths)):
        return  # no boot filesystem to fill (a container, a sandbox without one)
    reserve = settings.min_free_boot
    generations = profile.generations(paths)
    room = _room(paths, system, generations, set())
    if room.enough(reserve):
        return
    candidates = (
        []
        if settings.keep_generations == 0
        else _candidates(settings, protected(paths, (system, *extra)))
    )
    for count in range(1, len(candidates) + 1):
        if _room(paths, system, generations, set(candidates[:count])).enough(reserve):
            _remove(settings, candidates[:count], f"room on {boot_dir(paths)} for {system.name}")
            return
    freed = _room(paths, system, generations, set(candidates)).freed
    raise SpaceError(
        f"{BOOT_REFUSED} {boot_dir(paths)} for {system.name}: its kernel and initrd "
        f"need {shown(room.needed)}, {shown(room.free)} is free, removing the agent's old "
        f"generations would free {shown(freed)}, and {shown(reserve)} must stay free "
        "(--min-free-boot)"
    )
