"""Maintenance windows (actuator/window.py): parsing, systemd's weekday syntax, inside and
outside, crossing midnight. Pure: every instant is given, none is read from a clock."""

from __future__ import annotations

from datetime import datetime

import pytest

from actuator import window
from collector.errors import ConfigError

# 2026-11-30 is a Monday.
MON, TUE, FRI, SAT, SUN = 30, 1, 4, 5, 6


def at(day: int, hhmm: str) -> datetime:
    month = 11 if day == MON else 12
    hours, minutes = map(int, hhmm.split(":"))
    return datetime(2026, month, day, hours, minutes)


PARSED = {
    "02:00-04:00": (set(range(7)), 120, 240),
    "Mon..Fri 02:00-04:00": ({0, 1, 2, 3, 4}, 120, 240),
    "Sat,Sun 22:30-01:15": ({5, 6}, 1350, 75),
    "mon,wednesday..Thu  00:00-23:59": ({0, 2, 3}, 0, 1439),
    "Sun 23:00-00:00": ({6}, 1380, 0),
}


@pytest.mark.parametrize("spec", PARSED)
def test_parse(spec: str) -> None:
    days, start, end = PARSED[spec]
    parsed = window.parse(spec)
    assert (set(parsed.days), parsed.start, parsed.end) == (days, start, end)
    assert parsed.spec == " ".join(spec.split())


# What systemd's OnCalendar refuses (`systemd-analyze calendar 'Fri..Mon *-*-* 02:00'`),
# the module hands DAYS to it, so we refuse it too.
BAD = {
    "": "expected [DAYS ]HH:MM-HH:MM",
    "2:00-4:00": "expected [DAYS ]HH:MM-HH:MM",
    "02:00": "expected [DAYS ]HH:MM-HH:MM",
    "Mon..Fri": "expected [DAYS ]HH:MM-HH:MM",
    "24:00-02:00": "24:00 is not a time of day",
    "02:60-03:00": "02:60 is not a time of day",
    "Fri..Mon 02:00-04:00": "runs backwards",
    "Mo 02:00-04:00": "unknown weekday 'Mo'",
    "Mon,,Tue 02:00-04:00": "unknown weekday ''",
    "Sat, Sun 02:00-04:00": "expected [DAYS ]HH:MM-HH:MM",
    "03:00-03:00": "opens and closes at the same minute",
}


@pytest.mark.parametrize("spec", BAD)
def test_bad_specs_are_one_clear_error(spec: str) -> None:
    with pytest.raises(ConfigError) as raised:
        window.parse(spec)
    assert BAD[spec] in str(raised.value)
    assert str(raised.value).startswith(f"reboot window {spec!r}: ")


CONTAINS = [
    # spec, instant, inside
    ("02:00-04:00", at(MON, "02:00"), True),
    ("02:00-04:00", at(MON, "03:59"), True),
    ("02:00-04:00", at(MON, "04:00"), False),
    ("02:00-04:00", at(MON, "01:59"), False),
    ("Mon..Fri 02:00-04:00", at(FRI, "03:00"), True),
    ("Mon..Fri 02:00-04:00", at(SAT, "03:00"), False),
    ("Sat,Sun 02:00-04:00", at(SUN, "02:30"), True),
    ("Sat,Sun 02:00-04:00", at(MON, "02:30"), False),
    # Crossing midnight: the window belongs to the day it opens on.
    ("22:00-02:00", at(TUE, "23:30"), True),
    ("22:00-02:00", at(TUE, "01:59"), True),
    ("22:00-02:00", at(TUE, "02:00"), False),
    ("22:00-02:00", at(TUE, "21:59"), False),
    ("Fri 22:00-02:00", at(FRI, "22:00"), True),
    ("Fri 22:00-02:00", at(SAT, "01:00"), True),  # Friday's window, after midnight
    ("Fri 22:00-02:00", at(FRI, "01:00"), False),  # Thursday opened nothing
    ("Fri 22:00-02:00", at(SAT, "23:00"), False),
    ("Sun 23:00-01:00", at(MON, "00:30"), True),  # Sunday's window runs into Monday
    ("Sun 23:00-01:00", at(SUN, "00:30"), False),
    ("Sun 23:00-00:00", at(SUN, "23:59"), True),
    ("Sun 23:00-00:00", at(MON, "00:00"), False),
]


@pytest.mark.parametrize(("spec", "instant", "inside"), CONTAINS)
def test_inside_and_outside(spec: str, instant: datetime, inside: bool) -> None:
    assert window.parse(spec).contains(instant) is inside


def test_any_of_several_windows_opens_the_door() -> None:
    windows = window.parse_all(["Mon..Fri 02:00-04:00", "Sat,Sun 10:00-12:00"])
    assert window.open_window(windows, at(SAT, "11:00")) == windows[1]
    assert window.open_window(windows, at(TUE, "03:00")) == windows[0]
    assert window.open_window(windows, at(SAT, "03:00")) is None


NEXT = [
    (["Mon..Fri 02:00-04:00"], at(FRI, "05:00"), at(MON, "02:00").replace(month=12, day=7)),
    (["Mon..Fri 02:00-04:00"], at(TUE, "01:00"), at(TUE, "02:00")),
    (["22:00-02:00"], at(TUE, "23:00"), at(TUE, "22:00").replace(day=2)),
    (["Sat 01:00-02:00", "Sun 00:30-01:00"], at(SAT, "03:00"), at(SUN, "00:30")),
]


@pytest.mark.parametrize(("specs", "instant", "opens"), NEXT)
def test_next_opening(specs: list[str], instant: datetime, opens: datetime) -> None:
    assert window.next_opening(window.parse_all(specs), instant) == opens


def test_the_clock_is_the_hosts_local_time() -> None:
    clock = window.now()
    assert clock.tzinfo is not None
    assert clock.utcoffset() == datetime.now().astimezone().utcoffset()
