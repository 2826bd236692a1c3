"""The resident collector (`collect --every SECONDS`) run against a sandbox host, followed
through what it tells systemd: a notify socket of the test's receives READY=1,
WATCHDOG=1 and STATUS= after every poll, so a test knows when a poll has finished
without sleeping. Signals are sent the way systemd sends them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

from .host import Host

# A safety net against a hung agent, not an assertion on its speed.
SAFETY_SECONDS = 120
# Polls on its own, often: for the tests that follow several polls.
OFTEN = "0.2"
# Polls only when told to (SIGHUP) after the first one.
RARELY = "3600"


@dataclass
class Resident:
    """A running `collect --every` and the notify socket it reports to."""

    host: Host
    process: subprocess.Popen[str]
    sock: socket.socket
    messages: list[dict[str, str]] = field(default_factory=list)

    def next_message(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.splitlines())
        self.messages.append(fields)
        return fields

    def poll(self) -> dict[str, str]:
        """Ask for a poll now (SIGHUP, as `systemctl reload`) and wait for its report."""
        self.process.send_signal(signal.SIGHUP)
        return self.next_message()

    def polls(self) -> list[dict[str, str]]:
        return [m for m in self.messages if "STATUS" in m]

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as systemd stops the unit; the exit code and stderr."""
        self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=SAFETY_SECONDS)
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # what it sent that was not read yet
            while True:
                self.next_message()
        return self.process.returncode, stderr


@contextlib.contextmanager
def resident(host: Host, every: str, *args: str) -> Iterator[Resident]:
    """`collect --every EVERY ARGS` against the host's server, reporting to a notify
    socket of its own; killed (with all it started) if the test leaves it running."""
    path = host.tmp / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(SAFETY_SECONDS)
    argv = ["collect", "--url", host.url, "--prometheus-path", str(host.metrics_path)]
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000"}
    process = host.start_agent(*argv, "--timeout", "30", "--every", every, *args, env=env)
    try:
        yield Resident(host, process, sock)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        sock.close()
