"""The health checks (actuator/health.py) with real processes and a real HTTP server on
127.0.0.1. Only `systemctl` is a script (it would talk to this machine's systemd); the
clock and the pause between rounds are injected so no test waits for the retry interval."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import Reply, TestServer

from actuator import health
from collector.cli import build_parser, main
from collector.config import HealthSettings, Paths, Settings, settings_from
from collector.errors import ConfigError, ProcessError
from collector.process import OUTPUT_KEEP, run_bounded
from collector.records import CheckResult, HealthResult

STORE_PATH = "/nix/store/" + "a" * 32 + "-nixos-system-test"


@dataclass
class FakeClock:
    """time.monotonic and time.sleep for run_checks: sleeping moves the clock on."""

    now: float = 1000.0
    slept: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def checked(settings: Settings) -> HealthResult:
    """run_checks on a fake clock: failing checks retry until the deadline without waiting
    (a check's own process still gets the real remaining time as its limit)."""
    clock = FakeClock()
    return health.run_checks(settings, clock=clock, sleep=clock.sleep)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root" / "run").mkdir(parents=True)
    return tmp_path / "root"


def settings_for(
    root: Path, url: str | None = None, timeout: float = 12.0, **checks: tuple[str, ...]
) -> Settings:
    return Settings(
        paths=Paths(root=str(root), state_dir=str(root / "state")),
        url=url,
        timeout=10.0,
        health=HealthSettings(timeout=timeout, **checks),  # type: ignore[arg-type]
    )


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A `systemctl` first on PATH that runs the shell snippet in the returned file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    reply = tmp_path / "systemctl-reply.sh"
    reply.write_text("exit 0\n")
    script = bin_dir / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/systemctl.log\n. {reply}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    yield reply


# ---- the bounded runner --------------------------------------------------------------


def test_run_bounded_kills_a_hang_and_everything_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    result = run_bounded(
        ["sh", "-c", f"sleep 600 & echo $! > {pid_file}; echo started; wait"], timeout=1
    )
    assert result.timed_out
    assert result.stdout.strip() == "started"
    child = int(pid_file.read_text())
    try:
        pidfd = os.pidfd_open(child)
    except ProcessLookupError:
        return  # gone already
    # Readable once the child has ended; a live `sleep 600` would never make it so.
    try:
        assert select.select([pidfd], [], [], 30)[0] == [pidfd], "the check's child survived"
    finally:
        os.close(pidfd)


def test_run_bounded_keeps_only_the_end_of_a_flood() -> None:
    flood = f"{sys.executable} -c \"import sys; sys.stdout.write('flood\\n' * 4_000_000)\""
    result = run_bounded(["sh", "-c", f"{flood}; echo the end"], timeout=60)
    assert not result.timed_out and result.returncode == 0
    assert len(result.stdout.encode()) <= OUTPUT_KEEP
    lines = result.stdout.splitlines()
    assert lines[-1] == "the end" and set(lines[1:-1]) == {"flood"}
    assert len(lines) > 1000


def test_run_bounded_reports_exit_status_and_both_streams() -> None:
    result = run_bounded(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert (result.returncode, result.timed_out) == (3, False)
    assert result.stdout.split() == ["out", "err"]


def test_run_bounded_returns_when_a_background_child_keeps_the_output_open() -> None:
    result = run_bounded(["sh", "-c", "sleep 30 & echo done"], timeout=20)
    assert (result.returncode, result.timed_out, result.stdout.strip()) == (0, False, "done")


def test_run_bounded_missing_command_is_a_process_error() -> None:
    with pytest.raises(ProcessError, match="exit 127"):
        run_bounded(["/nonexistent/check"], timeout=5)


# ---- operator commands --------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "ok", "last_line"),
    [
        ("echo fine", True, "fine"),
        ("echo 'db down' >&2; exit 2", False, "exit 2"),
        ("exit 0", True, None),
        (f"{sys.executable} -c 'print(1/0)'", False, "exit 1"),
    ],
)
def test_command_check(root: Path, command: str, ok: bool, last_line: str | None) -> None:
    result = checked(settings_for(root, commands=(command,)))
    assert result.ok is ok
    (check,) = result.checks
    assert check.name == command
    assert (check.output[-1] if check.output else None) == last_line
    if not ok:
        assert result.summary == f"check '{command}' failed: {last_line}"


def test_failing_output_is_kept_as_its_last_lines(root: Path) -> None:
    clock = FakeClock()
    command = "awk 'BEGIN { for (i = 1; i <= 100000; i++) print \"line \" i; exit 1 }'"
    result = health.run_checks(
        settings_for(root, timeout=1, commands=(command,)), clock=clock, sleep=clock.sleep
    )
    (check,) = result.checks
    assert not check.ok
    assert check.output == (*(f"line {i}" for i in range(99991, 100001)), "exit 1")


def test_a_hanging_check_is_killed_at_the_deadline(root: Path) -> None:
    clock = FakeClock()
    # One round: the deadline is 1s, so no retry; the process really runs for 1s.
    result = health.run_checks(
        settings_for(root, timeout=1, commands=("echo waiting; sleep 600",)),
        clock=clock,
        sleep=clock.sleep,
    )
    (check,) = result.checks
    assert not result.ok and result.attempts == 1
    assert check.output == ("waiting", "killed after 1s")
    assert clock.slept == []


def test_a_check_that_passes_late_within_the_deadline(root: Path, tmp_path: Path) -> None:
    counter = tmp_path / "tries"
    command = f"echo x >> {counter}; [ $(wc -l < {counter}) -ge 3 ]"
    clock = FakeClock()
    result = health.run_checks(
        settings_for(root, timeout=60, commands=(command,)), clock=clock, sleep=clock.sleep
    )
    assert result.ok and result.attempts == 3
    assert clock.slept == [health.RETRY_INTERVAL] * 2


def test_checks_that_never_pass_stop_at_the_deadline(root: Path) -> None:
    clock = FakeClock()
    result = health.run_checks(
        settings_for(root, timeout=22, commands=("exit 1", "true")), clock=clock, sleep=clock.sleep
    )
    # Rounds at 0, 5, 10, 15, 20 s; a sixth would start at 25 >= 22.
    assert not result.ok and result.attempts == 5
    assert [c.ok for c in result.checks] == [False, True]
    assert result.summary == "check 'exit 1' failed: exit 1"


def test_no_health_checks_means_no_checks(root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (root / "run/systemd/system").mkdir(parents=True)
    settings = settings_for(root, url="http://127.0.0.1:9/x", commands=(f"touch {marker}",))
    settings = dataclasses.replace(
        settings, health=dataclasses.replace(settings.health, enabled=False)
    )
    assert health.checks_for(settings) == ()
    result = checked(settings)
    assert result.ok and result.checks == () and not marker.exists()


# ---- URLs and upstream, over real HTTP ----------------------------------------------


@pytest.mark.parametrize(
    ("reply", "ok", "said"),
    [
        (Reply(body=b"ok\n"), True, ("ok", "HTTP 200 OK")),
        (Reply(status=204), True, ("HTTP 204 No Content",)),
        (
            Reply(status=503, body=b"database unreachable\n"),
            False,
            ("database unreachable", "HTTP 503 Service Unavailable"),
        ),
        (Reply(status=404), False, ("HTTP 404 Not Found",)),
        (
            Reply(status=302, headers=[("Location", "/health")]),
            False,
            ("{url}: more than 5 redirects",),
        ),
        (Reply(status=302, headers=[("Location", "/ok")]), True, ("fine", "HTTP 200 OK")),
        (Reply(endless=True), True, ("x" * health.LINE_MAX, "HTTP 200 OK")),
    ],
)
def test_url_check(
    root: Path, test_server: TestServer, reply: Reply, ok: bool, said: tuple[str, ...]
) -> None:
    test_server.route("/health", reply)
    test_server.route("/ok", Reply(body=b"fine"))
    url = test_server.url("/health")
    said = tuple(line.format(url=url) for line in said)
    result = checked(settings_for(root, timeout=1, urls=(url,)))
    (check,) = result.checks
    assert (check.name, check.ok) == (url, ok)
    assert check.output[-len(said) :] == said[-len(check.output) :]
    if not ok:
        assert result.summary == f"check '{url}' failed: {said[-1]}"


def test_url_check_that_hangs_fails_at_the_deadline(root: Path, test_server: TestServer) -> None:
    test_server.route("/health", Reply(hang=True))
    url = test_server.url("/health")
    result = checked(settings_for(root, timeout=1, urls=(url,)))
    assert result.summary == f"check '{url}' failed: {url} did not answer within 1s"


def test_url_check_secrets_stay_out_of_the_result(root: Path, test_server: TestServer) -> None:
    test_server.route("/health", Reply(status=500))
    url = test_server.url("/health", host="user:hunter2@127.0.0.1") + "?token=hunter2"
    result = checked(settings_for(root, timeout=1, urls=(url,)))
    assert not result.ok
    assert "hunter2" not in repr(result)


def test_upstream_still_reachable(root: Path, test_server: TestServer) -> None:
    test_server.publish_body(f"{STORE_PATH}\n".encode())
    settings = settings_for(root, url=test_server.url("/upstream"), timeout=1)
    result = checked(settings)
    assert result.ok
    assert result.checks == (CheckResult("upstream", True, (f"upstream answered {STORE_PATH}",)),)


def test_upstream_unreachable_fails(root: Path, test_server: TestServer) -> None:
    settings = settings_for(root, url=test_server.url("/upstream"), timeout=1)
    test_server.stop()
    result = checked(settings)
    assert not result.ok
    assert result.summary.startswith("check 'upstream' failed: upstream http://127.0.0.1:")
    assert "connection failed" in result.summary


# ---- systemd's verdict and units -------------------------------------------------------

DEGRADED = """
case "$1" in
  is-system-running) echo degraded; exit 1 ;;
  list-units) printf 'bad.service loaded failed failed Bad\\n'
              printf 'flaky@1.service loaded failed failed F\\n' ;;
esac
"""
# Left failed by an earlier run of the agent: not the new system's fault.
OURS_FAILED = """
case "$1" in
  is-system-running) echo degraded; exit 1 ;;
  list-units) printf 'nixos-autodeploy-boot.service loaded failed failed B\\n' ;;
esac
"""


@pytest.mark.parametrize(
    ("reply", "ignored", "ok", "said"),
    [
        (OURS_FAILED, (), True, "degraded; ignored: nixos-autodeploy-boot.service"),
        ("echo running", (), True, "running"),
        (DEGRADED, (), False, "failed units: bad.service, flaky@1.service"),
        (DEGRADED, ("bad", "flaky@*"), True, "degraded; ignored: bad.service, flaky@1.service"),
        (DEGRADED, ("bad.service",), False, "failed units: flaky@1.service"),
        ("echo maintenance; exit 1", (), False, "systemd is maintenance"),
        ("echo starting; exec sleep 600", (), False, "systemd still starting after 1s"),
    ],
)
def test_systemd_verdict(
    root: Path, systemctl: Path, reply: str, ignored: tuple[str, ...], ok: bool, said: str
) -> None:
    (root / "run/systemd/system").mkdir(parents=True)
    systemctl.write_text(reply)
    result = checked(settings_for(root, timeout=1, ignore_units=ignored))
    assert result.checks == (CheckResult("systemd", ok, (said,)),)


def test_systemd_verdict_only_where_systemd_runs(
    root: Path, systemctl: Path, tmp_path: Path
) -> None:
    result = checked(settings_for(root, timeout=1))
    assert result.checks == () and result.ok
    assert not (tmp_path / "systemctl.log").exists()


@pytest.mark.parametrize(
    ("reply", "ok", "said"),
    [
        ("echo active", True, ("active",)),
        ("echo inactive; exit 3", False, ("inactive", "exit 3")),
    ],
)
def test_unit_check(
    root: Path, systemctl: Path, tmp_path: Path, reply: str, ok: bool, said: tuple[str, ...]
) -> None:
    systemctl.write_text(reply)
    result = checked(settings_for(root, timeout=1, units=("nginx.service",)))
    assert result.checks == (CheckResult("nginx.service", ok, said),)
    assert (tmp_path / "systemctl.log").read_text() == "is-active nginx.service\n"


def test_result_json_round_trip_fields(root: Path) -> None:
    result = checked(settings_for(root, commands=("echo hi",)))
    data = result.to_json()
    assert data["ok"] is True and data["attempts"] == 1
    assert data["summary"] == "1 check passed"
    assert data["checks"] == [{"name": "echo hi", "ok": True, "output": ["hi"]}]


# ---- options: flags, config file, bad input -------------------------------------------


def parsed(tmp_path: Path, *flags: str, file: dict[str, object] | None = None) -> HealthSettings:
    argv = ["deploy", "--state-dir", str(tmp_path / "state"), *flags]
    if file is not None:
        config = tmp_path / "config.json"
        config.write_text(json.dumps(file))
        argv += ["--config", str(config)]
    return settings_from(build_parser().parse_args(argv)).health


@pytest.mark.parametrize(
    ("flags", "file", "expected"),
    [
        ((), None, HealthSettings()),
        (
            ("--health-check", "true", "--health-check", "curl -f x", "--health-unit", "a"),
            None,
            HealthSettings(commands=("true", "curl -f x"), units=("a",)),
        ),
        (
            ("--health-url", "http://127.0.0.1/h", "--health-ignore-unit", "x*"),
            {"health_timeout": 30},
            HealthSettings(urls=("http://127.0.0.1/h",), ignore_units=("x*",), timeout=30.0),
        ),
        (
            ("--health-timeout", "9"),
            {"health_timeout": 30, "health_commands": ["file"], "health_units": ["u"]},
            HealthSettings(commands=("file",), units=("u",), timeout=9.0),
        ),
        (
            ("--health-check", "flag"),
            {"health_commands": ["file"], "health_ignore_units": ["i"], "health_urls": []},
            HealthSettings(commands=("flag",), ignore_units=("i",)),
        ),
        (("--no-health-checks",), {"health_checks": True}, HealthSettings(enabled=False)),
        ((), {"health_checks": False}, HealthSettings(enabled=False)),
    ],
)
def test_health_options_from_flags_and_the_config_file(
    tmp_path: Path,
    flags: tuple[str, ...],
    file: dict[str, object] | None,
    expected: HealthSettings,
) -> None:
    assert parsed(tmp_path, *flags, file=file) == expected


@pytest.mark.parametrize(
    ("flags", "file", "message"),
    [
        (("--health-timeout", "0"), None, "health timeout must be positive"),
        (("--health-url", "ftp://x/y"), None, "health URL 'ftp://x/y' is not an http"),
        (("--health-url", "127.0.0.1/health"), None, "is not an http or https URL"),
        (("--health-check", " "), None, "health commands must be a list of non-empty strings"),
        ((), {"health_units": "nginx"}, "health_units has the wrong type"),
        ((), {"health_urls": [1]}, "health URLs must be a list of non-empty strings"),
        ((), {"health_checks": "no"}, "health_checks has the wrong type"),
        ((), {"health_check": ["true"]}, "unknown key 'health_check'"),
    ],
)
def test_bad_health_options_are_one_error_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: tuple[str, ...],
    file: dict[str, object] | None,
    message: str,
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parsed(tmp_path, *flags, file=file)
    argv = ["deploy", "--state-dir", str(tmp_path / "state"), "--url", "http://127.0.0.1:9/"]
    if file is not None:
        argv += ["--config", str(tmp_path / "config.json")]
    assert main([*argv, *flags]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "state").exists()
