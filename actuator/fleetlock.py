"""A FleetLock client (the protocol of Fedora CoreOS's Zincati; airlock is a server): take a
reboot slot before a reboot, release it once the host is back. HTTP goes through
collector.http, the project's one HTTP door."""

from __future__ import annotations

import hashlib
import hmac
import json
import re

from collector import http
from collector.config import Paths, Settings
from collector.errors import AutodeployError, ConfigError, UpstreamError

APPLICATION = "nixos-autodeploy"
# systemd's app-specific machine ID scheme (sd_id128_get_machine_app_specific) with this
# application ID: the first 16 bytes of SHA-256(APPLICATION). So on a host,
# `systemd-id128 machine-id --app-specific=APP_ID` prints the ID it sends.
APP_ID = hashlib.sha256(APPLICATION.encode()).hexdigest()[:32]
PRE_REBOOT = "/v1/pre-reboot"
STEADY_STATE = "/v1/steady-state"
_MACHINE_ID = re.compile(r"[0-9a-f]{32}")


class FleetLockError(AutodeployError):
    """No slot taken or released: the server refused, failed, or could not be reached."""


def host_id(paths: Paths) -> str:
    """This host's FleetLock ID, derived from <root>/etc/machine-id by a keyed one-way hash
    (HMAC-SHA256 keyed with the machine ID over APP_ID, as a version 4 UUID in 32 hex
    digits): stable across reboots, never the machine ID itself."""
    source = paths.under_root("/etc/machine-id")
    try:
        with open(source, encoding="ascii") as f:
            machine_id = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not ASCII"
        raise ConfigError(f"cannot read {source} for the fleet lock ID: {reason}") from None
    if not _MACHINE_ID.fullmatch(machine_id):
        raise ConfigError(f"{source} holds no machine ID (32 lowercase hex digits)")
    digest = bytearray(
        hmac.new(bytes.fromhex(machine_id), bytes.fromhex(APP_ID), hashlib.sha256).digest()[:16]
    )
    digest[6] = (digest[6] & 0x0F) | 0x40  # UUID version 4
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    return digest.hex()


def _endpoint(base: str, path: str) -> str:
    return base.rstrip("/") + path


def _refusal(body: bytes) -> str | None:
    """The protocol's error object `{"kind", "value"}` as one short line, else None."""
    try:
        error = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(error, dict):
        return None
    kind, value = error.get("kind"), error.get("value")
    if not (isinstance(kind, str) and kind and isinstance(value, str) and value):
        return None
    line = " ".join(value.split())[:200]
    return f"{''.join(c for c in line if c.isprintable())} ({kind[:60]})"


def _call(settings: Settings, path: str, ident: str, base: str, group: str) -> None:
    url = _endpoint(base, path)
    body = {"client_params": {"id": ident, "group": group}}
    try:
        answer = http.post_json(settings, url, body, {"fleet-lock-protocol": "true"})
    except UpstreamError as e:
        raise FleetLockError(str(e)) from None
    if answer.status == 200:
        return
    shown = http.shown(url)
    refusal = _refusal(answer.body)
    if refusal is not None:
        raise FleetLockError(f"{shown} answered HTTP {answer.status}: {refusal}")
    raise FleetLockError(f"{shown} answered HTTP {answer.status} without a FleetLock error object")


def lock(settings: Settings, ident: str) -> None:
    """RecursiveLock: take (or keep) a reboot slot. FleetLockError unless granted."""
    assert settings.fleet_lock_url is not None
    _call(settings, PRE_REBOOT, ident, settings.fleet_lock_url, settings.fleet_lock_group)


def unlock(
    settings: Settings, ident: str, base: str | None = None, group: str | None = None
) -> None:
    """UnlockIfHeld: release the slot if this host holds one; idempotent. base and group:
    where the slot was taken (default: the settings')."""
    base = base or settings.fleet_lock_url
    assert base is not None
    _call(settings, STEADY_STATE, ident, base, group or settings.fleet_lock_group)
