"""Bad conditions around the agent: a full disk, a terminal or not, the config file."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Host, SystemSpec, error_lines, require_tool


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


def status_argv(host: Host) -> list[str]:
    return [sys.executable, "-m", "collector.cli", "status", "--root", str(host.root)]


def test_status_colours_only_on_a_terminal(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    assert host.collect().returncode == 0

    piped = subprocess.run(status_argv(host), env=host.agent_env(), capture_output=True)
    assert piped.returncode == 0
    assert b"untracked" in piped.stdout
    assert b"\x1b[" not in piped.stdout

    main, secondary = pty.openpty()
    env = {**host.agent_env(), "TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    with subprocess.Popen(status_argv(host), env=env, stdout=secondary, stderr=secondary) as proc:
        os.close(secondary)
        output = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            output += chunk
    os.close(main)
    assert proc.returncode == 0
    assert b"untracked" in output
    assert b"\x1b[" in output


def test_flags_win_over_the_config_file_and_unknown_keys_are_refused(
    host: Host, tmp_path: Path
) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    config = tmp_path / "autodeploy.json"
    config.write_text(
        json.dumps({"url": host.server.url("/nowhere"), "timeout": 30, "headers": ["X-A: file"]})
    )
    result = host.run_agent("collect", "--config", str(config), "--url", host.url)
    assert result.returncode == 0, result
    (request,) = host.server.requests("/upstream")
    assert request.headers["x-a"] == "file"
    assert host.server.requests("/nowhere") == []

    config.write_text(json.dumps({"url": host.url, "swtich_mode": "boot"}))
    before = (host.state_dir / "snapshot.json").read_bytes()
    refused = host.run_agent("deploy", "--config", str(config))
    assert refused.returncode == 1
    (error,) = error_lines(refused)
    assert "unknown key 'swtich_mode'" in error
    assert (host.state_dir / "snapshot.json").read_bytes() == before

    config.write_text("url = [")
    broken = host.run_agent("collect", "--config", str(config))
    assert broken.returncode == 1
    assert len(error_lines(broken)) == 1


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
        host.run_agent("deploy", "--url", host.url, "--prometheus-path", str(host.metrics_path)),
    ):
        assert result.returncode == 1, result
        (error,) = error_lines(result)
        assert "deployed.json" in error and "remove it" in error, error
        assert "Traceback" not in result.stderr

    assert (host.state_dir / "deployed.json").read_bytes() == content
    assert (host.state_dir / "snapshot.json").read_bytes() == snapshot
    assert (host.current(), host.profile()) == (a.path, a.path)
    assert not (host.root / "activations.log").exists()
