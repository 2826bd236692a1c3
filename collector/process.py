"""The only place that starts processes: every external command goes through ``run``."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .errors import ProcessError

log = logging.getLogger(__name__)

OUTPUT_KEEP = 64 * 1024  # run_bounded keeps this much of the end of a command's output


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False  # run_bounded: killed at its deadline


def _error_line(stderr: str) -> str:
    """The tool's reason on one line: its error lines, with the warnings that explain them
    (Nix 2.8 gives "is not signed by any of the keys" only as a warning)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = [
        line.split(":", 1)[1].strip()
        for line in lines
        if line.startswith(("error:", "warning:")) and line.split(":", 1)[1].strip()
    ]
    if said:
        return "; ".join(said[-4:])
    return lines[-1] if lines else "no message"


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    stream_stderr: bool = False,
    on_line: Callable[[str], None] | None = None,
) -> Result:
    """Run argv, capturing its output. With stream_stderr, its output is passed through live
    to our stderr instead (Nix's progress on a terminal, the journal under systemd), and the
    end of its stderr is still kept for the error message. With on_line too, each line of
    its stderr goes to on_line instead of ours, as the tool wrote it (a progress display
    shows it)."""
    args = list(argv)
    log.debug("running %s", " ".join(args))
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            # Streamed: the command's stdout joins our stderr, so it reaches the terminal or
            # the journal and never mixes into our own stdout; for on_line, both come
            # through one pipe.
            stdout=(subprocess.PIPE if on_line else 2) if stream_stderr else subprocess.PIPE,
            stderr=subprocess.STDOUT if stream_stderr and on_line else subprocess.PIPE,
            env=full_env,
            text=True,
            errors="replace",
        )
    except OSError as e:
        raise ProcessError(args, 127, e.strerror or str(e)) from e
    if stream_stderr:
        streamed = proc.stdout if on_line else proc.stderr
        assert streamed is not None
        kept: deque[str] = deque(maxlen=200)
        # Named, so that the tool's own "error:" lines are not taken for ours.
        prefix = f"{os.path.basename(args[0])}: "
        for line in streamed:
            if on_line is not None:
                on_line(line)
            else:
                sys.stderr.write(prefix + line)
                sys.stderr.flush()
            kept.append(line)
        proc.wait()
        stdout, stderr = "", "".join(kept)
    else:
        stdout, stderr = proc.communicate()
    result = Result(args, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise ProcessError(args, proc.returncode, _error_line(stderr))
    return result


def run_bounded(
    argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
) -> Result:
    """Run argv with its stdout and stderr together in Result.stdout, for commands the agent
    does not trust (the operator's health checks): it and everything it started are killed
    at the deadline (Result.timed_out), and only the last OUTPUT_KEEP bytes of its output
    are kept, so neither a hang nor a flood reaches the agent. Never raises for the
    command's exit status; ProcessError (exit 127) when it cannot be started."""
    args = list(argv)
    log.debug("running %s (at most %.0fs)", " ".join(args), timeout)
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,  # its own process group: a kill reaches its children
        )
    except OSError as e:
        raise ProcessError(args, 127, e.strerror or str(e)) from e
    assert proc.stdout is not None
    tail = bytearray()
    deadline = time.monotonic() + timeout
    timed_out = False
    with proc.stdout, selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            # Woken at least every second: a command that exits while a child it left
            # behind keeps the pipe open has finished all the same.
            if not selector.select(min(left, 1.0)):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            tail += chunk
            del tail[:-OUTPUT_KEEP]
        if not timed_out:  # the output ended; the command itself may still run
            try:
                proc.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                timed_out = True
        if timed_out:
            # Not reaped yet, so the group id is still ours to kill.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    output = tail.decode("utf-8", errors="replace")
    return Result(args, proc.returncode, output, "", timed_out=timed_out)
