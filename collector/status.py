"""The operator's views: the snapshot (`status`), the difference between two systems
(`diff`) and the actuator's history (`log`), as rich tables or JSON for scripts. Only these
commands import this module, so the collector's frequent runs never load rich."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .closure import Change, Changes, Diff
from .closure import Kind as ChangeKind
from .history import Event, Kind, describe
from .reboot import WaitReason, pending_reason
from .release import utc
from .snapshot import Snapshot
from .state import State
from .store import path_of, store_dir

STATE_STYLE = {
    State.UP_TO_DATE: "green",
    State.UPDATE_AVAILABLE: "yellow",
    State.UNTRACKED: "cyan",
    State.DIRTY: "bold red",
    State.PENDING_REBOOT: "magenta",
    State.UNKNOWN: "dim",
}


KIND_STYLE = {
    ChangeKind.ADDED: "green",
    ChangeKind.REMOVED: "red",
    ChangeKind.UPGRADED: "cyan",
    ChangeKind.DOWNGRADED: "yellow",
    ChangeKind.CHANGED: "dim",
}
# How the summary names each kind, in its order: "rebuilt" is what a same-version change is.
SUMMARY_WORDS = {
    ChangeKind.UPGRADED: "upgraded",
    ChangeKind.DOWNGRADED: "downgraded",
    ChangeKind.ADDED: "added",
    ChangeKind.REMOVED: "removed",
    ChangeKind.CHANGED: "rebuilt",
}
HAND_LISTED = 5  # changes named in the dirty summary; `diff` lists them all


def current_changes(s: Snapshot, changes: Changes) -> Changes:
    """The differences diff.json holds for the systems the snapshot saw, and no others."""
    deployed = s.deployed.path if s.deployed else None
    upstream = changes.upstream
    hand = changes.hand
    return Changes(
        upstream=upstream
        if upstream and upstream.pair == (s.links.current, s.links.upstream)
        else None,
        hand=hand if s.dirty and hand and hand.pair == (deployed, s.links.current) else None,
    )


def as_json(s: Snapshot, changes: Changes | None = None) -> dict[str, Any]:
    changes = current_changes(s, changes or Changes())
    return {
        "changes": changes.upstream.to_json() if changes.upstream else None,
        "hand_changes": changes.hand.to_json() if changes.hand else None,
        "state": s.state.value,
        "dirty": s.dirty,
        "dirty_reason": s.dirty_reason.value if s.dirty_reason else None,
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
        "last_deploy": s.last_deploy.to_json() if s.last_deploy else None,
        "last_health": s.last_health.to_json() if s.last_health else None,
        "last_rollback": s.last_rollback.to_json() if s.last_rollback else None,
        "reboot_wait": _reboot_wait(s),
        "fleet_lock_held": s.reboot.slot is not None,
        "rollout": _rollout(s),
        "release": _release(s, time.time()),
    }


def _rollout(s: Snapshot) -> dict[str, Any] | None:
    r = s.rollout
    if r is None:
        return None
    return {
        "wariness": r.wariness,
        "turn_at": r.turn_at,
        "halted": r.halted,
        "reason": r.reason,
        "checked_at": r.checked_at,
    }


def _rollout_facts(s: Snapshot) -> list[str]:
    r = s.rollout
    if r is None:
        return []
    if r.halted:
        return [f"rollout: [red]halted[/red]: {escape(r.reason)}"]  # labels hold brackets
    if r.waiting and r.turn_at is not None and r.wariness is not None:
        return [f"rollout: this host's turn at {_clock(r.turn_at)}, wariness {r.wariness:.2f}"]
    return []


def _clock(at: float) -> str:
    """Local HH:MM, with the date when it is not within the next day."""
    shown = "%H:%M" if 0 <= at - time.time() < 86400 else "%Y-%m-%d %H:%M"
    return time.strftime(shown, time.localtime(at))


def verdict(s: Snapshot, now: float) -> str | None:
    """What the host made of upstream's release: rejected (the last answer; the accepted
    one stays), expired (accepted, not to be deployed), verified or unverified; None for a
    bare store path."""
    accepted = s.upstream.release
    if s.upstream.rejected is not None:
        return "rejected"
    if accepted is None:
        return None
    if accepted.expired(now):
        return "expired"
    return "verified" if accepted.verified else "unverified"


def _release(s: Snapshot, now: float) -> dict[str, Any] | None:
    judged = verdict(s, now)
    if judged is None:
        return None
    accepted = s.upstream.release
    return {
        "verdict": judged,
        "rejected": s.upstream.rejected,
        "serial": accepted.serial if accepted else None,
        "issued": accepted.issued if accepted else None,
        "expires": accepted.expires if accepted else None,
        "signers": list(accepted.signers) if accepted else [],
        "host": accepted.host if accepted else None,
        "floor_reset_at": s.upstream.floor_reset_at,
    }


def _release_facts(s: Snapshot, now: float) -> list[str]:
    shown = _release(s, now)
    if shown is None:
        return []
    style = {"verified": "green", "unverified": "yellow"}.get(shown["verdict"], "red")
    what = f"[{style}]{shown['verdict']}[/{style}]"
    if shown["rejected"]:
        what += f" ({shown['rejected']}; the last accepted release stays)"
    facts = [f"release: {what}"]
    if shown["serial"] is not None:
        signers = ", ".join(shown["signers"]) or "none"
        facts.append(
            f"release serial {shown['serial']}: issued {utc(shown['issued'])}, "
            f"expires {utc(shown['expires'])}, signed by {signers}"
        )
    if shown["verdict"] == "expired":
        facts.append("release expired: [red]not deployed until a newer one is published[/red]")
    if shown["floor_reset_at"] is not None:
        facts.append(
            f"release serial floor: [red]reset {utc(shown['floor_reset_at'])}[/red] "
            "(the state dir was wiped; older releases were acceptable once)"
        )
    return facts


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


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def versions(vs: tuple[str, ...]) -> str:
    """Versions as a reader wants them; a path without a version shows as `-`."""
    return ", ".join(v or "-" for v in vs) if vs else "none"


def change_text(c: Change) -> str:
    """`nginx 1.26.1 → 1.27.0`, `fresh 0.1 (added)`, `etc (rebuilt)`."""
    if c.kind in (ChangeKind.UPGRADED, ChangeKind.DOWNGRADED):
        return f"{c.name} {versions(c.before)} → {versions(c.after)}"
    shown = c.before if c.kind is ChangeKind.REMOVED else c.after
    word = SUMMARY_WORDS[c.kind]
    return f"{c.name} {versions(shown)} ({word})" if shown != ("",) else f"{c.name} ({word})"


def summary(d: Diff, what: str) -> str:
    """'upstream changes 37 packages (12 upgraded, ...), closure +12.4 MiB; kernel ...'"""
    if d.error:
        return f"{what}: unknown ({d.error})"
    counts = d.counts()
    total = sum(counts.values())
    if total == 0:
        return f"{what} nothing"
    kinds = ", ".join(f"{counts[k]} {word}" for k, word in SUMMARY_WORDS.items() if counts[k])
    delta = d.size_after - d.size_before
    text = f"{what} {total} package{'s' if total != 1 else ''} ({kinds}), "
    text += f"closure {'+' if delta >= 0 else '-'}{size(abs(delta))}"
    if d.boot_files:
        kernel = d.kernel_before, d.kernel_after
        if kernel[0] and kernel[1] and kernel[0] != kernel[1]:
            text += f"; kernel {kernel[0]} → {kernel[1]}: reboot needed"
        else:
            text += f"; {', '.join(d.boot_files)} differ: reboot needed"
    return text


def hand_summary(d: Diff) -> str:
    if d.error:
        return summary(d, "hand deploy changes")
    listed = ", ".join(change_text(c) for c in d.changes[:HAND_LISTED])
    more = ", …" if len(d.changes) > HAND_LISTED else ""
    n = len(d.changes)
    return f"hand deploy changed {n} package{'s' if n != 1 else ''} against the deployed system" + (
        f": {listed}{more}" if listed else ""
    )


def _when(at: float) -> str:
    return (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at)) + f" ({_age(time.time() - at)} ago)"
    )


def _health_facts(s: Snapshot) -> list[str]:
    facts = []
    if s.last_health:
        h = s.last_health
        result = "[green]passed[/green]" if h.ok else "[red]failed[/red]"
        facts.append(
            f"last health check: {result} {_age(time.time() - h.at)} ago: {escape(h.summary)}"
        )
    if s.last_rollback:
        r = s.last_rollback
        moved = f"rolled back from {r.source} at {_when(r.at)}"
        if not r.ok:
            moved = f"[bold red]rolling back failed[/bold red] ({moved})"
        facts.append(f"{moved}: {escape(r.reason)}")
    return facts


def render(s: Snapshot, console: Console, changes: Changes | None = None) -> None:
    table = Table(title="nixos-autodeploy", show_lines=False)
    # A long path folds, but not inside its hash: the generation gives way first, so that
    # the store directory and the whole hash fit on one line whenever the terminal is that
    # wide (the room left after the label column, 8, and the table's lines, 10).
    hash_end = len(store_dir()) + len("/") + 32 + len("-")
    table.add_column("system")
    table.add_column(
        "generation", overflow="fold", max_width=max(console.width - 18 - hash_end, 10)
    )
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
        f"dirty: [bold red]yes ({s.dirty_reason})[/bold red]" if s.dirty else "dirty: no",
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
    facts += _rollout_facts(s)
    if s.last_deploy:
        d = s.last_deploy
        result = "[green]success[/green]" if d.ok else "[red]failure[/red]"
        facts.append(
            f"last deploy: {result} ({d.mode}) {_age(time.time() - d.at)} ago"
            + (f": {d.message}" if d.message else "")
        )
    facts += _health_facts(s)
    facts += _release_facts(s, time.time())
    for fact in facts:
        console.print(fact, highlight=False)
    shown = current_changes(s, changes or Changes())
    if shown.upstream and s.links.current != s.links.upstream:
        console.print(summary(shown.upstream, "upstream changes"), highlight=False, markup=False)
    if shown.hand:
        console.print(hand_summary(shown.hand), highlight=False, markup=False)


def show(s: Snapshot, as_json_output: bool, changes: Changes | None = None) -> None:
    if as_json_output:
        print(json.dumps(as_json(s, changes), indent=2, sort_keys=True))
    else:
        render(s, Console(), changes)


# ---- diff ---------------------------------------------------------------------------------


def show_diff(d: Diff, as_json_output: bool) -> None:
    if as_json_output:
        print(json.dumps(d.to_json(), indent=2, sort_keys=True))
        return
    console = Console()
    if not d.changes and not d.error:  # an empty table says less than these words
        console.print(
            f"no changes: {d.source.name} → {d.target.name}", highlight=False, markup=False
        )
        if d.size_before != d.size_after:
            closure = f"closure: {size(d.size_before)} → {size(d.size_after)}"
            console.print(closure, highlight=False, markup=False)
        return
    table = Table(title=f"{d.source.name} → {d.target.name}")
    table.add_column("name", overflow="fold")
    table.add_column("before", overflow="fold")
    table.add_column("after", overflow="fold")
    table.add_column("kind")
    for c in d.changes:
        style = KIND_STYLE[c.kind]
        table.add_row(
            c.name, versions(c.before), versions(c.after), f"[{style}]{c.kind.value}[/{style}]"
        )
    console.print(table)
    console.print(summary(d, "changes"), highlight=False, markup=False)
    console.print(
        f"closure: {size(d.size_before)} → {size(d.size_after)}", highlight=False, markup=False
    )


# ---- log ----------------------------------------------------------------------------------


def _event_style(event: Event) -> str:
    if event.failed:
        return "red"
    if isinstance(event.kind, Kind) and (event.kind.reboots or event.kind is Kind.TRIAL_CONFIRMED):
        return "magenta"
    if event.kind is Kind.ROLLED_BACK:
        return "yellow"
    return "green" if event.result == "success" else ""


def show_log(events: list[Event], as_json_output: bool, now: float) -> None:
    if as_json_output:
        print(json.dumps([e.to_json() for e in events], indent=2, sort_keys=True))
        return
    console = Console()
    table = Table(title="nixos-autodeploy history")
    table.add_column("time")
    table.add_column("ago", justify="right")
    table.add_column("event")
    table.add_column("what", overflow="fold")
    for event in events:
        style = _event_style(event)
        kind = escape(str(event.kind))
        table.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.at)),
            _age(now - event.at),
            f"[{style}]{kind}[/{style}]" if style else kind,
            escape(describe(event)),
        )
    console.print(table)
