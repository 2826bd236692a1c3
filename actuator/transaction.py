"""The deploy as a transaction: the journal (journal.json) and every transition of it.

The journal names the deploy (system, activation, what ran before) and its phase. Each phase
is written (atomically) before the step it names takes effect, so a run killed anywhere
leaves a journal whose phase says what may have happened, and the next run finishes it
(`recover`) before it decides anything anew. `RECOVERY` says, for each open phase, what a
run that finds it does; docs/CONTRACT.md's phase table is generated from it
(`python -m actuator.transaction`).

    planned -> profile-set -> activating -> activated [-> checking] -> done
    planned|activated -> booting -> (the run after the boot) checking -> done
    any open phase -> failed -> rolling-back [-> rebooting-back] -> rolled-back

A trial boot (actuator/trial.py) goes on from `booting` (kexec and oneshot: straight from
`planned`; reboot: after `activated`) to the run after the boot, which checks, then confirms
(`done`) or fails, rolls back and reboots back once (`rebooting-back`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NoReturn

from collector import nix
from collector import space as store_space
from collector.config import Paths, Settings
from collector.errors import ActuatorError, AutodeployError, SpaceError, StateError
from collector.fsutil import atomic_write_json, read_json
from collector.history import Event, Kind
from collector.process import run
from collector.records import DeployResult, Rollback
from collector.snapshot import Snapshot, load_snapshot
from collector.state import (
    Activation,
    Deployed,
    load_deployed,
    pinned,
    profile_moved,
    read_links,
)
from collector.store import StorePath, path_of

from . import commands, health, profile, reboot, space, trial
from .gate import Action, Decision
from .records import (
    forget_deployed,
    note,
    record_health,
    record_result,
    record_rollback,
    save_deployed,
)
from .trial import TrialKind

log = logging.getLogger(__name__)

VERSION = 1
FILE = "journal.json"
# Read only here: the tests' deterministic way to stop a deploy at a phase, as a kill -9
# would (right after the phase is written, before its step takes effect).
STOP_AT = "NIXOS_AUTODEPLOY_STOP_AT_PHASE"


class Phase(StrEnum):
    PLANNED = "planned"
    PROFILE_SET = "profile-set"
    ACTIVATING = "activating"
    ACTIVATED = "activated"
    CHECKING = "checking"
    BOOTING = "booting"
    REBOOTING_BACK = "rebooting-back"
    DONE = "done"
    FAILED = "failed"
    ROLLING_BACK = "rolling-back"
    ROLLED_BACK = "rolled-back"
    ABANDONED = "abandoned"


# What each phase is written before (the step that may have happened when it is found).
BEFORE_STEP = {
    Phase.PLANNED: "the in-flight deployed record; nothing changed yet",
    Phase.PROFILE_SET: "`nix-env --set` of the system profile",
    Phase.ACTIVATING: "switch-to-configuration (may have taken effect)",
    Phase.ACTIVATED: "the health checks and the record (the activation succeeded)",
    Phase.CHECKING: "the health checks of a switched system, or of a trial after its boot",
    Phase.BOOTING: "a trial's reboot or kexec (kexec, oneshot: nothing else changed)",
    Phase.REBOOTING_BACK: "the one reboot of a failed trial back into the old system",
    Phase.DONE: "nothing: finished",
    Phase.FAILED: "the failure's result, then the rollback",
    Phase.ROLLING_BACK: "the record, the profile and the activation going back",
    Phase.ROLLED_BACK: "nothing: finished",
    Phase.ABANDONED: "nothing: finished (someone else changed the system while it was open)",
}
FINISHED = frozenset({Phase.DONE, Phase.ROLLED_BACK, Phase.ABANDONED})
# Phases whose step never took effect: the next run's own deploy takes their place.
CUT_SHORT = frozenset({Phase.PLANNED, Phase.PROFILE_SET, Phase.ACTIVATING})
# Open phases of a trial that the run after its boot takes over (not an interruption).
AFTER_BOOT = frozenset({Phase.BOOTING, Phase.CHECKING, Phase.REBOOTING_BACK})


class RollbackFailed(ActuatorError):
    """Going back did not finish; the journal stays `rolling-back` for the next run."""


def _path(value: Any) -> StorePath | None:
    return None if value is None else StorePath.parse(value)


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
    trial: TrialKind | None = None
    serial: int | None = None  # of the release that named `path` (None: a bare store path)
    forced: bool = False  # by --force: a run without it does not carry it on

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
            "trial": self.trial.value if self.trial else None,
            "serial": self.serial,
            "forced": self.forced,
            # For a version that does not know this phase: whether it may ignore it.
            "finished": not self.open,
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> Journal:
        try:
            if data["version"] != VERSION:
                raise StateError(f"{source} has unknown version {data['version']!r}")
            phase, kind = _phase_and_trial(data)
            return cls(
                id=str(data["id"]),
                path=StorePath.parse(data["path"]),
                activation=Activation(data["activation"]),
                before=Before.from_json(data["before"], source),
                phase=phase,
                started_at=float(data["started_at"]),
                activation_started=bool(data["activation_started"]),
                blocks_retry=bool(data["blocks_retry"]),
                message=str(data["message"]),
                trial=kind,
                serial=None if data.get("serial") is None else int(data["serial"]),
                forced=bool(data.get("forced", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"{source} is corrupt: {e}") from None


def _phase_and_trial(data: Any) -> tuple[Phase, TrialKind | None]:
    """A finished journal that a newer version wrote (after a downgrade) is read even with
    a phase or trial kind this version does not know: nothing is left to finish, and what
    kind of trial it was no longer matters. An unknown phase reads as `rolled-back`: never
    taken for a success. An open one stays refused: what it left half done is unknown."""
    phase, kind = data["phase"], data.get("trial")
    known_phase = phase in Phase.__members__.values()
    known_kind = not kind or kind in TrialKind.__members__.values()
    finished = data.get("finished") is True or (known_phase and Phase(phase) in FINISHED)
    if finished and not (known_phase and known_kind):
        return (Phase(phase) if known_phase else Phase.ROLLED_BACK), (
            TrialKind(kind) if kind and known_kind else None
        )
    return Phase(phase), TrialKind(kind) if kind else None


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


def _write(paths: Paths, entry: Journal) -> Journal:
    atomic_write_json(paths.state(FILE), entry.to_json())
    if os.environ.get(STOP_AT) == entry.phase.value:
        os.kill(os.getpid(), signal.SIGKILL)
    return entry


def advance(
    paths: Paths,
    entry: Journal,
    phase: Phase,
    *,
    activation_started: bool | None = None,
    blocks_retry: bool | None = None,
    message: str | None = None,
) -> Journal:
    """Move to phase (and change what is given), written before that phase's step runs."""
    return _write(
        paths,
        dataclasses.replace(
            entry,
            phase=phase,
            activation_started=entry.activation_started
            if activation_started is None
            else activation_started,
            blocks_retry=entry.blocks_retry if blocks_retry is None else blocks_retry,
            message=entry.message if message is None else message,
        ),
    )


# ---- a deploy, forwards -----------------------------------------------------------------


def start(
    settings: Settings,
    snapshot: Snapshot,
    activation: Activation,
    superseded: Journal | None = None,
) -> None:
    """Deploy the snapshot's upstream. superseded: a deploy cut short before its activation
    took effect; this one takes its place, so what ran before that one is what a failure
    goes back to."""
    paths = settings.paths
    system = snapshot.links.upstream
    assert system is not None
    what = f"deploying {system.name} ({activation.value})"
    try:
        if not pinned(paths, system):
            store_space.check_store(paths, system, settings.min_free_store)
            nix.realise(system, paths.upstream)
    except AutodeployError as e:  # nothing changed: a passing failure, retried next run
        message = f"{what} failed: {e}"
        record_result(paths, DeployResult(time.time(), system, activation, False, message))
        raise ActuatorError(message) from None
    if not os.access(os.path.join(system.path, "bin/switch-to-configuration"), os.X_OK):
        message = (
            f"{what} failed: {system} is not a NixOS system "
            "(no executable bin/switch-to-configuration)"
        )
        result = DeployResult(time.time(), system, activation, False, message)
        record_result(paths, result, blocks_retry=True)
        raise ActuatorError(message)
    tried = trial.kind(settings, activation)
    if tried is not None:
        trial.check(paths, tried, system)  # a trial that cannot work, before any slot
    # A kexec or oneshot trial installs the boot loader only once confirmed; checked now
    # too, so that no trial boot starts whose confirmation cannot fit.
    try:
        space.make_room(settings, system, (superseded.before.current if superseded else None,))
    except AutodeployError as e:  # before the profile moves: retried next run
        if superseded is not None:
            undo(settings, superseded)
        message = f"{what} refused: {e}"
        record_result(paths, DeployResult(time.time(), system, activation, False, message))
        raise ActuatorError(message) from None
    if tried is not None and reboot.clear_to_reboot(settings, snapshot) is None:
        # A trial boot waits for its window and reboot slot before anything changes: the
        # boot loader's default never moves to an untried system outside a window.
        if superseded is not None:
            undo(settings, superseded)
        return
    links = read_links(paths)
    before = Before(links.current, links.profile, snapshot.deployed)
    if superseded is not None:
        # What the superseded deploy found (the record; the profile, unless moved by hand
        # since), and what runs now: a hand deploy since then (a --force run goes over it)
        # is what a failure goes back to.
        moved = profile_moved(links, snapshot.deployed) is not None
        profile_before = links.profile if moved else superseded.before.profile
        before = Before(links.current, profile_before, superseded.before.deployed)
    accepted = snapshot.upstream.release
    entry = _begin(
        paths,
        system,
        activation,
        before,
        tried,
        serial=None if accepted is None else accepted.serial,
        forced=settings.force,
        # A superseded activation may have touched the boot loader: a rollback must reset it.
        activation_started=superseded is not None and superseded.activation_started,
    )
    # The in-flight record, for the collector: a deploy is under way (never dirty).
    in_flight = Deployed(
        system,
        activation,
        before.current,
        time.time(),
        complete=False,
        generation=links.profile_generation,
    )
    save_deployed(paths, in_flight)
    if tried is not None and tried.one_time:
        _boot(settings, entry)  # profile and boot default change after its checks
        return
    entry = advance(paths, entry, Phase.PROFILE_SET)
    try:
        profile.set_to(paths, system)
    except AutodeployError as e:
        fail(settings, entry, f"{what} failed: {e}", blocks_retry=False)
    # The generation the agent made: the profile on any other is someone else's doing.
    save_deployed(paths, dataclasses.replace(in_flight, generation=profile.generation(paths)))
    entry = advance(paths, entry, Phase.ACTIVATING, activation_started=True)
    try:
        run(commands.switch(paths, system, activation), stream_stderr=True)
    except AutodeployError as e:
        fail(settings, entry, f"{what} failed: {e}", blocks_retry=True)
    entry = advance(paths, entry, Phase.ACTIVATED)
    if tried is not None:
        _boot(settings, entry)  # confirmed by the run after the boot
        return
    _confirm(settings, entry)
    log.info("deployed %s (%s)", system.name, activation.value)


def _begin(
    paths: Paths,
    path: StorePath,
    activation: Activation,
    before: Before,
    tried: TrialKind | None,
    *,
    serial: int | None,
    activation_started: bool,
    forced: bool,
) -> Journal:
    """A new deploy, written before anything changes."""
    entry = Journal(
        id=uuid.uuid4().hex,
        path=path,
        activation=activation,
        before=before,
        phase=Phase.PLANNED,
        started_at=time.time(),
        trial=tried,
        activation_started=activation_started,
        serial=serial,
        forced=forced,
    )
    return _write(paths, entry)


def _boot(settings: Settings, entry: Journal) -> None:
    """Journal the trial's boot, then reboot or kexec into its system. A command that
    fails (a one-time entry refused, `kexec --load` refused under Secure Boot lockdown,
    bootctl failing) means nothing went down: the failure is counted and blocks this system
    until upstream changes (it would fail the same way on every run), the trial is undone,
    its reboot slot goes back, and the error is raised."""
    paths = settings.paths
    kind = entry.trial
    assert kind is not None
    # Marked first: a run that finds `booting` and this boot's mark knows no boot happened.
    trial.mark(paths, entry.id)
    oneshot = kind is TrialKind.ONESHOT  # installs the boot loader
    entry = advance(
        paths, entry, Phase.BOOTING, activation_started=entry.activation_started or oneshot
    )
    try:
        if oneshot:
            old = reboot.profile_system(paths)
            for argv in trial.oneshot_argvs(paths, entry.path, old):
                run(argv, stream_stderr=True)
        reboot.reboot(settings, reboot.Reboot(kind.how, entry.path, kind.event))
    except AutodeployError as e:
        message = f"trial boot ({kind.value}) into {entry.path.name} failed: {e}"
        # Counted first: a run cut short after it finds `booting` and this boot's mark,
        # and undoes the trial.
        result = DeployResult(time.time(), entry.path, entry.activation, False, message, entry.id)
        record_result(paths, result, blocks_retry=True)
        try:
            undo(settings, entry)
        except ActuatorError as undoing:
            message += f"; {undoing}"
        finally:
            reboot.release(settings)
        raise ActuatorError(message) from None
    except BaseException:
        undo(settings, entry)
        raise


def _confirm(settings: Settings, entry: Journal) -> Journal:
    """An activation that took effect stays only when the switched system passes its
    health checks (a boot-mode deploy is checked after its boot); failing, it is rolled
    back and not retried until upstream changes."""
    if entry.activation is Activation.SWITCH and health.checks_for(settings):
        entry = advance(settings.paths, entry, Phase.CHECKING)
        result = dataclasses.replace(health.run_checks(settings), path=entry.path)
        record_health(settings.paths, result)
        if not result.ok:
            message = f"{entry.path.name} failed its health checks: {result.summary}"
            fail(settings, entry, message, blocks_retry=True)
    entry = complete(settings.paths, entry)
    _prune(settings, entry)
    return entry


def _prune(settings: Settings, entry: Journal) -> None:
    """After a confirmed deploy: the agent's generations beyond --keep-generations go. A
    failure to remove them is no failure of the deploy."""
    try:
        space.prune(settings, (entry.path, entry.before.current))
    except AutodeployError as e:
        log.warning("warning: %s", e)


def untried(paths: Paths, decision: Decision, snapshot: Snapshot) -> Decision:
    """Never adopt a system that runs without having been tried: its trial was undone (a
    kernel kexec'd after all, one a failed trial left loaded), so no health check passed,
    and the profile and the boot loader still name the old system. (It reads dirty, the
    profile elsewhere; this says why.)"""
    current = snapshot.links.current
    if decision.action not in (Action.TRACK, Action.NOTHING) or current is None:
        return decision
    entry = load(paths)
    if (
        entry is None
        or entry.trial is None
        or entry.path != current
        or entry.phase is not Phase.ROLLED_BACK
        or snapshot.links.profile == current
    ):
        return decision
    return Decision(
        Action.NOTHING,
        f"{current.name} runs, but its trial boot was undone and it was never checked; "
        "not adopting it (reboot into the profile's system, or --force deploys it)",
    )


def complete(paths: Paths, entry: Journal) -> Journal:
    """The deploy succeeded: the record says so, the result is counted, done. A reboot
    already issued for it stays recorded: it is the one reboot of this deploy."""
    record = load_deployed(paths)
    ours = record if record and record.path == entry.path else None
    rebooted = ours.reboot_issued_at if ours else None
    links = read_links(paths)
    if links.profile == entry.path:
        generation = links.profile_generation
    else:
        generation = ours.generation if ours else None
    now = time.time()
    deployed = Deployed(entry.path, entry.activation, entry.before.current, now, rebooted)
    save_deployed(paths, dataclasses.replace(deployed, generation=generation))
    record_result(paths, DeployResult(now, entry.path, entry.activation, True, id=entry.id))
    return advance(paths, entry, Phase.DONE)


# ---- failing, going back ----------------------------------------------------------------


def fail(settings: Settings, entry: Journal, message: str, *, blocks_retry: bool) -> NoReturn:
    """entry's deploy failed (its activation, its health checks, its trial boot): journaled
    and counted before the rollback, so should the rollback be cut short the next run knows
    both and finishes it; then rolled back (and a failed trial rebooted back), and raised,
    saying when rolling back failed too."""
    entry = advance(settings.paths, entry, Phase.FAILED, message=message, blocks_retry=blocks_retry)
    try:
        _finish(settings, entry)
    except RollbackFailed as e:
        message += f"; rolling back failed too (the next run tries again): {e}"
    raise ActuatorError(message)


def undo(settings: Settings, entry: Journal) -> Journal:
    """As if entry's deploy had not started (it is never counted): rolled back, journaled
    at once, so a run cut short here finishes the rollback; a trial's mark goes, and so
    does a kernel a kexec trial loaded (since systemd 255 any `systemctl reboot` would boot
    it, untried)."""
    entry = advance(settings.paths, entry, Phase.ROLLING_BACK)
    if entry.trial is TrialKind.KEXEC:
        trial.unload()
    try:
        entry = _finish(settings, entry)
    except RollbackFailed as e:
        raise ActuatorError(
            f"finishing the interrupted deploy of {entry.path.name}; "
            f"rolling back failed too (the next run tries again): {e}"
        ) from None
    if entry.trial is not None:
        trial.unmark(settings.paths)
    return entry


def roll_back(settings: Settings, entry: Journal) -> Journal:
    """Bring back what ran before entry's deploy: the record, the profile, then the
    previous system's activation (in its own unit, like every activation): `switch` when
    the deployed system runs, and `boot` so the boot loader's default follows the profile
    (NixOS installs the boot loader before it starts units, so a failed activation may have
    made the new system the default). A failed trial still running is left by a reboot
    (`rebooting-back`), not a switch. Safe to repeat."""
    paths = settings.paths
    if entry.phase is not Phase.ROLLING_BACK:
        entry = advance(paths, entry, Phase.ROLLING_BACK)
    before = entry.before
    # Failed: never the failed system. Undone (cut short, never failed): as if it had not
    # started, the profile as it was, even naming this system (a boot-mode deploy of it
    # waiting for its reboot, or a hand `boot` that a forced deploy found).
    target = entry.fallback
    if not entry.blocks_retry and before.profile is not None:
        target = before.profile
    links = read_links(paths)
    record = load_deployed(paths)
    ours = record if record is not None and record.path == entry.path else None
    # Only a profile this deploy set goes back; one someone else moved since (a hand
    # switch or boot while the deploy was half done) is theirs, and so is the boot default.
    # The in-flight record's generation tells (the one a deploy it superseded set is the
    # agent's too); a rollback resumed after it put the record back had decided: not by
    # hand; a record of an older version leaves only the systems involved to judge by.
    restored = (
        ours is None
        and record is not None
        and before.deployed is not None
        and record.path == before.deployed.path
    )
    if ours is not None and ours.generation is not None:
        by_hand = profile_moved(links, ours) is not None
    elif restored and record is not None and record.generation is not None:
        by_hand = profile_moved(links, record) is not None  # resumed: the record is back
    else:
        by_hand = links.profile not in (entry.path, before.profile, target)
    # The record first: it decides the next run, whatever else fails here. Under a hand
    # deploy it keeps this deploy's generation, so the host reads dirty, not as before.
    if by_hand and ours is not None:
        save_deployed(paths, dataclasses.replace(ours, complete=True))
    elif before.deployed is None:
        forget_deployed(paths)
    elif ours is not None:
        # With the generation this deploy left until the profile goes back: a resumed
        # rollback (and the collector meanwhile) tells the agent's profile from a hand's.
        left = ours.generation if ours.generation is not None else before.deployed.generation
        save_deployed(paths, dataclasses.replace(before.deployed, generation=left))
    elif not restored:
        save_deployed(paths, before.deployed)
    # Also a profile a superseded deploy of the agent's set (neither this one's nor target).
    set_back = target is not None and links.profile != target and not by_hand
    if set_back:
        assert target is not None
        profile.set_to(paths, target)
        if before.deployed is not None and before.profile == before.deployed.path:
            # The generation just made is the agent's: the profile was its own.
            back = dataclasses.replace(before.deployed, generation=profile.generation(paths))
            save_deployed(paths, back)
        elif before.deployed is not None:
            # A hand deploy's profile (a --force run went over it) put back: still theirs.
            save_deployed(paths, before.deployed)
    elif ours is not None and before.deployed is not None and not by_hand:
        # The profile as this deploy found it: so is the record, with the generation it
        # knew (a hand `boot` a forced deploy found stays a hand deploy).
        save_deployed(paths, before.deployed)
    if entry.trial is TrialKind.ONESHOT:
        trial.forget(paths, entry.path)
    booted_target = False
    running = before.current
    if (
        entry.activation_started
        and entry.trial is None
        and links.current == entry.path
        and running not in (None, entry.path)
    ):
        assert running is not None
        # `test` under a hand-moved profile: the boot default stays the operator's.
        how = commands.TEST if by_hand else Activation.SWITCH.value
        run(commands.switch(paths, running, how), stream_stderr=True)
        booted_target = running == target
    # The boot loader follows the profile: after an activation that may have touched it,
    # and after the profile went back (a hand `boot` of this system, taken for the
    # agent's own `nix-env --set`, moved the boot default too).
    touched = entry.activation_started or set_back
    if touched and target is not None and not booted_target and not by_hand:
        run(commands.switch(paths, target, Activation.BOOT), stream_stderr=True)
    stays_up = links.current == entry.path or trial.marked(paths, entry.id)
    reboots_back = entry.trial is not None and entry.blocks_retry and stays_up
    entry = advance(paths, entry, Phase.REBOOTING_BACK if reboots_back else Phase.ROLLED_BACK)
    note(paths, Event(Kind.ROLLED_BACK, path=entry.path.path, to=path_of(target)))
    _record_rollback(paths, entry, None)
    return entry


def _record_rollback(paths: Paths, entry: Journal, error: str | None) -> None:
    """Counted once per deploy, and only when the system itself failed (its activation,
    its health checks): a deploy merely cut short is undone, not rolled back from."""
    if not entry.blocks_retry:
        return
    reason = entry.message + (f"; rolling back failed: {error}" if error else "")
    rollback = Rollback(
        entry.id, time.time(), entry.path, entry.fallback, error is None, reason, entry.serial
    )
    record_rollback(paths, rollback)


# ---- finishing what a run left: one handler per open phase ------------------------------

# A handler finishes its phase and returns the journal as it left it, or None when the run
# stops here (a reboot was issued, or a deploy cut short waits to be superseded).
Handler = Callable[[Settings, Journal], Journal | None]


def _superseded(settings: Settings, entry: Journal) -> Journal | None:
    """Cut short before it took effect: the run's own decision takes its place (a deploy
    keeps its `before`); any other decision rolls it back first. Should its system run all
    the same (someone finished it by hand: `test`, or `test` and `boot`, of that very
    system), it goes on as `activated`, the profile and boot default following it.

    The in-flight record names that system, so the collector already reads it as the
    agent's: left half done, the next deploy would take `before` for what runs."""
    paths = settings.paths
    links = read_links(paths)
    record = load_deployed(paths)
    if (
        entry.trial is not None
        or links.current != entry.path
        or record is None
        or record.path != entry.path
        or profile_moved(links, record) is not None  # a hand `boot` of another: theirs
    ):
        return None
    log.info("%s runs (activated by someone else): the deploy goes on", entry.path.name)
    if links.profile != entry.path:
        profile.set_to(paths, entry.path)
    save_deployed(paths, dataclasses.replace(record, generation=profile.generation(paths)))
    entry = advance(paths, entry, Phase.ACTIVATING, activation_started=True)
    try:
        run(commands.switch(paths, entry.path, Activation.BOOT), stream_stderr=True)
    except AutodeployError as e:
        fail(settings, entry, f"deploying {entry.path.name} failed: {e}", blocks_retry=True)
    return advance(paths, entry, Phase.ACTIVATED)


def _activating(settings: Settings, entry: Journal) -> Journal | None:
    """A switch that took effect (the system runs) goes on as `activated`; otherwise cut
    short, as `planned`."""
    took_effect = (
        entry.activation is Activation.SWITCH and read_links(settings.paths).current == entry.path
    )
    return advance(settings.paths, entry, Phase.ACTIVATED) if took_effect else None


def _activated(settings: Settings, entry: Journal) -> Journal | None:
    """Rolled forward: checked (a switch), recorded, done. A reboot trial cut short before
    its reboot boots now when the window and slot allow, else is undone. Another system
    running (someone switched by hand meanwhile) is a hand deploy: abandoned, not checked."""
    current = read_links(settings.paths).current
    switched = entry.trial is None and entry.activation is Activation.SWITCH
    if switched and current != entry.path:
        return _abandon(settings, entry, current)
    if entry.trial is not None:
        snapshot = load_snapshot(settings.paths)
        if snapshot is None or reboot.clear_to_reboot(settings, snapshot):
            _boot(settings, entry)
            return None
        return undo(settings, entry)  # as if not started: the next run in a window tries again
    entry = _confirm(settings, entry)
    note(settings.paths, Event(Kind.COMPLETED_INTERRUPTED_DEPLOY, path=entry.path.path))
    log.info("the deploy of %s took effect; recorded it", entry.path.name)
    return entry


def _abandon(settings: Settings, entry: Journal, current: StorePath | None) -> Journal:
    """Someone else changed the system while the deploy was open: theirs now. Checking
    what runs would vouch for a system never checked; the record keeps entry's system
    (complete), so the host reads dirty until the operator or --force decides."""
    paths = settings.paths
    log.warning(
        "%s no longer runs (%s does): a hand deploy; abandoning the deploy",
        entry.path.name,
        current.name if current else "an unknown system",
    )
    record = load_deployed(paths)
    if record is not None and record.path == entry.path:
        save_deployed(paths, dataclasses.replace(record, complete=True))
    note(paths, Event(Kind.HAND_DEPLOY, path=entry.path.path, to=path_of(current)))
    return advance(paths, entry, Phase.ABANDONED)


def _checking(settings: Settings, entry: Journal) -> Journal | None:
    """A switched system is checked again, then done or failed; a trial's checks run in
    the run after its boot (as `booting`)."""
    if entry.trial is not None:
        return _after_boot(settings, entry)
    return _activated(settings, entry)


def _after_boot(settings: Settings, entry: Journal) -> Journal | None:
    """The run after a trial boot. Still this boot (the mark): a trial whose reboot did not
    happen is undone (a reboot trial's default goes back too) and decided anew. Booted
    into the new system: checked, then confirmed (kexec, oneshot: only now the profile and
    the boot default; should the boot filesystem not take it, refused and left open for the
    next run; should installing its boot loader fail, it failed: rolled back and
    rebooted back) or failed, rolled back and rebooted back. Came back on another
    system: a kexec or oneshot never issued is undone, one issued failed (recorded, no
    second reboot); a reboot trial is done (pending, not rebooted again)."""
    paths = settings.paths
    kind = entry.trial
    assert kind is not None
    if trial.marked(paths, entry.id):
        # A reboot trial too: taking this boot for its success would record an untried
        # system and reboot into it unchecked.
        log.info("the %s into %s did not happen; undoing it", kind.value, entry.path.name)
        return undo(settings, entry)
    current = read_links(paths).current
    if current != entry.path:
        return _came_back(settings, entry, current)
    entry = advance(paths, entry, Phase.CHECKING)
    result = dataclasses.replace(health.run_checks(settings), path=entry.path)
    record_health(paths, result)
    if not result.ok:
        message = f"{entry.path.name} failed its health checks after its trial boot: "
        fail(settings, entry, message + result.summary, blocks_retry=True)
    if kind.one_time:  # only now does the new system become what the next boot loads
        try:
            # Checked again: the boot filesystem may have filled since the trial began.
            space.make_room(settings, entry.path, (entry.before.current,))
        except SpaceError as e:
            _refused_confirmation(settings, entry, e)
        # Its boot loader install may leave the boot loader half written: a rollback
        # installs the old one's again.
        entry = advance(paths, entry, Phase.CHECKING, activation_started=True)
        try:
            profile.set_to(paths, entry.path)
            run(commands.switch(paths, entry.path, Activation.BOOT), stream_stderr=True)
        except AutodeployError as e:
            # The profile and the default go back to the old system; the new one, running
            # but not what the next boot loads, is left by the rollback reboot.
            message = f"{entry.path.name} passed its checks, but installing it failed: {e}"
            fail(settings, entry, message, blocks_retry=True)
    entry = complete(paths, entry)
    note(paths, Event(Kind.TRIAL_CONFIRMED, path=entry.path.path))
    _prune(settings, entry)
    log.info("trial boot of %s confirmed: %s", entry.path.name, result.summary)
    return entry


def _refused_confirmation(settings: Settings, entry: Journal, error: SpaceError) -> NoReturn:
    """A trial that passed its checks but whose boot loader install the boot filesystem
    cannot take: nothing moves (the new system runs, the next boot loads the old one) and
    the trial stays open, so the next run checks and tries again (space can be freed).
    Counted as a failure that blocks no retry, the metrics and alerts show the refusal;
    without the journal's id, which would keep the confirmation's result from counting."""
    message = f"{entry.path.name} passed its checks, but {error}; the next run tries again"
    result = DeployResult(time.time(), entry.path, entry.activation, False, message)
    record_result(settings.paths, result)
    raise ActuatorError(message)


def _came_back(settings: Settings, entry: Journal, current: StorePath | None) -> Journal:
    """After a trial boot the host runs another system. A kexec or oneshot never issued
    (a power loss before it) is undone; one issued failed: the kernel or stage 1 panicked
    (panic=, boot.panic_on_fail) or hung and the machine was reset, or the system went down
    during its checks; recorded, no second reboot. A reboot trial whose boot loader did not
    take the new default (someone picked another entry) is done: pending, not rebooted
    again."""
    paths = settings.paths
    kind = entry.trial
    assert kind is not None
    name = current.name if current else "an unknown system"
    record = load_deployed(paths)
    issued = record is not None and record.path == entry.path and record.reboot_issued_at
    if kind.one_time and not issued:
        log.info("the %s into %s never happened; undoing it", kind.value, entry.path.name)
        return undo(settings, entry)
    if kind.one_time:
        message = (
            f"{entry.path.name} went down during its checks after its trial boot: "
            f"the host came back on {name}"
            if entry.phase is Phase.CHECKING
            else f"{entry.path.name} did not come up on its trial boot: "
            f"the host came back on {name}"
        )
        fail(settings, entry, message, blocks_retry=True)
    log.info("rebooted into %s, not %s; not rebooting again", name, entry.path.name)
    return complete(paths, entry)


def _rebooting_back(settings: Settings, entry: Journal) -> Journal | None:
    """The one reboot of a failed trial into what ran before (the boot loader's default
    again), issued while the failed system still runs or the mark says the command was not
    followed by a reboot; rolled back once the old system runs."""
    paths = settings.paths
    if read_links(paths).current != entry.path and not trial.marked(paths, entry.id):
        return advance(paths, entry, Phase.ROLLED_BACK)
    trial.mark(paths, entry.id)
    back = reboot.Reboot(reboot.How.BACK, entry.path, Kind.ROLLBACK_REBOOT)
    reboot.reboot(settings, back)
    return advance(paths, entry, Phase.ROLLED_BACK)


def _failed(settings: Settings, entry: Journal) -> Journal | None:
    """The failure is counted (once per deploy), then rolled back."""
    record_result(
        settings.paths,
        DeployResult(time.time(), entry.path, entry.activation, False, entry.message, entry.id),
        blocks_retry=entry.blocks_retry,
    )
    return _rolling_back(settings, entry)


def _rolling_back(settings: Settings, entry: Journal) -> Journal | None:
    """Rolled back (again); a rollback that fails stays `rolling-back`, says so and stops
    the run."""
    try:
        return roll_back(settings, entry)
    except AutodeployError as e:
        note(settings.paths, Event(Kind.ROLLBACK_FAILED, message=str(e)))
        _record_rollback(settings.paths, entry, str(e))
        raise RollbackFailed(str(e)) from None


RECOVERY: dict[Phase, Handler] = {
    Phase.PLANNED: _superseded,
    Phase.PROFILE_SET: _superseded,
    Phase.ACTIVATING: _activating,
    Phase.ACTIVATED: _activated,
    Phase.CHECKING: _checking,
    Phase.BOOTING: _after_boot,
    Phase.REBOOTING_BACK: _rebooting_back,
    Phase.FAILED: _failed,
    Phase.ROLLING_BACK: _rolling_back,
}


def _finish(settings: Settings, entry: Journal) -> Journal:
    """Take entry through RECOVERY until it is finished or a handler stops the run."""
    while entry.open:
        moved = RECOVERY[entry.phase](settings, entry)
        if moved is None:
            break
        entry = moved
    return entry


def recover(settings: Settings) -> Journal | None:
    """Finish what an open journal left, before anything is decided anew. A deploy cut
    short before its activation took effect is returned: the run's decision supersedes it
    (see deploy); one that --force started is undone unless this run is forced too (it may
    have been overriding a hand deploy: that is for the operator to decide again)."""
    entry = load(settings.paths)
    if entry is None or not entry.open:
        return None
    if not (entry.trial is not None and entry.phase in AFTER_BOOT):
        log.info("the deploy of %s was interrupted (%s)", entry.path.name, entry.phase.value)
        note(
            settings.paths,
            Event(Kind.INTERRUPTED_DEPLOY, path=entry.path.path, phase=entry.phase.value),
        )
    try:
        entry = _finish(settings, entry)
    except RollbackFailed as e:
        raise ActuatorError(
            f"finishing the interrupted deploy of {entry.path.name}; "
            f"rolling back failed too (the next run tries again): {e}"
        ) from None
    if not (entry.open and entry.phase in CUT_SHORT):
        return None
    if entry.forced and not settings.force:
        log.info("the deploy of %s was forced; this run is not: undoing it", entry.path.name)
        undo(settings, entry)
        return None
    return entry


def contract_table() -> str:
    """docs/CONTRACT.md's phase table, from the code."""
    rows = ["| phase | written before | a run that finds it open |", "|---|---|---|"]
    for phase in Phase:
        handler = RECOVERY.get(phase)
        found = (handler.__doc__ or "").split("\n\n")[0] if handler else "nothing: finished"
        rows.append(f"| `{phase.value}` | {BEFORE_STEP[phase]} | {' '.join(found.split())} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(contract_table(), end="")
