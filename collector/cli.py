"""The command line: `nixos-autodeploy collect|status|diff|log|deploy`. This dispatcher is the one
place that may import both packages; it imports the actuator only for `deploy`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__
from .closure import compute, load_changes
from .config import Settings, settings_from
from .errors import AutodeployError, ConfigError, StateError, UpstreamError
from .snapshot import load_snapshot
from .state import load_deployed, read_links
from .store import StorePath, resolve_link

if TYPE_CHECKING:
    from .collect import Then

log = logging.getLogger("nixos-autodeploy")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", metavar="DIR", help="manage the system mounted at DIR (/)")
    parser.add_argument("--state-dir", metavar="DIR", help="state directory")
    parser.add_argument(
        "--runtime-dir", metavar="DIR", help="keep upstream-system and deployed-system here (/run)"
    )
    parser.add_argument("--config", metavar="FILE", help="JSON or TOML config file")
    parser.add_argument("--debug", action="store_true", help="log more, show tracebacks")


def _upstream(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="URL that serves the upstream store path")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="total deadline (60)")
    parser.add_argument("--netrc-file", metavar="FILE", help="credentials for the URL's host")
    parser.add_argument("--bearer-token-file", metavar="FILE", help="send this bearer token")
    parser.add_argument(
        "--header",
        dest="headers",
        action="append",
        metavar="'NAME: VALUE'",
        help="extra request header (repeatable)",
    )
    parser.add_argument("--ca-file", metavar="FILE", help="CA bundle for https")
    parser.add_argument("--prometheus-path", metavar="FILE", help="node_exporter textfile")
    # The original tool's form: `nixos-autodeploy [OPTIONS] URL`.
    parser.add_argument("url_argument", nargs="?", metavar="URL", help="same as --url")


SYSTEM_NAMES = ("current", "booted", "deployed", "upstream", "profile")


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nixos-autodeploy",
        description="Keep this NixOS host on the system its CI published, safely.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("collect", help="fetch and realise upstream, report the state")
    _common(p)
    _upstream(p)
    p.add_argument(
        "--track",
        action="store_true",
        default=None,
        help="record what runs as deployed when it is upstream (hosts without the actuator)",
    )
    p.add_argument(
        "--every",
        type=float,
        metavar="SECONDS",
        help="stay resident and collect every SECONDS (SIGHUP: now; SIGTERM: stop)",
    )

    p = commands.add_parser("status", help="show the last collected state")
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = commands.add_parser("diff", help="what changes between two systems")
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument(
        "systems",
        nargs="*",
        metavar="FROM TO",
        help=f"{', '.join(SYSTEM_NAMES)} or a store path (current upstream)",
    )

    p = commands.add_parser("log", help="what the actuator decided and did, newest last")
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("-n", type=_positive, default=20, metavar="N", help="last N entries (20)")

    p = commands.add_parser("deploy", help="deploy upstream when the gate allows it")
    _common(p)
    _upstream(p)
    # The short flags and k-exec are the original tool's, kept so its extraArgs still work.
    p.add_argument("-s", "--switch-mode", choices=["switch", "boot", "smart"])
    p.add_argument("-r", "--reboot-mode", choices=["reboot", "kexec", "k-exec"])
    p.add_argument(
        "--reboot-window",
        dest="reboot_windows",
        action="append",
        metavar="'[DAYS ]HH:MM-HH:MM'",
        help="reboot or kexec only inside this local-time window (repeatable)",
    )
    p.add_argument(
        "--fleet-lock-url", metavar="URL", help="take a reboot slot from this FleetLock server"
    )
    p.add_argument("--fleet-lock-group", metavar="NAME", help="FleetLock reboot group (default)")
    p.add_argument("-f", "--force", action="store_true", help="deploy even if the host is dirty")
    p.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    p.add_argument(
        "--max-snapshot-age",
        type=float,
        metavar="SECONDS",
        help="collect first when the snapshot is older (3600)",
    )
    _health(p)
    return parser


def _health(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("health checks after a switch or a trial boot")
    for flag, dest, metavar, what in (
        ("--health-check", "health_commands", "'COMMAND'", "run with sh -c; exit 0 passes"),
        ("--health-url", "health_urls", "URL", "GET it; a 2xx passes"),
        ("--health-unit", "health_units", "UNIT", "passes when the unit is active"),
        ("--health-ignore-unit", "health_ignore_units", "UNIT", "failed unit to overlook"),
    ):
        group.add_argument(
            flag, dest=dest, action="append", metavar=metavar, help=what + " (repeatable)"
        )
    group.add_argument(
        "--health-timeout",
        type=float,
        metavar="SECONDS",
        help="retry the checks until they all pass or this deadline (300)",
    )
    group.add_argument(
        "--no-health-checks",
        dest="health_checks",
        action="store_false",
        default=None,
        help="no checks, and so no automatic rollback",
    )


def _collect(settings: Settings) -> int:
    then: Then | None = None
    if settings.track:  # writing the deployed record is the actuator's
        from actuator.records import adopt_untracked

        then = adopt_untracked
    if settings.every is not None:
        from .resident import run

        return run(settings, settings.every, then)
    from .collect import collect_locked  # requests and prometheus_client: not for `status`

    snapshot = collect_locked(settings, then=then)
    # A held lock is not a failure: the other run reports the same host.
    if snapshot is not None and snapshot.upstream.error:
        # Reported after snapshot and metrics are written, so the unit shows as failed.
        raise UpstreamError(snapshot.upstream.error)
    return 0


def _status(settings: Settings, as_json: bool) -> int:
    from .status import show  # rich is loaded only here

    snapshot = load_snapshot(settings.paths)
    if snapshot is None:
        raise StateError(
            f"no snapshot in {settings.paths.state_dir} yet: run `nixos-autodeploy collect`"
        )
    show(snapshot, as_json, load_changes(settings.paths))
    return 0


def _system(settings: Settings, name: str) -> StorePath:
    """A system by its name here (current, upstream, ...) or a store path (or a link to
    one, like ./result)."""
    paths = settings.paths
    if name in SYSTEM_NAMES:
        if name == "deployed":
            deployed = load_deployed(paths)
            found = deployed.path if deployed else None
        else:
            found = getattr(read_links(paths), name)
        if found is None:
            raise StateError(f"this host has no {name} system (yet)")
        return found
    resolved = resolve_link(name, paths.root) if os.path.islink(name) else None
    try:
        return resolved or StorePath.parse(name)
    except ValueError as e:
        raise ConfigError(
            f"{name[:80]!r} is neither {', '.join(SYSTEM_NAMES)} nor a store path: {e}"
        ) from None


def _diff(settings: Settings, systems: list[str], as_json: bool) -> int:
    from .status import show_diff  # rich is loaded only here

    if len(systems) not in (0, 2):
        raise ConfigError("diff takes no systems (current upstream) or two: FROM TO")
    source, target = (_system(settings, n) for n in systems or ("current", "upstream"))
    known = load_changes(settings.paths)
    # What the collector computed for this pair, else ask Nix now (diff.json is the
    # collector's: this command writes nothing).
    stored = [d for d in (known.upstream, known.hand) if d and d.pair == (source, target)]
    if stored and stored[0].error is None:
        show_diff(stored[0], as_json)
    else:
        show_diff(compute(source, target), as_json)
    return 0


def _log(settings: Settings, n: int, as_json: bool) -> int:
    from . import history
    from .status import show_log  # rich is loaded only here

    path = settings.paths.state(history.FILE)
    entries, skipped = history.read(path)
    for number in skipped:
        print(f"note: skipped line {number} of {path}: not a history entry", file=sys.stderr)
    if not entries and not as_json:
        print(f"no history in {path} yet: the actuator has not run", file=sys.stderr)
        return 0
    show_log(entries[-n:], as_json, time.time())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    try:
        settings = settings_from(args)
        if args.command == "collect":
            return _collect(settings)
        if args.command == "status":
            return _status(settings, args.json)
        if args.command == "diff":
            return _diff(settings, args.systems, args.json)
        if args.command == "log":
            return _log(settings, args.n, args.json)
        from actuator.deploy import deploy

        return deploy(settings)
    except (AutodeployError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
