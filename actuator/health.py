"""Is the host well after a switch or a trial boot? systemd's verdict, upstream still
reachable, and the operator's own checks, retried until they all pass or the deadline.

Every check runs through the agent's two doors (collector.process, collector.http);
a check that hangs is killed at the deadline, one that floods is cut to its last lines."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from collector import http, progress, release, upstream
from collector.config import Settings
from collector.errors import AutodeployError
from collector.process import Result, run_bounded
from collector.records import CheckResult, HealthResult

from . import commands

log = logging.getLogger(__name__)

RETRY_INTERVAL = 5.0  # seconds between rounds
OUTPUT_LINES = 10  # kept per check
LINE_MAX = 300  # characters kept per line
MIN_CHECK_TIME = 1.0  # even past the deadline, the last round's checks get this long
# Absolute: a NixOS unit's PATH has no shell (package.nix puts its closure's shell here).
SHELL = "/bin/sh"


class Kind(StrEnum):
    SYSTEMD = "systemd"
    UPSTREAM = "upstream"
    UNIT = "unit"
    URL = "url"
    COMMAND = "command"


@dataclass(frozen=True)
class Check:
    kind: Kind
    target: str = ""  # the unit, URL or command

    @property
    def name(self) -> str:
        """How the operator refers to it: the command, URL (without secrets) or unit."""
        if self.kind is Kind.URL:
            return http.shown(self.target)
        return self.target or self.kind.value


def checks_for(settings: Settings) -> tuple[Check, ...]:
    """systemd first: it waits for the boot to finish, which the others may need."""
    health = settings.health
    if not health.enabled:
        return ()
    built_in = [Check(Kind.SYSTEMD)] if settings.paths.systemd_running else []
    if settings.url:
        built_in.append(Check(Kind.UPSTREAM))
    return (
        *built_in,
        *(Check(Kind.UNIT, unit) for unit in health.units),
        *(Check(Kind.URL, url) for url in health.urls),
        *(Check(Kind.COMMAND, command) for command in health.commands),
    )


def last_lines(text: str) -> tuple[str, ...]:
    lines = [line.rstrip()[:LINE_MAX] for line in text.splitlines() if line.strip()]
    return tuple(lines[-OUTPUT_LINES:])


def _command_result(check: Check, result: Result, timeout: float) -> CheckResult:
    output = last_lines(result.stdout)
    if result.timed_out:
        return CheckResult(check.name, False, (*output, f"killed after {timeout:.0f}s"))
    if result.returncode != 0:
        return CheckResult(check.name, False, (*output, f"exit {result.returncode}"))
    return CheckResult(check.name, True, output)


# The agent's own units: one left failed by an earlier run (upstream down at boot, a trial
# rolled back) says nothing of the new system, and must not roll back every later deploy.
OWN_UNITS = ("nixos-autodeploy*",)


def _failed_units(timeout: float) -> list[str]:
    listed = run_bounded(commands.failed_units(), timeout=timeout)
    # "unit load active sub description"; older systemctl prefixes a bullet.
    return [line.lstrip("●* ").split()[0] for line in listed.stdout.splitlines() if line.strip()]


def _ignored(unit: str, patterns: tuple[str, ...]) -> bool:
    return any(
        fnmatch.fnmatchcase(unit, p) or fnmatch.fnmatchcase(unit, p + ".service") for p in patterns
    )


def _systemd(settings: Settings, check: Check, timeout: float) -> CheckResult:
    """`is-system-running --wait` returns once the boot has finished: running passes,
    degraded passes only when every failed unit is ignored, anything else fails."""
    result = run_bounded(commands.system_running(), timeout=timeout)
    said = last_lines(result.stdout)
    state = said[-1].strip() if said else "unknown"
    if result.timed_out:
        return CheckResult(check.name, False, (f"systemd still {state} after {timeout:.0f}s",))
    if state == "running":
        return CheckResult(check.name, True, ("running",))
    if state != "degraded":
        return CheckResult(check.name, False, (f"systemd is {state}",))
    failed = _failed_units(timeout)
    left = [u for u in failed if not _ignored(u, (*settings.health.ignore_units, *OWN_UNITS))]
    if left:
        return CheckResult(check.name, False, (f"failed units: {', '.join(left)}",))
    return CheckResult(check.name, True, (f"degraded; ignored: {', '.join(failed)}",))


def _upstream(settings: Settings, check: Check, timeout: float) -> CheckResult:
    """The agent's own fetch, with its options: a config that breaks networking, DNS or
    the proxy strands the host unless it is rolled back."""
    bounded = dataclasses.replace(settings, timeout=min(settings.timeout, timeout))
    fetched = upstream.fetch(bounded, None)
    assert fetched.body is not None  # asked without validators
    if release.looks_like_envelope(fetched.body):  # reachable is all this check asks
        return CheckResult(check.name, True, ("upstream answered a release",))
    path = upstream.parse_body(fetched.body, fetched.shown_url)
    return CheckResult(check.name, True, (f"upstream answered {path}",))


def _url(settings: Settings, check: Check, timeout: float) -> CheckResult:
    probed = http.probe(settings, check.target, timeout)
    said = (*last_lines(probed.body), f"HTTP {probed.status} {probed.reason}".strip())
    return CheckResult(check.name, 200 <= probed.status < 300, said)


def _unit(settings: Settings, check: Check, timeout: float) -> CheckResult:
    result = run_bounded(commands.unit_state(check.target), timeout=timeout)
    return _command_result(check, result, timeout)


def _command(settings: Settings, check: Check, timeout: float) -> CheckResult:
    result = run_bounded([SHELL, "-c", check.target], timeout=timeout)
    return _command_result(check, result, timeout)


_RUN: dict[Kind, Callable[[Settings, Check, float], CheckResult]] = {
    Kind.SYSTEMD: _systemd,
    Kind.UPSTREAM: _upstream,
    Kind.UNIT: _unit,
    Kind.URL: _url,
    Kind.COMMAND: _command,
}


def run_check(settings: Settings, check: Check, timeout: float) -> CheckResult:
    try:
        return _RUN[check.kind](settings, check, timeout)
    except AutodeployError as e:  # no answer, a redirect loop, a command not found
        return CheckResult(check.name, False, last_lines(str(e)) or ("failed",))


def run_checks(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> HealthResult:
    """Rounds of all checks, RETRY_INTERVAL apart, until one round passes entirely or the
    next would start past settings.health.timeout; the last round is the result."""
    checks = checks_for(settings)
    deadline = clock() + settings.health.timeout
    attempt = 0
    with progress.checks() as shown:
        while True:
            attempt += 1
            results = []
            for c in checks:
                shown.checking(c.name, attempt, deadline - clock())
                results.append(run_check(settings, c, max(deadline - clock(), MIN_CHECK_TIME)))
            health = HealthResult.of(tuple(results), attempt, time.time())
            if health.ok or clock() + RETRY_INTERVAL >= deadline:
                log.info("health: %s (after %d rounds)", health.summary, attempt)
                return health
            log.info("health: %s; retrying in %.0fs", health.summary, RETRY_INTERVAL)
            shown.waiting(RETRY_INTERVAL, attempt, deadline - clock())
            sleep(RETRY_INTERVAL)
