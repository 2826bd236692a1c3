"""The halt, end to end over a small fleet: three sandbox hosts with real Nix, each with
its own signed binary cache on loopback and its own real node_exporter serving its
textfile; one real Prometheus scrapes them all. The canary's failing health check rolls
it back; the README's default halt query then holds every other host back, and a
Prometheus that is gone holds them back too (fail closed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from harness import NEW_KERNEL, Host, SigningKey, SystemSpec, metric, sandbox_fleet
from harness.deploys import (
    assert_links,
    decisions,
    deploy,
    deploy_killed_at,
    history,
    tracking,
)
from harness.prometheus import Prometheus, free_port, node_exporter, prometheus, readme_promql

pytestmark = [pytest.mark.prometheus, pytest.mark.nix]

JOB = "nixos-autodeploy-fleet"

# Any rollback anywhere in the fleet in the last hour: the README's default.
HALT = readme_promql()[0]


@pytest.fixture
def fleet(tmp_path: Path, nix_build_store: Path, signing_key: SigningKey) -> Iterator[list[Host]]:
    """Three hosts sharing the build store and key (so the same systems), each with its
    own root, cache and server."""
    with sandbox_fleet(tmp_path, nix_build_store, signing_key, ("canary", "web1", "web2")) as hosts:
        yield hosts


def halted_deploy(host: Host, prom_url: str) -> None:
    result = deploy(host, "--prometheus-url", prom_url, "--halt-query", HALT)
    assert result.returncode == 0, result


def test_a_canary_rollback_halts_the_fleet_and_a_lost_prometheus_too(
    fleet: list[Host], tmp_path: Path
) -> None:
    canary, web1, web2 = fleet
    for host in fleet:  # the same systems everywhere: one build, copied to each cache
        systems = host.build(SystemSpec("a"), SystemSpec("b"))
        tracking(host, systems["a"], systems["b"], collect=True)
    with ExitStack() as servers:
        exporters = [servers.enter_context(ExitStack()) for _ in fleet]  # each stops alone
        targets = [
            exporter.enter_context(node_exporter(h.metrics_path.parent, h.tmp / "ne.log"))
            for exporter, h in zip(exporters, fleet, strict=True)
        ]
        prom = servers.enter_context(prometheus(targets, tmp_path, JOB))
        wait_for_samples(prom, "nixos_autodeploy_rollbacks_total", len(fleet))
        # Nothing fires yet: a host asking now deploys (the query lets it go).
        assert prom.query(HALT)["data"]["result"] == []

        failed = deploy(canary, "--health-check", "false", "--health-timeout", "1", timeout=5)
        assert failed.returncode == 1, failed
        assert metric(canary.metrics(), "nixos_autodeploy_rollbacks_total") == 1
        prom.wait_for("the rollback to reach the halt query", lambda: fires(prom))

        for host in (web1, web2):
            halted_deploy(host, prom.url)
            assert host.activations() == []
            snapshot = host.snapshot()
            assert snapshot["state"] == "update-available"
            assert snapshot["rollout"]["halted"] is True
            assert "the halt query fired" in snapshot["rollout"]["reason"]
            assert metric(host.metrics(), "nixos_autodeploy_rollout_halted") == 1
            (last,) = [e for e in history(host) if e["event"] == "decision"][-1:]
            assert (last["action"], last["reason"].split(":")[0]) == ("nothing", "rollout halted")
            shown = host.status()
            assert "rollout: halted: the halt query fired" in shown.stdout, shown
        # A query that does not fire lets the deploy go.
        going = deploy(web2, "--prometheus-url", prom.url, "--halt-query", "vector(0)")
        assert going.returncode == 0, going
        assert [path for _, path in web2.activations()] == [web2.snapshot()["upstream_link"]]
        assert web2.snapshot()["rollout"]["halted"] is False
        prom.wait_for("web2 up to date", lambda: count(prom, UP_TO_DATE) == 1)

        # The fleet view: worst first, counted by state.
        canary_at, web1_at, web2_at = targets
        view = fleet_json(canary, prom.url)
        assert [h["instance"] for h in view["hosts"]] == [canary_at, web1_at, web2_at]
        assert [h["condition"] for h in view["hosts"]] == ["failing", "halted", "up-to-date"]
        first = view["hosts"][0]
        assert (first["state"], first["rollbacks"], first["health_ok"]) == (
            "update-available",
            1,
            False,
        )
        assert first["current"] == Path(str(canary.current())).name
        kinds = ("added", "removed", "upgraded", "downgraded", "changed")
        changes = [metric(canary.metrics(), PENDING, kind=k) for k in kinds]
        assert first["pending"] == sum(changes) > 0
        assert view["hosts"][2]["pending"] == 0
        assert view["counts"]["state"] == {"up-to-date": 1, "update-available": 2}
        assert view["counts"]["serial"] == {"-": 3}  # no signed releases here
        assert view["stale"] == []
        table = canary.run_agent("fleet", "--prometheus-url", prom.url, env={"COLUMNS": "300"})
        assert table.returncode == 0, table
        assert table.stdout.splitlines()[:2] == [
            "3 hosts: 1 up-to-date, 2 update-available",
            "serials: -: 3; stale: 0",
        ]
        rows = [line for line in table.stdout.splitlines() if "127.0.0.1:" in line]
        assert [target for row in rows for target in targets if target in row] == targets
        assert "halted" in rows[1] and "failed" in rows[0]
        selected = fleet_json(canary, prom.url, "--selector", f'{{instance="{web2_at}"}}')
        assert [h["instance"] for h in selected["hosts"]] == [web2_at]

        # web1's node_exporter is gone: its scrape fails, it shows as stale, first.
        exporters[1].close()
        prom.wait_for("web1's scrape to fail", lambda: count(prom, "up == 0") == 1)
        view = fleet_json(canary, prom.url)
        assert view["hosts"][0]["instance"] == web1_at
        assert view["hosts"][0]["stale"] == "scrape failing"
        assert view["stale"] == [web1_at]
    # Prometheus is gone: still halted, and it says why.
    halted_deploy(web1, prom.url)
    assert web1.activations() == []
    reason = web1.snapshot()["rollout"]["reason"]
    assert reason.startswith("the halt query could not be asked, failing closed: Prometheus")
    assert decisions(web1)[-1] == ("nothing", "update-available")


def wait_for_samples(prom: Prometheus, name: str, hosts: int) -> None:
    """Each host's series scraped twice or more, so increase() sees the next change."""
    expr = f"count(count_over_time({name}[1m]) >= 2)"

    def scraped() -> bool:
        result = prom.query(expr)["data"]["result"]
        return bool(result) and int(float(result[0]["value"][1])) == hosts

    prom.wait_for(f"{hosts} hosts' {name}", scraped)


UP_TO_DATE = 'nixos_autodeploy_state{state="up-to-date"} == 1'
PENDING = "nixos_autodeploy_pending_changes"


def count(prom: Prometheus, expr: str) -> int:
    return len(prom.query(expr)["data"]["result"])


def fleet_json(host: Host, url: str, *args: str) -> Any:
    shown = host.run_agent("fleet", "--prometheus-url", url, "--json", *args)
    assert shown.returncode == 0, shown
    return json.loads(shown.stdout)


def fires(prom: Prometheus) -> bool:
    return bool(prom.query(HALT)["data"]["result"])


# ---- what the halt never holds back -------------------------------------------------------


def unreachable_halt() -> tuple[str, ...]:
    """A halt that always holds back: nothing listens at its Prometheus (fail closed)."""
    return ("--prometheus-url", f"http://127.0.0.1:{free_port()}", "--halt-query", HALT)


def test_an_unanswered_halt_holds_a_new_deploy_back(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    tracking(host, systems["a"], systems["b"], collect=True)
    result = deploy(host, *unreachable_halt())
    assert result.returncode == 0, result
    assert host.activations() == []
    last = history(host)[-1]
    assert (last["event"], last["action"]) == ("decision", "nothing")
    assert last["reason"].startswith("rollout halted: the halt query could not be asked")
    assert metric(host.metrics(), "nixos_autodeploy_rollout_halted") == 1
    status = host.status("--json")
    assert '"halted": true' in status.stdout, status


def test_an_interrupted_deploy_is_finished_while_the_halt_holds(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    deploy_killed_at(host, "planned")  # nothing changed yet: a fresh deploy would be asked
    result = deploy(host, *unreachable_halt())
    assert result.returncode == 0, result
    assert decisions(host)[-1] == ("deploy", "update-available")
    assert_links(host, current=b, profile=b)
    assert not (host.state_dir / "rollout.json").exists(), "the halt was not even asked"


def test_a_rollback_cut_short_is_finished_while_the_halt_holds(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    tracking(host, a, b)
    host.fail_activation_late(b)
    deploy_killed_at(host, "rolling-back")
    result = deploy(host, *unreachable_halt())
    assert result.returncode == 0, result
    assert_links(host, current=a, profile=a)


def test_the_reboot_a_deploy_needs_is_not_held_back(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel=NEW_KERNEL))
    tracking(host, systems["old"], systems["new"])
    assert deploy(host, "--switch-mode", "boot").returncode == 0
    result = deploy(host, "--switch-mode", "boot", "--reboot-mode", "reboot", *unreachable_halt())
    assert result.returncode == 0, result
    assert host.recorded("systemctl") == [["reboot"]]
    assert decisions(host)[-1] == ("reboot", "pending-reboot")
