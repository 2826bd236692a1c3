"""The upstream URL over https: a real TLS server on 127.0.0.1 with a certificate made by
openssl for the test, trusted through --ca-file."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Host, Reply, TestServer, error_lines, require_tool, run_checked


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 (its own CA); the key sits beside it."""
    openssl = require_tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    run_checked(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ]
    )
    return cert


@pytest.fixture
def tls_server(tmp_path: Path, certificate: Path) -> Iterator[TestServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, certificate.with_name("key.pem"))
    (tmp_path / "tls-cache").mkdir()
    server = TestServer(cache_dir=tmp_path / "tls-cache", tls=context)
    server.start()
    yield server
    server.stop()


def test_https_with_ca_file(host: Host, tls_server: TestServer, certificate: Path) -> None:
    system = host.build_one("a")
    host.install(system)
    tls_server.publish_body((system.path + "\n").encode())
    url = tls_server.url("/upstream")
    assert url.startswith("https://")

    result = host.collect("--ca-file", str(certificate), url=url)

    assert result.returncode == 0, result
    assert host.snapshot()["upstream"]["path"] == system.path
    assert host.snapshot()["state"] == "untracked"


def test_untrusted_certificate_is_one_error_line(host: Host, tls_server: TestServer) -> None:
    system = host.build_one("a")
    host.install(system)
    tls_server.publish_body((system.path + "\n").encode())

    result = host.collect(url=tls_server.url("/upstream"))

    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert "certificate verify failed" in error and tls_server.base_url in error, error
    assert host.upstream() is None


def test_redirect_from_https_down_to_http_is_refused(
    host: Host, tls_server: TestServer, certificate: Path
) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)  # the plain http server would answer, were it asked
    tls_server.route("/upstream", Reply(status=302, headers=[("Location", host.url)]))

    result = host.collect("--ca-file", str(certificate), url=tls_server.url("/upstream"))

    assert result.returncode == 1, result
    (error,) = error_lines(result)
    assert "from https to http" in error
    assert host.server.requests("/upstream") == []
    assert host.upstream() is None
