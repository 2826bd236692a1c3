"""Disk space, against real Nix and a real filesystem: a small tmpfs the test mounts as the
sandbox root's store filesystem (collector/space.py measures the store under --root when
the root has one). A store that cannot take the new closure: collect refuses with one
line and nothing changed, then realises once space is freed."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Host, error_lines, metric
from harness.deploys import assert_links, deploy, history, record

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

    filler.unlink()  # the operator frees space; no failure memory: the next poll realises
    result = host.collect("--min-free-store", "0")
    assert result.returncode == 0, result
    assert host.store_path_is_valid(new.path)
    assert host.upstream() == new.path
    snapshot = host.snapshot()
    assert snapshot["upstream"]["error"] is None
    assert metric(host.metrics(), "nixos_autodeploy_store_free_bytes") > 3 << 20


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
