"""Store paths: what the upstream URL must name, and what the system links point at."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# Nix's own rule for a store path name (base-32 hash without e, o, u, t; no "." or ".." names).
_NAME = r"[0-9a-df-np-sv-z]{32}-(?!\.\.?(-|$))[0-9A-Za-z+._?=-]{1,211}"


def store_dir() -> str:
    return os.environ.get("NIX_STORE_DIR", "/nix/store").rstrip("/")


@dataclass(frozen=True, order=True)
class StorePath:
    path: str

    @property
    def name(self) -> str:
        """The basename, e.g. ``abc…-nixos-system-host-24.05``: what the metrics label."""
        return os.path.basename(self.path)

    def __str__(self) -> str:
        return self.path

    @classmethod
    def parse(cls, text: str) -> StorePath:
        """Validate text as a top-level store path; ValueError says what is wrong."""
        store = store_dir()
        if not text.startswith("/"):
            raise ValueError(f"not an absolute store path: {text[:80]!r}")
        if not text.startswith(store + "/"):
            raise ValueError(f"path is outside the Nix store {store}: {text[:80]!r}")
        name = text[len(store) + 1 :]
        if "/" in name:
            raise ValueError(f"not a top-level store path: {text[:80]!r}")
        if not re.fullmatch(_NAME, name):
            raise ValueError(f"not a valid store path name: {text[:80]!r}")
        if name.endswith(".drv"):
            raise ValueError(f"is a derivation, not a system: {text[:80]!r}")
        return cls(text)


def resolve_link(link: str, root: str) -> StorePath | None:
    """Follow a chain of symlinks to the store path it names, or None when the link is
    missing or leads outside the store. Absolute targets outside the store are read under
    root, so a sandbox root behaves like the real one; the store path itself need not exist."""
    store = store_dir()
    path = link
    for _ in range(40):
        try:
            target = os.readlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError:  # not a symlink
            return None
        if not os.path.isabs(target):  # e.g. the profile's system -> system-42-link
            path = os.path.normpath(os.path.join(os.path.dirname(path), target))
            continue
        if target.startswith(store + "/"):
            top = target[len(store) + 1 :].split("/", 1)[0]
            try:
                return StorePath.parse(f"{store}/{top}")
            except ValueError:
                return None
        path = os.path.join(root, target.lstrip("/"))
    return None


def path_of(path: StorePath | None) -> str | None:
    """For JSON: the path, or null."""
    return None if path is None else path.path


def name_of(path: StorePath | None, unknown: str = "") -> str:
    """For labels and messages: the basename, or what to say when there is none."""
    return unknown if path is None else path.name
