"""The project's one HTTP door: the only module that imports requests and urllib3.

Every request the agent makes goes through here under the same rules: a total deadline,
https verified against ca_bundle(), secrets sent only to the host they belong to and never
quoted in a message (shown()), redirects followed by hand, bodies capped as they arrive,
retries with backoff where a retry can help. A failure is one line: an UpstreamError."""

from __future__ import annotations

import base64
import email.utils
import logging
import netrc
import os
import re
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from urllib.parse import unquote, urljoin, urlsplit

import requests
import urllib3

from . import __version__
from .config import Settings
from .errors import ConfigError, UpstreamError

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # get()'s default cap, and post_json()'s
PROBE_BODY = 4096  # of a health URL's body, kept for the operator
_TOKEN = re.compile(r"[!-~]+")  # visible ASCII: a header value that needs no encoding
MAX_REDIRECTS = 5
MAX_ATTEMPTS = 4
REDIRECTS = {301, 302, 303, 307, 308}
RETRIED = {429, 500, 502, 503, 504}


class Session:
    """One HTTP session for many requests: the resident collector keeps its connection
    alive from poll to poll. Each request still is the same as a one-shot's."""

    def __init__(self) -> None:
        self.http = requests.Session()  # trust_env stays on: proxy variables are honoured

    def close(self) -> None:
        self.http.close()


@dataclass(frozen=True)
class Credentials:
    """Where a GET's secrets come from: a bearer token file, else a netrc file's entry for
    the host, else the URL's user:password; and extra headers. They go only to the host of
    the URL asked for. Upstream's are its options; another service may bring its own."""

    bearer_token_file: str | None = None
    netrc_file: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Answer:
    """What a server answered. From get(): 200, or 304 to a request that carried validators;
    `url` is the exact URL that answered, after redirects (it may hold credentials: show it
    only through shown())."""

    status: int
    body: bytes  # capped: get() refuses a longer one, post_json() cuts it
    url: str
    etag: str | None
    last_modified: str | None


class _Deadline(BaseException):  # not Exception: nothing in requests may swallow it
    pass


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """A total deadline over connect, headers and a slowly dripping body alike: the alarm
    interrupts whatever socket call is blocking. The CLI runs this in its main thread."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise _Deadline

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _NoAuth(requests.auth.AuthBase):
    """Set explicitly so requests never falls back to ~/.netrc (only --netrc-file counts)."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


def _authorization(credentials: Credentials, url: str) -> dict[str, str]:
    """The Authorization header: a bearer token, else netrc's entry for the host, else the
    URL's user:password. No message here may quote a secret."""
    if credentials.bearer_token_file:
        path = credentials.bearer_token_file
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read bearer token file {path}: {e}") from None
        if not _TOKEN.fullmatch(token):
            raise ConfigError(f"bearer token file {path} must hold one token of visible ASCII")
        return {"Authorization": f"Bearer {token}"}
    parts = urlsplit(url)
    login, password = parts.username, parts.password
    if credentials.netrc_file:
        path = credentials.netrc_file
        try:
            entry = netrc.netrc(path).authenticators(parts.hostname or "")
        except OSError as e:
            raise ConfigError(f"cannot read netrc file {path}: {e.strerror}") from None
        except netrc.NetrcParseError as e:  # its message quotes the offending token
            raise ConfigError(f"cannot parse netrc file {path} (line {e.lineno})") from None
        if entry:
            login, _, password = entry
    if login is None:
        return {}
    basic = f"{unquote(login)}:{unquote(password or '')}"
    if not basic.isprintable():
        raise ConfigError(f"the credentials for {parts.hostname} contain control characters")
    return {"Authorization": "Basic " + base64.b64encode(basic.encode()).decode()}


def ca_bundle(settings: Settings, environ: Mapping[str, str] = os.environ) -> str | bool:
    """What verifies https: --ca-file, else the system's bundle, found the way Nix and
    OpenSSL find it. requests alone trusts certifi's copy, which on NixOS honours only
    NIX_SSL_CERT_FILE, so CAs added with security.pki.certificates would be ignored.
    True (certifi) only where none of these exists."""
    if settings.ca_file:
        return settings.ca_file
    system = "/etc/ssl/certs/ca-certificates.crt"  # NixOS (security/ca.nix), Debian
    candidates = (environ.get("NIX_SSL_CERT_FILE"), environ.get("SSL_CERT_FILE"), system)
    return next((path for path in candidates if path and os.path.isfile(path)), True)


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def shown(url: str) -> str:
    """The URL for messages and state files: no user:password, and no query, which may
    carry a token (a presigned URL's signature). Never fails, for an invalid URL too."""
    try:
        parts = urlsplit(_without_userinfo(url))
    except ValueError:  # e.g. an unclosed IPv6 bracket: cut by hand
        base, query, _ = url.partition("#")[0].partition("?")
        base = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/]*@", r"\1", base)
        return base + ("?…" if query else "")
    return parts._replace(query="…" if parts.query else "", fragment="").geturl()


def _check_url(url: str, what: str) -> None:
    """An invalid URL (an unclosed IPv6 bracket, a port out of range) is a failed request,
    said in one line, never a traceback from deep inside the HTTP library."""
    try:
        urlsplit(url).port  # noqa: B018 -- parsing the port is the check
    except ValueError as e:
        raise UpstreamError(f"{what} {shown(url)} is not a valid URL: {e}") from None


def _retry_after(response: requests.Response, attempt: int) -> float:
    value = response.headers.get("Retry-After", "").strip()
    if value.isascii() and value.isdigit():  # str.isdigit() also takes "²"
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):  # absent or not a date: our own backoff
        return float(2**attempt)


def _no_validators(url: str) -> dict[str, str]:
    return {}


def get(
    settings: Settings,
    url: str,
    credentials: Credentials,
    *,
    validators: Callable[[str], dict[str, str]] = _no_validators,
    limit: int = MAX_BODY,
    session: Session | None = None,
    what: str = "upstream",
) -> Answer:
    """GET url within settings.timeout, https checked against ca_bundle(settings), redirects
    followed by hand; with a session, over its kept-alive connection. `validators(u)` gives
    the conditional headers (If-None-Match, If-Modified-Since) to send to the URL u of each
    hop, {} for none; a 304 is an answer only to a request that carried some. Returns a 200
    (its body at most `limit` bytes) or that 304; anything else, once retries that may help
    are spent, is an UpstreamError whose message starts with `what` and the URL."""
    start = time.monotonic()

    def remaining() -> float:
        return settings.timeout - (time.monotonic() - start)

    try:
        with _deadline(settings.timeout):
            return _get(
                settings, url, credentials, validators, limit, session or Session(), what, remaining
            )
    except _Deadline:
        raise UpstreamError(
            f"{what} {shown(url)} did not answer within {settings.timeout:g}s"
        ) from None


def _get(
    settings: Settings,
    asked: str,
    credentials: Credentials,
    validators: Callable[[str], dict[str, str]],
    limit: int,
    session: Session,
    what: str,
    remaining: Callable[[], float],
) -> Answer:
    url = asked
    _check_url(url, what)
    for name, value in credentials.headers:
        if not value.isascii() or not value.isprintable():
            raise UpstreamError(f"header {name}: the value must be printable ASCII text")
    origin = urlsplit(url).netloc.rpartition("@")[2].lower()
    authorization = _authorization(credentials, url)
    http = session.http
    http.cookies.clear()  # a kept session sends what a fresh one would
    attempt = redirects = 0
    while True:
        headers = {"Accept-Encoding": "identity", "User-Agent": f"nixos-autodeploy/{__version__}"}
        # Credentials and the extra headers go only to the host they were meant for.
        if urlsplit(url).netloc.rpartition("@")[2].lower() == origin:
            headers.update(dict(credentials.headers))
            headers.update(authorization)
        conditional = validators(url)
        headers.update(conditional)
        wait: float
        try:
            response = http.get(
                _without_userinfo(url),  # credentials travel in the header above
                headers=headers,
                auth=_NoAuth(),
                allow_redirects=False,
                stream=True,
                timeout=(max(min(10.0, remaining()), 0.1), max(remaining(), 0.1)),
                verify=ca_bundle(settings),
            )
        except ValueError as e:  # requests parses a redirect's Location even when not following
            raise UpstreamError(f"{what} {shown(url)} redirected to an invalid URL: {e}") from None
        except requests.exceptions.SSLError as e:  # retrying cannot fix a certificate
            raise UpstreamError(f"{what} {shown(url)}: {_reason(e)}") from None
        except requests.ConnectionError as e:
            failure = f"{what} {shown(url)}: connection failed: {_reason(e)}"
            wait = float(2**attempt)
        except requests.RequestException as e:
            raise UpstreamError(f"{what} {shown(url)}: {_reason(e)}") from None
        else:
            with response:
                status = response.status_code
                if status in REDIRECTS:
                    url = _redirect(url, response.headers.get("Location"), f"{what} ")
                    redirects += 1
                    if redirects > MAX_REDIRECTS:
                        raise UpstreamError(
                            f"{what} {shown(asked)}: more than {MAX_REDIRECTS} redirects"
                        )
                    continue
                # A 304 means something only as the answer to our validators.
                if status == 304 and conditional:
                    response.raw.release_conn()  # no body: kept alive for the next request
                    return _answer(response, url, b"")
                if status == 200:
                    body = _read(response, url, limit, what)
                    response.raw.release_conn()  # read to its end: kept alive likewise
                    return _answer(response, url, body)
                failure = f"{what} {shown(url)} answered HTTP {status} {response.reason}"
                if status not in RETRIED:
                    raise UpstreamError(failure)
                wait = _retry_after(response, attempt)
        attempt += 1
        if attempt >= MAX_ATTEMPTS:
            raise UpstreamError(f"{failure} (gave up after {attempt} attempts)")
        if wait >= remaining():
            raise UpstreamError(f"{failure} (no time left to retry within the deadline)")
        log.info("%s; retrying in %.0fs", failure, wait)
        time.sleep(wait)


def _answer(response: requests.Response, url: str, body: bytes) -> Answer:
    return Answer(
        status=response.status_code,
        body=body,
        url=url,
        etag=response.headers.get("ETag"),
        last_modified=response.headers.get("Last-Modified"),
    )


def _reason(e: Exception) -> str:
    # requests nests urllib3's reasons; the innermost one is the readable part.
    reason: BaseException = e
    while reason.args and isinstance(reason.args[0], BaseException):
        reason = reason.args[0]
    text = str(getattr(reason, "reason", None) or reason)
    # Drop urllib3's "HTTPConnection(host=..., port=...): " prefix; the URL is said already.
    text = re.sub(r"^\w+\(host=.*?\): (Failed to establish a new connection: )?", "", text)
    return text.splitlines()[0][:200] if text else type(reason).__name__


def _redirect(url: str, location: str | None, what: str) -> str:
    """The redirect's target, refused when it is no http(s) URL or leaves https for http.
    `what` starts the messages (with its space, or empty)."""
    if not location:
        raise UpstreamError(f"{what}{shown(url)} redirected without a Location")
    try:
        target = urljoin(url, location)
    except ValueError as e:
        raise UpstreamError(f"{what}{shown(url)} redirected to an invalid URL: {e}") from None
    _check_url(target, f"{what}{shown(url)} redirected to")
    scheme = urlsplit(target).scheme
    if scheme not in ("http", "https"):
        raise UpstreamError(f"{what}{shown(url)} redirected to a {scheme}: URL, refused")
    if urlsplit(url).scheme == "https" and scheme == "http":
        raise UpstreamError(f"{what}{shown(url)} redirected from https to http, refused")
    return target


def _read(response: requests.Response, url: str, limit: int, what: str) -> bytes:
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UpstreamError(f"{what} {shown(url)} sent Content-Encoding {encoding!r}, refused")
    body = bytearray()
    try:
        # Count what arrives: Content-Length may lie.
        for chunk in response.raw.stream(8192, decode_content=False):
            body += chunk
            if len(body) > limit:
                raise UpstreamError(f"{what} {shown(url)} sent more than {limit} bytes, aborted")
    except urllib3.exceptions.HTTPError as e:
        reason = e.args[0] if e.args and isinstance(e.args[0], str) else type(e).__name__
        raise UpstreamError(f"{what} {shown(url)}: the body broke off: {reason}") from None
    return bytes(body)


@dataclass(frozen=True)
class Probed:
    status: int
    reason: str
    body: str  # the start of the body, for the operator


def probe(settings: Settings, url: str, timeout: float) -> Probed:
    """One GET of an operator's health URL within timeout: its final status after at most
    MAX_REDIRECTS redirects, and the start of its body. The upstream URL's credentials
    and headers are not sent (they are for upstream only); --ca-file and the proxy
    variables apply. UpstreamError when it gives no answer."""
    _check_url(url, "health URL")
    try:
        with _deadline(timeout):
            return _probe(settings, url, time.monotonic() + timeout)
    except _Deadline:
        raise UpstreamError(f"{shown(url)} did not answer within {timeout:g}s") from None


def _probe(settings: Settings, url: str, deadline: float) -> Probed:
    session = requests.Session()
    for _ in range(MAX_REDIRECTS + 1):
        left = max(deadline - time.monotonic(), 0.1)
        try:
            response = session.get(
                url,
                headers={"User-Agent": f"nixos-autodeploy/{__version__}"},
                auth=_NoAuth(),
                allow_redirects=False,
                stream=True,
                timeout=(min(10.0, left), left),
                verify=ca_bundle(settings),
            )
        except requests.RequestException as e:
            raise UpstreamError(f"{shown(url)}: {_reason(e)}") from None
        with response:
            if response.status_code in REDIRECTS:
                url = _redirect(url, response.headers.get("Location"), "")
                continue
            try:
                body = response.raw.read(PROBE_BODY, decode_content=False) or b""
            except urllib3.exceptions.HTTPError:
                body = b""  # the status is the answer; the body is only a hint
            text = body.decode("utf-8", errors="replace").strip()
            return Probed(response.status_code, response.reason or "", text)
    raise UpstreamError(f"{shown(url)}: more than {MAX_REDIRECTS} redirects")


def post_json(settings: Settings, url: str, body: object, headers: dict[str, str]) -> Answer:
    """POST a small JSON body to a service that is not upstream (a FleetLock server) within
    settings.timeout, TLS checked against --ca-file. It follows no redirect and sends none of
    upstream's credentials or headers: they belong to the upstream URL's host. Any status
    is an answer; its body is cut at MAX_BODY bytes."""
    what = f"POST {shown(url)}"
    try:
        with _deadline(settings.timeout):
            response = requests.post(
                _without_userinfo(url),
                json=body,
                headers={"User-Agent": f"nixos-autodeploy/{__version__}", **headers},
                auth=_NoAuth(),
                allow_redirects=False,
                stream=True,
                timeout=(min(10.0, settings.timeout), settings.timeout),
                verify=ca_bundle(settings),
            )
            with response:
                data = response.raw.read(MAX_BODY + 1, decode_content=True) or b""
                return _answer(response, url, data[:MAX_BODY])
    except _Deadline:
        raise UpstreamError(f"{what}: no answer within {settings.timeout:g}s") from None
    except requests.exceptions.SSLError as e:
        raise UpstreamError(f"{what}: {_reason(e)}") from None
    except requests.ConnectionError as e:
        raise UpstreamError(f"{what}: connection failed: {_reason(e)}") from None
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        raise UpstreamError(f"{what}: {_reason(e)}") from None
