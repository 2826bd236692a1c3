"""Trial boots: a new kernel is tried before it is trusted. Which kind a deploy gets, what
prepares it, and the mark that tells the run after a boot from a run in the same boot. The
transitions (boot, check, confirm, fail, reboot back) are the transaction's
(actuator/transaction.py); the reboot itself is the reboot room's (actuator/reboot.py).

kexec: the new system is loaded and kexec'd with the profile and the boot loader's default
left on the old system, and with `panic=` and `boot.panic_on_fail` on its command line, so
a kernel or a stage 1 that never reaches userspace resets into the old default.
oneshot (a reboot on a host that systemd-boot booted): the new system becomes a profile
generation with a boot entry, but the profile and the default go back to the old system;
`bootctl set-oneshot` boots the new entry once, so any reset after it boots the old default.
reboot (any other boot loader): the new system is made the default before a plain reboot.

A mark in /run (a tmpfs, empty after every boot) tells a run after the boot from a run
whose reboot never happened (killed before it, or the command returned and nothing went
down yet)."""

from __future__ import annotations

import contextlib
import logging
import os
from enum import StrEnum

from collector.config import Paths, RebootMode, Settings
from collector.errors import ActuatorError, AutodeployError
from collector.fsutil import atomic_write
from collector.history import Kind
from collector.process import run
from collector.state import Activation
from collector.store import StorePath

from . import commands, profile, reboot

log = logging.getLogger(__name__)

MARK = "/run/nixos-autodeploy/trial"


class TrialKind(StrEnum):
    KEXEC = "kexec"
    ONESHOT = "oneshot"
    REBOOT = "reboot"

    @property
    def one_time(self) -> bool:
        """Boots the new system once and leaves the boot loader's default on the old one."""
        return self is not TrialKind.REBOOT

    @property
    def how(self) -> reboot.How:
        return reboot.How(self.value)

    @property
    def event(self) -> Kind:
        return _EVENTS[self]


_EVENTS = {
    TrialKind.KEXEC: Kind.TRIAL_KEXEC,
    TrialKind.ONESHOT: Kind.TRIAL_ONESHOT,
    TrialKind.REBOOT: Kind.TRIAL_REBOOT,
}


def kind(settings: Settings, activation: Activation) -> TrialKind | None:
    """A boot-mode deploy that the agent reboots into is a trial."""
    if activation is not Activation.BOOT or settings.reboot_mode is None:
        return None
    if settings.reboot_mode is RebootMode.REBOOT and reboot.one_time_entries(settings.paths):
        return TrialKind.ONESHOT
    return TrialKind(settings.reboot_mode.value)


# NixOS adds this program to a system whose boot.initrd.secrets is set: the boot loader's
# install appends the secrets to the initrd it copies. A kexec loads the system's initrd
# from the store, without them.
INITRD_SECRETS = "append-initrd-secrets"


def check(paths: Paths, tried: TrialKind, system: StorePath) -> None:
    """Refuse a trial that cannot work on this host, before its window, its reboot slot
    and anything else: one line, nothing changed."""
    if tried is TrialKind.KEXEC and os.path.lexists(os.path.join(system.path, INITRD_SECRETS)):
        raise ActuatorError(
            f"{system.name} sets boot.initrd.secrets, which a kexec'd initrd lacks "
            f"({INITRD_SECRETS}): use --reboot-mode reboot"
        )
    if tried is TrialKind.ONESHOT:
        reboot.check_oneshot(paths)


def unload() -> None:
    """Forget a kernel a kexec trial loaded (an undone trial). Only a warning when it
    fails: the run after any boot into it refuses to adopt a system never confirmed."""
    try:
        run(commands.kexec_unload())
    except AutodeployError as e:
        log.warning("warning: could not unload the kernel loaded for the kexec: %s", e)


def oneshot_argvs(paths: Paths, system: StorePath, old: StorePath) -> list[list[str]]:
    """Before a oneshot reboot: system becomes a generation of the profile (so the boot
    loader gets an entry for it), the profile goes back to the generation it was at, and the
    old system installs the boot loader: every generation's entry, its own the default."""
    generation = profile.generation(paths)
    if generation is None:
        raise ActuatorError(f"{paths.profile} is not at a profile generation")
    return [
        profile.set_argv(paths, system),
        profile.switch_generation_argv(paths, generation),
        commands.switch(paths, old, Activation.BOOT),
    ]


def forget(paths: Paths, system: StorePath) -> None:
    """Rolling back a oneshot trial of system: the generation it added goes (before the
    boot loader is installed again, which then drops its entry, so failed trials never push
    the old system out of a configurationLimit), and so does a one-time entry still set."""
    current = profile.generation(paths)
    added = [n for n, p in profile.generations(paths).items() if p == system.path and n != current]
    if added:
        run(profile.delete_generations_argv(paths, added), stream_stderr=True)
    reboot.clear_oneshot()


def mark(paths: Paths, deploy_id: str) -> None:
    """This boot is the one in which deploy_id's reboot is issued."""
    atomic_write(paths.under_root(MARK), deploy_id + "\n")


def marked(paths: Paths, deploy_id: str) -> bool:
    try:
        with open(paths.under_root(MARK), encoding="utf-8") as f:
            return f.read().strip() == deploy_id
    except FileNotFoundError:
        return False


def unmark(paths: Paths) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.under_root(MARK))
