"""The resident collector (`collect --every SECONDS`): the same collect, repeated in one
process, so a poll costs the work and not an interpreter start and its imports.

Between polls it holds nothing but its kept-alive HTTP connection: not the shared lock
(the actuator never waits on an idle collector) and no file. It waits for the next poll
in sigtimedwait() with SIGHUP and SIGTERM blocked, so a signal is never lost between
checking for it and going to sleep; during a poll they are unblocked, so SIGTERM aborts
the poll at once (every file it writes is written atomically) and SIGHUP asks for
another poll right after this one."""

from __future__ import annotations

import logging
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from . import http
from .collect import Then, collect_locked, summary
from .config import Settings
from .errors import AutodeployError
from .notify import notify, watchdog_enabled

log = logging.getLogger(__name__)

SIGNALS = {signal.SIGHUP, signal.SIGTERM}
# A fleet started together (a power cut, a fleet-wide deploy) spreads its polls over up
# to this share of the interval, and at most FIRST_OFFSET_MAX seconds, so the first
# READY=1 is never far off.
FIRST_OFFSET_SHARE = 0.1
FIRST_OFFSET_MAX = 5.0


class _Terminated(BaseException):  # not Exception: nothing in a poll may swallow it
    pass


class _Hangup:
    """Set by SIGHUP during a poll: poll again at once."""

    requested = False


class _OncePerChange(logging.Filter):
    """One log line per change, not one per poll: a message of the collect code that
    repeats its logger's last one is dropped. This module's own lines are all changes."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == __name__:
            return True
        message = record.getMessage()
        if self.last.get(record.name) == message:
            return False
        self.last[record.name] = message
        return True


@contextmanager
def _signals_unblocked() -> Iterator[None]:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def _poll(settings: Settings, session: http.Session, then: Then | None) -> tuple[str, str | None]:
    """One collect, reported as a one-shot reports it; (status line, error or None)."""
    try:
        snapshot = collect_locked(settings, session, then)
    except (AutodeployError, OSError) as e:  # a full disk, a corrupt deployed record
        return f"error: {e}", str(e)
    if snapshot is None:
        return "skipped: another run holds the lock", None
    error = snapshot.upstream.error
    return summary(snapshot) + (f"; error: {error}" if error else ""), error


def run(settings: Settings, every: float, then: Then | None = None) -> int:
    """Poll every `every` seconds from the start of the previous poll until SIGTERM."""
    once = _OncePerChange()
    for handler in logging.getLogger().handlers:
        handler.addFilter(once)
    hangup = _Hangup()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        hangup.requested = True

    def on_terminate(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGTERM, on_terminate)
    watchdog = watchdog_enabled()
    session = http.Session()
    ready = ["READY=1"]  # sent once, with the first poll's status
    wait = random.uniform(0, min(every * FIRST_OFFSET_SHARE, FIRST_OFFSET_MAX))
    last_error: str | None = None
    try:
        while True:
            received = signal.sigtimedwait(SIGNALS, wait)
            if received is not None and received.si_signo == signal.SIGTERM:
                break
            if received is not None:
                log.info("SIGHUP: collecting now")
            started = time.monotonic()
            hangup.requested = False
            with _signals_unblocked():
                status, error = _poll(settings, session, then)
            if error is not None and error != last_error:
                log.error("error: %s", error)
            elif error is None and last_error is not None:
                log.info("collecting works again")
            last_error = error
            notify(*ready, "STATUS=" + status, *(["WATCHDOG=1"] if watchdog else []))
            ready = []
            # A SIGHUP that came during the poll was handled by the call above at latest.
            wait = 0.0 if hangup.requested else max(0.0, started + every - time.monotonic())
    except _Terminated:
        pass
    finally:
        session.close()
    notify("STOPPING=1")
    log.info("stopped")
    return 0
