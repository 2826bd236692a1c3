"""The harness does what it says: real systems, real signatures, a controllable server."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from harness import Host, Reply, SystemSpec, etag_for, require_tool, run_checked


def get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 10, read: int | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One GET without following redirects; `read` limits how much body is read."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        connection.request("GET", parts.path, headers=headers or {})
        response = connection.getresponse()
        body = response.read() if read is None else response.read(read)
        return response.status, response.headers, body
    finally:
        connection.close()


# ---- systems ---------------------------------------------------------------


def test_systems_have_the_nixos_layout_and_share_kernels_by_version(host: Host) -> None:
    systems = host.build(
        SystemSpec("a", kernel="6.1.7", extra="one"),
        SystemSpec("b", kernel="6.1.7", extra="two"),
        SystemSpec("c", kernel="6.6.1"),
        SystemSpec("d", kernel="6.1.7", initrd="6.1.7-other"),
    )
    a, b, c, d = (Path(systems[n].path) for n in "abcd")
    assert a.name.endswith("-nixos-system-a-a")
    for entry in ("kernel", "initrd", "kernel-params", "init", "nixos-version", "extra"):
        assert not (a / entry).exists(), "systems live in the build store until realised"
    for system in systems.values():
        host.realise(system)
    assert (a / "kernel").read_text() == "Linux version 6.1.7 (synthetic test kernel)\n"
    assert (c / "kernel").read_text() == "Linux version 6.6.1 (synthetic test kernel)\n"
    assert (a / "initrd").is_file()
    assert (a / "kernel-modules/lib/modules/6.1.7/modules.dep").is_file()
    assert (a / "kernel-params").read_text() == "loglevel=4 autodeploy=a\n"
    assert (a / "nixos-version").read_text() == "a\n"
    assert os.access(a / "init", os.X_OK)
    assert os.access(a / "bin/switch-to-configuration", os.X_OK)
    assert (a / "extra").read_text() != (b / "extra").read_text()

    def target(system: Path, entry: str) -> str:
        return os.readlink(system / entry)

    for entry in ("kernel", "initrd", "kernel-modules"):
        assert target(a, entry) == target(b, entry), entry
        assert target(a, entry) != target(c, entry), entry
    assert target(a, "kernel") == target(d, "kernel")
    assert target(a, "initrd") != target(d, "initrd")


def test_each_test_builds_paths_new_to_the_real_store(host: Host) -> None:
    system = host.build_one("fresh")
    assert not host.store_path_is_valid(system.path)
    host.realise(system)
    assert host.store_path_is_valid(system.path)


def test_install_points_everything_at_the_system(host: Host) -> None:
    system = host.build_one("installed")
    host.install(system)
    assert host.links() == {
        "current": system.path,
        "booted": system.path,
        "upstream": None,
        "profile": system.path,
        "profile_generation": "system-1-link",
        "boot_default": system.path,
    }
    assert host.store_path_is_valid(system.path)
    assert host.activations() == []


@pytest.mark.parametrize(
    ("action", "moves"),
    [
        ("switch", {"current", "boot_default"}),
        ("boot", {"boot_default"}),
        ("test", {"current"}),
        ("dry-activate", set()),
    ],
)
def test_switch_to_configuration_actions(host: Host, action: str, moves: set[str]) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new"))
    old, new = systems["old"].path, systems["new"].path
    host.install(old)
    host.realise(new)
    run_checked([f"{new}/bin/switch-to-configuration", action], env=host.agent_env())
    links = host.links()
    for name in ("current", "boot_default"):
        assert links[name] == (new if name in moves else old), name
    assert links["booted"] == old
    assert links["profile"] == old, "switch-to-configuration never touches the profile"
    assert host.activations() == [(action, new)]
    leftovers = [p.name for p in (host.root / "run").iterdir() if ".tmp" in p.name]
    assert leftovers == []


def test_failing_activation_changes_nothing(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new"))
    host.install(systems["old"])
    host.realise(systems["new"])
    host.fail_activation(systems["new"], "unit foo.service failed to start")
    before = host.links()
    failed = subprocess.run(
        [f"{systems['new'].path}/bin/switch-to-configuration", "switch"],
        env=host.agent_env(),
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1
    assert failed.stderr == "unit foo.service failed to start"
    assert host.links() == before
    assert host.activations() == [("switch", systems["new"].path)]


def test_slow_activation_waits_before_acting(host: Host) -> None:
    system = host.build_one("slow")
    host.realise(system)
    host.slow_activation(600)
    process = subprocess.Popen(
        [f"{system.path}/bin/switch-to-configuration", "switch"],
        env=host.agent_env(),
        start_new_session=True,  # so its `sleep` child goes too
    )
    try:
        # Still sleeping: nothing logged or pointed yet.
        assert process.poll() is None
        assert host.activations() == []
        assert host.current() is None
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_deploy_by_hand_and_reboot(host: Host) -> None:
    systems = host.build(SystemSpec("old"), SystemSpec("new", kernel="6.9.0"))
    old, new = systems["old"].path, systems["new"].path
    host.install(old)
    (host.root / "run/upstream-system").symlink_to(new)
    host.deploy_by_hand(new, "boot")
    assert host.links()["profile_generation"] == "system-2-link"
    assert (host.current(), host.booted(), host.profile(), host.boot_default()) == (
        old,
        old,
        new,
        new,
    )
    host.reboot()
    assert (host.current(), host.booted()) == (new, new)
    assert host.upstream() is None, "/run is a tmpfs: it does not survive a reboot"


def test_unsigned_system_is_refused_by_nix(host: Host) -> None:
    unsigned = host.build_one("unsigned", signed=False)
    refused = subprocess.run(
        ["nix-store", "--realise", unsigned.path],
        env=host.nix_env(),
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0
    assert "is not signed by any of the keys in 'trusted-public-keys'" in refused.stderr
    assert not host.store_path_is_valid(unsigned.path)
    assert host.server.count(f"/{unsigned.basename.split('-')[0]}.narinfo") >= 1


# ---- recorders and tools ----------------------------------------------------


def test_recorders_log_argv_and_counters_pass_through(host: Host) -> None:
    env = host.agent_env()
    run_checked(["systemctl", "reboot", "--message=with space"], env=env)
    run_checked(["kexec", "-e"], env=env)
    version = run_checked(["nix-store", "--version"], env=env)
    assert version.startswith("nix-store (Nix)")
    assert host.recorded("systemctl") == [["reboot", "--message=with space"]]
    assert host.recorded("kexec") == [["-e"]]
    assert host.recorded("nix-store") == [["--version"]]
    assert host.spawn_count("nix-store", "nix-env") == 1


def test_require_tool_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_tool("sh").endswith("/sh")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_tool("no-such-tool-autodeploy")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_tool("no-such-tool-autodeploy")


def test_lock_held_blocks_other_lockers(host: Host) -> None:
    lock = str(host.state_dir / "lock")
    with host.lock_held():
        assert subprocess.run(["flock", "--nonblock", lock, "true"]).returncode == 1
    assert subprocess.run(["flock", "--nonblock", lock, "true"]).returncode == 0


# ---- the server -------------------------------------------------------------


def test_server_serves_the_cache_and_refuses_traversal(host: Host) -> None:
    status, _, body = get(host.server.url("/nix-cache-info"))
    assert (status, body) == (404, b"404 not found\n"), "empty cache until something is built"
    host.build_one("cached")
    status, _, body = get(host.server.url("/nix-cache-info"))
    assert status == 200 and b"StoreDir: /nix/store" in body
    assert get(host.server.url("/../cache/nix-cache-info"))[0] == 404


def test_server_replies_as_told_and_records_requests(host: Host) -> None:
    server = host.server
    server.route(
        "/upstream",
        Reply(status=503, body=b"busy", headers=[("Retry-After", "2"), ("X-Test", "1")]),
    )
    status, headers, body = get(server.url(), headers={"Authorization": "Bearer s3cret"})
    assert (status, body, headers["Retry-After"], headers["X-Test"]) == (503, b"busy", "2", "1")
    server.route("/seq", [Reply(status=500), Reply(status=200, body=b"ok")])
    assert [get(server.url("/seq"))[0] for _ in range(3)] == [500, 200, 200]
    recorded = server.requests("/upstream")
    assert len(recorded) == 1 and recorded[0].headers["authorization"] == "Bearer s3cret"
    assert server.count("/seq") == 3
    server.reset_requests()
    assert server.count() == 0


def test_server_redirects_and_other_host_name(host: Host) -> None:
    server = host.server
    target = server.url("/moved", host="localhost")
    server.route("/upstream", Reply(status=302, headers=[("Location", target)]))
    server.route("/moved", Reply(body=b"here\n"))
    status, headers, _ = get(server.url())
    assert (status, headers["Location"]) == (302, target)
    assert get(target)[2] == b"here\n"
    assert server.requests("/moved")[0].host == f"localhost:{server.port}"


def test_server_etag_and_304(host: Host) -> None:
    system = host.build_one("published")
    host.publish(system)
    body = (system.path + "\n").encode()
    status, headers, got = get(host.url)
    assert (status, got, headers["ETag"]) == (200, body, etag_for(body))
    assert get(host.url, headers={"If-None-Match": etag_for(body)})[0] == 304
    assert get(host.url, headers={"If-None-Match": '"other"'})[0] == 200


def test_server_streams_sized_and_endless_bodies(host: Host) -> None:
    server = host.server
    server.route("/big", Reply(stream_bytes=200_000))
    status, headers, body = get(server.url("/big"))
    assert (status, len(body), headers["Content-Length"]) == (200, 200_000, None)
    server.route("/endless", Reply(endless=True))
    status, _, body = get(server.url("/endless"), read=3_000_000)
    assert (status, len(body)) == (200, 3_000_000)


def test_server_can_hang_and_delay(host: Host) -> None:
    server = host.server
    server.route("/hang", Reply(hang=True))
    with pytest.raises(TimeoutError):
        get(server.url("/hang"), timeout=0.5)
    server.route("/slow", Reply(delay=0.2, body=b"late"))
    assert get(server.url("/slow"))[2] == b"late"
    assert server.count("/hang") == 1


def test_system_spec_refuses_names_nix_would_refuse() -> None:
    with pytest.raises(ValueError, match="store path name"):
        SystemSpec("bad name").to_json()
