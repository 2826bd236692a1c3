"""The history's one shape (collector/history.py): lines as the actuator writes them read back
as typed events, said in words by kind; lines of a newer version still show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collector import history
from collector.history import Event, Kind

B = "/nix/store/" + "b" * 32 + "-nixos-system-b"


@pytest.mark.parametrize(
    ("line", "said"),
    [
        (
            {"event": "decision", "at": 1, "action": "deploy", "reason": "update", "state": "x"},
            "deploy: update",
        ),
        (
            {
                "event": "deploy",
                "at": 1,
                "path": B,
                "mode": "switch",
                "result": "failure",
                "message": "boom",
                "id": "j1",
            },
            f"failure (switch) {B[11:]}: boom",
        ),
        ({"event": "rolled-back", "at": 1, "path": B, "to": None}, f"{B[11:]}, back to None"),
        (
            {"event": "health", "at": 1, "path": B, "ok": False, "summary": "check 'x' failed"},
            f"failed on {B[11:]}: check 'x' failed",
        ),
        ({"event": "trial-kexec", "at": 1, "path": B}, B[11:]),
        ({"event": "rollback-reboot", "at": 1, "path": B}, B[11:]),
        ({"event": "fleet-lock", "at": 1, "group": "web", "id": "h1"}, "group=web id=h1"),
        # From a newer version: shown field by field, nothing dropped.
        ({"event": "halted", "at": 1, "serial": 7, "query": "up"}, "query=up serial=7"),
    ],
)
def test_each_kind_is_said_in_words(line: dict[str, object], said: str) -> None:
    event = Event.from_json(line)
    assert event is not None
    assert history.describe(event) == said
    assert event.to_json() == {k: v for k, v in line.items() if v is not None}


def test_a_known_kind_reads_as_its_enum_and_an_unknown_one_as_text() -> None:
    known = Event.from_json({"event": "kexec", "at": 2.5, "path": B})
    unknown = Event.from_json({"event": "halted", "at": 2.5})
    assert known is not None and known.kind is Kind.KEXEC and known.kind.reboots
    assert unknown is not None and unknown.kind == "halted" and not isinstance(unknown.kind, Kind)


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        json.dumps(["a list"]),
        json.dumps({"at": 1}),
        json.dumps({"event": "deploy"}),
        json.dumps({"event": "deploy", "at": True}),
        json.dumps({"event": "health", "at": 1, "ok": "yes"}),
        json.dumps({"event": "deploy", "at": 1, "path": {"nested": 1}}),
    ],
)
def test_a_line_that_is_not_an_event_is_skipped_with_its_number(tmp_path: Path, line: str) -> None:
    path = tmp_path / "history.jsonl"
    good = json.dumps({"event": "reboot", "at": 1.0, "path": B})
    path.write_text(f"{good}\n{line}\n{good}\n")
    events, skipped = history.read(str(path))
    assert [e.kind for e in events] == [Kind.REBOOT, Kind.REBOOT]
    assert skipped == [2]


def test_no_history_yet(tmp_path: Path) -> None:
    assert history.read(str(tmp_path / "history.jsonl")) == ([], [])
