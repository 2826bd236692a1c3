"""Fixtures shared by every suite: see tests/harness for what they do."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import FleetLockServer, Host, NixBuilder, SigningKey, TestServer, require_tool


@pytest.fixture(scope="session")
def nix_build_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One chroot store for all builds of the session (salts keep tests apart)."""
    require_tool("nix-build")
    return tmp_path_factory.mktemp("nix-build-store")


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return SigningKey.generate(tmp_path_factory.mktemp("signing-key"), "autodeploy-test-1")


@pytest.fixture
def test_server(tmp_path: Path) -> Iterator[TestServer]:
    """HTTP on 127.0.0.1 serving this test's binary cache (`tmp_path/cache`) and routes."""
    cache = tmp_path / "cache"
    cache.mkdir()
    server = TestServer(cache_dir=cache)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def lock_server() -> Iterator[FleetLockServer]:
    """A FleetLock server on 127.0.0.1 with one reboot slot per group."""
    server = FleetLockServer(default_slots=1)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def host(
    tmp_path: Path, nix_build_store: Path, signing_key: SigningKey, test_server: TestServer
) -> Host:
    """A sandbox host (`tmp_path/root`) whose systems come from `test_server`'s cache."""
    for tool in ("nix-store", "nix-env", "nix"):
        require_tool(tool)
    builder = NixBuilder(
        build_store=nix_build_store,
        cache_dir=test_server.cache_dir,
        key=signing_key,
        root=tmp_path / "root",
        salt=uuid.uuid4().hex[:12],
        cache_home=tmp_path / "xdg-cache",
    )
    return Host(tmp=tmp_path, builder=builder, server=test_server)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that builds or realises systems needs real Nix, marked or not: `-m 'not nix'`
    (the package's check phase) must leave it out."""
    for item in items:
        if {"host", "nix_build_store"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.nix)
