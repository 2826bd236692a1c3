"""Fetching the upstream store path: the only module that speaks HTTP (and imports requests)."""

from __future__ import annotations

import base64
import email.utils
import hashlib
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
from .store import StorePath

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
PROBE_BODY = 4096  # of a health URL's body, kept for the operator
_TOKEN = re.compile(r"[!-~]+")  # visible ASCII: a header value that needs no encoding
MAX_REDIRECTS = 5
MAX_ATTEMPTS = 4
REDIRECTS = {301, 302, 303, 307, 308}
RETRIED = {429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Validators:
    """What the last 200 said, for a conditional GET of the very URL that gave it."""

    etag: str | None
    last_modified: str | None
    url: str  # digest() of the URL that answered them (after redirects)


@dataclass(frozen=True)
class Fetched:
    path: StorePath | None  # None: 304, the last upstream still holds
    etag: str | None
    last_modified: str | None
    url: str  # digest() of the URL that answered 200 (or 304)


def digest(url: str) -> str:
    """What identifies a URL in state files: the whole URL (query, credentials and all,
    since any of them may select a different system) without storing it."""
    return hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()


class Session:
    """One HTTP session for many fetches: the resident collector keeps its connection
    alive from poll to poll. Each fetch still sends the same request as a one-shot's."""

    def __init__(self) -> None:
        self.http = requests.Session()  # trust_env stays on: proxy variables are honoured

    def close(self) -> None:
        self.http.close()


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


def _credentials(settings: Settings, url: str) -> dict[str, str]:
    """The Authorization header: a bearer token, else netrc's entry for the host, else the
    URL's user:password. No message here may quote a secret."""
    if settings.bearer_token_file:
        path = settings.bearer_token_file
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
    if settings.netrc_file:
        path = settings.netrc_file
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
    """An invalid URL (an unclosed IPv6 bracket, a port out of range) is a failed fetch,
    said in one line, never a traceback from deep inside the HTTP library."""
    try:
        urlsplit(url).port  # noqa: B018 -- parsing the port is the check
    except ValueError as e:
        raise UpstreamError(f"{what} {shown(url)} is not a valid URL: {e}") from None


def parse_body(body: bytes, url: str) -> StorePath:
    """The original tool's format: one store path line, surrounding whitespace ignored."""

    def reject(what: str) -> UpstreamError:
        return UpstreamError(f"upstream {shown(url)} gave {what}")

    if b"\0" in body:
        raise reject("a body containing a NUL byte")
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise reject("a body that is not UTF-8 text") from None
    if not text:
        raise reject("an empty body")
    if text.startswith("<") or "<html" in text.lower():
        raise reject("HTML, not a store path")
    if "\n" in text or "\r" in text:
        raise reject("more than one line; expected one store path")
    try:
        return StorePath.parse(text)
    except ValueError as e:
        raise reject(f"an invalid store path: {e}") from None


def _retry_after(response: requests.Response, attempt: int) -> float:
    value = response.headers.get("Retry-After", "").strip()
    if value.isascii() and value.isdigit():  # str.isdigit() also takes "²"
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):  # absent or not a date: our own backoff
        return float(2**attempt)


def fetch(settings: Settings, cached: Validators | None, session: Session | None = None) -> Fetched:
    """GET the upstream URL within settings.timeout, following redirects by hand; with a
    session, over its kept-alive connection."""
    assert settings.url is not None
    start = time.monotonic()

    def remaining() -> float:
        return settings.timeout - (time.monotonic() - start)

    try:
        with _deadline(settings.timeout):
            return _fetch(settings, cached, remaining, session or Session())
    except _Deadline:
        raise UpstreamError(
            f"upstream {shown(settings.url)} did not answer within {settings.timeout:g}s"
        ) from None


def _fetch(
    settings: Settings,
    cached: Validators | None,
    remaining: Callable[[], float],
    session: Session,
) -> Fetched:
    assert settings.url is not None
    url = settings.url
    _check_url(url, "upstream")
    for name, value in settings.headers:
        if not value.isascii() or not value.isprintable():
            raise UpstreamError(f"header {name}: the value must be printable ASCII text")
    origin = urlsplit(url).netloc.rpartition("@")[2].lower()
    credentials = _credentials(settings, url)
    http = session.http
    http.cookies.clear()  # a kept session sends what a fresh one would
    attempt = redirects = 0
    while True:
        headers = {"Accept-Encoding": "identity", "User-Agent": f"nixos-autodeploy/{__version__}"}
        # Credentials and the operator's headers go only to the host they were meant for.
        if urlsplit(url).netloc.rpartition("@")[2].lower() == origin:
            headers.update(dict(settings.headers))
            headers.update(credentials)
        # The validators go only to the URL that gave them: a redirect elsewhere (an
        # older build, another host's system) is not what they describe.
        conditional = cached is not None and cached.url == digest(url)
        if cached is not None and conditional:
            if cached.etag:
                headers["If-None-Match"] = cached.etag
            if cached.last_modified:
                headers["If-Modified-Since"] = cached.last_modified
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
            raise UpstreamError(
                f"upstream {shown(url)} redirected to an invalid URL: {e}"
            ) from None
        except requests.exceptions.SSLError as e:  # retrying cannot fix a certificate
            raise UpstreamError(f"upstream {shown(url)}: {_reason(e)}") from None
        except requests.ConnectionError as e:
            failure = f"upstream {shown(url)}: connection failed: {_reason(e)}"
            wait = float(2**attempt)
        except requests.RequestException as e:
            raise UpstreamError(f"upstream {shown(url)}: {_reason(e)}") from None
        else:
            with response:
                status = response.status_code
                if status in REDIRECTS:
                    url = _redirect(url, response.headers.get("Location"))
                    redirects += 1
                    if redirects > MAX_REDIRECTS:
                        raise UpstreamError(
                            f"upstream {shown(settings.url)}: more than {MAX_REDIRECTS} redirects"
                        )
                    continue
                # A 304 means something only as the answer to our validators.
                if status == 304 and cached is not None and conditional:
                    response.raw.release_conn()  # no body: kept alive for the next fetch
                    return Fetched(None, cached.etag, cached.last_modified, cached.url)
                if status == 200:
                    fetched = _read(response, url)
                    response.raw.release_conn()  # read to its end: kept alive likewise
                    return fetched
                failure = f"upstream {shown(url)} answered HTTP {status} {response.reason}"
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


def _reason(e: Exception) -> str:
    # requests nests urllib3's reasons; the innermost one is the readable part.
    reason: BaseException = e
    while reason.args and isinstance(reason.args[0], BaseException):
        reason = reason.args[0]
    text = str(getattr(reason, "reason", None) or reason)
    # Drop urllib3's "HTTPConnection(host=..., port=...): " prefix; the URL is said already.
    text = re.sub(r"^\w+\(host=.*?\): (Failed to establish a new connection: )?", "", text)
    return text.splitlines()[0][:200] if text else type(reason).__name__


def _redirect(url: str, location: str | None, what: str = "upstream ") -> str:
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


def _read(response: requests.Response, url: str) -> Fetched:
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UpstreamError(f"upstream {shown(url)} sent Content-Encoding {encoding!r}, refused")
    body = bytearray()
    try:
        # Count what arrives: Content-Length may lie.
        for chunk in response.raw.stream(8192, decode_content=False):
            body += chunk
            if len(body) > MAX_BODY:
                raise UpstreamError(
                    f"upstream {shown(url)} sent more than {MAX_BODY} bytes, aborted"
                )
    except urllib3.exceptions.HTTPError as e:
        reason = e.args[0] if e.args and isinstance(e.args[0], str) else type(e).__name__
        raise UpstreamError(f"upstream {shown(url)}: the body broke off: {reason}") from None
    return Fetched(
        path=parse_body(bytes(body), url),
        etag=response.headers.get("ETag"),
        last_modified=response.headers.get("Last-Modified"),
        url=digest(url),
    )


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
                url = _redirect(url, response.headers.get("Location"), what="")
                continue
            try:
                body = response.raw.read(PROBE_BODY, decode_content=False) or b""
            except urllib3.exceptions.HTTPError:
                body = b""  # the status is the answer; the body is only a hint
            text = body.decode("utf-8", errors="replace").strip()
            return Probed(response.status_code, response.reason or "", text)
    raise UpstreamError(f"{shown(url)}: more than {MAX_REDIRECTS} redirects")


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes  # at most MAX_BODY


def post_json(settings: Settings, url: str, body: object, headers: dict[str, str]) -> Answer:
    """POST a small JSON body to a service that is not upstream (a FleetLock server) within
    settings.timeout, TLS checked against --ca-file. It follows no redirect and sends none of
    upstream's credentials or headers: they belong to the upstream URL's host."""
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
                return Answer(response.status_code, data[:MAX_BODY])
    except _Deadline:
        raise UpstreamError(f"{what}: no answer within {settings.timeout:g}s") from None
    except requests.exceptions.SSLError as e:
        raise UpstreamError(f"{what}: {_reason(e)}") from None
    except requests.ConnectionError as e:
        raise UpstreamError(f"{what}: connection failed: {_reason(e)}") from None
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        raise UpstreamError(f"{what}: {_reason(e)}") from None
