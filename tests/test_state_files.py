"""The state directory under bad conditions: a full disk, corrupt files (the snapshot, the
deployed record, the journal) and a history that would grow without bound. A bad file is
one clear error line and changes nothing; the history stays bounded."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Host, SystemSpec, error_lines, require_tool
from harness.deploys import deploy, history, state_files, tracking

pytestmark = pytest.mark.nix


@pytest.fixture
def full_state_dir(host: Host) -> Iterator[Path]:
    """The host's state dir on a 256 KiB tmpfs, so the test can fill it."""
    require_tool("mount")
    state = host.state_dir
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(state)], check=True)
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=True)


def fill(directory: Path) -> None:
    try:
        with open(directory / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError as e:
        assert e.errno == 28, e  # ENOSPC: the disk is full now


def test_full_disk_is_one_error_line_and_leaves_the_last_snapshot(
    host: Host, full_state_dir: Path
) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    first = host.collect()
    assert first.returncode == 0, first
    snapshot = (full_state_dir / "snapshot.json").read_bytes()
    names = sorted(os.listdir(full_state_dir))
    fill(full_state_dir)

    result = host.collect()

    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert "No space left on device" in error and "snapshot.json" in error, error
    assert "Traceback" not in result.stderr, result
    assert (full_state_dir / "snapshot.json").read_bytes() == snapshot
    # No temporary file is left behind.
    assert sorted(os.listdir(full_state_dir)) == sorted([*names, "filler"])


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"version": 99}', b'{"version": 1, "state": "x"}'],
    ids=["truncated", "binary", "list", "version", "fields"],
)
def test_corrupt_snapshot_makes_deploy_fail_with_one_line_and_change_nothing(
    host: Host, content: bytes
) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    assert host.collect().returncode == 0
    (host.state_dir / "snapshot.json").write_bytes(content)
    before, before_files = host.links(), state_files(host)
    before_metrics = host.metrics()
    host.server.reset_requests()
    result = deploy(host)
    assert result.returncode == 1, result
    assert len(result.stderr_lines) == 1, result
    assert result.stderr_lines[0].startswith("error:")
    assert "snapshot" in result.stderr_lines[0]
    assert host.links() == before
    assert state_files(host) == before_files
    assert host.metrics() == before_metrics
    assert host.activations() == [] and host.recorded("nix-env") == []
    assert host.server.count() == 0


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"version": 99}', b'{"version": 1, "state": "bogus"}'],
)
def test_corrupt_snapshot_makes_status_fail_with_one_line(host: Host, content: bytes) -> None:
    (host.state_dir / "snapshot.json").write_bytes(content)
    for args in ((), ("--json",)):
        result = host.status(*args)
        assert result.returncode == 1, result
        assert len(result.stderr_lines) == 1, result
        assert result.stderr_lines[0].startswith("error:")
        assert "snapshot" in result.stderr_lines[0] or "snapshot.json" in result.stderr_lines[0]
        assert result.stdout == ""


@pytest.mark.parametrize("content", [b"{", b'{"version": 1, "path": "/etc"}', b'{"version": 9}'])
def test_corrupt_deployed_record_stops_collect_and_deploy(host: Host, content: bytes) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    host.install(a)
    host.write_deployed(a, previous=a)
    host.publish(a)
    assert host.collect().returncode == 0
    host.publish(b)
    (host.state_dir / "deployed.json").write_bytes(content)
    snapshot = (host.state_dir / "snapshot.json").read_bytes()

    for result in (
        host.collect(),
        deploy(host, timeout=None),
    ):
        assert result.returncode == 1, result
        (error,) = error_lines(result)
        assert "deployed.json" in error and "remove it" in error, error
        assert "Traceback" not in result.stderr

    assert (host.state_dir / "deployed.json").read_bytes() == content
    assert (host.state_dir / "snapshot.json").read_bytes() == snapshot
    assert (host.current(), host.profile()) == (a.path, a.path)
    assert not (host.root / "activations.log").exists()


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"version": 2}', b'{"version": 1, "phase": "planned"}'],
    ids=["truncated", "version", "fields"],
)
def test_a_corrupt_journal_is_one_error_line_and_changes_nothing(
    host: Host, content: bytes
) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    (host.state_dir / "journal.json").write_bytes(content)
    before, before_files = host.links(), state_files(host)
    result = deploy(host)
    assert result.returncode == 1, result
    assert len(result.stderr_lines) == 1, result
    (line,) = error_lines(result)
    assert "journal.json" in line and "remove it" in line
    assert host.links() == before and state_files(host) == before_files
    assert host.activations() == [] and host.server.count() == 0


def test_history_stays_bounded(host: Host) -> None:
    a = host.build_one("a")
    tracking(host, a, a)
    old = json.dumps({"at": 1.0, "event": "decision", "filler": "x" * 200}) + "\n"
    (host.state_dir / "history.jsonl").write_text(old * ((1 << 20) // len(old) + 1))
    result = deploy(host)
    assert result.returncode == 0, result
    path = host.state_dir / "history.jsonl"
    assert path.stat().st_size <= 1 << 20
    events = history(host)  # every line is still JSON
    assert (events[-1]["event"], events[-1]["action"]) == ("decision", "nothing")
    assert events[0]["event"] == "decision"
