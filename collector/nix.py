"""Thin wrappers over the Nix commands the agent runs."""

from __future__ import annotations

from .errors import NixError, ProcessError
from .process import run
from .store import StorePath


def realise(path: StorePath, gc_root: str) -> None:
    """Substitute path from the binary caches (Nix checks the signatures against the
    host's trusted keys) and pin it with an indirect GC root at gc_root."""
    try:
        run(["nix-store", "--realise", path.path, "--add-root", gc_root], stream_stderr=True)
    except ProcessError as e:
        raise NixError(f"cannot realise {path}: {e.message}") from None


def set_profile(profile: str, path: StorePath) -> None:
    try:
        run(["nix-env", "--profile", profile, "--set", path.path], stream_stderr=True)
    except ProcessError as e:
        raise NixError(f"cannot set {profile} to {path}: {e.message}") from None
