"""The deploy journal: one deploy as a transaction that the next run finishes.

`journal.json` in the state dir names the deploy (system, activation, what ran before) and
its phase. Each phase is written (atomically) before the step it names takes effect, so a
run killed anywhere leaves a journal whose phase says what may have happened; the next run
finishes it (see deploy.recover) before it decides anything anew.

    planned -> profile-set -> activating -> activated [-> checking] -> done
                   \\______________\\____________\\_____________\\-> failed -> rolling-back
                                                                         -> rolled-back
    (a run killed before its activation took effect is superseded by the next run's
    deploy, which keeps its `before`; when that run deploys nothing: rolling-back)

`checking`: a switched system's health checks (actuator/health.py); failing, the deploy
fails and is rolled back. A trial boot (actuator/trial.py) goes on from `booting` (kexec and
oneshot: straight from `planned`; reboot: after its `activated`) to the run after the boot, which
checks, then confirms (`done`) or fails and rolls back, then `rebooting-back` once.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from collector.config import Paths
from collector.errors import StateError
from collector.fsutil import atomic_write_json, read_json
from collector.state import Activation, Deployed
from collector.store import StorePath, path_of

VERSION = 1
FILE = "journal.json"
# Read only here: the tests' deterministic way to stop a deploy at a phase, as a kill -9
# would (right after the phase is written, before its step takes effect).
STOP_AT = "NIXOS_AUTODEPLOY_STOP_AT_PHASE"


class Phase(StrEnum):
    PLANNED = "planned"  # nothing changed yet; next: the in-flight record
    PROFILE_SET = "profile-set"  # next: `nix-env --set` (may have happened)
    ACTIVATING = "activating"  # next: switch-to-configuration (may have taken effect)
    ACTIVATED = "activated"  # the activation succeeded; next: the checks, the record
    CHECKING = "checking"  # the health checks of a switched system run (again, if cut short)
    BOOTING = "booting"  # a trial boot: next the reboot or kexec; then the run after the boot
    REBOOTING_BACK = "rebooting-back"  # a failed trial, rolled back: next its one reboot
    DONE = "done"
    FAILED = "failed"  # the deploy failed; next: the result, then the rollback
    ROLLING_BACK = "rolling-back"  # next: record, profile and activation go back
    ROLLED_BACK = "rolled-back"


FINISHED = frozenset({Phase.DONE, Phase.ROLLED_BACK})


def _path(value: Any) -> StorePath | None:
    return None if value is None else StorePath.parse(value)


def _trial(value: Any) -> str | None:
    if value not in (None, "kexec", "reboot", "oneshot"):
        raise ValueError(f"unknown trial {value!r}")
    return str(value) if value else None


@dataclass(frozen=True)
class Before:
    """What ran before the deploy: what a rollback brings back."""

    current: StorePath | None
    profile: StorePath | None
    deployed: Deployed | None  # the record before (complete), None: there was none

    def to_json(self) -> dict[str, Any]:
        return {
            "current": path_of(self.current),
            "profile": path_of(self.profile),
            "deployed": self.deployed.to_json() if self.deployed else None,
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> Before:
        deployed = data["deployed"]
        return cls(
            current=_path(data["current"]),
            profile=_path(data["profile"]),
            deployed=None if deployed is None else Deployed.from_json(deployed, source),
        )


@dataclass(frozen=True)
class Journal:
    id: str
    path: StorePath
    activation: Activation
    before: Before
    phase: Phase
    started_at: float
    activation_started: bool = False  # switch-to-configuration may have touched the host
    blocks_retry: bool = False  # the system itself failed: not retried until upstream changes
    message: str = ""  # why it failed
    trial: str | None = None  # a trial boot: "kexec", "oneshot" or "reboot" (actuator/trial.py)

    @property
    def open(self) -> bool:
        return self.phase not in FINISHED

    @property
    def fallback(self) -> StorePath | None:
        """What the next boot loads after a rollback: the profile as it was, unless that
        already named the system being deployed (then what was deployed, or ran, before)."""
        for candidate in (
            self.before.profile,
            self.before.deployed.path if self.before.deployed else None,
            self.before.current,
        ):
            if candidate is not None and candidate != self.path:
                return candidate
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "id": self.id,
            "path": self.path.path,
            "activation": self.activation.value,
            "before": self.before.to_json(),
            "phase": self.phase.value,
            "started_at": self.started_at,
            "activation_started": self.activation_started,
            "blocks_retry": self.blocks_retry,
            "message": self.message,
            "trial": self.trial,
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> Journal:
        try:
            if data["version"] != VERSION:
                raise StateError(f"{source} has unknown version {data['version']!r}")
            return cls(
                id=str(data["id"]),
                path=StorePath.parse(data["path"]),
                activation=Activation(data["activation"]),
                before=Before.from_json(data["before"], source),
                phase=Phase(data["phase"]),
                started_at=float(data["started_at"]),
                activation_started=bool(data["activation_started"]),
                blocks_retry=bool(data["blocks_retry"]),
                message=str(data["message"]),
                trial=_trial(data.get("trial")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"{source} is corrupt: {e}") from None


def load(paths: Paths) -> Journal | None:
    source = paths.state(FILE)
    try:
        data = read_json(source)
        return None if data is None else Journal.from_json(data, source)
    except StateError as e:
        # It says what a killed deploy left half done; guessing could boot a failed system.
        raise StateError(
            f"{e}; check the system profile and the boot loader, then remove it"
        ) from None


def _write(paths: Paths, journal: Journal) -> Journal:
    atomic_write_json(paths.state(FILE), journal.to_json())
    if os.environ.get(STOP_AT) == journal.phase.value:
        os.kill(os.getpid(), signal.SIGKILL)
    return journal


def begin(
    paths: Paths,
    path: StorePath,
    activation: Activation,
    before: Before,
    trial: str | None = None,
    *,
    activation_started: bool = False,
) -> Journal:
    """A new deploy, written before anything changes (activation_started: one it replaces
    may have touched the boot loader)."""
    journal = Journal(
        id=uuid.uuid4().hex,
        path=path,
        activation=activation,
        before=before,
        phase=Phase.PLANNED,
        started_at=time.time(),
        trial=trial,
        activation_started=activation_started,
    )
    return _write(paths, journal)


def advance(paths: Paths, journal: Journal, phase: Phase, **changes: Any) -> Journal:
    """Move to phase (and change other fields), written before that phase's step runs."""
    return _write(paths, dataclasses.replace(journal, phase=phase, **changes))
