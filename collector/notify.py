"""systemd's notification protocol (sd_notify) on the standard library's socket: no new
dependency, and nothing held open between messages."""

from __future__ import annotations

import contextlib
import os
import socket


def _address(value: str) -> str:
    # "@name" is an abstract socket: its name starts with a NUL byte.
    return "\0" + value[1:] if value.startswith("@") else value


def notify(*fields: str) -> bool:
    """Send `NAME=value` fields in one datagram to $NOTIFY_SOCKET; False when not under
    systemd (no socket) or when the send failed. Never raises: a lost notification must
    not stop a poll; systemd's watchdog notices the silence."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target or not fields:
        return False
    message = "\n".join(field.replace("\n", " ") for field in fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, _address(target))
    except OSError:
        return False
    return True


def watchdog_enabled() -> bool:
    """True when systemd expects WATCHDOG=1 from this very process (WatchdogSec= set)."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return False
    with contextlib.suppress(ValueError):
        return int(os.environ.get("WATCHDOG_USEC", "0")) > 0
    return False
