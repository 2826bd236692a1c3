"""The system commands the actuator runs, as argv: systemctl, systemd-run, bootctl, kexec.
Built only here (Nix's are in collector/nix.py and actuator/profile.py), so what a run
does and what `--dry-run` prints are the same lists."""

from __future__ import annotations

import os

from collector.config import Paths
from collector.state import Activation
from collector.store import StorePath

SWITCH_UNIT = "nixos-autodeploy-switch-to-configuration"
PANIC_SECONDS = 30  # the kernel's own reset after a panic (kexec)


def switch(paths: Paths, system: StorePath, activation: Activation) -> list[str]:
    """system's switch-to-configuration; under systemd in a unit of its own, so that a
    restart of our unit (by this very activation) cannot kill it."""
    argv = [os.path.join(system.path, "bin/switch-to-configuration"), activation.value]
    if not paths.systemd_running:
        return argv
    return [
        "systemd-run",
        f"--unit={SWITCH_UNIT}",
        "--wait",
        "--pipe",
        "--collect",
        "--quiet",
        "--service-type=exec",
        "--no-ask-password",
        "--",
        *argv,
    ]


def unit_active(unit: str) -> list[str]:
    return ["systemctl", "is-active", "--quiet", unit]


def unit_state(unit: str) -> list[str]:
    """Prints the unit's state: the operator's unit health checks."""
    return ["systemctl", "is-active", unit]


def system_running() -> list[str]:
    """Waits for the boot to finish, then prints systemd's verdict."""
    return ["systemctl", "is-system-running", "--wait"]


def failed_units() -> list[str]:
    return ["systemctl", "list-units", "--state=failed", "--plain", "--no-legend", "--no-pager"]


def reboot() -> list[str]:
    return ["systemctl", "reboot"]


def kexec_load(system: StorePath) -> list[str]:
    """Load system's kernel for a kexec. panic=: a kernel that never reaches userspace
    resets into the boot loader's default, which a trial boot has left on the old system;
    boot.panic_on_fail: so does a NixOS stage 1 that fails (no root, no init) instead of
    waiting at its prompt for a key."""
    with open(os.path.join(system.path, "kernel-params"), encoding="utf-8") as f:
        params = f.read().strip()
    return [
        "kexec",
        "--load",
        os.path.join(system.path, "kernel"),
        f"--initrd={os.path.join(system.path, 'initrd')}",
        f"--append={params} init={os.path.join(system.path, 'init')} "
        f"panic={PANIC_SECONDS} boot.panic_on_fail",
    ]


def kexec_unload() -> list[str]:
    """Forget a kernel loaded for a kexec that is not to happen."""
    return ["kexec", "--unload"]


def kexec() -> list[str]:
    """Boot the loaded kernel, with systemd stopping everything first."""
    return ["systemctl", "kexec"]


def bootctl_list() -> list[str]:
    return ["bootctl", "list", "--json=short", "--no-pager"]


def bootctl_set_oneshot(entry: str) -> list[str]:
    """Boot entry once, at the next boot only; "" clears it."""
    return ["bootctl", "set-oneshot", entry]
