"""The FleetLock client (actuator/fleetlock.py) against the harness' FleetLock server on
127.0.0.1, the server's own semantics, and the host ID."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from harness import FAULTS, Fault, FleetLockServer

from actuator import fleetlock
from collector.cli import build_parser
from collector.config import Paths, Settings, settings_from
from collector.errors import ConfigError

# A known answer from systemd itself: on a machine whose /etc/machine-id is MACHINE_ID,
# `systemd-id128 machine-id --app-specific=13de78b86e4454e7874a48a276e06eac` printed HOST_ID.
MACHINE_ID = "3d1219c7c4c5404aaa1f6d2a48adfda4"
HOST_ID = "fc93c744abae4f8eaf28b43ec235e827"


def settings(tmp_path: Path, url: str, group: str = "default", timeout: float = 10) -> Settings:
    paths = Paths(root=str(tmp_path), state_dir=str(tmp_path / "state"))
    return Settings(paths=paths, fleet_lock_url=url, fleet_lock_group=group, timeout=timeout)


def write_machine_id(root: Path, text: str) -> None:
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/machine-id").write_text(text)


# ---- the host ID ---------------------------------------------------------------------


def test_host_id_is_systemds_app_specific_id(tmp_path: Path) -> None:
    write_machine_id(tmp_path, MACHINE_ID + "\n")
    paths = Paths(str(tmp_path), str(tmp_path / "state"))
    assert fleetlock.APP_ID == "13de78b86e4454e7874a48a276e06eac"
    assert fleetlock.host_id(paths) == HOST_ID
    assert MACHINE_ID not in fleetlock.host_id(paths)


def test_host_id_differs_per_machine_and_is_stable(tmp_path: Path) -> None:
    paths = Paths(str(tmp_path), str(tmp_path / "state"))
    ids = set()
    for machine_id in (MACHINE_ID, "0" * 31 + "1", MACHINE_ID):
        write_machine_id(tmp_path, machine_id)
        ids.add(fleetlock.host_id(paths))
    assert len(ids) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("", "holds no machine ID"),
        ("uninitialized\n", "holds no machine ID"),
        (MACHINE_ID.upper(), "holds no machine ID"),
    ],
)
def test_a_missing_or_bad_machine_id_is_one_clear_error(
    tmp_path: Path, content: str | None, message: str
) -> None:
    if content is not None:
        write_machine_id(tmp_path, content)
    with pytest.raises(ConfigError) as raised:
        fleetlock.host_id(Paths(str(tmp_path), str(tmp_path / "state")))
    assert message in str(raised.value)
    assert str(tmp_path / "etc/machine-id") in str(raised.value)


# ---- the harness server: a counting semaphore of owned, recursive slots ---------------


def test_server_semaphore_is_counting_owned_and_recursive(
    tmp_path: Path, lock_server: FleetLockServer
) -> None:
    lock_server.slots["pair"] = 2
    one = settings(tmp_path, lock_server.url)
    pair = settings(tmp_path, lock_server.url, group="pair")
    fleetlock.lock(one, "a")
    fleetlock.lock(one, "a")  # recursive: the holder takes its own slot again
    with pytest.raises(fleetlock.FleetLockError, match="failed_lock_semaphore_full"):
        fleetlock.lock(one, "b")
    fleetlock.unlock(one, "b")  # owned: b cannot free a's slot
    assert lock_server.held() == ["a"]
    for ident in ("a", "b"):  # groups are separate semaphores
        fleetlock.lock(pair, ident)
    assert lock_server.held("pair") == ["a", "b"]
    fleetlock.unlock(one, "a")
    fleetlock.unlock(one, "a")  # idempotent
    assert lock_server.held() == []
    fleetlock.lock(one, "b")
    assert lock_server.held() == ["b"]


def test_server_rejects_requests_without_the_protocol_header_or_params(
    lock_server: FleetLockServer,
) -> None:
    url = lock_server.url + "/v1/pre-reboot"
    good = {"client_params": {"id": "a", "group": "default"}}
    no_header = requests.post(url, json=good, timeout=10)
    assert no_header.status_code == 400
    assert no_header.json()["kind"] == "missing_protocol_header"
    bad_params = [
        {},
        {"client_params": {"id": "", "group": "default"}},
        {"client_params": {"id": "a", "group": "a b"}},
    ]
    for bad in bad_params:
        answer = requests.post(url, json=bad, headers={"fleet-lock-protocol": "true"}, timeout=10)
        assert (answer.status_code, answer.json()["kind"]) == (400, "bad_client_params")
    assert lock_server.held() == []


# ---- the client ------------------------------------------------------------------------


def test_client_speaks_the_protocol(tmp_path: Path, lock_server: FleetLockServer) -> None:
    fleetlock.lock(settings(tmp_path, lock_server.url + "/", group="workers.eu-1"), HOST_ID)
    fleetlock.unlock(settings(tmp_path, lock_server.url, group="workers.eu-1"), HOST_ID)
    calls = lock_server.calls()
    assert [c.path for c in calls] == ["/v1/pre-reboot", "/v1/steady-state"]
    for call in calls:
        assert call.headers["fleet-lock-protocol"] == "true"
        assert call.headers["content-type"] == "application/json"
        assert call.body == {"client_params": {"id": HOST_ID, "group": "workers.eu-1"}}


@pytest.mark.parametrize("case", FAULTS)
def test_anything_but_200_is_no_slot_with_a_clear_reason(
    tmp_path: Path, lock_server: FleetLockServer, case: str
) -> None:
    fault, expected = FAULTS[case]
    lock_server.fault = fault
    with pytest.raises(fleetlock.FleetLockError) as raised:
        fleetlock.lock(settings(tmp_path, lock_server.url, timeout=1), HOST_ID)
    message = str(raised.value)
    assert expected in message
    if fault.slow:
        assert "no answer within 1s" in message
    assert message.startswith(f"POST {lock_server.url}/v1/pre-reboot") or "answered" in message
    assert "\n" not in message


def test_unreachable_server_is_no_slot(tmp_path: Path) -> None:
    server = FleetLockServer()
    server.start()
    url = server.url
    server.stop()  # the port is closed now
    with pytest.raises(fleetlock.FleetLockError, match="connection failed"):
        fleetlock.lock(settings(tmp_path, url), HOST_ID)


def test_a_redirect_is_not_followed_and_no_credentials_leave(
    tmp_path: Path, lock_server: FleetLockServer
) -> None:
    """The protocol's header guards against unintended redirection: a 3xx is a refusal;
    user:password in the URL stays out of messages."""
    lock_server.fault = Fault(307, b"", headers=(("Location", "/v1/steady-state"),))
    url = lock_server.url.replace("http://", "http://ops:s3cret@")
    with pytest.raises(fleetlock.FleetLockError) as raised:
        fleetlock.lock(settings(tmp_path, url), HOST_ID)
    assert "answered HTTP 307" in str(raised.value)
    assert "s3cret" not in str(raised.value)
    assert [c.path for c in lock_server.calls()] == ["/v1/pre-reboot"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fleet-lock-group", "a b"], "fleet lock group 'a b': only letters, digits"),
        (["--fleet-lock-url", "airlock:3333"], "the fleet lock URL must be an http"),
        (["--fleet-lock-url", "ftp://airlock"], "the fleet lock URL must be an http"),
    ],
)
def test_bad_fleet_lock_settings_are_one_clear_error(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from(build_parser().parse_args(["deploy", *argv]))


def test_config_file_keys(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "reboot_windows": ["Sat,Sun 02:00-05:00"],
                "fleet_lock_url": "https://airlock.example.org",
                "fleet_lock_group": "workers",
            }
        )
    )
    loaded = settings_from(build_parser().parse_args(["deploy", "--config", str(config)]))
    assert loaded.reboot_windows == ("Sat,Sun 02:00-05:00",)
    assert (loaded.fleet_lock_url, loaded.fleet_lock_group) == (
        "https://airlock.example.org",
        "workers",
    )
    config.write_text(json.dumps({"reboot_windows": "02:00-04:00"}))
    with pytest.raises(ConfigError, match="reboot_windows has the wrong type"):
        settings_from(build_parser().parse_args(["deploy", "--config", str(config)]))
