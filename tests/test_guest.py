"""System test in a real systemd guest: systemd-run, reboot and kexec for real.

A Debian guest (debootstrap, `mkfs.ext4 -d`, qemu with TCG, no network device)
runs the agent under systemd. Synthetic systems carrying the guest's own kernel
and initrd (tests/guest/systems.nix) are built on the host in a chroot store and
shipped as a signed binary cache over a read-only 9p share, together with the
project's code and the guest-side driver (tests/guest/driver.py). The guest
serves the cache and the upstream file on its own 127.0.0.1. The driver runs the
scenarios across boots and reports facts as JSON lines on the second serial port;
the tests below assert on them.

Three sessions, each a guest of its own: the main one (qemu's -kernel stands in for the
boot loader), the resident collector's, and the EFI one, booted by OVMF and the guest's
own systemd-boot from an ESP the host builds (reboot trials with a one-time boot entry).

The image is cached in .cache/guest/ keyed by the builder script and image/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from actuator import commands, fleetlock

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = Path(__file__).resolve().parent / "guest"
CACHE = REPO / ".cache" / "guest"
# The transient unit the actuator runs switch-to-configuration in.
SWITCH_UNIT = f"{commands.SWITCH_UNIT}.service"
AGENT_UNIT = "nixos-autodeploy-deploy.service"
REPORT_PREFIX = "AUTODEPLOY-GUEST "
SANDBOX_PATHS = "/bin /usr /lib /lib64"
NIX_COMMAND = ("--extra-experimental-features", "nix-command")
# The whole guest session (all boots, health checks and trial boots included).
GUEST_TIMEOUT_SECONDS = 1800
# Bounds the EFI session's cold restarts (it boots seven times).
MAX_BOOTS = 20
SYSTEM_NAMES = (
    "initial",
    "switched",
    "slow",
    "kexeced",
    "rebooted",
    "broken",
    "unbootable",
    "unhealthy",
)
EFI_SYSTEM_NAMES = ("initial", "rebooted", "unhealthy", "unbootable-efi")
# The EFI session's firmware (Debian's ovmf): code read-only, variables a copy per run.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# The ESP: a GPT disk with one EFI System Partition (bootctl checks both), 1 MiB in.
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ESP_DISK_MIB = 512
ESP_OFFSET_SECTORS = 2048
# The entry the ESP starts with: the image's kernel, as qemu's -kernel boots it otherwise.
INSTALL_ENTRY = "autodeploy-install.conf"


def require(condition: bool, message: str) -> None:
    """A missing prerequisite fails in CI (which installs it) and skips elsewhere."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI provides it, so this is an error)")
    pytest.skip(message)


def run(argv: list[str], timeout: float = 300, stdin: str | None = None) -> str:
    completed = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {completed.returncode}:\n{completed.stderr}")
    return completed.stdout


def image_key() -> str:
    digest = hashlib.sha256()
    inputs = [GUEST_DIR / "build-image.sh", *sorted((GUEST_DIR / "image").rglob("*"))]
    for path in inputs:
        if path.is_file():
            digest.update(str(path.relative_to(GUEST_DIR)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def guest_image() -> Path:
    """The cached image directory, built when missing; older images are removed."""
    image = CACHE / f"image-{image_key()}"
    if not (image / "base.img").exists():
        started = time.monotonic()
        run([str(GUEST_DIR / "build-image.sh"), str(CACHE), str(image)], timeout=1800)
        print(f"guest image built in {time.monotonic() - started:.0f} s")
        for stale in CACHE.glob("image-*"):
            if stale != image:
                shutil.rmtree(stale)
    return image


def build_systems(
    image: Path, work: Path, cache_dir: Path, names: tuple[str, ...]
) -> tuple[dict[str, str], str]:
    """Build the guest's systems in a chroot store; copy them, signed, to a binary cache.

    Returns the systems' store paths by name and the public key."""
    store = work / "store"
    paths = run(
        [
            "nix-build",
            "--store",
            str(store),
            "--option",
            "sandbox-paths",
            SANDBOX_PATHS,
            "--no-out-link",
            str(GUEST_DIR / "systems.nix"),
            "--arg",
            "vmlinuz",
            str(image / "vmlinuz"),
            "--arg",
            "initrd",
            str(image / "initrd.img"),
            *[arg for name in names for arg in ("-A", name)],
        ],
        timeout=600,
    ).split()
    assert len(paths) == len(names), paths
    systems = dict(zip(names, paths, strict=True))
    secret, public = work / "key.secret", work / "key.public"
    run(["nix-store", "--generate-binary-cache-key", "guest-test-1", str(secret), str(public)])
    run(
        [
            "nix",
            *NIX_COMMAND,
            "copy",
            "--store",
            str(store),
            "--to",
            # Kernel and initrd are already compressed: compressing again only costs time.
            f"file://{cache_dir}?compression=none&secret-key={secret}",
            *paths,
        ],
        timeout=600,
    )
    return systems, public.read_text().strip()


@dataclass(frozen=True)
class GuestRun:
    systems: dict[str, str]
    events: list[dict[str, Any]]
    console: str
    seconds: float
    qemu_returncode: int | None

    def event(self, name: str) -> dict[str, Any]:
        found = [event for event in self.events if event["event"] == name]
        assert found, f"the guest did not report {name!r}; it reported {self.names()}"
        return found[-1]

    def names(self) -> list[str]:
        return [event["event"] for event in self.events]

    def show(self) -> None:
        """Printed by every test first: pytest shows it when the test fails."""
        print("==== guest serial console ====")
        print(self.console)
        print("==== guest reports ====")
        for event in self.events:
            print(json.dumps(event, indent=1))


def parse_reports(text: str) -> list[dict[str, Any]]:
    """The driver's JSON lines; a garbled one becomes an "unparsable" event (a test
    fails on it) rather than an error that would hide the serial log. A report cut off by
    the machine going down (the next boot's report then follows on the same line) becomes a
    "cut-off" event, and the report after it is kept: a test that needs the cut one fails
    on its absence."""
    events: list[dict[str, Any]] = []
    for line in text.replace("\r", "").splitlines():
        reports = line.split(REPORT_PREFIX)[1:]
        for index, report in enumerate(reports):
            try:
                events.append(json.loads(report))
            except json.JSONDecodeError:
                cut = index < len(reports) - 1
                name = "cut-off" if cut else "unparsable"
                events.append({"event": name, "line": REPORT_PREFIX + report})
    return events


def test_parse_reports_keeps_the_report_after_a_cut_off_one() -> None:
    text = (
        f'{REPORT_PREFIX}{{"event": "a"}}\r\n'
        f'{REPORT_PREFIX}{{"event": "b", "x": [1, {REPORT_PREFIX}{{"event": "c"}}\n'
        f"{REPORT_PREFIX}{{garbage\n"
    )
    assert parse_reports(text) == [
        {"event": "a"},
        {"event": "cut-off", "line": f'{REPORT_PREFIX}{{"event": "b", "x": [1, '},
        {"event": "c"},
        {"event": "unparsable", "line": f"{REPORT_PREFIX}{{garbage"},
    ]


def make_esp(image: Path, work: Path, kernel_params: str) -> Path:
    """The EFI session's ESP: systemd-boot as the removable-media loader, and one entry
    (the default) that boots the image's kernel, as -kernel/-append does otherwise."""
    esp = work / "esp.img"
    sectors = ESP_DISK_MIB * 2048
    size = sectors - 2 * ESP_OFFSET_SECTORS  # room for the backup GPT at the end
    with open(esp, "wb") as disk:
        disk.truncate(sectors * 512)
    table = f"label: gpt\nstart={ESP_OFFSET_SECTORS}, size={size}, type={ESP_TYPE}\n"
    run(["sfdisk", "--quiet", str(esp)], stdin=table)
    offset = str(ESP_OFFSET_SECTORS)
    run(["mkfs.vfat", "-F", "32", "-n", "ESP", "--offset", offset, str(esp), str(size // 2)])
    files = work / "esp"
    (files / "EFI/BOOT").mkdir(parents=True)
    (files / "loader/entries").mkdir(parents=True)
    (files / "autodeploy").mkdir()
    shutil.copy(image / "systemd-bootx64.efi", files / "EFI/BOOT/BOOTX64.EFI")
    shutil.copy(image / "vmlinuz", files / "autodeploy/vmlinuz")
    shutil.copy(image / "initrd.img", files / "autodeploy/initrd.img")
    (files / "loader/loader.conf").write_text(f"timeout 0\ndefault {INSTALL_ENTRY}\n")
    (files / "loader/entries" / INSTALL_ENTRY).write_text(
        "title Debian guest (before the first system is installed)\n"
        "linux /autodeploy/vmlinuz\ninitrd /autodeploy/initrd.img\n"
        f"options {kernel_params}\n"
    )
    image_arg = f"{esp}@@{ESP_OFFSET_SECTORS * 512}"
    # MTOOLS_SKIP_CHECK: the file system is mkfs.vfat's, on a disk image mtools has not seen.
    sources = [str(p) for p in sorted(files.iterdir())]
    run(["env", "MTOOLS_SKIP_CHECK=1", "mcopy", "-s", "-i", image_arg, *sources, "::/"])
    return esp


def powered_off(console: str) -> bool:
    """Whether the guest's last boot ended by powering off rather than by a reset (a
    reboot, or a panic's reboot)."""
    return console.rfind("reboot: Power down") > max(
        console.rfind("reboot: Restarting system"), console.rfind("Rebooting in")
    )


def boot_guest(
    image: Path, share: Path, work: Path, kernel_params: str, efi: bool = False
) -> GuestRun:
    """Boot the guest on a throwaway overlay of the cached image and wait until it
    powers off (the driver does that at the end) or the time runs out. The EFI session
    boots through OVMF and systemd-boot from an ESP on a second disk (/dev/vdb); the
    other gets the image's kernel from qemu's -kernel."""
    overlay = work / "overlay.qcow2"
    base = image / "base.img"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(overlay)])
    console, reports = work / "console.log", work / "reports.log"
    if efi:
        variables = work / "OVMF_VARS.fd"
        shutil.copy(OVMF_VARS, variables)
        esp = make_esp(image, work, kernel_params)
        boot = [
            "-machine", "q35",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={variables}",
            # The firmware's RNG protocol, from which the kernel's EFI stub seeds its random
            # pool (qemu's -kernel hands it a seed instead): without it, early getrandom()
            # calls can stall a boot for minutes under TCG.
            "-device", "virtio-rng-pci",
        ]  # fmt: skip
        second_disk = ["-drive", f"file={esp},format=raw,if=virtio"]
    else:
        boot = [
            "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
            "-append", kernel_params,
        ]  # fmt: skip
        second_disk = []
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-smp", "2",
        *boot,
        # The root disk first (/dev/vda, as the systems' root=), then the ESP (/dev/vdb).
        "-drive", f"file={overlay},format=qcow2,if=virtio", *second_disk,
        "-virtfs", f"local,path={share},mount_tag=share,security_model=none,readonly=on",
        "-nic", "none", "-display", "none", "-monitor", "none",
        # Appended to, not truncated: the EFI session starts qemu once per boot.
        "-chardev", f"file,id=console,path={console},append=on", "-serial", "chardev:console",
        "-chardev", f"file,id=reports,path={reports},append=on", "-serial", "chardev:reports",
    ]  # fmt: skip
    if efi:
        # OVMF under TCG with two vCPUs now and then hangs in a warm reset before it prints
        # anything (seen in CI: the console ends at "reboot: machine restart" and the
        # session times out). So every reboot of the EFI session is a cold start: qemu exits
        # on the guest's reset and starts again on the same disks and the same EFI
        # variables, which hold systemd-boot's one-time entry, as a power cycle would.
        argv.append("-no-reboot")
    started = time.monotonic()
    deadline = started + GUEST_TIMEOUT_SECONDS
    returncode: int | None = None
    for _ in range(MAX_BOOTS):
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        try:
            returncode = qemu.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
        if not efi or returncode != 0 or powered_off(console.read_text(errors="replace")):
            break
    seconds = time.monotonic() - started
    return GuestRun(
        systems={},
        events=parse_reports(reports.read_text(errors="replace")) if reports.exists() else [],
        console=console.read_text(errors="replace") if console.exists() else "",
        seconds=seconds,
        qemu_returncode=returncode,
    )


@pytest.fixture(scope="module")
def guest() -> Iterator[GuestRun]:
    yield from run_guest("install", SYSTEM_NAMES)


@pytest.fixture(scope="module")
def resident_guest() -> Iterator[GuestRun]:
    """A boot of its own: the resident collector's scenario only."""
    yield from run_guest("resident", ("initial", "switched"))


@pytest.fixture(scope="module")
def efi_guest() -> Iterator[GuestRun]:
    """A session of its own booted by UEFI firmware and systemd-boot: reboot trials with
    a one-time boot entry."""
    yield from run_guest("efi-install", EFI_SYSTEM_NAMES, efi=True)


def run_guest(first_phase: str, names: tuple[str, ...], efi: bool = False) -> Iterator[GuestRun]:
    tools: tuple[str, ...] = (
        "qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4", "nix-build", "nix"
    )  # fmt: skip
    if efi:
        tools += ("sfdisk", "mkfs.vfat", "mcopy")
        for firmware in (OVMF_CODE, OVMF_VARS):
            require(firmware.exists(), f"{firmware} is missing (Debian's ovmf)")
    for tool in tools:
        require(shutil.which(tool) is not None, f"{tool} is not on PATH")
    require(os.geteuid() == 0, "building the guest image (debootstrap, chroot) needs root")
    started = time.monotonic()
    image = guest_image()
    work = Path(tempfile.mkdtemp(prefix="nixos-autodeploy-guest-"))
    try:
        share = work / "share"
        (share / "project").mkdir(parents=True)
        for package in ("collector", "actuator"):
            shutil.copytree(
                REPO / package,
                share / "project" / package,
                ignore=shutil.ignore_patterns("__pycache__"),
            )
        shutil.copy(GUEST_DIR / "driver.py", share / "driver.py")
        shutil.copy(REPO / "tests/harness/fleetlock.py", share / "fleetlock.py")
        systems, public_key = build_systems(image, work, share / "cache", names)
        config = {
            "systems": systems,
            "public_key": public_key,
            "switch_unit": SWITCH_UNIT,
            "fleet_lock_app_id": fleetlock.APP_ID,
            "efi": efi,
        }
        (share / "guest.json").write_text(json.dumps(config | {"first_phase": first_phase}))
        kernel_params = Path(work / "store" / systems["initial"].lstrip("/"), "kernel-params")
        prepared = time.monotonic()
        result = boot_guest(image, share, work, kernel_params.read_text(), efi=efi)
        result = dataclasses.replace(result, systems=systems)
        print(
            f"guest test: image+systems {prepared - started:.0f} s, "
            f"guest session {result.seconds:.0f} s, total {time.monotonic() - started:.0f} s"
        )
        yield result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def activation_lines(guest: GuestRun, links: dict[str, Any], system: str) -> list[list[str]]:
    """The activations.log lines of one system: [step, path, action, time, cgroup]."""
    path = guest.systems[system]
    return [line.split() for line in links["activations"] if f" {path} " in line]


def test_guest_ran_every_scenario_without_error(guest: GuestRun) -> None:
    guest.show()
    assert [e for e in guest.events if e["event"] in ("error", "unparsable")] == []
    assert "finished" in guest.names()
    assert guest.qemu_returncode == 0, "qemu did not exit by the guest powering off"


def test_install_starts_tracking_the_current_system(guest: GuestRun) -> None:
    guest.show()
    installed = guest.event("installed")
    initial = guest.systems["initial"]
    assert installed["agent_rc"] == 0
    assert installed["current"] == initial
    assert installed["booted"] == initial
    assert installed["deployed"]["path"] == initial


def test_switch_runs_activation_in_transient_unit(guest: GuestRun) -> None:
    guest.show()
    switch = guest.event("switch")
    switched = guest.systems["switched"]
    assert switch["agent_rc"] == 0
    assert switch["current"] == switched
    assert switch["profile"] == switched
    assert switch["deployed"]["path"] == switched
    assert switch["deployed"]["mode"] == "switch"
    steps = activation_lines(guest, switch, "switched")
    assert [step[:3] for step in steps] == [
        ["start", switched, "switch"],
        ["done", switched, "switch"],
    ]
    # The activation's cgroup is the transient unit's, not the agent's service.
    assert steps[0][4].endswith(f"/system.slice/{SWITCH_UNIT}"), steps[0]
    # The transient unit's own journal: systemd started it for this activation.
    started = f"Started {SWITCH_UNIT} - {switched}/bin/switch-to-configuration switch."
    assert started in switch["switch_journal"]


def test_activation_survives_restart_of_agent_unit(guest: GuestRun) -> None:
    guest.show()
    restart = guest.event("restart")
    slow = guest.systems["slow"]
    assert restart["activation_started"] is True
    assert restart["restart_rc"] is not None, "the agent's unit was not restarted"
    assert restart["activation_finished"] is True
    steps = activation_lines(guest, restart, "slow")
    # Exactly one activation, started before the restart and finished after it.
    assert [step[:3] for step in steps] == [["start", slow, "switch"], ["done", slow, "switch"]]
    assert steps[0][4].endswith(f"/system.slice/{SWITCH_UNIT}"), steps[0]
    assert restart["current"] == slow
    assert restart["status"]["state"] == "up-to-date"
    assert restart["status"]["dirty"] is False


def failures(event: dict[str, Any]) -> float:
    counter = 'nixos_autodeploy_deployments_total{result="failure"} '
    (line,) = [line for line in event["metrics"] if line.startswith(counter)]
    return float(line.removeprefix(counter))


def test_restarted_agent_records_no_failure_for_running_activation(guest: GuestRun) -> None:
    """The restarted agent finds the activation still running in its unit: that is
    not a failed deploy (it would alert, and block the path until upstream changes)."""
    guest.show()
    restart = guest.event("restart")
    assert restart["restart_rc"] == 0, "the restarted agent's unit failed"
    assert restart["status"]["last_deploy"]["result"] == "success"
    # No more failures than the broken system's rolled-back deploy before it.
    assert failures(restart) == failures(guest.event("broken")) == 1


def test_smart_kexec_boots_new_kernel(guest: GuestRun) -> None:
    guest.show()
    after = guest.event("after-kexec")
    kexeced = guest.systems["kexeced"]
    # The running kernel's command line is the new system's: a kexec happened, with
    # its kernel-params (a reset would have booted qemu's own command line).
    assert "autodeploy=kexeced" in after["cmdline"].split()
    # systemd's kexec (systemctl kexec), then the kernel jumping into the loaded one.
    assert "Reboot via kexec" in guest.console
    assert "kexec_core: Starting new kernel" in guest.console
    assert after["booted"] == kexeced
    assert after["current"] == kexeced
    # A trial: the profile and the boot entry stayed on the old system until the run
    # after the boot had checked the new one.
    switched_or_slow = after["before_confirmation"]["profile"]
    assert switched_or_slow == guest.systems["slow"]
    assert after["before_confirmation"]["boot_entry"] == guest.systems["slow"]
    assert after["agent_rc"] == 0
    assert after["profile"] == kexeced
    assert after["boot_entry"] == kexeced
    assert after["deployed"]["path"] == kexeced
    assert "panic=30" in after["cmdline"].split()
    assert after["deploys"]["health"]["ok"] is True
    assert [c["name"] for c in after["deploys"]["health"]["checks"]] == ["systemd", "upstream"]
    steps = activation_lines(guest, after, "kexeced")
    assert [step[:3] for step in steps] == [["start", kexeced, "boot"], ["done", kexeced, "boot"]]
    status = after["status"]
    assert after["collect_rc"] == 0
    assert status["state"] == "up-to-date"
    assert status["reboot_required"] is False
    assert status["dirty"] is False


def test_reboot_mode_reboot_comes_back_up_to_date(guest: GuestRun) -> None:
    guest.show()
    before, after = guest.event("after-kexec"), guest.event("after-reboot")
    rebooted = guest.systems["rebooted"]
    assert after["boot_id"] != before["boot_id"]
    # qemu booted its own -kernel/-append again: a real reset, not a kexec.
    assert "autodeploy=initial" in after["cmdline"].split()
    assert "reboot: Restarting system" in guest.console
    assert after["booted"] == rebooted
    assert after["current"] == rebooted
    assert after["profile"] == rebooted
    steps = activation_lines(guest, after, "rebooted")
    assert [step[:3] for step in steps] == [
        ["start", rebooted, "boot"],
        ["done", rebooted, "boot"],
    ]
    status = after["status"]
    assert after["collect_rc"] == 0
    assert status["state"] == "up-to-date"
    assert status["reboot_required"] is False
    assert status["dirty"] is False


def test_reboot_waits_for_a_fleet_lock_slot_then_reboots_and_gives_it_back(
    guest: GuestRun,
) -> None:
    """A real `systemctl reboot` that waited for a slot: refused while another host holds
    the group's one slot, taken once it is free, given back after the new boot."""
    guest.show()
    waiting = guest.event("reboot-waiting")
    freed = guest.event("slot-freed")
    after = guest.event("after-reboot")
    kexeced, rebooted = guest.systems["kexeced"], guest.systems["rebooted"]
    other = "0" * 31 + "1"
    ident = waiting["fleet_id"]  # systemd-id128 machine-id --app-specific=APP_ID
    assert len(ident) == 32 and ident != other

    assert waiting["other_took"] == 200
    assert waiting["agent_rc"] == 0
    assert waiting["holders"] == [other]
    # The trial boot waits for its slot before anything changes: still the same boot, on
    # the old system, the profile (the boot loader's default) untouched.
    assert waiting["boot_id"] == guest.event("after-kexec-unbootable")["boot_id"]
    assert (waiting["booted"], waiting["current"], waiting["profile"]) == (kexeced,) * 3
    status = waiting["status"]
    assert status["state"] == "update-available"
    assert status["reboot_wait"]["reason"] == "fleet-lock"
    assert status["reboot_wait"]["message"].startswith("reboot slot refused by fleet lock: ")
    assert "failed_lock_semaphore_full" in status["reboot_wait"]["message"]
    assert status["fleet_lock_held"] is False
    assert 'nixos_autodeploy_reboot_pending_reason{reason="fleet-lock"} 1.0' in waiting["metrics"]
    assert any("reboot slot refused by fleet lock" in line for line in waiting["journal"])

    assert freed["other_released"] == 200
    assert freed["holders"] == []

    # The real reboot happened, into the new system, with the slot this host took (its ID
    # as systemd derives it); the actuator's next run gave the slot back.
    assert after["boot_id"] != waiting["boot_id"]
    assert (after["booted"], after["current"]) == (rebooted, rebooted)
    assert after["fleet_id"] == ident, "the host ID changed across the reboot"
    assert after["holders_at_boot"] == [ident]
    assert after["release_rc"] == 0
    assert after["holders"] == []
    assert after["status"]["fleet_lock_held"] is False
    assert after["status"]["reboot_wait"] is None


def test_resident_collector_is_a_notify_service_that_picks_up_a_switch(
    resident_guest: GuestRun,
) -> None:
    guest = resident_guest
    guest.show()
    assert [e for e in guest.events if e["event"] in ("error", "unparsable")] == []
    resident = guest.event("resident")
    initial, switched = guest.systems["initial"], guest.systems["switched"]
    # `systemctl start` returned once the first poll had finished (READY=1).
    assert resident["start_rc"] == 0, resident["start_stderr"]
    ready = resident["ready"]
    assert (ready["Type"], ready["ActiveState"], ready["SubState"]) == (
        "notify",
        "active",
        "running",
    )
    assert ready["WatchdogUSec"] == "1h 31min"  # the module's: 3600 s + 60 s + 30 min
    assert int(ready["WatchdogTimestampMonotonic"]) > 0, "no WATCHDOG=1 reached systemd"
    assert ready["StatusText"].startswith("untracked; current "), ready
    assert os.path.basename(initial) in ready["StatusText"]
    assert resident["snapshot_ready"]["current"] == initial
    # The hand switch reached it through the reload (SIGHUP), not its next poll an hour on.
    assert resident["reload_rc"] == 0
    assert resident["seen"] is True
    after = resident["after"]
    assert after["MainPID"] == ready["MainPID"], "restarted, not reloaded"
    assert after["NRestarts"] == "0"
    assert os.path.basename(switched) in after["StatusText"], after
    assert int(after["WatchdogTimestampMonotonic"]) > int(ready["WatchdogTimestampMonotonic"])
    assert "SIGHUP: collecting now" in resident["journal"]
    assert resident["snapshot_after"]["current"] == switched
    assert resident["snapshot_after"]["upstream"]["path"] == initial
    # SIGTERM: a clean exit.
    stopped = resident["stopped"]
    assert resident["stop_rc"] == 0
    assert (stopped["ActiveState"], stopped["Result"]) == ("inactive", "success"), stopped
    assert stopped["ExecMainStatus"] == "0", stopped
    assert "stopped" in resident["journal"]
    assert any(line.startswith("nixos_autodeploy_info{") for line in resident["metrics"])


def boots_in(guest: GuestRun, phase: str) -> int:
    return sum(1 for e in guest.events if e["event"] == "boot" and e["phase"] == phase)


def test_switch_to_a_system_with_a_failing_unit_is_rolled_back_by_systemd(
    guest: GuestRun,
) -> None:
    guest.show()
    broken = guest.event("broken")
    switched = guest.systems["switched"]
    assert broken["agent_rc"] != 0
    health = broken["deploys"]["health"]
    assert health["ok"] is False and health["path"] == guest.systems["broken"]
    assert (
        "check 'systemd' failed: failed units: autodeploy-guest-broken.service"
        in (health["summary"])
    )
    # Switched to broken, then back to switched, both in the transient unit.
    assert [step[:3] for step in activation_lines(guest, broken, "broken")] == [
        ["start", guest.systems["broken"], "switch"],
        ["done", guest.systems["broken"], "switch"],
    ]
    assert [step[:3] for step in activation_lines(guest, broken, "switched")][-2:] == [
        ["start", switched, "switch"],
        ["done", switched, "switch"],
    ]
    assert (broken["current"], broken["profile"], broken["boot_entry"]) == (switched,) * 3
    assert broken["deployed"]["path"] == switched
    assert broken["deploys"]["rollbacks"] == 1
    assert guest.systems["broken"] in broken["deploys"]["failed"]
    assert broken["status"]["state"] == "update-available"
    assert broken["status"]["dirty"] is False
    assert "nixos_autodeploy_rollbacks_total 1.0" in broken["metrics"]


def kernel_command_lines(console: str) -> list[list[str]]:
    """The command line of every kernel that started, as each printed it."""
    marker = "Kernel command line: "
    return [line.split(marker, 1)[1].split() for line in console.splitlines() if marker in line]


def panicked_in_stage_1(console: str, system: str) -> list[str]:
    """The console's lines from the stage 1 that found no init of system's, up to the
    kernel's reset (panic=); empty when that did not happen."""
    lines = console.replace("\r", "").splitlines()
    said = f"stage 1: {system}/init is not on the root file system; boot.panic_on_fail: panicking"
    found = [i for i, line in enumerate(lines) if said in line]
    return lines[found[0] : found[0] + 80] if found else []


def test_kexec_trial_into_an_unbootable_system_comes_back_and_stays(guest: GuestRun) -> None:
    guest.show()
    after = guest.event("after-kexec-unbootable")
    kexeced, unbootable = guest.systems["kexeced"], guest.systems["unbootable"]
    # The kexec'd kernel got boot.panic_on_fail from the agent; the stage 1 found no init
    # and panicked the kernel, whose panic= reset the machine; the firmware then booted
    # qemu's own kernel command line (the boot loader's default).
    trial = [c for c in kernel_command_lines(guest.console) if f"init={unbootable}/init" in c]
    assert len(trial) == 1 and "boot.panic_on_fail" in trial[0], trial
    panic = panicked_in_stage_1(guest.console, unbootable)
    assert any("Kernel panic - not syncing" in line for line in panic), panic
    assert any("Rebooting in 30 seconds" in line for line in panic), panic
    assert guest.console.count("Kernel panic - not syncing") == 1
    assert "autodeploy=initial" in after["cmdline"].split()
    assert (after["current"], after["profile"], after["boot_entry"]) == (kexeced,) * 3
    assert after["agent_rc"] != 0
    said = " ".join(after["journal"])
    assert (
        f"did not come up on its trial boot: the host came back on {kexeced.split('/')[-1]}" in said
    )
    assert unbootable in after["deploys"]["failed"]
    assert after["deploys"]["last_rollback"]["from"] == unbootable
    assert after["second_rc"] == 0, "the timer's next run leaves it alone"
    assert "not retried" in " ".join(after["second_journal"])
    assert after["status"]["state"] == "update-available" and after["status"]["dirty"] is False
    # No further reboot: the next boot is the next scenario's own reboot.
    assert boots_in(guest, "after-kexec-unbootable") == 1
    phases = [e["phase"] for e in guest.events if e["event"] == "boot"]
    assert phases[phases.index("after-kexec-unbootable") + 1] == "after-reboot"


def boot_event(guest: GuestRun, phase: str) -> dict[str, Any]:
    found = [e for e in guest.events if e["event"] == "boot" and e["phase"] == phase]
    assert len(found) == 1, f"{len(found)} boots into phase {phase!r}"
    return found[0]


def test_reboot_trial_failing_its_check_reboots_back_once(guest: GuestRun) -> None:
    guest.show()
    trial = boot_event(guest, "after-reboot-unhealthy")
    back = guest.event("after-rollback-reboot")
    rebooted, unhealthy = guest.systems["rebooted"], guest.systems["unhealthy"]
    # The trial boot: unhealthy was the boot entry and came up.
    assert (trial["current"], trial["boot_entry"]) == (unhealthy, unhealthy)
    # Its run after the boot failed the check, went back and rebooted, once.
    said = " ".join(back["previous_journal"])
    assert "failed its health checks after its trial boot" in said
    assert trial["boot_id"] != back["boot_id"]
    assert (back["current"], back["profile"], back["boot_entry"]) == (rebooted,) * 3
    assert back["agent_rc"] == 0
    assert back["agent_journal"]["phase"] == "rolled-back"
    assert back["deploys"]["last_rollback"]["from"] == unhealthy
    assert unhealthy in back["deploys"]["failed"]
    assert back["status"]["state"] == "update-available" and back["status"]["dirty"] is False
    assert boot_event(guest, "after-rollback-reboot")
    assert boots_in(guest, "done") == 0, "no reboot after the rollback reboot"


# The EFI session: reboot trials with systemd-boot's one-time entry.


def loader_default(event: dict[str, Any]) -> str | None:
    """The `default` of the loader.conf the event saw."""
    for line in (event["loader_conf"] or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "default":
            return value.strip()
    return None


def entry_of(event: dict[str, Any], system: str) -> str:
    """The name of the one boot entry, on the ESP the event saw, that boots system."""
    names: list[str] = [
        n for n, text in event["entries"].items() if f" init={system}/init " in text
    ]
    assert len(names) == 1, f"entries booting {system}: {names} in {event['entries']}"
    return names[0]


def shutdowns_in(guest: GuestRun, phase: str) -> list[dict[str, Any]]:
    """What the boot loader was left with each time the guest went down in phase."""
    return [e for e in guest.events if e["event"] == "shutdown" and e["phase"] == phase]


def wall_time(guest: GuestRun, scenario: str, end: dict[str, Any]) -> float:
    """From the start of a scenario (the guest's clock) to its last report."""
    (start,) = [e for e in guest.events if e["event"] == "scenario" and e["name"] == scenario]
    seconds = float(end["at"]) - float(start["at"])
    print(f"wall time of the EFI scenario {scenario!r}: {seconds:.0f} s")
    return seconds


def test_efi_guest_ran_every_scenario_without_error(efi_guest: GuestRun) -> None:
    guest = efi_guest
    guest.show()
    assert [e for e in guest.events if e["event"] in ("error", "unparsable")] == []
    assert "finished" in guest.names()
    assert guest.qemu_returncode == 0, "qemu did not exit by the guest powering off"
    # Every boot went through the firmware and systemd-boot (no -kernel in this session).
    boots = [e for e in guest.events if e["event"] == "boot"]
    assert len(boots) == 5, [b["phase"] for b in boots]
    assert all((b["loader_info"] or "").startswith("systemd-boot ") for b in boots), boots


def test_efi_install_makes_the_first_generation_the_default_entry(efi_guest: GuestRun) -> None:
    guest = efi_guest
    guest.show()
    installed = guest.event("efi-installed")
    initial = guest.systems["initial"]
    assert installed["agent_rc"] == 0
    assert installed["generations"] == {"system-1-link": initial}
    entry = entry_of(installed, initial)
    assert entry == "nixos-generation-1.conf"
    assert loader_default(installed) == entry
    text = installed["entries"][entry]
    kernel, initrd = (
        line.split()[1] for line in text.splitlines() if line.split()[0] in ("linux", "initrd")
    )
    # Kernel and initrd copied to the ESP under names taken from their store paths.
    assert kernel.startswith("/EFI/nixos/") and kernel.endswith("-bzImage.efi")
    assert initrd.startswith("/EFI/nixos/") and initrd.endswith("-initrd.efi")
    assert sorted(installed["images"]) == sorted(p.rsplit("/", 1)[1] for p in (kernel, initrd))
    assert installed["current"] == installed["booted"] == initial


def test_efi_reboot_trial_boots_the_new_system_once_then_makes_it_the_default(
    efi_guest: GuestRun,
) -> None:
    """Scenario a: the trial boots NEW through a one-time entry while the default stays
    OLD; NEW passes its checks and becomes the profile and the default; one reboot."""
    guest = efi_guest
    guest.show()
    initial, new = guest.systems["initial"], guest.systems["rebooted"]
    (down,) = shutdowns_in(guest, "efi-after-trial")
    # As the guest went down for the trial: NEW's entry is written and is the one-shot;
    # the default (loader.conf, and the profile) is still OLD.
    assert loader_default(down) == entry_of(down, initial) == "nixos-generation-1.conf"
    assert down["entry_oneshot"] == entry_of(down, new) == "nixos-generation-2.conf"
    assert down["profile"] == initial
    assert down["generations"] == {"system-1-link": initial, "system-2-link": new}
    after = guest.event("efi-after-trial")
    before = after["before_confirmation"]
    # systemd-boot booted NEW's entry, once (the one-shot is used up), with its init=.
    assert before["entry_selected"] == "nixos-generation-2.conf"
    assert before["entry_oneshot"] is None
    assert f"init={new}/init" in after["cmdline"].split()
    assert "autodeploy=rebooted" in after["cmdline"].split()
    assert (before["booted"], before["current"]) == (new, new)
    assert (before["profile"], loader_default(before)) == (initial, "nixos-generation-1.conf")
    # Confirmed: the profile and systemd-boot's default moved to NEW.
    assert after["agent_rc"] == 0, after["journal"]
    assert after["agent_journal"]["trial"] == "oneshot"
    assert after["agent_journal"]["phase"] == "done"
    assert (after["booted"], after["current"], after["profile"]) == (new,) * 3
    assert loader_default(after) == entry_of(after, new)
    assert after["deployed"]["path"] == new
    assert after["deploys"]["health"]["ok"] is True
    # OLD's switch-to-configuration boot wrote NEW's entry before the reboot; NEW's after.
    assert [step[:3] for step in activation_lines(guest, after, "initial")][-2:] == [
        ["start", initial, "boot"],
        ["done", initial, "boot"],
    ]
    assert [step[:3] for step in activation_lines(guest, after, "rebooted")] == [
        ["start", new, "boot"],
        ["done", new, "boot"],
    ]
    assert after["status"]["state"] == "up-to-date"
    assert after["status"]["reboot_required"] is False
    assert boots_in(guest, "efi-after-trial") == 1, "exactly one reboot"
    wall_time(guest, "rebooted", after)


def test_efi_reboot_trial_failing_its_check_reboots_back_once(efi_guest: GuestRun) -> None:
    """Scenario b: a one-time boot into a system whose operator check fails; the run after
    the boot rolls back and reboots once, into the default, which never moved."""
    guest = efi_guest
    guest.show()
    old, unhealthy = guest.systems["rebooted"], guest.systems["unhealthy"]
    (down,) = shutdowns_in(guest, "efi-after-unhealthy")
    assert down["entry_oneshot"] == entry_of(down, unhealthy)
    assert loader_default(down) == entry_of(down, old)
    trial = boot_event(guest, "efi-after-unhealthy")
    assert trial["entry_selected"] == entry_of(trial, unhealthy)
    assert (trial["booted"], trial["current"]) == (unhealthy, unhealthy)
    assert loader_default(trial) == entry_of(trial, old)
    # The rollback reboot: nothing one-shot, the default still OLD.
    (back_down,) = shutdowns_in(guest, "efi-after-rollback")
    assert back_down["entry_oneshot"] is None
    assert loader_default(back_down) == entry_of(back_down, old)
    back = guest.event("efi-after-rollback")
    assert back["entry_selected"] == entry_of(back, old)
    assert (back["booted"], back["current"], back["profile"]) == (old,) * 3
    assert loader_default(back) == entry_of(back, old)
    said = " ".join(back["previous_journal"])
    assert "failed its health checks after its trial boot" in said
    assert back["agent_rc"] == 0, back["journal"]
    assert back["agent_journal"]["phase"] == "rolled-back"
    assert back["deploys"]["last_rollback"]["from"] == unhealthy
    assert unhealthy in back["deploys"]["failed"]
    # The trial's generation went with the rollback, and with it its boot entry.
    assert unhealthy not in back["generations"].values()
    assert not [text for text in back["entries"].values() if f"init={unhealthy}/init" in text]
    assert back["status"]["state"] == "update-available" and back["status"]["dirty"] is False
    assert boot_event(guest, "efi-after-rollback")  # one rollback reboot, no third boot
    wall_time(guest, "unhealthy", back)


def test_efi_reboot_trial_into_an_unbootable_system_comes_back_and_stays(
    efi_guest: GuestRun,
) -> None:
    """Scenario c: the one-time entry boots a system without an init; its own kernel-params
    (panic=10 boot.panic_on_fail) make the stage 1 panic and the kernel reset; systemd-boot
    then boots the default (OLD); the agent records the failure and does not reboot."""
    guest = efi_guest
    guest.show()
    old, unbootable = guest.systems["rebooted"], guest.systems["unbootable-efi"]
    (down,) = shutdowns_in(guest, "efi-after-unbootable")
    oneshot = down["entry_oneshot"]
    assert oneshot == entry_of(down, unbootable)
    assert " panic=10 boot.panic_on_fail" in down["entries"][oneshot]
    assert loader_default(down) == entry_of(down, old)
    panic = panicked_in_stage_1(guest.console, unbootable)
    assert any("Kernel panic - not syncing" in line for line in panic), panic
    assert any("Rebooting in 10 seconds" in line for line in panic), panic
    assert guest.console.count("Kernel panic - not syncing") == 1
    after = guest.event("efi-after-unbootable")
    assert after["entry_selected"] == entry_of(after, old)
    assert (after["booted"], after["current"], after["profile"]) == (old,) * 3
    assert loader_default(after) == entry_of(after, old)
    assert after["agent_rc"] != 0
    assert unbootable in after["deploys"]["failed"]
    assert after["deploys"]["last_rollback"]["from"] == unbootable
    assert unbootable not in after["generations"].values()
    assert not [text for text in after["entries"].values() if f"init={unbootable}/init" in text]
    assert after["second_rc"] == 0, "the timer's next run leaves it alone"
    assert "not retried" in " ".join(after["second_journal"])
    assert after["status"]["state"] == "update-available" and after["status"]["dirty"] is False
    assert boots_in(guest, "efi-after-unbootable") == 1, "no further reboot"
    assert boots_in(guest, "done") == 0
    wall_time(guest, "unbootable-efi", after)
