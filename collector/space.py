"""Disk space: whether the store can take what a realise would add, before it starts."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .config import Paths
from .errors import NixError, ProcessError, SpaceError
from .process import run
from .store import StorePath, store_dir

MIB = 1 << 20
REFUSED = "not enough space to realise"  # how a store refusal's message starts
BOOT_REFUSED = "not enough space on the boot filesystem"  # and a boot one's
# Nix 2.8's dry run: "these 3 paths will be fetched (0.12 MiB download, 0.50 MiB unpacked):"
_FETCHED = re.compile(r"\(([\d.]+) MiB download, ([\d.]+) MiB unpacked\)")


def store_fs(paths: Paths) -> str:
    """The directory whose filesystem holds the store: the store under --root when that
    root has one of its own (a sandbox root, a mounted system), else the machine's."""
    under = paths.under_root(store_dir())
    return under if os.path.isdir(under) else store_dir()


@dataclass(frozen=True)
class Room:
    """What the metrics show: free bytes on the store's and the boot filesystem, and how
    many system profile generations there are."""

    store_free: int
    boot_free: int | None  # None: no /boot under root
    generations: int


def measure(paths: Paths) -> Room:
    """Two statvfs and one listdir: cheap enough for every poll."""
    boot = paths.boot
    profile = os.path.basename(paths.profile)
    try:
        names = os.listdir(os.path.dirname(paths.profile))
    except FileNotFoundError:
        names = []
    count = sum(1 for n in names if re.fullmatch(re.escape(profile) + r"-\d+-link", n))
    return Room(
        free_bytes(store_fs(paths)), free_bytes(boot) if os.path.isdir(boot) else None, count
    )


def free_bytes(directory: str) -> int:
    """What an unprivileged writer may still put on directory's filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def realise_needs(path: StorePath) -> int:
    """The bytes realising path would add to the store (downloads kept while unpacking
    count too), as Nix's dry run says; 0 when everything is there already. Nix rounds to
    1/100 MiB: round up by as much."""
    try:
        result = run(["nix-store", "--realise", "--dry-run", path.path])
    except ProcessError as e:
        raise NixError(f"cannot tell what realising {path} needs: {e.message}") from None
    found = _FETCHED.search(result.stderr)
    if found is None:
        return 0
    download, unpacked = (float(figure) for figure in found.groups())
    return int((download + unpacked + 0.02) * MIB)


def check_store(paths: Paths, path: StorePath, reserve: int) -> None:
    """Refuse (SpaceError) to realise path when it would leave less than reserve free."""
    needed = realise_needs(path)
    if needed == 0:
        return
    directory = store_fs(paths)
    free = free_bytes(directory)
    if free - reserve < needed:
        raise SpaceError(
            f"{REFUSED} {path.name}: it needs {shown(needed)}, "
            f"{directory} has {shown(free)} free and {shown(reserve)} must stay free "
            "(--min-free-store)"
        )


def refused(error: str | None) -> bool:
    """Whether a recorded upstream error is this module's refusal."""
    return error is not None and error.startswith(REFUSED)


def boot_refused(message: str | None) -> bool:
    """Whether a recorded deploy result is a refusal for the boot filesystem."""
    return message is not None and BOOT_REFUSED in message


def shown(size: int) -> str:
    return f"{size} bytes" if size < MIB else f"{size / MIB:.2f} MiB"
