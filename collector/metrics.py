"""The node_exporter textfile: one file, a private registry, no timestamps."""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .closure import Changes
from .reboot import WaitReason, pending_reason
from .records import Deploys
from .release import Reason
from .snapshot import Snapshot
from .space import Room, boot_refused
from .space import refused as refused_store
from .state import HandChange, State
from .store import name_of

P = "nixos_autodeploy_"


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(P + name, doc, value=value)


class _SnapshotCollector(Collector):
    def __init__(
        self, snapshot: Snapshot, deploys: Deploys, changes: Changes, room: Room | None
    ) -> None:
        self.snapshot = snapshot
        self.deploys = deploys
        self.changes = changes
        self.room = room

    def collect(self) -> Iterable[Metric]:
        s = self.snapshot
        # The original tool's three series, names and labels unchanged.
        yield _gauge("dirty", "1 when someone deployed by hand and the agent stands back", s.dirty)
        if self.room is not None:
            yield from self._room(self.room)
        yield _gauge(
            "reboot_required",
            "1 when booted and current differ in kernel, initrd or modules, or a boot waits",
            s.reboot_required,
        )
        hand = GaugeMetricFamily(
            P + "dirty_reason", "1 for what someone did by hand (while dirty)", labels=["reason"]
        )
        for change in HandChange:
            hand.add_metric([change.value], change is s.dirty_reason)
        yield hand
        info = GaugeMetricFamily(
            P + "info",
            "The systems this host knows, by store path basename",
            labels=[
                "current_generation",
                "booted_generation",
                "deployed_generation",
                "upstream_generation",
            ],
        )
        info.add_metric(
            [
                name_of(s.links.current),
                name_of(s.links.booted),
                name_of(s.deployed.path if s.deployed else None),
                name_of(s.links.upstream),
            ],
            1,
        )
        yield info
        yield _gauge(
            "rollout_halted",
            "1 when the halt query (or no answer to it) held this host's last new deploy back",
            bool(s.rollout and s.rollout.halted),
        )
        if s.rollout is not None and s.rollout.wariness is not None:
            yield _gauge(
                "rollout_wariness",
                "This host's place in the release's wave, 0 first, 1 last",
                s.rollout.wariness,
            )
        if s.rollout is not None and s.rollout.turn_at is not None:
            yield _gauge(
                "rollout_turn_timestamp_seconds",
                "When this host's turn in the release's wave comes (or came)",
                s.rollout.turn_at,
            )
        yield _gauge(
            "update_available",
            "1 when upstream differs from what this agent deployed",
            s.state is State.UPDATE_AVAILABLE,
        )
        state = GaugeMetricFamily(P + "state", "1 for the host's current state", labels=["state"])
        for member in State:
            state.add_metric([member.value], member is s.state)
        yield state
        yield _gauge(
            "upstream_fetch_success",
            "1 when the last fetch and realisation of upstream succeeded",
            # A refused release was fetched well: nixos_autodeploy_release_rejected says it.
            s.upstream.error is None or s.upstream.rejected is not None,
        )
        yield _gauge(
            "last_collect_timestamp_seconds", "When the collector last ran", s.collected_at
        )
        if s.upstream.changed_at is not None:
            yield _gauge(
                "last_upstream_change_timestamp_seconds",
                "When the collector first saw the current upstream path",
                s.upstream.changed_at,
            )
        yield _gauge(
            "collect_duration_seconds", "How long the last collect took", s.duration_seconds
        )
        last = self.deploys.last
        if last is not None:
            yield _gauge(
                "last_deploy_timestamp_seconds", "When the actuator last deployed", last.at
            )
            yield _gauge("last_deploy_success", "1 when the last deploy succeeded", last.ok)
        waiting = pending_reason(s.reboot_required, s.reboot)
        reasons = GaugeMetricFamily(
            P + "reboot_pending_reason",
            "1 for why a required reboot has not happened yet",
            labels=["reason"],
        )
        for reason in WaitReason:
            reasons.add_metric([reason.value], reason is waiting)
        yield reasons
        if waiting in (WaitReason.WINDOW, WaitReason.FLEET_LOCK) and s.reboot.waiting:
            yield _gauge(
                "reboot_waiting_since_timestamp_seconds",
                "Since when the required reboot waits for a window or a reboot slot",
                s.reboot.waiting.since,
            )
        yield _gauge(
            "fleet_lock_held",
            "1 while this host holds a FleetLock reboot slot",
            s.reboot.slot is not None,
        )
        totals = CounterMetricFamily(
            P + "deployments", "Deploys by the actuator, by result", labels=["result"]
        )
        for result in ("success", "failure"):
            totals.add_metric([result], self.deploys.totals.get(result, 0))
        yield totals
        yield from self._changes()
        yield from self._health()
        yield from self._release()

    def _release(self) -> Iterable[Metric]:
        """The accepted release (none for a bare store path) and why the last answer was
        refused: one series per reason, all 0 while the answer is accepted."""
        upstream = self.snapshot.upstream
        accepted = upstream.release
        if accepted is not None:
            yield _gauge("release_serial", "Serial of the accepted release", accepted.serial)
            yield _gauge(
                "release_expiry_timestamp_seconds",
                "When the accepted release expires",
                accepted.expires,
            )
            yield _gauge(
                "release_verified",
                "1 when the accepted release is signed by enough trusted keys, 0 unverified",
                accepted.verified,
            )
        rejected = GaugeMetricFamily(
            P + "release_rejected",
            "1 for the rule the last upstream answer broke (the last accepted one stays)",
            labels=["reason"],
        )
        for reason in Reason:
            rejected.add_metric([reason.value], reason.value == upstream.rejected)
        yield rejected
        if upstream.floor_reset_at is not None:
            yield _gauge(
                "release_floor_reset_timestamp_seconds",
                "When the serial floor started over on a host that ran before (wiped state)",
                upstream.floor_reset_at,
            )

    def _room(self, room: Room) -> Iterable[Metric]:
        yield _gauge(
            "store_free_bytes", "free bytes on the filesystem of the Nix store", room.store_free
        )
        if room.boot_free is not None:
            yield _gauge("boot_free_bytes", "free bytes on the boot filesystem", room.boot_free)
        yield _gauge("generations", "system profile generations", room.generations)
        refused = GaugeMetricFamily(
            P + "space_refused",
            "1 when the last realise (store) or deploy (boot) was refused for want of space",
            labels=["filesystem"],
        )
        last = self.deploys.last
        boot = last is not None and not last.ok and boot_refused(last.message)
        refused.add_metric(["store"], refused_store(self.snapshot.upstream.error))
        refused.add_metric(["boot"], boot)
        yield refused

    def _changes(self) -> Iterable[Metric]:
        """Only for a difference that was computed: none while it is not known."""
        diff = self.changes.upstream
        if diff is None or diff.error is not None:
            return
        pending = GaugeMetricFamily(
            P + "pending_changes",
            "Packages that deploying upstream changes, by kind (0 when current is upstream)",
            labels=["kind"],
        )
        for kind, count in diff.counts().items():
            pending.add_metric([kind.value], count)
        yield pending
        sizes = GaugeMetricFamily(
            P + "closure_size_bytes", "Closure size of a system", labels=["system"]
        )
        sizes.add_metric(["current"], diff.size_before)
        sizes.add_metric(["upstream"], diff.size_after)
        yield sizes

    def _health(self) -> Iterable[Metric]:
        health, rollback = self.deploys.health, self.deploys.last_rollback
        if health is not None:
            yield _gauge(
                "last_health_check_success",
                "1 when the last health checks after a switch or trial boot all passed",
                health.ok,
            )
            yield _gauge(
                "last_health_check_timestamp_seconds",
                "When the actuator last ran the health checks",
                health.at,
            )
        yield CounterMetricFamily(
            P + "rollbacks",
            "Times the actuator brought back the system that ran before a failed one",
            value=self.deploys.rollbacks,
        )
        if rollback is not None:
            yield _gauge(
                "last_rollback_success",
                "1 when the last rollback brought the previous system back",
                rollback.ok,
            )
        if rollback is not None and rollback.serial is not None:
            yield _gauge(
                "last_rollback_serial",
                "Serial of the release whose system the last rollback came back from",
                rollback.serial,
            )


def write(
    path: str,
    snapshot: Snapshot,
    deploys: Deploys,
    changes: Changes | None = None,
    room: Room | None = None,
) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot, deploys, changes or Changes(), room))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_to_textfile(path, registry)
    # node_exporter's node_textfile_mtime_seconds feeds the stale-collector alert too: the
    # file's time is the collect's, whoever (the actuator) rewrote it since.
    os.utime(path, (snapshot.collected_at, snapshot.collected_at))
