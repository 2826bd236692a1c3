"""The resident collector (`collect --every SECONDS`) against real Nix and a real server.

A test follows the loop through what it tells systemd (harness.resident): a test notify
socket receives READY=1, WATCHDOG=1 and STATUS= after every poll, so the test knows when
a poll has finished without sleeping. Signals are sent the way systemd sends them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import REPO, Host, RecordedRequest, Reply, metric, require_tool
from harness.deploys import deploy
from harness.resident import OFTEN, RARELY, SAFETY_SECONDS, resident

from collector import notify
from collector.cli import build_parser
from collector.config import settings_from


def upstream_requests(host: Host) -> list[RecordedRequest]:
    return host.server.requests("/upstream")


def state_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("state ")]


def test_polls_with_one_connection_and_tells_systemd(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.write_deployed(system)
    host.publish(system)
    host.server.keep_alive = True
    with resident(host, OFTEN) as agent:
        first = agent.next_message()
        for _ in range(3):
            agent.next_message()
        returncode, stderr = agent.stop()
    assert returncode == 0, stderr
    assert first["READY"] == "1"
    assert first["STATUS"].startswith(f"up-to-date; current {system.basename}")
    polls = agent.polls()
    assert all(m["WATCHDOG"] == "1" for m in polls)
    assert [m.get("READY") for m in polls[1:]] == [None] * (len(polls) - 1)
    assert agent.messages[-1] == {"STOPPING": "1"}
    requests = upstream_requests(host)
    assert len(requests) >= 4
    # One kept-alive connection; after the first, conditional GETs (answered 304).
    assert {r.client_port for r in requests} == {requests[0].client_port}
    assert [bool(r.headers.get("if-none-match")) for r in requests] == [False] + [True] * (
        len(requests) - 1
    )
    # Realised once, on the first poll, after its space check (the dry run); no Nix after.
    assert [argv[:2] for argv in host.recorded("nix-store")] == [
        ["--realise", "--dry-run"],
        ["--realise", system.path],
    ]
    # One log line per change of state, not one per poll.
    assert state_lines(stderr) == [f"state up-to-date; current {system.basename}, "
                                   f"upstream {system.basename}"]  # fmt: skip
    assert "stopped" in stderr.splitlines()
    assert metric(host.metrics(), "nixos_autodeploy_upstream_fetch_success") == 1


@pytest.mark.parametrize("failure", ["upstream-404", "realise-failed", "disk-full"])
def test_a_failing_poll_is_reported_and_the_loop_recovers(host: Host, failure: str) -> None:
    a = host.build_one("a")
    unsigned = host.build_one("unsigned", signed=False)
    host.install(a)
    host.write_deployed(a)
    host.publish(a)
    with resident(host, RARELY) as agent:
        agent.next_message()
        with failing(host, failure, unsigned.path):
            fail = agent.poll()
            again = agent.poll()
            snapshot_during = host.snapshot()
        recovered = agent.poll()
        returncode, stderr = agent.stop()
    assert returncode == 0, stderr
    assert "error: " in fail["STATUS"] and again["STATUS"] == fail["STATUS"]
    assert recovered["STATUS"].startswith("up-to-date"), recovered
    assert "error" not in recovered["STATUS"]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    # Said once, however many polls failed; then that it works again.
    assert len(errors) == 1, stderr
    assert errors[0] in fail["STATUS"]
    assert "collecting works again" in stderr.splitlines()
    assert "Traceback" not in stderr
    if failure == "disk-full":
        assert "No space left on device" in errors[0]
    else:
        # Kept in the snapshot and the metrics, as a one-shot collect keeps it.
        assert snapshot_during["upstream"]["error"] in errors[0]
        expected = "404" if failure == "upstream-404" else "cannot realise"
        assert expected in errors[0]
    assert host.snapshot()["upstream"]["error"] is None
    assert host.snapshot()["state"] == "up-to-date"
    assert metric(host.metrics(), "nixos_autodeploy_upstream_fetch_success") == 1


@contextlib.contextmanager
def failing(host: Host, failure: str, unsigned: str) -> Iterator[None]:
    """Make every poll fail one way until the block ends, then undo it."""
    body = host.server.routes["/upstream"].source
    state = host.state_dir
    if failure == "upstream-404":
        host.server.route("/upstream", Reply(status=404, body=b"gone\n"))
    elif failure == "realise-failed":
        host.publish(unsigned)
    else:
        # The state dir on a small tmpfs, with the files it held, then filled up.
        require_tool("mount")
        saved = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(state)], check=True)
        for name, data in saved.items():
            (state / name).write_bytes(data)
        with contextlib.suppress(OSError), open(state / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    try:
        yield
    finally:
        if failure == "disk-full":
            # Back to the real disk, as it was before.
            subprocess.run(["umount", "-l", str(state)], check=True)
        host.server.route("/upstream", body)


def test_never_holds_the_lock_between_polls(host: Host) -> None:
    _, b = host.update_published("a", "b", collect=False)
    flock = require_tool("flock")
    with resident(host, RARELY) as agent:
        ready = agent.next_message()
        assert ready["STATUS"].startswith("update-available"), ready
        held = [os.readlink(f"/proc/{agent.process.pid}/fd/{fd}")
                for fd in os.listdir(f"/proc/{agent.process.pid}/fd")]  # fmt: skip
        free = subprocess.run([flock, "--nonblock", str(host.state_dir / "lock"), "true"])
        # The actuator in parallel: it takes the lock at once and deploys.
        deployed = deploy(host, timeout=None)
        returncode, stderr = agent.stop()
    assert returncode == 0, stderr
    # Nothing but the standard streams, pipes and sockets (the kept-alive connection).
    files = [target for target in held if target.startswith("/") and target != "/dev/null"]
    assert files == [], held
    assert free.returncode == 0
    assert deployed.returncode == 0, deployed
    assert host.current() == b.path
    assert host.activations() == [("switch", b.path)]


def test_sighup_collects_now_and_sees_a_switch(host: Host) -> None:
    a, b = host.update_published("a", "b", collect=False)
    with resident(host, RARELY) as agent:
        ready = agent.next_message()
        host.deploy_by_hand(b, "switch")  # what nixos-rebuild (or the actuator) does
        after = agent.poll()
        returncode, stderr = agent.stop()
    assert returncode == 0, stderr
    assert ready["STATUS"].startswith(f"update-available; current {a.basename}")
    # b is upstream and now runs, but was not deployed by the agent: untracked.
    assert after["STATUS"].startswith(f"untracked; current {b.basename}"), after
    assert "SIGHUP: collecting now" in stderr.splitlines()
    assert host.snapshot()["current"] == b.path
    assert len(upstream_requests(host)) == 2


def test_sigterm_between_polls_exits_cleanly_with_a_complete_textfile(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    with resident(host, RARELY) as agent:
        agent.next_message()
        written = host.metrics()
        returncode, stderr = agent.stop()
    assert returncode == 0, stderr
    assert host.metrics() == written
    assert metric(written, "nixos_autodeploy_state", state="untracked") == 1
    assert leftovers(host) == []


def test_sigterm_aborts_a_hanging_fetch_at_once(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    arrived = threading.Event()

    def hang(request: RecordedRequest) -> Reply:
        arrived.set()
        return Reply(hang=True)

    with resident(host, RARELY) as agent:
        agent.next_message()
        written = host.metrics()
        host.server.route("/upstream", hang)
        agent.process.send_signal(signal.SIGHUP)
        assert arrived.wait(SAFETY_SECONDS)
        # The fetch's deadline (--timeout 30) is far off: only SIGTERM ends it now.
        returncode, stderr = agent.stop()
    assert returncode == 0, stderr
    assert "Traceback" not in stderr
    assert host.metrics() == written
    assert leftovers(host) == []


def leftovers(host: Host) -> list[str]:
    """Temporary files an interrupted atomic write would leave."""
    names = os.listdir(host.state_dir) + os.listdir(host.metrics_path.parent)
    return [name for name in names if name.startswith(".")]


# ---- --every and `every` --------------------------------------------------------------


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "collector.cli", "collect", "--root", str(tmp_path / "root")]
    argv += ["--url", "http://127.0.0.1:9/upstream", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=SAFETY_SECONDS)


@pytest.mark.parametrize(
    ("args", "config", "message"),
    [
        (["--every", "0"], None, "every must be a positive number of seconds, not 0.0"),
        (["--every", "-5"], None, "every must be a positive number of seconds"),
        (["--every", "nan"], None, "every must be a positive number of seconds, not nan"),
        (["--every", "inf"], None, "every must be a positive number of seconds, not inf"),
        ([], {"every": "60"}, "every has the wrong type"),
        ([], {"every": True}, "every has the wrong type"),
        ([], {"every": 0}, "every must be a positive number of seconds, not 0"),
    ],
)
def test_bad_every_is_one_error_line_and_changes_nothing(
    tmp_path: Path, args: list[str], config: dict[str, object] | None, message: str
) -> None:
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
        args = [*args, "--config", str(tmp_path / "config.json")]
    result = run_cli(tmp_path, *args)
    assert result.returncode == 1, result
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line, line
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize(
    ("args", "config", "every"),
    [
        ([], {}, None),
        (["--every", "30"], {}, 30.0),
        ([], {"every": 45}, 45.0),
        (["--every", "0.5"], {"every": 45}, 0.5),  # the flag wins
    ],
)
def test_every_from_flag_or_config_file(
    tmp_path: Path, args: list[str], config: dict[str, object], every: float | None
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    parsed = build_parser().parse_args(
        ["collect", *args, "--config", str(tmp_path / "config.json")]
    )
    assert settings_from(parsed).every == every


# ---- the notification protocol, on its own ----------------------------------------


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_sends_one_datagram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    # Relative to the test's directory: a socket path must be short (108 bytes).
    monkeypatch.chdir(tmp_path)
    name = f"@nixos-autodeploy-test-{os.getpid()}" if abstract else "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:] if abstract else name)
        sock.settimeout(SAFETY_SECONDS)
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert notify.notify("READY=1", "STATUS=two\nlines")
        assert sock.recv(4096) == b"READY=1\nSTATUS=two lines"


@pytest.mark.parametrize(
    ("env", "sent", "watchdog"),
    [
        ({}, False, False),
        ({"NOTIFY_SOCKET": "/nonexistent/notify"}, False, False),
        ({"WATCHDOG_USEC": "30000000"}, False, True),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, False, False),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, False, True),
        ({"WATCHDOG_USEC": "0"}, False, False),
        ({"WATCHDOG_USEC": "soon"}, False, False),
    ],
)
def test_notify_without_systemd(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], sent: bool, watchdog: bool
) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert notify.notify("READY=1") is sent
    assert notify.watchdog_enabled() is watchdog
