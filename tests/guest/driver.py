"""The guest side of tests/test_guest.py: runs the scenarios inside the Debian guest.

Started once per boot by autodeploy-guest-driver.service from the host's 9p share.
Its progress (the phase) is kept on the guest's disk, so after the agent reboots or
kexecs the guest it carries on where it left off. It reports facts, not verdicts,
as JSON lines on the second serial port; the host asserts on them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import termios
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

SHARE = Path("/mnt/share")
STATE = Path("/var/lib/autodeploy-guest")
PHASE_FILE = STATE / "phase"
WWW = STATE / "www"
INSTALL_DIR = Path("/opt/nixos-autodeploy")
AGENT_STATE = Path("/var/lib/nixos-autodeploy")
PROMETHEUS_FILE = Path("/var/lib/prometheus-node-exporter/nixos-autodeploy.prom")
PROFILE = Path("/nix/var/nix/profiles/system")
AGENT_UNIT = "nixos-autodeploy-deploy.service"
COLLECTOR_UNIT = "nixos-autodeploy-collector.service"
ACTIVATED_UNIT = "nixos-autodeploy-activated.service"
# As the NixOS module computes it: the interval, the fetch deadline, 30 min to realise.
POLL_INTERVAL = 3600
WATCHDOG_SEC = POLL_INTERVAL + 60 + 1800
HTTP_PORT = 8080
UPSTREAM_URL = f"http://127.0.0.1:{HTTP_PORT}/upstream"
# The harness' FleetLock server (one slot), its semaphore on disk as airlock's is in etcd.
FLEET_LOCK_PORT = 8081
FLEET_LOCK_URL = f"http://127.0.0.1:{FLEET_LOCK_PORT}"
FLEET_LOCK_STATE = STATE / "fleetlock.json"
OTHER_HOST = "0" * 31 + "1"  # another host of the group, holding the slot for a while
REBOOT_ARGS = (
    "--switch-mode",
    "smart",
    "--reboot-mode",
    "reboot",
    "--fleet-lock-url",
    FLEET_LOCK_URL,
)
REPORT_PREFIX = "AUTODEPLOY-GUEST "
# How long to wait for the agent to take the machine down (reboot/kexec) before
# saying that it did not.
SHUTDOWN_WAIT_SECONDS = 180

CONFIG: dict[str, Any] = json.loads((SHARE / "guest.json").read_text())
SYSTEMS: dict[str, str] = CONFIG["systems"]
# The EFI session: OVMF and systemd-boot, the ESP (the second disk) mounted at /boot.
EFI = bool(CONFIG.get("efi"))
ESP_DEVICE = "/dev/vdb1"
LOADER_VARIABLES = Path("/sys/firmware/efi/efivars")
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"  # systemd-boot's vendor GUID
SHUTDOWN_UNIT = "autodeploy-guest-shutdown.service"


def report(event: str, **facts: object) -> None:
    """One JSON line on ttyS1 (the console on ttyS0 carries everything else)."""
    facts = {"at": time.time(), **facts}  # the guest's clock: for the scenarios' wall times
    line = REPORT_PREFIX + json.dumps({"event": event, **facts}, sort_keys=True) + "\n"
    fd = os.open("/dev/ttyS1", os.O_WRONLY | os.O_NOCTTY)
    try:
        data = line.encode()
        while data:  # a tty may take a long line in parts: never lose its tail
            data = data[os.write(fd, data) :]
        # Out on the wire before anything else happens: a kexec or reset right after a
        # report would otherwise cut it off in the tty's buffer.
        termios.tcdrain(fd)
    finally:
        os.close(fd)
    print(line, end="", flush=True)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if check and completed.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {completed.returncode}: {completed.stderr.strip()}"
        )
    return completed


def readlink(path: str | Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def read_json(path: Path) -> object:
    text = read_text(path)
    return None if text is None else json.loads(text)


def set_phase(phase: str) -> None:
    # Written and synced before the agent may take the machine down.
    PHASE_FILE.write_text(phase)
    fd = os.open(PHASE_FILE, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    os.sync()


def boot_facts() -> dict[str, object]:
    return {
        "cmdline": Path("/proc/cmdline").read_text().strip(),
        "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
    }


def systemd_state() -> dict[str, object]:
    state = run("systemctl", "is-system-running", "--wait", check=False).stdout.strip()
    failed = run("systemctl", "list-units", "--state=failed", "--plain", "--no-legend", check=False)
    return {"systemd": state, "failed_units": failed.stdout.split("\n")}


def deploy_state() -> dict[str, object]:
    return {
        "deploys": read_json(AGENT_STATE / "deploys.json"),
        "agent_journal": read_json(AGENT_STATE / "journal.json"),
    }


def links() -> dict[str, object]:
    return {
        "current": readlink("/run/current-system"),
        "booted": readlink("/run/booted-system"),
        "profile": os.path.realpath(PROFILE) if PROFILE.exists() else None,
        "boot_entry": readlink(STATE / "boot-entry"),
        "deployed": read_json(AGENT_STATE / "deployed.json"),
        "activations": (read_text(STATE / "activations.log") or "").splitlines(),
        **(boot_loader() if EFI else {}),
    }


def loader_variable(name: str) -> str | None:
    """One of systemd-boot's EFI variables: 4 bytes of attributes, then UTF-16 text."""
    try:
        data = (LOADER_VARIABLES / f"{name}-{LOADER_GUID}").read_bytes()
    except OSError:
        return None
    return data[4:].decode("utf-16-le").rstrip("\0")


def boot_loader() -> dict[str, object]:
    """systemd-boot's view: its files on the ESP, its variables, the generations."""
    entries = Path("/boot/loader/entries")
    images = Path("/boot/EFI/nixos")
    return {
        "loader_conf": read_text(Path("/boot/loader/loader.conf")),
        "entries": {p.name: p.read_text() for p in sorted(entries.glob("*.conf"))},
        "images": sorted(p.name for p in images.iterdir()) if images.is_dir() else [],
        "generations": {
            p.name: os.readlink(p) for p in sorted(PROFILE.parent.glob("system-*-link"))
        },
        "loader_info": loader_variable("LoaderInfo"),
        "entry_selected": loader_variable("LoaderEntrySelected"),
        "entry_oneshot": loader_variable("LoaderEntryOneShot"),
    }


def setup() -> None:
    """Every boot: install the project, trust the test key, serve cache and upstream."""
    STATE.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(INSTALL_DIR, ignore_errors=True)
    INSTALL_DIR.mkdir(parents=True)
    for package in ("collector", "actuator"):
        shutil.copytree(SHARE / "project" / package, INSTALL_DIR / package)
    Path("/etc/nix").mkdir(exist_ok=True)
    Path("/etc/nix/nix.conf").write_text(
        f"substituters = http://127.0.0.1:{HTTP_PORT}/cache\n"
        f"trusted-public-keys = {CONFIG['public_key']}\n"
        "require-sigs = true\n"
        "build-users-group =\n"
        "sandbox = false\n"
    )
    WWW.mkdir(exist_ok=True)
    if not (WWW / "cache").is_symlink():
        (WWW / "cache").symlink_to(SHARE / "cache")
    PROMETHEUS_FILE.parent.mkdir(parents=True, exist_ok=True)
    if EFI:
        report_at_shutdown()
    serve(
        "autodeploy-guest-fleetlock",
        FLEET_LOCK_PORT,
        "python3",
        str(SHARE / "fleetlock.py"),
        str(FLEET_LOCK_PORT),
        str(FLEET_LOCK_STATE),
    )
    serve(
        "autodeploy-guest-http",
        HTTP_PORT,
        "python3",
        "-m",
        "http.server",
        "--bind",
        "127.0.0.1",
        "--directory",
        str(WWW),
        str(HTTP_PORT),
    )


def serve(unit: str, port: int, *argv: str) -> None:
    """A server in a transient unit; returns once it accepts connections."""
    run("systemd-run", f"--unit={unit}", "--property=Restart=always", *argv)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the guest's {unit} did not come up")


def report_at_shutdown() -> None:
    """A unit whose stop, as the guest goes down (before /boot and the share are
    unmounted), reports what the boot loader will boot: the facts before a reboot."""
    Path(f"/etc/systemd/system/{SHUTDOWN_UNIT}").write_text(
        "[Unit]\nDescription=Report the boot loader's state as the guest goes down\n"
        "RequiresMountsFor=/boot /mnt/share\n"
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n"
        f"ExecStop={sys.executable} {Path(__file__).resolve()} --shutdown\n"
    )
    run("systemctl", "daemon-reload")
    run("systemctl", "start", SHUTDOWN_UNIT)


def fleet_lock(endpoint: str, ident: str) -> int:
    """Another host's FleetLock request: the HTTP status it got."""
    body = json.dumps({"client_params": {"id": ident, "group": "default"}}).encode()
    request = urllib.request.Request(
        FLEET_LOCK_URL + endpoint, data=body, headers={"fleet-lock-protocol": "true"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as e:
        return e.code


def fleet_facts() -> dict[str, object]:
    """Who holds the slot, and this host's ID as systemd itself derives it."""
    holders = read_json(FLEET_LOCK_STATE)
    own = run(
        "systemd-id128", "machine-id", f"--app-specific={CONFIG['fleet_lock_app_id']}", check=False
    )
    return {
        "holders": holders.get("default", []) if isinstance(holders, dict) else [],
        "fleet_id": own.stdout.strip(),
    }


def publish(system: str) -> None:
    """What CI does: publish the system's store path at the upstream URL."""
    (WWW / "upstream.tmp").write_text(SYSTEMS[system] + "\n")
    (WWW / "upstream.tmp").rename(WWW / "upstream")


def write_agent_unit(*deploy_args: str) -> None:
    """The agent's service as the NixOS module would make it: collect, then deploy."""
    common = f"--url {UPSTREAM_URL} --prometheus-path {PROMETHEUS_FILE}"
    Path(f"/etc/systemd/system/{AGENT_UNIT}").write_text(
        "[Unit]\nDescription=nixos-autodeploy deploy (guest test)\n"
        "[Service]\nType=oneshot\n"
        "Environment=PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin\n"
        f"ExecStart=/usr/local/bin/nixos-autodeploy collect {common}\n"
        f"ExecStart=/usr/local/bin/nixos-autodeploy deploy {common} {' '.join(deploy_args)}\n"
    )
    run("systemctl", "daemon-reload")


def start_agent(*deploy_args: str) -> subprocess.CompletedProcess[str]:
    write_agent_unit(*deploy_args)
    return run("systemctl", "start", AGENT_UNIT, check=False)


def journal(unit: str, boot: str = "0") -> list[str]:
    out = run("journalctl", "--no-pager", "-o", "cat", "-b", boot, "-u", unit, check=False)
    return out.stdout.splitlines()[-60:]


def status() -> dict[str, object]:
    """The collector's fresh view: collect, then status --json."""
    collect = run(
        "nixos-autodeploy",
        "collect",
        "--url",
        UPSTREAM_URL,
        "--prometheus-path",
        str(PROMETHEUS_FILE),
        check=False,
    )
    shown = run("nixos-autodeploy", "status", "--json", check=False)
    return {
        "collect_rc": collect.returncode,
        "collect_stderr": collect.stderr[-2000:],
        "status": json.loads(shown.stdout) if shown.returncode == 0 else None,
        "status_stderr": shown.stderr[-2000:],
        "metrics": (read_text(PROMETHEUS_FILE) or "").splitlines(),
    }


def wait_for_shutdown(what: str) -> None:
    """The agent queued a reboot or kexec; this process should be killed by it."""
    time.sleep(SHUTDOWN_WAIT_SECONDS)
    report("error", message=f"the guest did not go down for {what}", **links())
    finish()


def wait_for_line(path: Path, needle: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if needle in (read_text(path) or ""):
            return True
        time.sleep(0.5)
    return False


def finish() -> None:
    set_phase("done")
    report("finished")
    run("systemctl", "poweroff", "--no-block")
    sys.exit(0)


def install_initial() -> None:
    """Install the initial system as an installer would."""
    run("nix-store", "--realise", SYSTEMS["initial"])
    run("nix-env", "-p", str(PROFILE), "--set", SYSTEMS["initial"])
    run(SYSTEMS["initial"] + "/bin/switch-to-configuration", "boot")
    # The stage-2 service turns the boot entry into booted/current, as at boot.
    run("systemctl", "restart", "autodeploy-guest-stage2.service")
    publish("initial")


def phase_install() -> None:
    """First boot: install the initial system as an installer would, then track it."""
    install_initial()
    agent = start_agent("--switch-mode", "switch")
    report("installed", agent_rc=agent.returncode, journal=journal(AGENT_UNIT), **links())
    set_phase("switch")


def phase_switch() -> None:
    """Scenario 1: a tracking host, new upstream, switch mode."""
    publish("switched")
    agent = start_agent("--switch-mode", "switch")
    report(
        "switch",
        agent_rc=agent.returncode,
        journal=journal(AGENT_UNIT),
        switch_journal=journal(CONFIG["switch_unit"]),
        **links(),
    )
    set_phase("broken")


def phase_broken() -> None:
    """Scenario 5: a switch to a system with a unit that fails to start: systemd's
    verdict (degraded) fails the health checks; the agent switches back."""
    publish("broken")
    agent = start_agent("--switch-mode", "switch", "--health-timeout", "20")
    report(
        "broken",
        agent_rc=agent.returncode,
        journal=journal(AGENT_UNIT),
        **systemd_state(),
        **links(),
        **deploy_state(),
        **status(),
    )
    run("systemctl", "reset-failed")  # the operator clears the failed unit
    set_phase("restart")


def phase_restart() -> None:
    """Scenario 4: the agent's unit restarted during a slow activation."""
    publish("slow")
    write_agent_unit("--switch-mode", "switch")
    run("systemctl", "start", "--no-block", AGENT_UNIT)
    started = wait_for_line(STATE / "activations.log", f"start {SYSTEMS['slow']}", 300)
    restart = run("systemctl", "restart", AGENT_UNIT, check=False) if started else None
    finished = wait_for_line(STATE / "activations.log", f"done {SYSTEMS['slow']}", 300)
    # The agent's next run (as its timer would start it), so the state has settled.
    run("systemctl", "start", AGENT_UNIT, check=False)
    report(
        "restart",
        activation_started=started,
        restart_rc=None if restart is None else restart.returncode,
        activation_finished=finished,
        journal=journal(AGENT_UNIT),
        switch_journal=journal(CONFIG["switch_unit"]),
        **links(),
        **status(),
    )
    set_phase("kexec")


def phase_kexec() -> None:
    """Scenario 2: smart mode with a kernel change, rebooting by kexec."""
    publish("kexeced")
    set_phase("after-kexec")
    agent = start_agent("--switch-mode", "smart", "--reboot-mode", "kexec")
    report("kexec-requested", agent_rc=agent.returncode, journal=journal(AGENT_UNIT))
    wait_for_shutdown("kexec")


def boot_run(*deploy_args: str) -> subprocess.CompletedProcess[str]:
    """The agent's run after a boot (nixos-autodeploy-boot.service on NixOS): it confirms
    or rolls back a trial boot before anything else."""
    return start_agent(*deploy_args)


def phase_after_kexec() -> None:
    before = links()
    agent = boot_run("--switch-mode", "smart", "--reboot-mode", "kexec")
    report(
        "after-kexec",
        previous_journal=journal(AGENT_UNIT, "-1"),
        before_confirmation=before,
        agent_rc=agent.returncode,
        journal=journal(AGENT_UNIT),
        **boot_facts(),
        **links(),
        **deploy_state(),
        **status(),
    )
    set_phase("kexec-unbootable")


def phase_kexec_unbootable() -> None:
    """Scenario 6: a kexec trial into a system that never reaches userspace."""
    publish("unbootable")
    set_phase("after-kexec-unbootable")
    agent = start_agent("--switch-mode", "smart", "--reboot-mode", "kexec")
    report("kexec-unbootable-requested", agent_rc=agent.returncode, journal=journal(AGENT_UNIT))
    wait_for_shutdown("kexec")


def phase_after_kexec_unbootable() -> None:
    after_unbootable("after-kexec-unbootable", "--switch-mode", "smart", "--reboot-mode", "kexec")
    set_phase("reboot")


def after_unbootable(event: str, *deploy_args: str) -> None:
    """Back on the old system after a trial that never reached userspace: the run after
    the boot, then the timer's next run (the failed system is not tried again)."""
    first = boot_run(*deploy_args)
    first_journal = journal(AGENT_UNIT)
    second = start_agent(*deploy_args)
    report(
        event,
        previous_journal=journal(AGENT_UNIT, "-1"),
        agent_rc=first.returncode,
        journal=first_journal,
        second_rc=second.returncode,
        second_journal=journal(AGENT_UNIT),
        **boot_facts(),
        **links(),
        **deploy_state(),
        **status(),
    )


def phase_reboot() -> None:
    """Scenario 3: smart mode with a kernel change, rebooting with systemctl reboot once
    another host gave the FleetLock group's one slot back."""
    publish("rebooted")
    other_took = fleet_lock("/v1/pre-reboot", OTHER_HOST)
    refused = start_agent(*REBOOT_ARGS)
    report(
        "reboot-waiting",
        other_took=other_took,
        agent_rc=refused.returncode,
        journal=journal(AGENT_UNIT),
        **boot_facts(),
        **links(),
        **fleet_facts(),
        **status(),
    )
    # Reported before the agent runs: its reboot ends this process.
    report("slot-freed", other_released=fleet_lock("/v1/steady-state", OTHER_HOST), **fleet_facts())
    set_phase("after-reboot")
    agent = start_agent(*REBOOT_ARGS)
    report("reboot-requested", agent_rc=agent.returncode, journal=journal(AGENT_UNIT))
    wait_for_shutdown("reboot")


def phase_after_reboot() -> None:
    at_boot = fleet_facts()
    # The actuator's run after boot (nixos-autodeploy-boot.service on NixOS): it confirms
    # the trial boot, and back on a confirmed system it gives the slot back.
    agent = boot_run(*REBOOT_ARGS)
    report(
        "after-reboot",
        holders_at_boot=at_boot["holders"],
        release_rc=agent.returncode,
        release_journal=journal(AGENT_UNIT),
        **fleet_facts(),
        previous_journal=journal(AGENT_UNIT, "-1"),
        agent_rc=agent.returncode,
        journal=journal(AGENT_UNIT),
        **boot_facts(),
        **links(),
        **deploy_state(),
        **status(),
    )
    set_phase("reboot-unhealthy")


UNHEALTHY_CHECK = STATE / "check-not-unhealthy"


def unhealthy_args(switch_mode: str = "smart") -> tuple[str, ...]:
    """The operator's check that fails while the "unhealthy" system runs."""
    UNHEALTHY_CHECK.write_text(
        f'#!/bin/sh\n[ "$(readlink /run/current-system)" != {SYSTEMS["unhealthy"]} ]\n'
    )
    UNHEALTHY_CHECK.chmod(0o755)
    return (
        "--switch-mode",
        switch_mode,
        "--reboot-mode",
        "reboot",
        "--health-check",
        str(UNHEALTHY_CHECK),
        "--health-timeout",
        "20",
    )


def phase_reboot_unhealthy() -> None:
    """Scenario 7: a reboot trial whose after-boot check fails: one rollback reboot."""
    publish("unhealthy")
    set_phase("after-reboot-unhealthy")
    agent = start_agent(*unhealthy_args())
    report("reboot-unhealthy-requested", agent_rc=agent.returncode, journal=journal(AGENT_UNIT))
    wait_for_shutdown("reboot")


def phase_after_reboot_unhealthy() -> None:
    set_phase("after-rollback-reboot")
    agent = boot_run(*unhealthy_args())
    report(
        "after-reboot-unhealthy",
        agent_rc=agent.returncode,
        journal=journal(AGENT_UNIT),
        **boot_facts(),
        **links(),
        **deploy_state(),
    )
    wait_for_shutdown("the rollback reboot")


def phase_after_rollback_reboot() -> None:
    agent = boot_run(*unhealthy_args())
    report(
        "after-rollback-reboot",
        previous_journal=journal(AGENT_UNIT, "-1"),
        agent_rc=agent.returncode,
        journal=journal(AGENT_UNIT),
        **boot_facts(),
        **links(),
        **deploy_state(),
        **status(),
    )
    finish()


EFI_TRIAL = ("--switch-mode", "boot", "--reboot-mode", "reboot")


def efi_trial(system: str, after: str, *deploy_args: str) -> None:
    """A reboot trial on a host booted by systemd-boot: a one-time boot entry."""
    report("scenario", name=system)
    publish(system)
    set_phase(after)
    agent = start_agent(*deploy_args)
    report(f"{system}-requested", agent_rc=agent.returncode, journal=journal(AGENT_UNIT))
    wait_for_shutdown("reboot")


def phase_efi_install() -> None:
    """EFI session: install the initial system (its entry becomes systemd-boot's default),
    and the agent tracks it."""
    install_initial()
    agent = start_agent("--switch-mode", "boot")
    report("efi-installed", agent_rc=agent.returncode, journal=journal(AGENT_UNIT), **links())
    set_phase("efi-trial")


def phase_efi_trial() -> None:
    """Scenario a: a reboot trial into a healthy system."""
    efi_trial("rebooted", "efi-after-trial", *EFI_TRIAL)


def phase_efi_after_trial() -> None:
    before = links()
    agent = boot_run(*EFI_TRIAL)
    report(
        "efi-after-trial",
        before_confirmation=before,
        previous_journal=journal(AGENT_UNIT, "-1"),
        agent_rc=agent.returncode,
        journal=journal(AGENT_UNIT),
        **boot_facts(),
        **links(),
        **deploy_state(),
        **status(),
    )
    set_phase("efi-unhealthy")


def phase_efi_unhealthy() -> None:
    """Scenario b: a reboot trial into a system that fails the operator's check."""
    efi_trial("unhealthy", "efi-after-unhealthy", *unhealthy_args("boot"))


def phase_efi_after_unhealthy() -> None:
    set_phase("efi-after-rollback")
    agent = boot_run(*unhealthy_args("boot"))
    report(
        "efi-after-unhealthy",
        agent_rc=agent.returncode,
        journal=journal(AGENT_UNIT),
        **boot_facts(),
        **links(),
        **deploy_state(),
    )
    wait_for_shutdown("the rollback reboot")


def phase_efi_after_rollback() -> None:
    agent = boot_run(*unhealthy_args("boot"))
    report(
        "efi-after-rollback",
        previous_journal=journal(AGENT_UNIT, "-1"),
        agent_rc=agent.returncode,
        journal=journal(AGENT_UNIT),
        **boot_facts(),
        **links(),
        **deploy_state(),
        **status(),
    )
    set_phase("efi-unbootable")


def phase_efi_unbootable() -> None:
    """Scenario c: a reboot trial into a system that never reaches userspace."""
    efi_trial("unbootable-efi", "efi-after-unbootable", *EFI_TRIAL)


def phase_efi_after_unbootable() -> None:
    after_unbootable("efi-after-unbootable", *EFI_TRIAL)
    finish()


def write_resident_units() -> None:
    """The resident collector and the unit that tells it of an activation, as the NixOS
    module makes them (that unit's choice between reload, restart and start is tested on
    the host; here the collector runs the current program, so it reloads)."""
    common = f"--url {UPSTREAM_URL} --prometheus-path {PROMETHEUS_FILE}"
    Path(f"/etc/systemd/system/{COLLECTOR_UNIT}").write_text(
        "[Unit]\nDescription=nixos-autodeploy collector, resident (guest test)\n"
        "[Service]\nType=notify\n"
        "Environment=PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin\n"
        f"ExecStart=/usr/local/bin/nixos-autodeploy collect {common} --every {POLL_INTERVAL}\n"
        # The module's coreutils kill; this guest has only the shell's.
        "ExecReload=/bin/sh -c 'kill -HUP \"$$MAINPID\"'\n"
        "Restart=on-failure\nRestartSec=10s\n"
        f"WatchdogSec={WATCHDOG_SEC}\nTimeoutStartSec={WATCHDOG_SEC}\n"
    )
    Path(f"/etc/systemd/system/{ACTIVATED_UNIT}").write_text(
        "[Unit]\nDescription=Tell the resident collector that a system was activated\n"
        "[Service]\nType=oneshot\n"
        f"ExecStart=-/bin/systemctl reload --no-block {COLLECTOR_UNIT}\n"
    )
    run("systemctl", "daemon-reload")


def unit_facts(unit: str) -> dict[str, str]:
    names = (
        "Type,ActiveState,SubState,Result,MainPID,NRestarts,WatchdogUSec,"
        "WatchdogTimestampMonotonic,StatusText,ExecMainStatus,ExecMainCode"
    )
    out = run("systemctl", "show", "--property", names, unit).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for_status_text(unit: str, needle: str, seconds: float) -> dict[str, str]:
    """The unit's facts once its StatusText names needle, or as they are at the deadline."""
    deadline = time.monotonic() + seconds
    facts = unit_facts(unit)
    while needle not in facts.get("StatusText", "") and time.monotonic() < deadline:
        time.sleep(0.5)
        facts = unit_facts(unit)
    return facts


def wait_for_current_in_snapshot(system: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        snapshot = read_json(AGENT_STATE / "snapshot.json")
        if isinstance(snapshot, dict) and snapshot.get("current") == SYSTEMS[system]:
            return True
        time.sleep(0.5)
    return False


def phase_resident() -> None:
    """The resident collector as a real Type=notify service with a watchdog: it becomes
    ready after its first poll, and a hand switch reaches it through the activated unit
    (switch-to-configuration starts that unit after the activation), long before its
    next poll of its own (an hour away)."""
    install_initial()
    write_resident_units()
    started = run("systemctl", "start", COLLECTOR_UNIT, check=False)  # waits for READY=1
    ready = unit_facts(COLLECTOR_UNIT)
    snapshot_ready = read_json(AGENT_STATE / "snapshot.json")
    run("nix-store", "--realise", SYSTEMS["switched"])
    run("nix-env", "-p", str(PROFILE), "--set", SYSTEMS["switched"])
    run(SYSTEMS["switched"] + "/bin/switch-to-configuration", "switch")
    reloaded = run("systemctl", "start", ACTIVATED_UNIT, check=False)
    seen = wait_for_current_in_snapshot("switched", 120)
    # STATUS= goes to systemd just after the snapshot is written: wait for it too.
    after = wait_for_status_text(COLLECTOR_UNIT, os.path.basename(SYSTEMS["switched"]), 30)
    stopped = run("systemctl", "stop", COLLECTOR_UNIT, check=False)
    report(
        "resident",
        start_rc=started.returncode,
        start_stderr=started.stderr[-2000:],
        ready=ready,
        snapshot_ready=snapshot_ready,
        reload_rc=reloaded.returncode,
        seen=seen,
        after=after,
        snapshot_after=read_json(AGENT_STATE / "snapshot.json"),
        stop_rc=stopped.returncode,
        stopped=unit_facts(COLLECTOR_UNIT),
        journal=journal(COLLECTOR_UNIT),
        metrics=(read_text(PROMETHEUS_FILE) or "").splitlines(),
        **links(),
    )
    set_phase("boot-timer")


# The boot-timer scenario (issue 20): the actuator's timer fires during a boot.
ACTUATOR_UNIT = "nixos-autodeploy.service"
ACTUATOR_TIMER = "nixos-autodeploy.timer"
# Persistent=true: the time of its last trigger; one long past is a missed firing.
TIMER_STAMP = Path("/var/lib/systemd/timers/stamp-nixos-autodeploy.timer")
SLOW_BOOT_UNIT = "autodeploy-guest-slow-boot.service"
SLOW_BOOT_SECONDS = 45
UPSTREAM_UNIT = "autodeploy-guest-upstream.service"
# Longer than the slow unit keeps the boot busy, so only a check waiting on itself fails.
BOOT_TIMER_ARGS = ("--switch-mode", "switch", "--health-timeout", "120")
UNIT_PATH = "Environment=PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin\n"
RUNTIME_DIRECTORIES = (
    "StateDirectory=nixos-autodeploy\n"
    "RuntimeDirectory=nixos-autodeploy\nRuntimeDirectoryPreserve=yes\n"
)


def write_timer_units() -> None:
    """The actuator's service and timer as module.nix makes them (the serviceConfig it
    gives this unit, Type above all, read from module.nix by the host), with the module's
    default schedule; the collector (not resident) that the service wants, without the
    module's sandbox (this guest has no nix-daemon); a slow unit that keeps the boot
    from finishing; the upstream file and the cache served from early in the boot (the
    driver's own servers start after multi-user.target, too late for the timer's run)."""
    common = f"--url {UPSTREAM_URL} --prometheus-path {PROMETHEUS_FILE}"
    own = "".join(f"{key}={value}\n" for key, value in CONFIG["actuator_service"].items())
    units = {
        COLLECTOR_UNIT: (
            "[Unit]\nDescription=nixos-autodeploy collector (guest test)\n"
            "After=network-online.target\nWants=network-online.target\n"
            f"[Service]\nType=oneshot\n{UNIT_PATH}"
            f"ExecStart=-/usr/local/bin/nixos-autodeploy collect {common}\n" + RUNTIME_DIRECTORIES
        ),
        ACTUATOR_UNIT: (
            "[Unit]\nDescription=nixos-autodeploy actuator (guest test)\n"
            f"After=network-online.target {COLLECTOR_UNIT}\n"
            f"Wants=network-online.target {COLLECTOR_UNIT}\n"
            "X-StopOnRemoval=false\n"
            f"[Service]\n{UNIT_PATH}"
            f"ExecStart=-/usr/local/bin/nixos-autodeploy deploy {common} "
            f"{' '.join(BOOT_TIMER_ARGS)}\n" + RUNTIME_DIRECTORIES + own
        ),
        ACTUATOR_TIMER: (
            "[Unit]\nDescription=nixos-autodeploy actuator (guest test)\n"
            "[Timer]\nOnCalendar=04:42\nRandomizedDelaySec=0\nFixedRandomDelay=true\n"
            "Persistent=true\n[Install]\nWantedBy=timers.target\n"
        ),
        SLOW_BOOT_UNIT: (
            "[Unit]\nDescription=A slow service: the boot is not finished before it is\n"
            f"[Service]\nType=oneshot\nExecStart=/bin/sleep {SLOW_BOOT_SECONDS}\n"
            "[Install]\nWantedBy=multi-user.target\n"
        ),
        UPSTREAM_UNIT: (
            "[Unit]\nDescription=Upstream and the binary cache, from early in the boot\n"
            f"Before={COLLECTOR_UNIT} {ACTUATOR_UNIT}\n"
            "[Service]\n"
            "ExecStartPre=/bin/sh -c 'modprobe 9pnet_virtio && mkdir -p /mnt/share && "
            "{ mountpoint -q /mnt/share || mount -t 9p -o "
            "trans=virtio,version=9p2000.L,msize=1048576,ro share /mnt/share; }'\n"
            f"ExecStart=/usr/bin/python3 -m http.server --bind 127.0.0.1 --directory {WWW} "
            f"{HTTP_PORT}\n"
            # Started once it answers: the collector's fetch comes right after.
            "ExecStartPost=/bin/bash -c 'until (: </dev/tcp/127.0.0.1/"
            f"{HTTP_PORT}) 2>/dev/null; do sleep 0.2; done'\n"
            "[Install]\nWantedBy=multi-user.target\n"
        ),
    }
    for name, text in units.items():
        Path(f"/etc/systemd/system/{name}").write_text(text)
    run("systemctl", "daemon-reload")


def show(unit: str | None, *names: str) -> dict[str, str]:
    """systemctl show's properties of a unit, or of the manager itself (unit None)."""
    out = run("systemctl", "show", "--property", ",".join(names), *filter(None, [unit])).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def phase_boot_timer() -> None:
    """Issue 20: a tracked host with an update pending, the actuator's Persistent timer
    having missed a firing while the host was down: at the next boot the timer starts the
    run at once, while a slow unit keeps the boot going. Its systemd check waits for the
    end of the boot; a oneshot's pending start job would hold that end up for ever."""
    report("scenario", name="boot-timer")
    write_timer_units()
    publish("switched")
    tracked = start_agent("--switch-mode", "switch")
    publish("pending")
    run("systemctl", "enable", ACTUATOR_TIMER, SLOW_BOOT_UNIT, UPSTREAM_UNIT)
    # Not started in this boot: a start would fire the missed run now, not at the boot.
    TIMER_STAMP.parent.mkdir(parents=True, exist_ok=True)
    TIMER_STAMP.touch()
    os.utime(TIMER_STAMP, (946684800, 946684800))  # 2000-01-01
    report(
        "boot-timer-armed",
        agent_rc=tracked.returncode,
        journal=journal(AGENT_UNIT),
        **links(),
        **status(),
    )
    set_phase("after-boot-timer")
    run("systemctl", "reboot", "--no-block")
    wait_for_shutdown("the reboot into the timer's run")


def wait_for_run_end(unit: str, seconds: float) -> dict[str, str]:
    """The unit's facts once its main process has exited, or as they are at the deadline."""
    names = (
        "Type,ActiveState,Result,ExecMainStatus,"
        "ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic"
    )
    deadline = time.monotonic() + seconds
    facts = show(unit, names)
    while facts.get("ExecMainExitTimestampMonotonic", "0") == "0" and time.monotonic() < deadline:
        time.sleep(1)
        facts = show(unit, names)
    return facts


def phase_after_boot_timer() -> None:
    actuator = wait_for_run_end(ACTUATOR_UNIT, 600)
    report(
        "boot-timer",
        actuator=actuator,
        # The run's first step, the collection its service wants: when the timer fired.
        collector=show(COLLECTOR_UNIT, "ExecMainStartTimestampMonotonic"),
        slow=show(SLOW_BOOT_UNIT, "ExecMainExitTimestampMonotonic"),
        # After the boot has finished (it waits), when it did.
        **systemd_state(),
        manager=show(None, "FinishTimestampMonotonic"),
        journal=journal(ACTUATOR_UNIT),
        collector_journal=journal(COLLECTOR_UNIT),
        **boot_facts(),
        **links(),
        **deploy_state(),
        **status(),
    )
    finish()


PHASES = {
    "install": phase_install,
    "switch": phase_switch,
    "broken": phase_broken,
    "restart": phase_restart,
    "kexec": phase_kexec,
    "after-kexec": phase_after_kexec,
    "kexec-unbootable": phase_kexec_unbootable,
    "after-kexec-unbootable": phase_after_kexec_unbootable,
    "reboot": phase_reboot,
    "after-reboot": phase_after_reboot,
    "resident": phase_resident,
    "boot-timer": phase_boot_timer,
    "after-boot-timer": phase_after_boot_timer,
    "reboot-unhealthy": phase_reboot_unhealthy,
    "after-reboot-unhealthy": phase_after_reboot_unhealthy,
    "after-rollback-reboot": phase_after_rollback_reboot,
    "efi-install": phase_efi_install,
    "efi-trial": phase_efi_trial,
    "efi-after-trial": phase_efi_after_trial,
    "efi-unhealthy": phase_efi_unhealthy,
    "efi-after-unhealthy": phase_efi_after_unhealthy,
    "efi-after-rollback": phase_efi_after_rollback,
    "efi-unbootable": phase_efi_unbootable,
    "efi-after-unbootable": phase_efi_after_unbootable,
}
# One boot runs phases until one takes the machine down.
NEXT_IN_SAME_BOOT = {
    "install",
    "switch",
    "broken",
    "restart",
    "after-kexec",
    "after-kexec-unbootable",
    "after-reboot",
    "efi-install",
    "efi-after-trial",
    "efi-after-rollback",
    "resident",
}


def detach() -> bool:
    """Go on in a transient unit of its own, outside the boot transaction: the boot then
    finishes, as on NixOS where nothing of the agent's holds it up, and the agent's systemd
    check (`systemctl is-system-running --wait`) sees a booted system."""
    if os.environ.get("AUTODEPLOY_GUEST_DETACHED"):
        return False
    run(
        "systemd-run",
        "--unit=autodeploy-guest-scenarios",
        "--collect",
        "--setenv=AUTODEPLOY_GUEST_DETACHED=1",
        "--property=StandardOutput=journal",
        "--property=StandardError=journal+console",
        sys.executable,
        str(Path(__file__).resolve()),
    )
    return True


def main() -> None:
    if sys.argv[1:] == ["--shutdown"]:
        report("shutdown", phase=read_text(PHASE_FILE), **boot_facts(), **links())
        return
    if detach():
        return
    if EFI:  # before the first report, which shows what is on the ESP
        run("sh", "-c", f"mountpoint -q /boot || mount {ESP_DEVICE} /boot")
    phase = read_text(PHASE_FILE) or CONFIG.get("first_phase", "install")
    report("boot", phase=phase, **boot_facts(), **links(), **systemd_state())
    if phase == "done":  # booted again after the end: nothing to do
        run("systemctl", "poweroff", "--no-block")
        return
    try:
        # The timer's run is under way from the installed copy, which setup() replaces;
        # the scenario's own unit serves upstream and the cache.
        if phase != "after-boot-timer":
            setup()
        while True:
            PHASES[phase]()
            if phase not in NEXT_IN_SAME_BOOT:
                break
            phase = read_text(PHASE_FILE) or "done"
    except Exception as error:  # report anything, then stop the guest: the host asserts
        report("error", phase=phase, message=f"{type(error).__name__}: {error}")
        finish()


if __name__ == "__main__":
    main()
