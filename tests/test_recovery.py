"""Runs cut short: a deploy killed at any point (right after a journal phase, around a Nix
command, inside its activation, while a failure is handled) is finished or undone by the
next run, counted once, and never reads as a hand deploy.

Real Nix, a signed binary cache on loopback, a sandbox root. The kills are
deterministic (the actuator's STOP_AT hook, wrapped tools, a FIFO that holds the
activation), never timed.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from harness import NEW_KERNEL, Host, Reply, SystemSpec, metric, point_link
from harness.deploys import (
    Phase,
    assert_links,
    assert_record,
    decisions,
    deploy,
    deploy_killed_at,
    held_activation,
    history,
    journal,
    kill_agent_at_nix_call,
    kill_agent_when,
    kill_run,
    record,
    start_deploy,
    state_files,
    tracking,
)

from actuator import transaction

pytestmark = pytest.mark.nix


# ---- killed between its steps -------------------------------------------------------


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
        kill_run(deploy_run)
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
        kill_run(deploy_run)
    assert journal(host)["phase"] == "activating"
    (host.root / "slow-activation").unlink()
    result = deploy(host)
    assert result.returncode == 0, result
    assert "took effect; recorded it" in result.stderr
    assert host.activations() == [("switch", b.path)]
    assert_record(host, b, "switch", previous=a)
    assert host.read_json("deploys.json")["totals"] == {"success": 1, "failure": 0}
    assert host.snapshot()["state"] == "up-to-date"


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


# ---- the deploy journal: every phase a run can be killed in -------------------------


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
    # A trial boot's own phases are finished by the run after the boot: test_trial.py;
    # a deploy is abandoned only under a hand deploy: test_hand_deploys.py.
    assert set(RECOVERY) == set(Phase) - {Phase.BOOTING, Phase.REBOOTING_BACK, Phase.ABANDONED}
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


# ---- around every Nix command -------------------------------------------------------


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
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
    # The space check's dry run, realise b, profile to b (, profile back to a).
    calls = 4 if fails else 3
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


# ---- killed while a failure is handled ----------------------------------------------


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


def test_killed_between_the_failure_and_the_rollback_the_next_run_rolls_back(host: Host) -> None:
    """The failure is recorded, the rollback not started; the next run rolls back and
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
    """Killed while `nix-env --set` goes back to a: the next run finishes the rollback,
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
