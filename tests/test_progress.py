"""What an operator at a terminal sees while a system is realised and while health checks
run: the displays driven through a pseudo-terminal against a real realise from the test
cache and a real deploy; without a terminal (systemd, CI) the plain lines of before, none
of the displays' control sequences."""

from __future__ import annotations

import re

import pytest
from harness import Host, Package, SystemSpec
from harness.deploys import deploy, deploy_args, tracking

pytestmark = pytest.mark.nix

HIDE_CURSOR, SHOW_CURSOR = b"\x1b[?25l", b"\x1b[?25h"
COLOUR = re.compile(rb"\x1b\[[0-9;]*3[0-9][;m]")  # a foreground colour (SGR 30..39, 38;...)


def collect_args(host: Host, *extra: str) -> tuple[str, ...]:
    return ("collect", "--url", host.url, "--prometheus-path", str(host.metrics_path), *extra)


def published(host: Host) -> str:
    """A system of several paths the host has to fetch from the cache."""
    packages = tuple(Package(name, "1.0") for name in ("p", "q", "r"))
    system = host.build_one("a", packages=packages)
    host.install(host.build_one("old"))
    host.publish(system)
    assert not host.store_path_is_valid(system.path)
    return system.path


def test_realise_on_a_terminal_shows_progress_and_ends_cleanly(host: Host) -> None:
    path = published(host)
    code, output = host.on_a_terminal(*collect_args(host))
    assert code == 0, output
    assert host.upstream() == path
    text = output.decode()
    # The display was drawn, with the paths done of the total Nix announced ...
    assert HIDE_CURSOR in output, text
    figures = re.findall(r"(\d+)/(\d+) paths, [\d.]+ MiB of [\d.]+ MiB download", text)
    assert figures and int(figures[-1][1]) >= 4, text  # the system and its three packages
    assert {int(done) for done, _ in figures} > {0}, "the count moved on"
    # ... then taken away: the cursor back, and one line of what was fetched after it.
    assert output.rindex(SHOW_CURSOR) > output.rindex(HIDE_CURSOR), text
    summary = re.search(r"realised \S+: (\d+) paths fetched \([\d.]+ MiB download", text)
    assert summary and int(summary[1]) >= 1, text
    assert output.rindex(b"realised ") > output.rindex(SHOW_CURSOR), text
    # Nix's own progress lines are not passed through raw.
    assert "copying path" not in text


def test_realise_without_a_terminal_writes_the_plain_lines(host: Host) -> None:
    published(host)
    result = host.collect()
    assert result.returncode == 0, result
    assert "\x1b" not in result.stderr, result
    assert re.search(r"^nix-store: these \d+ paths will be fetched", result.stderr, re.M), result
    assert re.search(r"^nix-store: copying path '/", result.stderr, re.M), result
    assert "realised " not in result.stderr, "the display's summary is the terminal's"


def test_quiet_on_a_terminal_shows_no_display_and_no_nix_chatter(host: Host) -> None:
    path = published(host)
    code, output = host.on_a_terminal(*collect_args(host, "--quiet"))
    assert code == 0, output
    assert host.upstream() == path
    assert output == b"", "a collect that goes well says nothing with --quiet"


def test_no_color_keeps_the_display_without_colours(host: Host) -> None:
    published(host)
    code, output = host.on_a_terminal(*collect_args(host), env={"NO_COLOR": "1"})
    assert code == 0, output
    assert HIDE_CURSOR in output and b"realised " in output, output
    assert not COLOUR.search(output), output


def test_health_checks_on_a_terminal_show_the_round_and_the_pending_check(host: Host) -> None:
    packages = (Package("p", "1.0"), Package("q", "1.0"))
    systems = host.build(SystemSpec("old"), SystemSpec("new", packages=packages))
    tracking(host, systems["old"], systems["new"])
    args = deploy_args(host, "--health-check", "true")
    code, output = host.on_a_terminal("deploy", *args)
    assert code == 0, output
    assert host.current() == systems["new"].path
    text = output.decode()
    assert re.search(r"health: round 1, checking true \(\d+m \d\ds left\)", text), text
    # The last check of the round is drawn when the display ends, above it the log line.
    assert "health: all 2 checks passed (after 1 rounds)" in text  # upstream, then true
    assert "realised " in text, "the deploy's collect realised upstream with its display"
    assert output.rindex(SHOW_CURSOR) > output.rindex(HIDE_CURSOR), text


def test_health_checks_without_a_terminal_say_their_lines_only(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new"))
    tracking(host, systems["old"], systems["new"])
    result = deploy(host, "--health-check", "true")
    assert result.returncode == 0, result
    assert "\x1b" not in result.stderr and "\r" not in result.stderr, result
    assert "health: all 2 checks passed (after 1 rounds)" in result.stderr_lines, result
    assert "round 1" not in result.stderr, result
