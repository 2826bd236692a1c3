"""What the difference of two 50,000-path closures costs: `nixos-autodeploy diff --json A B`
end to end (two `nix-store --query --requisites`, two `nix path-info --closure-size`, the
grouping by name and version, the JSON), and the grouping alone in this process.

    .venv/bin/python benchmarks/closure.py [--runs N] [--paths N]

The closures are registered in a chroot store's database (`nix-store --load-db`), which the
agent queries through NIX_REMOTE: real Nix answers, without 100,000 store paths on disk.
Prints medians over N runs: wall time, CPU time and peak RSS of the command (GNU time), and
the grouping's time and peak of traced Python memory."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from harness import register_closure, store_paths  # noqa: E402

from collector.closure import changes_between  # noqa: E402


def closures(n: int) -> tuple[list[str], list[str]]:
    """Two closures of n paths: a hundredth of the packages upgraded, a tenth rebuilt, one
    added and one removed: a large nixpkgs bump."""
    before = store_paths(*(f"pkg{i}-1.{i % 10}" for i in range(n)))
    after = store_paths(
        *(
            f"pkg{i}-{'2' if i % 100 == 0 else '1'}.{i % 10}" + ("#b" if i % 10 == 1 else "")
            for i in range(1, n + 1)
        )
    )
    return before, after


def command(store: Path, top_before: str, top_after: str) -> tuple[float, float, int, int]:
    """(wall s, cpu s, peak RSS KiB, changes) of one `diff --json`."""
    figures = store.parent / "time.out"
    argv = [str(REPO / ".venv/bin/nixos-autodeploy"), "diff", "--json", top_before, top_after]
    env = {**os.environ, "NIX_REMOTE": str(store)}
    started = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "%U %S %M", "-o", str(figures), *argv],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"diff failed: {done.stderr}")
    user, system, rss = figures.read_text().split()
    return wall, float(user) + float(system), int(rss), len(json.loads(done.stdout)["changes"])


def grouping(before: list[str], after: list[str]) -> tuple[float, int]:
    """(s, peak traced bytes) of the grouping alone; timed without tracing, which slows it."""
    started = time.perf_counter()
    changes_between(before, after)
    elapsed = time.perf_counter() - started
    tracemalloc.start()
    changes_between(before, after)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return elapsed, peak


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--paths", type=int, default=50_000)
    args = parser.parse_args()
    for tool in ("nix-store", "nix", "/usr/bin/time"):
        if shutil.which(tool) is None:
            raise SystemExit(f"the benchmark needs {tool}")
    before, after = closures(args.paths)
    work = Path(tempfile.mkdtemp(prefix="nixos-autodeploy-bench-closure-"))
    try:
        store = work / "store"
        top_before, top_after = store_paths("nixos-system-big-1", "nixos-system-big-2")
        register_closure(store, top_before, before)
        register_closure(store, top_after, after)
        runs = [command(store, top_before, top_after) for _ in range(args.runs)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    grouped = [grouping(before, after) for _ in range(args.runs)]
    print(f"diff of two {args.paths}-path closures, median of {args.runs} runs:")
    print(
        f"  nixos-autodeploy diff --json  wall {statistics.median(r[0] for r in runs):.2f} s"
        f"  cpu {statistics.median(r[1] for r in runs):.2f} s"
        f"  peak rss {statistics.median(r[2] for r in runs) / 1024:.0f} MiB"
        f"  ({runs[0][3]} changes)"
    )
    print(
        f"  grouping by name and version  {statistics.median(g[0] for g in grouped):.2f} s"
        f"  peak traced {statistics.median(g[1] for g in grouped) / 2**20:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
