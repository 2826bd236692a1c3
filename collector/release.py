"""Signed releases: a DSSE envelope whose payload names, for each host, the system it runs,
with a serial that only goes up and an expiry. Parsing is strict (one error line per
rule), a signature counts only from a trusted Nix key, and the highest serial accepted
(the floor) is kept in the state dir so an older release is never accepted again.

cryptography is imported only where a signature is checked or made: a poll that changed
nothing verifies nothing."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .config import Paths, Settings
from .errors import ConfigError, StateError, UpstreamError
from .fsutil import atomic_write_json, read_json
from .store import StorePath

PAYLOAD_TYPE = "application/vnd.nixos-autodeploy.release+json"
MAX_BYTES = 64 * 1024  # the envelope, and the payload inside it
FUTURE_SKEW = 300  # an `issued` this far ahead of the host's clock is still believed
FLOOR_FILE = "release-floor.json"
VERSION = 1


class Reason(StrEnum):
    """Why an answer was refused: the label of nixos_autodeploy_release_rejected."""

    MALFORMED = "malformed"  # not a well-formed envelope or release
    UNSIGNED = "unsigned"  # a bare path or no signature, while keys are trusted
    SIGNATURE = "signature"  # fewer valid signatures from trusted keys than required
    NO_ENTRY = "no_entry"  # nothing for this host, and no "*"
    EXPIRED = "expired"
    FUTURE = "future"  # issued too far in the future
    REPLAY = "replay"  # a serial lower than the floor
    SERIAL_REUSED = "serial_reused"  # the floor's serial with other content


class Rejected(UpstreamError):
    """An answer refused by one rule: nothing is realised, pinned or stored."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"release rejected ({reason.value}): {message}")
        self.reason = reason


@dataclass(frozen=True)
class Key:
    """A Nix public key, `name:base64(32 bytes)` as in trusted-public-keys."""

    name: str
    public: bytes

    @classmethod
    def parse(cls, text: str, what: str = "trusted key") -> Key:
        name, raw = _split_key(text.strip(), 32, what)
        return cls(name, raw)


def _split_key(text: str, size: int, what: str) -> tuple[str, bytes]:
    name, sep, encoded = text.partition(":")
    if not sep or not name or any(c.isspace() for c in name):
        raise ConfigError(f"{what} {text[:40]!r}: expected NAME:BASE64")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what} {name[:40]!r}: the key is not base64") from None
    if len(raw) != size:
        raise ConfigError(f"{what} {name[:40]!r}: expected {size} bytes, not {len(raw)}")
    return name, raw


def trusted_keys(settings: Settings) -> tuple[Key, ...]:
    """--trusted-key and the lines of --trusted-keys-file (blank lines and # comments
    skipped)."""
    texts = list(settings.trusted_keys)
    if settings.trusted_keys_file:
        try:
            with open(settings.trusted_keys_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            what = f"cannot read trusted keys file {settings.trusted_keys_file}"
            raise ConfigError(f"{what}: {e.strerror}") from None
        except UnicodeDecodeError:
            path = settings.trusted_keys_file
            raise ConfigError(f"trusted keys file {path} is not UTF-8") from None
        texts += [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return tuple(Key.parse(text) for text in texts)


def host_name(settings: Settings) -> str | None:
    """--host-name, else the hostname of the system under --root (its /etc/hostname; on
    the running system, the kernel's)."""
    if settings.host_name:
        return settings.host_name
    try:
        with open(settings.paths.under_root("/etc/hostname"), encoding="utf-8") as f:
            name = f.read().strip()
        if name:
            return name
    except (OSError, UnicodeDecodeError):
        pass
    return os.uname().nodename if settings.paths.root == "/" else None


def trust_digest(settings: Settings, keys: Sequence[Key]) -> str:
    """What the answer was judged by: a change of keys, threshold or host name re-judges
    an unchanged answer."""
    named = sorted(f"{k.name}:{k.public.hex()}" for k in keys)
    words = [*named, str(settings.signatures_required), host_name(settings) or ""]
    return hashlib.sha256("\n".join(words).encode()).hexdigest()


# ---- the documents -------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]


@dataclass(frozen=True)
class Release:
    """An accepted release, as the snapshot keeps it. `extra`: its unknown top-level
    fields, kept for those who read them (phased rollouts)."""

    serial: int
    issued: int
    expires: int
    systems: Mapping[str, StorePath]
    sha256: str  # of the payload bytes: what the floor remembers
    verified: bool = False  # signed by enough trusted keys (False: no keys configured)
    signers: tuple[str, ...] = ()
    host: str | None = None  # the host name it was judged for
    extra: Mapping[str, Any] = field(default_factory=dict)

    def system_for(self, name: str | None) -> StorePath | None:
        if name is not None and name in self.systems:
            return self.systems[name]
        return self.systems.get("*")

    def expired(self, now: float) -> bool:
        return self.expires <= now

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "issued": self.issued,
            "expires": self.expires,
            "systems": {k: v.path for k, v in self.systems.items()},
            "sha256": self.sha256,
            "verified": self.verified,
            "signers": list(self.signers),
            "host": self.host,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Release:
        return cls(
            serial=int(d["serial"]),
            issued=int(d["issued"]),
            expires=int(d["expires"]),
            systems={str(k): StorePath.parse(v) for k, v in d["systems"].items()},
            sha256=str(d["sha256"]),
            verified=bool(d["verified"]),
            signers=tuple(str(s) for s in d["signers"]),
            host=d.get("host"),
            extra=dict(d.get("extra") or {}),
        )


def looks_like_envelope(body: bytes) -> bool:
    return body.lstrip()[:1] == b"{"


def _malformed(message: str) -> Rejected:
    return Rejected(Reason.MALFORMED, message)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _malformed(f"duplicate JSON key {key[:40]!r}")
        result[key] = value
    return result


def _no_constant(word: str) -> Any:
    raise _malformed(f"{word} is not a JSON number")


def strict_json(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object of at most MAX_BYTES: no duplicate keys, no NaN or Infinity."""
    if len(data) > MAX_BYTES:
        raise _malformed(f"the {what} is larger than {MAX_BYTES // 1024} KiB")
    try:
        value = json.loads(
            data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except UnicodeDecodeError:
        raise _malformed(f"the {what} is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise _malformed(f"the {what} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise _malformed(f"the {what} is not a JSON object")
    return value


def _base64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise _malformed(f"{what} is not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _malformed(f"{what} is not base64") from None


def parse_envelope(body: bytes) -> Envelope:
    d = strict_json(body, "envelope")
    payload_type = d.get("payloadType")
    if payload_type != PAYLOAD_TYPE:
        raise _malformed(f"payloadType {str(payload_type)[:80]!r} is not {PAYLOAD_TYPE}")
    payload = _base64(d.get("payload"), "payload")
    signatures = d.get("signatures", [])
    if not isinstance(signatures, list):
        raise _malformed("signatures is not a list")
    parsed = []
    for entry in signatures:
        if not isinstance(entry, dict) or not isinstance(entry.get("keyid"), str):
            raise _malformed("a signature without a keyid string")
        parsed.append(Signature(entry["keyid"], _base64(entry.get("sig"), "a signature")))
    return Envelope(payload_type, payload, tuple(parsed))


def _unix_seconds(d: Mapping[str, Any], name: str) -> int:
    value = d.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _malformed(f"{name} is not a non-negative integer of Unix seconds")
    return value


def parse_release(payload: bytes) -> Release:
    d = strict_json(payload, "release")
    if d.get("version") != 1:
        raise _malformed(f"unknown release version {str(d.get('version'))[:20]}")
    serial = d.get("serial")
    if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
        raise _malformed(f"serial {str(serial)[:20]} is not a non-negative integer")
    systems = d.get("systems")
    if not isinstance(systems, dict) or not systems:
        raise _malformed("systems is not a non-empty object of host name to store path")
    paths = {}
    for name, value in systems.items():
        try:
            paths[name] = StorePath.parse(value if isinstance(value, str) else "")
        except ValueError as e:
            raise _malformed(f"the system for {name[:40]!r}: {e}") from None
    known = ("version", "serial", "issued", "expires", "systems")
    return Release(
        serial=serial,
        issued=_unix_seconds(d, "issued"),
        expires=_unix_seconds(d, "expires"),
        systems=paths,
        sha256=hashlib.sha256(payload).hexdigest(),
        extra={k: v for k, v in d.items() if k not in known},
    )


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what each signature signs."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def signers(envelope: Envelope, keys: Sequence[Key]) -> tuple[str, ...]:
    """The trusted keys with a valid signature, each once (a keyid listed twice counts
    once; a key not trusted is ignored)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    message = pae(envelope.payload_type, envelope.payload)
    by_name: dict[str, list[Key]] = {}
    for key in keys:
        by_name.setdefault(key.name, []).append(key)
    valid: list[str] = []
    for signature in envelope.signatures:
        if signature.keyid in valid:
            continue
        for key in by_name.get(signature.keyid, []):
            try:
                Ed25519PublicKey.from_public_bytes(key.public).verify(signature.sig, message)
            except InvalidSignature:
                continue
            valid.append(signature.keyid)
            break
    return tuple(valid)


# ---- judging an answer -----------------------------------------------------------------


@dataclass(frozen=True)
class Floor:
    """The highest serial this host accepted and its payload's digest (release-floor.json).
    reset_at: when a release was accepted with no floor stored although the agent had run
    here before (its upstream link was there): a wiped state dir, made visible."""

    serial: int
    sha256: str
    reset_at: float | None = None


def load_floor(paths: Paths) -> Floor | None:
    source = paths.state(FLOOR_FILE)
    data = read_json(source)
    if data is None:
        return None
    try:
        if data["version"] != VERSION:
            raise StateError(f"release floor {source} has unknown version {data['version']!r}")
        return Floor(int(data["serial"]), str(data["sha256"]), data.get("reset_at"))
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"release floor {source} is corrupt: {e}") from None


def save_floor(paths: Paths, floor: Floor) -> None:
    atomic_write_json(
        paths.state(FLOOR_FILE),
        {
            "version": VERSION,
            "serial": floor.serial,
            "sha256": floor.sha256,
            "reset_at": floor.reset_at,
        },
    )


def judge(
    body: bytes,
    keys: Sequence[Key],
    required: int,
    host: str | None,
    floor: Floor | None,
    now: float,
) -> tuple[Release, StorePath]:
    """The release in `body` and this host's system in it, or Rejected by the first rule
    it breaks. Without keys, signatures are not checked (the release is unverified)."""
    release = dataclasses.replace(signed(body, keys, required), host=host)
    return check(release, host, floor, now)


def signed(body: bytes, keys: Sequence[Key], required: int) -> Release:
    """The release in `body` if well-formed and, with keys, signed by `required` of them."""
    if not looks_like_envelope(body):
        raise Rejected(Reason.UNSIGNED, "a bare store path, while trusted keys are configured")
    envelope = parse_envelope(body)
    release = parse_release(envelope.payload)
    names: tuple[str, ...] = ()
    if keys:
        if not envelope.signatures:
            raise Rejected(Reason.UNSIGNED, f"serial {release.serial} carries no signature")
        names = signers(envelope, keys)
        if len(names) < required:
            raise Rejected(
                Reason.SIGNATURE,
                f"serial {release.serial} has {len(names)} valid signature(s) from trusted keys"
                f", {required} required",
            )
    return dataclasses.replace(release, verified=bool(keys), signers=names)


def check(
    release: Release, host: str | None, floor: Floor | None, now: float
) -> tuple[Release, StorePath]:
    """The rules that do not need the signatures: this host's entry, time, the floor."""
    system = release.system_for(host)
    if system is None:
        raise Rejected(
            Reason.NO_ENTRY, f"serial {release.serial} names no system for {host!r} and no '*'"
        )
    check_time(release, now)
    if floor is not None and release.serial < floor.serial:
        raise Rejected(
            Reason.REPLAY,
            f"serial {release.serial} is lower than {floor.serial}, the highest this host accepted",
        )
    if floor is not None and release.serial == floor.serial and release.sha256 != floor.sha256:
        raise Rejected(
            Reason.SERIAL_REUSED,
            f"serial {release.serial} was accepted before with other content",
        )
    return release, system


def check_time(release: Release, now: float) -> None:
    if release.expired(now):
        raise Rejected(Reason.EXPIRED, f"serial {release.serial} expired at {utc(release.expires)}")
    if release.issued > now + FUTURE_SKEW:
        raise Rejected(
            Reason.FUTURE,
            f"serial {release.serial} is issued in the future, {utc(release.issued)}",
        )


def utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(seconds))


def raise_floor(
    paths: Paths, release: Release, floor: Floor | None, now: float, ran_before: bool
) -> Floor:
    """Store the accepted release as the floor, before anything acts on it. ran_before:
    this host already had an upstream pinned, so a missing floor means a wiped state dir."""
    if floor is not None and floor.serial == release.serial:
        return floor
    reset_at = floor.reset_at if floor is not None else (now if ran_before else None)
    new = Floor(release.serial, release.sha256, reset_at)
    save_floor(paths, new)
    return new


# ---- making one (publish) ---------------------------------------------------------------


@dataclass(frozen=True)
class SecretKey:
    """A Nix secret key, `name:base64(64 bytes)` (seed, then public key) as
    `nix-store --generate-binary-cache-key` writes it."""

    name: str
    seed: bytes

    @classmethod
    def read(cls, path: str) -> SecretKey:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read key file {path}: {e}") from None
        name, raw = _split_key(text, 64, f"key file {path}:")
        return cls(name, raw[:32])


def envelope_json(payload: bytes, keys: Iterable[SecretKey]) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    message = pae(PAYLOAD_TYPE, payload)
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {
                "keyid": key.name,
                "sig": base64.b64encode(
                    Ed25519PrivateKey.from_private_bytes(key.seed).sign(message)
                ).decode(),
            }
            for key in keys
        ],
    }
