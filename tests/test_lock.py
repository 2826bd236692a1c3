"""The lock collector and actuator share: the actuator waits for it rather than failing;
the collector, finding it held, says so and changes nothing (alone or racing a deploy).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from harness import Host, SystemSpec, require_tool
from harness.deploys import (
    assert_links,
    assert_record,
    held_activation,
    kill_run,
    start_deploy,
    state_files,
    tracking,
)

pytestmark = pytest.mark.nix


def holds_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open (it reached the lock and is waiting on it)."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.path.realpath(fd) == str(path) for fd in fds.iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return False  # the process ended, or closed that fd while we looked


def test_deploy_waits_for_the_lock_then_deploys(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    lock = host.state_dir / "lock"
    # Held until its stdin closes, so the test decides when it ends, not a sleep.
    holder = subprocess.Popen(
        [
            require_tool("flock"),
            "--exclusive",
            str(lock),
            "sh",
            "-c",
            "echo locked; exec cat >/dev/null",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deploy_run: subprocess.Popen[str] | None = None
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        deploy_run = start_deploy(host, timeout=None)
        give_up = time.monotonic() + 120  # a safety net against a hung test, not an assertion
        while not holds_open(deploy_run.pid, lock):
            assert deploy_run.poll() is None, "deploy ended while the lock was held"
            assert time.monotonic() < give_up, "deploy never opened the lock"
            time.sleep(0.05)
        # It has the lock file open but not the lock: it must not act, nor give up.
        assert host.activations() == [] and host.current() == a.path
        assert deploy_run.poll() is None, "deploy gave up instead of waiting for the lock"
        assert host.server.count() == 0, "nothing is fetched before the lock is taken"
        holder.stdin.close()  # the holder ends and the lock is free
        assert holder.wait(timeout=60) == 0
        out, err = deploy_run.communicate(timeout=300)
    finally:
        for process in (holder, deploy_run):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert deploy_run.returncode == 0, out + err
    assert not [line for line in err.splitlines() if line.startswith("error:")], err
    assert host.activations() == [("switch", b.path)]
    assert (host.current(), host.profile()) == (b.path, b.path)
    assert host.read_json("deployed.json")["path"] == b.path
    assert host.snapshot()["state"] == "up-to-date"


def test_lock_held_collect_says_so_and_changes_nothing(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    before = host.links()
    with host.lock_held():
        result = host.collect()
    assert result.returncode == 0, result
    assert "lock" in result.stderr.lower()
    assert host.server.count() == 0
    assert host.links() == before
    assert not (host.state_dir / "snapshot.json").exists()
    assert not host.metrics_path.exists()


def test_collect_racing_a_deploy_finds_the_lock_held_and_changes_nothing(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    os.mkfifo(host.root / "slow-activation")
    deploy_run = start_deploy(host)
    try:
        with held_activation(host, deploy_run):
            before, before_files = host.links(), state_files(host)
            before_metrics = host.metrics()
            host.server.reset_requests()
            racing = host.collect()
            assert racing.returncode == 0, racing
            assert "holds" in racing.stderr and str(host.state_dir / "lock") in racing.stderr
            assert host.server.count() == 0
            assert host.links() == before
            assert state_files(host) == before_files
            assert host.metrics() == before_metrics
            assert host.activations() == [], "the deploy is still inside its activation"
        out, err = deploy_run.communicate(timeout=300)
    finally:
        kill_run(deploy_run)
    assert deploy_run.returncode == 0, out + err
    assert host.activations() == [("switch", b.path)]
    assert_links(host, current=b, profile=b)
    assert_record(host, b, "switch", previous=a)
    assert host.snapshot()["state"] == "up-to-date"
