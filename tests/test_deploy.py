"""`deploy` end to end: real Nix, a signed binary cache on loopback, a sandbox root.

The original tool's NixOS VM test scenarios as operations on a sandbox host, then
everything the actuator adds: switch modes, reboot and kexec, failures, snapshots,
dry runs, the lock, and runs killed half way. Only `systemctl` and `kexec` are
replaced (by the harness' recorders); everything else is the real thing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from harness import (
    AgentResult,
    Host,
    Reply,
    System,
    SystemSpec,
    error_lines,
    metric,
    point_link,
    read_link,
    run_checked,
)

from actuator import transaction
from actuator.transaction import STOP_AT, Phase

pytestmark = pytest.mark.nix

NEW_KERNEL = "6.6.1"  # the default SystemSpec kernel is 6.1.0


# ---- helpers -------------------------------------------------------------------


def deploy(host: Host, *args: str) -> AgentResult:
    """`nixos-autodeploy deploy` against the host's server, writing the host's metrics."""
    return host.run_agent("deploy", *deploy_args(host, *args))


def deploy_args(host: Host, *args: str) -> list[str]:
    return [
        "--url",
        host.url,
        "--timeout",
        "30",
        "--prometheus-path",
        str(host.metrics_path),
        *args,
    ]


def record(host: Host) -> Any:
    """The deployed record (deployed.json), or None when there is none."""
    path = host.state_dir / "deployed.json"
    return json.loads(path.read_text()) if path.exists() else None


def deployed_mirror(host: Host) -> str | None:
    return read_link(host.root / "run/deployed-system")


def history(host: Host) -> list[dict[str, Any]]:
    path = host.state_dir / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def decisions(host: Host) -> list[tuple[str, str]]:
    """(action, state) of each decision in the history."""
    return [(e["action"], e["state"]) for e in history(host) if e["event"] == "decision"]


def state_files(host: Host) -> dict[str, bytes]:
    """Everything in the state dir but the lock file, for before/after comparison."""
    return {
        p.name: p.read_bytes()
        for p in sorted(host.state_dir.iterdir())
        if p.is_file() and p.name != "lock"
    }


def assert_links(
    host: Host, *, current: System, profile: System, booted: System | None = None
) -> None:
    assert host.current() == current.path
    assert host.profile() == profile.path
    if booted is not None:
        assert host.booted() == booted.path


def assert_record(
    host: Host, path: System, mode: str, previous: System | None, rebooted: bool = False
) -> None:
    """deployed.json and its /run/deployed-system mirror point at `path`."""
    deployed = record(host)
    assert deployed is not None, "no deployed record"
    assert (deployed["version"], deployed["path"], deployed["mode"]) == (1, path.path, mode)
    assert deployed["previous"] == (previous.path if previous else None)
    assert (deployed["reboot_issued_at"] is not None) is rebooted
    assert deployed_mirror(host) == path.path


def switch_by_hand(host: Host, system: System) -> None:
    """`switch-to-configuration switch` alone, without touching the profile (as colmena's
    `apply-local` or a hand-run activation does)."""
    path = host.realise(system)
    run_checked([f"{path}/bin/switch-to-configuration", "switch"], env=host.agent_env())


def log_reboot_call_order(host: Host) -> Path:
    """Make the harness' systemctl and kexec recorders also append their name to one log,
    so a test sees the order of the calls across both (kexec must load first)."""
    order = host.tmp / "reboot-order.log"
    for name in ("kexec", "systemctl"):
        script = host.bin_dir / name
        script.write_text(script.read_text() + f"printf '%s\\n' {name} >> '{order}'\n")
    return order


def reboot_calls(order: Path) -> list[str]:
    return order.read_text().split() if order.exists() else []


def start_deploy(host: Host, *args: str) -> subprocess.Popen[str]:
    """`deploy` in the background (see Host.start_agent)."""
    return host.start_agent("deploy", *deploy_args(host, *args))


@contextmanager
def held_activation(host: Host, deploy_run: subprocess.Popen[str]) -> Iterator[None]:
    """Hold `deploy_run` inside switch-to-configuration until the block ends.

    The synthetic switch-to-configuration sleeps for `cat <root>/slow-activation` seconds
    (what `host.slow_activation` writes) before it acts. Made a FIFO, that `cat` blocks
    until we write: opening the FIFO for writing succeeds once the activation has it open,
    so the test knows, without guessing a duration, that the deploy is inside the
    activation, with the profile set and the lock held. Leaving the block lets it go on.
    """
    fifo = host.root / "slow-activation"
    writer = -1
    give_up = time.monotonic() + 300  # a safety net against a hung test, not an assertion
    while writer < 0:
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            if deploy_run.poll() is not None:
                out, err = deploy_run.communicate()
                raise AssertionError(f"deploy ended before its activation:\n{out}{err}") from None
            assert time.monotonic() < give_up, "deploy never reached its activation"
            time.sleep(0.05)
    try:
        yield
    finally:
        # sleep 0: the activation goes on (unless the test killed it: no reader left)
        with contextlib.suppress(BrokenPipeError):
            os.write(writer, b"0\n")
        os.close(writer)


def stop(deploy_run: subprocess.Popen[str]) -> None:
    """Make sure a background deploy this test started is gone."""
    if deploy_run.poll() is None:
        os.killpg(deploy_run.pid, signal.SIGKILL)
    deploy_run.communicate()


def journal(host: Host) -> Any:
    """The deploy journal (journal.json), or None when there is none."""
    path = host.state_dir / "journal.json"
    return json.loads(path.read_text()) if path.exists() else None


def deploy_killed_at(host: Host, phase: str, *args: str) -> None:
    """A deploy stopped, as by kill -9, right after it journaled phase (the actuator's
    deterministic hook: no timing involved)."""
    result = host.run_agent("deploy", *deploy_args(host, *args), env={STOP_AT: phase})
    assert result.returncode == -signal.SIGKILL, result
    assert journal(host)["phase"] == phase


def kill_agent_when(host: Host, tool: str, argument: str, *, after: bool = False) -> None:
    """The next run of `tool` with `argument` kills the agent that started it (kill -9 of
    its parent), before the tool acts or, with after, once it has; only once."""
    wrapper = host.bin_dir / tool
    shebang, _, rest = wrapper.read_text().partition("\n")
    marker = host.tmp / f"killed-at-{tool}"
    act = f"'{host.real_tools[tool]}' \"$@\"; " if after else ""
    trap = (
        f'case " $* " in *" {argument} "*) if [ ! -e \'{marker}\' ]; then '
        f"touch '{marker}'; {act}kill -9 \"$PPID\"; exit 137; fi ;; esac\n"
    )
    wrapper.write_text(f"{shebang}\n{trap}{rest}")


def tracking(host: Host, installed: System, upstream: System) -> None:
    """A host the agent tracks: it runs `installed`, recorded as deployed; CI publishes
    `upstream`."""
    host.install(installed)
    host.write_deployed(installed, previous=installed)
    host.publish(upstream)


# ---- the original tool's scenarios ------------------------------------------------


def test_fresh_host_matching_upstream_starts_tracking(host: Host) -> None:
    a = host.build_one("a")
    host.install(a)
    host.publish(a)
    result = deploy(host)
    assert result.returncode == 0, result
    assert_record(host, a, "switch", previous=a)
    assert_links(host, current=a, profile=a, booted=a)
    assert host.activations() == []
    assert host.recorded("nix-env") == []
    assert decisions(host) == [("track", "untracked")]
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["dirty"]) == ("up-to-date", False)
    assert snapshot["deployed"]["path"] == a.path


def test_fresh_host_differing_from_upstream_is_dirty_and_changes_nothing(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    host.install(a)
    host.publish(b)
    before = host.links()
    result = deploy(host)
    assert result.returncode == 0, result
    assert host.links() == {**before, "upstream": b.path}, "only the collection pinned upstream"
    assert record(host) is None and deployed_mirror(host) is None
    assert host.activations() == [] and host.recorded("nix-env") == []
    assert decisions(host) == [("nothing", "dirty")]
    assert host.snapshot()["dirty"] is True
    assert metric(host.metrics(), "nixos_autodeploy_dirty") == 1


def test_differing_record_and_matching_upstream_resumes_tracking(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    host.install(a)
    host.write_deployed(b)
    host.publish(a)
    result = deploy(host)
    assert result.returncode == 0, result
    assert_record(host, a, "switch", previous=a)
    assert_links(host, current=a, profile=a)
    assert host.activations() == []
    assert decisions(host) == [("track", "untracked")]
    assert host.snapshot()["state"] == "up-to-date"


def test_differing_record_and_differing_upstream_is_dirty(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    host.install(a)
    host.write_deployed(b)
    host.publish(c)
    before_record = (host.state_dir / "deployed.json").read_bytes()
    before = host.links()
    result = deploy(host)
    assert result.returncode == 0, result
    assert host.links() == {**before, "upstream": c.path}
    assert (host.state_dir / "deployed.json").read_bytes() == before_record
    assert host.activations() == [] and host.recorded("nix-env") == []
    assert decisions(host) == [("nothing", "dirty")]
    (reason,) = [line for line in result.stderr.splitlines() if "dirty:" in line]
    for name in (a.basename, b.basename, c.basename, "--force overrides"):
        assert name in reason, reason


def test_tracking_and_same_upstream_is_up_to_date_and_runs_nothing(host: Host) -> None:
    a = host.build_one("a")
    tracking(host, a, a)
    before = host.links()
    before_record = (host.state_dir / "deployed.json").read_bytes()
    result = deploy(host, "--reboot-mode", "reboot")
    assert result.returncode == 0, result
    assert host.links() == {**before, "upstream": a.path}
    assert (host.state_dir / "deployed.json").read_bytes() == before_record
    assert host.activations() == []
    assert host.recorded("nix-env") == [] and host.recorded("systemd-run") == []
    assert host.recorded("systemctl") == [] and host.recorded("kexec") == []
    assert decisions(host) == [("nothing", "up-to-date")]
    assert not (host.state_dir / "deploys.json").exists()


def test_tracking_and_new_upstream_deploys(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    result = deploy(host)
    assert result.returncode == 0, result
    assert host.activations() == [("switch", b.path)]
    assert host.recorded("nix-env") == [["--profile", str(host.profile_link), "--set", b.path]]
    assert_links(host, current=b, profile=b, booted=a)
    assert host.boot_default() == b.path
    assert_record(host, b, "switch", previous=a)
    assert host.recorded("systemctl") == [] and host.recorded("kexec") == []
    # One history line per decision and per action.
    events = history(host)
    assert [e["event"] for e in events] == ["decision", "health", "deploy"]
    assert (events[0]["action"], events[0]["state"]) == ("deploy", "update-available")
    assert b.basename in events[0]["reason"]
    assert (events[1]["path"], events[1]["ok"]) == (b.path, True)
    assert {k: events[2][k] for k in ("path", "mode", "result", "message")} == {
        "path": b.path,
        "mode": "switch",
        "result": "success",
        "message": "",
    }
    deploys = host.read_json("deploys.json")
    assert deploys["totals"] == {"success": 1, "failure": 0}
    assert deploys["failed"] == {}
    assert deploys["last"]["result"] == "success"
    assert journal(host)["phase"] == "done"
    # The snapshot and metrics were refreshed after the deploy.
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["current"]) == ("up-to-date", b.path)
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_state", state="up-to-date") == 1
    assert metric(text, "nixos_autodeploy_last_deploy_success") == 1
    assert metric(text, "nixos_autodeploy_deployments_total", result="success") == 1
    assert metric(text, "nixos_autodeploy_deployments_total", result="failure") == 0
    assert metric(text, "nixos_autodeploy_last_deploy_timestamp_seconds") == pytest.approx(
        deploys["last"]["at"]
    )
    # `status` shows the last deploy.
    shown = json.loads(host.status("--json").stdout)
    assert (shown["state"], shown["deployed"]) == ("up-to-date", b.path)
    assert shown["last_deploy"]["path"] == b.path
    assert shown["last_deploy"]["result"] == "success"
    table = host.run_agent("status", env={"COLUMNS": "250"})
    assert table.returncode == 0, table
    assert "last deploy: success (switch)" in table.stdout


@pytest.mark.parametrize("with_profile", [False, True], ids=["switch-only", "nix-env-then-switch"])
def test_manual_deploy_while_tracking_is_dirty_and_left_alone(
    host: Host, with_profile: bool
) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("manual"))
    a, manual = systems["a"], systems["manual"]
    tracking(host, a, a)
    assert deploy(host).returncode == 0
    assert decisions(host) == [("nothing", "up-to-date")]
    if with_profile:
        host.deploy_by_hand(manual, "switch")  # what nixos-rebuild switch and colmena do
    else:
        switch_by_hand(host, manual)
    activations = host.activations()
    before = host.links()
    before_record = (host.state_dir / "deployed.json").read_bytes()
    result = deploy(host)
    assert result.returncode == 0, result
    assert host.links() == before
    assert before["current"] == manual.path
    assert before["profile"] == (manual.path if with_profile else a.path)
    assert (host.state_dir / "deployed.json").read_bytes() == before_record
    assert host.activations() == activations
    assert host.recorded("nix-env") == []
    assert decisions(host)[-1] == ("nothing", "dirty")
    (reason,) = [line for line in result.stderr.splitlines() if "dirty:" in line]
    assert manual.basename in reason and a.basename in reason, reason
    assert "--force overrides" in reason
    assert host.snapshot()["dirty"] is True
    assert metric(host.metrics(), "nixos_autodeploy_dirty") == 1


# ---- beyond them -----------------------------------------------------------------


def test_force_deploys_a_dirty_host(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    host.install(a)
    host.publish(b)
    result = deploy(host, "--force")
    assert result.returncode == 0, result
    assert host.activations() == [("switch", b.path)]
    assert_links(host, current=b, profile=b)
    assert_record(host, b, "switch", previous=a)
    assert decisions(host) == [("deploy", "dirty")]
    assert host.snapshot()["state"] == "up-to-date"


def test_reboot_while_upstream_moved_on_deploys_the_new_upstream(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b)
    assert deploy(host, "--switch-mode", "boot").returncode == 0
    assert host.activations() == [("boot", b.path)]
    assert_links(host, current=a, profile=b)
    assert_record(host, b, "boot", previous=a)
    assert host.snapshot()["state"] == "pending-reboot"
    host.reboot()  # /run starts empty; the record lives in the state dir
    host.publish(c)
    result = deploy(host)
    assert result.returncode == 0, result
    assert host.activations() == [("boot", b.path), ("switch", c.path)]
    assert_links(host, current=c, profile=c, booted=b)
    assert_record(host, c, "switch", previous=b)
    assert decisions(host)[-1] == ("deploy", "update-available")
    assert host.snapshot()["dirty"] is False


@pytest.mark.parametrize(
    ("kernel", "activation"), [(NEW_KERNEL, "boot"), ("6.1.0", "switch")], ids=["kernel", "same"]
)
def test_smart_mode_boots_a_new_kernel_and_switches_otherwise(
    host: Host, kernel: str, activation: str
) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=kernel, extra="changed"))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    result = deploy(host, "--switch-mode", "smart")
    assert result.returncode == 0, result
    assert host.activations() == [(activation, new.path)]
    assert host.profile() == new.path and host.boot_default() == new.path
    assert_record(host, new, activation, previous=old)
    snapshot = host.snapshot()
    if activation == "boot":
        assert host.current() == old.path
        assert (snapshot["state"], snapshot["reboot_required"]) == ("pending-reboot", True)
        assert snapshot["dirty"] is False
        assert metric(host.metrics(), "nixos_autodeploy_reboot_required") == 1
    else:
        assert host.current() == new.path
        assert (snapshot["state"], snapshot["reboot_required"]) == ("up-to-date", False)
    assert host.recorded("systemctl") == []


def test_pending_reboot_then_reboot_into_it_is_up_to_date(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    assert deploy(host, "--switch-mode", "smart").returncode == 0
    assert host.snapshot()["state"] == "pending-reboot"
    host.reboot()
    result = deploy(host, "--switch-mode", "smart", "--reboot-mode", "reboot")
    assert result.returncode == 0, result
    assert_links(host, current=new, profile=new, booted=new)
    deployed = record(host)
    assert (deployed["path"], deployed["mode"], deployed["previous"]) == (
        new.path,
        "boot",
        old.path,
    )
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["reboot_required"]) == ("up-to-date", False)
    assert decisions(host)[-1] == ("nothing", "up-to-date")
    assert host.activations() == [("boot", new.path)]
    assert host.recorded("systemctl") == [] and host.recorded("kexec") == []
    assert metric(host.metrics(), "nixos_autodeploy_reboot_required") == 0
    assert deployed_mirror(host) == new.path, "the reboot wiped /run; its record mirror is back"


def test_reboot_mode_reboots_once_into_a_boot_deploy(host: Host) -> None:
    """A reboot into a boot-mode deploy, once (the kexec trial boot: test_trial.py)."""
    reboot_mode = "reboot"
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    order = log_reboot_call_order(host)
    args = ("--switch-mode", "boot", "--reboot-mode", reboot_mode)
    result = deploy(host, *args)
    assert result.returncode == 0, result
    assert host.activations() == [("boot", new.path)]
    assert host.recorded("systemctl") == [["reboot"]]
    assert host.recorded("kexec") == []
    assert reboot_calls(order) == ["systemctl"]
    assert_record(host, new, "boot", previous=old, rebooted=True)
    # Counted once the run after the boot has checked it (test_trial.py).
    assert [e["event"] for e in history(host)] == ["decision", f"trial-{reboot_mode}"]
    # The reboot did not take: the boot menu picked the old generation.
    point_link(host.boot_default_link, old.path)
    host.reboot()
    again = deploy(host, *args)
    assert again.returncode == 0, again
    assert "not rebooting again" in again.stderr
    assert reboot_calls(order) == ["systemctl"]
    assert host.activations() == [("boot", new.path)]
    assert_links(host, current=old, profile=new, booted=old)
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["reboot_required"]) == ("pending-reboot", True)
    assert decisions(host)[-1] == ("nothing", "pending-reboot")


@pytest.mark.parametrize("reboot_mode", ["reboot", "kexec"])
def test_reboot_mode_does_not_reboot_when_nothing_requires_it(host: Host, reboot_mode: str) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", extra="same kernel"))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    for _ in range(2):  # a switch-mode deploy, then a run on the up-to-date host
        result = deploy(host, "--switch-mode", "switch", "--reboot-mode", reboot_mode)
        assert result.returncode == 0, result
        assert host.recorded("systemctl") == [] and host.recorded("kexec") == []
    assert host.activations() == [("switch", new.path)]
    assert decisions(host) == [("deploy", "update-available"), ("nothing", "up-to-date")]
    assert_record(host, new, "switch", previous=old)
    assert host.snapshot()["reboot_required"] is False


def test_switch_into_a_new_kernel_reboots_once(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    result = deploy(host, "--switch-mode", "switch", "--reboot-mode", "reboot")
    assert result.returncode == 0, result
    assert host.activations() == [("switch", new.path)]
    assert_links(host, current=new, profile=new, booted=old)
    assert host.recorded("systemctl") == [["reboot"]]
    assert_record(host, new, "switch", previous=old, rebooted=True)
    # The machine did not reboot: still booted on the old kernel, reported, not rebooted.
    again = deploy(host, "--switch-mode", "switch", "--reboot-mode", "reboot")
    assert again.returncode == 0, again
    assert host.recorded("systemctl") == [["reboot"]]
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["reboot_required"]) == ("up-to-date", True)


def test_pending_reboot_reboots_once_when_a_reboot_mode_is_configured_later(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    assert deploy(host, "--switch-mode", "boot").returncode == 0
    assert host.recorded("systemctl") == []
    dry = deploy(host, "--switch-mode", "boot", "--reboot-mode", "reboot", "--dry-run")
    assert dry.returncode == 0, dry
    assert dry.stdout.splitlines()[0].startswith("decision: reboot: pending reboot into")
    assert dry.stdout.splitlines()[1:] == ["would run: systemctl reboot"]
    assert host.recorded("systemctl") == []
    for _ in range(2):
        result = deploy(host, "--switch-mode", "boot", "--reboot-mode", "reboot")
        assert result.returncode == 0, result
    assert host.recorded("systemctl") == [["reboot"]]
    assert decisions(host) == [
        ("deploy", "update-available"),
        ("reboot", "pending-reboot"),
        ("nothing", "pending-reboot"),
    ]
    assert host.activations() == [("boot", new.path)]
    assert_record(host, new, "boot", previous=old, rebooted=True)


def test_failing_activation_is_reported_recorded_and_not_retried(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b)
    before_record = (host.state_dir / "deployed.json").read_bytes()
    host.fail_activation(b, "unit nginx.service failed to start")
    result = deploy(host)
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert "unit nginx.service failed to start" in error
    assert b.basename in error
    # The failed switch, then the old system's `boot` making it the boot default again.
    assert host.activations() == [("switch", b.path), ("boot", a.path)]
    assert record(host) == {**json.loads(before_record), "complete": True}
    # The mirror follows the unchanged record (the test wrote the record without it).
    assert deployed_mirror(host) == a.path
    assert_links(host, current=a, profile=a, booted=a)
    assert host.boot_default() == a.path
    deploys = host.read_json("deploys.json")
    assert deploys["totals"] == {"success": 0, "failure": 1}
    assert list(deploys["failed"]) == [b.path]
    last = deploys["last"]
    assert (last["path"], last["mode"], last["result"]) == (b.path, "switch", "failure")
    assert "unit nginx.service failed to start" in last["message"]
    assert [e["event"] for e in history(host)] == ["decision", "deploy", "rolled-back"]
    assert history(host)[1]["result"] == "failure"
    assert journal(host)["phase"] == "rolled-back"
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_last_deploy_success") == 0
    assert metric(text, "nixos_autodeploy_deployments_total", result="failure") == 1
    assert metric(text, "nixos_autodeploy_deployments_total", result="success") == 0
    assert host.snapshot()["last_deploy"]["result"] == "failure"

    # Not retried: the same upstream path would fail the same way.
    (host.root / "fail-activation").unlink()
    again = deploy(host)
    assert again.returncode == 0, again
    assert host.activations() == [("switch", b.path), ("boot", a.path)]
    assert "not retried" in again.stderr
    assert host.read_json("deploys.json") == deploys
    assert_links(host, current=a, profile=a)

    # Upstream moved on: deployed.
    host.publish(c)
    assert host.collect().returncode == 0
    third = deploy(host)
    assert third.returncode == 0, third
    assert host.activations() == [("switch", b.path), ("boot", a.path), ("switch", c.path)]
    assert_links(host, current=c, profile=c)
    assert_record(host, c, "switch", previous=a)
    deploys = host.read_json("deploys.json")
    assert deploys["totals"] == {"success": 1, "failure": 1}
    assert list(deploys["failed"]) == [b.path], "b failed; c's success does not erase it"
    assert metric(host.metrics(), "nixos_autodeploy_last_deploy_success") == 1


def test_failing_activation_after_an_interrupted_run_leaves_the_deployed_system_bootable(
    host: Host,
) -> None:
    """A run was killed after `nix-env --set` (the profile already names upstream); the
    next run's activation fails. The profile must not keep naming the failed system, or
    the next reboot boots it (and the agent would then track it as deployed)."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    host.set_profile(b)  # the killed run's nix-env --set
    host.fail_activation(b, "unit nginx.service failed to start")
    result = deploy(host)
    assert result.returncode == 1, result
    assert host.activations() == [("switch", b.path), ("boot", a.path)]
    assert host.current() == a.path
    assert host.profile() == a.path, "the profile still names the system that failed"
    assert host.boot_default() == a.path


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"version": 99}', b'{"version": 1, "state": "x"}'],
    ids=["truncated", "binary", "list", "version", "fields"],
)
def test_corrupt_snapshot_is_one_error_line_and_changes_nothing(host: Host, content: bytes) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    assert host.collect().returncode == 0
    (host.state_dir / "snapshot.json").write_bytes(content)
    before, before_files = host.links(), state_files(host)
    before_metrics = host.metrics()
    host.server.reset_requests()
    result = deploy(host)
    assert result.returncode == 1, result
    assert len(result.stderr_lines) == 1, result
    assert result.stderr_lines[0].startswith("error:")
    assert "snapshot" in result.stderr_lines[0]
    assert host.links() == before
    assert state_files(host) == before_files
    assert host.metrics() == before_metrics
    assert host.activations() == [] and host.recorded("nix-env") == []
    assert host.server.count() == 0


def test_fresh_snapshot_is_used_and_a_stale_one_is_collected_again(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, a)
    assert host.collect().returncode == 0
    host.publish(b)  # CI moved on since the collector's last run
    host.server.reset_requests()

    fresh = deploy(host, "--max-snapshot-age", "600")
    assert fresh.returncode == 0, fresh
    assert host.server.count() == 0, "a fresh snapshot needs no fetch"
    assert decisions(host) == [("nothing", "up-to-date")]
    assert host.activations() == []

    path = host.state_dir / "snapshot.json"
    snapshot = json.loads(path.read_text())
    # Upstream fetched an hour longer ago than --max-snapshot-age allows.
    snapshot["upstream"]["fetched_at"] -= 3600
    path.write_text(json.dumps(snapshot))
    stale = deploy(host, "--max-snapshot-age", "600")
    assert stale.returncode == 0, stale
    # One fetch to collect first, one by the health check after the switch (upstream still
    # reachable from the new system).
    assert host.server.count("/upstream") == 2, "a stale snapshot is collected again first"
    assert host.read_json("deploys.json")["health"]["checks"][0]["name"] == "upstream"
    assert decisions(host)[-1] == ("deploy", "update-available")
    assert host.activations() == [("switch", b.path)]
    assert_record(host, b, "switch", previous=a)


# The switch-reboot case: a switch into a new kernel leaves a reboot required, so the real
# run reboots after it (test_switch_into_a_new_kernel_reboots_once); a dry run says so too.
DRY_RUNS = {
    "switch": (["--switch-mode", "switch"], "switch", []),
    "boot-kexec": (["--switch-mode", "boot", "--reboot-mode", "kexec"], "boot", ["kexec"]),
    "switch-reboot": (["--switch-mode", "switch", "--reboot-mode", "reboot"], "switch", ["reboot"]),
}


@pytest.mark.parametrize("case", list(DRY_RUNS))
def test_dry_run_prints_the_decision_and_commands_and_changes_nothing(
    host: Host, case: str
) -> None:
    args, activation, reboot = DRY_RUNS[case]
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    assert host.collect().returncode == 0
    before, before_files = host.links(), state_files(host)
    before_metrics = host.metrics()
    host.server.reset_requests()
    nix_runs = host.spawn_count("nix-store", "nix-env", "nix")
    result = deploy(host, "--dry-run", *args)
    assert result.returncode == 0, result
    expected = [
        ["nix-env", "--profile", str(host.profile_link), "--set", new.path],
        [f"{new}/bin/switch-to-configuration", activation],
    ]
    if reboot == ["reboot"]:
        expected.append(["systemctl", "reboot"])
    if reboot == ["kexec"]:
        # A kexec trial boot: the profile and the boot loader follow after its checks.
        expected = [
            [
                "kexec",
                "--load",
                f"{new}/kernel",
                f"--initrd={new}/initrd",
                f"--append=loglevel=4 autodeploy=new init={new}/init panic=30 boot.panic_on_fail",
            ],
            ["systemctl", "kexec"],
        ]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("decision: deploy: "), result
    assert new.basename in lines[0] and f"({activation})" in lines[0]
    assert lines[1:] == ["would run: " + shlex.join(argv) for argv in expected]
    assert host.links() == before
    assert state_files(host) == before_files
    assert host.metrics() == before_metrics
    assert host.activations() == []
    assert host.spawn_count("nix-store", "nix-env", "nix") == nix_runs
    assert host.recorded("systemctl") == [] and host.recorded("kexec") == []
    assert host.server.count() == 0


def test_dry_run_under_systemd_runs_the_activation_in_its_own_unit(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    assert host.collect().returncode == 0
    (host.root / "run/systemd/system").mkdir(parents=True)  # systemd is PID 1 on this host
    result = deploy(host, "--dry-run")
    assert result.returncode == 0, result
    switch = shlex.split(result.stdout.splitlines()[-1].removeprefix("would run: "))
    assert switch[0] == "systemd-run"
    assert {"--wait", "--pipe", "--collect"} <= set(switch)
    assert any(arg.startswith("--unit=") for arg in switch)
    assert switch[-3:] == ["--", f"{b}/bin/switch-to-configuration", "switch"]
    assert host.recorded("systemd-run") == [] and host.activations() == []


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
        stop(deploy_run)
    assert deploy_run.returncode == 0, out + err
    assert host.activations() == [("switch", b.path)]
    assert_links(host, current=b, profile=b)
    assert_record(host, b, "switch", previous=a)
    assert host.snapshot()["state"] == "up-to-date"


# ---- crash safety ------------------------------------------------------------------


def test_killed_after_set_profile_before_switch_deploys_again(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    assert host.collect().returncode == 0
    host.set_profile(b)  # the killed run got this far
    assert host.collect().returncode == 0
    assert host.snapshot()["state"] == "update-available"
    result = deploy(host)
    assert result.returncode == 0, result
    assert decisions(host) == [("deploy", "update-available")]
    assert host.activations() == [("switch", b.path)]
    assert_links(host, current=b, profile=b)
    assert_record(host, b, "switch", previous=a)


def test_killed_after_switch_before_record_resumes_tracking(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    assert host.collect().returncode == 0
    host.deploy_by_hand(b, "switch")  # profile and switch done; the record still says a
    assert host.collect().returncode == 0
    assert (host.snapshot()["state"], host.snapshot()["dirty"]) == ("untracked", False)
    assert metric(host.metrics(), "nixos_autodeploy_dirty") == 0
    result = deploy(host)
    assert result.returncode == 0, result
    assert decisions(host) == [("track", "untracked")]
    assert host.activations() == [("switch", b.path)], "no second activation"
    assert_record(host, b, "switch", previous=b)
    assert host.snapshot()["state"] == "up-to-date"


def test_sigkill_during_activation_then_the_next_run_converges(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    os.mkfifo(host.root / "slow-activation")
    deploy_run = start_deploy(host)
    try:
        with held_activation(host, deploy_run):
            # As systemd stops a unit: the agent and the activation it started.
            os.killpg(deploy_run.pid, signal.SIGKILL)
            deploy_run.wait()
    finally:
        stop(deploy_run)
    assert deploy_run.returncode == -signal.SIGKILL
    assert host.activations() == []
    assert_links(host, current=a, profile=b)  # killed between nix-env --set and the switch
    # The deploy's record, written before anything changed, says it was under way.
    under_way = record(host)
    assert (under_way["path"], under_way["previous"], under_way["complete"]) == (
        b.path,
        a.path,
        False,
    )
    assert host.snapshot()["dirty"] is False
    assert journal(host)["phase"] == "activating"
    (host.root / "slow-activation").unlink()
    result = deploy(host)
    assert result.returncode == 0, result
    assert decisions(host)[-1] == ("deploy", "update-available")
    assert host.activations() == [("switch", b.path)]
    assert_links(host, current=b, profile=b)
    assert_record(host, b, "switch", previous=a)
    assert host.snapshot()["dirty"] is False


def test_history_stays_bounded(host: Host) -> None:
    a = host.build_one("a")
    tracking(host, a, a)
    old = json.dumps({"at": 1.0, "event": "decision", "filler": "x" * 200}) + "\n"
    (host.state_dir / "history.jsonl").write_text(old * ((1 << 20) // len(old) + 1))
    result = deploy(host)
    assert result.returncode == 0, result
    path = host.state_dir / "history.jsonl"
    assert path.stat().st_size <= 1 << 20
    events = history(host)  # every line is still JSON
    assert (events[-1]["event"], events[-1]["action"]) == ("decision", "nothing")
    assert events[0]["event"] == "decision"


def test_upstream_that_is_not_a_nixos_system_is_refused(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b", nixos=False))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    before_record = (host.state_dir / "deployed.json").read_bytes()
    result = deploy(host)
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert b.path in error and "not a NixOS system" in error
    # Realised and pinned (the collector's preview), but nothing else moved.
    assert host.upstream() == b.path
    assert host.activations() == []
    assert host.recorded("nix-env") == []
    assert (host.state_dir / "deployed.json").read_bytes() == before_record
    assert_links(host, current=a, profile=a, booted=a)
    assert host.snapshot()["state"] == "update-available"


def test_dry_run_fetches_nothing_without_a_fresh_snapshot(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    before = host.links()

    none = deploy(host, "--dry-run")
    assert none.returncode == 1, none
    (error,) = error_lines(none)
    assert "no snapshot yet" in error and "run collect first" in error
    assert host.server.count() == 0 and host.links() == before

    host.publish(a)
    assert host.collect().returncode == 0
    host.publish(b)  # CI moved on; the snapshot does not know yet
    path = host.state_dir / "snapshot.json"
    snapshot = json.loads(path.read_text())
    snapshot["upstream"]["fetched_at"] -= 7200
    path.write_text(json.dumps(snapshot))
    before, before_files = host.links(), state_files(host)
    host.server.reset_requests()

    stale = deploy(host, "--dry-run")
    assert stale.returncode == 0, stale
    assert "a real run would collect first" in stale.stderr
    assert stale.stdout.startswith("decision: nothing: up to date")
    assert host.server.count() == 0
    assert host.links() == before and state_files(host) == before_files


def test_a_tracked_hand_deploy_of_a_new_kernel_is_not_rebooted(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    host.install(old)
    host.deploy_by_hand(new)  # nixos-rebuild switch; its owner reboots when it suits them
    host.publish(new)
    for _ in range(2):
        result = deploy(host, "--reboot-mode", "reboot")
        assert result.returncode == 0, result
    assert decisions(host) == [("track", "untracked"), ("nothing", "up-to-date")]
    assert host.recorded("systemctl") == []
    assert host.snapshot()["reboot_required"] is True


def test_failed_kexec_load_is_not_counted_as_the_one_reboot(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    kexec = host.bin_dir / "kexec"
    recorder = kexec.read_text()
    kexec.write_text("#!/bin/sh\necho 'kexec_load failed: Operation not permitted' >&2\nexit 1\n")
    failed = deploy(host, "--switch-mode", "boot", "--reboot-mode", "kexec")
    assert failed.returncode == 1, failed
    (error,) = error_lines(failed)
    assert "Operation not permitted" in error
    assert host.recorded("systemctl") == []
    assert record(host)["reboot_issued_at"] is None
    kexec.write_text(recorder)
    retried = deploy(host, "--switch-mode", "boot", "--reboot-mode", "kexec")
    assert retried.returncode == 0, retried
    assert host.recorded("systemctl") == [["kexec"]]
    assert record(host)["reboot_issued_at"] is not None


def test_a_failed_reboot_command_is_not_the_one_reboot(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b", kernel=NEW_KERNEL))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    systemctl = host.bin_dir / "systemctl"
    recorder = systemctl.read_text()
    systemctl.write_text("#!/bin/sh\necho 'Failed to reboot: Access denied' >&2\nexit 1\n")
    failed = deploy(host, "--switch-mode", "boot", "--reboot-mode", "reboot")
    assert failed.returncode == 1, failed
    assert "Access denied" in error_lines(failed)[0]
    assert record(host)["reboot_issued_at"] is None
    systemctl.write_text(recorder)
    assert deploy(host, "--switch-mode", "boot", "--reboot-mode", "reboot").returncode == 0
    assert host.recorded("systemctl") == [["reboot"]]


def test_a_passing_nix_failure_does_not_block_the_retry(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    wrapper = fail_nix_env(host)
    failed = deploy(host)
    assert failed.returncode == 1, failed
    assert "No space left on device" in error_lines(failed)[0]
    deploys = host.read_json("deploys.json")
    assert (deploys["last"]["result"], deploys["failed"]) == ("failure", {})
    assert_links(host, current=a, profile=a)
    (host.bin_dir / "nix-env").write_text(wrapper)
    assert deploy(host).returncode == 0
    assert_links(host, current=b, profile=b)


def test_activation_failing_after_its_switch_is_rolled_back(host: Host) -> None:
    """NixOS's switch-to-configuration points current and the boot loader at the new
    system before it starts units: a unit that fails leaves current on it (exit 4). The
    rollback switches back to what ran before; the failed system is never adopted."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b)
    host.fail_activation_late(b, "nginx.service failed to start")
    result = deploy(host)
    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert "nginx.service failed to start" in error
    assert host.activations() == [("switch", b.path), ("switch", a.path)]
    assert_links(host, current=a, profile=a)
    assert host.boot_default() == a.path
    assert_record(host, a, "switch", previous=a)
    assert list(host.read_json("deploys.json")["failed"]) == [b.path]

    again = deploy(host)
    assert again.returncode == 0, again
    assert "not retried until upstream changes" in again.stderr
    assert host.activations() == [("switch", b.path), ("switch", a.path)]
    host.publish(c)
    assert host.collect().returncode == 0
    assert deploy(host).returncode == 0
    assert_links(host, current=c, profile=c)
    assert_record(host, c, "switch", previous=a)


def test_killed_after_the_switch_while_upstream_moves_on_is_not_dirty(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b)
    deploy_killed_at(host, "activated")  # the switch took effect; the record says under way
    assert host.current() == b.path and record(host)["complete"] is False
    host.publish(c)  # CI moved on before the next run
    assert host.collect().returncode == 0
    assert (host.snapshot()["state"], host.snapshot()["dirty"]) == ("update-available", False)

    result = deploy(host)
    assert result.returncode == 0, result
    assert "completed-interrupted-deploy" in [e["event"] for e in history(host)]
    assert host.read_json("deploys.json")["totals"] == {"success": 2, "failure": 0}
    assert_links(host, current=c, profile=c)
    assert_record(host, c, "switch", previous=b)


def test_failure_after_an_interrupted_run_goes_back_to_what_ran_before(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    deploy_killed_at(host, "activating")  # after its record and `nix-env --set`
    assert host.profile() == b.path
    host.fail_activation_late(b)
    result = deploy(host)
    assert result.returncode == 1, result
    assert_links(host, current=a, profile=a)
    assert host.boot_default() == a.path
    assert_record(host, a, "switch", previous=a)  # never the failed system
    assert list(host.read_json("deploys.json")["failed"]) == [b.path]
    assert deploy(host).returncode == 0
    assert host.snapshot()["state"] == "update-available"
    assert_record(host, a, "switch", previous=a)


def test_interrupted_boot_deploy_then_upstream_back_makes_current_the_next_boot(
    host: Host,
) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b", kernel=NEW_KERNEL))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    deploy_killed_at(host, "activated", "--switch-mode", "boot")  # after `boot` of b
    assert host.boot_default() == b.path
    host.publish(a)  # upstream is back on a
    assert host.collect().returncode == 0
    result = deploy(host, "--switch-mode", "smart")
    assert result.returncode == 0, result
    assert host.profile() == a.path and host.boot_default() == a.path
    assert_record(host, a, "switch", previous=a)
    host.reboot()
    assert deploy(host).returncode == 0
    assert host.snapshot()["state"] == "up-to-date"


# ---- the deploy journal: every phase a run can be killed in --------------------------

# phase -> the activations of the killed run and the next one, in order ("a"/"b": which
# system). Failing phases deploy a b whose activation fails after its switch.
RECOVERY: dict[Phase, list[tuple[str, str]]] = {
    Phase.PLANNED: [("switch", "b")],  # nothing changed yet: deployed anew
    Phase.PROFILE_SET: [("switch", "b")],
    Phase.ACTIVATING: [("switch", "b")],  # not taken effect: superseded by the next deploy
    Phase.ACTIVATED: [("switch", "b")],  # took effect: rolled forward
    Phase.CHECKING: [("switch", "b")],  # checked again, passing
    Phase.DONE: [("switch", "b")],
    Phase.FAILED: [("switch", "b"), ("switch", "a")],  # counted, then rolled back
    Phase.ROLLING_BACK: [("switch", "b"), ("switch", "a")],
    Phase.ROLLED_BACK: [("switch", "b"), ("switch", "a")],
}
FAILING = {Phase.FAILED, Phase.ROLLING_BACK, Phase.ROLLED_BACK}


def test_recovery_covers_every_phase() -> None:
    # A trial boot's own phases are finished by the run after the boot: test_trial.py.
    assert set(RECOVERY) == set(Phase) - {Phase.BOOTING, Phase.REBOOTING_BACK}
    assert transaction.AFTER_BOOT - set(RECOVERY) == {Phase.BOOTING, Phase.REBOOTING_BACK}


@pytest.mark.parametrize("phase", list(RECOVERY), ids=[p.value for p in RECOVERY])
def test_a_run_killed_at_each_phase_is_finished_by_the_next(host: Host, phase: Phase) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    fails = phase in FAILING
    if fails:
        host.fail_activation_late(b)
    deploy_killed_at(host, phase.value)
    # In between, the collector never sees a hand deploy.
    assert host.collect().returncode == 0
    assert host.snapshot()["dirty"] is False

    result = deploy(host)
    assert result.returncode == 0, result
    named = {a.path: "a", b.path: "b"}
    assert [(action, named[p]) for action, p in host.activations()] == RECOVERY[phase]
    good = a if fails else b
    assert_links(host, current=good, profile=good)
    assert host.boot_default() == good.path
    assert_record(host, good, "switch", previous=a)
    assert journal(host)["phase"] == ("rolled-back" if fails else "done")
    deploys = host.read_json("deploys.json")
    assert deploys["totals"] == {"success": int(not fails), "failure": int(fails)}
    assert list(deploys["failed"]) == ([b.path] if fails else [])
    snapshot = host.snapshot()
    assert snapshot["state"] == ("update-available" if fails else "up-to-date")
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_dirty") == 0
    assert metric(text, "nixos_autodeploy_state", state=snapshot["state"]) == 1
    assert metric(text, "nixos_autodeploy_deployments_total", result="failure") == int(fails)
    assert metric(text, "nixos_autodeploy_deployments_total", result="success") == int(not fails)
    assert metric(text, "nixos_autodeploy_last_deploy_success") == int(not fails)
    # And it stays so: nothing more to do, nothing retried.
    activations = host.activations()
    assert deploy(host).returncode == 0
    assert host.activations() == activations
    host.reboot()
    assert deploy(host).returncode == 0
    assert host.activations() == activations
    assert host.current() == good.path and host.snapshot()["dirty"] is False


# ---- issue 14's reproductions ---------------------------------------------------------


def fail_nix_env(host: Host) -> str:
    """nix-env fails as on a full disk; returns the wrapper to put back."""
    nix_env = host.bin_dir / "nix-env"
    wrapper = nix_env.read_text()
    nix_env.write_text(
        "#!/bin/sh\necho 'error: writing to file: No space left on device' >&2\nexit 1\n"
    )
    return wrapper


def test_a_nix_failure_does_not_erase_an_earlier_failed_system(host: Host) -> None:
    """1: b fails late; c is published; c's deploy fails in Nix; the next deploy of c
    succeeds. Never dirty, and b stays remembered as failed."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b)
    host.fail_activation_late(b)
    assert deploy(host).returncode == 1
    host.publish(c)
    assert host.collect().returncode == 0
    wrapper = fail_nix_env(host)
    failed = deploy(host)
    assert failed.returncode == 1, failed
    assert "No space left on device" in error_lines(failed)[0]
    assert list(host.read_json("deploys.json")["failed"]) == [b.path]
    assert host.snapshot()["dirty"] is False
    (host.bin_dir / "nix-env").write_text(wrapper)
    result = deploy(host)
    assert result.returncode == 0, result
    assert_links(host, current=c, profile=c)
    assert_record(host, c, "switch", previous=a)
    assert host.snapshot()["state"] == "up-to-date"


def test_killed_between_the_failure_and_the_rollback(host: Host) -> None:
    """2: the failure is recorded, the rollback not started; the next run rolls back and
    never counts or adopts the failed system."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    host.fail_activation_late(b)
    deploy_killed_at(host, "rolling-back")
    assert host.read_json("deploys.json")["totals"] == {"success": 0, "failure": 1}
    assert host.current() == b.path and host.profile() == b.path
    result = deploy(host)
    assert result.returncode == 0, result
    assert "recorded it" not in result.stderr
    assert_links(host, current=a, profile=a)
    assert host.boot_default() == a.path
    assert_record(host, a, "switch", previous=a)
    assert host.read_json("deploys.json")["totals"] == {"success": 0, "failure": 1}


@pytest.mark.parametrize("after", [False, True], ids=["before-nix-env", "after-nix-env"])
def test_killed_during_the_rollback_is_finished_by_the_next_run(host: Host, after: bool) -> None:
    """3: killed while `nix-env --set` goes back to a: the next run finishes the rollback,
    so the next boot is a, not the failed b."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    host.fail_activation_late(b)
    kill_agent_when(host, "nix-env", a.path, after=after)
    killed = deploy(host)
    assert killed.returncode == -signal.SIGKILL, killed
    assert host.boot_default() == b.path
    result = deploy(host)
    assert result.returncode == 0, result
    assert_links(host, current=a, profile=a)
    assert host.boot_default() == a.path
    assert_record(host, a, "switch", previous=a)
    assert list(host.read_json("deploys.json")["failed"]) == [b.path]
    host.reboot()
    assert deploy(host).returncode == 0
    assert host.current() == a.path and host.snapshot()["state"] == "update-available"


def test_force_deploys_a_failed_system_left_running(host: Host) -> None:
    """4: a failed b still runs (as an earlier version left it: record a, profile and
    boot default a). --force deploys it: profile, activation; after a reboot it runs."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    assert host.collect().returncode == 0
    switch_by_hand(host, b)
    point_link(host.boot_default_link, a.path)
    failure = {"at": time.time(), "path": b.path, "mode": "switch", "result": "failure"}
    legacy = {
        "version": 1,
        "last": {**failure, "message": "b failed"},
        "totals": {"success": 0, "failure": 1},
        "failed_path": b.path,
    }
    (host.state_dir / "deploys.json").write_text(json.dumps(legacy))
    held = deploy(host)
    assert held.returncode == 0, held
    assert "not tracking it" in held.stderr
    forced = deploy(host, "--force")
    assert forced.returncode == 0, forced
    assert host.recorded("nix-env") == [["--profile", str(host.profile_link), "--set", b.path]]
    assert host.profile() == b.path and host.boot_default() == b.path
    assert record(host)["path"] == b.path
    host.reboot()
    assert deploy(host).returncode == 0
    assert host.current() == b.path
    assert host.snapshot()["state"] == "up-to-date"


def test_a_failure_while_a_boot_waits_keeps_the_waiting_boot(host: Host) -> None:
    """5: b (boot mode) waits for its reboot; c is published; c's deploy is killed, then
    c fails. The profile, the boot default and the record stay on b; after the reboot the
    host runs b and is not dirty."""
    systems = host.build(
        SystemSpec("a"), SystemSpec("b", kernel=NEW_KERNEL), SystemSpec("c", kernel=NEW_KERNEL)
    )
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b)
    assert deploy(host, "--switch-mode", "boot").returncode == 0
    host.publish(c)
    assert host.collect().returncode == 0
    kill_agent_when(host, "nix-env", c.path, after=True)
    assert deploy(host, "--switch-mode", "boot").returncode == -signal.SIGKILL
    host.fail_activation(c)
    failed = deploy(host, "--switch-mode", "boot")
    assert failed.returncode == 1, failed
    assert host.profile() == b.path and host.boot_default() == b.path
    assert_record(host, b, "boot", previous=a)
    assert host.snapshot()["dirty"] is False
    host.reboot()
    assert deploy(host, "--switch-mode", "boot").returncode == 0
    assert host.current() == b.path
    assert (host.snapshot()["state"], host.snapshot()["dirty"]) == ("update-available", False)


def test_a_switch_whose_reboot_came_back_on_the_old_generation_is_not_dirty(host: Host) -> None:
    """6: as for a boot-mode deploy, the agent says it rebooted once and came back."""
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    old, new = systems["old"], systems["new"]
    tracking(host, old, new)
    args = ("--switch-mode", "switch", "--reboot-mode", "reboot")
    assert deploy(host, *args).returncode == 0
    assert host.recorded("systemctl") == [["reboot"]]
    point_link(host.boot_default_link, old.path)  # the boot menu picked the old generation
    host.reboot()
    again = deploy(host, *args)
    assert again.returncode == 0, again
    assert "came back on" in again.stderr and "not rebooting again" in again.stderr
    assert host.recorded("systemctl") == [["reboot"]]
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["dirty"]) == ("pending-reboot", False)
    assert metric(host.metrics(), "nixos_autodeploy_dirty") == 0


def test_upstream_b_then_a_then_b_again_retries_b(host: Host) -> None:
    """An operator re-published b after it failed: a change, so b is tried again."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    host.fail_activation_late(b)
    assert deploy(host).returncode == 1
    (host.root / "fail-activation-late").unlink()  # fixed, say, on the cache's side
    assert "not retried" in deploy(host).stderr
    for system in (a, b):
        host.publish(system)
        assert host.collect().returncode == 0
        assert deploy(host).returncode == 0
    assert_links(host, current=b, profile=b)
    assert_record(host, b, "switch", previous=a)
    assert host.read_json("deploys.json")["failed"] == {}, "a success forgets the failure"


def test_deploy_with_another_url_fetches_it_first(host: Host) -> None:
    """8: the snapshot's upstream came from another URL: collect the asked one first."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, a)
    assert host.collect().returncode == 0
    host.publish(b, "/other")
    other = host.server.url("/other")
    result = host.run_agent("deploy", "--url", other, "--prometheus-path", str(host.metrics_path))
    assert result.returncode == 0, result
    # Collected first, then fetched by the health check after the switch.
    assert host.server.count("/other") == 2
    assert_links(host, current=b, profile=b)
    assert host.snapshot()["upstream"]["url"] == other


def test_a_deploy_that_fetched_nothing_keeps_the_collect_time(host: Host) -> None:
    """10: the timestamp (and the file's mtime) say when the collector last collected."""
    a = host.build_one("a")
    tracking(host, a, a)
    assert host.collect().returncode == 0
    collected_at = metric(host.metrics(), "nixos_autodeploy_last_collect_timestamp_seconds")
    assert host.metrics_path.stat().st_mtime == pytest.approx(collected_at)
    os.utime(host.metrics_path, (collected_at - 100, collected_at - 100))
    host.server.reset_requests()
    assert deploy(host).returncode == 0
    assert host.server.count() == 0
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_last_collect_timestamp_seconds") == collected_at
    assert host.snapshot()["collected_at"] == collected_at
    assert host.metrics_path.stat().st_mtime == pytest.approx(collected_at)


def test_a_record_under_way_from_before_the_journal_is_completed(host: Host) -> None:
    """A host upgraded from a version without the journal, killed after its switch: the
    in-flight record alone says what happened."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    under_way = {
        "version": 1,
        "path": b.path,
        "mode": "switch",
        "previous": a.path,
        "at": 1.0,
        "reboot_issued_at": None,
        "complete": False,
    }
    (host.state_dir / "deployed.json").write_text(json.dumps(under_way))
    host.deploy_by_hand(b)
    result = deploy(host)
    assert result.returncode == 0, result
    assert "completed-interrupted-deploy" in [e["event"] for e in history(host)]
    assert_record(host, b, "switch", previous=a)
    assert host.snapshot()["state"] == "up-to-date"


def test_a_dry_run_says_it_would_finish_an_interrupted_deploy(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    deploy_killed_at(host, "activating")
    before, before_files = host.links(), state_files(host)
    result = deploy(host, "--dry-run")
    assert result.returncode == 0, result
    assert result.stdout.splitlines()[0] == (
        f"first: would finish the interrupted deploy of {b.basename} (activating)"
    )
    assert host.links() == before and state_files(host) == before_files


def kill_agent_at_nix_call(host: Host, n: int, *, after: bool) -> None:
    """The agent is killed (kill -9 of the caller) at its n-th run of nix-store or nix-env
    from now on, before that command acts or, with after, once it has. Queries (the
    collector's closure difference) change nothing and are not counted."""
    counter = host.tmp / "nix-calls"
    for tool in ("nix-store", "nix-env"):
        wrapper = host.bin_dir / tool
        shebang, _, rest = wrapper.read_text().partition("\n")
        act = f"'{host.real_tools[tool]}' \"$@\"; " if after else ""
        trap = (
            'if [ "$1" != --query ]; then\n'
            f"count=$(( $(cat '{counter}' 2>/dev/null || echo 0) + 1 )); "
            f"echo \"$count\" > '{counter}'\n"
            f'if [ "$count" = {n} ]; then {act}kill -9 "$PPID"; exit 137; fi\n'
            "fi\n"
        )
        wrapper.write_text(f"{shebang}\n{trap}{rest}")


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("fails", [False, True], ids=["succeeds", "fails-late"])
def test_killed_at_any_nix_call_the_next_runs_converge(
    host: Host, fails: bool, n: int, after: bool
) -> None:
    """kill -9 around each Nix command a deploy runs (realise, profile, profile back), then
    runs until nothing changes: the same end as an uninterrupted deploy, counted once."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    if fails:
        host.fail_activation_late(b)
    kill_agent_at_nix_call(host, n, after=after)
    first = deploy(host)
    calls = 3 if fails else 2  # realise b, profile to b (, profile back to a)
    assert (first.returncode == -signal.SIGKILL) is (n <= calls), first
    for _ in range(2):
        deploy(host)
    good = a if fails else b
    assert_links(host, current=good, profile=good)
    assert host.boot_default() == good.path
    assert_record(host, good, "switch", previous=a)
    deploys = host.read_json("deploys.json")
    assert deploys["totals"] == {"success": int(not fails), "failure": int(fails)}
    assert list(deploys["failed"]) == ([b.path] if fails else [])
    assert not journal(host) or journal(host)["phase"] in ("done", "rolled-back")
    assert host.snapshot()["dirty"] is False
    assert metric(host.metrics(), "nixos_autodeploy_dirty") == 0


def test_an_activation_that_outlives_its_killed_agent_is_rolled_forward(host: Host) -> None:
    """As under systemd, where the activation runs in a unit of its own: the agent is
    killed, its activation goes on and succeeds; the next run records it, once, without a
    second activation."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    os.mkfifo(host.root / "slow-activation")
    deploy_run = start_deploy(host)
    try:
        with held_activation(host, deploy_run):
            os.kill(deploy_run.pid, signal.SIGKILL)  # the agent alone
            deploy_run.wait()
        give_up = time.monotonic() + 300  # a safety net, not an assertion
        while host.current() != b.path:  # the orphaned activation finishing its switch
            assert time.monotonic() < give_up, "the activation never finished"
            time.sleep(0.05)
    finally:
        stop(deploy_run)
    assert journal(host)["phase"] == "activating"
    (host.root / "slow-activation").unlink()
    result = deploy(host)
    assert result.returncode == 0, result
    assert "took effect; recorded it" in result.stderr
    assert host.activations() == [("switch", b.path)]
    assert_record(host, b, "switch", previous=a)
    assert host.read_json("deploys.json")["totals"] == {"success": 1, "failure": 0}
    assert host.snapshot()["state"] == "up-to-date"


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"version": 2}', b'{"version": 1, "phase": "planned"}'],
    ids=["truncated", "version", "fields"],
)
def test_a_corrupt_journal_is_one_error_line_and_changes_nothing(
    host: Host, content: bytes
) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    (host.state_dir / "journal.json").write_bytes(content)
    before, before_files = host.links(), state_files(host)
    result = deploy(host)
    assert result.returncode == 1, result
    assert len(result.stderr_lines) == 1, result
    (line,) = error_lines(result)
    assert "journal.json" in line and "remove it" in line
    assert host.links() == before and state_files(host) == before_files
    assert host.activations() == [] and host.server.count() == 0


def test_a_deploy_cut_short_and_not_deployed_anew_is_undone(host: Host) -> None:
    """Killed before its activation took effect (which may have installed the boot loader
    already), and the next run deploys nothing (upstream cannot be fetched): what ran
    before comes back, the boot loader's default included."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    deploy_killed_at(host, "activating")
    point_link(host.boot_default_link, b.path)  # as NixOS's activation does first
    host.server.route("/upstream", Reply(status=404))
    result = deploy(host, "--max-snapshot-age", "0")
    assert result.returncode == 0, result
    assert "the last upstream fetch failed" in result.stderr
    assert host.activations() == [("boot", a.path)]
    assert_links(host, current=a, profile=a)
    assert host.boot_default() == a.path
    assert_record(host, a, "switch", previous=a)
    assert journal(host)["phase"] == "rolled-back"
    assert not (host.state_dir / "deploys.json").exists(), "an interruption is no result"
