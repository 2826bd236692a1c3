"""Thin wrappers over the Nix commands the collector runs (the profile is the actuator's:
actuator/profile.py)."""

from __future__ import annotations

from . import progress
from .errors import NixError, ProcessError
from .process import run
from .store import StorePath


def realise(path: StorePath, gc_root: str, substituter: str | None = None) -> None:
    """Substitute path from the binary caches (Nix checks the signatures against the
    host's trusted keys) and pin it with an indirect GC root at gc_root. substituter: one
    more cache to ask (an offline bundle's)."""
    extra = [] if substituter is None else ["--option", "extra-substituters", substituter]
    argv = ["nix-store", "--realise", path.path, "--add-root", gc_root, *extra]
    try:
        with progress.realising(path.name) as on_line:
            run(argv, stream_stderr=True, on_line=on_line)
    except ProcessError as e:
        raise NixError(f"cannot realise {path}: {e.message}") from None


def requisites(system: StorePath) -> list[str]:
    """The closure: every store path system depends on, itself included."""
    try:
        return run(["nix-store", "--query", "--requisites", system.path]).stdout.split()
    except ProcessError as e:
        raise NixError(f"cannot read the closure of {system}: {e.message}") from None


def closure_size(system: StorePath) -> int:
    """The sum of the NAR sizes of system's closure, as Nix has them registered."""
    argv = ["nix", "--extra-experimental-features", "nix-command", "path-info", "--closure-size"]
    try:
        out = run([*argv, system.path]).stdout.split()
    except ProcessError as e:
        raise NixError(f"cannot read the closure size of {system}: {e.message}") from None
    if len(out) != 2 or not out[1].isdigit():
        raise NixError(f"nix path-info gave no closure size for {system}: {' '.join(out)[:80]}")
    return int(out[1])
