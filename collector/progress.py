"""What an operator at a terminal sees while the agent waits: Nix realising a system (paths
and bytes done of what it announced) and health checks running (the pending check, the
round, the time left). Only on a terminal, and not with --quiet: under systemd or in CI the
plain lines stay as they were, nothing is redrawn. rich is imported only when a display
is shown (it honours NO_COLOR itself), so the collector's frequent runs never load it."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status

QUIET = False  # --quiet: set once by the command line

# Nix 2.8's words: "these 3 paths will be fetched (1.20 MiB download, 5.43 MiB unpacked):"
# ("this path" for one), the paths one per line below it, then for each "copying path
# '/nix/store/…' from 'https://…'...", and at the end the GC root on its stdout.
_ANNOUNCED = re.compile(
    r"(?:these (?P<n>\d+) paths|this path) will be fetched "
    r"\((?P<down>[\d.]+) MiB download, (?P<unpacked>[\d.]+) MiB unpacked\)"
)
_LISTED = re.compile(r"\s+(?P<path>/\S+)$")
_COPYING = re.compile(r"copying path '(?P<path>[^']+)'")
_RESULT = re.compile(r"/\S+")
MIB = 1024 * 1024


def wanted() -> bool:
    """A display, rather than plain lines: stderr is a terminal that can redraw."""
    return not QUIET and sys.stderr.isatty() and os.environ.get("TERM", "") != "dumb"


def _console() -> Console:
    from rich.console import Console

    return Console(stderr=True)


@dataclass
class Realising:
    """What Nix said so far about one realise."""

    total_paths: int = 0
    download: float = 0.0  # bytes, as announced
    unpacked: float = 0.0
    listing: bool = False  # the announced paths follow, one a line
    started: int = 0  # "copying path" lines: each is done when the next starts, or at the end

    def feed(self, line: str) -> bool:
        """Take one line of nix-store's stderr; False when it is not progress (to show)."""
        announced = _ANNOUNCED.search(line)
        if announced:
            self.total_paths += int(announced["n"] or 1)
            self.download += float(announced["down"]) * MIB
            self.unpacked += float(announced["unpacked"]) * MIB
            self.listing = True
            return True
        if self.listing and _LISTED.match(line):
            return True
        self.listing = False
        if _COPYING.search(line):
            self.started += 1
            return True
        return _RESULT.fullmatch(line) is not None

    @property
    def done(self) -> int:
        return max(self.started - 1, 0)

    def share(self, paths: int) -> float:
        """Nix 2.8 announces sizes only in total: bytes done are the total's share of
        the paths done."""
        return self.download * paths / self.total_paths if self.total_paths else 0.0


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def _quietly(state: Realising) -> Callable[[str], None]:
    def line(text: str) -> None:
        if not state.feed(text.rstrip("\n")):
            sys.stderr.write("nix-store: " + text)
            sys.stderr.flush()

    return line


@contextmanager
def realising(what: str) -> Iterator[Callable[[str], None] | None]:
    """A per-line hook for process.run's stderr while `what` is realised: the display on a
    terminal, only what is not progress with --quiet, None (the plain lines) elsewhere."""
    if QUIET:  # Nix's chatter left out; its warnings and errors still said
        yield _quietly(Realising())
        return
    if not wanted():
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn

    state = Realising()
    progress = Progress(
        TextColumn("[bold]realising[/bold] {task.description}"),
        BarColumn(),
        TextColumn("{task.fields[figures]}"),
        console=_console(),
        transient=True,  # the summary line replaces it
    )
    task = progress.add_task(what, total=None, figures="asking the caches")

    def line(text: str) -> None:
        if not state.feed(text.rstrip("\n")):  # a warning, an error: as in the plain lines
            progress.console.print("nix-store: " + text.rstrip("\n"), markup=False, highlight=False)
            return
        if state.total_paths:
            progress.update(
                task,
                total=state.total_paths,
                completed=state.done,
                figures=f"{state.done}/{state.total_paths} paths, "
                f"{_mib(state.share(state.done))} of {_mib(state.download)} download "
                f"({_mib(state.unpacked)} unpacked)",
                refresh=True,  # each step drawn, even one shorter than a refresh period
            )

    with progress, _logs_above():
        yield line
    if state.total_paths:
        progress.console.print(
            f"realised {what}: {state.total_paths} paths fetched "
            f"({_mib(state.download)} download, {_mib(state.unpacked)} unpacked)",
            markup=False,
            highlight=False,
        )


class Checks:
    """The health checks' display; every method does nothing when there is none."""

    def __init__(self, status: Status | None) -> None:
        self._status = status

    def checking(self, name: str, attempt: int, left: float) -> None:
        self._say(f"health: round {attempt}, checking {name} ({_left(left)} left)")

    def waiting(self, seconds: float, attempt: int, left: float) -> None:
        self._say(f"health: round {attempt} failed; next in {seconds:.0f}s ({_left(left)} left)")

    def _say(self, text: str) -> None:
        if self._status is not None:
            from rich.markup import escape

            self._status.update(escape(text))


def _left(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


@contextmanager
def checks() -> Iterator[Checks]:
    """The health checks' display while they run, on a terminal only."""
    if not wanted():
        yield Checks(None)
        return
    status = _console().status("")
    with status, _logs_above():
        yield Checks(status)


@contextmanager
def _logs_above() -> Iterator[None]:
    """Inside a live display rich stands in for sys.stderr, so that what is written there
    prints above the display rather than into it: the log handlers made with the real one
    write through it meanwhile."""
    real = sys.__stderr__
    moved = [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.StreamHandler) and handler.stream is real
    ]
    for handler in moved:
        handler.setStream(sys.stderr)
    try:
        yield
    finally:
        for handler in moved:
            handler.setStream(real)
