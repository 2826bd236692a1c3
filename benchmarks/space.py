"""What the disk space checks add to a poll that finds nothing new: the collector of this tree
next to the one before the checks (the tree at a git revision, `main` by default, extracted
to a temporary directory), against the same signed binary cache and sandbox root.

    .venv/bin/python benchmarks/space.py [--base REV] [--runs N] [--polls M]

The space check before a realise (`nix-store --realise --dry-run`) runs only when upstream
changed; a no-change poll pays two statvfs and a listdir for the metrics. Prints, for each
tree: the median CPU time (user+system, GNU time) and wall time of N one-shot no-change
`collect`s, and over M no-change polls of the resident collector (`collect --every`, polls
asked for by SIGHUP) the CPU per poll from its /proc/PID/stat; Nix processes spawned per
no-change poll (0: no check ran); and, for reference, one changed poll's Nix processes."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness import Host, standalone_host  # noqa: E402

NIX_TOOLS = ("nix-store", "nix-env", "nix")


@dataclass(frozen=True)
class Figures:
    one_shot_cpu: float  # median seconds
    one_shot_wall: float
    resident_cpu: float  # seconds per poll
    nix_per_poll: float
    changed_nix: int  # Nix processes of one poll after a publish


def extract(revision: str, into: Path) -> Path:
    """The tree at revision, as files (git archive): its code, imported by PYTHONPATH."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", revision],
        capture_output=True,
        check=True,
    ).stdout
    into.mkdir()
    archive_path = into.parent / "base.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(into, filter="data")
    return into


def one_shot(host: Host, env: dict[str, str], argv: list[str], code: Path) -> tuple[float, float]:
    figures = host.tmp / "time.out"
    timed = ["/usr/bin/time", "-f", "%U %S", "-o", str(figures), *argv]
    start = time.perf_counter()
    # cwd: `python -m` puts it first on sys.path, ahead of PYTHONPATH.
    done = subprocess.run(timed, env=env, capture_output=True, text=True, cwd=code)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"collect failed: {done.stderr}")
    user, system = figures.read_text().split()
    return float(user) + float(system), wall


def resident_polls(
    host: Host, env: dict[str, str], argv: list[str], code: Path, polls: int
) -> float:
    """CPU seconds per no-change poll of one resident collector."""
    path = host.tmp / "notify"
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(300)
        env = {**env, "NOTIFY_SOCKET": str(path)}
        with (host.tmp / "resident.log").open("w") as log:
            process = subprocess.Popen(
                [*argv, "--every", "86400"], env=env, stdout=log, stderr=log, cwd=code
            )
        try:
            if "READY=1" not in sock.recv(4096).decode():
                raise SystemExit("the resident collector did not start")
            before = cpu_of(process.pid)
            for _ in range(polls):
                process.send_signal(signal.SIGHUP)
                status = sock.recv(4096).decode()
                if "error:" in status:
                    raise SystemExit(f"a resident poll failed: {status}")
            return (cpu_of(process.pid) - before) / polls
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def cpu_of(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(field) for field in stat[11:15]) / os.sysconf("SC_CLK_TCK")


def measure(host: Host, code: Path, system_name: str, runs: int, polls: int) -> Figures:
    env = host.agent_env({"PYTHONPATH": str(code)})
    argv = [sys.executable, "-m", "collector.cli", "collect", "--root", str(host.root)]
    argv += ["--url", host.url, "--prometheus-path", str(host.metrics_path)]
    argv += ["--state-dir", str(host.tmp / f"state-{code.name}")]
    system = host.build_one(system_name, extra=system_name)
    host.publish(system)
    spawned = host.spawn_count(*NIX_TOOLS)
    one_shot(host, env, argv, code)  # the changed poll: realised, pinned
    changed_nix = host.spawn_count(*NIX_TOOLS) - spawned
    samples = [one_shot(host, env, argv, code) for _ in range(runs)]
    spawned = host.spawn_count(*NIX_TOOLS)
    per_poll = resident_polls(host, env, argv, code, polls)
    nix = (host.spawn_count(*NIX_TOOLS) - spawned) / (polls + 1)  # + its first poll
    return Figures(
        one_shot_cpu=statistics.median(s[0] for s in samples),
        one_shot_wall=statistics.median(s[1] for s in samples),
        resident_cpu=per_poll,
        nix_per_poll=nix,
        changed_nix=changed_nix,
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="main", help="the revision before the checks")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--polls", type=int, default=2000)
    args = parser.parse_args()
    for tool in ("nix-store", "nix-build", "/usr/bin/time", "git"):
        if shutil.which(tool) is None:
            raise SystemExit(f"the benchmark needs {tool}")
    work = Path(tempfile.mkdtemp(prefix="nixos-autodeploy-bench-space-"))
    try:
        base = extract(args.base, work / "base")
        with standalone_host(work / "host", "bench-space-1") as host:
            base_system = host.build_one("base")
            host.install(base_system)
            host.write_deployed(base_system)
            results = {
                f"before ({args.base})": measure(host, base, "b", args.runs, args.polls),
                "with the checks": measure(host, REPO, "c", args.runs, args.polls),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"no-change collect: median of {args.runs} one-shot runs; {args.polls} resident polls")
    for label, f in results.items():
        print(
            f"{label:<20} one-shot cpu {f.one_shot_cpu * 1000:6.1f} ms "
            f"wall {f.one_shot_wall * 1000:6.1f} ms  "
            f"resident cpu {f.resident_cpu * 1000:6.2f} ms/poll  "
            f"nix processes {f.nix_per_poll:4.2f}/poll  (changed poll: {f.changed_nix})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
