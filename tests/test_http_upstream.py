"""The upstream URL over real HTTP: bad bodies, bad servers, credentials, redirects.

Every rejected input must leave the host as it was (upstream GC root, current, profile)
and still write the metrics, with fetch_success 0.
"""

from __future__ import annotations

import base64
import gzip
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from harness import (
    AgentResult,
    Host,
    RecordedRequest,
    Reply,
    System,
    SystemSpec,
    TestServer,
    error_lines,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.nix

TOKEN = "tok-3f9a1c7e-never-printed"
PASSWORD = "pw-8d2b4e61-never-printed"
# How collector/upstream.py ends a failure it retried: out of attempts, or out of time.
GAVE_UP = re.compile(r"gave up after \d+ attempts|no time left to retry")


def fetch_success(host: Host) -> float:
    for family in text_string_to_metric_families(host.metrics()):
        for sample in family.samples:
            if sample.name == "nixos_autodeploy_upstream_fetch_success":
                return float(sample.value)
    raise AssertionError("no nixos_autodeploy_upstream_fetch_success")


@dataclass
class Collected:
    """A host that collected `good` once; a later bad answer must not move anything."""

    host: Host
    good: System
    before: dict[str, str | None]
    nix_runs: int  # Nix processes spawned so far


@pytest.fixture
def collected(host: Host) -> Iterator[Collected]:
    good = host.build_one("good")
    host.install(good)
    host.write_deployed(good)
    host.publish(good)
    first = host.collect()
    assert first.returncode == 0, first
    assert host.upstream() == good.path
    host.server.reset_requests()
    yield Collected(host, good, host.links(), host.spawn_count("nix-store", "nix-env", "nix"))


def rejected(c: Collected, result: AgentResult, *words: str, nix_ran: bool = False) -> str:
    """Exit 1, one error line naming `words`; nothing moved; metrics say fetch failed.

    When Nix ran, its own output (with its own `error:` lines) is passed through to
    stderr first, so there the agent's line is the last one rather than the only one.
    """
    assert result.returncode == 1, result
    lines = error_lines(result)
    if nix_ran:
        assert result.stderr_lines[-1].startswith("error:"), result
        lines = result.stderr_lines[-1:]
    assert len(lines) == 1, result
    for word in words:
        assert word in lines[0], result
    assert c.host.links() == c.before
    assert fetch_success(c.host) == 0
    snapshot = c.host.snapshot()
    assert snapshot["upstream"]["error"], snapshot
    assert snapshot["upstream"]["path"] == c.good.path, "the last good fetch is kept"
    return lines[0]


# ---- bodies -----------------------------------------------------------------


def drv_path(good: System) -> str:
    return good.path + ".drv"


BAD_BODIES: dict[str, tuple[bytes, str]] = {
    "outside the store": (b"/usr/local/nixos-system\n", "outside the Nix store"),
    "relative": (b"nix/store/abc\n", "absolute"),
    "dot-dot": (b"/nix/store/../etc/passwd\n", "store path"),
    "second line": (b"", "more than one line"),  # body filled in per test
    "nul": (b"", "NUL"),
    "html": (b"<!DOCTYPE html><html><body>Sign in</body></html>\n", "HTML"),
    "empty": (b"", "empty body"),
    "whitespace only": (b" \n\t\n", "empty body"),
    "drv": (b"", "derivation"),
    "not utf-8": (b"/nix/store/\xff\xfe\n", "UTF-8"),
    "bad hash": (b"/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x\n", "store path"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_invalid_body_is_rejected(collected: Collected, case: str) -> None:
    body, word = BAD_BODIES[case]
    good = collected.good.path
    if case == "second line":
        body = f"{good}\n{good}\n".encode()
    elif case == "nul":
        body = f"{good}\0\n".encode()
    elif case == "drv":
        body = f"{drv_path(collected.good)}\n".encode()
    collected.host.server.publish_body(body)
    result = collected.host.collect()
    rejected(collected, result, word, collected.host.url)
    assert collected.host.spawn_count("nix-store", "nix-env", "nix") == collected.nix_runs


# ---- status codes and retries -------------------------------------------------


def test_5xx_is_retried_then_fails(collected: Collected) -> None:
    collected.host.server.route("/upstream", Reply(status=500, body=b"boom"))
    result = collected.host.collect()
    line = rejected(collected, result, "500", collected.host.url)
    assert collected.host.server.count("/upstream") > 1, "a 5xx is retried"
    assert "attempts" in line or "retry" in line


def test_503_then_success(collected: Collected) -> None:
    host = collected.host
    new = host.build_one("new")
    body = (new.path + "\n").encode()
    host.server.route(
        "/upstream", [Reply(status=503, headers=[("Retry-After", "0")]), Reply(body=body)]
    )
    result = host.collect()
    assert result.returncode == 0, result
    assert host.server.count("/upstream") == 2
    assert host.upstream() == new.path
    assert fetch_success(host) == 1


def test_429_honours_retry_after(collected: Collected) -> None:
    host = collected.host
    new = host.build_one("new")
    host.server.route(
        "/upstream",
        [Reply(status=429, headers=[("Retry-After", "1")]), Reply(body=(new.path + "\n").encode())],
    )
    result = host.collect()
    assert result.returncode == 0, result
    assert host.server.count("/upstream") == 2
    assert "retrying in 1s" in result.stderr
    assert host.upstream() == new.path


def test_429_retry_after_beyond_the_deadline_gives_up(collected: Collected) -> None:
    collected.host.server.route("/upstream", Reply(status=429, headers=[("Retry-After", "3600")]))
    result = collected.host.collect(timeout=5)
    rejected(collected, result, "429")
    assert collected.host.server.count("/upstream") == 1


def test_404_is_not_retried(collected: Collected) -> None:
    collected.host.server.route("/upstream", Reply(status=404, body=b"no such thing"))
    result = collected.host.collect()
    rejected(collected, result, "404", collected.host.url)
    assert collected.host.server.count("/upstream") == 1


# ---- redirects ----------------------------------------------------------------


def test_redirect_to_file_url_is_refused(collected: Collected) -> None:
    collected.host.server.route(
        "/upstream", Reply(status=302, headers=[("Location", "file:///etc/passwd")])
    )
    result = collected.host.collect()
    rejected(collected, result, "file")
    assert collected.host.server.count() == 1


def test_five_redirects_are_followed(collected: Collected) -> None:
    host = collected.host
    new = host.build_one("new")
    for i in range(5):
        host.server.route(
            "/upstream" if i == 0 else f"/r{i}",
            Reply(status=307, headers=[("Location", f"/r{i + 1}")]),
        )
    host.server.route("/r5", Reply(body=(new.path + "\n").encode()))
    result = host.collect()
    assert result.returncode == 0, result
    assert host.upstream() == new.path


def test_more_than_five_redirects_fail(collected: Collected) -> None:
    collected.host.server.route("/upstream", Reply(status=302, headers=[("Location", "/upstream")]))
    result = collected.host.collect()
    rejected(collected, result, "redirects")
    assert collected.host.server.count("/upstream") == 6


def test_credentials_are_not_sent_to_another_host(collected: Collected, tmp_path: Path) -> None:
    host = collected.host
    new = host.build_one("new")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    elsewhere = host.server.url("/moved", host="localhost")
    host.server.route("/upstream", Reply(status=302, headers=[("Location", elsewhere)]))
    host.server.route("/moved", Reply(body=(new.path + "\n").encode()))
    result = host.collect("--bearer-token-file", str(token), "--header", "X-Fleet-Key: k-42")
    assert result.returncode == 0, result
    (first,) = host.server.requests("/upstream")
    (moved,) = host.server.requests("/moved")
    assert first.headers["authorization"] == f"Bearer {TOKEN}"
    assert first.headers["x-fleet-key"] == "k-42"
    assert moved.host.startswith("localhost:")
    assert "authorization" not in moved.headers
    assert "x-fleet-key" not in moved.headers
    assert host.upstream() == new.path


# ---- bodies that are too big, slow, or encoded ---------------------------------


def test_50_mib_body_is_aborted(collected: Collected) -> None:
    size = 50 * 1024 * 1024
    collected.host.server.route(
        "/upstream", Reply(stream_bytes=size, headers=[("Content-Length", str(size))])
    )
    rejected(collected, collected.host.collect(), "65536 bytes", collected.host.url)


def test_endless_body_is_aborted(collected: Collected) -> None:
    # Without Content-Length and without end: only counting what arrives stops this.
    collected.host.server.route("/upstream", Reply(endless=True))
    rejected(collected, collected.host.collect(), "65536 bytes")


def test_server_that_never_answers_hits_the_deadline(collected: Collected) -> None:
    collected.host.server.route("/upstream", Reply(hang=True))
    result = collected.host.collect(timeout=2)
    rejected(collected, result, collected.host.url)


def test_body_dripping_forever_hits_the_total_deadline(collected: Collected) -> None:
    # A byte every half second keeps each read under the read timeout, so only the
    # deadline over the whole request can end this download.
    body = (collected.good.path + "\n").encode()
    collected.host.server.route("/upstream", Reply(body=body, drip=0.5))
    result = collected.host.collect(timeout=3)
    rejected(collected, result, "did not answer within 3s", collected.host.url)
    assert collected.host.server.count("/upstream") == 1


def test_headers_dripping_forever_hit_the_total_deadline(collected: Collected) -> None:
    collected.host.server.route("/upstream", Reply(drip_headers=0.5))
    result = collected.host.collect(timeout=3)
    rejected(collected, result, "did not answer within 3s", collected.host.url)
    assert collected.host.server.count("/upstream") == 1


def test_content_encoding_is_refused(collected: Collected) -> None:
    body = gzip.compress((collected.good.path + "\n").encode())
    collected.host.server.route(
        "/upstream", Reply(body=body, headers=[("Content-Encoding", "gzip")])
    )
    rejected(collected, collected.host.collect(), "gzip")


def test_connection_refused(collected: Collected) -> None:
    port = collected.host.server.port
    collected.host.server.stop()
    result = collected.host.collect(url=f"http://127.0.0.1:{port}/upstream", timeout=5)
    line = rejected(collected, result, f"127.0.0.1:{port}", "connection failed")
    assert GAVE_UP.search(line), line


def test_connection_closed_without_an_answer_is_retried(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    body = (system.path + "\n").encode()
    host.server.route("/upstream", [Reply(close=True), Reply(body=body)])
    result = host.collect()
    assert result.returncode == 0, result
    assert host.server.count("/upstream") == 2
    assert host.upstream() == system.path
    assert fetch_success(host) == 1


def test_connection_closed_every_time_gives_up(collected: Collected) -> None:
    collected.host.server.route("/upstream", Reply(close=True))
    result = collected.host.collect(timeout=5)
    line = rejected(collected, result, collected.host.url, "connection failed")
    assert GAVE_UP.search(line), line
    assert collected.host.server.count("/upstream") > 1, "a connection error is retried"


# ---- 304 only answers a conditional request ------------------------------------


def test_304_on_a_first_fetch_is_refused(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.server.route("/upstream", Reply(status=304))
    result = host.collect()
    assert result.returncode == 1, result
    (line,) = error_lines(result)
    assert "304" in line and host.url in line, result
    (request,) = host.server.requests("/upstream")
    assert "if-none-match" not in request.headers
    assert "if-modified-since" not in request.headers
    assert host.upstream() is None
    assert host.snapshot()["state"] == "unknown"
    assert fetch_success(host) == 0


def test_304_after_a_200_without_validators_is_refused(host: Host) -> None:
    """Nothing to make the request conditional with, so a 304 cannot be an answer to it."""
    system = host.build_one("a")
    host.install(system)
    host.write_deployed(system)
    host.server.route("/upstream", Reply(body=(system.path + "\n").encode()))  # no ETag
    assert host.collect().returncode == 0
    before = host.links()
    host.server.reset_requests()
    host.server.route("/upstream", Reply(status=304))
    result = host.collect()
    assert result.returncode == 1, result
    (line,) = error_lines(result)
    assert "304" in line, result
    (request,) = host.server.requests("/upstream")
    assert "if-none-match" not in request.headers
    assert "if-modified-since" not in request.headers
    assert host.links() == before
    assert fetch_success(host) == 0


def test_304_from_another_url_is_refused(collected: Collected) -> None:
    """The validators belong to the URL they came from: a new URL is fetched
    unconditionally, and its 304 does not stand for the old URL's answer."""
    host = collected.host
    host.server.route("/elsewhere", Reply(status=304))
    result = host.collect(url=host.server.url("/elsewhere"))
    rejected(collected, result, "304")
    (request,) = host.server.requests("/elsewhere")
    assert "if-none-match" not in request.headers
    assert "if-modified-since" not in request.headers


# ---- Nix refuses --------------------------------------------------------------


def test_unsigned_path_is_refused_by_nix(collected: Collected) -> None:
    host = collected.host
    unsigned = host.build_one("plain", signed=False)
    host.publish(unsigned)
    result = host.collect()
    line = rejected(collected, result, unsigned.path, nix_ran=True)
    # Nix 2.8 says: "... is not signed by any of the keys in 'trusted-public-keys'".
    assert "not signed" in line or "signature" in line, "the error line carries Nix's reason"


def test_path_missing_from_cache_is_refused_by_nix(collected: Collected) -> None:
    host = collected.host
    path = f"/nix/store/{'0' * 32}-nixos-system-never-built"
    host.server.publish_body((path + "\n").encode())
    rejected(collected, host.collect(), path, nix_ran=True)


# ---- credentials arrive, and never leak ------------------------------------------


def test_bearer_token_and_header_arrive(host: Host, tmp_path: Path) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    result = host.collect(
        "--bearer-token-file", str(token), "--header", "X-Fleet-Key: k-1", "--debug"
    )
    assert result.returncode == 0, result
    (request,) = host.server.requests("/upstream")
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["x-fleet-key"] == "k-1"
    assert TOKEN not in result.stdout + result.stderr


def test_netrc_credentials_arrive(host: Host, tmp_path: Path) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login deployer password {PASSWORD}\n")
    netrc.chmod(0o600)
    result = host.collect("--netrc-file", str(netrc), "--debug")
    assert result.returncode == 0, result
    (request,) = host.server.requests("/upstream")
    expected = base64.b64encode(f"deployer:{PASSWORD}".encode()).decode()
    assert request.headers["authorization"] == f"Basic {expected}"
    assert PASSWORD not in result.stdout + result.stderr


def test_home_netrc_is_not_used_implicitly(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    netrc = host.home / ".netrc"  # the agent runs with HOME=host.home
    netrc.write_text(f"machine 127.0.0.1 login deployer password {PASSWORD}\n")
    netrc.chmod(0o600)
    implicit = host.collect()
    assert implicit.returncode == 0, implicit
    # The same file, named with --netrc-file, is used: it would have matched.
    named = host.collect("--netrc-file", str(netrc))
    assert named.returncode == 0, named
    first, second = host.server.requests("/upstream")
    assert "authorization" not in first.headers
    expected = base64.b64encode(f"deployer:{PASSWORD}".encode()).decode()
    assert second.headers["authorization"] == f"Basic {expected}"


def test_request_asks_for_identity_encoding(host: Host) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    assert host.collect().returncode == 0
    (request,) = host.server.requests("/upstream")
    assert request.headers["accept-encoding"] == "identity"


def test_proxy_environment_is_honoured(host: Host, tmp_path: Path) -> None:
    systems = host.build(SystemSpec("direct"), SystemSpec("proxied"))
    direct, proxied = systems["direct"], systems["proxied"]
    host.install(direct)
    host.publish(direct)  # what the agent would get if it went around the proxy
    # Already valid, so nix-store --realise needs no substituter (Nix honours the proxy
    # variables too, and this proxy only knows the one URL).
    host.realise(proxied)
    (tmp_path / "proxy-cache").mkdir()
    proxy = TestServer(cache_dir=tmp_path / "proxy-cache")
    proxy.start()
    try:
        # A proxy is sent the absolute URL as the request target.
        proxy.route(host.url, Reply(body=(proxied.path + "\n").encode()))
        env = {
            "http_proxy": proxy.base_url,
            "HTTP_PROXY": proxy.base_url,
            "no_proxy": "",  # whatever the test runner has must not exempt 127.0.0.1
            "NO_PROXY": "",
        }
        result = host.run_agent(
            "collect",
            "--url",
            host.url,
            "--prometheus-path",
            str(host.metrics_path),
            "--timeout",
            "30",
            env=env,
        )
    finally:
        proxy.stop()
    assert result.returncode == 0, result
    (request,) = proxy.requests(host.url)
    assert request.method == "GET"
    assert host.server.count() == 0, "nothing went around the proxy"
    assert host.upstream() == proxied.path
    assert fetch_success(host) == 1


def test_config_file_credentials_and_headers(host: Host, tmp_path: Path) -> None:
    system = host.build_one("a")
    host.install(system)
    host.publish(system)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    config = tmp_path / "autodeploy.toml"
    config.write_text(
        f'url = "{host.url}"\nbearer_token_file = "{token}"\nheaders = ["X-From: config"]\n'
    )
    result = host.run_agent(
        "collect", "--config", str(config), "--prometheus-path", str(host.metrics_path)
    )
    assert result.returncode == 0, result
    (request,) = host.server.requests("/upstream")
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["x-from"] == "config"


@pytest.mark.parametrize("status", [401, 403, 500])
def test_secrets_stay_out_of_failure_output(host: Host, tmp_path: Path, status: int) -> None:
    system = host.build_one("a")
    host.install(system)
    host.server.route("/upstream", Reply(status=status, headers=[("Retry-After", "0")]))
    token = tmp_path / "token"
    token.write_text(TOKEN)
    url = host.server.url("/upstream").replace("http://", f"http://deployer:{PASSWORD}@")
    with_token = host.collect("--bearer-token-file", str(token), "--debug")
    with_userinfo = host.collect("--debug", url=url)
    for result in (with_token, with_userinfo):
        assert result.returncode == 1, result
        assert str(status) in error_lines(result)[0]
        output = result.stdout + result.stderr
        assert TOKEN not in output and PASSWORD not in output, result
    # The snapshot is world-readable and `status --json` prints its URL.
    shown = host.status("--json")
    assert shown.returncode == 0, shown
    for text in (shown.stdout, (host.state_dir / "snapshot.json").read_text()):
        assert TOKEN not in text and PASSWORD not in text, text


# ---- validators belong to the exact URL that gave them --------------------------------

OLDER = "Mon, 01 Jan 2024 00:00:00 GMT"
NEWER = "Tue, 02 Jan 2024 00:00:00 GMT"


def by_last_modified(answers: dict[str, tuple[System, str]]) -> Callable[[RecordedRequest], Reply]:
    """A static file server by query: each answer has its Last-Modified and is 304 to an
    If-Modified-Since that is not older, as such servers do."""

    def reply(request: RecordedRequest) -> Reply:
        system, modified = answers[request.query]
        since = request.headers.get("if-modified-since")
        if since and parsedate_to_datetime(since) >= parsedate_to_datetime(modified):
            return Reply(status=304)
        return Reply(body=(system.path + "\n").encode(), headers=[("Last-Modified", modified)])

    return reply


def test_validators_are_not_sent_to_another_redirect_target(host: Host) -> None:
    """/latest -> /builds/1, later /latest -> /builds/0 (an older build, upstream rolled
    back): /builds/0 is asked unconditionally, so its older date cannot answer 304."""
    systems = host.build(SystemSpec("a"), SystemSpec("b0"), SystemSpec("b1"))
    host.install(systems["a"])
    host.server.route("/builds/0", by_last_modified({"": (systems["b0"], OLDER)}))
    host.server.route("/builds/1", by_last_modified({"": (systems["b1"], NEWER)}))
    latest = host.server.url("/latest")
    for build in ("1", "0", "0"):
        host.server.route("/latest", Reply(status=302, headers=[("Location", f"/builds/{build}")]))
        result = host.collect(url=latest)
        assert result.returncode == 0, result
        assert host.upstream() == systems["b" + build].path
    first, second = host.server.requests("/builds/0")
    assert "if-modified-since" not in first.headers
    assert second.headers["if-modified-since"] == OLDER, "the same URL again: conditional"
    (only,) = host.server.requests("/builds/1")
    assert "if-modified-since" not in only.headers


def test_validators_are_not_sent_to_another_query(host: Host) -> None:
    """?host=web1 then ?host=web2: another URL (the query is shown without its value, but
    compared in full), so web2 gets its own system, never web1's."""
    systems = host.build(SystemSpec("a"), SystemSpec("web1"), SystemSpec("web2"))
    host.install(systems["a"])
    answers = {f"host={name}": (systems[name], NEWER) for name in ("web1", "web2")}
    host.server.route("/system", by_last_modified(answers))
    for name in ("web1", "web2", "web2"):
        result = host.collect(url=host.server.url("/system") + f"?host={name}")
        assert result.returncode == 0, result
        assert host.upstream() == systems[name].path
    conditional = ["if-modified-since" in r.headers for r in host.server.requests("/system")]
    assert conditional == [False, False, True], "only the very same URL again"
    assert "host=web" not in (host.state_dir / "snapshot.json").read_text()


# ---- odd input is one error line, and the snapshot and metrics say so ------------------


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (Reply(status=503, headers=[("Retry-After", "\xb2")]), "503"),
        (Reply(status=302, headers=[("Location", "http://[::1/x")]), "invalid URL"),
    ],
    ids=["retry-after-superscript-two", "location-unclosed-ipv6"],
)
def test_odd_answers_are_one_error_line(collected: Collected, reply: Reply, words: str) -> None:
    collected.host.server.route("/upstream", reply)
    rejected(collected, collected.host.collect(timeout=4), words)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--url", "http://[::1/x"], "not a valid URL"),
        (["--header", "X-Site: wéb€"], "X-Site"),
    ],
    ids=["url-unclosed-ipv6", "header-not-ascii"],
)
def test_odd_options_are_one_error_line(collected: Collected, args: list[str], words: str) -> None:
    host = collected.host
    result = host.run_agent(
        "collect", "--url", host.url, "--prometheus-path", str(host.metrics_path), *args
    )
    rejected(collected, result, words)
    assert "Traceback" not in result.stderr
