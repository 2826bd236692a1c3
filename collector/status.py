"""The operator's view of the snapshot: a rich table, or JSON for scripts. Only `status`
imports this module, so the collector's frequent runs never load rich."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from .reboot import WaitReason, pending_reason
from .snapshot import Snapshot
from .state import State
from .store import path_of

STATE_STYLE = {
    State.UP_TO_DATE: "green",
    State.UPDATE_AVAILABLE: "yellow",
    State.UNTRACKED: "cyan",
    State.DIRTY: "bold red",
    State.PENDING_REBOOT: "magenta",
    State.UNKNOWN: "dim",
}


def as_json(s: Snapshot) -> dict[str, Any]:
    return {
        "state": s.state.value,
        "dirty": s.dirty,
        "reboot_required": s.reboot_required,
        "current": path_of(s.links.current),
        "booted": path_of(s.links.booted),
        "profile": path_of(s.links.profile),
        "deployed": path_of(s.deployed.path) if s.deployed else None,
        "deployed_mode": s.deployed.mode if s.deployed else None,
        "upstream": path_of(s.links.upstream),
        "upstream_url": s.upstream.url,
        "upstream_error": s.upstream.error,
        "collected_at": s.collected_at,
        "upstream_fetched_at": s.upstream.fetched_at,
        "last_deploy": s.last_deploy,
        "reboot_wait": _reboot_wait(s),
        "fleet_lock_held": s.reboot.slot is not None,
    }


def _reboot_wait(s: Snapshot) -> dict[str, Any] | None:
    """Why a required reboot has not happened, in the actuator's words when it said."""
    reason = pending_reason(s.reboot_required, s.reboot)
    if reason is None:
        return None
    waiting = s.reboot.waiting
    if waiting is None:
        message = "left to the operator: the agent does not reboot for this"
        return {"reason": reason.value, "message": message, "since": None}
    return {"reason": reason.value, "message": waiting.message, "since": waiting.since}


def _age(seconds: float) -> str:
    """Two units are enough for an operator: 1d 2h, 1h 1m, 1m 15s, 5s."""
    s = max(0, int(seconds))
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s % 60}s"
    return f"{s}s"


def render(s: Snapshot, console: Console) -> None:
    table = Table(title="nixos-autodeploy", show_lines=False)
    table.add_column("system")
    table.add_column("generation")
    table.add_column("store path", overflow="fold")
    current = s.links.current
    rows = [
        ("current", current),
        ("booted", s.links.booted),
        ("profile", s.links.profile),
        ("deployed", s.deployed.path if s.deployed else None),
        ("upstream", s.links.upstream),
    ]
    for label, path in rows:
        if path is None:
            table.add_row(label, "[dim]unknown[/dim]", "")
            continue
        differs = label != "current" and path != current
        name = path.name.split("-", 1)[1] if "-" in path.name else path.name
        mark = " [yellow]≠ current[/yellow]" if differs else ""
        table.add_row(label, name + mark, path.path)
    console.print(table)
    style = STATE_STYLE[s.state]
    facts = [
        f"state: [{style}]{s.state.value}[/{style}]",
        f"dirty: {'[bold red]yes[/bold red]' if s.dirty else 'no'}",
        f"reboot required: {'[magenta]yes[/magenta]' if s.reboot_required else 'no'}",
        f"last collect: {_age(time.time() - s.collected_at)} ago",
    ]
    if s.upstream.fetched_at is not None:
        facts.append(f"upstream fetched: {_age(time.time() - s.upstream.fetched_at)} ago")
    if s.upstream.error:
        facts.append(f"upstream error: [red]{s.upstream.error}[/red]")
    wait = _reboot_wait(s)
    if wait is not None:
        since = f" (for {_age(time.time() - wait['since'])})" if wait["since"] else ""
        style = "dim" if wait["reason"] == WaitReason.OPERATOR else "magenta"
        facts.append(f"reboot waits: [{style}]{wait['message']}[/{style}]{since}")
    if s.reboot.slot is not None:
        slot = s.reboot.slot
        facts.append(
            f"fleet lock: holding a reboot slot in group {slot.group} at {slot.url} "
            f"for {_age(time.time() - slot.at)}"
        )
    if s.last_deploy:
        d = s.last_deploy
        result = "[green]success[/green]" if d["result"] == "success" else "[red]failure[/red]"
        facts.append(
            f"last deploy: {result} ({d.get('mode')}) {_age(time.time() - d['at'])} ago"
            + (f": {d['message']}" if d.get("message") else "")
        )
    for fact in facts:
        console.print(fact, highlight=False)


def show(s: Snapshot, as_json_output: bool) -> None:
    if as_json_output:
        print(json.dumps(as_json(s), indent=2, sort_keys=True))
    else:
        render(s, Console())
