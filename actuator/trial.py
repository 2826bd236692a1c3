"""Trial boots: a new kernel is tried before it is trusted.

kexec: the new system is loaded and kexec'd with the profile and the boot loader's default
left on the old system, and with `panic=` and `boot.panic_on_fail` on its command line, so
a kernel or a stage 1 that never reaches userspace resets into the old default.
oneshot (a reboot on a host that systemd-boot booted): the new system becomes a profile
generation with a boot entry, but the profile and the default go back to the old system;
`bootctl set-oneshot` boots the new entry once, so any reset after it boots the old default.
reboot (any other boot loader): the new system is made the default before a plain reboot.

The run after the boot (the module starts the actuator once at boot; any run does it
first) finishes the trial: booted into the new system and its checks pass -> it becomes
the profile and the boot default (kexec, oneshot) and the deploy is done; its checks fail
-> the profile and the boot default go back and the machine reboots into them, once; the
machine came back on the old system -> a kexec or oneshot trial failed (recorded, the host
stays, no second reboot), a reboot was not taken by the boot loader (reported as pending,
as always).

A marker in /run (a tmpfs, empty after every boot) tells a run after the boot from a run
whose reboot never happened (killed before it, or the command returned and nothing went
down yet)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time

from collector import nix
from collector.config import Paths, RebootMode, Settings
from collector.fsutil import atomic_write
from collector.process import run
from collector.state import Activation, load_deployed, read_links, save_deployed
from collector.store import StorePath

from . import deploy, health, journal
from .journal import Journal, Phase

log = logging.getLogger(__name__)

MARKER = "/run/nixos-autodeploy/trial"
# The phases a trial's run after the boot takes over from (deploy.recover).
PHASES = frozenset({Phase.BOOTING, Phase.CHECKING, Phase.REBOOTING_BACK})
ONESHOT = "oneshot"
# Trials that boot the new system once and leave the boot loader's default on the old one.
ONE_TIME = frozenset({RebootMode.KEXEC.value, ONESHOT})
# systemd-boot's LoaderInfo EFI variable: set by systemd-boot when it booted this machine.
LOADER_INFO = "/sys/firmware/efi/efivars/LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"


def kind(settings: Settings, activation: Activation) -> str | None:
    """A boot-mode deploy that the agent reboots into is a trial."""
    if activation is not Activation.BOOT or settings.reboot_mode is None:
        return None
    if settings.reboot_mode is RebootMode.REBOOT and one_time_entries(settings.paths):
        return ONESHOT
    return settings.reboot_mode.value


def one_time_entries(paths: Paths) -> bool:
    """Whether a reboot can boot a system once: systemd-boot booted this machine (it keeps
    the one-time entry in an EFI variable), and the profile is at its newest generation (the
    new one then comes right after it, and a configurationLimit of 2 keeps both entries)."""
    try:
        with open(paths.under_root(LOADER_INFO), "rb") as f:
            info = f.read()[4:].decode("utf-16-le", "replace")  # after the attribute bits
    except OSError:
        return False
    current = _generation(paths)
    generations = _generations(paths)
    return "systemd-boot" in info and current is not None and current == max(generations)


def _generation(paths: Paths) -> int | None:
    """The number of the profile generation the system profile points at."""
    try:
        link = os.path.basename(os.readlink(paths.profile))
    except OSError:
        return None
    match = re.fullmatch(_generation_link(paths), link)
    return int(match.group(1)) if match else None


def _generation_link(paths: Paths) -> str:
    return re.escape(os.path.basename(paths.profile)) + r"-(\d+)-link"


def _generations(paths: Paths) -> dict[int, str]:
    """The profile's generations: number -> the store path its link points at."""
    directory = os.path.dirname(paths.profile)
    found: dict[int, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            match = re.fullmatch(_generation_link(paths), name)
            if match:
                with contextlib.suppress(OSError):
                    found[int(match.group(1))] = os.readlink(os.path.join(directory, name))
    return found


def oneshot_argvs(paths: Paths, system: StorePath, old: StorePath) -> list[list[str]]:
    """Before a oneshot reboot: system becomes a generation of the profile (so the boot
    loader gets an entry for it), the profile goes back to the generation it was at, and the
    old system installs the boot loader: every generation's entry, its own the default."""
    generation = _generation(paths)
    if generation is None:
        raise deploy.ActuatorError(f"{paths.profile} is not at a profile generation")
    return [
        ["nix-env", "--profile", paths.profile, "--set", system.path],
        ["nix-env", "--profile", paths.profile, "--switch-generation", str(generation)],
        deploy.switch_argv(paths, old, Activation.BOOT),
    ]


def _boot_once(paths: Paths, entry: Journal) -> None:
    """Add entry's system to the boot loader without making it the default, and tell
    systemd-boot to boot it on the next boot only."""
    old = read_links(paths).profile
    if old is None:
        raise deploy.ActuatorError(f"{paths.profile} is missing: no default to come back to")
    for argv in oneshot_argvs(paths, entry.path, old):
        run(argv, stream_stderr=True)
    entries = _listed(run(["bootctl", "list", "--json=short", "--no-pager"]).stdout)
    new = _entry_id(entries, entry.path)
    if new is None:
        raise deploy.ActuatorError(
            f"systemd-boot has no entry for {entry.path.name} (bootctl list)"
        )
    if _entry_id(entries, old) is None:
        # boot.loader.systemd-boot.configurationLimit = 1 keeps only the newest generation:
        # the default would point at nothing and the firmware would boot the untried one.
        raise deploy.ActuatorError(
            f"systemd-boot dropped the entry of {old.name} when {entry.path.name} was added: "
            "a one-time boot needs boot.loader.systemd-boot.configurationLimit >= 2"
        )
    run(["bootctl", "set-oneshot", new], stream_stderr=True)


def forget(paths: Paths, entry: Journal) -> None:
    """Rolling back a oneshot trial: the generation it added goes (before the boot loader is
    installed again, which then drops its entry, so failed trials never push the old
    system out of a configurationLimit), and so does a one-time entry still set."""
    current = _generation(paths)
    added = [n for n, p in _generations(paths).items() if p == entry.path.path and n != current]
    if added:
        argv = ["nix-env", "--profile", paths.profile, "--delete-generations"]
        run([*argv, *map(str, sorted(added))], stream_stderr=True)
    cleared = run(["bootctl", "set-oneshot", ""], check=False)
    if cleared.returncode != 0:
        log.warning("could not clear systemd-boot's one-time entry: %s", cleared.stderr.strip())


def _entry_id(entries: list[object], system: StorePath) -> str | None:
    """The id of a boot loader entry that boots system (NixOS writes `init=<system>/init`
    into its entries' options; any entry of system boots the same kernel, initrd and init)."""
    init = f"init={system.path}/init"
    for item in entries:
        if isinstance(item, dict) and init in str(item.get("options", "")).split():
            return str(item["id"])
    return None


def _listed(listing: str) -> list[object]:
    """The entries `bootctl list --json=short` printed: a JSON array, or one JSON object
    per line (systemd 252, Debian 12's)."""
    try:
        entries = json.loads(listing)
    except ValueError:
        try:
            return [json.loads(line) for line in listing.splitlines() if line.strip()]
        except ValueError:
            raise deploy.ActuatorError("bootctl list --json=short printed no JSON") from None
    return entries if isinstance(entries, list) else [entries]


def _marker(paths: Paths) -> str:
    return paths.under_root(MARKER)


def _marked(paths: Paths, entry: Journal) -> bool:
    """Whether this boot is the one in which entry's reboot was issued."""
    try:
        with open(_marker(paths), encoding="utf-8") as f:
            return f.read().strip() == entry.id
    except FileNotFoundError:
        return False


def _mark(paths: Paths, entry: Journal) -> None:
    atomic_write(_marker(paths), entry.id + "\n")


def boot(settings: Settings, entry: Journal) -> None:
    """Journal the boot, then reboot or kexec into entry's system. A command that fails
    changed nothing the next run could not undo: the trial is undone and the error raised."""
    paths = settings.paths
    *prepare, go = deploy.reboot_argvs(settings, entry.path)
    # Marked first: a run that finds `booting` and this boot's mark knows no boot happened.
    _mark(paths, entry)
    oneshot = entry.trial == ONESHOT
    started = entry.activation_started or oneshot  # a oneshot installs the boot loader
    entry = journal.advance(paths, entry, Phase.BOOTING, activation_started=started)
    try:
        if oneshot:
            _boot_once(paths, entry)
        for argv in prepare:  # kexec --load
            run(argv, stream_stderr=True)
        record = load_deployed(paths)
        if record is not None:
            save_deployed(paths, dataclasses.replace(record, reboot_issued_at=time.time()))
        deploy.append_history(paths, {"event": f"trial-{entry.trial}", "path": entry.path.path})
        log.info("trial boot (%s) into %s", entry.trial, entry.path.name)
        run(go, stream_stderr=True)
    except BaseException:
        _undo(paths, entry)
        raise


def _undo(paths: Paths, entry: Journal) -> None:
    """Nothing was booted: as if the deploy had not started (the gate tries it again).
    Rolled back first (journaled at once): a run cut short here finishes the rollback
    instead of taking the trial for one that was booted."""
    deploy.roll_back(paths, entry)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_marker(paths))


def finish(settings: Settings, entry: Journal) -> None:
    """The run after a trial boot (entry's phase is booting, checking or rebooting-back)."""
    paths = settings.paths
    if entry.phase is Phase.REBOOTING_BACK:
        reboot_back(settings, entry)
        return
    if _marked(paths, entry):
        if entry.trial in ONE_TIME:
            log.info("the %s into %s did not happen; undoing it", entry.trial, entry.path.name)
            _undo(paths, entry)
        else:  # the reboot is still to come: the deploy is done as far as the agent goes
            deploy.complete(paths, entry)
        return
    current = read_links(paths).current
    if current != entry.path:
        _came_back(settings, entry)
        return
    entry = journal.advance(paths, entry, Phase.CHECKING)
    result = health.run_checks(settings)
    deploy.record_health(paths, entry.path, result)
    if result.ok:
        if entry.trial in ONE_TIME:
            # Only now does the new system become what the next boot loads.
            nix.set_profile(paths.profile, entry.path)
            run(deploy.switch_argv(paths, entry.path, Activation.BOOT), stream_stderr=True)
        deploy.complete(paths, entry)
        deploy.append_history(paths, {"event": "trial-confirmed", "path": entry.path.path})
        log.info("trial boot of %s confirmed: %s", entry.path.name, result.summary)
        return
    message = f"{entry.path.name} failed its health checks after its trial boot: {result.summary}"
    error = deploy.fail(paths, entry, message, blocks_retry=True)
    entry = journal.load(paths) or entry
    if entry.phase is Phase.ROLLED_BACK:
        reboot_back(settings, entry)
    raise error


def _came_back(settings: Settings, entry: Journal) -> None:
    paths = settings.paths
    current = read_links(paths).current
    name = current.name if current else "an unknown system"
    record = load_deployed(paths)
    issued = record is not None and record.path == entry.path and record.reboot_issued_at
    if entry.trial in ONE_TIME and not issued:
        # The machine went down (power loss, someone's reboot) before the agent issued
        # the kexec or reboot: the new system was never tried.
        log.info("the %s into %s never happened; undoing it", entry.trial, entry.path.name)
        _undo(paths, entry)
        return
    if entry.trial in ONE_TIME:
        # The boot loader's default is the old system: the kernel or stage 1 panicked
        # (panic=, boot.panic_on_fail) or hung and the machine was reset, or (checking)
        # the new system went down during its checks. The failure is recorded; no second
        # reboot.
        message = (
            f"{entry.path.name} went down during its checks after its trial boot: "
            f"the host came back on {name}"
            if entry.phase is Phase.CHECKING
            else f"{entry.path.name} did not come up on its trial boot: "
            f"the host came back on {name}"
        )
        raise deploy.fail(paths, entry, message, blocks_retry=True)
    # The boot loader did not take the new default (someone picked another entry): as
    # always, reported as a pending reboot and not rebooted again.
    log.info("rebooted into %s, not %s; not rebooting again", name, entry.path.name)
    deploy.complete(paths, entry)


def reboot_back(settings: Settings, entry: Journal) -> None:
    """The one reboot after a failed trial, into what ran before (the boot loader's default
    again), while the failed system still runs. Journaled first: a run after it finds the
    old system running and only closes the journal; a run that finds the reboot not done
    (the failed system runs, or this boot's marker says the command was not followed by a
    reboot) issues it."""
    paths = settings.paths
    if read_links(paths).current != entry.path and not _marked(paths, entry):
        if entry.phase is not Phase.ROLLED_BACK:
            journal.advance(paths, entry, Phase.ROLLED_BACK)
        return
    entry = journal.advance(paths, entry, Phase.REBOOTING_BACK)
    _mark(paths, entry)
    deploy.append_history(paths, {"event": "rollback-reboot", "path": entry.path.path})
    log.info("rebooting back from %s", entry.path.name)
    run(["systemctl", "reboot"], stream_stderr=True)
    journal.advance(paths, entry, Phase.ROLLED_BACK)
