"""What a fleet of 10,000 hosts costs Prometheus per query: the README's default halt query
(each host asks it before a deploy), `fleet`'s two queries and the promotion gate's, against
a synthetic series set of that many hosts.

    .venv/bin/python benchmarks/fleet_prometheus.py [--hosts N] [--runs N]

Every host exports the series the collector writes (as after a deploy: the info, state,
pending-changes and reboot-reason families in full), one sample per 5-minute scrape for an
hour; 1% rolled back half an hour ago, a tenth still on the older serial. The series are
backfilled with `promtool tsdb create-blocks-from openmetrics` into a TSDB that Debian's
Prometheus then serves; the queries ask at the last scrape's time. Prints, per query, the
median over N runs of the wall time of the HTTP request, Prometheus' own evaluation time
(`stats=all`), the samples it touched, the answer's size, and for `fleet` the time this
agent takes to parse the answer and assemble the table; then Prometheus' peak RSS."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from harness.prometheus import free_port  # noqa: E402

from collector import fleet, prometheus  # noqa: E402

P = "nixos_autodeploy_"
STEP = 300  # the timer collector's period
SCRAPES = 13  # an hour of them
SERIAL = 12
STATES = ("up-to-date", "update-available", "untracked", "dirty", "pending-reboot", "unknown")
KINDS = ("added", "removed", "upgraded", "downgraded", "changed")
REASONS = ("window", "fleet-lock", "operator")


def families(host: int, at: int) -> dict[str, list[tuple[str, float]]]:
    """A host's series at one scrape: {family: [(labels, value)]}."""
    rolled_back = host % 100 == 0 and at >= END - 1800
    serial = SERIAL - 1 if host % 10 == 1 else SERIAL
    system = f"{host:05d}abcdefghijklmnopqrstuvwxyz0-nixos-system-host{host:05d}-24.11"
    info = (
        f'current_generation="{system}",booted_generation="{system}",'
        f'deployed_generation="{system}",upstream_generation="{system}"'
    )
    state = "update-available" if rolled_back else "up-to-date"
    return {
        "dirty": [("", 0)],
        "reboot_required": [("", 0)],
        "info": [(info, 1)],
        "rollout_halted": [("", 0)],
        "rollout_wariness": [("", (host * 7919 % 10000) / 10000)],
        "update_available": [("", float(rolled_back))],
        "state": [(f'state="{s}"', float(s == state)) for s in STATES],
        "upstream_fetch_success": [("", 1)],
        "last_collect_timestamp_seconds": [("", at)],
        "last_upstream_change_timestamp_seconds": [("", END - 7200)],
        "collect_duration_seconds": [("", 0.05)],
        "last_deploy_timestamp_seconds": [("", END - 3600)],
        "last_deploy_success": [("", float(not rolled_back))],
        "deployments_total": [('result="success"', 10), ('result="failure"', float(rolled_back))],
        "pending_changes": [(f'kind="{k}"', 0) for k in KINDS],
        "closure_size_bytes": [('system="current"', 3e9), ('system="upstream"', 3e9)],
        "reboot_pending_reason": [(f'reason="{r}"', 0) for r in REASONS],
        "fleet_lock_held": [("", 0)],
        "last_health_check_success": [("", float(not rolled_back))],
        "last_health_check_timestamp_seconds": [("", END - 3500)],
        "rollbacks_total": [("", float(rolled_back))],
        "release_serial": [("", serial)],
    }


END = 0  # the last scrape's time, set in main


def write_openmetrics(path: Path, hosts: int) -> int:
    """The series set as OpenMetrics (families together, each series' samples in time
    order); returns the number of series."""
    times = [END - STEP * (SCRAPES - 1 - i) for i in range(SCRAPES)]
    names = list(families(0, END))
    series = 0
    with path.open("w") as out:
        for name in names:
            out.write(f"# TYPE {P}{name} gauge\n")
            for host in range(hosts):
                instance = f'instance="host{host:05d}:9100",job="node"'
                by_labels: dict[str, list[str]] = {}
                for at in times:
                    for labels, value in families(host, at)[name]:
                        text = f"{labels},{instance}" if labels else instance
                        by_labels.setdefault(text, []).append(f"{P}{name}{{{text}}} {value} {at}\n")
                for lines in by_labels.values():
                    out.writelines(lines)
                    series += 1
        out.write("# EOF\n")
    return series


def ask(url: str, query: str) -> tuple[float, dict[str, Any], bytes]:
    params = urllib.parse.urlencode({"query": query, "time": str(END), "stats": "all"})
    started = time.perf_counter()
    with urllib.request.urlopen(f"{url}/api/v1/query?{params}", timeout=300) as response:
        body = response.read()
    wall = time.perf_counter() - started
    return wall, json.loads(body), body


def main() -> None:
    global END
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    prom, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not prom or not promtool:
        sys.exit("error: needs Debian's prometheus (prometheus and promtool on PATH)")
    END = int(time.time()) // STEP * STEP - 600
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        series = write_openmetrics(work / "fleet.om", args.hosts)
        print(f"{args.hosts} hosts, {series} series, {series * SCRAPES} samples "
              f"({(work / 'fleet.om').stat().st_size / 1e6:.0f} MB OpenMetrics, "
              f"written in {time.perf_counter() - started:.1f}s)")  # fmt: skip
        started = time.perf_counter()
        subprocess.run(
            [promtool, "tsdb", "create-blocks-from", "openmetrics", "-q", "fleet.om", "tsdb"],
            cwd=work,
            check=True,
        )
        (work / "fleet.om").unlink()
        print(f"backfilled in {time.perf_counter() - started:.1f}s")
        port = free_port()
        (work / "prometheus.yml").write_text("global: {}\n")
        log = (work / "prometheus.log").open("wb")
        server = subprocess.Popen(
            [
                prom,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                "--storage.tsdb.retention.time=30d",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    with urllib.request.urlopen(f"{url}/-/ready", timeout=5):
                        break
                except OSError:
                    time.sleep(0.2)
            report(url, args.runs)
            status = Path(f"/proc/{server.pid}/status").read_text()
            peak = next(line for line in status.splitlines() if line.startswith("VmHWM"))
            print(f"Prometheus peak RSS: {int(peak.split()[1]) / 1024:.0f} MiB")
        finally:
            server.terminate()
            server.wait()


QUERIES = {
    "halt (README default)": "sum(increase(nixos_autodeploy_rollbacks_total[1h])) > 0",
    "halt (failing on the serial)": (
        f"count((nixos_autodeploy_last_health_check_success == 0) and on (instance, job) "
        f"(nixos_autodeploy_release_serial == {SERIAL})) > 0"
    ),
    "fleet: the table's series": fleet.series_query(""),
    "fleet: up": "up",
    "gate: hosts done": (
        f"count((nixos_autodeploy_release_serial == {SERIAL}) and on (instance, job) "
        f'(nixos_autodeploy_state{{state="up-to-date"}} == 1))'
    ),
}


def report(url: str, runs: int) -> None:
    print(f"{'query':30} {'wall ms':>8} {'eval ms':>8} {'samples':>9} {'answer':>9} {'series':>7}")
    for title, query in QUERIES.items():
        ask(url, query)  # the first asks load the blocks' index from disk
        walls, evals = [], []
        for _ in range(runs):
            wall, answer, body = ask(url, query)
            assert answer["status"] == "success", answer
            walls.append(wall)
            evals.append(answer["data"]["stats"]["timings"]["evalTotalTime"])
        stats = answer["data"]["stats"]
        touched = stats["samples"]["totalQueryableSamples"]
        result = answer["data"]["result"]
        print(
            f"{title:30} {statistics.median(walls) * 1000:8.1f} "
            f"{statistics.median(evals) * 1000:8.1f} {touched:9d} "
            f"{len(body) / 1e6:7.2f}MB {len(result):7d}"
        )
        if title == "fleet: the table's series":
            parse_times = []
            for _ in range(runs):
                started = time.perf_counter()
                samples = prometheus.parse(body, url)
                view = fleet.assemble(samples, ())
                parse_times.append(time.perf_counter() - started)
            print(
                f"{'  agent: parse + assemble':30} {statistics.median(parse_times) * 1000:8.1f}"
                f" ms for {len(view.hosts)} hosts"
            )


if __name__ == "__main__":
    main()
