"""CI's side of signed releases: `publish` signs a release with Nix secret keys, `verify`
checks one as a host would (without a host's serial floor) and says what it names."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import release
from .errors import ConfigError, StateError
from .fsutil import atomic_write
from .store import StorePath


def systems(default: str | None, hosts: Sequence[str]) -> dict[str, str]:
    """--system (for "*") and the --host NAME=PATH entries, each a store path."""
    named: dict[str, str] = {}
    for entry in hosts:
        name, sep, path = entry.partition("=")
        if not sep or not name or name == "*":
            raise ConfigError(f"--host {entry[:80]!r}: expected NAME=/nix/store/...")
        if name in named:
            raise ConfigError(f"--host {name[:40]!r} is given twice")
        named[name] = path
    if default is not None:
        named["*"] = default
    if not named:
        raise ConfigError("a release names at least one system: give --system or --host")
    for name, path in named.items():
        try:
            StorePath.parse(path)
        except ValueError as e:
            raise ConfigError(f"the system for {name!r}: {e}") from None
    return named


def next_serial(serial: int | None, counter: str | None) -> int:
    """--serial, or the one after --serial-from's (a missing file counts from 0), written
    back before the release is: a serial skipped is harmless, one used twice is refused."""
    if (serial is None) == (counter is None):
        raise ConfigError("give one of --serial N and --serial-from FILE")
    if serial is not None:
        return serial
    assert counter is not None
    try:
        with open(counter, encoding="utf-8") as f:
            text = f.read().strip()
    except FileNotFoundError:
        text = "0"
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read serial file {counter}: {e}") from None
    if not text.isdigit() or len(text) > 18:
        raise ConfigError(f"serial file {counter} does not hold a non-negative integer")
    value = int(text) + 1
    atomic_write(counter, f"{value}\n")
    return value


def publish(
    key_files: Sequence[str],
    serial: int | None,
    counter: str | None,
    expires_in: float,
    rollout_start: int | None,
    rollout_duration: float | None,
    default: str | None,
    hosts: Sequence[str],
    output: str | None,
) -> int:
    if not key_files:
        raise ConfigError("publish signs with at least one --key-file")
    if rollout_start is not None and rollout_duration is None:
        raise ConfigError("--rollout-start needs --rollout-duration")
    keys = [release.SecretKey.read(path) for path in key_files]
    named = systems(default, hosts)
    number = next_serial(serial, counter)
    now = int(time.time())
    document: dict[str, Any] = {
        "version": release.VERSION,
        "serial": number,
        "issued": now,
        "expires": now + int(expires_in),
        "systems": named,
    }
    if rollout_duration is not None:
        start = now if rollout_start is None else rollout_start
        document["rollout"] = {"start": start, "duration": int(rollout_duration)}
    payload = json.dumps(document, sort_keys=True).encode()
    text = json.dumps(release.envelope_json(payload, keys), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        atomic_write(os.path.abspath(output), text)
    signers = ", ".join(key.name for key in keys)
    print(f"signed release serial {number} by {signers}", file=sys.stderr)
    return 0


def verify(path: str | None, keys: Sequence[release.Key], required: int, host: str | None) -> int:
    """Exit 0 and what the release names, or a Rejected (one error line, exit 1)."""
    if path is None:
        raise ConfigError("verify takes the release FILE to check")
    if not keys:
        raise ConfigError(
            "verify needs the trusted keys: give --trusted-key or --trusted-keys-file"
        )
    try:
        with open(path, "rb") as f:
            body = f.read(release.MAX_BYTES + 1)
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from None
    accepted = release.signed(body, keys, required)
    now = time.time()
    if host is not None:
        accepted = release.check(accepted, host, None, now)[0]
    else:
        release.check_time(accepted, now)
    print(
        f"serial {accepted.serial}: issued {release.utc(accepted.issued)}, "
        f"expires {release.utc(accepted.expires)}, signed by {', '.join(accepted.signers)}"
    )
    for name, system in sorted(accepted.systems.items()):
        if host is None or name == host or (name == "*" and host not in accepted.systems):
            print(f"{name}: {system}")
    return 0
