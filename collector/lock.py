"""One lock, shared by collector and actuator, so they never act on a half-changed host."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import LockHeld


@contextmanager
def locked(state_dir: str, wait: float = 0.0) -> Iterator[None]:
    """Hold the flock on state_dir/lock; LockHeld if it is still held after `wait` seconds."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    path = os.path.join(state_dir, "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        give_up = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= give_up:
                    raise LockHeld(f"another nixos-autodeploy run holds {path}") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)
