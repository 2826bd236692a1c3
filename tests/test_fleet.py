"""`fleet --wait-serial`, the promotion gate, against a real Prometheus scraping real
node_exporters. Most hosts here are textfile directories holding what an agent exports,
written atomically as the collector writes it, so that each change comes when the test says;
one test runs real agents (sandbox hosts with real Nix) on a release `publish` signed, and
the README's rollback halt query over them. The fleet view over real sandbox hosts is in
tests/test_rollout_halt.py.

Nothing is timed: the gate is read line by line, and a host changes only after the gate
said what it saw before."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import REPO, Host, SigningKey, SystemSpec, metric, sandbox_fleet
from harness.deploys import deploy
from harness.prometheus import Prometheus, node_exporter, prometheus, readme_promql

from collector.fleet import Progress, assemble
from collector.prometheus import Sample

pytestmark = pytest.mark.prometheus

SERIAL = 12


@dataclass(frozen=True)
class FakeHost:
    """A textfile directory, as a host's collector fills it."""

    textfiles: Path

    def report(
        self, serial: int, state: str = "up-to-date", rollbacks: int = 0, halted: int = 0
    ) -> None:
        lines = [
            "nixos_autodeploy_dirty 0",
            f'nixos_autodeploy_state{{state="{state}"}} 1',
            f"nixos_autodeploy_release_serial {serial}",
            f"nixos_autodeploy_rollbacks_total {rollbacks}",
            f"nixos_autodeploy_rollout_halted {halted}",
            f"nixos_autodeploy_last_collect_timestamp_seconds {time.time():.3f}",
        ]
        temporary = self.textfiles / "nixos-autodeploy.prom.tmp"
        temporary.write_text("\n".join(lines) + "\n")
        os.replace(temporary, self.textfiles / "nixos-autodeploy.prom")


@dataclass(frozen=True)
class Fleet:
    hosts: list[FakeHost]
    targets: list[str]  # their instance labels
    prom: Prometheus

    def seen(self, expr: str, n: int) -> None:
        """Wait until Prometheus has scraped what the hosts now say."""
        self.prom.wait_for(expr, lambda: len(self.prom.query(expr)["data"]["result"]) == n)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    hosts = []
    with ExitStack() as stack:
        targets = []
        for name in ("canary", "web1", "web2"):
            (tmp_path / name).mkdir()
            host = FakeHost(tmp_path / name)
            host.report(SERIAL - 1)
            hosts.append(host)
            targets.append(
                stack.enter_context(node_exporter(host.textfiles, tmp_path / f"{name}.log"))
            )
        prom = stack.enter_context(prometheus(targets, tmp_path, "node"))
        result = Fleet(hosts, targets, prom)
        result.seen(f"nixos_autodeploy_release_serial == {SERIAL - 1}", 3)
        yield result


def start_gate(prom: Prometheus, *args: str, serial: int = SERIAL) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "collector.cli", "fleet", "--prometheus-url", prom.url]
    argv += ["--wait-serial", str(serial), "--interval", "0.2", *args]
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def next_line(gate: subprocess.Popen[str]) -> str:
    assert gate.stdout is not None
    return gate.stdout.readline().rstrip("\n")


def finish(gate: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = gate.communicate(timeout=60)
    return gate.returncode, out, err


def test_the_gate_waits_for_the_fraction_then_succeeds(fleet: Fleet) -> None:
    canary, web1, web2 = fleet.hosts
    canary.report(SERIAL)
    fleet.seen(f"nixos_autodeploy_release_serial == {SERIAL}", 1)
    # A third is there: enough for --fraction 0.3, at once.
    gate = start_gate(fleet.prom, "--fraction", "0.3")
    assert finish(gate) == (0, "serial 12: 1 of 3 hosts up to date, 1 needed\n", "")
    # All of them: it says so as they come, one line per change.
    gate = start_gate(fleet.prom)
    assert next_line(gate) == "serial 12: 1 of 3 hosts up to date, 3 needed"
    web1.report(SERIAL)
    assert next_line(gate) == "serial 12: 2 of 3 hosts up to date, 3 needed"
    web2.report(SERIAL, state="update-available")  # accepted, not deployed yet: not done
    fleet.seen(f"nixos_autodeploy_release_serial == {SERIAL}", 3)
    web2.report(SERIAL)
    code, out, err = finish(gate)
    assert (code, err) == (0, "")
    assert out.splitlines() == ["serial 12: 3 of 3 hosts up to date, 3 needed"]


def test_a_rollback_on_the_serial_fails_the_gate_at_once(fleet: Fleet) -> None:
    canary = fleet.hosts[0]
    canary.report(SERIAL, state="update-available")
    fleet.seen(f"nixos_autodeploy_release_serial == {SERIAL}", 1)
    gate = start_gate(fleet.prom, "--timeout", "1h")
    assert next_line(gate) == "serial 12: 0 of 3 hosts up to date, 3 needed"
    canary.report(SERIAL, state="update-available", rollbacks=1)
    code, _, err = finish(gate)
    assert (code, err) == (1, f"error: serial 12 was rolled back on {fleet.targets[0]}\n")


def test_the_halt_query_fails_the_gate_at_once(fleet: Fleet) -> None:
    fleet.hosts[1].report(SERIAL - 1, halted=1)
    fleet.seen("nixos_autodeploy_rollout_halted == 1", 1)
    gate = start_gate(fleet.prom, "--halt-query", "max(nixos_autodeploy_rollout_halted) > 0")
    code, out, err = finish(gate)
    assert (code, out) == (1, "")
    assert err == "error: the halt query fired: {} 1\n"


def test_the_gate_times_out(fleet: Fleet) -> None:
    gate = start_gate(fleet.prom, "--timeout", "1s")
    code, out, err = finish(gate)
    assert code == 1
    assert out == "serial 12: 0 of 3 hosts up to date, 3 needed\n"
    assert err == "error: timed out after 1s: serial 12: 0 of 3 hosts up to date, 3 needed\n"


# ---- real agents ---------------------------------------------------------------------------

UP_TO_DATE = 'nixos_autodeploy_state{state="up-to-date"} == 1'
# Any host that rolled back from the newest serial the fleet accepted: the README's.
ROLLED_BACK_ON_NEW_SERIAL = readme_promql()[1]


def count(prom: Prometheus, expr: str) -> int:
    return len(prom.query(expr)["data"]["result"])


@pytest.mark.nix
def test_the_gate_and_the_rollback_halt_query_over_real_agents(
    tmp_path: Path, nix_build_store: Path, signing_key: SigningKey
) -> None:
    """Two sandbox hosts collect and deploy what `publish` signed; their own textfiles
    carry the serial the gate waits for, and the serial of the last rollback that the
    README's query halts the fleet on."""
    (tmp_path / "release-key").mkdir()
    key = SigningKey.generate(tmp_path / "release-key", "release-1")
    names = ("canary", "web1")
    with sandbox_fleet(tmp_path, nix_build_store, signing_key, names) as hosts, ExitStack() as up:
        built = {}
        for name, host in zip(names, hosts, strict=True):
            built[name] = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
            host.install(built[name]["a"])
            host.write_deployed(built[name]["a"], previous=built[name]["a"])

        def release(serial: int, system: str) -> None:
            named = [w for name in names for w in ("--host", f"{name}={built[name][system]}")]
            body = hosts[0].sign_release(
                "--key-file", str(key.secret_file), "--serial", str(serial), *named
            )
            for host in hosts:
                host.server.publish_body(body)

        def agent(host: Host, name: str, *args: str) -> int:
            """The collector's run, then the actuator's."""
            trusted = ("--trusted-key", key.public, "--host-name", name)
            assert host.collect(*trusted).returncode == 0
            return deploy(host, *trusted, *args, timeout=5).returncode

        def rolled_back_on_new() -> bool:
            return count(prom, ROLLED_BACK_ON_NEW_SERIAL) > 0

        release(SERIAL, "b")
        assert [agent(host, name) for name, host in zip(names, hosts, strict=True)] == [0, 0]
        targets = [
            up.enter_context(node_exporter(host.metrics_path.parent, host.tmp / "ne.log"))
            for host in hosts
        ]
        prom = up.enter_context(prometheus(targets, tmp_path, "node"))
        on_serial = f"nixos_autodeploy_release_serial == {SERIAL} and on(instance) {UP_TO_DATE}"
        prom.wait_for("both hosts up to date on the serial", lambda: count(prom, on_serial) == 2)
        assert finish(start_gate(prom)) == (0, "serial 12: 2 of 2 hosts up to date, 2 needed\n", "")
        assert not rolled_back_on_new()  # no rollback yet

        # Serial 13 fails its health check on the canary, which rolls back from it: the
        # gate waiting on it fails, and the README's query holds web1 back.
        release(SERIAL + 1, "c")
        gate = start_gate(prom, serial=SERIAL + 1)
        assert next_line(gate) == "serial 13: 0 of 2 hosts up to date, 2 needed"
        canary, web1 = hosts
        assert agent(canary, "canary", "--health-check", "false", "--health-timeout", "1") == 1
        assert canary.current() == built["canary"]["b"].path
        code, _, err = finish(gate)
        assert (code, err) == (1, f"error: serial 13 was rolled back on {targets[0]}\n")
        assert metric(canary.metrics(), "nixos_autodeploy_last_rollback_serial") == SERIAL + 1
        prom.wait_for("the rollback to reach the query", rolled_back_on_new)
        view = canary.run_agent("fleet", "--prometheus-url", prom.url, env={"COLUMNS": "300"})
        assert view.returncode == 0, view
        (row,) = [line for line in view.stdout.splitlines() if targets[0] in line]
        assert "1 (serial 13)" in row, view.stdout  # the rollbacks column: from which release
        halt = ("--prometheus-url", prom.url, "--halt-query", ROLLED_BACK_ON_NEW_SERIAL)
        assert agent(web1, "web1", *halt) == 0
        assert web1.activations() == [("switch", built["web1"]["b"].path)]
        assert web1.snapshot()["rollout"]["halted"] is True
        # CI publishes serial 14 (back to b): the canary's rollback from 13 no longer halts.
        release(SERIAL + 2, "b")
        assert canary.collect("--trusted-key", key.public, "--host-name", "canary").returncode == 0
        prom.wait_for("a newer serial to quiet the query", lambda: not rolled_back_on_new())


def test_a_gate_with_no_prometheus_fails(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "collector.cli", "fleet", "--wait-serial", "1"]
    argv += ["--prometheus-url", "http://127.0.0.1:9", "--timeout", "5s"]
    done = subprocess.run(
        argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True
    )
    assert done.returncode == 1
    *retries, last = done.stderr.splitlines()  # the HTTP door says each retry
    assert last.startswith("error: Prometheus http://127.0.0.1:9/api/v1/query")
    assert all("retrying" in line for line in retries)


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (("--wait-serial", "x"), "not a release serial: 'x'"),
        (("--wait-serial", "1", "--fraction", "0"), "not a fraction above 0"),
        (("--wait-serial", "1", "--fraction", "1.5"), "not a fraction above 0"),
        (("--wait-serial", "1", "--timeout", "soon"), "not a duration"),
        (("--selector", 'job="node"'), "not a label selector"),
    ],
)
def test_bad_words_are_usage_errors(words: tuple[str, ...], message: str) -> None:
    argv = [sys.executable, "-m", "collector.cli", "fleet", "--prometheus-url", "http://p:1"]
    done = subprocess.run(
        [*argv, *words],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert message in done.stderr.splitlines()[-1]


# ---- the view's reading of the series (what Prometheus answered) ------------------------


def sample(name: str, value: float, at: float = 1000.0, **labels: str) -> Sample:
    every = {"__name__": f"nixos_autodeploy_{name}", "job": "node"} | labels
    return Sample(tuple(sorted(every.items())), value, at)


def test_hosts_sort_worst_first_and_a_silent_collector_is_stale() -> None:
    series = [
        sample("state", 1, instance="ok", state="up-to-date"),
        sample("last_collect_timestamp_seconds", 990, instance="ok"),
        sample("state", 1, instance="late", state="update-available"),
        sample("last_collect_timestamp_seconds", 990, instance="late"),
        sample("state", 1, instance="broken", state="update-available"),
        sample("last_health_check_success", 0, instance="broken"),
        sample("last_collect_timestamp_seconds", 990, instance="broken"),
        sample("state", 1, instance="silent", state="up-to-date"),
        sample("last_collect_timestamp_seconds", 1000 - 901, instance="silent"),
    ]
    up = [Sample((("instance", "gone"), ("job", "node")), 0, 1000)]
    fleet = assemble(series, up)
    assert [(h.instance, h.condition) for h in fleet.hosts] == [
        ("gone", "stale"),
        ("silent", "stale"),
        ("broken", "failing"),
        ("late", "update-available"),
        ("ok", "up-to-date"),
    ]
    assert fleet.hosts[1].stale == "collector not reporting"
    assert fleet.counts(lambda h: h.state) == {
        "unknown": 1,
        "up-to-date": 2,
        "update-available": 2,
    }


def test_a_host_first_seen_rolled_back_is_not_blamed_for_an_old_rollback() -> None:
    """Rollbacks count from the gate's first look: one before it is not on this serial."""
    gate = Progress(SERIAL, 1.0)
    before = assemble([sample("release_serial", SERIAL), sample("rollbacks_total", 2)], [])
    assert gate.rolled_back(before) == []
    after = assemble([sample("release_serial", SERIAL), sample("rollbacks_total", 3)], [])
    assert [h.rollbacks for h in gate.rolled_back(after)] == [3]


def test_on_a_terminal_the_gate_draws_a_progress_bar(fleet: Fleet) -> None:
    """stdout a terminal (a pty): a bar carrying the same words, redrawn in place."""
    primary, secondary = os.openpty()
    argv = [sys.executable, "-m", "collector.cli", "fleet", "--prometheus-url", fleet.prom.url]
    argv += ["--wait-serial", str(SERIAL), "--interval", "0.2", "--timeout", "1s"]
    gate = subprocess.Popen(
        argv,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "TERM": "xterm"},
        stdout=secondary,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the pty's other end closed: the gate is done
            break
        if not chunk:
            break
        shown += chunk
    os.close(primary)
    _, err = gate.communicate(timeout=60)
    assert gate.returncode == 1
    assert err.endswith("hosts up to date, 3 needed\n")
    assert b"serial 12: 0 of 3 hosts up to date, 3 needed" in shown
    assert b"\x1b[" in shown  # drawn with terminal control sequences, not plain lines


def test_fleet_without_a_prometheus_is_one_clear_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "collector.cli", "fleet"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "error: no Prometheus to ask: give --prometheus-url\n"
