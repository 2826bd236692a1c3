"""The only place that starts processes: every external command goes through ``run``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import ProcessError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


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
) -> Result:
    """Run argv, capturing its output. With stream_stderr, its output is passed through live
    to our stderr instead (Nix's progress on a terminal, the journal under systemd), and the
    end of its stderr is still kept for the error message."""
    args = list(argv)
    log.debug("running %s", " ".join(args))
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            # Streamed: the command's stdout joins our stderr, so it reaches the terminal or
            # the journal and never mixes into our own stdout.
            stdout=2 if stream_stderr else subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            text=True,
            errors="replace",
        )
    except OSError as e:
        raise ProcessError(args, 127, e.strerror or str(e)) from e
    if stream_stderr:
        assert proc.stderr is not None
        kept: deque[str] = deque(maxlen=200)
        # Named, so that the tool's own "error:" lines are not taken for ours.
        prefix = f"{os.path.basename(args[0])}: "
        for line in proc.stderr:
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
