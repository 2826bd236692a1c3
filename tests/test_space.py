"""Disk space, against real Nix and a real filesystem: a small tmpfs the test mounts as the
sandbox root's store filesystem (collector/space.py measures the store under --root when
the root has one). A store that cannot take the new closure: collect refuses with one
line and nothing changed, then realises once space is freed."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import NEW_KERNEL, AgentResult, Host, System, SystemSpec, error_lines, metric
from harness.deploys import (
    assert_links,
    deploy,
    history,
    journal,
    record,
    state_files,
    tracking,
)

pytestmark = pytest.mark.nix


@pytest.fixture
def small_store(host: Host) -> Iterator[Path]:
    """A 4 MiB tmpfs at <root>/nix/store; fails (never skips) when it cannot be mounted."""
    mount = host.root / "nix/store"
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _fill(mount: Path) -> Path:
    """Take all but a few KiB of the filesystem."""
    st = os.statvfs(mount)
    filler = mount / "filler"
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 8192))
    return filler


def test_collect_refuses_a_realise_the_store_cannot_take_then_retries(
    host: Host, small_store: Path
) -> None:
    systems = host.build_one("old"), host.build_one("new", extra="changed")
    old, new = systems
    host.install(old)
    host.write_deployed(old)
    host.publish(new)
    filler = _fill(small_store)
    before = host.links()
    result = host.collect("--min-free-store", "0")
    assert result.returncode == 1, result  # as any failed fetch or realise
    (line,) = error_lines(result)
    assert line.startswith("error: ") and "not enough space to realise" in line, line
    assert not host.store_path_is_valid(new.path)
    assert host.links() == before
    snapshot = host.snapshot()
    error = snapshot["upstream"]["error"]
    assert error is not None and "not enough space to realise" in error, error
    assert str(small_store) in error and "free" in error
    assert snapshot["upstream"]["path"] != new.path
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_store_free_bytes") < 64 * 1024
    assert metric(text, "nixos_autodeploy_upstream_fetch_success") == 0
    assert metric(text, "nixos_autodeploy_space_refused", filesystem="store") == 1

    filler.unlink()  # the operator frees space; no failure memory: the next poll realises
    result = host.collect("--min-free-store", "0")
    assert result.returncode == 0, result
    assert host.store_path_is_valid(new.path)
    assert host.upstream() == new.path
    snapshot = host.snapshot()
    assert snapshot["upstream"]["error"] is None
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_store_free_bytes") > 3 << 20
    assert metric(text, "nixos_autodeploy_space_refused", filesystem="store") == 0


def test_the_reserve_counts(host: Host, small_store: Path) -> None:
    old, new = host.build_one("old"), host.build_one("new", extra="changed")
    host.install(old)
    host.write_deployed(old)
    host.publish(new)
    result = host.collect("--min-free-store", "1G")  # more than the 4 MiB filesystem has
    assert result.returncode == 1, result
    assert not host.store_path_is_valid(new.path)
    assert "1024.00 MiB must stay free" in host.snapshot()["upstream"]["error"]


def test_a_bad_size_is_one_error_line(host: Host) -> None:
    result = host.collect("--min-free-store", "lots")
    assert result.returncode != 0
    assert error_lines(result) == ["error: not a size: 'lots' (e.g. 1G, 512M, 1048576)"]
    assert not host.state_dir.joinpath("snapshot.json").exists()


def test_deploy_refuses_with_nothing_changed_then_deploys_once_space_is_freed(
    host: Host, small_store: Path
) -> None:
    old, new = host.update_published(collect=False)
    filler = _fill(small_store)
    result = deploy(host, "--min-free-store", "0")
    assert not host.store_path_is_valid(new.path)
    assert_links(host, current=old, profile=old, booted=old)
    assert host.activations() == []
    assert record(host)["path"] == old.path
    ((action, reason),) = [(e["action"], e["reason"]) for e in history(host)]
    assert action == "nothing" and "not enough space to realise" in reason, reason
    (line,) = error_lines(result)
    assert "not enough space to realise" in line, result
    assert result.returncode == 1, result

    filler.unlink()
    result = deploy(host, "--min-free-store", "0")
    assert result.returncode == 0, result
    assert_links(host, current=new, profile=new)


# ---- the boot filesystem and the agent's generations ----------------------------------


@contextlib.contextmanager
def _tmpfs_64k(mount: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs at mount; fails (never skips) when it cannot be mounted."""
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def small_boot(host: Host) -> Iterator[Path]:
    with _tmpfs_64k(host.root / "boot") as mount:
        yield mount


PAGE = 4096
KERNELS = ("6.6.41", "6.6.42", "6.6.43", "6.6.44")  # one length: each adds as much


def _ours(host: Host) -> list[int]:
    """The generations generations.json says the agent made."""
    return list(json.loads((host.state_dir / "generations.json").read_text())["ours"])


def _generation_numbers(host: Host) -> list[int]:
    names = os.listdir(host.profile_link.parent)
    return sorted(int(n.split("-")[1]) for n in names if n.startswith("system-"))


def _three_deploys(host: Host) -> dict[str, System]:
    """A installed by hand (generation 1), then the agent deployed B (2) and C (3); D is
    published. A is booted, C current."""
    built = host.build(*(SystemSpec(n, kernel=k) for n, k in zip("ABCD", KERNELS, strict=True)))
    host.install(built["A"])
    host.write_deployed(built["A"])
    for name in "BC":
        host.publish(built[name])
        assert host.collect().returncode == 0
        result = deploy(host, "--min-free-boot", "0")
        assert result.returncode == 0, result
    host.publish(built["D"])
    assert host.collect().returncode == 0
    assert _generation_numbers(host) == [1, 2, 3]
    assert _ours(host) == [2, 3]
    return built


def _fill_leaving(mount: Path, left: int) -> None:
    st = os.statvfs(mount)
    (mount / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - left))


def test_a_full_boot_filesystem_prunes_the_agents_old_generation_and_deploys(
    host: Host, small_boot: Path
) -> None:
    built = _three_deploys(host)
    _fill_leaving(small_boot, PAGE)
    # The one page left is the reserve: D fits only once B's kernel and initrd go.
    result = deploy(host, "--min-free-boot", str(PAGE))
    assert result.returncode == 0, result
    assert_links(host, current=built["D"], profile=built["D"], booted=built["A"])
    assert _generation_numbers(host) == [1, 3, 4]  # not A's (booted, not ours) nor C's
    assert _ours(host) == [3, 4]
    (removed,) = [e for e in history(host) if e["event"] == "generations-removed"]
    assert removed["message"] == f"2 ({os.path.basename(built['B'].path)})"
    assert "room on" in removed["reason"]


def test_a_boot_filesystem_pruning_cannot_free_refuses_before_the_profile_moves(
    host: Host, small_boot: Path
) -> None:
    built = _three_deploys(host)
    _fill_leaving(small_boot, PAGE)
    before = state_files(host)
    result = deploy(host, "--min-free-boot", str(PAGE + 1), "--prune-foreign")
    assert result.returncode == 1, result
    (line,) = error_lines(result)
    assert (
        f"not enough space on the boot filesystem {small_boot}" in line
        and "--min-free-boot" in line
    ), line
    assert_links(host, current=built["C"], profile=built["C"], booted=built["A"])
    assert _generation_numbers(host) == [1, 2, 3]  # removing would not have been enough
    assert host.activations()[-1] == ("switch", built["C"].path)
    assert not any(e["event"] == "generations-removed" for e in history(host))
    assert state_files(host)["deployed.json"] == before["deployed.json"]


def test_keep_generations_prunes_after_a_confirmed_deploy_never_the_booted_or_current(
    host: Host,
) -> None:
    built = _three_deploys(host)
    result = deploy(host, "--keep-generations", "1", "--prune-foreign")
    assert result.returncode == 0, result
    assert_links(host, current=built["D"], profile=built["D"], booted=built["A"])
    # 2 goes. 3 stays though neither booted, current nor the profile's: the journal needs
    # it (what ran before, its rollback's target). 1 stays, though foreign ones may go:
    # it is booted. 4 is current and the profile's.
    assert _generation_numbers(host) == [1, 3, 4]
    assert _ours(host) == [3, 4]
    (removed,) = [e for e in history(host) if e["event"] == "generations-removed"]
    assert removed["message"] == f"2 ({os.path.basename(built['B'].path)})"
    assert "--keep-generations" in removed["reason"]
    assert metric(host.metrics(), "nixos_autodeploy_generations") == 3


def test_keep_generations_0_never_removes_any(host: Host, small_boot: Path) -> None:
    _three_deploys(host)
    _fill_leaving(small_boot, PAGE)
    result = deploy(host, "--keep-generations", "0", "--min-free-boot", str(PAGE))
    assert result.returncode == 1, result  # pruning would have made room: not allowed
    assert _generation_numbers(host) == [1, 2, 3]
    small_boot.joinpath("filler").unlink()
    result = deploy(host, "--keep-generations", "0", "--min-free-boot", "0")
    assert result.returncode == 0, result
    assert _generation_numbers(host) == [1, 2, 3, 4]


def _kexec(host: Host, *args: str) -> AgentResult:
    """A kexec trial deploy (the kexec and the reboots are recorders); one check round."""
    argv = ("--switch-mode", "boot", "--reboot-mode", "kexec", "--health-timeout", "1")
    return deploy(host, *argv, *args, timeout=5)


def _boots(host: Host) -> list[list[str]]:
    return [argv for argv in host.recorded("systemctl") if argv[:1] in (["reboot"], ["kexec"])]


def _kexec_trial_host(host: Host) -> tuple[System, System]:
    built = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = built["old"], built["new"]
    tracking(host, old, new, collect=True)
    return old, new


def test_a_kexec_trial_whose_confirmation_cannot_fit_is_never_started(
    host: Host, small_boot: Path
) -> None:
    """The boot loader install comes only at the confirmation; the check comes first."""
    old, _new = _kexec_trial_host(host)
    _fill_leaving(small_boot, PAGE)
    result = _kexec(host, "--min-free-boot", str(PAGE))
    assert result.returncode == 1, result
    (line,) = error_lines(result)
    assert "not enough space on the boot filesystem" in line, line
    assert host.recorded("kexec") == [] and _boots(host) == []
    assert (host.current(), host.profile(), host.boot_default()) == (old.path,) * 3
    assert metric(host.metrics(), "nixos_autodeploy_space_refused", filesystem="boot") == 1


def test_a_trial_confirmation_that_cannot_fit_waits_with_nothing_moved_and_is_retried(
    host: Host, small_boot: Path
) -> None:
    old, new = _kexec_trial_host(host)
    assert _kexec(host, "--min-free-boot", str(PAGE)).returncode == 0
    assert _boots(host) == [["kexec"]]
    host.kexec_into(new)
    _fill_leaving(small_boot, PAGE)  # the boot filesystem filled up meanwhile
    result = _kexec(host, "--min-free-boot", str(PAGE))
    assert result.returncode == 1, result
    (line,) = error_lines(result)
    assert "passed its checks, but not enough space on the boot filesystem" in line, line
    # Refused before the profile moved: new runs, the next boot loads old, no reboot.
    assert host.activations() == []
    assert (host.current(), host.profile(), host.boot_default()) == (new.path, old.path, old.path)
    assert _boots(host) == [["kexec"]]
    assert journal(host)["phase"] == "checking"  # open: the next run tries again
    assert metric(host.metrics(), "nixos_autodeploy_space_refused", filesystem="boot") == 1

    small_boot.joinpath("filler").unlink()  # space freed: no failure memory
    confirmed = _kexec(host, "--min-free-boot", str(PAGE))
    assert confirmed.returncode == 0, confirmed
    assert host.activations() == [("boot", new.path)]
    assert (host.current(), host.profile(), host.boot_default()) == (new.path,) * 3
    assert journal(host)["phase"] == "done"
    assert _boots(host) == [["kexec"]]
    assert metric(host.metrics(), "nixos_autodeploy_space_refused", filesystem="boot") == 0


def test_the_boot_dir_names_the_filesystem_checked(host: Host) -> None:
    """--boot-dir /efi (the module's systemd-boot ESP): /efi is checked and reported, not
    the roomy /boot."""
    _three_deploys(host)
    with _tmpfs_64k(host.root / "efi") as esp:
        _fill_leaving(esp, PAGE)
        # One byte more than pruning B would make room for (as in the refusal above).
        result = deploy(host, "--boot-dir", "/efi", "--min-free-boot", str(PAGE + 1))
        assert result.returncode == 1, result
        (line,) = error_lines(result)
        assert f"not enough space on the boot filesystem {esp} " in line, line
        assert metric(host.metrics(), "nixos_autodeploy_boot_free_bytes") <= PAGE
        assert _generation_numbers(host) == [1, 2, 3]
        result = deploy(host, "--min-free-boot", str(PAGE + 1))  # /boot has room
        assert result.returncode == 0, result
        assert _generation_numbers(host) == [1, 2, 3, 4]
