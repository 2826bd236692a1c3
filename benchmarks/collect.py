"""What one `collect` costs, when nothing changed and when upstream changed, next to the
same work done the original tool's way (curl, nix-store --realise --add-root, a .prom
written by the shell), measured in the same run against the same signed binary cache;
and what a poll of the resident collector (`collect --every`) costs.

    .venv/bin/python benchmarks/collect.py [--runs N] [--polls M]

Prints medians over N runs: wall time, CPU time (user+system of the process and all it
waited for, from GNU time), peak RSS, Nix processes spawned, and body bytes the server sent.
Then the resident collector, driven poll by poll with SIGHUP (each poll's end is its
STATUS= notification): CPU per poll from its own /proc/PID/stat (its children included)
over N changed polls and M no-change polls, Nix processes and body bytes per poll, and
its RSS after 100 and after M no-change polls. Then the same with a trusted key and
signed releases (N changed polls, each a new serial verified, and M no-change polls),
and the CPU of judging one signed release in-process (parse, Ed25519, rules)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

sys.path.insert(0, str(REPO))

from harness import Host, SigningKey, System, SystemSpec, standalone_host  # noqa: E402

from collector import release  # noqa: E402

NIX_TOOLS = ("nix-store", "nix-env", "nix")

# The original tool's collect, in its own terms: fetch, realise, compare links, write.
ORIGINAL = r"""
set -eu
url=$1 root=$2 prom=$3
upstream=$(curl --silent --fail --max-time 60 "$url")
nix-store --realise "$upstream" --add-root "$root/run/upstream-system" >/dev/null
current=$(readlink -f "$root/run/current-system")
booted=$(readlink -f "$root/run/booted-system")
deployed=$(readlink -f "$root/run/deployed-system" || true)
dirty=0
if [ "$current" != "$deployed" ] && [ "$current" != "$upstream" ]; then dirty=1; fi
reboot=0
for f in kernel initrd kernel-modules; do
  [ "$(readlink -f "$booted/$f")" = "$(readlink -f "$current/$f")" ] || reboot=1
done
{
  echo "nixos_autodeploy_dirty $dirty"
  echo "nixos_autodeploy_reboot_required $reboot"
  printf 'nixos_autodeploy_info{current_generation="%s",booted_generation="%s",' \
    "${current##*/}" "${booted##*/}"
  printf 'deployed_generation="%s",upstream_generation="%s"} 1\n' \
    "${deployed##*/}" "${upstream##*/}"
} > "$prom.tmp"
mv "$prom.tmp" "$prom"
"""


@dataclass(frozen=True)
class Sample:
    wall: float
    cpu: float
    rss_kib: int
    nix_processes: int
    bytes_sent: int


def bytes_sent(host: Host, since: int, upstream_body: bytes) -> int:
    """Body bytes the server sent for the requests after the first `since` ones."""
    total = 0
    for request in host.server.requests()[since:]:
        if request.path == "/upstream":
            # 304 when the client sent the ETag the route answers with.
            total += 0 if request.headers.get("if-none-match") else len(upstream_body)
            continue
        file = host.server.cache_dir / request.path.lstrip("/")
        total += file.stat().st_size if file.is_file() else 0
    return total


def measure(host: Host, argv: list[str], upstream_body: bytes) -> Sample:
    """Run argv under GNU time: its own small process forks the command, so the peak RSS
    it reports is the command's, not inherited from this Python process's fork."""
    served_before = len(host.server.requests())
    spawned_before = host.spawn_count(*NIX_TOOLS)
    figures = host.tmp / "time.out"
    timed = ["/usr/bin/time", "-f", "%U %S %M", "-o", str(figures), *argv]
    start = time.perf_counter()
    completed = subprocess.run(timed, env=host.agent_env(), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"{argv[0]} {argv[1]} failed: {completed.stderr}")
    user, system, rss_kib = figures.read_text().split()
    return Sample(
        wall=elapsed,
        cpu=float(user) + float(system),
        rss_kib=int(rss_kib),
        nix_processes=host.spawn_count(*NIX_TOOLS) - spawned_before,
        bytes_sent=bytes_sent(host, served_before, upstream_body),
    )


@dataclass(frozen=True)
class Polls:
    """The resident collector over a number of polls: totals, and its RSS afterwards."""

    count: int
    cpu: float
    nix_processes: int
    bytes_sent: int
    rss_kib: int


class Resident:
    """`collect --every` started once, polled on demand: SIGHUP, then its notification."""

    def __init__(self, host: Host, argv: list[str]) -> None:
        self.host = host
        path = host.tmp / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(300)
        env = host.agent_env({"NOTIFY_SOCKET": str(path)})
        log = (host.tmp / "resident.log").open("w")
        # A day between polls of its own: every poll here is one this script asked for.
        argv = [*argv, "--every", "86400"]
        self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        ready = self.sock.recv(4096).decode()
        if "READY=1" not in ready:
            raise SystemExit(f"the resident collector said {ready!r}")

    def cpu(self) -> float:
        """User and system time of the process and the children it waited for (Nix)."""
        stat = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = sum(int(field) for field in stat[11:15])  # utime stime cutime cstime
        return ticks / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise SystemExit("no VmRSS")

    def polls(self, count: int, upstream_body: bytes, before: Callable[[], None]) -> Polls:
        served_before = len(self.host.server.requests())
        spawned_before = self.host.spawn_count(*NIX_TOOLS)
        cpu_before = self.cpu()
        for _ in range(count):
            before()
            self.process.send_signal(signal.SIGHUP)
            status = self.sock.recv(4096).decode()
            if "error:" in status:
                raise SystemExit(f"a resident poll failed: {status}")
        return Polls(
            count=count,
            cpu=self.cpu() - cpu_before,
            nix_processes=self.host.spawn_count(*NIX_TOOLS) - spawned_before,
            bytes_sent=bytes_sent(self.host, served_before, upstream_body),
            rss_kib=self.rss_kib(),
        )

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        if self.process.wait(timeout=60) != 0:
            raise SystemExit("the resident collector did not exit cleanly")
        self.sock.close()


def report_polls(label: str, polls: list[Polls]) -> None:
    count = sum(p.count for p in polls)
    print(
        f"{label:<28} cpu {sum(p.cpu for p in polls) / count * 1000:7.2f} ms/poll  "
        f"nix processes {sum(p.nix_processes for p in polls) / count:4.2f}/poll  "
        f"bytes {sum(p.bytes_sent for p in polls) / count:6.0f}/poll  (over {count} polls)"
    )


def report(label: str, samples: list[Sample]) -> None:
    def median(get: Callable[[Sample], float]) -> float:
        return statistics.median(get(s) for s in samples)

    print(
        f"{label:<28} wall {median(lambda s: s.wall) * 1000:7.1f} ms  "
        f"cpu {median(lambda s: s.cpu) * 1000:7.1f} ms  "
        f"peak rss {median(lambda s: s.rss_kib) / 1024:5.1f} MiB  "
        f"nix processes {median(lambda s: s.nix_processes):2.0f}  "
        f"bytes {median(lambda s: s.bytes_sent):6.0f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--polls", type=int, default=10_000, help="resident no-change polls")
    args = parser.parse_args()
    runs, polls = args.runs, args.polls
    if polls < 100:
        raise SystemExit("--polls must be at least 100")
    for tool in ("curl", "nix-store", "nix-build", "/usr/bin/time"):
        if shutil.which(tool) is None:
            raise SystemExit(f"the benchmark needs {tool}")
    work = Path(tempfile.mkdtemp(prefix="nixos-autodeploy-bench-"))
    try:
        with standalone_host(work, "bench-1") as host:
            measure_all(host, runs, polls)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def measure_all(host: Host, runs: int, polls: int) -> None:
    work = host.tmp
    # The resident collector keeps its connection; the others open one per run anyway.
    host.server.keep_alive = True
    # A fresh system for every "changed" run of each side and every changed resident poll,
    # all built in one nix-build.
    systems = host.build(*(SystemSpec(f"s{i}", extra=str(i)) for i in range(4 * runs + 1)))
    base = systems["s0"]
    host.install(base)
    host.write_deployed(base)
    os.symlink(str(base), host.root / "run/deployed-system")
    script = work / "original.sh"
    script.write_text(ORIGINAL)
    ours = [str(REPO / ".venv/bin/nixos-autodeploy"), "collect", "--root", str(host.root)]
    ours += ["--url", host.url, "--prometheus-path", str(host.metrics_path)]
    original = ["sh", str(script), host.url, str(host.root), str(work / "original.prom")]

    results: dict[str, list[Sample]] = {}
    for i in range(runs):
        for name, argv, system in (
            ("ours", ours, systems[f"s{2 * i + 1}"]),
            ("original", original, systems[f"s{2 * i + 2}"]),
        ):
            host.publish(system)
            body = (str(system) + "\n").encode()
            for case in ("upstream changed", "nothing changed"):
                results.setdefault(f"{name}, {case}", []).append(measure(host, argv, body))
    print(f"collect, median of {runs} runs each:")
    for label in sorted(results, key=lambda k: (k.split(", ")[1], k)):
        report(label, results[label])
    measure_resident(host, ours, [systems[f"s{2 * runs + 1 + i}"] for i in range(runs)], polls)
    signed = [systems[f"s{3 * runs + 1 + i}"] for i in range(runs)]
    measure_signed(host, ours, signed, polls)


def measure_resident(host: Host, ours: list[str], changes: list[System], polls: int) -> None:
    resident = Resident(host, ours)
    try:
        changed: list[Polls] = []
        for system in changes:
            body = (str(system) + "\n").encode()
            changed.append(resident.polls(1, body, functools.partial(host.publish, system)))
        body = (str(changes[-1]) + "\n").encode()
        first = resident.polls(100, body, lambda: None)
        rest = resident.polls(polls - 100, body, lambda: None)
    finally:
        resident.stop()
    no_change = [first, rest]
    total = sum(p.count for p in no_change)
    print("resident collector (collect --every), one process, polls asked for by SIGHUP;")
    print("cpu from /proc/PID/stat (clock ticks), so a mean over many polls:")
    report_polls("upstream changed", changed)
    report_polls("nothing changed", no_change)
    print(
        f"{'rss':<28} after 100 no-change polls {first.rss_kib / 1024:5.1f} MiB,"
        f" after {total}: {rest.rss_kib / 1024:5.1f} MiB"
    )


def signed_release(key: release.SecretKey, serial: int, system: System) -> bytes:
    now = int(time.time())
    payload = {"version": 1, "serial": serial, "issued": now, "expires": now + 86400}
    data = json.dumps({**payload, "systems": {"*": str(system)}}).encode()
    return json.dumps(release.envelope_json(data, [key])).encode()


def measure_signed(host: Host, ours: list[str], changes: list[System], polls: int) -> None:
    """The resident collector trusting one key: each change a new signed serial."""
    (host.tmp / "release-key").mkdir()
    key = SigningKey.generate(host.tmp / "release-key", "release-bench-1")
    secret = release.SecretKey.read(str(key.secret_file))
    (host.tmp / "notify").unlink()  # the first resident's socket
    trusting = [*ours, "--trusted-key", key.public, "--host-name", "bench"]
    resident = Resident(host, trusting)
    bodies = [signed_release(secret, n, system) for n, system in enumerate(changes, 1)]
    try:
        changed = [
            resident.polls(1, body, functools.partial(host.server.publish_body, body))
            for body in bodies
        ]
        unchanged = resident.polls(polls, bodies[-1], lambda: None)
    finally:
        resident.stop()
    print("the same, trusting one key, every change a signed release:")
    report_polls("release changed, verified", changed)
    report_polls("nothing changed", [unchanged])
    keys = [release.Key.parse(key.public)]
    rounds = 1000
    started = time.process_time()
    for _ in range(rounds):
        release.judge(bodies[-1], keys, 1, "bench", None, time.time())
    each = (time.process_time() - started) / rounds
    print(f"{'judging one release':<28} cpu {each * 1000:7.3f} ms (in-process, {rounds} rounds)")


if __name__ == "__main__":
    sys.exit(main())
