"""The actuator run against a sandbox host, and what it leaves behind: `deploy` with the
standard arguments, the deployed record, the history, the journal; runs killed at a
journal phase, at a tool call or inside their activation.

Not imported by `harness/__init__`: this module alone reaches into the actuator's
internals (its journal's phases and its kill hook), so a suite that does not deploy does
not depend on them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from actuator.transaction import STOP_AT, Phase

from .host import AgentResult, Host, read_link
from .nix import System

__all__ = [
    "STOP_AT",
    "Phase",
    "assert_links",
    "assert_record",
    "decisions",
    "deploy",
    "deploy_args",
    "deploy_killed_at",
    "deployed_mirror",
    "event_names",
    "events_named",
    "fail_nix_env",
    "held_activation",
    "history",
    "journal",
    "kill_agent_at_nix_call",
    "kill_agent_when",
    "kill_run",
    "log_reboot_call_order",
    "not_running",
    "reboot_calls",
    "record",
    "start_deploy",
    "state_files",
    "tracking",
]


# ---- running it ------------------------------------------------------------------------


def deploy_args(host: Host, *args: str, timeout: int | None = 30) -> list[str]:
    """`deploy`'s arguments against the host's server, writing the host's metrics: the
    upstream URL, the fetch timeout (None: the agent's default) and the metrics path, then
    `args` (a later flag wins over an earlier one)."""
    timeout_args = [] if timeout is None else ["--timeout", str(timeout)]
    return [
        "--url",
        host.url,
        *timeout_args,
        "--prometheus-path",
        str(host.metrics_path),
        *args,
    ]


def deploy(
    host: Host,
    *args: str,
    timeout: int | None = 30,
    env: Mapping[str, str] | None = None,
) -> AgentResult:
    """`nixos-autodeploy deploy` against the host's server, writing the host's metrics."""
    return host.run_agent("deploy", *deploy_args(host, *args, timeout=timeout), env=env)


def start_deploy(
    host: Host,
    *args: str,
    timeout: int | None = 30,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[str]:
    """`deploy` in the background (see Host.start_agent)."""
    return host.start_agent("deploy", *deploy_args(host, *args, timeout=timeout), env=env)


def kill_run(run: subprocess.Popen[str]) -> None:
    """Make sure a background run this test started is gone (with all it started)."""
    if run.poll() is None:
        os.killpg(run.pid, signal.SIGKILL)
    run.communicate()


# ---- situations ------------------------------------------------------------------------


def tracking(host: Host, installed: System, upstream: System, *, collect: bool = False) -> None:
    """A host the agent tracks: it runs `installed`, recorded as deployed; CI publishes
    `upstream` (and, with collect, the collector has seen it)."""
    host.install(installed)
    host.write_deployed(installed, previous=installed)
    host.publish(upstream)
    if collect:
        assert host.collect().returncode == 0


def not_running(host: Host, system: System) -> str:
    """A health check command that fails while system runs on the host."""
    return f'[ "$(readlink {host.current_link})" != {system.path} ]'


# ---- what it left ----------------------------------------------------------------------


def record(host: Host) -> Any:
    """The deployed record (deployed.json), or None when there is none."""
    path = host.state_dir / "deployed.json"
    return json.loads(path.read_text()) if path.exists() else None


def deployed_mirror(host: Host) -> str | None:
    """Where the record's mirror, /run/deployed-system, points."""
    return read_link(host.root / "run/deployed-system")


def journal(host: Host) -> Any:
    """The deploy journal (journal.json), or None when there is none."""
    path = host.state_dir / "journal.json"
    return json.loads(path.read_text()) if path.exists() else None


def history(host: Host) -> list[dict[str, Any]]:
    """Every entry of history.jsonl, oldest first ([] without one)."""
    path = host.state_dir / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def event_names(host: Host) -> list[str]:
    """The `event` of each history entry, oldest first."""
    return [e["event"] for e in history(host)]


def events_named(host: Host, *names: str) -> list[dict[str, Any]]:
    """The history entries whose event is one of `names`."""
    return [e for e in history(host) if e["event"] in names]


def decisions(host: Host) -> list[tuple[str, str]]:
    """(action, state) of each decision in the history."""
    return [(e["action"], e["state"]) for e in history(host) if e["event"] == "decision"]


def state_files(host: Host) -> dict[str, bytes]:
    """Everything in the state dir but the lock file, for before/after comparison."""
    return {
        p.name: p.read_bytes()
        for p in sorted(host.state_dir.iterdir())
        if p.is_file() and p.name != "lock"
    }


def assert_links(
    host: Host, *, current: System, profile: System, booted: System | None = None
) -> None:
    assert host.current() == current.path
    assert host.profile() == profile.path
    if booted is not None:
        assert host.booted() == booted.path


def assert_record(
    host: Host, path: System, mode: str, previous: System | None, rebooted: bool = False
) -> None:
    """deployed.json and its /run/deployed-system mirror point at `path`."""
    deployed = record(host)
    assert deployed is not None, "no deployed record"
    assert (deployed["version"], deployed["path"], deployed["mode"]) == (1, path.path, mode)
    assert deployed["previous"] == (previous.path if previous else None)
    assert (deployed["reboot_issued_at"] is not None) is rebooted
    assert deployed_mirror(host) == path.path


# ---- reboots ---------------------------------------------------------------------------


def log_reboot_call_order(host: Host) -> Path:
    """Make the harness' systemctl and kexec recorders also append their name to one log,
    so a test sees the order of the calls across both (kexec must load first)."""
    order = host.tmp / "reboot-order.log"
    for name in ("kexec", "systemctl"):
        script = host.bin_dir / name
        script.write_text(script.read_text() + f"printf '%s\\n' {name} >> '{order}'\n")
    return order


def reboot_calls(order: Path) -> list[str]:
    return order.read_text().split() if order.exists() else []


# ---- runs cut short and tools that fail --------------------------------------------------


def deploy_killed_at(host: Host, phase: str, *args: str) -> None:
    """A deploy stopped, as by kill -9, right after it journaled phase (the actuator's
    deterministic hook: no timing involved)."""
    result = deploy(host, *args, env={STOP_AT: phase})
    assert result.returncode == -signal.SIGKILL, result
    assert journal(host)["phase"] == phase


def kill_agent_when(host: Host, tool: str, argument: str, *, after: bool = False) -> None:
    """The next run of `tool` with `argument` kills the agent that started it (kill -9 of
    its parent), before the tool acts or, with after, once it has; only once."""
    wrapper = host.bin_dir / tool
    shebang, _, rest = wrapper.read_text().partition("\n")
    marker = host.tmp / f"killed-at-{tool}"
    act = f"'{host.real_tools[tool]}' \"$@\"; " if after else ""
    trap = (
        f'case " $* " in *" {argument} "*) if [ ! -e \'{marker}\' ]; then '
        f"touch '{marker}'; {act}kill -9 \"$PPID\"; exit 137; fi ;; esac\n"
    )
    wrapper.write_text(f"{shebang}\n{trap}{rest}")


def kill_agent_at_nix_call(host: Host, n: int, *, after: bool) -> None:
    """The agent is killed (kill -9 of the caller) at its n-th run of nix-store or nix-env
    from now on, before that command acts or, with after, once it has. Queries (the
    collector's closure difference) change nothing and are not counted."""
    counter = host.tmp / "nix-calls"
    for tool in ("nix-store", "nix-env"):
        wrapper = host.bin_dir / tool
        shebang, _, rest = wrapper.read_text().partition("\n")
        act = f"'{host.real_tools[tool]}' \"$@\"; " if after else ""
        trap = (
            'if [ "$1" != --query ]; then\n'
            f"count=$(( $(cat '{counter}' 2>/dev/null || echo 0) + 1 )); "
            f"echo \"$count\" > '{counter}'\n"
            f'if [ "$count" = {n} ]; then {act}kill -9 "$PPID"; exit 137; fi\n'
            "fi\n"
        )
        wrapper.write_text(f"{shebang}\n{trap}{rest}")


def fail_nix_env(host: Host) -> str:
    """nix-env fails as on a full disk; returns the wrapper to put back."""
    nix_env = host.bin_dir / "nix-env"
    wrapper = nix_env.read_text()
    nix_env.write_text(
        "#!/bin/sh\necho 'error: writing to file: No space left on device' >&2\nexit 1\n"
    )
    return wrapper


@contextmanager
def held_activation(host: Host, deploy_run: subprocess.Popen[str]) -> Iterator[None]:
    """Hold `deploy_run` inside switch-to-configuration until the block ends.

    The synthetic switch-to-configuration sleeps for `cat <root>/slow-activation` seconds
    (what `host.slow_activation` writes) before it acts. Made a FIFO, that `cat` blocks
    until we write: opening the FIFO for writing succeeds once the activation has it open,
    so the test knows, without guessing a duration, that the deploy is inside the
    activation, with the profile set and the lock held. Leaving the block lets it go on.
    """
    fifo = host.root / "slow-activation"
    writer = -1
    give_up = time.monotonic() + 300  # a safety net against a hung test, not an assertion
    while writer < 0:
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            if deploy_run.poll() is not None:
                out, err = deploy_run.communicate()
                raise AssertionError(f"deploy ended before its activation:\n{out}{err}") from None
            assert time.monotonic() < give_up, "deploy never reached its activation"
            time.sleep(0.05)
    try:
        yield
    finally:
        # sleep 0: the activation goes on (unless the test killed it: no reader left)
        with contextlib.suppress(BrokenPipeError):
            os.write(writer, b"0\n")
        os.close(writer)
