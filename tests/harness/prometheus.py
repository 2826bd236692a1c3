"""Debian's node_exporter and Prometheus for a test's duration: started, waited for, stopped."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .grafana import RULES
from .host import REPO
from .nix import require_tool

READY_DEADLINE = 60.0  # seconds; a bound on waiting, not an assertion about speed


def readme_promql() -> list[str]:
    """The README's promql blocks, in order: the halt queries it recommends."""
    found = re.findall(r"```promql\n(.+?)\n```", (REPO / "README.md").read_text(), re.S)
    assert found, "README.md has no promql block"
    return [query.strip() for query in found]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get_json(url: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    full = f"{url}?{query}" if query else url
    try:
        with urllib.request.urlopen(full, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:  # Prometheus explains a bad query in the body
        return json.loads(e.read())


def wait_for(
    what: str, check: Callable[[], bool], process: subprocess.Popen[bytes], log: Path
) -> None:
    """Poll `check` until true; fail with the server's log if it exits or never gets there."""
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what}: server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if check():
                return
        except (OSError, ValueError):
            pass  # not listening yet
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {READY_DEADLINE}s; server log:\n{log.read_text()}")


@contextmanager
def server(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server for the duration of the block; stop it however the block ends."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def node_exporter(textfile_dir: Path, log: Path) -> Iterator[str]:
    port = free_port()
    argv = [
        require_tool("prometheus-node-exporter"),
        "--collector.disable-defaults",
        "--collector.textfile",
        f"--collector.textfile.directory={textfile_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with server(argv, log) as process:

        def serves_our_metrics() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return b"nixos_autodeploy_dirty" in r.read()

        wait_for("node_exporter", serves_our_metrics, process, log)
        yield f"127.0.0.1:{port}"


@dataclass(frozen=True)
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, endpoint: str, **params: str) -> Any:
        return get_json(f"{self.url}/api/v1/{endpoint}", **params)

    def query(self, expr: str) -> Any:
        return self.api("query", query=expr)

    def query_range(self, expr: str, seconds: int = 60) -> Any:
        end = time.time()
        return self.api("query_range", query=expr, start=str(end - seconds), end=str(end), step="1")

    def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        wait_for(what, check, self.process, self.log)


@contextmanager
def prometheus(targets: list[str], tmp: Path, job: str) -> Iterator[Prometheus]:
    """Prometheus scraping `targets` every second as `job`, evaluating grafana/'s rules."""
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
            }
        )
    )
    argv = [
        require_tool("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = tmp / "prometheus.log"
    with server(argv, log) as process:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as r:
                status: int = r.status
                return status == 200

        wait_for("prometheus", ready, process, log)
        yield Prometheus(url, process, log)
