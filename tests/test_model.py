"""The safety layer as an operator relies on it, as a stateful property test: hypothesis
drives a sandbox host through random sequences of what happens to a fleet host (CI
publishes, the collector runs, the agent deploys in switch or boot mode, the new system's
checks pass or fail, the agent is killed at a journal phase, at a Nix call or while its
activation runs on, someone runs nixos-rebuild switch, boot or test by hand, the machine
reboots into its boot loader's default, an operator forces a deploy) and checks against
the host itself: no traceback, one error line when a run fails; never dirty without a hand
deploy; a hand deploy's current system, profile and boot default never changed without
--force; the journal closed after every deploy not killed; a failed system neither left
running nor the next boot nor retried before upstream changes; a recorded success names
the running system, never one whose checks fail; with no hand deploy pending, the boot
default is the profile; a collect changes no link.

Real Nix, a signed binary cache on loopback, a sandbox root; one small pool of systems is
built once for the module and each example starts from a freshly installed root. Bounded
by the environment: MODEL_EXAMPLES (sequences) and MODEL_STEPS (steps per sequence). CI runs
the same sequences every time (hypothesis derandomized), so a red run is reproducible and
never a dice roll; MODEL_RANDOM=1 explores new sequences (do that when changing the safety
layer, with more examples).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import hypothesis
import pytest
from harness import (
    AgentResult,
    Host,
    NixBuilder,
    SigningKey,
    System,
    SystemSpec,
    TestServer,
    resolve_link,
    run_checked,
)
from harness.deploys import deploy, journal, kill_agent_at_nix_call, record
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from actuator.transaction import FINISHED, STOP_AT, Phase

pytestmark = pytest.mark.nix

NAMES = ("a", "b", "c", "d")
EXAMPLES = int(os.environ.get("MODEL_EXAMPLES", "40"))
STEPS = int(os.environ.get("MODEL_STEPS", "40"))
# MODEL_SHRINK=0: report the first failing sequence as found (shrinking re-runs real Nix).
SHRINK = os.environ.get("MODEL_SHRINK", "1") != "0"
RANDOM = os.environ.get("MODEL_RANDOM", "0") == "1"
# The phases a switch deploy journals (a trial's own are not modelled: no reboot mode).
KILL_PHASES = (
    Phase.PLANNED,
    Phase.PROFILE_SET,
    Phase.ACTIVATING,
    Phase.ACTIVATED,
    Phase.CHECKING,
    Phase.DONE,
    Phase.FAILED,
    Phase.ROLLING_BACK,
    Phase.ROLLED_BACK,
)
FINISHED_PHASES = {p.value for p in FINISHED}
# switch: checked; boot (no reboot mode): the next boot runs it, unchecked.
MODES = st.sampled_from(("switch", "boot"))
UPSTREAM = st.none() | st.sampled_from(NAMES)  # what CI publishes first, if anything
FORCED = st.sampled_from((False, False, False, True))  # --force now and then
AFTER_ACTIVATION = "after its activation"
Kill = Phase | tuple[int, bool] | str
KILLS: st.SearchStrategy[Kill] = st.one_of(
    st.sampled_from(KILL_PHASES),
    st.tuples(st.integers(1, 4), st.booleans()),  # the n-th Nix call, before/after it acts
    st.just(AFTER_ACTIVATION),
)
RUNS: list[tuple[int, int]] = []  # per example: rules run, agent runs


@dataclass(frozen=True)
class Pool:
    """The systems every example shares, built for one sandbox root path."""

    tmp: Path
    builder: NixBuilder
    server: TestServer
    systems: dict[str, System]


@pytest.fixture(scope="module")
def pool(
    tmp_path_factory: pytest.TempPathFactory, nix_build_store: Path, signing_key: SigningKey
) -> Iterator[Pool]:
    tmp = tmp_path_factory.mktemp("model")
    (tmp / "cache").mkdir()
    server = TestServer(cache_dir=tmp / "cache")
    server.start()
    try:
        builder = NixBuilder(
            build_store=nix_build_store,
            cache_dir=tmp / "cache",
            key=signing_key,
            root=tmp / "root",  # baked into each system's switch-to-configuration
            salt=uuid.uuid4().hex[:12],
            cache_home=tmp / "xdg-cache",
        )
        systems = builder.build(*(SystemSpec(name) for name in NAMES))
        yield Pool(tmp, builder, server, systems)
    finally:
        server.stop()


def fresh_host(pool: Pool) -> Host:
    """A host freshly installed with the pool's first system (the root path stays: the
    systems' activations write to it)."""
    for sub in ("root", "recorded", "home", "textfile"):
        shutil.rmtree(pool.tmp / sub, ignore_errors=True)
    for stale in ("bad-systems", "nix-calls"):
        (pool.tmp / stale).unlink(missing_ok=True)
    return Host(tmp=pool.tmp, builder=pool.builder, server=pool.server)


def profile_link_target(host: Host) -> str | None:
    link = host.profile_link
    return os.readlink(link) if link.is_symlink() else None


def read_state(host: Host, name: str) -> Any:
    path = host.state_dir / name
    return json.loads(path.read_text()) if path.exists() else None


@contextmanager
def killed_at_nix_call(host: Host, n: int, after: bool) -> Iterator[None]:
    """The agent killed (kill -9) at its n-th nix-store or nix-env call that changes
    something, before it acts or once it has; the wrappers are put back afterwards."""
    (host.tmp / "nix-calls").unlink(missing_ok=True)
    kept = {tool: (host.bin_dir / tool).read_text() for tool in ("nix-store", "nix-env")}
    kill_agent_at_nix_call(host, n, after=after)
    try:
        yield
    finally:
        for tool, text in kept.items():
            (host.bin_dir / tool).write_text(text)


class HostModel(RuleBasedStateMachine):
    """The model: what the operator did by hand (the links they own), which systems are
    bad (their checks fail), what the agent has seen of upstream."""

    pool: ClassVar[Pool]

    def __init__(self) -> None:
        super().__init__()
        self.host = fresh_host(self.pool)
        self.systems = self.pool.systems
        self.bad: set[str] = set()  # store paths whose health checks fail
        # Links the operator set by hand and that nobody but --force may change: name ->
        # value ("profile": the generation link, naming path and generation).
        self.hand: dict[str, str] = {}
        # A hand deploy may still be in place (dirty allowed) though no link is protected
        # any more: a --force run that did not finish.
        self.hand_left = False
        self.epoch = 0  # upstream changes the agent has seen
        self.seen_upstream: str | None = None
        # failed path -> (when, by deploys.json, and the upstream epoch of its failure)
        self.failed_at: dict[str, tuple[float, int]] = {}
        self.agent_runs = 0  # agent runs
        self.step_count = 0
        host = self.host
        first = self.systems[NAMES[0]]
        host.install(first)
        host.publish(first)
        self.check_file = host.tmp / "bad-systems"
        self.check_file.write_text("")
        result = self.run_deploy()  # tracks what runs: the agent's record and generation
        assert result.returncode == 0, result
        assert record(host)["path"] == first.path

    # ---- the agent --------------------------------------------------------------------

    def deploy_args(self, fresh: bool) -> list[str]:
        check = f'! grep -qxF "$(readlink {self.host.current_link})" {self.check_file}'
        args = ["--health-check", check, "--health-timeout", "1"]
        return args + (["--max-snapshot-age", "0"] if fresh else [])

    def run_deploy(
        self, *extra: str, fresh: bool = False, env: dict[str, str] | None = None
    ) -> AgentResult:
        return deploy(self.host, *self.deploy_args(fresh), *extra, env=env)

    def links(self) -> dict[str, str | None]:
        host = self.host
        return {
            "current": host.current(),
            "profile": profile_link_target(host),
            "default": host.boot_default(),
        }

    def after_agent(
        self,
        result: AgentResult,
        *,
        force: bool = False,
        killed_ok: bool = False,
        deploys: bool = True,
    ) -> None:
        """What every agent run must leave, and what the model learns from it; a deploy
        run not killed also finishes what it found (a collect leaves that to the next)."""
        self.agent_runs += 1
        host = self.host
        assert "Traceback" not in result.stderr, f"a traceback\n{result}"
        killed = result.returncode == -signal.SIGKILL
        assert killed_ok or not killed, f"killed\n{result}"
        if not killed:
            assert result.returncode in (0, 1), f"exit code\n{result}"
            if result.returncode == 1:
                errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
                assert len(errors) == 1, f"not one error line\n{result}"
        self.learn_upstream()
        if force and result.returncode == 0:
            self.hand.clear()
            self.hand_left = False
        elif force:
            self.keep_what_the_forced_run_left()
        self.hand_not_overridden(result)
        self.learn_failures()
        if killed or not deploys:
            return
        self.learn_adoption()
        entry = journal(host)
        assert entry is None or entry["phase"] in FINISHED_PHASES, f"open: {entry}\n{result}"
        failed = set(self.failed_at)
        current, default = host.current(), host.boot_default()
        if current in failed:
            # The operator's, or left running by a (forced) boot-mode deploy until its boot.
            deployed = record(host) or {}
            waits = deployed.get("mode") == "boot" and deployed.get("previous") == current
            waits = waits and default == deployed["path"]
            assert self.hand.get("current") == current or waits, f"a failed system runs\n{result}"
        if default in failed:
            assert self.hand.get("default") == default, f"a failed system boots next\n{result}"
        if "profile" not in self.hand and "default" not in self.hand:
            assert default == host.profile(), f"boot default is not the profile\n{result}"

    def learn_adoption(self) -> None:
        """A hand deploy of upstream itself, running, is tracked: the agent's from then on
        (its record names it and the profile generation; nothing else is adopted)."""
        host, deployed = self.host, record(self.host)
        generation = profile_link_target(host)
        if deployed is None or generation is None or not deployed["complete"]:
            return
        ours = f"system-{deployed.get('generation')}-link" == generation
        runs = deployed["path"] == host.current() == host.profile() == self.seen_upstream
        if ours and runs:
            self.hand.clear()
            self.hand_left = False

    def keep_what_the_forced_run_left(self) -> None:
        """A --force run that failed (and went back) or was killed: the hand's links it
        left as they were (the profile: on the same system) stay the operator's."""
        now = self.links()
        for name, value in list(self.hand.items()):
            if self.resolved(name, now[name]) == self.resolved(name, value):
                self.hand[name] = now[name] or value
            else:
                del self.hand[name]
                self.hand_left = True

    def resolved(self, name: str, value: str | None) -> str | None:
        if name != "profile" or value is None:
            return value
        return resolve_link(self.host.profile_link.parent / value)

    def learn_upstream(self) -> None:
        snapshot = read_state(self.host, "snapshot.json")
        seen = snapshot["upstream"]["path"] if snapshot else None
        if seen is not None and seen != self.seen_upstream:
            self.seen_upstream = seen
            self.epoch += 1

    def learn_failures(self) -> None:
        failed = (read_state(self.host, "deploys.json") or {}).get("failed", {})
        known = self.failed_at
        self.failed_at = {
            path: known[path] if path in known and known[path][0] == at else (at, self.epoch)
            for path, at in failed.items()
        }

    def hand_not_overridden(self, result: AgentResult) -> None:
        now = self.links()
        for name, value in self.hand.items():
            assert now[name] == value, f"the hand deploy's {name} was changed\n{result}"

    def deploying(self, *extra: str, fresh: bool, force: bool = False) -> AgentResult:
        """A deploy run to its end, with the retry and success checks around it."""
        host = self.host
        before = len(host.activations())
        epoch = self.epoch
        blocked = {p for p, (_, failed) in self.failed_at.items() if failed == epoch}
        totals = (read_state(host, "deploys.json") or {}).get("totals", {})
        result = self.run_deploy(*extra, fresh=fresh)
        self.after_agent(result, force=force)
        if not force and self.epoch == epoch:  # its own collect saw no upstream change
            retried = [p for _, p in host.activations()[before:] if p in blocked]
            assert not retried, f"a failed system retried before upstream changed\n{result}"
        deploys = read_state(host, "deploys.json") or {}
        last = deploys.get("last") or {}
        succeeded = deploys.get("totals", {}).get("success", 0) > totals.get("success", 0)
        # This run's last word a success, of a checked deploy (a boot-mode one without a
        # reboot mode is not checked, and runs only after the next boot).
        if succeeded and last["result"] == "success" and last["mode"] == "switch":
            assert last["path"] == host.current(), f"a success not running\n{result}"
            assert last["path"] not in self.bad, f"a bad system recorded healthy\n{result}"
        return result

    # ---- rules ------------------------------------------------------------------------

    @initialize(bad=st.sets(st.sampled_from(NAMES[1:]), max_size=2))
    def choose_bad(self, bad: set[str]) -> None:
        self.bad = {self.systems[name].path for name in bad}
        self.check_file.write_text("".join(f"{path}\n" for path in sorted(self.bad)))

    @rule(name=st.sampled_from(NAMES))
    def publish(self, name: str) -> None:
        self.host.publish(self.systems[name])

    @rule()
    def collect(self) -> None:
        before = self.links()
        result = self.host.collect()
        self.after_agent(result, deploys=False)
        assert self.links() == before, "collect changed the system"
        snapshot = self.host.snapshot()
        if snapshot["state"] == "dirty":
            assert self.hand or self.hand_left, f"dirty without a hand deploy\n{snapshot}"

    def publish_first(self, upstream: str | None) -> None:
        if upstream is not None:
            self.host.publish(self.systems[upstream])

    @rule(upstream=UPSTREAM, fresh=st.booleans(), mode=MODES, forced=FORCED)
    def deploy(self, upstream: str | None, fresh: bool, mode: str, forced: bool) -> None:
        """CI may publish first; then a deploy runs to its end."""
        self.publish_first(upstream)
        extra = ["--switch-mode", mode, *(["--force"] if forced else [])]
        result = self.deploying(*extra, fresh=fresh, force=forced)
        state = self.host.snapshot()["state"]
        if state == "dirty":
            assert self.hand or self.hand_left, f"dirty without a hand deploy\n{result}"

    @rule(upstream=UPSTREAM, kill=KILLS, fresh=st.booleans(), mode=MODES, forced=FORCED)
    def deploy_killed(
        self, upstream: str | None, kill: Kill, fresh: bool, mode: str, forced: bool
    ) -> None:
        """CI may publish first; then a deploy is killed (kill -9): right after it journals
        a phase; at its n-th Nix call, before or after the call acts; or while its
        activation runs in a unit of its own, which goes on and switches the system in
        (as under systemd-run)."""
        self.publish_first(upstream)
        extra = ["--switch-mode", mode, *(["--force"] if forced else [])]
        if isinstance(kill, Phase):
            result = self.run_deploy(*extra, fresh=fresh, env={STOP_AT: kill.value})
        elif isinstance(kill, tuple):
            n, after = kill
            with killed_at_nix_call(self.host, n, after):
                result = self.run_deploy(*extra, fresh=fresh)
        else:
            result = self.run_deploy(*extra, fresh=fresh, env={STOP_AT: Phase.ACTIVATING.value})
            if result.returncode == -signal.SIGKILL:
                entry = journal(self.host)  # its activation goes on: the agent's, not a hand's
                activation = f"{entry['path']}/bin/switch-to-configuration"
                run_checked([activation, entry["activation"]], env=self.host.agent_env())
        self.after_agent(result, force=forced, killed_ok=True)

    @rule(name=st.sampled_from(NAMES), action=st.sampled_from(("switch", "boot", "test")))
    def by_hand(self, name: str, action: str) -> None:
        """nixos-rebuild ACTION: the links it moved are the operator's."""
        before = self.links()
        deployed = record(self.host)
        entry = journal(self.host)
        self.host.deploy_by_hand(self.systems[name], action)
        now = self.links()
        ours = deployed["path"] if deployed else None
        # A deploy cut short in its activation, which may have gone on without the agent: a
        # hand `test` of what ran before it is indistinguishable from an activation that
        # never happened (the profile and current alike), and the agent goes on with it.
        went_on = entry is not None and entry["phase"] == Phase.ACTIVATING.value
        back = went_on and action == "test" and now["current"] == entry["before"]["current"]
        for link, value in now.items():
            if value == before[link]:
                continue
            target = self.host.profile() if link == "profile" else value
            if target == ours or (link == "current" and back):
                self.hand.pop(link, None)  # back on what the agent deployed
            else:
                assert value is not None
                self.hand[link] = value

    @rule()
    def reboot(self) -> None:
        """The machine reboots into the boot loader's default."""
        self.host.reboot()
        if "default" in self.hand:
            self.hand["current"] = self.hand["default"]
        else:
            self.hand.pop("current", None)  # a hand `test` does not survive a reboot

    def teardown(self) -> None:
        RUNS.append((self.step_count, self.agent_runs))

    @invariant()
    def hand_links_hold(self) -> None:
        self.step_count += 1
        now = self.links()
        for name, value in self.hand.items():
            assert now[name] == value, f"the hand deploy's {name} was changed"


def test_the_safety_layer_keeps_its_promises(pool: Pool) -> None:
    HostModel.pool = pool
    run_state_machine_as_test(
        HostModel,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            derandomize=not RANDOM,
            suppress_health_check=list(HealthCheck),
            phases=list(hypothesis.Phase) if SHRINK else [hypothesis.Phase.generate],
        ),
    )
    rules, runs = sum(r for r, _ in RUNS), sum(n for _, n in RUNS)
    print(f"model: {len(RUNS)} sequences, {rules} steps, {runs} agent runs")
