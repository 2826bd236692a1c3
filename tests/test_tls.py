"""The upstream URL over https: a real TLS server on 127.0.0.1 with a certificate made by
openssl for the test, trusted through --ca-file or, without it, through the system's CA
bundle (a private CA added to it, as NixOS's security.pki.certificates does)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Host, Reply, TestServer, error_lines, require_tool, run_checked

from collector.config import Paths, Settings
from collector.http import ca_bundle

# Debian's bundle and NixOS's (security/ca.nix links it there).
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


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


# --- a private CA in the system's bundle, no --ca-file -----------------------------------


@dataclass(frozen=True)
class PrivateCA:
    ca: Path  # the CA's certificate: what an operator adds to the system's trust
    leaf: Path  # the server's certificate for 127.0.0.1, signed by the CA
    key: Path


@pytest.fixture
def private_ca(tmp_path: Path) -> PrivateCA:
    openssl = require_tool("openssl")
    ca, ca_key = tmp_path / "ca.pem", tmp_path / "ca-key.pem"
    leaf, key, request = tmp_path / "leaf.pem", tmp_path / "leaf-key.pem", tmp_path / "leaf.csr"
    run_checked(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(ca_key), "-out", str(ca), "-subj", "/CN=Autodeploy Test CA"),
        ]
    )
    run_checked(
        [
            *(openssl, "req", "-new", "-newkey", "rsa:2048", "-nodes"),
            *("-keyout", str(key), "-out", str(request), "-subj", "/CN=127.0.0.1"),
        ]
    )
    extensions = tmp_path / "leaf.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    run_checked(
        [
            *(openssl, "x509", "-req", "-in", str(request), "-days", "1", "-CA", str(ca)),
            *("-CAkey", str(ca_key), "-CAcreateserial", "-out", str(leaf)),
            *("-extfile", str(extensions)),
        ]
    )
    return PrivateCA(ca=ca, leaf=leaf, key=key)


@pytest.fixture
def private_server(tmp_path: Path, private_ca: PrivateCA) -> Iterator[TestServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(private_ca.leaf, private_ca.key)
    (tmp_path / "private-cache").mkdir()
    server = TestServer(cache_dir=tmp_path / "private-cache", tls=context)
    server.start()
    yield server
    server.stop()


def bundle(tmp_path: Path, name: str, *extra: Path) -> Path:
    """The system's bundle (where this machine has one) plus `extra` certificates: what
    security.pki.certificates makes of /etc/ssl/certs/ca-certificates.crt."""
    path = tmp_path / name
    parts = [SYSTEM_BUNDLE.read_text()] if SYSTEM_BUNDLE.is_file() else []
    path.write_text("".join(parts + [p.read_text() for p in extra]))
    return path


@pytest.mark.parametrize(
    ("with_ca", "without_ca", "trusted"),
    [
        # A NixOS unit sets neither: the program finds the bundle by itself. Each variable
        # alone, and NIX_SSL_CERT_FILE (Nix's own) over SSL_CERT_FILE.
        ("NIX_SSL_CERT_FILE", None, True),
        ("SSL_CERT_FILE", None, True),
        ("NIX_SSL_CERT_FILE", "SSL_CERT_FILE", True),
        ("SSL_CERT_FILE", "NIX_SSL_CERT_FILE", False),
    ],
)
def test_private_ca_in_the_system_bundle_without_ca_file(
    host: Host,
    private_server: TestServer,
    private_ca: PrivateCA,
    tmp_path: Path,
    with_ca: str,
    without_ca: str | None,
    trusted: bool,
) -> None:
    system = host.build_one("a")
    host.install(system)
    private_server.publish_body((system.path + "\n").encode())
    env = {"NIX_SSL_CERT_FILE": "", "SSL_CERT_FILE": ""}  # nothing from this machine's
    env[with_ca] = str(bundle(tmp_path, "with-ca.crt", private_ca.ca))
    if without_ca is not None:
        env[without_ca] = str(bundle(tmp_path, "without-ca.crt"))
    url = private_server.url("/upstream")

    result = host.run_agent(
        "collect", "--url", url, "--prometheus-path", str(host.metrics_path), env=env
    )

    if trusted:
        assert result.returncode == 0, result
        assert host.upstream() == system.path
    else:
        assert result.returncode == 1, result
        (error,) = error_lines(result)
        assert "certificate verify failed" in error, error
        assert host.upstream() is None


def test_ca_bundle_order(tmp_path: Path) -> None:
    """--ca-file, NIX_SSL_CERT_FILE, SSL_CERT_FILE, the system's file, certifi: the first
    that exists. Nix's build sandbox sets NIX_SSL_CERT_FILE=/no-cert-file.crt."""
    nix, ssl_file, given = (tmp_path / n for n in ("nix.crt", "ssl.crt", "given.crt"))
    for path in (nix, ssl_file, given):
        path.write_text("")
    plain = Settings(paths=Paths(root="/", state_dir=str(tmp_path)))
    system: str | bool = str(SYSTEM_BUNDLE) if SYSTEM_BUNDLE.is_file() else True
    cases: list[tuple[Settings, dict[str, str], str | bool]] = [
        (plain, {"NIX_SSL_CERT_FILE": str(nix), "SSL_CERT_FILE": str(ssl_file)}, str(nix)),
        (plain, {"SSL_CERT_FILE": str(ssl_file)}, str(ssl_file)),
        (
            plain,
            {"NIX_SSL_CERT_FILE": "/no-cert-file.crt", "SSL_CERT_FILE": str(ssl_file)},
            str(ssl_file),
        ),
        (plain, {"NIX_SSL_CERT_FILE": "", "SSL_CERT_FILE": str(tmp_path / "absent")}, system),
        (plain, {}, system),
        (
            Settings(paths=plain.paths, ca_file=str(given)),
            {"NIX_SSL_CERT_FILE": str(nix)},
            str(given),
        ),
    ]
    for settings, environ, expected in cases:
        assert ca_bundle(settings, environ) == expected, environ
