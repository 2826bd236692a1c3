"""Maintenance windows: `[DAYS ]HH:MM-HH:MM` in the host's local time, DAYS in systemd's
weekday syntax (`Mon..Fri`, `Sat,Sun`). A window may cross midnight; it then belongs to the
day it opens on (`Fri 22:00-02:00` ends on Saturday at 02:00)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from collector.errors import ConfigError

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_SPEC = re.compile(r"(?:(?P<days>\S+)\s+)?(?P<start>\d\d:\d\d)-(?P<end>\d\d:\d\d)")


def now() -> datetime:
    """The one clock of the reboot policy: the host's local wall time."""
    return datetime.now().astimezone()


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday, as datetime.weekday()
    start: int  # minutes after midnight
    end: int  # the end itself is outside
    spec: str  # as the operator wrote it, for messages

    @property
    def crosses_midnight(self) -> bool:
        return self.end <= self.start

    def contains(self, at: datetime) -> bool:
        minute = at.hour * 60 + at.minute
        day = at.weekday()
        if not self.crosses_midnight:
            return day in self.days and self.start <= minute < self.end
        opened_yesterday = (day - 1) % 7 in self.days and minute < self.end
        return opened_yesterday or (day in self.days and minute >= self.start)


def _weekday(name: str, spec: str) -> int:
    word = name.lower()
    for number, full in enumerate(WEEKDAYS):
        if word in (full, full[:3]):
            return number
    raise ConfigError(f"reboot window {spec!r}: unknown weekday {name!r} (Mon, Tue, ... Sun)")


def _days(text: str, spec: str) -> frozenset[int]:
    """systemd's weekday list: names or ranges (`Mon..Fri`) joined by commas; a range
    must run forwards, as systemd requires."""
    days: set[int] = set()
    for part in text.split(","):
        first, dots, last = part.partition("..")
        start = _weekday(first, spec)
        stop = _weekday(last, spec) if dots else start
        if stop < start:
            raise ConfigError(
                f"reboot window {spec!r}: the range {part!r} runs backwards (write it as two)"
            )
        days.update(range(start, stop + 1))
    return frozenset(days)


def _minutes(text: str, spec: str) -> int:
    hours, minutes = int(text[:2]), int(text[3:])
    if hours > 23 or minutes > 59:
        raise ConfigError(f"reboot window {spec!r}: {text} is not a time of day")
    return hours * 60 + minutes


def parse(spec: str) -> Window:
    text = " ".join(spec.split())
    match = _SPEC.fullmatch(text)
    if match is None:
        raise ConfigError(
            f"reboot window {spec!r}: expected [DAYS ]HH:MM-HH:MM, like 'Mon..Fri 02:00-04:00'"
        )
    days = _days(match["days"], spec) if match["days"] else frozenset(range(7))
    start, end = _minutes(match["start"], spec), _minutes(match["end"], spec)
    if start == end:
        raise ConfigError(f"reboot window {spec!r}: it opens and closes at the same minute")
    return Window(days, start, end, text)


def parse_all(specs: Iterable[str]) -> tuple[Window, ...]:
    return tuple(parse(spec) for spec in specs)


def open_window(windows: Iterable[Window], at: datetime) -> Window | None:
    """The window `at` falls in, if any."""
    return next((w for w in windows if w.contains(at)), None)


def next_opening(windows: Iterable[Window], at: datetime) -> datetime | None:
    """When the next window opens after `at` (to the minute), for messages."""
    base = at.replace(second=0, microsecond=0)
    openings = [
        base.replace(hour=w.start // 60, minute=w.start % 60) + timedelta(days=offset)
        for w in windows
        for offset in range(8)
        if (at.weekday() + offset) % 7 in w.days
    ]
    later = [t for t in openings if t > at]
    return min(later, default=None)
