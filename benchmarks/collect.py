"""What one `collect` costs, when nothing changed and when upstream changed, next to the
same work done the original tool's way (curl, nix-store --realise --add-root, a .prom
written by the shell), measured in the same run against the same signed binary cache.

    .venv/bin/python benchmarks/collect.py [--runs N]

Prints medians over N runs: wall time, CPU time (user+system of the process and all it
waited for, from GNU time), peak RSS, Nix processes spawned, and body bytes the server sent."""

from __future__ import annotations

import argparse
import os
import shutil
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

from harness import Host, SystemSpec, standalone_host  # noqa: E402

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
    runs = parser.parse_args().runs
    for tool in ("curl", "nix-store", "nix-build", "/usr/bin/time"):
        if shutil.which(tool) is None:
            raise SystemExit(f"the benchmark needs {tool}")
    work = Path(tempfile.mkdtemp(prefix="nixos-autodeploy-bench-"))
    try:
        with standalone_host(work, "bench-1") as host:
            measure_all(host, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def measure_all(host: Host, runs: int) -> None:
    work = host.tmp
    # A fresh system for every "changed" run of each side, all built in one nix-build.
    systems = host.build(*(SystemSpec(f"s{i}", extra=str(i)) for i in range(2 * runs + 1)))
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


if __name__ == "__main__":
    sys.exit(main())
