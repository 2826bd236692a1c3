"""Hand deploys seen through the system profile: a `nixos-rebuild switch`, `boot` or
rollback that moves the profile away from the generation the agent left is a hand deploy
(dirty, with its reason), never overridden without --force, also when it happens while a
deploy of the agent is half done.

Real Nix, a signed binary cache on loopback, a sandbox root; kills through the actuator's
STOP_AT hook.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from harness import Host, System, SystemSpec, metric
from harness.deploys import (
    assert_links,
    deploy,
    deploy_killed_at,
    events_named,
    journal,
    kill_agent_at_nix_call,
    record,
    tracking,
)

pytestmark = pytest.mark.nix


def deployed_by_agent(host: Host, *names: str) -> dict[str, System]:
    """Builds names; the host ran the first, the agent deployed the second (its record
    names the profile generation it made); the second is what CI publishes."""
    systems = host.build(*(SystemSpec(n) for n in names))
    first, second = systems[names[0]], systems[names[1]]
    tracking(host, first, second)
    result = deploy(host)
    assert result.returncode == 0, result
    assert_links(host, current=second, profile=second)
    return systems


def dirty_because(host: Host, reason: str) -> None:
    assert host.collect().returncode == 0
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot.get("dirty_reason")) == ("dirty", reason)
    metrics = host.metrics()
    assert metric(metrics, "nixos_autodeploy_dirty") == 1
    assert metric(metrics, "nixos_autodeploy_dirty_reason", reason=reason) == 1


# ---- defect 6: a hand `nixos-rebuild boot` --------------------------------------------


def test_hand_boot_is_dirty_waits_for_its_reboot_and_is_never_deployed_over(host: Host) -> None:
    systems = deployed_by_agent(host, "a", "b", "x", "c")
    b, x, c = systems["b"], systems["x"], systems["c"]
    host.deploy_by_hand(x, "boot")
    dirty_because(host, "hand-boot")
    assert host.snapshot()["reboot_required"] is True
    assert metric(host.metrics(), "nixos_autodeploy_reboot_required") == 1
    status = host.status("--json")
    assert status.returncode == 0, status
    host.publish(c)  # upstream moves on: still the operator's x waits for its boot
    assert host.collect().returncode == 0
    activations = host.activations()
    result = deploy(host)
    assert result.returncode == 0, result
    assert "hand-boot" in result.stdout + result.stderr
    assert host.activations() == activations, "nothing activated over the hand boot"
    assert_links(host, current=b, profile=x)
    assert host.boot_default() == x.path
    forced = deploy(host, "--force")
    assert forced.returncode == 0, forced
    assert_links(host, current=c, profile=c)
    assert host.collect().returncode == 0
    assert (host.snapshot()["state"], host.snapshot()["dirty_reason"]) == ("up-to-date", None)


def test_hand_rollback_of_the_profile_is_dirty(host: Host) -> None:
    systems = deployed_by_agent(host, "a", "b")
    generations = host.profile_link.parent
    older = sorted(int(p.name.split("-")[1]) for p in generations.glob("system-*-link"))[0]
    subprocess.run(
        ["nix-env", "--profile", str(host.profile_link), "--switch-generation", str(older)],
        env=host.nix_env(),
        check=True,
    )
    dirty_because(host, "hand-rollback")
    assert host.snapshot()["reboot_required"] is True
    assert host.profile() == systems["a"].path


def test_a_hand_switch_to_upstream_itself_is_tracked(host: Host) -> None:
    systems = deployed_by_agent(host, "a", "b", "c")
    c = systems["c"]
    host.publish(c)
    host.deploy_by_hand(c, "switch")  # what CI published, deployed by hand: adopted
    assert host.collect().returncode == 0
    assert (host.snapshot()["state"], host.snapshot()["dirty_reason"]) == ("untracked", None)
    activations = host.activations()
    result = deploy(host)
    assert result.returncode == 0, result
    assert host.activations() == activations, "tracked, not deployed again"
    assert record(host)["path"] == c.path
    assert record(host)["generation"] == int(os.readlink(host.profile_link).split("-")[1])
    assert host.snapshot()["state"] == "up-to-date"
    host.deploy_by_hand(systems["b"], "switch")  # a later hand deploy is seen again
    dirty_because(host, "hand-switch")


# ---- defect 11: a hand switch back after a deploy killed in its activation -------------


def test_hand_switch_back_after_a_killed_activation_is_left_alone(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b, collect=True)
    deploy_killed_at(host, "activating")
    host.switch_by_hand(b)  # the killed run's activation had taken effect
    assert_links(host, current=b, profile=b)
    host.deploy_by_hand(a, "switch")  # the operator goes back
    dirty_because(host, "hand-switch")
    result = deploy(host)
    assert result.returncode == 0, result
    assert_links(host, current=a, profile=a)
    assert ("switch", b.path) not in host.activations()[-1:], "b not switched in again"
    assert host.boot_default() == a.path
    assert not journal(host) or journal(host)["phase"] in ("rolled-back", "done", "abandoned")
    assert host.snapshot()["dirty_reason"] == "hand-switch"


# ---- defect 4: a rollback under a hand deploy -------------------------------------------


def failing_check(host: Host, system: System) -> str:
    return f'[ "$(readlink {host.current_link})" != {system.path} ]'


def test_rollback_after_a_hand_switch_leaves_the_boot_default(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b, collect=True)
    check = failing_check(host, b)
    deploy_killed_at(host, "failed", "--health-check", check, "--health-timeout", "1")
    host.deploy_by_hand(c, "switch")
    result = deploy(host, "--health-check", check, "--health-timeout", "1")
    assert_links(host, current=c, profile=c)
    assert host.boot_default() == c.path, "the old system's `boot` ran over the hand switch"
    assert ("boot", a.path) not in host.activations()
    assert result.returncode == 0, result


def test_rollback_after_a_hand_boot_switches_back_with_test(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b, collect=True)
    check = failing_check(host, b)
    deploy_killed_at(host, "failed", "--health-check", check, "--health-timeout", "1")
    assert_links(host, current=b, profile=b)
    host.deploy_by_hand(c, "boot")  # the operator's next boot, while b still runs
    result = deploy(host, "--health-check", check, "--health-timeout", "1")
    assert result.returncode == 0, result
    assert_links(host, current=a, profile=c)
    assert host.boot_default() == c.path, "the switch back made a the boot default"
    assert host.activations()[-1] == ("test", a.path)
    dirty_because(host, "hand-boot")


# ---- defect 9: resumed checks confirm what runs -----------------------------------------


def test_resumed_checks_after_a_hand_switch_abandon_the_deploy(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b, collect=True)
    deploy_killed_at(host, "checking", "--health-check", "true")
    host.deploy_by_hand(a, "switch")  # rolled back by hand during b's checks
    result = deploy(host, "--health-check", "true")
    assert result.returncode == 0, result
    assert journal(host)["phase"] == "abandoned"
    assert [e["to"] for e in events_named(host, "hand-deploy")] == [a.path]
    assert not (host.state_dir / "deploys.json").exists(), "b counted as deployed"
    assert record(host)["path"] != b.path or host.current() != b.path
    assert_links(host, current=a, profile=a)
    dirty_because(host, "hand-switch")


# ---- found by tests/test_model.py -------------------------------------------------------


def test_undoing_a_deploy_that_superseded_another_puts_the_agents_profile_back(
    host: Host,
) -> None:
    """The profile a superseded deploy set is the agent's, not a hand deploy: undoing the
    deploy that took its place puts the profile (and so the next boot) back."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b, collect=True)
    deploy_killed_at(host, "activating", "--switch-mode", "boot")  # profile b, not activated
    assert host.profile() == b.path
    host.publish(a)  # CI goes back to what runs
    assert host.collect().returncode == 0
    # a made the next boot again (superseding b's deploy), cut short before its profile
    deploy_killed_at(host, "profile-set", "--switch-mode", "boot")
    assert host.profile() == b.path
    result = deploy(host, "--switch-mode", "boot")
    assert result.returncode == 0, result
    assert_links(host, current=a, profile=a)
    assert host.boot_default() == a.path
    assert host.collect().returncode == 0
    assert (host.snapshot()["state"], host.snapshot()["dirty"]) == ("up-to-date", False)


def test_a_hand_switch_after_a_rollback_was_cut_short_is_left_alone(host: Host) -> None:
    """Killed in its rollback after putting the record back, before the profile: the
    collector meanwhile sees no hand deploy, and a hand switch made then is the
    operator's when the next run finishes the rollback."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b, collect=True)
    check = failing_check(host, b)
    kill_agent_at_nix_call(host, 2, after=False)  # 1: set b; 2: the rollback's set a
    killed = deploy(host, "--health-check", check, "--health-timeout", "1")
    assert killed.returncode == -signal.SIGKILL, killed
    assert (journal(host)["phase"], record(host)["path"]) == ("rolling-back", a.path)
    assert_links(host, current=b, profile=b)
    assert host.collect().returncode == 0
    assert host.snapshot()["dirty"] is False
    host.deploy_by_hand(c, "switch")
    result = deploy(host, "--health-check", check, "--health-timeout", "1")
    assert result.returncode == 0, result
    assert_links(host, current=c, profile=c)
    assert host.boot_default() == c.path
    dirty_because(host, "hand-switch")


@pytest.mark.parametrize("hand", [("test",), ("test", "boot")], ids=["test", "test-and-boot"])
def test_a_cut_short_deploy_finished_by_hand_goes_on_as_the_agents(
    host: Host, hand: tuple[str, ...]
) -> None:
    """Killed once its profile was set; the operator then activates that very system by
    hand (`test`, or `test` and `boot`). The in-flight record names it, so the collector
    reads it as the agent's: the next run finishes that deploy (profile, boot default,
    checks, record), and a boot-mode deploy of the next upstream then waits for its
    reboot instead of reading dirty."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    a, b, c = systems["a"], systems["b"], systems["c"]
    tracking(host, a, b, collect=True)
    kill_agent_at_nix_call(host, 1, after=True)  # 1: nix-env --set b
    killed = deploy(host)
    assert killed.returncode == -signal.SIGKILL, killed
    assert (journal(host)["phase"], host.profile(), host.current()) == (
        "profile-set",
        b.path,
        a.path,
    )
    for action in hand:
        host.deploy_by_hand(b, action)
    host.publish(c)
    result = deploy(host, "--switch-mode", "boot", "--health-check", "true")
    assert result.returncode == 0, result
    finished = [e["path"] for e in events_named(host, "completed-interrupted-deploy")]
    assert finished == [b.path]
    deployed = record(host)
    assert (deployed["path"], deployed["previous"]) == (c.path, b.path)
    assert_links(host, current=b, profile=c)
    assert host.boot_default() == c.path
    assert host.collect().returncode == 0
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["dirty"]) == ("pending-reboot", False)
    host.reboot()
    assert host.collect().returncode == 0
    assert host.snapshot()["state"] == "up-to-date"


@pytest.mark.parametrize("kill", ["profile-set", "nix-env --set"])
def test_a_forced_deploy_cut_short_is_not_carried_on_without_force(host: Host, kill: str) -> None:
    """--force over a hand switch, killed before its switch (before or after its
    `nix-env --set`): the timer's next run, not forced, rolls it back and leaves the hand
    deploy alone; only another --force deploys over it."""
    systems = deployed_by_agent(host, "a", "b", "x")
    b, x = systems["b"], systems["x"]
    host.deploy_by_hand(x, "switch")
    if kill == "profile-set":
        deploy_killed_at(host, "profile-set", "--force")
    else:
        kill_agent_at_nix_call(host, 1, after=True)
        killed = deploy(host, "--force")
        assert killed.returncode == -signal.SIGKILL, killed
        assert host.profile() == b.path
    activations = len(host.activations())
    result = deploy(host)
    assert result.returncode == 0, result
    # At most the boot loader installed again for x (the profile set back after b's set).
    assert {path for _, path in host.activations()[activations:]} <= {x.path}
    assert_links(host, current=x, profile=x)
    assert host.boot_default() == x.path
    assert journal(host)["phase"] == "rolled-back"
    assert "was forced; this run is not: undoing it" in result.stderr
    dirty_because(host, "hand-switch")
    forced = deploy(host, "--force")
    assert forced.returncode == 0, forced
    assert_links(host, current=b, profile=b)


def test_a_hand_test_of_upstream_is_left_alone_and_deployed_after_the_reboot(host: Host) -> None:
    """`nixos-rebuild test` of what CI published: the next boot still loads the agent's
    system, so it is not tracked (status would call the host up to date while its next
    boot goes back); left alone until the reboot, then deployed properly."""
    systems = deployed_by_agent(host, "a", "b", "c")
    b, c = systems["b"], systems["c"]
    host.deploy_by_hand(c, "test")
    host.publish(c)
    dirty_because(host, "hand-activation")
    activations = host.activations()
    result = deploy(host)
    assert result.returncode == 0, result
    assert host.activations() == activations, "nothing activated over the hand test"
    assert record(host)["path"] == b.path, "the hand test was tracked"
    assert_links(host, current=c, profile=b)
    host.reboot()
    assert_links(host, current=b, profile=b)
    result = deploy(host)
    assert result.returncode == 0, result
    assert_links(host, current=c, profile=c)
    assert host.boot_default() == c.path
    assert (record(host)["path"], host.snapshot()["state"]) == (c.path, "up-to-date")


def test_a_forced_deploy_over_a_cut_short_one_goes_back_to_the_hand_switch_between(
    host: Host,
) -> None:
    """A deploy of b cut short; someone switches to x by hand; --force deploys b in its
    place, and b fails its checks: what comes back is x (running, profile, next boot), not
    what ran before the first deploy."""
    systems = deployed_by_agent(host, "a", "b", "x", "c")
    c, x = systems["c"], systems["x"]
    host.publish(c)
    assert host.collect().returncode == 0
    deploy_killed_at(host, "profile-set")
    host.deploy_by_hand(x, "switch")
    check = ("--health-check", f'[ "$(readlink {host.current_link})" != {c.path} ]')
    failed = deploy(host, "--force", *check, "--health-timeout", "1")
    assert failed.returncode == 1, failed
    assert f"{c.basename} failed its health checks" in failed.stderr
    assert_links(host, current=x, profile=x)
    assert host.boot_default() == x.path
    assert journal(host)["phase"] == "rolled-back"


def test_a_failed_forced_deploy_over_a_hand_switch_leaves_it_the_operators(host: Host) -> None:
    """The operator switched by hand to x, a system that failed under the agent before;
    --force deploys c, which fails too: x comes back, and is still a hand deploy (dirty),
    not the agent's failed system to replace with the next upstream."""
    systems = deployed_by_agent(host, "a", "b", "x", "c", "d")
    b, x, c, d = systems["b"], systems["x"], systems["c"], systems["d"]
    now = f"$(readlink {host.current_link})"
    failing = f'[ "{now}" != {x.path} ] && [ "{now}" != {c.path} ]'
    check = ("--health-check", failing, "--health-timeout", "1")
    host.publish(x)
    assert host.collect().returncode == 0
    assert deploy(host, *check).returncode == 1
    assert_links(host, current=b, profile=b)
    host.deploy_by_hand(x, "switch")  # the operator insists
    host.publish(c)
    assert host.collect().returncode == 0
    failed = deploy(host, "--force", *check)
    assert failed.returncode == 1, failed
    assert_links(host, current=x, profile=x)
    assert host.boot_default() == x.path
    dirty_because(host, "hand-switch")
    host.publish(d)
    activations = host.activations()
    result = deploy(host, "--max-snapshot-age", "0", *check)
    assert result.returncode == 0, result
    assert host.activations() == activations, "d deployed over the hand switch"
    assert_links(host, current=x, profile=x)


def test_a_reboot_after_a_cut_short_deploy_is_no_hand_deploy(host: Host) -> None:
    """--force over a hand `test`, cut short before its activation; the machine reboots
    into its boot loader's default: nothing was activated since, so it is not dirty (the
    in-flight record's `previous` names the tested system, gone with the reboot), and the
    next run deploys."""
    systems = deployed_by_agent(host, "a", "b", "x", "c")
    b, x, c = systems["b"], systems["x"], systems["c"]
    host.deploy_by_hand(x, "test")
    host.publish(c)
    assert host.collect().returncode == 0
    deploy_killed_at(host, "activating", "--switch-mode", "boot", "--force")
    host.reboot()
    assert_links(host, current=b, profile=c)
    assert host.collect().returncode == 0
    snapshot = host.snapshot()
    assert (snapshot["state"], snapshot["dirty"]) == ("update-available", False)
    result = deploy(host)
    assert result.returncode == 0, result
    assert_links(host, current=c, profile=c)
    assert host.boot_default() == c.path


def test_undoing_a_forced_deploy_keeps_the_hand_boot_it_found(host: Host) -> None:
    """A hand `boot x`; --force deploys x (the profile already names it), cut short before
    its switch; the next run, not forced, undoes it: the profile as it found it, x's (not
    set back to b), the next boot x, the host still dirty with the hand boot."""
    systems = deployed_by_agent(host, "a", "b", "x")
    x = systems["x"]
    host.deploy_by_hand(x, "boot")
    host.publish(x)
    assert host.collect().returncode == 0
    deploy_killed_at(host, "activating", "--force")
    result = deploy(host)
    assert result.returncode == 0, result
    assert journal(host)["phase"] == "rolled-back"
    assert_links(host, current=systems["b"], profile=x)
    assert host.boot_default() == x.path
    dirty_because(host, "hand-boot")
