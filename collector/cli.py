"""The command line: `nixos-autodeploy collect|status|diff|log|deploy|fleet`. This dispatcher
is the one place that may import both packages; it imports the actuator only for `deploy`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__, progress
from .closure import compute, load_changes
from .config import COMMANDS, SYSTEM_NAMES, Settings, add_options, settings_from
from .errors import AutodeployError, ConfigError, StateError, UpstreamError
from .snapshot import load_snapshot
from .state import load_deployed, read_links
from .store import StorePath, resolve_link

if TYPE_CHECKING:
    from .collect import Then

log = logging.getLogger("nixos-autodeploy")


# What each subcommand does (the options each takes: OPTIONS in config.py).
_ABOUT = {
    "collect": "fetch and realise upstream, report the state",
    "status": "show the last collected state",
    "diff": "what changes between two systems",
    "log": "what the actuator decided and did, newest last",
    "deploy": "deploy upstream when the gate allows it",
    "fleet": "the fleet's hosts from Prometheus, worst first; --wait-serial: the promotion gate",
    "publish": "sign a release for the fleet (CI)",
    "verify": "check a signed release as a host would (CI)",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line. With `command`, the parser of that subcommand alone: all a run that
    starts with it uses (main), and each subcommand and option costs start-up time."""
    parser = argparse.ArgumentParser(
        prog="nixos-autodeploy",
        description="Keep this NixOS host on the system its CI published, safely.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if command is None else (command,):
        # No abbreviations: publish's --host is no prefix of collect's --host-name.
        add_options(commands.add_parser(name, help=_ABOUT[name], allow_abbrev=False), name)
    return parser


def _collect(settings: Settings) -> int:
    then: Then | None = None
    if settings.track:  # writing the deployed record is the actuator's
        from actuator.records import adopt_untracked

        then = adopt_untracked
    if settings.every is not None:
        from .release import trusted_keys
        from .resident import run

        trusted_keys(settings)  # a bad key stops it before the first poll

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


def _fleet(settings: Settings, args: argparse.Namespace) -> int:
    from . import fleet

    if args.wait_serial is not None:
        return fleet.wait_serial(
            settings,
            args.wait_serial,
            args.fraction,
            args.wait_timeout,
            args.interval,
            args.selector,
        )
    fleet.show(fleet.look(settings, args.selector), args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # Starting with a subcommand, nothing but its parser is used: the top level's help and
    # its list of subcommands only show for arguments that come before one.
    command = words[0] if words and words[0] in COMMANDS else None
    args = build_parser(command).parse_args(words)
    progress.QUIET = args.quiet
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO,
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
        if args.command == "fleet":
            return _fleet(settings, args)
        if args.command == "publish":
            from .publish import publish

            return publish(
                args.key_files or (),
                args.serial,
                args.serial_from,
                args.expires_in,
                args.rollout_start,
                args.rollout_duration,
                args.system,
                args.hosts or (),
                args.output,
            )
        if args.command == "verify":
            from . import release
            from .publish import verify

            keys = release.trusted_keys(settings)
            required = settings.signatures_required
            return verify(args.release_file, keys, required, settings.host_name)
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
