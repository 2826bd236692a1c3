"""The wave of a phased rollout: each host's wariness (from its FleetLock ID, or given), its
turn in a release's `rollout` (start + wariness * duration), the wave asked before the halt
query, and what the collector shows of the actuator's verdict (status, status --json,
metrics), and end to end: a release published with `publish --rollout-start
--rollout-duration`, collected and deployed by sandbox hosts with real Nix. Time is the
`now` the tests pass, or a wave whose start is placed in the past (no waiting through a
rollout)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from harness import (
    NEW_KERNEL,
    Host,
    SigningKey,
    System,
    SystemSpec,
    metric,
    require_tool,
    sandbox_fleet,
)
from harness.deploys import assert_links, decisions, deploy, deploy_killed_at, history, tracking
from harness.prometheus import free_port

from actuator import fleetlock
from actuator.rollout import verdict
from collector.config import Paths, Settings
from collector.rollout import Ramp, Rollout, ramp_of, wariness

# The FleetLock test's machine ID and the host ID systemd derives from it.
MACHINE_ID = "3d1219c7c4c5404aaa1f6d2a48adfda4"
HOST_ID = "fc93c744abae4f8eaf28b43ec235e827"
START = 1_800_000_000.0
DURATION = 86_400.0
RELEASE: dict[str, Any] = {"rollout": {"start": START, "duration": DURATION}}


def test_wariness_is_the_specified_hash_as_sha256sum_computes_it() -> None:
    """The first 8 bytes of SHA-256("nixos-autodeploy-rollout:" + ID), big-endian, / 2^64,
    checked against coreutils' sha256sum (another implementation)."""
    digest = subprocess.run(
        [require_tool("sha256sum")],
        input=f"nixos-autodeploy-rollout:{HOST_ID}".encode(),
        capture_output=True,
        check=True,
    ).stdout.split()[0]
    assert wariness(HOST_ID) == int(digest[:16], 16) / 2**64


def test_wariness_spreads_a_fleet_evenly_and_stays_put() -> None:
    ids = [f"{n:032x}" for n in range(10_000)]
    places = [wariness(i) for i in ids]
    assert all(0 <= w < 1 for w in places)
    deciles = [sum(1 for w in places if d / 10 <= w < (d + 1) / 10) for d in range(10)]
    assert all(850 <= count <= 1150 for count in deciles), deciles
    assert places == [wariness(i) for i in ids]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rollout": [1, 2]}, '"rollout" must be {"start"'),
        ({"rollout": {"start": 1}}, '"rollout" must be {"start"'),
        ({"rollout": {"start": 1, "duration": 2, "x": 3}}, '"rollout" must be {"start"'),
        ({"rollout": {"start": "1", "duration": 2}}, '"rollout" "start" must be a number'),
        ({"rollout": {"start": 1, "duration": True}}, '"rollout" "duration" must be a number'),
        ({"rollout": {"start": 1, "duration": -1}}, '"rollout" "duration" must be finite'),
        ({"rollout": {"start": float("inf"), "duration": 1}}, '"rollout" "start" must be'),
    ],
)
def test_a_malformed_rollout_is_said_in_words(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("{", r"\{").replace("[", r"\[")):
        ramp_of(fields)


def test_a_release_without_rollout_has_no_wave() -> None:
    assert ramp_of({}) is None
    assert ramp_of({"rollout": None, "other": 1}) is None
    assert ramp_of(RELEASE) == Ramp(START, DURATION)


def settings(tmp_path: Path, **fields: Any) -> Settings:
    return Settings(paths=Paths(str(tmp_path), str(tmp_path / "state")), **fields)


@pytest.mark.parametrize(
    ("place", "now", "waiting"),
    [
        (0.0, START, False),  # a canary goes at the start
        (0.5, START + 0.49 * DURATION, True),
        (0.5, START + 0.5 * DURATION, False),
        (1.0, START + 0.99 * DURATION, True),  # the last goes at the end
        (1.0, START + DURATION, False),
    ],
)
def test_a_host_deploys_at_its_turn_and_not_before(
    tmp_path: Path, place: float, now: float, waiting: bool
) -> None:
    said = verdict(settings(tmp_path, rollout_wariness=place), RELEASE, now)
    assert said is not None
    assert (said.wariness, said.turn_at) == (place, START + place * DURATION)
    assert (said.waiting, said.halted) == (waiting, False)
    turn = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(START + place * DURATION))
    if waiting:
        assert said.reason == f"waiting for this host's turn at {turn} (wariness {place:.2f})"
    else:
        assert said.reason == f"this host's turn came at {turn}"


def test_the_default_wariness_comes_from_the_fleet_lock_id(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/machine-id").write_text(MACHINE_ID + "\n")
    here = settings(tmp_path)
    assert fleetlock.host_id(here.paths) == HOST_ID
    said = verdict(here, RELEASE, START)
    assert said is not None
    assert said.wariness == wariness(HOST_ID)
    assert said.turn_at == START + wariness(HOST_ID) * DURATION


def test_no_wave_and_no_halt_query_say_nothing(tmp_path: Path) -> None:
    assert verdict(settings(tmp_path), {}, START) is None


def test_a_malformed_rollout_holds_the_deploy_back(tmp_path: Path) -> None:
    said = verdict(settings(tmp_path), {"rollout": {"start": 1}}, START)
    assert said is not None and said.halted
    assert said.reason.startswith("the release's rollout is malformed, not deploying: ")


def test_the_halt_query_is_asked_only_once_it_is_this_hosts_turn(tmp_path: Path) -> None:
    """Nothing listens at the Prometheus URL: asked, the halt fails closed. Before the turn
    the host waits without asking; at its turn it asks, and is halted."""
    unreachable = settings(
        tmp_path,
        rollout_wariness=0.5,
        halt_query="vector(0)",
        prometheus_url=f"http://127.0.0.1:{free_port()}",
        timeout=5,
    )
    before = verdict(unreachable, RELEASE, START)
    assert before is not None and before.waiting and not before.halted
    at_turn = verdict(unreachable, RELEASE, START + DURATION)
    assert at_turn is not None and at_turn.halted and not at_turn.waiting
    assert at_turn.reason.startswith("the halt query could not be asked, failing closed")
    assert at_turn.wariness == 0.5


def test_a_bad_wariness_is_one_clear_error(host: Host) -> None:
    result = host.run_agent("deploy", "--dry-run", "--rollout-wariness", "1.5")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: the rollout wariness must be from 0 to 1, not 1.5"
    ]


# ---- what the collector shows of the actuator's verdict ----------------------------------


@pytest.mark.nix
def test_status_and_metrics_show_this_hosts_turn_and_a_finished_question_is_cleared(
    host: Host,
) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    tracking(host, systems["a"], systems["b"], collect=True)
    turn = time.time() + 3600
    waiting = Rollout(False, "waiting for this host's turn", time.time(), 0.37, turn)
    (host.state_dir / "rollout.json").write_text(json.dumps(waiting.to_json()))
    assert host.collect().returncode == 0
    shown = host.status()
    clock = time.strftime("%H:%M", time.localtime(turn))
    assert f"rollout: this host's turn at {clock}, wariness 0.37" in shown.stdout, shown
    rollout = json.loads(host.status("--json").stdout)["rollout"]
    assert rollout == {
        "wariness": 0.37,
        "turn_at": turn,
        "halted": False,
        "reason": "waiting for this host's turn",
        "checked_at": waiting.checked_at,
    }
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_rollout_wariness") == 0.37
    assert metric(text, "nixos_autodeploy_rollout_turn_timestamp_seconds") == turn
    assert metric(text, "nixos_autodeploy_rollout_halted") == 0
    # Deployed (no wave in this upstream, no halt query): no verdict left to show.
    assert deploy(host).returncode == 0
    assert not (host.state_dir / "rollout.json").exists()
    assert json.loads(host.status("--json").stdout)["rollout"] is None
    assert "nixos_autodeploy_rollout_wariness" not in host.metrics()


# ---- a published wave, end to end ----------------------------------------------------------

WAVE = 7200  # seconds: --rollout-duration 2h


@pytest.fixture
def release_key(tmp_path: Path) -> SigningKey:
    (tmp_path / "release-key").mkdir()
    return SigningKey.generate(tmp_path / "release-key", "release-1")


def publish_wave(
    hosts: list[Host], key: SigningKey, serial: int, systems: dict[str, System], start: int | None
) -> None:
    """CI's `publish` of `systems` (host name, or "*", to system), with a wave of WAVE
    seconds from `start` (None: no rollout), served to every host."""
    named = [
        word
        for name, system in systems.items()
        for word in (("--system", system.path) if name == "*" else ("--host", f"{name}={system}"))
    ]
    wave = [] if start is None else ["--rollout-start", str(start), "--rollout-duration", "2h"]
    body = hosts[0].sign_release(
        *("--key-file", str(key.secret_file), "--serial", str(serial), *named, *wave)
    )
    for host in hosts:
        host.server.publish_body(body)


def running(host: Host, system: System) -> None:
    """The agent deployed `system` and it runs."""
    host.install(system)
    host.write_deployed(system, previous=system)


def last_decision(host: Host) -> dict[str, Any]:
    return [e for e in history(host) if e["event"] == "decision"][-1]


@pytest.mark.nix
def test_a_published_wave_takes_the_canary_at_once_and_the_last_host_at_its_turn(
    tmp_path: Path, nix_build_store: Path, signing_key: SigningKey, release_key: SigningKey
) -> None:
    with sandbox_fleet(tmp_path, nix_build_store, signing_key, ("canary", "last")) as hosts:
        canary, last = hosts
        built = {}
        for name, host in zip(("canary", "last"), hosts, strict=True):
            systems = host.build(SystemSpec("a"), SystemSpec("b"))  # each root its own
            running(host, systems["a"])
            built[name] = systems
        b = {name: systems["b"] for name, systems in built.items()}
        start = int(time.time()) - 3600  # an hour in: the canary's turn came, not the last's
        publish_wave(hosts, release_key, 1, b, start)
        trusted = ("--trusted-key", release_key.public, "--host-name")

        went = deploy(canary, *trusted, "canary", "--rollout-wariness", "0")
        assert went.returncode == 0, went
        assert canary.current() == canary.profile() == b["canary"].path
        assert last_decision(canary)["action"] == "deploy"
        said = canary.snapshot()["rollout"]
        assert (said["wariness"], said["turn_at"], said["halted"]) == (0, start, False)

        waited = deploy(last, *trusted, "last", "--rollout-wariness", "0.99")
        assert waited.returncode == 0, waited
        assert last.activations() == [] and last.current() == built["last"]["a"].path
        turn = start + 0.99 * WAVE
        utc = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(turn))
        decided = last_decision(last)
        assert (decided["action"], decided["state"]) == ("nothing", "update-available")
        waiting = f"rollout: waiting for this host's turn at {utc} (wariness 0.99)"
        assert decided["reason"] == waiting
        shown = last.status()
        clock = time.strftime("%H:%M", time.localtime(turn))
        assert f"rollout: this host's turn at {clock}, wariness 0.99" in shown.stdout, shown
        rollout = json.loads(last.status("--json").stdout)["rollout"]
        assert (rollout["wariness"], rollout["turn_at"], rollout["halted"]) == (0.99, turn, False)
        assert rollout["reason"] == decided["reason"].removeprefix("rollout: ")
        text = last.metrics()
        assert metric(text, "nixos_autodeploy_rollout_wariness") == 0.99
        assert metric(text, "nixos_autodeploy_rollout_turn_timestamp_seconds") == turn
        assert metric(text, "nixos_autodeploy_rollout_halted") == 0

        # CI moves the wave's start back (a new serial): the last host's turn has come.
        publish_wave(hosts, release_key, 2, b, int(time.time()) - 2 * WAVE)
        assert last.collect(*trusted, "last").returncode == 0
        went = deploy(last, *trusted, "last", "--rollout-wariness", "0.99")
        assert went.returncode == 0, went
        assert [path for _, path in last.activations()] == [b["last"].path]
        assert last_decision(last)["action"] == "deploy"
        assert last.snapshot()["rollout"]["reason"].startswith("this host's turn came at ")


@pytest.mark.nix
def test_a_published_release_without_rollout_deploys_at_once(
    host: Host, release_key: SigningKey
) -> None:
    """No trusted keys: the release is accepted unverified, and it has no wave."""
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    running(host, systems["a"])
    publish_wave([host], release_key, 1, {"*": systems["b"]}, None)
    went = deploy(host, "--rollout-wariness", "0.99")
    assert went.returncode == 0, went
    assert host.current() == systems["b"].path
    assert not (host.state_dir / "rollout.json").exists()


# ---- what the wave never holds back, nor an operator's --force -----------------------------


def waiting_wave(host: Host, key: SigningKey, system: System) -> None:
    """A release whose wave started an hour ago: wariness 0 has had its turn, 0.99 waits."""
    publish_wave([host], key, 1, {"*": system}, int(time.time()) - 3600)


CANARY, WAITING = ("--rollout-wariness", "0"), ("--rollout-wariness", "0.99")


@pytest.mark.nix
def test_an_interrupted_deploy_is_finished_while_the_wave_waits(
    host: Host, release_key: SigningKey
) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    running(host, systems["a"])
    waiting_wave(host, release_key, systems["b"])
    deploy_killed_at(host, "planned", *CANARY)  # nothing changed yet: its turn had come
    result = deploy(host, *WAITING)
    assert result.returncode == 0, result
    assert decisions(host)[-1] == ("deploy", "update-available")
    assert_links(host, current=systems["b"], profile=systems["b"])


@pytest.mark.nix
def test_a_rollback_cut_short_is_finished_while_the_wave_waits(
    host: Host, release_key: SigningKey
) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    running(host, a)
    waiting_wave(host, release_key, b)
    host.fail_activation_late(b)
    deploy_killed_at(host, "rolling-back", *CANARY)
    result = deploy(host, *WAITING)
    assert result.returncode == 0, result
    assert_links(host, current=a, profile=a)


@pytest.mark.nix
def test_the_reboot_a_deploy_needs_is_not_held_back_by_the_wave(
    host: Host, release_key: SigningKey
) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    running(host, systems["old"])
    waiting_wave(host, release_key, systems["new"])
    assert deploy(host, "--switch-mode", "boot", *CANARY).returncode == 0
    result = deploy(host, "--switch-mode", "boot", "--reboot-mode", "reboot", *WAITING)
    assert result.returncode == 0, result
    assert host.recorded("systemctl") == [["reboot"]]
    assert decisions(host)[-1] == ("reboot", "pending-reboot")


@pytest.mark.nix
def test_force_deploys_without_asking_the_wave_or_the_halt(
    host: Host, release_key: SigningKey
) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    running(host, systems["a"])
    waiting_wave(host, release_key, systems["b"])
    unreachable = ("--prometheus-url", f"http://127.0.0.1:{free_port()}", "--halt-query", "1")
    held = deploy(host, *WAITING, *unreachable)
    assert held.returncode == 0, held
    assert host.activations() == []
    assert last_decision(host)["reason"].startswith("rollout: waiting for this host's turn")
    forced = deploy(host, *WAITING, *unreachable, "--force")
    assert forced.returncode == 0, forced
    assert_links(host, current=systems["b"], profile=systems["b"])
    reason = last_decision(host)["reason"]
    assert reason.endswith("; --force: the rollout's wave and halt are not asked"), reason
    assert not (host.state_dir / "rollout.json").exists()
