"""`nixos-autodeploy fleet`: the hosts the fleet's Prometheus knows, from their own metrics,
worst first; and `fleet --wait-serial N`, the promotion gate CI waits on between canaries
and the rest. Read only: two instant queries per look (the nixos_autodeploy_ series the
table shows, of the hosts the selector picks, and `up` for those whose scrape fails)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import prometheus
from .config import Settings
from .errors import AutodeployError

P = "nixos_autodeploy_"
# A host whose collector has not reported for this long is stale (the stale alert's bound:
# three of the timer collector's 5-minute periods).
STALE_AFTER = 900.0
MAX_ANSWER = 256 * 1024 * 1024  # what a fleet of 100,000 hosts answers, with room
# Worst first: what needs an operator before what merely waits.
RANK = {
    "stale": 0,
    "failing": 1,
    "halted": 2,
    "dirty": 3,
    "unknown": 3,
    "update-available": 4,
    "pending-reboot": 5,
    "untracked": 6,
    "up-to-date": 7,
}


class FleetError(AutodeployError):
    """The promotion gate failed: a rollback on the serial, the halt query, the deadline."""


@dataclass(frozen=True)
class Host:
    """One host as its metrics describe it."""

    instance: str
    job: str
    state: str = "unknown"
    current: str = ""
    upstream: str = ""
    serial: int | None = None
    pending: int | None = None  # packages deploying upstream changes
    last_deploy_at: float | None = None
    last_deploy_ok: bool | None = None
    health_ok: bool | None = None
    rollbacks: int = 0
    last_rollback_ok: bool | None = None
    last_rollback_serial: int | None = None  # of the release the last rollback left
    reboot: str | None = None  # why a required reboot waits
    halted: bool = False
    turn_at: float | None = None
    collected_at: float | None = None
    stale: str | None = None  # why its report cannot be trusted

    @property
    def key(self) -> tuple[str, str]:
        return self.job, self.instance

    @property
    def failing(self) -> bool:
        return self.last_deploy_ok is False or self.health_ok is False

    @property
    def condition(self) -> str:
        """The one word the table sorts and counts by."""
        if self.stale:
            return "stale"
        if self.failing:
            return "failing"
        if self.halted:
            return "halted"
        return self.state


@dataclass(frozen=True)
class Fleet:
    at: float  # Prometheus' time of the answer
    hosts: tuple[Host, ...]

    def counts(self, attribute: Callable[[Host], object]) -> dict[str, int]:
        counted = Counter("-" if (v := attribute(h)) is None else str(v) for h in self.hosts)
        return dict(sorted(counted.items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "counts": {
                "state": self.counts(lambda h: h.state),
                "serial": self.counts(lambda h: h.serial),
            },
            "stale": [h.instance for h in self.hosts if h.stale],
            "hosts": [asdict(h) | {"condition": h.condition} for h in self.hosts],
        }


def _matchers(selector: str) -> str:
    """The inside of a `{...}` selector, to be joined with a name matcher."""
    return selector.strip()[1:-1].strip().rstrip(",") if selector else ""


def look(settings: Settings, selector: str = "") -> Fleet:
    """The fleet now, worst first."""
    inner = _matchers(selector)
    series = prometheus.query(settings, series_query(inner), limit=MAX_ANSWER)
    up = prometheus.query(settings, f"up{{{inner}}}", limit=MAX_ANSWER)
    return assemble(series, up)


def series_query(inner: str) -> str:
    """Only what the table shows: of the one-of-several families (state, reboot reason) the
    series that is 1, and the pending changes summed, so a 10,000-host fleet's answer stays
    a few megabytes (benchmarks/fleet_prometheus.py)."""

    def selected(names: Iterable[str]) -> str:
        matchers = [f'__name__=~"{P}({"|".join(sorted(names))})"', inner]
        return "{" + ",".join(m for m in matchers if m) + "}"

    # `or` matches label sets without their names: the sum gets a label of its own.
    pending = f"sum by (instance, job) ({selected(['pending_changes'])})"
    pending = f'label_replace({pending}, "kind", "all", "", "")'
    return (
        f"{selected([*_NUMBERS, 'info'])}"
        f" or {selected(['state', 'reboot_pending_reason'])} == 1"
        f' or label_replace({pending}, "__name__", "{P}pending_changes", "", "")'
    )


# The series read as one number each, and the Host field each fills.
_NUMBERS: dict[str, tuple[str, Callable[[float], object]]] = {
    "release_serial": ("serial", int),
    "last_deploy_timestamp_seconds": ("last_deploy_at", float),
    "last_deploy_success": ("last_deploy_ok", lambda v: v == 1),
    "last_health_check_success": ("health_ok", lambda v: v == 1),
    "rollbacks_total": ("rollbacks", int),
    "last_rollback_success": ("last_rollback_ok", lambda v: v == 1),
    "last_rollback_serial": ("last_rollback_serial", int),
    "rollout_halted": ("halted", lambda v: v == 1),
    "rollout_turn_timestamp_seconds": ("turn_at", float),
    "last_collect_timestamp_seconds": ("collected_at", float),
}


def assemble(series: Iterable[prometheus.Sample], up: Iterable[prometheus.Sample]) -> Fleet:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    at = 0.0
    for sample in series:
        at = max(at, sample.timestamp)
        labels = dict(sample.labels)
        key = (labels.get("job", ""), labels.get("instance", ""))
        _read(found.setdefault(key, {}), labels, sample.value)
    for sample in up:
        at = max(at, sample.timestamp)
        if sample.value == 0:
            # Its series may be gone already (Prometheus drops them soon after a failed scrape).
            labels = dict(sample.labels)
            key = (labels.get("job", ""), labels.get("instance", ""))
            found.setdefault(key, {})["stale"] = "scrape failing"
    hosts = []
    for (job, instance), fields in found.items():
        host = Host(instance, job, **fields)
        silent = host.collected_at is None or at - host.collected_at > STALE_AFTER
        if host.stale is None and silent:
            host = replace(host, stale="collector not reporting")
        hosts.append(host)
    hosts.sort(key=lambda h: (RANK.get(h.condition, 3), -h.rollbacks, h.key))
    return Fleet(at, tuple(hosts))


def _read(fields: dict[str, Any], labels: dict[str, str], value: float) -> None:
    """Into a host's fields, what one of its series says."""
    name = labels.get("__name__", "").removeprefix(P)
    if math.isnan(value):
        return
    if name in _NUMBERS:
        field_name, convert = _NUMBERS[name]
        fields[field_name] = convert(value)
    elif name == "state" and value == 1:
        fields["state"] = labels.get("state", "unknown")
    elif name == "info":
        fields["current"] = labels.get("current_generation", "")
        fields["upstream"] = labels.get("upstream_generation", "")
    elif name == "pending_changes":
        fields["pending"] = int(value)
    elif name == "reboot_pending_reason" and value == 1:
        fields["reboot"] = labels.get("reason")


# ---- the view --------------------------------------------------------------------------


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _yes_no(value: bool | None, good: str = "ok", bad: str = "failed") -> str:
    return "-" if value is None else f"[green]{good}[/green]" if value else f"[red]{bad}[/red]"


def _rollbacks(host: Host) -> str:
    """How many, and the serial the last one left (a rollback of the newest serial is the
    one that matters to a rollout)."""
    said = str(host.rollbacks)
    if host.last_rollback_serial is not None:
        said += f" (serial {host.last_rollback_serial})"
    return said + ("" if host.last_rollback_ok is not False else " [red](failed)[/red]")


def _rollout(host: Host, at: float) -> str:
    if host.halted:
        return "[red]halted[/red]"
    if host.turn_at is not None and host.turn_at > at and host.state == "update-available":
        return f"turn in {_age(host.turn_at - at)}"
    return ""


def show(fleet: Fleet, as_json: bool) -> None:
    if as_json:
        print(json.dumps(fleet.to_json(), indent=2, sort_keys=True))
        return
    from rich.console import Console  # rich is loaded only here
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    states = ", ".join(f"{n} {s}" for s, n in fleet.counts(lambda h: h.state).items())
    serials = ", ".join(f"{s}: {n}" for s, n in fleet.counts(lambda h: h.serial).items())
    stale = sum(1 for h in fleet.hosts if h.stale)
    console.print(f"{len(fleet.hosts)} hosts: {states or 'none'}", highlight=False)
    console.print(f"serials: {serials or 'none'}; stale: {stale}", highlight=False)
    table = Table(title="nixos-autodeploy fleet")
    for column in ("instance", "state", "running", "upstream", "serial", "pending"):
        table.add_column(column, overflow="fold")
    for column in ("last deploy", "health", "rollbacks", "reboot", "rollout"):
        table.add_column(column)
    for h in fleet.hosts:
        state = f"[red]stale[/red] ({h.stale}), was {h.state}" if h.stale else h.state
        deployed = "-"
        if h.last_deploy_at is not None:
            deployed = f"{_yes_no(h.last_deploy_ok)} {_age(fleet.at - h.last_deploy_at)} ago"
        table.add_row(
            escape(h.instance),
            state,
            escape(h.current),
            escape(h.upstream),
            "-" if h.serial is None else str(h.serial),
            "-" if h.pending is None else str(h.pending),
            deployed,
            _yes_no(h.health_ok),
            _rollbacks(h),
            escape(h.reboot or ""),
            _rollout(h, fleet.at),
        )
    console.print(table)


# ---- the promotion gate ----------------------------------------------------------------


@dataclass
class Progress:
    """What a wait has seen: each host's rollbacks at its first look, the last line said."""

    serial: int
    fraction: float
    rollbacks: dict[tuple[str, str], int] = field(default_factory=dict)
    said: str = ""

    def done(self, fleet: Fleet) -> tuple[int, int]:
        """(hosts on the serial and up to date, hosts needed)."""
        on = sum(1 for h in fleet.hosts if self.arrived(h))
        return on, max(1, math.ceil(self.fraction * len(fleet.hosts) - 1e-9))

    def arrived(self, host: Host) -> bool:
        return host.serial == self.serial and host.state == "up-to-date" and not host.stale

    def rolled_back(self, fleet: Fleet) -> list[Host]:
        """Hosts on the serial whose rollbacks rose since the wait first saw them, or whose
        last rollback failed."""
        found = []
        for h in fleet.hosts:
            before = self.rollbacks.setdefault(h.key, h.rollbacks)
            if h.serial == self.serial and (h.rollbacks > before or h.last_rollback_ok is False):
                found.append(h)
        return found


def wait_serial(
    settings: Settings,
    serial: int,
    fraction: float,
    timeout: float,
    interval: float,
    selector: str = "",
) -> int:
    """Wait until `fraction` of the selected hosts run `serial` up to date: 0. A rollback on
    it, the halt query firing, or the deadline: FleetError (exit 1)."""
    progress = Progress(serial, fraction)
    deadline = time.monotonic() + timeout
    bar = _Bar() if sys.stdout.isatty() else None
    try:
        while True:
            fleet = look(settings, selector)
            back = progress.rolled_back(fleet)
            if back:
                names = ", ".join(h.instance for h in back)
                raise FleetError(f"serial {serial} was rolled back on {names}")
            if settings.halt_query:
                _halt(settings, settings.halt_query)
            on, needed = progress.done(fleet)
            line = f"serial {serial}: {on} of {len(fleet.hosts)} hosts up to date, {needed} needed"
            if bar is not None:
                bar.update(on, len(fleet.hosts), line)
            elif line != progress.said:
                print(line, flush=True)
            progress.said = line
            if fleet.hosts and on >= needed:
                return 0
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FleetError(f"timed out after {_age(timeout)}: {line}")
            time.sleep(min(interval, remaining))
    finally:
        if bar is not None:
            bar.stop()


def _halt(settings: Settings, query: str) -> None:
    fired = prometheus.firing(prometheus.query(settings, query))
    if fired:
        labels = ",".join(f'{k}="{v}"' for k, v in fired[0].labels if k != "__name__")
        raise FleetError(f"the halt query fired: {{{labels}}} {fired[0].value:g}")


class _Bar:
    """A progress bar on a terminal."""

    def __init__(self) -> None:
        from rich.progress import Progress as RichProgress

        self.progress = RichProgress()
        self.task = self.progress.add_task("waiting", total=None)
        self.progress.start()

    def update(self, on: int, hosts: int, line: str) -> None:
        self.progress.update(self.task, completed=on, total=hosts or None, description=line)

    def stop(self) -> None:
        self.progress.stop()
