"""The end-to-end demo: real Nix, a signed binary cache on 127.0.0.1, a sandbox host.

Two synthetic systems are built and published one after the other; the agent collects,
shows its status, starts tracking, sees the update and deploys it. Everything it does
happens under .cache/demo/root; the machine's own system is never touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness import Host, SystemSpec, standalone_host  # noqa: E402

AGENT = REPO / ".venv" / "bin" / "nixos-autodeploy"


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m" if sys.stdout.isatty() else f"\n== {title}", flush=True)


def agent(host: Host, *args: str) -> None:
    argv = [str(AGENT), args[0], "--root", str(host.root), *args[1:]]
    print("$ nixos-autodeploy " + " ".join(args), flush=True)
    subprocess.run(argv, env=host.agent_env(), check=True)


def main() -> int:
    work = REPO / ".cache" / "demo"
    shutil.rmtree(work, ignore_errors=True)
    with standalone_host(work, "demo-cache-1") as host:
        step("building two synthetic NixOS systems with real Nix, signing them into a cache")
        systems = host.build(SystemSpec("v1"), SystemSpec("v2", extra="a new service"))
        v1, v2 = systems["v1"], systems["v2"]
        print(f"v1: {v1}\nv2: {v2}\nbinary cache: {host.server.base_url} (signed, loopback only)")

        step("the host runs v1; CI publishes v1")
        host.install(v1)
        host.publish(v1)
        url = ["--url", host.url, "--prometheus-path", str(host.metrics_path)]
        agent(host, "collect", *url)
        agent(host, "status")

        step("the actuator starts tracking what runs")
        agent(host, "deploy", *url)
        agent(host, "status")

        step("CI publishes v2: the collector realises it and reports the update")
        host.publish(v2)
        agent(host, "collect", *url)
        agent(host, "status")

        step("the actuator deploys v2")
        agent(host, "deploy", *url)
        agent(host, "status")

        step(f"metrics for node_exporter ({host.metrics_path.relative_to(REPO)})")
        print(host.metrics_path.read_text(), end="")
    print(f"\ndemo done; the sandbox host is under {work.relative_to(REPO)}/root")
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
