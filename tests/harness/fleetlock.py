"""A FleetLock server on 127.0.0.1, written from the protocol's published description
(coreos/zincati docs/development/fleetlock/protocol.md): per group, a counting semaphore
of owned, recursive slots. `POST /v1/pre-reboot` takes (or keeps) the caller's slot,
`POST /v1/steady-state` releases it if held; 200 means done, anything else carries
`{"kind", "value"}`. Tests script failures, slow answers and a pause after a grant.

With `state_file` the semaphore outlives the server, as airlock's does in etcd: the guest
test runs it as `python3 fleetlock.py PORT STATE_FILE`, across the guest's reboots."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PRE_REBOOT = "/v1/pre-reboot"
STEADY_STATE = "/v1/steady-state"
GROUP = re.compile(r"[a-zA-Z0-9.-]+")


@dataclass(frozen=True)
class Fault:
    """Answer this instead of doing the operation: `status` and raw `body`, or with `slow`,
    nothing until the test calls `FleetLockServer.resume()` (or the server stops)."""

    status: int = 500
    body: bytes = b""
    slow: bool = False
    headers: tuple[tuple[str, str], ...] = ()


# Scripted failures, and what a client's message should quote from each.
FAULTS: dict[str, tuple[Fault, str]] = {
    "refusal": (
        Fault(409, json.dumps({"kind": "maintenance", "value": "fleet frozen\nby ops"}).encode()),
        "answered HTTP 409: fleet frozen by ops (maintenance)",
    ),
    "500 with an error object": (
        Fault(500, b'{"kind": "etcd_unavailable", "value": "etcd: no leader"}'),
        "answered HTTP 500: etcd: no leader (etcd_unavailable)",
    ),
    "500 with a malformed body": (
        Fault(500, b"<html>Internal Server Error</html>"),
        "answered HTTP 500 without a FleetLock error object",
    ),
    "error object missing its value": (
        Fault(503, b'{"kind": "x"}'),
        "answered HTTP 503 without a FleetLock error object",
    ),
    "a 200 is the only yes": (Fault(204, b""), "answered HTTP 204"),
    "slow past the timeout": (Fault(slow=True), "no answer within"),
}


@dataclass(frozen=True)
class LockRequest:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, None when it was not JSON


@dataclass
class FleetLockServer:
    default_slots: int = 1
    slots: dict[str, int] = field(default_factory=dict)  # per group; others get default
    holders: dict[str, list[str]] = field(default_factory=dict)
    requests: list[LockRequest] = field(default_factory=list)
    fault: Fault | None = None  # answers every request while set
    pause_after_grant: bool = False
    state_file: str | None = None  # holders, kept across restarts
    granted: threading.Event = field(default_factory=threading.Event)
    _resume: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: ThreadingHTTPServer | None = None

    def start(self, port: int = 0) -> None:
        if self.state_file and os.path.exists(self.state_file):
            with open(self.state_file, encoding="utf-8") as f:
                self.holders = json.load(f)
        httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        httpd.daemon_threads = True
        self._httpd = httpd
        threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def stop(self) -> None:
        self.fault = None
        self.pause_after_grant = False
        self.resume()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def resume(self) -> None:
        """Let the slow answers and paused grants waiting now go on (later ones wait)."""
        with self._lock:
            waiting, self._resume = self._resume, threading.Event()
        waiting.set()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def held(self, group: str = "default") -> list[str]:
        with self._lock:
            return list(self.holders.get(group, []))

    def calls(self, path: str | None = None) -> list[LockRequest]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    # ---- the semaphore ----------------------------------------------------

    def recursive_lock(self, group: str, ident: str) -> tuple[int, dict[str, str] | None]:
        with self._lock:
            holders = self.holders.setdefault(group, [])
            if ident in holders:
                return 200, None
            if len(holders) >= self.slots.get(group, self.default_slots):
                return 409, {
                    "kind": "failed_lock_semaphore_full",
                    "value": f"all {len(holders)} reboot slots of group {group} are taken",
                }
            holders.append(ident)
            self._save()
            return 200, None

    def unlock_if_held(self, group: str, ident: str) -> tuple[int, dict[str, str] | None]:
        with self._lock:
            holders = self.holders.get(group, [])
            if ident in holders:  # owned: only the holder's own slot goes
                holders.remove(ident)
                self._save()
            return 200, None

    def _save(self) -> None:
        """Called with the lock held; written to a temporary name and renamed."""
        if self.state_file is None:
            return
        temporary = self.state_file + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(self.holders, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.state_file)


def _client_params(body: Any) -> tuple[str, str] | None:
    params = body.get("client_params") if isinstance(body, dict) else None
    if not isinstance(params, dict):
        return None
    ident, group = params.get("id"), params.get("group")
    if not (isinstance(ident, str) and ident and isinstance(group, str)):
        return None
    return (group, ident) if GROUP.fullmatch(group) else None


def _handler(server: FleetLockServer) -> type[BaseHTTPRequestHandler]:
    operations: dict[str, Callable[[str, str], tuple[int, dict[str, str] | None]]] = {
        PRE_REBOOT: server.recursive_lock,
        STEADY_STATE: server.unlock_if_held,
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            headers = {k.lower(): v for k, v in self.headers.items()}
            with server._lock:
                server.requests.append(LockRequest(self.path, headers, body))
                fault = server.fault
            # The client may give up (a deadline, or the test killed it).
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._answer(body, headers, fault)

        def _answer(self, body: Any, headers: dict[str, str], fault: Fault | None) -> None:
            if fault is not None:
                if fault.slow:
                    server._resume.wait()  # the client's deadline ends it first
                    return
                self._send(fault.status, fault.body, fault.headers)
                return
            operation = operations.get(self.path)
            if operation is None:
                self._error(404, "not_found", f"no endpoint {self.path}")
                return
            if headers.get("fleet-lock-protocol") != "true":
                self._error(400, "missing_protocol_header", "fleet-lock-protocol: true missing")
                return
            params = _client_params(body)
            if params is None:
                self._error(400, "bad_client_params", "client_params needs an id and a group")
                return
            status, error = operation(*params)
            if error is not None:
                self._error(status, error["kind"], error["value"])
                return
            if self.path == PRE_REBOOT and server.pause_after_grant:
                server.granted.set()
                server._resume.wait()
            self._send(200, b"")

        def _error(self, status: int, kind: str, value: str) -> None:
            self._send(status, json.dumps({"kind": kind, "value": value}).encode())

        def _send(
            self, status: int, body: bytes, headers: tuple[tuple[str, str], ...] = ()
        ) -> None:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def main(argv: list[str]) -> None:
    """`python3 fleetlock.py PORT STATE_FILE`: serve 127.0.0.1:PORT, one slot per group."""
    port, state_file = int(argv[0]), argv[1]
    server = FleetLockServer(default_slots=1, state_file=state_file)
    server.start(port)
    threading.Event().wait()  # until killed


if __name__ == "__main__":
    main(sys.argv[1:])
