"""Signed releases end to end: CI's `publish` and `verify` with keys from
`nix-store --generate-binary-cache-key`, the collector (one-shot and resident) judging
what the upstream URL answers against a real signed binary cache, the serial floor in
the state dir, offline bundles, and the actuator deploying only what was accepted."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Host, SigningKey, SystemSpec, error_lines, metric, no_traceback
from harness.deploys import deploy, history
from harness.resident import RARELY, resident

from collector import release

pytestmark = pytest.mark.nix

REASONS = [reason.value for reason in release.Reason]


@pytest.fixture
def keys(tmp_path: Path) -> list[SigningKey]:
    """Three release keys of CI's, none of them the binary cache's."""
    found = []
    for n in range(1, 4):
        directory = tmp_path / f"release-key-{n}"
        directory.mkdir()
        found.append(SigningKey.generate(directory, f"release-{n}"))
    return found


def trusting(*keys: SigningKey, required: int = 1) -> list[str]:
    words = [w for key in keys for w in ("--trusted-key", key.public)]
    return [*words, "--signatures-required", str(required), "--host-name", "web1"]


def publish(host: Host, *args: str) -> bytes:
    """`nixos-autodeploy publish ARGS -o FILE`, served at the upstream URL."""
    out = host.tmp / "release.json"
    result = host.run_agent("publish", *args, "-o", str(out), root=False)
    assert result.returncode == 0, result
    body = out.read_bytes()
    host.server.publish_body(body)
    return body


def signed(*keys: SigningKey, **fields: Any) -> bytes:
    """A release made by hand, for what `publish` never writes (expired, from the future,
    without this host): signed with keys' secret halves."""
    now = int(time.time())
    payload = {"version": 1, "serial": 1, "issued": now, "expires": now + 86400}
    payload.update(fields)
    data = json.dumps(payload).encode()
    secrets = [release.SecretKey.read(str(key.secret_file)) for key in keys]
    return json.dumps(release.envelope_json(data, secrets)).encode()


def rejected_reasons(host: Host) -> list[str]:
    text = host.metrics()
    return [r for r in REASONS if metric(text, "nixos_autodeploy_release_rejected", reason=r)]


def unchanged_files(host: Host) -> dict[str, bytes | str | None]:
    """What a refused answer must leave alone: the fetch record, the floor, the pin."""
    state = {
        name: (host.state_dir / name).read_bytes()
        for name in ("upstream.json", release.FLOOR_FILE)
        if (host.state_dir / name).exists()
    }
    return {**state, "upstream-system": host.upstream()}


# ---- the round trip --------------------------------------------------------------------


def test_publish_collect_deploy_round_trip(host: Host, keys: list[SigningKey]) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new"), SystemSpec("db"))
    old, new, db = systems["old"], systems["new"], systems["db"]
    host.install(old)
    host.write_deployed(old)
    counter = host.tmp / "serial"
    counter.write_text("41\n")
    publish(
        host,
        *("--key-file", str(keys[0].secret_file), "--serial-from", str(counter)),
        *("--system", new.path, "--host", f"db1={db.path}", "--expires-in", "2d"),
    )
    assert counter.read_text() == "42\n"
    payload = json.loads(release.parse_envelope((host.tmp / "release.json").read_bytes()).payload)
    assert "rollout" not in payload  # no wave asked for: every host at once

    checked = host.run_agent(
        "verify", str(host.tmp / "release.json"), *trusting(keys[0]), root=False
    )
    assert checked.returncode == 0, checked
    assert f"web1: {new.path}" not in checked.stdout  # web1 takes "*"
    assert f"*: {new.path}" in checked.stdout and "signed by release-1" in checked.stdout

    result = host.collect(*trusting(keys[0]))
    assert result.returncode == 0, result
    assert host.upstream() == new.path
    assert not host.store_path_is_valid(db.path)  # another host's system is not fetched
    text = host.metrics()
    assert metric(text, "nixos_autodeploy_release_serial") == 42
    assert metric(text, "nixos_autodeploy_release_verified") == 1
    expiry = metric(text, "nixos_autodeploy_release_expiry_timestamp_seconds")
    issued = host.snapshot()["upstream"]["release"]["issued"]
    assert expiry == issued + 2 * 86400
    assert rejected_reasons(host) == []
    shown = json.loads(host.status("--json").stdout)["release"]
    assert shown["verdict"] == "verified" and shown["serial"] == 42
    assert (shown["signers"], shown["host"], shown["expires"]) == (["release-1"], "web1", expiry)
    table = host.status().stdout
    assert "release: verified" in table and "signed by release-1" in table
    floor = host.read_json(release.FLOOR_FILE)
    assert floor["serial"] == 42 and floor["reset_at"] is None  # a first start, no reset

    deployed = deploy(host, *trusting(keys[0]))
    assert deployed.returncode == 0, deployed
    assert host.current() == new.path and host.profile() == new.path


def test_a_fleet_without_keys_accepts_an_unsigned_release_unverified(host: Host) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    host.install(a)
    host.server.publish_body(signed(serial=7, systems={"*": b.path}))
    result = host.collect("--host-name", "web1")
    assert result.returncode == 0, result
    assert host.upstream() == b.path
    assert metric(host.metrics(), "nixos_autodeploy_release_verified") == 0
    assert json.loads(host.status("--json").stdout)["release"]["verdict"] == "unverified"
    # Its serial still only goes up.
    host.server.publish_body(signed(serial=6, systems={"*": a.path}))
    replayed = host.collect("--host-name", "web1")
    assert replayed.returncode == 1
    assert error_lines(replayed) == [
        "error: release rejected (replay): serial 6 is lower than 7, the highest this host accepted"
    ]
    assert host.upstream() == b.path
    # ... and a bare path works as it always did, with no release to show.
    host.publish(a)
    assert host.collect().returncode == 0
    assert host.upstream() == a.path
    assert json.loads(host.status("--json").stdout)["release"] is None


# ---- every rule, nothing changed ------------------------------------------------------------


def tampered_payload(body: bytes) -> bytes:
    doc = json.loads(body)
    data = base64.b64decode(doc["payload"])
    doc["payload"] = base64.b64encode(data.replace(b'"serial": 6', b'"serial": 7')).decode()
    return json.dumps(doc).encode()


def tampered_signature(body: bytes) -> bytes:
    doc = json.loads(body)
    sig = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
    sig[0] ^= 0x80
    doc["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    return json.dumps(doc).encode()


def test_each_refused_answer_changes_nothing(
    host: Host, keys: list[SigningKey], tmp_path: Path
) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("accepted"), SystemSpec("offered"))
    old, accepted, offered = systems["old"], systems["accepted"], systems["offered"]
    host.install(old)
    host.write_deployed(old)
    key = keys[0]
    host.server.publish_body(signed(key, serial=5, systems={"web1": accepted.path}))
    assert host.collect(*trusting(key)).returncode == 0
    before = unchanged_files(host)
    impostor_dir = tmp_path / "impostor"
    impostor_dir.mkdir()
    impostor = SigningKey.generate(impostor_dir, key.name)  # the trusted name, other bytes
    now = int(time.time())
    web1 = {"web1": offered.path}
    answers: list[tuple[str, bytes, str]] = [
        ("unsigned", (offered.path + "\n").encode(), "a bare store path"),
        ("unsigned", signed(serial=6, systems=web1), "serial 6 carries no signature"),
        ("signature", signed(keys[1], serial=6, systems=web1), "0 valid signature(s)"),
        ("signature", signed(impostor, serial=6, systems=web1), "0 valid signature(s)"),
        ("signature", tampered_payload(signed(key, serial=6, systems=web1)), "serial 7 has 0"),
        ("signature", tampered_signature(signed(key, serial=6, systems=web1)), "serial 6 has 0"),
        ("no_entry", signed(key, serial=6, systems={"db1": offered.path}), "no system for"),
        ("expired", signed(key, serial=6, systems=web1, expires=now - 1), "expired at"),
        ("future", signed(key, serial=6, systems=web1, issued=now + 3600), "in the future"),
        ("replay", signed(key, serial=4, systems=web1), "lower than 5"),
        ("serial_reused", signed(key, serial=5, systems=web1), "with other content"),
        ("malformed", b'{"payloadType": 1, "payloadType": 2}', "duplicate JSON key"),
        ("malformed", signed(key, serial=-6, systems=web1), "not a non-negative integer"),
        ("malformed", signed(key, serial=6, systems={"web1": "/etc/passwd"}), "outside"),
    ]
    for reason, body, words in answers:
        host.server.publish_body(body)
        result = host.collect(*trusting(key))
        assert result.returncode == 1, (reason, result)
        no_traceback(result)
        lines = error_lines(result)
        assert len(lines) == 1 and lines[0].startswith(f"error: release rejected ({reason}): ")
        assert words in lines[0], (reason, lines)
        assert unchanged_files(host) == before, reason
        assert rejected_reasons(host) == [reason]
        assert metric(host.metrics(), "nixos_autodeploy_release_serial") == 5
        shown = json.loads(host.status("--json").stdout)["release"]
        assert (shown["verdict"], shown["rejected"], shown["serial"]) == ("rejected", reason, 5)
    assert not host.store_path_is_valid(offered.path)
    # The last accepted release stays what the actuator may deploy.
    result = deploy(host, *trusting(key))
    assert result.returncode == 0, result
    assert host.current() == accepted.path
    assert "release: rejected (malformed; the last accepted release stays)" in (
        host.status().stdout
    )
    # Accepted again: every reason back to 0.
    host.server.publish_body(signed(key, serial=6, systems=web1))
    assert host.collect(*trusting(key)).returncode == 0
    assert host.upstream() == offered.path and rejected_reasons(host) == []


def test_two_of_three_keys_with_a_bad_signature_and_a_duplicate(
    host: Host, keys: list[SigningKey]
) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"))
    a, b = systems["a"], systems["b"]
    host.install(a)
    two = trusting(*keys, required=2)
    # release-1 twice (counts once), release-2's signature broken: one valid key.
    body = signed(keys[1], keys[0], keys[0], serial=1, systems={"*": b.path})
    host.server.publish_body(tampered_signature(body))
    refused = host.collect(*two)
    assert refused.returncode == 1
    assert "1 valid signature(s) from trusted keys, 2 required" in error_lines(refused)[0]
    host.server.publish_body(signed(keys[0], keys[1], keys[2], serial=1, systems={"*": b.path}))
    assert host.collect(*two).returncode == 0
    assert host.upstream() == b.path
    signers = json.loads(host.status("--json").stdout)["release"]["signers"]
    assert signers == ["release-1", "release-2", "release-3"]


# ---- the floor: restarts, wiped state, rotation ------------------------------------------------


def test_a_replay_is_refused_across_a_resident_collector_restart(
    host: Host, keys: list[SigningKey]
) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new"))
    old, new = systems["old"], systems["new"]
    host.install(old)
    key = keys[0]
    older = signed(key, serial=1, systems={"*": old.path})
    host.server.publish_body(signed(key, serial=2, systems={"*": new.path}))
    with resident(host, RARELY, *trusting(key)) as agent:
        assert "error" not in agent.next_message()["STATUS"]
        host.server.publish_body(older)
        assert "release rejected (replay)" in agent.poll()["STATUS"]
        returncode, _ = agent.stop()
    assert returncode == 0
    (host.tmp / "notify").unlink()  # the first one's notify socket
    with resident(host, RARELY, *trusting(key)) as agent:
        status = agent.next_message()["STATUS"]
        agent.stop()
    assert "release rejected (replay): serial 1 is lower than 2" in status
    assert host.upstream() == new.path
    assert rejected_reasons(host) == ["replay"]


def test_a_wiped_state_dir_is_a_visible_floor_reset(host: Host, keys: list[SigningKey]) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new"))
    old, new = systems["old"], systems["new"]
    host.install(old)
    key = keys[0]
    host.server.publish_body(signed(key, serial=9, systems={"*": new.path}))
    assert host.collect(*trusting(key)).returncode == 0
    text = host.metrics()
    assert "nixos_autodeploy_release_floor_reset_timestamp_seconds" not in text
    shutil.rmtree(host.state_dir)
    host.state_dir.mkdir()
    host.server.publish_body(signed(key, serial=3, systems={"*": old.path}))
    result = host.collect(*trusting(key))
    assert result.returncode == 0, result
    assert "the release serial floor was reset" in result.stderr
    assert host.upstream() == old.path
    reset = metric(host.metrics(), "nixos_autodeploy_release_floor_reset_timestamp_seconds")
    assert reset == host.read_json(release.FLOOR_FILE)["reset_at"] > 0
    assert json.loads(host.status("--json").stdout)["release"]["floor_reset_at"] == reset
    assert "release serial floor: reset" in host.status().stdout


def test_key_rotation(host: Host, keys: list[SigningKey]) -> None:
    systems = host.build(SystemSpec("a"), SystemSpec("b"), SystemSpec("c"))
    old_key, new_key = keys[0], keys[1]
    host.install(systems["a"])
    both = trusting(old_key, new_key)
    third = signed(new_key, serial=3, systems={"*": systems["c"].path})
    steps: list[tuple[list[str], bytes, str | None]] = [
        (trusting(old_key), signed(old_key, serial=1, systems={"*": systems["a"].path}), None),
        # Hosts trust both keys; CI still signs with the old one, then with the new one.
        (both, signed(old_key, serial=2, systems={"*": systems["b"].path}), None),
        (both, third, None),
        # The old key removed from the hosts: what only it signs is refused.
        (
            trusting(new_key),
            signed(old_key, serial=4, systems={"*": systems["a"].path}),
            "signature",
        ),
    ]
    for flags, body, reason in steps:
        host.server.publish_body(body)
        result = host.collect(*flags)
        assert result.returncode == (0 if reason is None else 1), result
        assert rejected_reasons(host) == ([] if reason is None else [reason])
    assert host.upstream() == systems["c"].path
    # An unchanged answer is judged again when the keys change (not taken from a 304):
    # serial 3, signed by the new key only, is refused by a host that trusts the old key.
    host.server.publish_body(third)
    assert host.collect(*trusting(new_key)).returncode == 0
    refused = host.collect(*trusting(old_key))
    assert refused.returncode == 1 and "(signature)" in error_lines(refused)[0]
    assert host.server.requests("/upstream")[-1].headers.get("if-none-match") is None


# ---- offline bundles ---------------------------------------------------------------------------


def test_an_offline_bundle_from_a_directory(host: Host, keys: list[SigningKey]) -> None:
    bundle = host.tmp / "bundle"
    # Built into the bundle's cache alone (`nix copy --to file://DIR/cache`): the HTTP
    # cache never sees it.
    builder = dataclasses.replace(host.builder, cache_dir=bundle / "cache")
    (bundle / "cache").mkdir(parents=True)
    system = builder.build(SystemSpec("offline"))["offline"]
    installed = host.build_one("installed")
    host.install(installed)
    out = bundle / "release.json"
    made = host.run_agent(
        "publish",
        *("--key-file", str(keys[0].secret_file), "--serial", "1", "--system", system.path),
        *("-o", str(out)),
        root=False,
    )
    assert made.returncode == 0, made
    url = f"file://{out}"
    result = host.collect(*trusting(keys[0]), url=url)
    assert result.returncode == 0, result
    assert host.upstream() == system.path and host.store_path_is_valid(system.path)
    assert host.server.count("/upstream") == 0
    # Unchanged file, unchanged answer: nothing realised again.
    realised = len(host.recorded("nix-store"))
    assert host.collect(*trusting(keys[0]), url=url).returncode == 0
    assert len(host.recorded("nix-store")) == realised
    # Every check applies: an older bundle is refused.
    out.write_bytes(signed(keys[0], serial=0, systems={"*": installed.path}))
    refused = host.collect(*trusting(keys[0]), url=url)
    assert refused.returncode == 1 and "(replay)" in error_lines(refused)[0]
    assert host.upstream() == system.path


# ---- CI's commands ------------------------------------------------------------------------------


def run_cli(host: Host, *args: str) -> tuple[int, list[str], str]:
    result = host.run_agent(*args, root=False)
    no_traceback(result)
    return result.returncode, error_lines(result), result.stdout


def test_verify_refuses_with_one_line(host: Host, keys: list[SigningKey]) -> None:
    path = host.tmp / "r.json"
    store = "/nix/store/" + "c" * 32 + "-nixos-system-web1"
    path.write_bytes(signed(keys[1], serial=3, systems={"web1": store}))
    code, errors, _ = run_cli(host, "verify", str(path), "--trusted-key", keys[0].public)
    assert code == 1 and errors[0].startswith("error: release rejected (signature): ")
    code, errors, out = run_cli(host, "verify", str(path), *trusting(keys[1]))
    assert (code, errors, out.splitlines()[-1]) == (0, [], f"web1: {store}")
    code, errors, _ = run_cli(
        host, "verify", str(path), "--trusted-key", keys[1].public, "--host-name", "db1"
    )
    assert code == 1 and "(no_entry)" in errors[0]
    code, errors, _ = run_cli(host, "verify", str(path))
    assert code == 1 and "verify needs the trusted keys" in errors[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--serial", "1", "--system", "/nix/store/x"], "not a valid store path name"),
        (["--serial", "1"], "give --system or --host"),
        (["--system", "/nix/store/" + "d" * 32 + "-s"], "give one of --serial N"),
        (["--serial", "1", "--host", "web1", "--system", "/nix/store/" + "d" * 32 + "-s"], "NAME="),
        (
            ["--serial", "1", "--system", "/nix/store/" + "d" * 32 + "-s", "--rollout-start", "1"],
            "--rollout-start needs --rollout-duration",
        ),
    ],
)
def test_publish_refuses_bad_input_and_writes_nothing(
    host: Host, keys: list[SigningKey], args: list[str], words: str
) -> None:
    out = host.tmp / "out.json"
    code, errors, _ = run_cli(
        host, "publish", "--key-file", str(keys[0].secret_file), *args, "-o", str(out)
    )
    assert code == 1 and len(errors) == 1 and words in errors[0], errors
    assert not out.exists()


def test_publish_with_a_public_key_as_key_file_is_one_error(
    host: Host, keys: list[SigningKey]
) -> None:
    public = keys[0].secret_file.with_name("public-key")
    code, errors, _ = run_cli(
        host, "publish", "--key-file", str(public), "--serial", "1", "--system", "/x"
    )
    assert code == 1 and "expected 64 bytes, not 32" in errors[0]


def test_a_no_change_poll_does_not_load_cryptography(host: Host, keys: list[SigningKey]) -> None:
    """A 304 needs no verification: only a changed answer loads the Ed25519 code."""
    system = host.build_one("a")
    host.install(system)
    host.server.publish_body(signed(keys[0], serial=1, systems={"*": system.path}))
    probe = (
        "import sys; from collector.cli import main; code = main(sys.argv[1:]); "
        "print('cryptography' in sys.modules); sys.exit(code)"
    )
    argv = host.agent_argv("collect", "--url", host.url, *trusting(keys[0]))
    loaded = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", probe, *argv[3:]],
            env=host.agent_env(),
            capture_output=True,
            text=True,
            timeout=120,  # a safety net, not an assertion
        )
        assert done.returncode == 0, done.stderr
        loaded.append(done.stdout.strip())
    assert loaded == ["True", "False"]
    assert host.server.requests("/upstream")[-1].headers.get("if-none-match")


@pytest.mark.parametrize("every", [[], ["--every", "60"]])
def test_a_bad_trusted_key_is_one_error_line_and_writes_nothing(
    host: Host, tmp_path: Path, every: list[str]
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# the fleet's release keys\nrelease-1:c2hvcnQ=\n")
    result = host.collect("--trusted-keys-file", str(keys_file), *every)
    assert result.returncode == 1
    assert error_lines(result) == ["error: trusted key 'release-1': expected 32 bytes, not 5"], (
        result
    )
    assert [p.name for p in host.state_dir.iterdir() if p.name != "lock"] == []
    assert not host.metrics_path.exists()


def test_an_accepted_release_that_expired_is_not_deployed(
    host: Host, keys: list[SigningKey]
) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new"))
    old, new = systems["old"], systems["new"]
    host.install(old)
    host.write_deployed(old)
    expires = int(time.time()) + 10
    host.server.publish_body(signed(keys[0], serial=1, systems={"*": new.path}, expires=expires))
    collected = host.collect(*trusting(keys[0]))
    assert collected.returncode == 0, f"collected after the release expired? {collected}"
    assert host.upstream() == new.path
    while time.time() <= expires:  # the release must expire; nothing here is measured
        time.sleep(max(0.0, expires + 0.1 - time.time()))
    result = deploy(host, *trusting(keys[0]))
    assert result.returncode == 0, result
    assert host.current() == old.path and host.profile() == old.path
    decision = [e for e in history(host) if e["event"] == "decision"][-1]
    assert decision["action"] == "nothing"
    assert "release serial 1 expired at" in decision["reason"]
    assert json.loads(host.status("--json").stdout)["release"]["verdict"] == "expired"
    assert "release expired: not deployed until a newer one is published" in host.status().stdout
    # A newer release deploys again.
    host.server.publish_body(signed(keys[0], serial=2, systems={"*": new.path}))
    assert deploy(host, "--max-snapshot-age", "0", *trusting(keys[0])).returncode == 0
    assert host.current() == new.path


def test_publish_adds_a_wave(host: Host, keys: list[SigningKey]) -> None:
    """`--rollout-duration` alone starts the wave now; `--rollout-start` places it."""
    system = "/nix/store/" + "d" * 32 + "-s"
    before = int(time.time())
    args = ("--key-file", str(keys[0].secret_file), "--serial", "1", "--system", system)
    publish(host, *args, "--rollout-duration", "12h")
    envelope = release.parse_envelope((host.tmp / "release.json").read_bytes())
    wave = release.parse_release(envelope.payload).extra["rollout"]
    assert wave["duration"] == 12 * 3600 and before <= wave["start"] <= int(time.time())
    publish(host, *args, "--rollout-duration", "90m", "--rollout-start", "1800000000")
    envelope = release.parse_envelope((host.tmp / "release.json").read_bytes())
    assert release.parse_release(envelope.payload).extra == {
        "rollout": {"start": 1_800_000_000, "duration": 5400}
    }


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [("--rollout-duration", "soon", "not a duration"), ("--rollout-start", "x", "not Unix")],
)
def test_publish_refuses_a_bad_wave_as_a_usage_error(
    host: Host, keys: list[SigningKey], flag: str, value: str, words: str
) -> None:
    out = host.tmp / "out.json"
    args = ("--key-file", str(keys[0].secret_file), "--serial", "1", "--rollout-duration", "1h")
    result = host.run_agent("publish", *args, flag, value, "-o", str(out), root=False)
    assert result.returncode == 2
    assert f"publish: error: argument {flag}: {words}" in result.stderr
    assert not out.exists()
