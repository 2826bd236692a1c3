"""Signed releases, judged (collector/release.py): DSSE envelopes signed and checked with
real Nix keys from `nix-store --generate-binary-cache-key`, and every rule a release must
pass, one refusal reason each."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from harness import SigningKey

from collector import release
from collector.config import Paths, Settings
from collector.errors import ConfigError, StateError
from collector.release import Floor, Key, Reason, Rejected, SecretKey
from collector.snapshot import Snapshot, Upstream
from collector.state import Links, State
from collector.status import as_json, verdict

NOW = 1_764_838_800
WEB1 = "/nix/store/" + "a" * 32 + "-nixos-system-web1-24.11"
ANY = "/nix/store/" + "b" * 32 + "-nixos-system-any-24.11"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[SigningKey]:
    return [SigningKey.generate(tmp_path_factory.mktemp(f"key{n}"), f"ci-{n}") for n in range(1, 4)]


def public(key: SigningKey) -> Key:
    return Key.parse(key.public)


def secret(key: SigningKey) -> SecretKey:
    return SecretKey.read(str(key.secret_file))


def payload(**fields: Any) -> bytes:
    body = {
        "version": 1,
        "serial": 42,
        "issued": NOW - 60,
        "expires": NOW + 86400,
        "systems": {"web1": WEB1, "*": ANY},
    }
    body.update(fields)
    return json.dumps(body).encode()


def envelope(data: bytes, *signers: SigningKey) -> bytes:
    return json.dumps(release.envelope_json(data, [secret(k) for k in signers])).encode()


def judge(
    body: bytes,
    trusted: list[SigningKey],
    required: int = 1,
    host: str | None = "web1",
    floor: Floor | None = None,
) -> tuple[release.Release, str]:
    accepted, system = release.judge(body, [public(k) for k in trusted], required, host, floor, NOW)
    return accepted, system.path


def refused(body: bytes, trusted: list[SigningKey], **kwargs: Any) -> Rejected:
    with pytest.raises(Rejected) as caught:
        judge(body, trusted, **kwargs)
    return caught.value


# ---- accepted -----------------------------------------------------------------------


def test_a_release_signed_by_a_trusted_nix_key_names_this_hosts_system(
    keys: list[SigningKey],
) -> None:
    accepted, system = judge(envelope(payload(), keys[0]), [keys[0]])
    assert system == WEB1
    assert (accepted.serial, accepted.verified, accepted.signers) == (42, True, ("ci-1",))
    assert accepted.host == "web1"


def test_another_host_takes_the_star_entry(keys: list[SigningKey]) -> None:
    assert judge(envelope(payload(), keys[0]), [keys[0]], host="db1")[1] == ANY


def test_without_trusted_keys_a_release_is_accepted_unverified(keys: list[SigningKey]) -> None:
    accepted, system = judge(envelope(payload(), keys[0]), [])
    assert (system, accepted.verified, accepted.signers) == (WEB1, False, ())
    # ... and an unsigned one too, with the same rules of time and serial.
    assert judge(envelope(payload()), [])[1] == WEB1
    assert refused(envelope(payload(expires=NOW - 1)), []).reason is Reason.EXPIRED


def test_unknown_top_level_fields_are_kept_and_ignored(keys: list[SigningKey]) -> None:
    ramp = {"start": NOW, "duration": 3600}
    accepted, _ = judge(envelope(payload(rollout=ramp), keys[0]), [keys[0]])
    assert accepted.extra == {"rollout": ramp}


def test_two_of_three_with_one_bad_signature(keys: list[SigningKey]) -> None:
    data = payload()
    good = json.loads(envelope(data, keys[0], keys[1], keys[2]))
    good["signatures"][1]["sig"] = base64.b64encode(b"\0" * 64).decode()
    accepted, _ = judge(json.dumps(good).encode(), keys, required=2)
    assert accepted.signers == ("ci-1", "ci-3")
    good["signatures"][2]["sig"] = good["signatures"][1]["sig"]
    rejected = refused(json.dumps(good).encode(), keys, required=2)
    assert rejected.reason is Reason.SIGNATURE
    assert "1 valid signature(s) from trusted keys, 2 required" in str(rejected)


def test_a_keyid_listed_twice_counts_once(keys: list[SigningKey]) -> None:
    body = envelope(payload(), keys[0], keys[0])
    assert len(json.loads(body)["signatures"]) == 2
    assert refused(body, keys, required=2).reason is Reason.SIGNATURE
    assert judge(body, keys, required=1)[0].signers == ("ci-1",)


def test_a_signature_by_an_unknown_key_is_ignored(keys: list[SigningKey]) -> None:
    accepted, _ = judge(envelope(payload(), keys[2], keys[0]), [keys[0]])
    assert accepted.signers == ("ci-1",)


def test_key_rotation_either_trusted_key_is_enough(keys: list[SigningKey]) -> None:
    both = [keys[0], keys[1]]
    assert judge(envelope(payload(), keys[0]), both)[0].signers == ("ci-1",)
    assert judge(envelope(payload(), keys[1]), both)[0].signers == ("ci-2",)
    # The old key removed: what only it signed no longer counts.
    assert refused(envelope(payload(), keys[0]), [keys[1]]).reason is Reason.SIGNATURE


# ---- refused, one rule each ------------------------------------------------------------


def test_a_tampered_payload_byte_is_refused(keys: list[SigningKey]) -> None:
    doc = json.loads(envelope(payload(), keys[0]))
    tampered = payload().replace(b'"serial": 42', b'"serial": 43')
    doc["payload"] = base64.b64encode(tampered).decode()
    assert refused(json.dumps(doc).encode(), [keys[0]]).reason is Reason.SIGNATURE


def test_a_tampered_signature_is_refused(keys: list[SigningKey]) -> None:
    doc = json.loads(envelope(payload(), keys[0]))
    sig = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
    sig[10] ^= 1
    doc["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    assert refused(json.dumps(doc).encode(), [keys[0]]).reason is Reason.SIGNATURE


def test_a_key_with_a_trusted_name_but_other_bytes_is_refused(
    keys: list[SigningKey], tmp_path: Path
) -> None:
    impostor = SigningKey.generate(tmp_path, "ci-1")  # same name as keys[0], other key
    assert refused(envelope(payload(), impostor), [keys[0]]).reason is Reason.SIGNATURE


def test_unsigned_and_bare_paths_are_refused_when_keys_are_trusted(
    keys: list[SigningKey],
) -> None:
    assert refused(envelope(payload()), [keys[0]]).reason is Reason.UNSIGNED
    assert refused((WEB1 + "\n").encode(), [keys[0]]).reason is Reason.UNSIGNED


def test_no_entry_for_this_host(keys: list[SigningKey]) -> None:
    body = envelope(payload(systems={"db1": ANY}), keys[0])
    rejected = refused(body, [keys[0]])
    assert rejected.reason is Reason.NO_ENTRY and "'web1'" in str(rejected)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"expires": NOW}, Reason.EXPIRED),
        ({"issued": NOW + 301}, Reason.FUTURE),
    ],
)
def test_time_rules(keys: list[SigningKey], fields: dict[str, int], reason: Reason) -> None:
    assert refused(envelope(payload(**fields), keys[0]), [keys[0]]).reason is reason


def test_issued_up_to_five_minutes_ahead_is_believed(keys: list[SigningKey]) -> None:
    assert judge(envelope(payload(issued=NOW + 300), keys[0]), [keys[0]])[1] == WEB1


def test_the_floor_refuses_older_serials_and_reused_ones(keys: list[SigningKey]) -> None:
    accepted, _ = judge(envelope(payload(), keys[0]), [keys[0]])
    floor = Floor(accepted.serial, accepted.sha256)
    assert judge(envelope(payload(), keys[0]), [keys[0]], floor=floor)[1] == WEB1
    older = refused(envelope(payload(serial=41), keys[0]), [keys[0]], floor=floor)
    assert older.reason is Reason.REPLAY and "lower than 42" in str(older)
    reused = refused(envelope(payload(systems={"*": WEB1}), keys[0]), [keys[0]], floor=floor)
    assert reused.reason is Reason.SERIAL_REUSED
    # A rollback is a new serial naming the old system.
    assert judge(envelope(payload(serial=43), keys[0]), [keys[0]], floor=floor)[1] == WEB1


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda d: d.update(payloadType="application/json"), "payloadType"),
        (lambda d: d.update(payload="not base64!"), "payload is not base64"),
        (lambda d: d["signatures"][0].update(sig="%%%"), "signature is not base64"),
        (lambda d: d.update(signatures={}), "signatures is not a list"),
        (lambda d: d["signatures"][0].pop("keyid"), "without a keyid"),
    ],
)
def test_a_malformed_envelope_is_refused(keys: list[SigningKey], mutate: Any, words: str) -> None:
    doc = json.loads(envelope(payload(), keys[0]))
    mutate(doc)
    rejected = refused(json.dumps(doc).encode(), [keys[0]])
    assert rejected.reason is Reason.MALFORMED and words in str(rejected)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b'{"version": 1, "serial": 1, "serial": 2}', "duplicate JSON key 'serial'"),
        (payload().replace(b'"serial": 42', b'"serial": NaN'), "NaN is not a JSON number"),
        (payload().replace(b'"serial": 42', b'"serial": Infinity'), "Infinity"),
        (payload(serial=-1), "serial -1 is not a non-negative integer"),
        (payload(serial=4.5), "serial 4.5 is not"),
        (payload(serial="42"), "serial 42 is not"),
        (payload(serial=True), "serial True is not"),
        (payload(issued=1.5), "issued is not"),
        (payload(systems={"web1": "/tmp/evil"}), "outside the Nix store"),
        (payload(systems={}), "systems is not a non-empty object"),
        (payload(version=2), "unknown release version 2"),
        (b"[1, 2]", "not a JSON object"),
        (b"\xff\xfe", "not UTF-8"),
        (b'{"version": 1,' + b" " * 65536 + b"}", "larger than 64 KiB"),
    ],
)
def test_a_malformed_release_is_refused(keys: list[SigningKey], data: bytes, words: str) -> None:
    for trusted in ([keys[0]], []):
        rejected = refused(envelope(data, keys[0]), trusted)
        assert rejected.reason is Reason.MALFORMED and words in str(rejected), rejected


def test_an_envelope_over_64_kib_is_refused(keys: list[SigningKey]) -> None:
    body = envelope(payload(), keys[0])
    big = body[:-1] + b"," + b" " * 65536 + b'"x": 1}'
    rejected = refused(big, [keys[0]])
    assert rejected.reason is Reason.MALFORMED and "envelope is larger" in str(rejected)


def test_the_pae_is_dssev1s() -> None:
    # secure-systems-lab/dsse's protocol text, its example encoding.
    assert release.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


# ---- keys and the floor file ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("no-colon", "expected NAME:BASE64"),
        (":AAAA", "expected NAME:BASE64"),
        ("ci-1:not base64", "not base64"),
        ("ci-1:" + base64.b64encode(b"x" * 31).decode(), "expected 32 bytes, not 31"),
    ],
)
def test_a_bad_trusted_key_is_one_clear_error(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        Key.parse(text)


def test_a_secret_key_is_not_a_trusted_key(keys: list[SigningKey]) -> None:
    with pytest.raises(ConfigError, match="expected 32 bytes, not 64"):
        Key.parse(keys[0].secret_file.read_text())


def test_the_floor_is_stored_atomically_and_a_corrupt_one_is_an_error(tmp_path: Path) -> None:
    paths = Paths(root=str(tmp_path), state_dir=str(tmp_path / "state"))
    assert release.load_floor(paths) is None
    accepted = release.parse_release(payload())
    stored = release.raise_floor(paths, accepted, None, NOW, ran_before=False)
    assert stored == Floor(42, accepted.sha256, None) == release.load_floor(paths)
    assert [p.name for p in (tmp_path / "state").iterdir()] == [release.FLOOR_FILE]
    (tmp_path / "state" / release.FLOOR_FILE).write_text('{"version": 1}')
    with pytest.raises(StateError, match="is corrupt"):
        release.load_floor(paths)


def test_a_floor_started_over_on_a_host_that_ran_before_is_a_reset(tmp_path: Path) -> None:
    paths = Paths(root=str(tmp_path), state_dir=str(tmp_path / "state"))
    accepted = release.parse_release(payload())
    stored = release.raise_floor(paths, accepted, None, NOW, ran_before=True)
    assert stored.reset_at == NOW
    newer = release.parse_release(payload(serial=43))
    assert release.raise_floor(paths, newer, stored, NOW + 5, ran_before=True).reset_at == NOW


def test_the_status_verdict(keys: list[SigningKey]) -> None:
    accepted, _ = judge(envelope(payload(), keys[0]), [keys[0]])
    links = Links(current=None, booted=None, profile=None, upstream=accepted.systems["web1"])
    base = Snapshot(0.0, 0.0, Upstream(release=accepted), links, None, State.UNKNOWN, False)

    def with_upstream(**changes: Any) -> Snapshot:
        return dataclasses.replace(base, upstream=dataclasses.replace(base.upstream, **changes))

    assert verdict(base, NOW) == "verified"
    assert verdict(base, accepted.expires) == "expired"
    assert verdict(with_upstream(rejected="replay"), NOW) == "rejected"
    unverified = dataclasses.replace(accepted, verified=False, signers=())
    assert verdict(with_upstream(release=unverified), NOW) == "unverified"
    assert verdict(with_upstream(release=None), NOW) is None
    shown = as_json(with_upstream(rejected="replay"))["release"]
    assert (shown["verdict"], shown["serial"], shown["signers"]) == ("rejected", 42, ["ci-1"])


def test_trusted_keys_come_from_flags_and_a_file(keys: list[SigningKey], tmp_path: Path) -> None:
    listed = tmp_path / "keys"
    listed.write_text(f"# CI's release keys\n\n  {keys[1].public}\n")
    paths = Paths(root=str(tmp_path), state_dir=str(tmp_path / "state"))
    settings = Settings(paths, trusted_keys=(keys[0].public,), trusted_keys_file=str(listed))
    assert [k.name for k in release.trusted_keys(settings)] == ["ci-1", "ci-2"]
    missing = dataclasses.replace(settings, trusted_keys_file=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match=r"cannot read trusted keys file .*/nothing: No such"):
        release.trusted_keys(missing)
