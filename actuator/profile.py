"""The system profile (/nix/var/nix/profiles/system) and its generations: what the next boot
loads. Only the actuator moves it, always through nix-env."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable

from collector.config import Paths
from collector.errors import NixError, ProcessError
from collector.process import run
from collector.store import StorePath

from .records import record_generations


def set_argv(paths: Paths, system: StorePath) -> list[str]:
    """A new generation of the profile pointing at system (or the existing newest one,
    when it already does)."""
    return ["nix-env", "--profile", paths.profile, "--set", system.path]


def switch_generation_argv(paths: Paths, generation: int) -> list[str]:
    return ["nix-env", "--profile", paths.profile, "--switch-generation", str(generation)]


def delete_generations_argv(paths: Paths, generations: Iterable[int]) -> list[str]:
    numbers = [str(n) for n in sorted(generations)]
    return ["nix-env", "--profile", paths.profile, "--delete-generations", *numbers]


def set_to(paths: Paths, system: StorePath) -> None:
    """Point the profile at system; the generation it now points at is the agent's."""
    try:
        run(set_argv(paths, system), stream_stderr=True)
    except ProcessError as e:
        raise NixError(f"cannot set {paths.profile} to {system}: {e.message}") from None
    record_generations(paths, made=generation(paths))


def delete(paths: Paths, generations: Iterable[int]) -> None:
    numbers = sorted(generations)
    try:
        run(delete_generations_argv(paths, numbers), stream_stderr=True)
    except ProcessError as e:
        raise NixError(f"cannot remove generations of {paths.profile}: {e.message}") from None
    record_generations(paths, removed=numbers)


def _link_pattern(paths: Paths) -> str:
    return re.escape(os.path.basename(paths.profile)) + r"-(\d+)-link"


def generation(paths: Paths) -> int | None:
    """The number of the generation the profile points at."""
    try:
        link = os.path.basename(os.readlink(paths.profile))
    except OSError:
        return None
    match = re.fullmatch(_link_pattern(paths), link)
    return int(match.group(1)) if match else None


def generations(paths: Paths) -> dict[int, str]:
    """The profile's generations: number -> the store path its link points at."""
    directory = os.path.dirname(paths.profile)
    found: dict[int, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            match = re.fullmatch(_link_pattern(paths), name)
            if match:
                with contextlib.suppress(OSError):
                    found[int(match.group(1))] = os.readlink(os.path.join(directory, name))
    return found


def at_newest(paths: Paths) -> bool:
    """Whether the profile points at its newest generation (a new one comes right after)."""
    current = generation(paths)
    return current is not None and current == max(generations(paths), default=None)
